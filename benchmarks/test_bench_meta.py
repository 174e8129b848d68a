"""pytest-benchmark entries for the differentiable updates and the MAML meta-step.

Run with ``python -m pytest benchmarks --benchmark-only``; each group holds fastmeta and its
baselines on the same workload (the same functions ``fastmeta bench`` times).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from fastmeta import functional
from fastmeta.bench import inner, maml
from fastmeta.meta import MLP
from fastmeta.ops.adam import adam_step_reference
from fastmeta.tasks import SinusoidTasks


@pytest.mark.parametrize("implementation", ["fastmeta", "eager autograd"])
def test_differentiable_adam_step(benchmark, implementation):
    """Forward + backward of one differentiable Adam step on [8, 256K]."""
    theta = torch.randn(8, 1 << 18, requires_grad=True)
    g = torch.randn(8, 1 << 18, requires_grad=True)
    up = torch.randn(8, 1 << 18)
    zeros = torch.zeros(8, 1 << 18)

    def run():
        if implementation == "fastmeta":
            new, _ = functional.adam(theta, g, None, **inner.ADAM_HYPER)
        else:
            new = adam_step_reference(theta, g, zeros, zeros, step=1, lr=1e-3,
                                      eps_root=inner.ADAM_HYPER["eps_root"])[0]
        torch.autograd.grad(new, (theta, g), up)

    benchmark.group = "differentiable Adam step [8, 256K]"
    benchmark(run)


@pytest.mark.parametrize("implementation", ["fastmeta", "torch.func vmap", "batched eager",
                                            "eager loop", "higher"])
def test_maml_sinusoid_meta_step(benchmark, implementation):
    if implementation == "higher" and importlib.util.find_spec("higher") is None:
        pytest.skip("higher is not installed")
    episode = SinusoidTasks(seed=0).sample(25, shots=10)
    model = MLP()
    if implementation == "fastmeta":
        step = maml._fastmeta_step(model, F.mse_loss, 1, 1e-3)
    else:
        maker = {"torch.func vmap": maml._vmap_step, "batched eager": maml._batched_eager_step,
                 "eager loop": maml._eager_step, "higher": maml._higher_step}[implementation]
        step = maker(model, F.mse_loss, 1, torch.optim.Adam(model.parameters()))
    benchmark.group = "MAML sinusoid meta-step T=25 K=10"
    benchmark(lambda: step(episode))


@pytest.mark.parametrize("implementation", ["fastmeta", "torch.func vmap", "batched eager"])
def test_cavia_sinusoid_meta_step(benchmark, implementation):
    """Forward + meta-gradient (second order, no outer step) of CAVIA on the sinusoid."""
    episode = SinusoidTasks(seed=0).sample(25, shots=10)
    torch.manual_seed(0)
    maker = {"fastmeta": maml._cavia_fastmeta_step, "torch.func vmap": maml._cavia_vmap_step,
             "batched eager": maml._cavia_batched_eager_step}[implementation]
    step = maker(MLP(in_features=1 + maml.CAVIA_CONTEXT), episode, 1)
    benchmark.group = "CAVIA sinusoid meta-step T=25 K=10 d=5"
    benchmark(step)
