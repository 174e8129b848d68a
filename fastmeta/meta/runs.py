"""The runs behind ``fastmeta train maml|cavia`` and ``fastmeta eval``: meta-training with
progress, periodic evaluation, atomic checkpoints, exact ``--resume``, CSV metrics and plots.

A run lives in one folder (``--out``): ``checkpoint.pt`` (written atomically every
``eval_every`` iterations and at the end), ``metrics.csv``, ``summary.json`` and, for the
sinusoid, ``adapted.png`` (and, for CAVIA, ``context.png``). Resuming restores the
meta-parameters, the outer optimizer, the task sampler and every RNG, so a resumed run continues
exactly where the checkpoint was taken.

The config's ``algorithm`` (``"maml"`` by default) picks the meta-learner :func:`build` makes;
everything else (sampling, the outer loop, evaluation, checkpoints) is shared.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F

from fastmeta.distributed import (
    all_reduce_gradients,
    broadcast_parameters,
    on_main,
    owned_tasks,
)
from fastmeta.meta.cavia import CAVIA, CAVIAOutput
from fastmeta.meta.maml import MAML
from fastmeta.meta.networks import MLP, Conv4, FiLMConv4
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

ALGORITHMS = ("maml", "cavia")
TASKS = ("sinusoid", "digits", "omniglot")
# Tasks drawn for each periodic evaluation during training (the final one uses eval_tasks).
PERIODIC_EVAL_TASKS = 100
# Tasks adapted per batch at evaluation: bounds memory for 1,000-task evaluations.
EVAL_BATCH = 100
# New tasks whose adapted contexts context.png shows: enough to see the structure.
CONTEXT_PLOT_TASKS = 500
# The config keys that define the model: a resumed or evaluated run must agree on them.
MODEL_KEYS = ("algorithm", "task", "ways", "first_order", "inner_optimizer", "learn_inner_lr",
              "filters", "num_context_params", "context_mode")
# The keys only CAVIA has (None for MAML).
CAVIA_KEYS = ("num_context_params", "context_mode")
# CAVIA's inner loop is plain SGD on the context (fastmeta.functional.sgd), with a fixed rate.
CAVIA_INNER_OPTIMIZER = "sgd"

Learner = Union[MAML, CAVIA]


def _defaults(algorithm: str, task: str) -> dict[str, Any]:
    """The defaults of a run: Finn et al. 2017's sinusoid setting for MAML, Zintgraf et al.
    2019's for CAVIA."""
    config = {
        "algorithm": algorithm, "task": task, "shots": 10, "queries": None, "ways": 5,
        "inner_steps": 1, "inner_lr": 0.01, "first_order": False, "inner_optimizer": "sgd",
        "learn_inner_lr": False, "meta_batch": 25, "iterations": 30000, "outer_lr": 1e-3,
        "grad_clip": None, "eval_every": 1000, "eval_tasks": 1000, "eval_steps": [1, 10],
        "eval_shots": None, "seed": 0, "omniglot_root": None, "filters": 64,
        "num_context_params": None, "context_mode": None, "impl": "auto", "out": "runs/maml",
    }
    if algorithm == "cavia":
        # Zintgraf et al. 2019 and their code (github.com/lmzintgraf/cavia): inner lr 1.0 for
        # both problems; the sinusoid (regression/arguments.py, section 5.1) with 5 context
        # params concatenated to the input, 50,000 iterations, meta-gradient clamped to
        # [-10, 10] (their code clamps each task's gradient before averaging; we clamp the
        # averaged one, which a single batched backward gives), evaluated at 5, 10 and 20
        # shots; classification (classification/arguments.py) with 100 context params and FiLM.
        config.update(inner_lr=1.0, out="runs/cavia")
        if task == "sinusoid":
            config.update(num_context_params=5, context_mode="concat", iterations=50000,
                          grad_clip=10.0, eval_shots=[5, 10, 20])
        else:
            config.update(num_context_params=100, context_mode="film")
    return config


def default_config(**overrides: Any) -> dict[str, Any]:
    """The config of a run: the defaults of its ``algorithm`` and ``task`` (see
    :func:`_defaults`), then ``overrides``; every key is a ``fastmeta train`` option."""
    algorithm = overrides.get("algorithm", "maml")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {', '.join(ALGORITHMS)}, got "
                         f"{algorithm!r}")
    task = overrides.get("task", "sinusoid")
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    config = _defaults(algorithm, task)
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    config.update(overrides)
    if config["task"] == "omniglot" and not config["omniglot_root"]:
        raise ValueError("task omniglot needs --omniglot-root, a folder in the Omniglot layout "
                         "<root>/<alphabet>/<character>/*.png (fastmeta never downloads)")
    if algorithm == "maml":
        for key in CAVIA_KEYS:
            if config[key] is not None:
                raise ValueError(f"{key} is a CAVIA option; MAML has no context (got "
                                 f"{key}={config[key]!r})")
    else:
        _check_cavia(config)
    return config


def _check_cavia(config: dict[str, Any]) -> None:
    if config["inner_optimizer"] != CAVIA_INNER_OPTIMIZER:
        raise ValueError(f"inner_optimizer: CAVIA's inner loop is plain SGD on the context, got "
                         f"{config['inner_optimizer']!r}")
    if config["learn_inner_lr"]:
        raise ValueError(f"learn_inner_lr: CAVIA's inner learning rate is fixed, got "
                         f"{config['learn_inner_lr']!r}")
    d = config["num_context_params"]
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"num_context_params must be an int >= 1, got {d!r}")
    # The sinusoid network is an MLP on [x, φ] (no conv layers to modulate); the image tasks'
    # network is FiLMConv4 (images cannot be concatenated with a vector).
    expected = "concat" if config["task"] == "sinusoid" else "film"
    if config["context_mode"] != expected:
        raise ValueError(
            f"context_mode={config['context_mode']!r}: the {config['task']} task takes "
            f"context_mode={expected!r} (" + (
                "its network is an MLP with no conv layers for FiLM to modulate)"
                if expected == "concat" else
                "images cannot be concatenated with the context; FiLM modulates the conv "
                "layers)"))


def _sampler(config: dict[str, Any], split: str, seed: int):
    from fastmeta.tasks import SinusoidTasks, digits_tasks, omniglot_tasks

    if config["task"] == "sinusoid":
        return SinusoidTasks(seed=seed)
    if config["task"] == "digits":
        return digits_tasks(split, seed=seed)
    return omniglot_tasks(config["omniglot_root"], split, seed=seed)


def _sample(config: dict[str, Any], sampler, num_tasks: int, *, shots: int | None = None,
            evaluation: bool = False, generator: torch.Generator | None = None):
    shots = shots or config["shots"]
    if config["task"] == "sinusoid":
        if evaluation:  # Finn et al.: MSE on 100 evenly spaced points in [-5, 5]
            return sampler.sample(num_tasks, shots, grid_query=True, generator=generator)
        return sampler.sample(num_tasks, shots, config["queries"], generator=generator)
    queries = config["queries"] or (15 if evaluation else shots)
    return sampler.sample(num_tasks, ways=config["ways"], shots=shots, queries=queries,
                          generator=generator)


def build(config: dict[str, Any]) -> Learner:
    """The meta-learner (MAML or CAVIA) a config describes, not yet trained."""
    if config["algorithm"] == "cavia":
        return _build_cavia(config)
    if config["task"] == "sinusoid":
        model, loss_fn = MLP(), F.mse_loss
    else:
        size = 8 if config["task"] == "digits" else 28
        model = Conv4(in_channels=1, ways=config["ways"], filters=config["filters"],
                      image_size=size)
        loss_fn = F.cross_entropy
    inner_kwargs = {"eps_root": 1e-12} if config["inner_optimizer"] in ("adam", "adamw") else {}
    return MAML(model, loss_fn=loss_fn, inner_lr=config["inner_lr"],
                inner_steps=config["inner_steps"], first_order=config["first_order"],
                inner_optimizer=config["inner_optimizer"], inner_kwargs=inner_kwargs,
                learn_inner_lr=config["learn_inner_lr"], impl=config["impl"])


def _build_cavia(config: dict[str, Any]) -> CAVIA:
    d = config["num_context_params"]
    if config["task"] == "sinusoid":
        # Zintgraf et al.: the MAML sinusoid network with the context appended to the input.
        model, loss_fn = MLP(in_features=1 + d), F.mse_loss
    else:
        size = 8 if config["task"] == "digits" else 28
        model = FiLMConv4(in_channels=1, ways=config["ways"], num_context_params=d,
                          filters=config["filters"], image_size=size)
        loss_fn = F.cross_entropy
    return CAVIA(model, loss_fn=loss_fn, num_context_params=d,
                 context_mode=config["context_mode"], inner_lr=config["inner_lr"],
                 inner_steps=config["inner_steps"], first_order=config["first_order"],
                 impl=config["impl"])


def _adapted(out: Any) -> torch.Tensor:
    """What a learner adapted: CAVIA's contexts [T, d] or MAML's fast weights [T, N]."""
    return out.context if isinstance(out, CAVIAOutput) else out.params


# The seed of the evaluation tasks (`fastmeta train`'s final evaluation, `fastmeta eval`).
EVAL_SEED = 12345


def _task_losses(learner: Learner, config: dict[str, Any], *, tasks: int, steps: int,
                 shots: int | None, seed: int,
                 split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each task's query loss (and accuracy) after ``steps`` inner steps, over ``tasks`` new
    tasks fixed by ``seed``."""
    sampler = _sampler(config, split, seed)
    generator = torch.Generator().manual_seed(seed)
    losses, accuracies = [], []
    remaining = tasks
    while remaining > 0:
        batch = min(EVAL_BATCH, remaining)
        episode = _sample(config, sampler, batch, shots=shots, evaluation=True,
                          generator=generator)
        out = learner.evaluate(episode, steps=steps)
        losses.append(out.query_losses)
        if out.accuracy is not None:
            accuracies.append(out.accuracy)
        remaining -= batch
    return torch.cat(losses), (torch.cat(accuracies) if accuracies else None)


def evaluate(learner: Learner, config: dict[str, Any], *, tasks: int, steps: int,
             shots: int | None = None, seed: int = EVAL_SEED, split: str = "test",
             draws: int = 1) -> dict[str, Any]:
    """Mean query loss (and accuracy) with a 95% CI over ``tasks`` new tasks, after ``steps``
    inner steps on ``shots``-shot support sets; the tasks are fixed by ``seed``.

    ``draws > 1`` evaluates that many independent sets of ``tasks`` tasks (seeds ``seed``,
    ``seed + 1``, ...): the loss and accuracy then pool all ``draws * tasks`` tasks, and
    ``"draw_losses"`` lists each set's mean loss (None for a set whose every task diverged).
    A heavy-tailed loss (the sinusoid after 10 steps) moves by more than its 1,000-task CI from
    one set to the next; the pooled mean is the better estimate of what the model does.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    per_draw = [_task_losses(learner, config, tasks=tasks, steps=steps, shots=shots,
                             seed=seed + d, split=split) for d in range(draws)]
    losses = torch.cat([loss for loss, _ in per_draw])
    finite = torch.isfinite(losses)
    # A learned per-parameter lr (Meta-SGD) may diverge when run for more steps than it was
    # trained for: such tasks are counted, and the statistics cover the others.
    result = {"loss": mean_ci(losses[finite])._asdict() if finite.any() else None,
              "diverged": int((~finite).sum()), "tasks": tasks * draws, "steps": steps,
              "shots": shots or config["shots"]}
    if per_draw[0][1] is not None:
        result["accuracy"] = mean_ci(torch.cat([acc for _, acc in per_draw]))._asdict()
    if draws > 1:
        result["draw_losses"] = [
            float(loss[torch.isfinite(loss)].double().mean()) if torch.isfinite(loss).any()
            else None
            for loss, _ in per_draw]
        result["seeds"] = [seed, seed + draws - 1]
    return result


def _check_same_model(saved: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    # A checkpoint from before a key existed holds that key's default (e.g. algorithm "maml").
    saved = default_config(**saved)
    for key in MODEL_KEYS:
        if saved.get(key) != config.get(key):
            raise CheckpointError(
                f"{path}: the checkpoint was trained with {key}={saved.get(key)!r}, this run "
                f"asks for {key}={config.get(key)!r}")


def _load_resume_state(checkpoint: Path, config: dict[str, Any]) -> dict[str, Any]:
    if not checkpoint.exists():
        raise CheckpointError(f"--resume: no checkpoint at {checkpoint}")
    payload = load_checkpoint(checkpoint)
    _check_same_model(payload["config"], config, checkpoint)
    return payload


def train(config: dict[str, Any], *, resume: bool = False, quiet: bool = False,
          distributed: bool = False) -> dict[str, Any]:
    """Meta-trains the config's algorithm as it says; returns the summary also written to
    ``summary.json``.

    Args:
        config: the run (from :func:`default_config`).
        resume: continue from ``<out>/checkpoint.pt`` exactly where it stopped.
        quiet: no progress bar and no messages.
        distributed: split each meta-batch across the processes of the current
            ``torch.distributed`` process group (see :mod:`fastmeta.distributed`): every
            process samples the whole meta-batch and adapts its own contiguous share of the
            tasks, the meta-gradient is all-reduced as one flat bucket, and every process takes
            the same outer step. Only rank 0 reads and writes the run folder (it broadcasts a
            resumed checkpoint, so it may be read on rank 0's machine alone), shows progress
            and evaluates; the other ranks return once training is done, with an empty
            ``evaluation``. The number of processes is not part of the run: a checkpoint
            resumes on any number of them.

    Raises:
        CheckpointError: ``resume`` without a checkpoint, or one of another model.
        ValueError: with ``distributed``, a meta-batch smaller than the number of processes,
            or processes given different configs.
        RuntimeError: ``distributed`` without a process group.
        fastmeta.distributed.DistributedError: another process died or hung (after the
            process group's timeout); the last checkpoint stays valid.
    """
    # A path may differ from machine to machine; everything else must agree.
    ctx, main, quiet = start_run(config, resume=resume, quiet=quiet, distributed=distributed,
                                 machine_specific=("out", "omniglot_root"))
    share = owned_tasks(config["meta_batch"]) if ctx is not None else None
    out = Path(config["out"])
    checkpoint = out / "checkpoint.pt"
    seed_everything(config["seed"])
    learner = build(config)
    outer = Adam(learner.parameters(), lr=config["outer_lr"])
    tasks = _sampler(config, "train", config["seed"])
    start = 0
    elapsed_before = 0.0
    if resume:
        payload = on_main(_load_resume_state, checkpoint, config)
        start = restore(payload, model=learner, optimizer=outer, tasks=tasks)
        elapsed_before = float(payload["extra"].get("train_seconds", 0.0))
    if ctx is not None:
        broadcast_parameters(learner.parameters())
    fields = ["iteration", "meta_loss", "eval_loss", "eval_ci", "eval_accuracy", "seconds"]
    metrics = (MetricsWriter(out / "metrics.csv", fields, resume_from=start if resume else None)
               if main else contextlib.nullcontext())
    started = time.perf_counter()
    running = []
    with metrics, Progress(config["iterations"], initial=start, disable=quiet) as bar:
        for iteration in range(start, config["iterations"]):
            episode = _sample(config, tasks, config["meta_batch"])
            if ctx is not None:
                episode = episode.select_tasks(share.start, share.stop)
            result = learner(episode)
            outer.zero_grad(set_to_none=True)
            result.loss.backward()
            if ctx is None:
                loss = result.loss.item()
            else:
                # This rank's mean over its T_r tasks, weighted T_r / T: the sum over the ranks
                # is the mean over all T tasks (see fastmeta.distributed).
                weight = len(share) / config["meta_batch"]
                (loss,) = all_reduce_gradients(
                    learner.parameters(), scale=weight,
                    extra=[result.loss.item() * weight]).tolist()
            if config["grad_clip"]:  # on the mean meta-gradient: after the all-reduce
                for p in learner.parameters():
                    if p.grad is not None:
                        p.grad.clamp_(-config["grad_clip"], config["grad_clip"])
            outer.step()
            running.append(loss)
            bar.update(loss=loss)
            done = iteration + 1
            if main and (done % config["eval_every"] == 0 or done == config["iterations"]):
                # Rank 0 alone evaluates and writes; the others wait for it in the next
                # all-reduce (within the process group's timeout).
                seconds = elapsed_before + time.perf_counter() - started
                val = evaluate(learner, config, tasks=PERIODIC_EVAL_TASKS,
                               steps=config["inner_steps"], seed=999, split="val")
                metrics.write({
                    "iteration": done, "meta_loss": sum(running) / len(running),
                    "eval_loss": val["loss"]["mean"] if val["loss"] else "nan",
                    "eval_ci": val["loss"]["ci"] if val["loss"] else "",
                    "eval_accuracy": val.get("accuracy", {}).get("mean", ""),
                    "seconds": round(seconds, 2),
                })
                running = []
                save_checkpoint(checkpoint, checkpoint_payload(
                    iteration=done, model=learner, optimizer=outer, config=config, tasks=tasks,
                    train_seconds=seconds))
    train_seconds = elapsed_before + time.perf_counter() - started
    summary = {"config": config, "train_seconds": train_seconds, "evaluation": []}
    if not main:
        return summary
    for steps in config["eval_steps"]:
        for shots in (config["eval_shots"] or [config["shots"]]):
            summary["evaluation"].append(
                evaluate(learner, config, tasks=config["eval_tasks"], steps=steps, shots=shots))
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    if config["task"] == "sinusoid":
        _plot_sinusoid_run(learner, config, out, quiet=quiet)
    return summary


def _plot_sinusoid_run(learner: Learner, config: dict[str, Any], out: Path, *,
                       quiet: bool) -> None:
    plots = ["adapted.png"] + (["context.png"] if isinstance(learner, CAVIA) else [])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not quiet:
            print(f"matplotlib is not installed: not writing {' and '.join(plots)} "
                  "(pip install matplotlib)", file=sys.stderr)
        return
    plot_sinusoid(learner, config, out / "adapted.png")
    if isinstance(learner, CAVIA):
        plot_context(learner, config, out / "context.png")


def load_trained(checkpoint: str | Path) -> tuple[Learner, dict[str, Any]]:
    """The meta-learner and config saved in a checkpoint (loaded with weights_only=True)."""
    payload = load_checkpoint(checkpoint)
    config = default_config(**payload["config"])
    learner = build(config)
    learner.load_state_dict(payload["model"])
    return learner, config


def plot_sinusoid(learner: Learner, config: dict[str, Any], path: Path, *,
                  tasks: int = 4) -> None:
    """The adapted curves of a few new tasks after 1 and 10 steps, with the true sinusoids
    and the support points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sampler = _sampler(config, "test", 7)
    episode = _sample(config, sampler, tasks, evaluation=True,
                      generator=torch.Generator().manual_seed(7))
    fig, axes = plt.subplots(1, tasks, figsize=(4 * tasks, 3.2), sharey=True)
    x = episode.query_x[0, :, 0]
    for steps, style in ((1, "--"), (10, "-")):
        out = learner.evaluate(episode, steps=steps)
        predictions = learner.predict(_adapted(out), episode.query_x).detach()
        for t, ax in enumerate(axes):
            ax.plot(x, predictions[t, :, 0], style, label=f"after {steps} step(s)")
    for t, ax in enumerate(axes):
        ax.plot(x, episode.query_y[t, :, 0], color="black", linewidth=1, label="true")
        ax.scatter(episode.support_x[t, :, 0], episode.support_y[t, :, 0], color="red", s=12,
                   label=f"{episode.support_x.shape[1]}-shot support", zorder=3)
        ax.set_title(f"A={episode.amplitude[t]:.2f}, phase={episode.phase[t]:.2f}")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{config['algorithm'].upper()} on sinusoids: adapted curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_context(cavia: CAVIA, config: dict[str, Any], path: Path, *,
                 tasks: int = CONTEXT_PLOT_TASKS) -> None:
    """How CAVIA's adapted context separates sinusoid tasks: the contexts of ``tasks`` new
    tasks after the trained number of inner steps, on their first two principal components
    (the context itself when d = 1), coloured by each task's amplitude and by its phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sampler = _sampler(config, "test", 7)
    episode = _sample(config, sampler, tasks, evaluation=True,
                      generator=torch.Generator().manual_seed(7))
    context = cavia.evaluate(episode, steps=config["inner_steps"]).context.double()
    centred = context - context.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    explained = (singular.square() / singular.square().sum().clamp_min(1e-300)).tolist()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, values, name in ((axes[0], episode.amplitude, "amplitude"),
                             (axes[1], episode.phase, "phase")):
        if context.shape[1] >= 2:
            pcs = centred @ vh[:2].T
            points = ax.scatter(pcs[:, 0], pcs[:, 1], c=values, s=8, cmap="viridis")
            ax.set_xlabel(f"PC1 of φ ({explained[0]:.0%} of the variance)")
            ax.set_ylabel(f"PC2 of φ ({explained[1]:.0%})")
        else:
            points = ax.scatter(context[:, 0], values, s=8)
            ax.set_xlabel("φ")
            ax.set_ylabel(name)
        fig.colorbar(points, ax=ax, label=name)
        ax.set_title(f"coloured by {name}")
    fig.suptitle(f"CAVIA: adapted context of {tasks} new tasks ({episode.support_x.shape[1]}"
                 f"-shot, {config['inner_steps']} step(s), d={context.shape[1]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
