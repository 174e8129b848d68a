"""``python -m benchmarks.bench_sgd``: fastmeta.optim.SGD against torch.optim.SGD."""

from __future__ import annotations

from fastmeta.bench.optimizers import main_for


def main() -> None:
    main_for("SGD", __doc__)


if __name__ == "__main__":
    main()
