"""``python -m benchmarks.bench_adam``: fastmeta.optim.Adam against torch.optim.Adam."""

from __future__ import annotations

from fastmeta.bench.optimizers import main_for


def main() -> None:
    main_for("Adam", __doc__)


if __name__ == "__main__":
    main()
