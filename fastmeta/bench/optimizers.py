"""The drop-in optimizer benchmark behind ``bench_adam``, ``bench_sgd``, ``bench_adagrad`` and
``bench_rmsprop``: one ``step()`` of ``fastmeta.optim.X`` against ``torch.optim.X`` in its
for-loop, foreach and fused forms (and ``torch.compile`` of the for-loop step on request), on
the workloads of :mod:`fastmeta.bench.workloads`, with the stream floor for the same bytes
measured in the same run (on fresh tensors of the workload's sizes, and on the optimizer's own
tensors)."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

import fastmeta.optim as fo
from fastmeta.bench import harness
from fastmeta.bench.workloads import WORKLOADS, numel, sizes

# (reads, writes) of fp32 streams per element for each optimizer as benchmarked.
STREAMS = {
    "Adam": (4, 3),  # p, g, m, v in; p, m, v out: 28 B/element
    "SGD": (3, 2),  # p, g, momentum buffer in; p, buffer out: 20 B/element
    "Adagrad": (3, 2),  # p, g, sum in; p, sum out
    "RMSprop": (3, 2),  # p, g, square_avg in; p, square_avg out
}
# The hyperparameters each optimizer is benchmarked with.
CONFIGS: dict[str, dict[str, Any]] = {
    "Adam": {"lr": 1e-3},
    "SGD": {"lr": 1e-3, "momentum": 0.9},
    "Adagrad": {"lr": 1e-3},
    "RMSprop": {"lr": 1e-3},
}
# Round-robin cycles per workload at least, in full runs: the medians of the large workloads,
# whose cycles the slow for-loop and foreach baselines make long, then rest on ~40 blocks per
# side, not ~30 (one full run's Adam ResNet-18 row: 32 blocks, p20 10.8 ms, median 12.1 ms).
FULL_MIN_CYCLES = 40
# torch.optim has no fused=True for these.
NO_TORCH_FUSED = {"RMSprop"}
TORCH_VARIANTS = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def make_params(shapes, seed: int = 0, device: str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen).to(device).requires_grad_()
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


def own_streams(opt: torch.optim.Optimizer, reads: int, writes: int) -> list[list[torch.Tensor]]:
    """The tensors an optimizer's step streams, as :func:`harness.stream_probe_on` takes them:
    the params and then every state tensor shaped like them (the written streams, in state
    order), then the grads (read only). Call it after the first step (the state exists)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    keys = [k for k, v in opt.state[params[0]].items()
            if isinstance(v, torch.Tensor) and v.shape == params[0].shape]
    streams = [params, *([opt.state[p][k] for p in params] for k in keys),
               [p.grad for p in params]]
    if len(streams) != reads or 1 + len(keys) != writes:
        raise ValueError(f"own_streams: {type(opt).__name__} keeps {keys}, not the "
                         f"{reads} reads / {writes} writes benchmarked")
    return streams


def bench_optimizer(
    name: str,
    *,
    workloads: list[str],
    min_run_time: float,
    compile_baseline: bool = False,
    progress: Callable[[str], None] = print,
    device: str = "cpu",
    min_cycles: int = harness.ROUND_ROBIN_MIN_CYCLES,
) -> Iterator[harness.Row]:
    """Yields one row per workload (so an interrupted run keeps the finished rows). On the CPU,
    ours, each torch variant and the stream floors are timed round-robin in short blocks
    (:func:`~fastmeta.bench.harness.time_round_robin`), ``min_run_time`` seconds per side and
    at least ``min_cycles`` cycles (full runs: :data:`FULL_MIN_CYCLES`): the bandwidth of this
    shared machine drifts too fast for sides timed one after the other. On
    CUDA each side is timed by ``do_bench`` and the floor is the measured device-to-device copy
    bandwidth applied to the same bytes."""
    config = CONFIGS[name]
    ours_cls = getattr(fo, name)
    torch_cls = getattr(torch.optim, name)
    reads, writes = STREAMS[name]
    for workload in workloads:
        shapes = WORKLOADS[workload]
        progress(f"{name} on {workload}: preparing fastmeta and torch "
                 f"{', '.join(TORCH_VARIANTS)}")
        # fastmeta's optimizer is made first, on purpose: on this machine whichever side was
        # made first ran 5-20% slower on the ResNet-18 list (torch's fused SGD: 71-77% of the
        # floor made first, 85-90% made second; ours 88-92% and 93-98%), whatever the timing
        # order; a set of params allocated beforehand, freed or kept alive, or a throwaway
        # optimizer set up and stepped first, did not take the penalty instead. Going first
        # keeps our ratios a lower bound, and the stream probe on our own tensors (below)
        # shows what those very bytes can cost.
        ours_opt = ours_cls(make_params(shapes, device=device), **config)
        steps: dict[str, Callable[[], Any]] = {"fastmeta": ours_opt.step}
        for variant, flags in TORCH_VARIANTS.items():
            if "fused" in flags and name in NO_TORCH_FUSED:
                continue  # torch has no fused kernel for this optimizer
            opt = torch_cls(make_params(shapes, device=device), **config, **flags)
            steps[variant] = opt.step
        if compile_baseline:
            progress(f"{name} on {workload}: torch.compile (compiling)")
            opt = torch_cls(make_params(shapes, device=device), **config, foreach=False)
            # A fresh dynamo cache per baseline: past its recompile limit (8) torch.compile
            # silently runs eager, which would time the wrong thing.
            torch._dynamo.reset()
            steps["compile"] = torch.compile(opt.step)
        nbytes = numel(shapes) * 4 * (reads + writes)
        if device != "cuda":
            probe = harness.stream_probe(sizes(shapes), reads, writes)
            if probe is not None:
                steps["floor"] = probe
            probe = harness.stream_probe_on(
                functools.partial(own_streams, ours_opt, reads, writes), writes)
            if probe is not None:
                steps["floor (same tensors)"] = probe
        progress(f"{name} on {workload}: timing {', '.join(steps)} (round-robin; floor "
                 f"{reads}R/{writes}W)")
        if device == "cuda":
            timings = {side: harness.time_fn(fn, device=device) for side, fn in steps.items()}
        else:
            timings = harness.time_round_robin(steps, min_run_time=min_run_time,
                                               min_cycles=min_cycles)
        ours = timings.pop("fastmeta")
        floor = harness.cuda_copy_floor(nbytes) if device == "cuda" else timings.pop("floor", None)
        floor_same_tensors = timings.pop("floor (same tensors)", None)
        baselines: dict[str, harness.Timing | None] = {
            variant: timings.get(variant) for variant in TORCH_VARIANTS
        }
        if compile_baseline:
            baselines["compile"] = timings["compile"]
        del steps, timings, ours_opt  # free this workload's tensors before the next one
        yield harness.Row(
            name=f"{name} {workload}", ours=ours, baselines=baselines, floor=floor,
            floor_same_tensors=floor_same_tensors,
            notes={"tensors": len(shapes), "elements": numel(shapes),
                   "bytes": nbytes, "config": str(config), "device": device,
                   "timing": "round-robin" if device != "cuda" else "do_bench",
                   "min_cycles": min_cycles if device != "cuda" else None,
                   "floor": "fresh tensors of the workload's sizes; same tensors: ours"},
        )


def main_for(name: str, description: str) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    parser.add_argument("--min-run-time", type=float, default=harness.DEFAULT_MIN_RUN_TIME,
                        help="seconds of repeated calls per measurement")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the for-loop step (slow to compile)")
    parser.add_argument("--json", help="write the rows and machine info here")
    args = parser.parse_args()
    rows = list(bench_optimizer(name, workloads=args.workloads.split(","),
                                min_run_time=args.min_run_time, compile_baseline=args.compile,
                                min_cycles=FULL_MIN_CYCLES))
    baselines = list(TORCH_VARIANTS) + (["compile"] if args.compile else [])
    print(harness.format_table(rows, baselines))
    if args.json:
        harness.write_json(args.json, f"bench_{name.lower()}", rows)
