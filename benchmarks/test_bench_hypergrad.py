"""pytest-benchmark entries for the SGD-HD step (``python -m pytest benchmarks
--benchmark-only``): fastmeta's fused step against SGD-HD written with torch's pieces."""

from __future__ import annotations

import pytest

import fastmeta.optim as fo
from fastmeta.bench.hypergrad import LR, torch_sgd_hd_step
from fastmeta.bench.optimizers import make_params
from fastmeta.bench.workloads import WORKLOADS


@pytest.mark.parametrize("implementation", ["fastmeta", "torch fused + passes"])
@pytest.mark.parametrize("workload", ["conv4", "resnet18"])
def test_sgd_hd_step(benchmark, workload, implementation):
    params = make_params(WORKLOADS[workload])
    if implementation == "fastmeta":
        step = fo.SGDHD(params, lr=LR, hypergrad_lr=0.0).step
    else:
        step = torch_sgd_hd_step(params, 0.0)
    benchmark.group = f"SGD-HD {workload}"
    benchmark(step)
