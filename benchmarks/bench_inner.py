"""``python -m benchmarks.bench_inner``: the differentiable task-batched updates against eager
autograd (speed), and the bytes autograd saves for a 5-step Adam inner loop (memory)."""

from __future__ import annotations

import argparse
import json

from fastmeta.bench import harness, inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--json", help="write the rows and machine info here")
    args = parser.parse_args()
    rows = [*inner.adam_step_rows(min_run_time=args.min_run_time),
            *inner.sgd_sinusoid_rows(min_run_time=args.min_run_time)]
    print(harness.format_table(rows, ["eager autograd", "per-task eager"]))
    memory = inner.saved_bytes_adam_mlp()
    print(json.dumps(memory, indent=2))
    if args.json:
        harness.write_json(args.json, "bench_inner", rows, extra={"memory": memory})


if __name__ == "__main__":
    main()
