"""The runs behind ``fastmeta train maml`` and ``fastmeta eval``: meta-training with progress,
periodic evaluation, atomic checkpoints, exact ``--resume``, CSV metrics and plots.

A run lives in one folder (``--out``): ``checkpoint.pt`` (written atomically every
``eval_every`` iterations and at the end), ``metrics.csv``, ``summary.json`` and, for the
sinusoid, ``adapted.png``. Resuming restores the meta-parameters, the outer optimizer, the task
sampler and every RNG, so a resumed run continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fastmeta.meta.maml import MAML
from fastmeta.meta.networks import MLP, Conv4
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
)
from fastmeta.optim import Adam

TASKS = ("sinusoid", "digits", "omniglot")
# Tasks drawn for each periodic evaluation during training (the final one uses eval_tasks).
PERIODIC_EVAL_TASKS = 100
# Tasks adapted per batch at evaluation: bounds memory for 1,000-task evaluations.
EVAL_BATCH = 100
# The config keys that define the model: a resumed or evaluated run must agree on them.
MODEL_KEYS = ("task", "ways", "first_order", "inner_optimizer", "learn_inner_lr", "filters")


def default_config(**overrides: Any) -> dict[str, Any]:
    """Finn et al. 2017's sinusoid setting; every key is a ``fastmeta train maml`` option."""
    config = {
        "task": "sinusoid", "shots": 10, "queries": None, "ways": 5,
        "inner_steps": 1, "inner_lr": 0.01, "first_order": False, "inner_optimizer": "sgd",
        "learn_inner_lr": False, "meta_batch": 25, "iterations": 30000, "outer_lr": 1e-3,
        "grad_clip": None, "eval_every": 1000, "eval_tasks": 1000, "eval_steps": [1, 10],
        "eval_shots": None, "seed": 0, "omniglot_root": None, "filters": 64,
        "impl": "auto", "out": "runs/maml",
    }
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    config.update(overrides)
    if config["task"] not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {config['task']!r}")
    if config["task"] == "omniglot" and not config["omniglot_root"]:
        raise ValueError("task omniglot needs --omniglot-root, a folder in the Omniglot layout "
                         "<root>/<alphabet>/<character>/*.png (fastmeta never downloads)")
    return config


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


def build(config: dict[str, Any]) -> MAML:
    """The MAML meta-learner a config describes (not yet trained)."""
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


def evaluate(maml: MAML, config: dict[str, Any], *, tasks: int, steps: int,
             shots: int | None = None, seed: int = 12345, split: str = "test") -> dict[str, Any]:
    """Mean query loss (and accuracy) with a 95% CI over ``tasks`` new tasks, after ``steps``
    inner steps on ``shots``-shot support sets; the tasks are fixed by ``seed``."""
    sampler = _sampler(config, split, seed)
    generator = torch.Generator().manual_seed(seed)
    losses, accuracies = [], []
    remaining = tasks
    while remaining > 0:
        batch = min(EVAL_BATCH, remaining)
        episode = _sample(config, sampler, batch, shots=shots, evaluation=True,
                          generator=generator)
        out = maml.evaluate(episode, steps=steps)
        losses.append(out.query_losses)
        if out.accuracy is not None:
            accuracies.append(out.accuracy)
        remaining -= batch
    losses = torch.cat(losses)
    finite = torch.isfinite(losses)
    # A learned per-parameter lr (Meta-SGD) may diverge when run for more steps than it was
    # trained for: such tasks are counted, and the statistics cover the others.
    result = {"loss": mean_ci(losses[finite])._asdict() if finite.any() else None,
              "diverged": int((~finite).sum()), "tasks": tasks, "steps": steps,
              "shots": shots or config["shots"]}
    if accuracies:
        result["accuracy"] = mean_ci(torch.cat(accuracies))._asdict()
    return result


def _check_same_model(saved: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    for key in MODEL_KEYS:
        if saved.get(key) != config.get(key):
            raise CheckpointError(
                f"{path}: the checkpoint was trained with {key}={saved.get(key)!r}, this run "
                f"asks for {key}={config.get(key)!r}")


def train(config: dict[str, Any], *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Meta-trains MAML as ``config`` says; returns the summary also written to
    ``summary.json``."""
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    seed_everything(config["seed"])
    maml = build(config)
    outer = Adam(maml.parameters(), lr=config["outer_lr"])
    tasks = _sampler(config, "train", config["seed"])
    start = 0
    elapsed_before = 0.0
    if resume and checkpoint.exists():
        payload = load_checkpoint(checkpoint)
        _check_same_model(payload["config"], config, checkpoint)
        start = restore(payload, model=maml, optimizer=outer, tasks=tasks)
        elapsed_before = float(payload["extra"].get("train_seconds", 0.0))
    elif resume:
        raise CheckpointError(f"--resume: no checkpoint at {checkpoint}")
    fields = ["iteration", "meta_loss", "eval_loss", "eval_ci", "eval_accuracy", "seconds"]
    metrics = MetricsWriter(out / "metrics.csv", fields, resume_from=start if resume else None)
    started = time.perf_counter()
    running = []
    with metrics, Progress(config["iterations"], initial=start, disable=quiet) as bar:
        for iteration in range(start, config["iterations"]):
            episode = _sample(config, tasks, config["meta_batch"])
            result = maml(episode)
            outer.zero_grad(set_to_none=True)
            result.loss.backward()
            if config["grad_clip"]:
                for p in maml.parameters():
                    if p.grad is not None:
                        p.grad.clamp_(-config["grad_clip"], config["grad_clip"])
            outer.step()
            loss = result.loss.item()
            running.append(loss)
            bar.update(loss=loss)
            done = iteration + 1
            if done % config["eval_every"] == 0 or done == config["iterations"]:
                seconds = elapsed_before + time.perf_counter() - started
                val = evaluate(maml, config, tasks=PERIODIC_EVAL_TASKS,
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
                    iteration=done, model=maml, optimizer=outer, config=config, tasks=tasks,
                    train_seconds=seconds))
    train_seconds = elapsed_before + time.perf_counter() - started
    summary = {"config": config, "train_seconds": train_seconds, "evaluation": []}
    for steps in config["eval_steps"]:
        for shots in (config["eval_shots"] or [config["shots"]]):
            summary["evaluation"].append(
                evaluate(maml, config, tasks=config["eval_tasks"], steps=steps, shots=shots))
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    if config["task"] == "sinusoid":
        plot_sinusoid(maml, config, out / "adapted.png")
    return summary


def load_trained(checkpoint: str | Path) -> tuple[MAML, dict[str, Any]]:
    """The meta-learner and config saved in a checkpoint (loaded with weights_only=True)."""
    payload = load_checkpoint(checkpoint)
    config = default_config(**payload["config"])
    maml = build(config)
    maml.load_state_dict(payload["model"])
    return maml, config


def plot_sinusoid(maml: MAML, config: dict[str, Any], path: Path, *, tasks: int = 4) -> None:
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
        out = maml.evaluate(episode, steps=steps)
        predictions = maml.predict(out.params, episode.query_x).detach()
        for t, ax in enumerate(axes):
            ax.plot(x, predictions[t, :, 0], style, label=f"after {steps} step(s)")
    for t, ax in enumerate(axes):
        ax.plot(x, episode.query_y[t, :, 0], color="black", linewidth=1, label="true")
        ax.scatter(episode.support_x[t, :, 0], episode.support_y[t, :, 0], color="red", s=12,
                   label=f"{episode.support_x.shape[1]}-shot support", zorder=3)
        ax.set_title(f"A={episode.amplitude[t]:.2f}, phase={episode.phase[t]:.2f}")
    axes[0].legend(fontsize=7)
    fig.suptitle("MAML on sinusoids: adapted curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
