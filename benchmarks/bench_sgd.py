"""``python -m benchmarks.bench_sgd``: fastmeta.optim.SGD (momentum 0.9) against torch.optim.SGD."""

from __future__ import annotations

from benchmarks.optimizer_bench import main_for

CONFIG = {"lr": 1e-3, "momentum": 0.9}


def main() -> None:
    main_for("SGD", CONFIG, __doc__)


if __name__ == "__main__":
    main()
