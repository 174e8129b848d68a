"""The SGD-HD step benchmark behind ``benchmarks/bench_hypergrad.py``.

fastmeta's :class:`~fastmeta.optim.SGDHD` step (the hypergradient reduction and the update in
one native call) against what a user writes with torch: the separate passes that
hypergradient descent needs around ``torch.optim.SGD(fused=True)``, namely the dot product of
the gradient with the previous one, the lr update, the fused step, and a copy that keeps the
gradient for the next step.

Streams per element (fp32): ours reads g and u_{t−1} for the dot, then reads θ and g and writes
θ and u_t (6); torch's passes read g and u_{t−1} (dot), θ and g and write θ (fused SGD), and
read g and write the copy (7). The floor row is a stream kernel moving our 6.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

import fastmeta.optim as fo
from fastmeta.bench import harness
from fastmeta.bench.optimizers import make_params
from fastmeta.bench.workloads import WORKLOADS, numel, sizes

LR, HYPERGRAD_LR = 1e-3, 1e-3
ROUNDS = 3
# In-place stream probe with our bytes: 4 arrays read, 2 written back (6 streams).
READS, WRITES = 4, 2


def torch_sgd_hd_step(params: list[torch.Tensor], hypergrad_lr: float) -> Callable[[], None]:
    """SGD-HD with torch's own pieces: a dot product over the group, the lr update, the fused
    SGD step, and ``_foreach_copy_`` to keep the gradient."""
    opt = torch.optim.SGD(params, lr=LR, fused=True)
    previous = [torch.zeros_like(p) for p in params]

    def step() -> None:
        grads = [p.grad for p in params]
        dot = torch.stack([torch.dot(g.reshape(-1), u.reshape(-1))
                           for g, u in zip(grads, previous)]).sum()
        group = opt.param_groups[0]
        group["lr"] = group["lr"] + hypergrad_lr * float(dot)
        opt.step()
        torch._foreach_copy_(previous, grads)

    return step


def rows(*, workloads: list[str], min_run_time: float, rounds: int = ROUNDS,
         progress: Callable[[str], None] = print) -> Iterator[harness.Row]:
    for workload in workloads:
        shapes = WORKLOADS[workload]
        progress(f"SGD-HD on {workload}: fastmeta, torch fused SGD + passes, stream floor")
        # A zero hypergradient lr keeps both sides' lr fixed, so every timed step does the
        # same work (the dot product is computed either way).
        steps: dict[str, Callable[[], object]] = {
            "fastmeta": fo.SGDHD(make_params(shapes), lr=LR, hypergrad_lr=0.0).step,
            "torch fused + passes": torch_sgd_hd_step(make_params(shapes), 0.0),
        }
        probe = harness.stream_probe(sizes(shapes), READS, WRITES)
        if probe is not None:
            steps["floor"] = probe
        timings = harness.time_interleaved(steps, rounds=rounds, min_run_time=min_run_time)
        yield harness.Row(
            name=f"SGD-HD {workload}", ours=timings["fastmeta"],
            baselines={"torch fused + passes": timings["torch fused + passes"]},
            floor=timings.get("floor"),
            notes={"tensors": len(shapes), "elements": numel(shapes), "rounds": rounds,
                   "streams": {"fastmeta": 6, "torch": 7},
                   "floor": "fresh tensors of the workload's sizes"},
        )
