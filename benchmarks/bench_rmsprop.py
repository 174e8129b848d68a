"""``python -m benchmarks.bench_rmsprop``: fastmeta.optim.RMSprop against torch.optim.RMSprop."""

from __future__ import annotations

from fastmeta.bench.optimizers import main_for


def main() -> None:
    main_for("RMSprop", __doc__)


if __name__ == "__main__":
    main()
