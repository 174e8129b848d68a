"""Validation of the tensor lists that every in-place multi-tensor op takes.

The native and Triton kernels receive raw addresses, so everything that could make them read
or write the wrong memory is checked here, once, in Python: lengths, devices, dtypes, shapes,
layouts and contiguity. Errors name the argument and the index (``grads[3]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Must match csrc/kernels.h: enum DType.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
}
SUPPORTED_DTYPES = tuple(DTYPE_CODES)


def check_params(op: str, params: Sequence[torch.Tensor]) -> torch.device:
    """Checks the ``params`` list and returns the one device all of them live on."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{op}: params must be a list of tensors, got a single tensor")
    if len(params) == 0:
        return torch.device("cpu")
    device = params[0].device
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{op}: params[{i}] must be a tensor, got {type(p).__name__}")
        if p.device != device:
            raise ValueError(
                f"{op}: params[{i}] is on {p.device} but params[0] is on {device}; "
                "every tensor of one call must be on the same device"
            )
        if p.is_sparse:
            raise ValueError(f"{op}: params[{i}] is sparse; only dense params are supported")
        if p.dtype not in DTYPE_CODES:
            kind = "complex" if p.is_complex() else "integer" if not p.is_floating_point() else ""
            raise TypeError(
                f"{op}: params[{i}] has dtype {p.dtype}"
                + (f" ({kind})" if kind else "")
                + "; supported dtypes are float32, float64, float16 and bfloat16"
                + (" (view complex params as real with torch.view_as_real)" if kind == "complex" else "")
            )
    return device


def check_like_params(
    op: str, name: str, tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> None:
    """Checks that ``tensors`` (grads or an optimizer state list) match ``params`` one to one:
    same length, device, shape and dtype, dense."""
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a list of tensors, got a single tensor")
    if len(tensors) != len(params):
        raise ValueError(f"{op}: {name} has {len(tensors)} tensors but params has {len(params)}")
    for i, (t, p) in enumerate(zip(tensors, params)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")
        if t.is_sparse:
            raise ValueError(
                f"{op}: {name}[{i}] is sparse; fastmeta's fused kernels support dense "
                "gradients only (use torch.optim.SparseAdam for sparse ones)"
            )
        if t.device != p.device:
            raise ValueError(f"{op}: {name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
        if t.shape != p.shape:
            raise ValueError(
                f"{op}: {name}[{i}] has shape {tuple(t.shape)} but params[{i}] has shape "
                f"{tuple(p.shape)}"
            )
        if t.dtype != p.dtype:
            raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype} but params[{i}] has {p.dtype}")


def check_contiguous(op: str, name: str, tensors: Sequence[torch.Tensor]) -> None:
    """The kernels write through raw addresses, so a tensor they update in place must be
    contiguous: updating a contiguous copy would silently leave the original unchanged."""
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(
                f"{op}: {name}[{i}] is not contiguous (strides {t.stride()}); the fused "
                "kernels update it in place through its data pointer. Pass a contiguous "
                "tensor or use impl='reference'"
            )


def contiguous_inputs(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Read-only inputs (gradients) may be non-contiguous: the kernel reads a contiguous copy."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def check_scalar(op: str, name: str, value: float | torch.Tensor) -> float:
    """A hyperparameter for the in-place kernels: a Python number or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}") from None


def pointers(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def dtype_codes(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [DTYPE_CODES[t.dtype] for t in tensors]


def numels(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [t.numel() for t in tensors]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_steps(op: str, steps: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> int:
    """Per-param step counters, as torch.optim stores them: one-element float tensors of one
    dtype. Returns that dtype's code. The op increments them in place."""
    if len(steps) != len(params):
        raise ValueError(f"{op}: state_steps has {len(steps)} tensors but params has {len(params)}")
    if not steps:
        return DTYPE_CODES[torch.float32]
    dtype = steps[0].dtype
    for i, s in enumerate(steps):
        if not isinstance(s, torch.Tensor) or s.numel() != 1:
            raise ValueError(f"{op}: state_steps[{i}] must be a one-element tensor")
        if s.dtype not in (torch.float32, torch.float64) or s.dtype != dtype:
            raise TypeError(
                f"{op}: state_steps[{i}] has dtype {s.dtype}; step counters must all be float32 "
                "or all float64"
            )
    return DTYPE_CODES[dtype]


def require_cpu_steps(op: str, steps: Sequence[torch.Tensor]) -> None:
    """The native kernels read and increment step counters through their addresses."""
    for i, s in enumerate(steps):
        if s.device.type != "cpu":
            raise ValueError(f"{op}: state_steps[{i}] is on {s.device}; the native kernels need "
                             "CPU step counters")


def is_zero(value: float | torch.Tensor) -> bool:
    """True for a hyperparameter that is the number 0, so a term can be skipped. A tensor is
    never skipped: it may need a gradient even where its value is 0."""
    return not isinstance(value, torch.Tensor) and value == 0
