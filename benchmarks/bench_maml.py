"""``python -m benchmarks.bench_maml``: one MAML meta-step against torch.func vmap, the batched
maths in eager torch (sinusoid), an eager per-task loop and higher (when installed), on the
sinusoid MLP and the conv-4 network."""

from __future__ import annotations

import argparse

from fastmeta.bench import harness, maml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="sinusoid rows only")
    parser.add_argument("--json", help="write the rows and machine info here")
    args = parser.parse_args()
    rows = list(maml.rows(min_run_time=args.min_run_time, quick=args.quick))
    print(harness.format_table(rows, ["torch.func vmap", "batched eager", "eager loop",
                                      "higher"]))
    if args.json:
        harness.write_json(args.json, "bench_maml", rows)


if __name__ == "__main__":
    main()
