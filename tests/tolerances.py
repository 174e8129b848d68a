"""The one dtype → tolerance table of the test suite.

fp32 and fp64 use torch.testing's defaults (fp32 rounding; fp64 much tighter). For fp16/bf16
params the kernels compute in fp32 and round once on store, so a result may differ from the
reference by one unit in the last place of the storage type: the tolerance is that ulp.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-7, "atol": 1e-7},
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    tol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, **tol, msg=msg)


def assert_close_after_steps(
    actual: torch.Tensor, expected: torch.Tensor, *, impl: str, steps: int
) -> None:
    """Like :func:`assert_close`, for results that went through ``steps`` stores.

    Triton's CPU interpreter (3.x) rounds fp32 → bf16 by truncation, where the GPU and the
    native kernels round to nearest even, so interpreted bf16 results may drift from the
    reference by up to one bf16 ulp (2^-7 relative) per stored step.
    """
    if impl == "triton" and expected.dtype == torch.bfloat16:
        ulps = steps * 2.0**-7
        torch.testing.assert_close(actual, expected, rtol=ulps, atol=ulps)
    else:
        assert_close(actual, expected)
