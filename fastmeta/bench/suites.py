"""The suites ``fastmeta bench`` can run, by name (``--only adam,sgd``).

A suite yields :class:`~fastmeta.bench.harness.Row` objects one at a time, so progress can be
shown and an interrupted run still reports the rows it finished.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastmeta.bench import harness
from fastmeta.bench.optimizers import FULL_MIN_CYCLES, TORCH_VARIANTS, bench_optimizer

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
    # Measurements that are not timings (e.g. saved bytes), printed after the table.
    extra: Callable[[], dict] | None = None


def _optimizer_suite(name: str) -> Suite:
    def rows(*, quick: bool, progress: Callable[[str], None]) -> Iterator[harness.Row]:
        return bench_optimizer(
            name,
            workloads=QUICK_WORKLOADS if quick else FULL_WORKLOADS,
            min_run_time=QUICK_MIN_RUN_TIME if quick else FULL_MIN_RUN_TIME,
            # torch.compile takes 10-50 s per workload to compile here: full runs only.
            compile_baseline=not quick,
            progress=progress,
            min_cycles=harness.ROUND_ROBIN_MIN_CYCLES if quick else FULL_MIN_CYCLES,
        )

    return Suite(
        name=name.lower(),
        description=f"fastmeta.optim.{name}.step() against torch.optim.{name} "
        "(compile: torch.compile of the for-loop step, full runs only)",
        baselines=[*TORCH_VARIANTS, "compile"],
        rows=rows,
    )


def _inner_rows(*, quick: bool, progress: Callable[[str], None]) -> Iterator[harness.Row]:
    from fastmeta.bench import inner

    min_run_time = QUICK_MIN_RUN_TIME if quick else FULL_MIN_RUN_TIME
    progress("inner: differentiable Adam step [8, 1M]")
    yield from inner.adam_step_rows(min_run_time=min_run_time)
    progress("inner: differentiable SGD step, 25 sinusoid tasks")
    yield from inner.sgd_sinusoid_rows(min_run_time=min_run_time)


def _inner_memory() -> dict:
    from fastmeta.bench import inner

    return {"saved bytes, 5-step diff. Adam on a 784-256-256-10 MLP":
            inner.saved_bytes_adam_mlp()}


def _maml_rows(*, quick: bool, progress: Callable[[str], None]) -> Iterator[harness.Row]:
    from fastmeta.bench import maml

    progress("maml: meta-steps (sinusoid" + ("" if quick else ", conv-4") + ")")
    yield from maml.rows(min_run_time=QUICK_MIN_RUN_TIME if quick else FULL_MIN_RUN_TIME,
                         quick=quick)


def _cavia_rows(*, quick: bool, progress: Callable[[str], None]) -> Iterator[harness.Row]:
    from fastmeta.bench import maml

    progress("cavia: sinusoid meta-step")
    yield from maml.cavia_rows(min_run_time=QUICK_MIN_RUN_TIME if quick else FULL_MIN_RUN_TIME)


def _hd_rows(*, quick: bool, progress: Callable[[str], None]) -> Iterator[harness.Row]:
    from fastmeta.bench import hypergrad

    yield from hypergrad.rows(workloads=QUICK_WORKLOADS,
                              min_run_time=QUICK_MIN_RUN_TIME if quick else FULL_MIN_RUN_TIME,
                              progress=progress)


SUITES: dict[str, Suite] = {
    s.name: s for s in [*(_optimizer_suite(n) for n in ("Adam", "SGD", "Adagrad", "RMSprop")),
                        Suite("inner", "differentiable task-batched updates against eager "
                              "autograd, torch.func and the per-task loop of learn2learn/higher",
                              ["eager autograd", "torch.func vmap", "per-task eager", "higher",
                               "torchopt"], _inner_rows, _inner_memory),
                        Suite("maml", "one MAML meta-step (second order) against torch.func, "
                              "the batched maths in eager torch, an eager per-task loop and "
                              "higher", ["torch.func vmap", "batched eager", "eager loop",
                                         "higher"], _maml_rows),
                        Suite("cavia", "one CAVIA meta-step (second order, no outer step) "
                              "against torch.func and the same batched maths in eager torch",
                              ["torch.func vmap", "batched eager"], _cavia_rows),
                        Suite("hd", "one SGD-HD step (hypergradient descent) against the "
                              "passes it needs around torch.optim.SGD(fused=True)",
                              ["torch fused + passes"], _hd_rows)]
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
