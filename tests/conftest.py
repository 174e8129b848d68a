"""Shared fixtures. Triton kernels are tested on the CPU through Triton's interpreter; the
variable must be set before any @triton.jit function is defined, so it is set here, first."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastmeta import backends  # noqa: E402


def _native_missing() -> str | None:
    if backends.native() is None:
        return f"fastmeta._C is not built ({backends.available()['native_error']})"
    return None


def _triton_missing() -> str | None:
    info = backends.available()
    if not info["triton"]:
        return f"triton does not import: {info['triton_error']}"
    if not info["triton_interpreted"] and not info["cuda"]:
        return "no CUDA and TRITON_INTERPRET is not 1"
    return None


def pytest_collection_modifyitems(config, items):
    reasons = {"native": _native_missing(), "triton": _triton_missing()}
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def impl_param(impl: str):
    """A pytest param for an implementation, marked so it skips where it cannot run."""
    marks = {"native": [pytest.mark.native], "triton": [pytest.mark.triton]}.get(impl, [])
    return pytest.param(impl, marks=marks, id=impl)


ALL_IMPLS = [impl_param(i) for i in ("reference", "native", "triton")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def meta_train_sinusoid(learner, outer, iterations: int, *, held_out_tasks: int,
                        clamp: float | None = None):
    """``(before, after)``: the held-out query loss of a MAML/CAVIA ``learner`` before and after
    ``iterations`` meta-steps on 25-task, 10-shot sinusoid batches (meta-gradients clamped to
    [-clamp, clamp] when given)."""
    from fastmeta.tasks import SinusoidTasks

    tasks = SinusoidTasks(seed=0)
    held_out = tasks.sample(held_out_tasks, shots=10, grid_query=True,
                            generator=torch.Generator().manual_seed(1))
    before = learner.evaluate(held_out).loss
    for _ in range(iterations):
        outer.zero_grad()
        learner(tasks.sample(25, shots=10)).loss.backward()
        if clamp is not None:
            for p in learner.parameters():
                p.grad.clamp_(-clamp, clamp)
        outer.step()
    return before, learner.evaluate(held_out).loss
