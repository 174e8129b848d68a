"""``python -m benchmarks.bench_hypergrad``: one fastmeta.optim.SGDHD step against SGD-HD
written with torch's pieces (a dot product, the lr update, ``torch.optim.SGD(fused=True)`` and
a copy of the gradient); see :mod:`fastmeta.bench.hypergrad`."""

from __future__ import annotations

import argparse

from fastmeta.bench import harness
from fastmeta.bench import hypergrad as bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", default="conv4,resnet18",
                        help="comma-separated subset of conv4, resnet18, single_16m")
    parser.add_argument("--min-run-time", type=float, default=harness.DEFAULT_MIN_RUN_TIME,
                        help="seconds of repeated calls per measurement")
    parser.add_argument("--json", help="write the rows and machine info here")
    args = parser.parse_args()
    rows = list(bench.rows(workloads=args.workloads.split(","), min_run_time=args.min_run_time))
    print(harness.format_table(rows, ["torch fused + passes"]))
    if args.json:
        harness.write_json(args.json, "bench_hypergrad", rows)


if __name__ == "__main__":
    main()
