"""``python -m benchmarks.bench_cavia``: one CAVIA sinusoid meta-step (T=25, K=10, 5 context
params, one inner step, second order; forward + meta-gradient, no outer step) against a plain
``torch.func`` vmap implementation and the same batched maths in eager torch, timed in the
same run, round-robin (:func:`fastmeta.bench.harness.time_round_robin`). Prints the table of
ratios (baseline time / ours)."""

from __future__ import annotations

import argparse

from fastmeta.bench import harness, maml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--min-run-time", type=float, default=3.0,
                        help="seconds of round-robin timing per side")
    parser.add_argument("--json", help="write the rows and machine info here")
    args = parser.parse_args()
    rows = list(maml.cavia_rows(min_run_time=args.min_run_time))
    print(harness.format_table(rows, ["torch.func vmap", "batched eager"]))
    if args.json:
        harness.write_json(args.json, "bench_cavia", rows)


if __name__ == "__main__":
    main()
