"""Benchmarks of the differentiable, task-batched inner-loop updates (issue: the meta-learning
engine), each against the same maths written in eager PyTorch ops, in the same run.

* ``adam_8x1m``: forward + backward of one differentiable Adam step on ``[8, 1M]``.
* ``sgd_sinusoid_t25``: one differentiable SGD step for 25 tasks of the sinusoid MLP (6 tensors
  per task), forward + backward to second order, against the per-task, per-tensor update that
  learn2learn and higher perform.
* :func:`saved_bytes_adam_mlp`: the bytes autograd saves for a 5-step differentiable Adam inner
  loop on a 784-256-256-10 MLP, and the NaN count of the meta-gradient (a memory benchmark).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from fastmeta import functional
from fastmeta.bench import harness
from fastmeta.ops.adam import adam_step_reference

ADAM_HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, eps_root=1e-16)
SINUSOID_SHAPES = [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]


def _eager_adam(theta, g, m, v, *, lr, betas, eps, eps_root):
    """The same step in eager ops: the reference *is* plain torch."""
    new, m2, v2, _ = adam_step_reference(theta, g, m, v, step=1, lr=lr, beta1=betas[0],
                                         beta2=betas[1], eps=eps, eps_root=eps_root)
    return new, m2, v2


def adam_step_rows(*, min_run_time: float, tasks: int = 8, n: int = 1 << 20,
                   device: str = "cpu") -> Iterator[harness.Row]:
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(tasks, n, generator=gen).to(device).requires_grad_()
    g = torch.randn(tasks, n, generator=gen).to(device).requires_grad_()
    upstream = torch.randn(tasks, n, generator=gen).to(device)

    def fused():
        new, _ = functional.adam(theta, g, None, **ADAM_HYPER)
        torch.autograd.grad(new, (theta, g), upstream)

    zeros = torch.zeros(tasks, n, device=device)

    def eager():
        new, _, _ = _eager_adam(theta, g, zeros, zeros, **ADAM_HYPER)
        torch.autograd.grad(new, (theta, g), upstream)

    def one_task(p, gr, m, v):
        return _eager_adam(p, gr, m, v, **ADAM_HYPER)[0]

    vmapped = torch.func.vmap(one_task)

    def with_vmap():
        torch.autograd.grad(vmapped(theta, g, zeros, zeros), (theta, g), upstream)

    def timed(fn):
        return harness.time_fn(fn, min_run_time=min_run_time, device=device)

    # Forward reads p, g and writes p', m', v'; backward reads the upstream and g, writes dp, dg.
    nbytes = tasks * n * 4 * (2 + 3 + 2 + 2)
    yield harness.Row(
        name=f"diff. Adam step [{tasks}, {n}] fwd+bwd", ours=timed(fused),
        baselines={"eager autograd": timed(eager), "torch.func vmap": timed(with_vmap)},
        floor=harness.cuda_copy_floor(nbytes) if device == "cuda" else None,
        notes={"tasks": tasks, "numel": n, "bytes": nbytes},
    )


def sgd_sinusoid_rows(*, min_run_time: float, tasks: int = 25) -> Iterator[harness.Row]:
    """Second order: the grads are differentiable inputs (as after create_graph=True)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, requires_grad=True) for s in SINUSOID_SHAPES]
    grads = [[torch.randn(s, generator=gen, requires_grad=True) for s in SINUSOID_SHAPES]
             for _ in range(tasks)]
    flat = torch.cat([p.reshape(-1) for p in params])
    flat_theta = flat.detach().requires_grad_()
    flat_grads = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads]
                             ).detach().requires_grad_()
    lr = 0.01

    def per_task_per_tensor():  # learn2learn / higher style
        outs = [[p - lr * g for p, g in zip(params, gs)] for gs in grads]
        total = sum(o.sum() for task in outs for o in task)
        torch.autograd.grad(total, params + [g for gs in grads for g in gs])

    def fused():
        theta_t = flat_theta.expand(tasks, -1)
        new, _ = functional.sgd(theta_t, flat_grads, lr=lr)
        torch.autograd.grad(new.sum(), (flat_theta, flat_grads))

    ours = harness.time_fn(fused, min_run_time=min_run_time)
    yield harness.Row(
        name=f"diff. SGD step, sinusoid MLP x {tasks} tasks", ours=ours,
        baselines={"per-task eager": harness.time_fn(per_task_per_tensor,
                                                     min_run_time=min_run_time),
                   "higher": None, "torchopt": None},
        notes={"tasks": tasks, "tensors_per_task": len(SINUSOID_SHAPES),
               "higher": _missing_note("higher"), "torchopt": _missing_note("torchopt")},
    )


def _missing_note(module: str) -> str:
    """higher and TorchOpt are optional baselines; say why a column is empty."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (skipped)"
    return (f"{module}'s differentiable update is this same per-task, per-tensor loop "
            "('per-task eager'); its whole inner loop is not timed in this suite")


def _mlp_loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, sizes) -> torch.Tensor:
    offset, h = 0, x
    for i, (fan_in, fan_out) in enumerate(sizes):
        w = flat[offset: offset + fan_in * fan_out].view(fan_out, fan_in)
        offset += fan_in * fan_out
        b = flat[offset: offset + fan_out]
        offset += fan_out
        h = torch.nn.functional.linear(h, w, b)
        if i < len(sizes) - 1:
            h = torch.relu(h)
    return torch.nn.functional.cross_entropy(h, y)


def saved_bytes_adam_mlp(steps: int = 5, batch: int = 64) -> dict:
    """Bytes autograd saves for a differentiable ``steps``-step Adam inner loop on a
    784-256-256-10 MLP (fastmeta vs eager ops), and NaN counts of both meta-gradients."""
    sizes = [(784, 256), (256, 256), (256, 10)]
    gen = torch.Generator().manual_seed(0)
    n = sum(i * o + o for i, o in sizes)
    theta0 = (torch.randn(n, generator=gen) * 0.05).requires_grad_()
    x = torch.randn(batch, 784, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    xq = torch.randn(batch, 784, generator=gen)
    yq = torch.randint(0, 10, (batch,), generator=gen)

    def run(step_fn: Callable) -> tuple[int, torch.Tensor]:
        seen: dict[tuple[int, int], int] = {}

        def pack(t: torch.Tensor):
            if t.numel() and t.device.type == "cpu":
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                seen[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            theta = theta0
            state = None
            for _ in range(steps):
                g, = torch.autograd.grad(_mlp_loss(theta, x, y, sizes), theta, create_graph=True)
                theta, state = step_fn(theta, g, state)
            query = _mlp_loss(theta, xq, yq, sizes)
        meta_grad, = torch.autograd.grad(query, theta0)
        return sum(seen.values()), meta_grad

    def fused_step(theta, g, state):
        return functional.adam(theta, g, state, lr=1e-3, eps_root=1e-16)

    def eager_step_with(eps_root):
        def eager_step(theta, g, state):
            if state is None:
                state = (0, torch.zeros_like(theta), torch.zeros_like(theta))
            k, m, v = state
            new, m2, v2, _ = adam_step_reference(theta, g, m, v, step=k + 1, lr=1e-3,
                                                 eps_root=eps_root)
            return new, (k + 1, m2, v2)
        return eager_step

    fused_bytes, fused_grad = run(fused_step)
    eager_bytes, eager_grad = run(eager_step_with(0.0))
    # The same eager maths with fastmeta's eps_root: finite, so the two can be compared.
    _, eager_root_grad = run(eager_step_with(1e-16))
    finite = torch.isfinite(eager_grad)
    scale = float(eager_root_grad.abs().max())
    return {
        "params": n,
        "steps": steps,
        "fastmeta_saved_bytes": fused_bytes,
        "eager_saved_bytes": eager_bytes,
        "ratio": fused_bytes / eager_bytes,
        "fastmeta_nan": int(torch.isnan(fused_grad).sum()),
        "eager_nan": int(torch.isnan(eager_grad).sum()),
        "max_abs_diff_where_eager_finite": float(
            (fused_grad[finite] - eager_grad[finite]).abs().max()) if finite.any() else None,
        "max_abs_eager_where_finite": float(eager_grad[finite].abs().max())
        if finite.any() else None,
        "max_rel_diff_vs_eager_same_eps_root": float(
            (fused_grad - eager_root_grad).abs().max()) / scale if scale else None,
    }
