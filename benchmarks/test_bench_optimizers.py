"""pytest-benchmark entries for the drop-in optimizers.

Run with ``python -m pytest benchmarks --benchmark-only`` (not part of the test suite: tests
assert correctness, benchmarks measure speed). Each entry times one ``step()`` of fastmeta or
of a torch.optim variant on the same workload, so pytest-benchmark's comparison table gives
the ratios.
"""

from __future__ import annotations

import pytest
import torch

import fastmeta.optim as fo
from fastmeta.bench.optimizers import CONFIGS, NO_TORCH_FUSED, TORCH_VARIANTS, make_params
from fastmeta.bench.workloads import WORKLOADS

IMPLEMENTATIONS = ["fastmeta"] + [f"torch-{v}" for v in TORCH_VARIANTS]


def _optimizer(name: str, implementation: str, workload: str):
    params = make_params(WORKLOADS[workload])
    if implementation == "fastmeta":
        return getattr(fo, name)(params, **CONFIGS[name])
    flags = TORCH_VARIANTS[implementation.removeprefix("torch-")]
    return getattr(torch.optim, name)(params, **CONFIGS[name], **flags)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("workload", ["conv4", "resnet18"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_step(benchmark, name, workload, implementation):
    if implementation == "torch-fused" and name in NO_TORCH_FUSED:
        pytest.skip(f"torch.optim.{name} has no fused=True")
    opt = _optimizer(name, implementation, workload)
    benchmark.group = f"{name} {workload}"
    benchmark(opt.step)
