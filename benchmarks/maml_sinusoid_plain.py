"""``python -m benchmarks.maml_sinusoid_plain``: MAML on Finn et al. (2017)'s sinusoid protocol,
written plainly with ``torch.func`` and nothing from fastmeta: the "careful plain
implementation" the README's MAML table is compared with.

Protocol (the same as ``benchmarks/maml_sinusoid.sh``): tasks y = A sin(x - φ), A ~ U[0.1, 5],
φ ~ U[0, π], x ~ U[-5, 5]; an MLP 1-40-40-1 with ReLU and torch's default initialisation;
meta-batch 25, 10 support and 10 query points per task, one inner SGD step with α = 0.01,
outer Adam at 1e-3, second order (vmap over tasks of a ``grad``-based inner step), 30,000
meta-iterations. Evaluation: new tasks, adapt with α = 0.01 on K support points, MSE on 100
evenly spaced points in [-5, 5]; for K = 5, 10 and 1, 10 steps, over ``--draws`` independent sets
of ``--tasks`` tasks (each set's mean, and all sets pooled with a 95% CI). Tasks whose loss is
not finite are counted and left out of the statistics, as ``fastmeta eval`` does.

The sampler is its own (torch's generator, not fastmeta's), so its task sets are not the ones
``fastmeta eval`` draws; the numbers compare in distribution, not task by task.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

INNER_LR = 0.01
SETTINGS = [(5, 1), (10, 1), (5, 10), (10, 10)]  # (shots, steps)


def sample_tasks(num_tasks: int, shots: int, queries: int, generator: torch.Generator | None,
                 *, grid_query: bool = False) -> tuple[torch.Tensor, ...]:
    """``(xs, ys, xq, yq)``, each ``[T, n, 1]``; the query x is the 100-point grid if asked."""
    amplitude = torch.rand(num_tasks, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(num_tasks, 1, 1, generator=generator) * math.pi
    xs = torch.rand(num_tasks, shots, 1, generator=generator) * 10 - 5
    if grid_query:
        xq = torch.linspace(-5, 5, queries).view(1, queries, 1).expand(num_tasks, -1, -1)
    else:
        xq = torch.rand(num_tasks, queries, 1, generator=generator) * 10 - 5
    return xs, amplitude * torch.sin(xs - phase), xq, amplitude * torch.sin(xq - phase)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--iterations", type=int, default=30000)
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per evaluation set")
    parser.add_argument("--draws", type=int, default=10, help="independent evaluation sets")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    for name in ("iterations", "tasks", "draws"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")

    torch.manual_seed(args.seed)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                        nn.Linear(40, 1))
    outer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def loss(params, x, y):
        return F.mse_loss(functional_call(net, params, (x,)), y)

    def adapted_query_loss(params, xs, ys, xq, yq, steps):
        for _ in range(steps):
            g = grad(loss)(params, xs, ys)
            params = {k: params[k] - INNER_LR * g[k] for k in params}
        return loss(params, xq, yq)

    batched = vmap(adapted_query_loss, in_dims=(None, 0, 0, 0, 0, None))

    from tqdm import tqdm

    start = time.perf_counter()
    bar = tqdm(range(args.iterations), desc="plain MAML", mininterval=1.0)
    for it in bar:
        meta_loss = batched(dict(net.named_parameters()), *sample_tasks(25, 10, 10, None),
                            1).mean()
        outer.zero_grad()
        meta_loss.backward()
        outer.step()
        if it % 100 == 0:
            bar.set_postfix(loss=f"{meta_loss.item():.4g}")
    train_seconds = time.perf_counter() - start

    params = {k: v.detach() for k, v in net.named_parameters()}
    results = []
    print(f"seed {args.seed}: {args.iterations} meta-iterations in {train_seconds:.0f} s")
    for shots, steps in SETTINGS:
        per_draw, pooled, diverged = [], [], 0
        for draw in range(args.draws):
            generator = torch.Generator().manual_seed(1000 + draw)
            losses = batched(params, *sample_tasks(args.tasks, shots, 100, generator,
                                                   grid_query=True), steps)
            finite = losses[torch.isfinite(losses)].double()
            diverged += losses.numel() - finite.numel()
            per_draw.append(float(finite.mean()))
            pooled.append(finite)
        every = torch.cat(pooled)
        mean = float(every.mean())
        ci = 1.959964 * float(every.std()) / math.sqrt(every.numel())
        results.append({"shots": shots, "steps": steps, "mean": mean, "ci": ci,
                        "draw_means": per_draw, "diverged": diverged})
        print(f"{shots}-shot, {steps} step(s): {mean:.4f} ± {ci:.4f} over "
              f"{args.draws} x {args.tasks} tasks ({diverged} diverged); each set: "
              + ", ".join(f"{m:.4f}" for m in per_draw))
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "iterations": args.iterations,
                                         "train_seconds": train_seconds,
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
