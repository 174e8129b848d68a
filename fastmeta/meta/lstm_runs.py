"""The run behind ``fastmeta train lstm-opt`` (and ``fastmeta eval`` of its checkpoints):
meta-training the LSTM rule of Andrychowicz et al. (2016) with progress, a checkpoint after every
meta-epoch, exact ``--resume``, CSV metrics, and a comparison against tuned baselines.

A run lives in one folder (``out``):

* ``checkpoint.pt``: written atomically after every meta-epoch (the rule, the outer Adam, the
  problem generator and every RNG), so a resumed run continues exactly where it stopped;
* ``metrics.csv``: one row per meta-epoch (mean meta-training loss, seconds), with the loss of
  the rule after ``horizon`` steps on validation problems every ``eval_every`` epochs;
* ``rule.pt``: the trained rule (:meth:`LSTMOptimizer.save`), for :class:`fastmeta.optim.Learned`:
  the rule of the evaluation with the lowest validation loss (:class:`BestOnValidation`);
  ``rule-last.pt``: the rule after the last meta-epoch;
* ``summary.json`` and ``curves.png``: the learned rule (and the last epoch's) against SGD,
  momentum, RMSprop and Adam, each tuned over :data:`LR_GRID`, on held-out problems after
  ``horizon`` and ``2 * horizon`` steps (the rule was trained for ``horizon``).

The comparison (:func:`compare_with_baselines`, :func:`format_table`, :func:`plot_curves`) is
also what ``benchmarks/lstm_quadratic.py`` runs. Three disjoint problem sets keep it honest: the
baselines' learning rates are tuned on the *tuning* set, the periodic evaluation during training
uses the *validation* set, and the final numbers come from the *held-out* set. For the digits
the loss at a step is that step's minibatch loss, and every method sees the same minibatches.

Example:
    >>> from fastmeta.meta import lstm_runs
    >>> config = lstm_runs.default_config(epochs=2, horizon=10, unroll=5, meta_batch=8,
    ...                                   eval_tasks=8, out="runs/tiny")
    >>> summary = lstm_runs.train(config, quiet=True)  # doctest: +SKIP
    >>> summary["results"]["LSTM (learned)"]["loss"]["10"]["mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch

from fastmeta.backends import Impl
from fastmeta.distributed import (
    all_reduce_gradients,
    broadcast_parameters,
    on_main,
    owned_tasks,
)
from fastmeta.meta.lstm_optimizer import LSTMOptimizer
from fastmeta.meta.lstm_training import (
    DigitsMLPProblems,
    NonFiniteMetaLoss,
    QuadraticProblems,
    check_lr_decay,
    meta_epoch,
    set_outer_lr,
)
from fastmeta.meta.training import (
    CheckpointError,
    MetricsWriter,
    Progress,
    checkpoint_payload,
    load_checkpoint,
    mean_ci,
    restore,
    save_checkpoint,
    seed_everything,
    start_run,
)
from fastmeta.optim import Adam

__all__ = ["ALGORITHM", "BASELINES", "BestOnValidation", "EVAL_EVERY", "FAMILIES",
           "LAST_EPOCH", "LEARNED", "LR_GRID", "ProblemFamily", "baseline_losses",
           "compare_with_baselines", "default_config", "evaluate_and_select", "format_table",
           "load_selection", "load_trained", "plot_curves", "problem_share", "rule_losses",
           "train", "tune_baseline", "validation_loss"]

Problems = Union[QuadraticProblems, DigitsMLPProblems]

#: The ``algorithm`` of these runs' configs (and of ``fastmeta train``).
ALGORITHM = "lstm-opt"
#: The name of the learned rule in results, tables and plots: the rule of the meta-epoch whose
#: validation loss was lowest (:class:`BestOnValidation`).
LEARNED = "LSTM (learned)"
#: The rule as it stood after the last meta-epoch, reported beside :data:`LEARNED`.
LAST_EPOCH = "LSTM (last epoch)"
#: Learning rates tried for each baseline (log-spaced, 1e-4 .. 3): every tuned lr of
#: benchmarks/results/lstm-*.txt lies inside, except SGD and momentum on the digits, at the top.
LR_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]
#: The hand-designed optimizers the rule is compared with (torch's, at their default settings;
#: momentum 0.9 as in the paper's figures).
BASELINES: dict[str, Callable[[list[torch.Tensor], float], torch.optim.Optimizer]] = {
    "SGD": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "RMSprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "Adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}
# Seeds of the three problem sets (tuning, held-out, validation); distinct, so neither the
# baselines' learning rates nor anything watched during training are chosen on held-out problems.
TUNING_SEED, HELD_OUT_SEED, VALIDATION_SEED = 1001, 2002, 3003
# Andrychowicz et al. 2016, section 3: 100 optimizee steps per meta-epoch, truncated BPTT every
# 20, Adam on the rule at 1e-3 (their released code), two LSTM layers of 20 units.
HORIZON, UNROLL, OUTER_LR, HIDDEN = 100, 20, 1e-3, 20
# Meta-epochs between two evaluations on the validation problems (about 5% of the training time).
EVAL_EVERY = 10


class ProblemFamily(NamedTuple):
    """An optimizee family and the sizes a run uses for it."""

    #: ``make(n, generator)``: n fresh problems drawn from ``generator``.
    make: Callable[[int, torch.Generator], Problems]
    #: problems per meta-epoch.
    train: int
    #: problems in the tuning, validation and held-out sets.
    eval: int
    #: meta-epochs of a full run.
    epochs: int


#: The optimizee families. Quadratics: 128 per meta-epoch, the batch of the paper's released
#: code, 1,000 epochs at a constant lr. (A decayed lr is an option, not the default: 500 more
#: epochs at 0.3x the lr took one trained rule's held-out loss at 100 steps from 0.125 to
#: 0.087, but a fresh 1,500-epoch run with that decay from epoch 1,000 ended at 0.133: the
#: run-to-run spread is larger than the gain.) Digits MLPs: 4 per meta-epoch (each has 1,510
#: coordinates) and 1,000 epochs (~21 minutes on 2 idle CPU cores): after 150 epochs the rule still
#: fell behind tuned Adam after ~40 steps; after 1,000 it is ahead over all 100
#: (benchmarks/results/lstm-digits.json).
FAMILIES: dict[str, ProblemFamily] = {
    "quadratic": ProblemFamily(lambda n, g: QuadraticProblems(n, generator=g), 128, 100, 1000),
    "digits": ProblemFamily(lambda n, g: DigitsMLPProblems(n, generator=g), 4, 20, 1000),
}

#: The default: a constant outer lr (also what checkpoints from before the option trained with).
NO_LR_DECAY = {"outer_lr_decay_epoch": None, "outer_lr_decay_factor": 1.0}
# The config keys a resumed run must share with its checkpoint: the rule's architecture,
# everything that fixes the sequence of problems and updates it continues, and eval_tasks (the
# validation losses that select the rule, BestOnValidation, must all come from one set).
RESUME_KEYS = ("algorithm", "problem", "hidden", "horizon", "unroll", "second_order",
               "meta_batch", "outer_lr", "outer_lr_decay_epoch", "outer_lr_decay_factor", "seed",
               "eval_tasks")
_POSITIVE_INTS = ("epochs", "horizon", "unroll", "hidden", "meta_batch", "eval_tasks",
                  "eval_every")


# ---------------------------------------------------------------------------------------------
# Config


def default_config(**overrides: Any) -> dict[str, Any]:
    """The config of a run: the defaults of its ``problem`` (``"quadratic"`` or ``"digits"``,
    see :data:`FAMILIES`), then ``overrides``. Every key is a ``fastmeta train lstm-opt``
    option; ``meta_batch`` is the number of problems per meta-epoch and ``eval_tasks`` the size
    of the tuning, validation and held-out sets.

    Raises:
        ValueError: an unknown key or a bad value, named.
    """
    problem = overrides.get("problem", "quadratic")
    if problem not in FAMILIES:
        raise ValueError(f"problem: expected one of {', '.join(FAMILIES)}, got {problem!r}")
    family = FAMILIES[problem]
    config: dict[str, Any] = {
        "algorithm": ALGORITHM, "problem": problem, "epochs": family.epochs, "horizon": HORIZON,
        "unroll": UNROLL, "outer_lr": OUTER_LR, **NO_LR_DECAY, "second_order": False,
        "hidden": HIDDEN,
        "meta_batch": family.train, "eval_tasks": family.eval, "eval_every": EVAL_EVERY,
        "seed": 0, "impl": "auto", "out": f"runs/lstm-{problem}",
    }
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    config.update(overrides)
    if config["algorithm"] != ALGORITHM:
        raise ValueError(f"algorithm: this is the {ALGORITHM} run, got {config['algorithm']!r}")
    for key in _POSITIVE_INTS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    if config["horizon"] % config["unroll"]:
        raise ValueError(f"horizon ({config['horizon']}) must be a multiple of unroll "
                         f"({config['unroll']})")
    if isinstance(config["seed"], bool) or not isinstance(config["seed"], int):
        raise ValueError(f"seed must be an int, got {config['seed']!r}")
    lr = config["outer_lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"outer_lr must be a finite number > 0, got {lr!r}")
    config["outer_lr"] = float(lr)
    check_lr_decay(config["outer_lr_decay_epoch"], config["outer_lr_decay_factor"])
    config["outer_lr_decay_factor"] = float(config["outer_lr_decay_factor"])
    if not isinstance(config["second_order"], bool):
        raise ValueError(f"second_order must be a bool, got {config['second_order']!r}")
    if config["impl"] not in {i.value for i in Impl}:
        raise ValueError(f"impl: expected one of {', '.join(i.value for i in Impl)}, got "
                         f"{config['impl']!r}")
    return config


def _problems(problem: str, n: int, seed: int) -> Problems:
    """A fixed set of n problems: the same initialisations (and minibatches) for every seed."""
    return FAMILIES[problem].make(n, torch.Generator().manual_seed(seed))


class BestOnValidation:
    """The rule's weights at the evaluation with the lowest validation loss so far.

    Meta-training a learned optimizer does not improve steadily: the rule's loss on fresh
    problems swings by tens of percent between evaluations late in training (one quadratic run:
    0.141 at epoch 970, 0.209 at epoch 980), so the last epoch's rule is a draw from that
    swing. Keeping the rule of the best evaluation on the *validation* problems is model
    selection on data that the reported *held-out* numbers never see.

    Attributes:
        loss: the lowest validation loss offered (``inf`` before any).
        epoch: the meta-epoch it was measured after (None before any).
        state: the rule's ``state_dict`` then (cloned), or None.
    """

    def __init__(self, loss: float = math.inf, epoch: int | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> None:
        self.loss, self.epoch, self.state = loss, epoch, state

    def offer(self, rule: LSTMOptimizer, loss: float, epoch: int) -> bool:
        """Keeps ``rule``'s weights if ``loss`` is finite and lower than every earlier one (a tie
        keeps the earlier rule); returns whether it did."""
        if not math.isfinite(loss) or loss >= self.loss:
            return False
        self.loss, self.epoch = float(loss), int(epoch)
        self.state = {k: v.detach().clone() for k, v in rule.state_dict().items()}
        return True

    def selected(self, rule: LSTMOptimizer) -> LSTMOptimizer:
        """A copy of ``rule`` with the kept weights (``rule`` itself when none were kept)."""
        if self.state is None:
            return rule
        chosen = copy.deepcopy(rule)
        chosen.load_state_dict(self.state)
        return chosen

    def to_payload(self) -> dict[str, Any]:
        """For a checkpoint (plain values and tensors: loads with ``weights_only=True``)."""
        return {"loss": self.loss, "epoch": self.epoch, "state": self.state}

    @classmethod
    def from_payload(cls, payload: Any) -> BestOnValidation:
        """The tracker a checkpoint saved; an empty one for checkpoints from before it existed.

        Raises:
            CheckpointError: the payload is not one :meth:`to_payload` wrote.
        """
        if payload is None:
            return cls()
        if not isinstance(payload, Mapping):
            raise CheckpointError("the checkpoint's best-on-validation record is damaged")
        loss, epoch, state = payload.get("loss"), payload.get("epoch"), payload.get("state")
        # As offer() leaves it: nothing kept yet, or an epoch (int >= 0) with its weights.
        empty = epoch is None and state is None
        kept = (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0
                and isinstance(state, Mapping))
        if not (isinstance(loss, float) and (empty or kept)):
            raise CheckpointError("the checkpoint's best-on-validation record is damaged")
        return cls(loss, epoch, state)


# ---------------------------------------------------------------------------------------------
# Loss curves and the comparison with tuned baselines


def rule_losses(rule: LSTMOptimizer, problems: Problems, steps: int) -> torch.Tensor:
    """``[steps + 1, B]``: each problem's loss before each of ``steps`` rule updates and after
    the last. One loss evaluation per step, as :func:`baseline_losses` does, so on the digits
    both see the same minibatch sequence; no graph is kept through the rule."""
    theta, state, rows = problems.theta0.detach(), None, []
    for _ in range(steps):
        theta = theta.requires_grad_()
        with torch.enable_grad():
            loss = problems.loss(theta)
            (grad,) = torch.autograd.grad(loss.sum(), theta)
        rows.append(loss.detach())
        with torch.no_grad():
            update, state = rule(grad.reshape(-1), state)
        theta = theta.detach() + update.view_as(theta)
    with torch.no_grad():
        rows.append(problems.loss(theta))
    return torch.stack(rows)


def validation_loss(rule: LSTMOptimizer, problem: str, *, problems: int, steps: int) -> float:
    """The rule's mean loss after ``steps`` steps on ``problems`` problems of the family
    ``problem`` drawn from the validation seed: what training watches (and
    :class:`BestOnValidation` selects on), never the held-out set."""
    return float(rule_losses(rule, _problems(problem, problems, VALIDATION_SEED),
                             steps)[-1].mean())


def evaluate_and_select(rule: LSTMOptimizer, best: BestOnValidation, problem: str, *,
                        done: int, epochs: int, every: int, problems: int,
                        steps: int) -> float | None:
    """The evaluation schedule of a meta-training run, after its epoch ``done`` (from 1): the
    rule's :func:`validation_loss` every ``every`` epochs and after the last (else None).
    Only the every-``every`` evaluations are offered to ``best``: a run stopped at a last epoch
    off that grid and then extended selects what one straight run would (the last epoch's rule
    is reported anyway, as :data:`LAST_EPOCH`)."""
    on_grid = done % every == 0
    if not on_grid and done != epochs:
        return None
    loss = validation_loss(rule, problem, problems=problems, steps=steps)
    if on_grid:
        best.offer(rule, loss, done)
    return loss


def baseline_losses(name: str, lr: float, problems: Problems, steps: int) -> torch.Tensor:
    """``[steps + 1, B]``: each problem's loss before each of ``steps`` steps of the baseline
    ``name`` (a key of :data:`BASELINES`) at ``lr``, and after the last."""
    theta = problems.theta0.clone().requires_grad_()
    opt = BASELINES[name]([theta], lr)
    rows = []
    for _ in range(steps):
        loss = problems.loss(theta)
        rows.append(loss.detach())
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        rows.append(problems.loss(theta))
    return torch.stack(rows)


def _mean_curve(losses: torch.Tensor) -> list[float]:
    # Row by row: each step's mean is taken over that step's [B] losses alone.
    return [float(row.mean()) for row in losses]


def tune_baseline(name: str, problem: str, *, problems: int, steps: int,
                  lr_grid: Sequence[float] | None = None,
                  seed: int = TUNING_SEED) -> tuple[float, dict[float, float]]:
    """The learning rate of ``lr_grid`` (default :data:`LR_GRID`) with the lowest mean loss
    after ``steps`` steps on the tuning set (``problems`` problems drawn from ``seed``), and
    every lr's final mean loss.

    Raises:
        ValueError: the baseline diverged at every learning rate.
    """
    lr_grid = LR_GRID if lr_grid is None else lr_grid
    finals = {lr: _mean_curve(baseline_losses(name, lr, _problems(problem, problems, seed),
                                              steps)[-1:])[0]
              for lr in lr_grid}
    finite = {lr: v for lr, v in finals.items() if math.isfinite(v)}
    if not finite:
        raise ValueError(f"{name} diverged at every learning rate of {list(lr_grid)}")
    return min(finite, key=finite.__getitem__), finals


def compare_with_baselines(rule: LSTMOptimizer, problem: str, *, problems: int,
                           tune_steps: int, steps: int, lr_grid: Sequence[float] | None = None,
                           progress: Callable[[str], None] | None = None,
                           other_rules: Mapping[str, LSTMOptimizer] | None = None,
                           ) -> dict[str, dict[str, Any]]:
    """Tunes every baseline over ``lr_grid`` (default :data:`LR_GRID`) on the tuning set for
    ``tune_steps`` steps, then runs each at its
    tuned lr, and the rule, for ``steps`` steps on the held-out set (freshly built for each
    method: the same initialisations and minibatch sequence).

    Args:
        other_rules: more learned rules to run on the held-out set, by name (e.g.
            :data:`LAST_EPOCH`).

    Returns:
        ``{name: {"lr", "tuning_final" (baselines only), "curve", "losses", "seconds"}}`` in the
        order of :data:`BASELINES`, then :data:`LEARNED`, then ``other_rules``:
        ``tuning_final`` maps each lr to its final mean tuning loss (None: diverged), ``curve`` is
        the mean loss at steps 0..steps, ``losses`` the ``[steps + 1, B]`` tensor behind it,
        ``seconds`` the wall time of tuning and evaluating that method.
    """
    lr_grid = LR_GRID if lr_grid is None else lr_grid
    results: dict[str, dict[str, Any]] = {}
    for name in BASELINES:
        if progress is not None:
            progress(f"tuning {name} over {len(lr_grid)} learning rates")
        start = time.perf_counter()
        best, finals = tune_baseline(name, problem, problems=problems, steps=tune_steps,
                                     lr_grid=lr_grid)
        losses = baseline_losses(name, best, _problems(problem, problems, HELD_OUT_SEED), steps)
        # None, not NaN, for an lr that diverged: NaN is not JSON (summary.json).
        finals = {lr: v if math.isfinite(v) else None for lr, v in finals.items()}
        results[name] = {"lr": best, "tuning_final": finals, "curve": _mean_curve(losses),
                         "losses": losses, "seconds": time.perf_counter() - start}
    for name, learned in {LEARNED: rule, **(other_rules or {})}.items():
        if progress is not None:
            progress(f"evaluating {name}")
        start = time.perf_counter()
        losses = rule_losses(learned, _problems(problem, problems, HELD_OUT_SEED), steps)
        results[name] = {"lr": None, "curve": _mean_curve(losses), "losses": losses,
                         "seconds": time.perf_counter() - start}
    return results


def format_table(results: Mapping[str, Mapping[str, Any]], steps: Sequence[int]) -> str:
    """The results as a text table: each method's tuned lr and mean loss at each of ``steps``."""
    width = max([15, *(len(name) for name in results)])
    head = f"{'optimizer':<{width}}  {'tuned lr':<9}  " + "  ".join(f"{f'loss @{s}':<10}"
                                                                  for s in steps)
    lines = [head.rstrip(), "  ".join(["-" * width, "-" * 9] + ["-" * 10] * len(steps))]
    for name, r in results.items():
        lr = "-" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(f"{name:<{width}}  {lr:<9}  " + "  ".join(f"{r['curve'][s]:10.4f}"
                                                              for s in steps))
    return "\n".join(lines)


def plot_curves(results: Mapping[str, Mapping[str, Any]], path: str | Path, *, horizon: int,
                ylabel: str, title: str | None = None) -> None:
    """Each method's mean loss curve (log y), a dashed line at the training ``horizon``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(r["curve"], label=name + ("" if r["lr"] is None else f" (lr {r['lr']:g})"))
    ax.axvline(horizon, color="gray", lw=0.5, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("optimizee step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _stats(values: torch.Tensor) -> dict[str, Any]:
    """Mean and 95% CI over the problems whose loss is finite, and how many diverged."""
    finite = torch.isfinite(values)
    stats = mean_ci(values[finite])._asdict() if finite.any() else {"mean": None, "ci": None,
                                                                     "n": 0}
    stats["diverged"] = int((~finite).sum())
    return stats


# ---------------------------------------------------------------------------------------------
# The run


def build(config: Mapping[str, Any]) -> LSTMOptimizer:
    """The untrained rule a config describes."""
    return LSTMOptimizer(config["hidden"], impl=config["impl"])


def _check_same_run(saved: Any, config: Mapping[str, Any], path: Path) -> None:
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{path}: the checkpoint holds no run config")
    if saved.get("algorithm") != ALGORITHM:
        raise CheckpointError(f"{path} is a checkpoint of a {saved.get('algorithm')!r} run, not "
                              f"of an {ALGORITHM} run")
    for key in RESUME_KEYS:
        # Checkpoints from before the lr decay existed trained at a constant lr.
        value = saved.get(key, NO_LR_DECAY.get(key))
        if value != config[key]:
            raise CheckpointError(f"{path}: the checkpoint was trained with "
                                  f"{key}={value!r}, this run asks for "
                                  f"{key}={config[key]!r}")


@contextlib.contextmanager
def _must_fit(path: Path, what: str, hidden: int) -> Iterator[None]:
    """Turns a failed ``load_state_dict`` of saved weights inside into a CheckpointError that
    names ``what`` did not fit the architecture."""
    try:
        yield
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: {what} does not fit the architecture its config names "
                              f"(hidden={hidden}): {str(exc).splitlines()[0]}") from exc


def _load_weights(rule: LSTMOptimizer, payload: Mapping[str, Any], path: Path) -> None:
    with _must_fit(path, "the saved rule", rule.hidden_size):
        rule.load_state_dict(payload["model"])


def _non_finite(epoch: int, truncation: int) -> FloatingPointError:
    return FloatingPointError(
        f"the meta-loss is not finite at epoch {epoch + 1}, truncation {truncation}; the rule "
        f"was not updated, and the checkpoint holds epoch {epoch} (try a smaller outer_lr)")


def _epoch(rule: LSTMOptimizer, outer: torch.optim.Optimizer, problems: Problems,
           config: Mapping[str, Any], epoch: int, *, distributed: bool = False) -> float:
    """One meta-epoch (:func:`fastmeta.meta.lstm_training.meta_epoch`), with the run's epoch in
    the message of a non-finite meta-loss.

    With ``distributed``, the batch of problems is split across the processes of the process
    group: each rank optimizes its own contiguous share, and after each truncation the rule's
    meta-gradients, weighted by each rank's share of the problems, are summed in one
    all-reduce, which gives every rank the single-process meta-gradient (the meta-loss is a
    mean over the problems); every rank then takes the same outer step. The meta-loss and the
    logged loss travel in the same all-reduce, so a non-finite meta-loss on any rank stops
    every rank, before any of them steps.
    """
    reduce_gradients = None
    if distributed:
        batch = problems.theta0.shape[0]
        share = owned_tasks(batch)
        problems = problem_share(problems, share)
        weight = len(share) / batch

        def reduce_gradients(meta_loss: torch.Tensor, losses: torch.Tensor) -> tuple[float, float]:
            summed = all_reduce_gradients(
                rule.parameters(), scale=weight,
                extra=[float(meta_loss) * weight, float(losses.mean()) * weight])
            return float(summed[0]), float(summed[1])

    try:
        return meta_epoch(rule, outer, problems, horizon=config["horizon"],
                          unroll_steps=config["unroll"], second_order=config["second_order"],
                          reduce_gradients=reduce_gradients)
    except NonFiniteMetaLoss as exc:
        raise _non_finite(epoch, exc.truncation) from None


class _DigitsMLPShare:
    """Problems ``share`` of a :class:`DigitsMLPProblems` batch, drawing each minibatch exactly
    as the whole batch would: the ``[B, m]`` index is drawn whole from the batch's generator
    (so it advances as in a single process) and this share keeps its rows."""

    def __init__(self, whole: DigitsMLPProblems, share: range) -> None:
        self.whole, self.share = whole, share
        self.theta0 = whole.theta0[share.start:share.stop]

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """``[len(share)]``: each of this share's MLPs on its rows of the batch's minibatch."""
        index = self.whole.draw_minibatches(self.whole.theta0.shape[0])
        return self.whole.loss_on(theta, index[self.share.start:self.share.stop])


def problem_share(problems: Problems, share: range) -> Any:
    """The problems ``share`` (a range of indices) of a batch, as an object with ``theta0`` and
    ``loss`` whose losses are those of the whole batch's rows ``share`` (for the digits, the
    same minibatches, and the batch's generator advances as if the whole batch had been
    evaluated)."""
    if isinstance(problems, QuadraticProblems):
        part = copy.copy(problems)
        part.W, part.y, part.theta0 = (t[share.start:share.stop]
                                       for t in (problems.W, problems.y, problems.theta0))
        return part
    if isinstance(problems, DigitsMLPProblems):
        return _DigitsMLPShare(problems, share)
    raise TypeError(f"problems: no share of a {type(problems).__name__} batch")


def _load_resume_state(checkpoint: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    if not checkpoint.exists():
        raise CheckpointError(f"--resume: no checkpoint at {checkpoint}")
    payload = load_checkpoint(checkpoint)
    _check_same_run(payload.get("config"), config, checkpoint)
    extra = payload.get("extra") or {}
    if not isinstance(extra.get("generator"), torch.Tensor):
        raise CheckpointError(f"{checkpoint}: the checkpoint holds no problem generator state")
    return payload


def train(config: Mapping[str, Any], *, resume: bool = False, quiet: bool = False,
          distributed: bool = False) -> dict[str, Any]:
    """Meta-trains the rule as ``config`` (from :func:`default_config`) says, then compares it
    with the tuned baselines; returns the summary also written to ``summary.json``.

    Args:
        config: the run.
        resume: continue from ``<out>/checkpoint.pt`` exactly where it stopped.
        quiet: no progress bar and no messages.
        distributed: split each meta-epoch's problems across the processes of the current
            ``torch.distributed`` process group (see :mod:`fastmeta.distributed`): every
            process draws the whole batch, optimizes its own contiguous share, and the rule's
            meta-gradient is all-reduced as one flat bucket after each truncation. Only rank 0
            reads and writes the run folder, shows progress, evaluates and compares with the
            baselines; the other ranks return once training is done, with no ``results``. A
            checkpoint resumes on any number of processes.

    Raises:
        CheckpointError: ``resume`` without a checkpoint, or a checkpoint that is corrupt or of
            another run (algorithm, problem, architecture, schedule or seed; named).
        FloatingPointError: the meta-loss became non-finite (the last checkpoint is kept).
        ValueError: with ``distributed``, fewer problems per meta-epoch than processes, or
            processes given different configs.
        RuntimeError: ``distributed`` without a process group.
        fastmeta.distributed.DistributedError: another process died or hung (after the
            process group's timeout); the last checkpoint stays valid.
    """
    config = dict(config)
    ctx, main, quiet = start_run(config, resume=resume, quiet=quiet, distributed=distributed)
    out = Path(config["out"])
    checkpoint = out / "checkpoint.pt"
    family = FAMILIES[config["problem"]]
    seed_everything(config["seed"])
    rule = build(config)
    outer = Adam(rule.parameters(), lr=config["outer_lr"])
    generator = torch.Generator().manual_seed(config["seed"])
    start, elapsed_before = 0, 0.0
    best = BestOnValidation()
    if resume:
        payload = on_main(_load_resume_state, checkpoint, config)
        _load_weights(rule, payload, checkpoint)
        start = restore(payload, optimizer=outer)
        extra = payload["extra"]
        generator.set_state(extra["generator"])
        elapsed_before = float(extra.get("train_seconds", 0.0))
        best, _ = _best_from(payload, rule, checkpoint)
    if ctx is not None:
        broadcast_parameters(rule.parameters())
    fields = ["epoch", "meta_loss", "eval_loss", "seconds"]
    metrics = (MetricsWriter(out / "metrics.csv", fields, resume_from=start if resume else None,
                             step_key="epoch") if main else contextlib.nullcontext())
    started = time.perf_counter()
    with metrics, Progress(config["epochs"], initial=start, desc=f"meta-train {ALGORITHM}",
                           disable=quiet) as bar:
        for epoch in range(start, config["epochs"]):
            set_outer_lr(outer, epoch, config["outer_lr"], config["outer_lr_decay_epoch"],
                         config["outer_lr_decay_factor"])
            problems = family.make(config["meta_batch"], generator)
            loss = _epoch(rule, outer, problems, config, epoch, distributed=ctx is not None)
            done = epoch + 1
            row: dict[str, Any] = {"epoch": done, "meta_loss": loss, "eval_loss": ""}
            shown = {}
            val = None if not main else evaluate_and_select(
                rule, best, config["problem"], done=done, epochs=config["epochs"],
                every=config["eval_every"], problems=config["eval_tasks"],
                steps=config["horizon"])
            if val is not None:
                row["eval_loss"] = shown["val"] = val
            seconds = elapsed_before + time.perf_counter() - started
            row["seconds"] = round(seconds, 2)
            if main:  # the others go on, and wait for rank 0 in the next all-reduce
                metrics.write(row)
                save_checkpoint(checkpoint, checkpoint_payload(
                    iteration=done, model=rule, optimizer=outer, config=config,
                    generator=generator.get_state(), train_seconds=seconds,
                    best=best.to_payload()))
            bar.update(loss=loss, **shown)
    train_seconds = elapsed_before + time.perf_counter() - started
    if not main:
        return {"config": config, "train_seconds": train_seconds, "results": {}}
    rule.save(out / "rule-last.pt")
    selected = best.selected(rule)
    selected.save(out / "rule.pt")
    return _finish(rule, selected, best, config, out, train_seconds=train_seconds,
                   resumed_from=start if resume else None, quiet=quiet)


def _best_from(payload: Mapping[str, Any], rule: LSTMOptimizer,
               path: Path) -> tuple[BestOnValidation, LSTMOptimizer]:
    """The checkpoint's best-on-validation record and the rule it selects (``rule`` itself for
    an empty record), its weights checked against ``rule``'s architecture."""
    try:
        best = BestOnValidation.from_payload(payload["extra"].get("best"))
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    with _must_fit(path, "the best-on-validation rule", rule.hidden_size):
        return best, best.selected(rule)


def _finish(rule: LSTMOptimizer, selected: LSTMOptimizer, best: BestOnValidation,
            config: dict[str, Any], out: Path, *, train_seconds: float,
            resumed_from: int | None, quiet: bool) -> dict[str, Any]:
    """The comparison with the tuned baselines: summary.json and curves.png. ``rule`` is the
    last epoch's rule; the comparison's :data:`LEARNED` is ``selected`` (``best``'s), with the
    last epoch's beside it under :data:`LAST_EPOCH`."""
    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    horizon = config["horizon"]
    steps = [horizon, 2 * horizon]
    results = compare_with_baselines(selected, config["problem"],
                                     problems=config["eval_tasks"], tune_steps=horizon,
                                     steps=steps[-1], progress=say,
                                     other_rules={LAST_EPOCH: rule})
    summary: dict[str, Any] = {
        "config": config, "train_seconds": train_seconds, "resumed_from": resumed_from,
        "steps": steps, "held_out_problems": config["eval_tasks"],
        "selected_epoch": best.epoch,
        "selected_validation_loss": None if best.epoch is None else best.loss,
        "comparison_seconds": sum(r["seconds"] for r in results.values()), "results": {},
    }
    for name, r in results.items():
        entry = {k: v for k, v in r.items() if k != "losses"}
        entry["loss"] = {str(s): _stats(r["losses"][s]) for s in steps}
        summary["results"][name] = entry
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    try:
        plot_curves(results, out / "curves.png", horizon=horizon,
                    ylabel=f"mean loss, {config['eval_tasks']} held-out {config['problem']} "
                    "problems",
                    title=f"learned rule (epoch {best.epoch or config['epochs']} of "
                    f"{config['epochs']}) vs tuned baselines")
    except ImportError:
        say("matplotlib is not installed: not writing curves.png (pip install matplotlib)")
    return summary


# ---------------------------------------------------------------------------------------------
# Trained rules


def is_run_config(config: Any) -> bool:
    """Whether a checkpoint's config is that of an lstm-opt run."""
    return isinstance(config, Mapping) and config.get("algorithm") == ALGORITHM


def load_trained(checkpoint: str | Path) -> tuple[LSTMOptimizer, dict[str, Any]]:
    """The rule and config saved in a run's checkpoint (loaded with ``weights_only=True``): the
    rule of the evaluation with the lowest validation loss so far, as ``rule.pt`` holds at the
    end (the last epoch's for checkpoints from before that record existed).

    Raises:
        CheckpointError: a corrupt checkpoint, one of another kind of run, or weights that do
            not fit the config's architecture.
    """
    _, selected, config = _load_run(checkpoint)
    return selected, config


def load_selection(checkpoint: str | Path) -> BestOnValidation:
    """The best-on-validation record of a run's checkpoint: which epoch's rule
    :func:`load_trained` returns (``epoch`` None: the last epoch's, as no evaluation on the
    ``eval_every`` grid has been made or the checkpoint predates the record) and its validation
    loss. Raises as :func:`load_trained`."""
    best, _, _ = _load_run(checkpoint)
    return best


def _load_run(checkpoint: str | Path
              ) -> tuple[BestOnValidation, LSTMOptimizer, dict[str, Any]]:
    """(the best-on-validation record, the rule it selects, the config) of a checkpoint."""
    path = Path(checkpoint)
    payload = load_checkpoint(path)
    if not is_run_config(payload.get("config")):
        raise CheckpointError(f"{path} is not a checkpoint of an {ALGORITHM} run")
    try:
        config = default_config(**payload["config"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: its config is not valid: {exc}") from exc
    rule = build(config)
    _load_weights(rule, payload, path)
    best, selected = _best_from(payload, rule, path)
    return best, selected, config


def evaluate(rule: LSTMOptimizer, config: Mapping[str, Any], *, problems: int,
             steps: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The rule's loss on ``problems`` held-out problems (the set of the run's summary) after
    each of ``steps`` steps: ``{step: {"mean", "ci", "n", "diverged"}}``."""
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError(f"steps must be ints >= 1, got {list(steps)!r}")
    if isinstance(problems, bool) or not isinstance(problems, int) or problems < 1:
        raise ValueError(f"problems must be an int >= 1, got {problems!r}")
    losses = rule_losses(rule, _problems(config["problem"], problems, HELD_OUT_SEED), max(steps))
    return {s: _stats(losses[s]) for s in steps}
