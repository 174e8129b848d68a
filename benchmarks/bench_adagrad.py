"""``python -m benchmarks.bench_adagrad``: fastmeta.optim.Adagrad against torch.optim.Adagrad."""

from __future__ import annotations

from fastmeta.bench.optimizers import main_for


def main() -> None:
    main_for("Adagrad", __doc__)


if __name__ == "__main__":
    main()
