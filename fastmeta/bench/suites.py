"""The suites ``fastmeta bench`` can run, by name (``--only adam,sgd``).

A suite yields :class:`~fastmeta.bench.harness.Row` objects one at a time, so progress can be
shown and an interrupted run still reports the rows it finished.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastmeta.bench import harness
from fastmeta.bench.optimizers import TORCH_VARIANTS, bench_optimizer

# --quick: the two workloads that show both regimes (overhead-bound, bandwidth-bound), with
# shorter measurements, so the whole run stays under two minutes on a 2-core machine.
QUICK_WORKLOADS = ["conv4", "resnet18"]
QUICK_MIN_RUN_TIME = 0.25
FULL_WORKLOADS = ["conv4", "resnet18", "single_16m"]
FULL_MIN_RUN_TIME = 1.0


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    baselines: list[str]
    rows: Callable[..., Iterator[harness.Row]]  # (quick=, progress=) -> rows


def _optimizer_suite(name: str) -> Suite:
    def rows(*, quick: bool, progress: Callable[[str], None]) -> Iterator[harness.Row]:
        return bench_optimizer(
            name,
            workloads=QUICK_WORKLOADS if quick else FULL_WORKLOADS,
            min_run_time=QUICK_MIN_RUN_TIME if quick else FULL_MIN_RUN_TIME,
            progress=progress,
        )

    return Suite(
        name=name.lower(),
        description=f"fastmeta.optim.{name}.step() against torch.optim.{name}",
        baselines=list(TORCH_VARIANTS),
        rows=rows,
    )


SUITES: dict[str, Suite] = {
    s.name: s for s in (_optimizer_suite(n) for n in ("Adam", "SGD", "Adagrad", "RMSprop"))
}


def select(only: str | None) -> list[Suite]:
    """The suites named in a comma-separated list (all of them for None)."""
    if not only:
        return list(SUITES.values())
    names = [n.strip().lower() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(
            f"--only: unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}"
        )
    return [SUITES[n] for n in names]
