"""``python -m benchmarks.bench_adam``: fastmeta.optim.Adam against torch.optim.Adam."""

from __future__ import annotations

from benchmarks.optimizer_bench import main_for

CONFIG = {"lr": 1e-3}


def main() -> None:
    main_for("Adam", CONFIG, __doc__)


if __name__ == "__main__":
    main()
