"""``python -m benchmarks.bench_lstm``: the fused LSTM rule against its ``nn.LSTMCell`` reference.

Two workloads (issue #7, "A fused coordinatewise kernel"), both sides timed in the same run with
every thread (``fastmeta.bench.harness``), interleaved:

(a) ``step``: one learned-optimizer step (forward, no grad) on 1,048,576 coordinates, from a
    non-zero state: ``LSTMOptimizer`` with ``impl="auto"`` (the fused kernel) against
    ``impl="reference"`` (two ``nn.LSTMCell`` s and an ``nn.Linear``). Target: >= 3x.
(b) ``unroll``: a truncated unroll of 20 optimizer steps on 128 ten-dimensional quadratics
    (``fastmeta.meta.lstm_training``: ``QuadraticProblems`` and ``unroll``, first order as in the
    paper), forward plus backward into the rule's weights. Target: >= 2x.

The arithmetic of one forward is ~10 kFLOP per coordinate at H = 20 (the two 4H x (K) mat-vecs);
the table's notes give the fused step's GFLOP/s.
"""

from __future__ import annotations

import argparse

import torch

from fastmeta import backends
from fastmeta.bench import harness
from fastmeta.meta import LSTMOptimizer
from fastmeta.meta.lstm_training import QuadraticProblems, unroll

# Workload (a): 2^20 coordinates, the size.
STEP_COORDINATES = 1 << 20
# Workload (b): Andrychowicz et al. 2016, section 3.1: 128 functions, 10 dimensions, unrolls of 20.
UNROLL_PROBLEMS = 128
UNROLL_STEPS = 20
# Steps run before timing (a), so the state is a trained-looking non-zero one.
WARM_STATE_STEPS = 2
# Interleaved rounds per workload (see harness.time_interleaved).
ROUNDS = 2


def _rules(hidden: int = 20) -> tuple[LSTMOptimizer, LSTMOptimizer]:
    torch.manual_seed(0)
    fused = LSTMOptimizer(hidden)
    reference = LSTMOptimizer(hidden, impl="reference")
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def step_workload(n: int = STEP_COORDINATES):
    """``{side: fn}`` for one no-grad step of each rule on ``n`` coordinates."""
    fused, reference = _rules()
    g = torch.randn(n) * torch.logspace(-6, 0, n)[torch.randperm(n)]
    with torch.no_grad():
        state = None
        for _ in range(WARM_STATE_STEPS):
            _, state = fused(g, state)

    def run(rule):
        def fn():
            with torch.no_grad():
                rule(g, state)
        return fn

    return {"fused": run(fused), "reference": run(reference)}


def unroll_workload(problems: int = UNROLL_PROBLEMS, steps: int = UNROLL_STEPS):
    """``{side: fn}`` for an unroll of ``steps`` on ``problems`` quadratics plus its backward."""
    fused, reference = _rules()
    family = QuadraticProblems(problems, generator=torch.Generator().manual_seed(1))

    def run(rule):
        params = list(rule.parameters())

        def fn():
            result = unroll(rule, family.loss, family.theta0, None, steps)
            torch.autograd.grad(result.meta_loss, params)
        return fn

    return {"fused": run(fused), "reference": run(reference)}


# One forward's FLOPs per coordinate at hidden size H: the cells' 4H x (2 + H) and 4H x 2H
# multiply-adds (2 FLOPs each) and the head's H.
def _flops_per_coordinate(hidden: int = 20) -> int:
    return 2 * (4 * hidden * (2 + hidden) + 4 * hidden * 2 * hidden + hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", default="step,unroll",
                        help="comma-separated subset of step, unroll")
    parser.add_argument("--min-run-time", type=float, default=4.0,
                        help="seconds of repeated calls per side and workload (split in rounds)")
    parser.add_argument("--json", help="write the rows and machine info here")
    args = parser.parse_args()
    info = backends.available()
    print(f"native: {info['native']} (isa {info['isa']}, {info['native_threads']} threads), "
          f"torch threads: {torch.get_num_threads()}")
    builders = {"step": (f"(a) step, {STEP_COORDINATES:,} coords", step_workload),
                "unroll": (f"(b) unroll {UNROLL_STEPS} x {UNROLL_PROBLEMS} quadratics + backward",
                           unroll_workload)}
    rows = []
    for key in args.workloads.split(","):
        name, build = builders[key]
        with backends.trace() as calls:
            fns = build()
            fns["fused"]()
        impls = sorted({impl.value for _, impl in calls})
        timings = harness.time_interleaved(fns, rounds=ROUNDS, min_run_time=args.min_run_time)
        notes = {"fused_impl": impls}
        if key == "step":
            flops = _flops_per_coordinate() * STEP_COORDINATES
            notes["fused_gflops"] = flops / timings["fused"].median / 1e9
        rows.append(harness.Row(name, timings["fused"], {"reference": timings["reference"]},
                                notes=notes))
    print(harness.format_table(rows, ["reference"]))
    for r in rows:
        print(f"{r.name}: fused ran on {r.notes['fused_impl']}"
              + (f", {r.notes['fused_gflops']:.1f} GFLOP/s" if "fused_gflops" in r.notes else ""))
    if args.json:
        harness.write_json(args.json, "bench_lstm", rows)


if __name__ == "__main__":
    main()
