"""``python -m benchmarks.bench_distributed``: how distributed meta-training scales on this
machine: the conv-4 MAML meta-step (5-way 1-shot 28x28 episodes, 15 queries per class, one
inner step; the workload of ``fastmeta.bench.maml``) on one meta-batch of T tasks, done by

* 1 process with 1 thread (all T tasks), and
* W processes with 1 thread each (T / W tasks each, the meta-gradient all-reduced over gloo on
  loopback as one flat bucket, then the same outer Adam step everywhere: what
  ``fastmeta train --distributed`` does),

reported as seconds per meta-step and as the throughput ratio (1-process time / W-process
time; the issue's target is >= 1.6x for W = 2 on a 2-core machine). Each side runs in fresh
processes started with ``torch.multiprocessing``; the rounds alternate the two sides, and each
side keeps its fastest round, so a burst of load from another program slows both alike.
Startup, the rendezvous and a few warm-up steps are not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.multiprocessing as mp

from fastmeta.bench import harness

# Warm-up meta-steps before timing: allocator, page faults, the first gloo connection.
WARMUP_STEPS = 2
# The conv-4 workload of fastmeta.bench.maml: 5-way 1-shot 28x28, 15 queries per class.
WAYS, SHOTS, QUERIES, IMAGE_SIZE = 5, 1, 15, 28


def _episode(tasks: int):
    from fastmeta.tasks import Episode

    g = torch.Generator().manual_seed(0)
    return Episode(
        support_x=torch.rand(tasks, WAYS * SHOTS, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        support_y=torch.arange(WAYS).repeat_interleave(SHOTS).repeat(tasks, 1),
        query_x=torch.rand(tasks, WAYS * QUERIES, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        query_y=torch.arange(WAYS).repeat_interleave(QUERIES).repeat(tasks, 1),
    )


def _rank(rank: int, world_size: int, port: int, tasks: int, steps: int, results) -> None:
    """One process: ``steps`` timed meta-steps on its share of the T tasks. Rank 0 reports
    the wall time of each step (each ends in the all-reduce, so it is the slowest rank's)."""
    torch.set_num_threads(1)
    from fastmeta import distributed
    from fastmeta.meta import MAML, Conv4
    from fastmeta.optim import Adam

    torch.manual_seed(0)
    maml = MAML(Conv4(1, WAYS, image_size=IMAGE_SIZE), loss_fn=torch.nn.functional.cross_entropy,
                inner_lr=0.01)
    outer = Adam(maml.parameters(), lr=1e-3)
    episode = _episode(tasks)
    split = world_size > 1
    if split:
        distributed.init(rank=rank, world_size=world_size, device="cpu",
                         init_method=f"tcp://127.0.0.1:{port}")
    share = distributed.owned_tasks(tasks, rank=rank, world_size=world_size)
    local = episode.select_tasks(share.start, share.stop)

    def step() -> float:
        """One meta-step; returns the seconds it spent in the all-reduce."""
        out = maml(local)
        outer.zero_grad()
        out.loss.backward()
        reduce_s = 0.0
        if split:
            started = time.perf_counter()
            distributed.all_reduce_gradients(maml.parameters(), scale=len(share) / tasks)
            reduce_s = time.perf_counter() - started
        outer.step()
        return reduce_s

    try:
        for _ in range(WARMUP_STEPS):
            step()
        if split:
            distributed.barrier()
        times, reduces = [], []
        for _ in range(steps):
            started = time.perf_counter()
            reduces.append(step())
            times.append(time.perf_counter() - started)
        if rank == 0:
            results.put((times, reduces))
    finally:
        distributed.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timing(times: list[float]) -> harness.Timing:
    """The median and 20th/80th percentiles of the per-step times."""
    if len(times) == 1:
        return harness.Timing(times[0], times[0], times[0], blocks=1)
    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")
    return harness.Timing(median=statistics.median(times), p20=p20, p80=p80, blocks=len(times))


def _run(world_size: int, tasks: int, steps: int) -> tuple[harness.Timing, float]:
    """A fresh job of ``world_size`` processes: the per-step timing and the median seconds
    rank 0 spent in the all-reduce."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_rank, args=(world_size, _free_port(), tasks, steps, results),
                       nprocs=world_size, start_method="spawn")
    times, reduces = results.get()
    return _timing(times), statistics.median(reduces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="W (default %(default)s)")
    parser.add_argument("--tasks", type=int, default=8,
                        help="T, tasks per meta-batch (default %(default)s, as bench_maml)")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed meta-steps per round and side (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds; each side keeps its fastest (default "
                        "%(default)s)")
    parser.add_argument("--json", help="write the row and machine info here")
    args = parser.parse_args()
    for name in ("processes", "tasks", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.tasks < args.processes:
        parser.error(f"--tasks ({args.tasks}) must be at least --processes ({args.processes})")
    # Both OpenMP runtimes (torch's and fastmeta._C's) read this when the children start.
    os.environ["OMP_NUM_THREADS"] = "1"
    best: dict[int, tuple[harness.Timing, float]] = {}
    for _ in range(args.rounds):
        for world in (1, args.processes):
            result = _run(world, args.tasks, args.steps)
            if world not in best or result[0].median < best[world][0].median:
                best[world] = result
    one, (many, reduce_s) = best[1][0], best[args.processes]
    label = f"{args.processes} processes x 1 thread"
    row = harness.Row(
        name=f"MAML conv-4 {WAYS}-way {SHOTS}-shot T={args.tasks}, 1 step, {label}",
        ours=many, baselines={"1 process x 1 thread": one},
        notes={"allreduce_median_s": reduce_s, "tasks_per_process":
               args.tasks / args.processes, "steps": args.steps, "rounds": args.rounds})
    print(harness.format_table([row], ["1 process x 1 thread"]))
    ratio = row.speedup("1 process x 1 thread")
    print(f"\nthroughput: {args.tasks / one.median:.2f} tasks/s on 1 process, "
          f"{args.tasks / many.median:.2f} tasks/s on {args.processes}: {ratio:.2f}x "
          f"(all-reduce: {reduce_s * 1e3:.2f} ms of each {many.median * 1e3:.0f} ms step)")
    if args.json:
        harness.write_json(args.json, "bench_distributed", [row],
                           extra={"throughput_ratio": ratio, "processes": args.processes})


if __name__ == "__main__":
    main()
