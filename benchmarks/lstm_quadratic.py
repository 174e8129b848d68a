"""``python -m benchmarks.lstm_quadratic [--problem quadratic|digits]``: the LSTM learned
optimizer against tuned baselines (Andrychowicz et al. 2016, sections 3.1 and 3.2).

1. Meta-train an :class:`~fastmeta.meta.LSTMOptimizer` by truncated BPTT (100 optimizee steps,
   unrolled 20 at a time, Adam at 1e-3 on the rule, first order as in the paper), fresh problems
   every meta-epoch: 128 random 10-dimensional quadratics, or 4 digits MLPs (64-20-10 sigmoid,
   minibatches of 128) with new initialisations.
2. Tune SGD, momentum (0.9), RMSprop and Adam: each learning rate of :data:`LR_GRID` runs 100
   steps on a *tuning* set of problems; the lr with the lowest mean final loss wins.
3. Evaluate everything on a *held-out* set (another seed): mean loss after 100 and after 200
   steps (the rule was trained for 100). For the digits the loss at a step is that step's
   minibatch loss, and every method sees the same minibatch sequence.

The tuning and held-out sets are disjoint, so the baselines are not tuned on the test set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastmeta.meta import LSTMOptimizer
from fastmeta.meta.lstm_training import (
    DigitsMLPProblems,
    QuadraticProblems,
    meta_train,
    unroll,
)

#: Learning rates tried for each baseline (log-spaced, 1e-4 .. 3).
LR_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]
BASELINES = {
    "SGD": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "RMSprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "Adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}
TUNING_SEED, HELD_OUT_SEED = 1001, 2002
# Per problem family: problems per meta-epoch, problems in the tuning and held-out sets.
FAMILIES = {
    "quadratic": {"make": lambda n, g: QuadraticProblems(n, generator=g), "train": 128,
                  "eval": 100, "epochs": 1000},
    "digits": {"make": lambda n, g: DigitsMLPProblems(n, generator=g), "train": 4, "eval": 20,
               "epochs": 150},
}


def _problems(family: str, n: int, seed: int):
    return FAMILIES[family]["make"](n, torch.Generator().manual_seed(seed))


def baseline_curve(name: str, lr: float, problems, steps: int) -> torch.Tensor:
    """``[steps + 1]`` mean loss before each step and after the last."""
    theta = problems.theta0.clone().requires_grad_()
    opt = BASELINES[name]([theta], lr)
    curve = []
    for _ in range(steps):
        loss = problems.loss(theta)
        curve.append(float(loss.detach().mean()))
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    curve.append(float(problems.loss(theta).detach().mean()))
    return torch.tensor(curve)


def learned_curve(rule: LSTMOptimizer, problems, steps: int) -> torch.Tensor:
    theta, state, curve = problems.theta0, None, []
    for _ in range(steps // 20):  # unrolled in pieces, no graph kept between them
        result = unroll(rule, problems.loss, theta, state, 20)
        curve += result.losses.mean(1).tolist()
        theta, state = result.theta.detach(), type(result.state)(*(s.detach()
                                                                    for s in result.state))
    curve.append(float(problems.loss(theta).detach().mean()))
    return torch.tensor(curve)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problem", choices=sorted(FAMILIES), default="quadratic")
    parser.add_argument("--epochs", type=int, help="meta-training epochs (default: per family)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    family = FAMILIES[args.problem]
    epochs = args.epochs or family["epochs"]
    stem = f"lstm-{args.problem}"

    torch.manual_seed(args.seed)
    rule = LSTMOptimizer()
    start = time.perf_counter()
    last = [start]

    def progress(epoch: int, loss: float) -> None:
        now = time.perf_counter()
        if now - last[0] > 10 or epoch + 1 == epochs:
            print(f"meta-epoch {epoch + 1}/{epochs}: mean optimizee loss {loss:.4f} "
                  f"({now - start:.0f} s)", flush=True)
            last[0] = now

    history = meta_train(rule, lambda g: family["make"](family["train"], g),
                         epochs=epochs, seed=args.seed, on_epoch=progress)
    train_seconds = time.perf_counter() - start
    rule.save(out / f"{stem}-rule.pt")

    # Each method gets freshly built sets: the same initialisations and minibatch sequence.
    results = {}
    for name in BASELINES:
        finals = {lr: float(baseline_curve(name, lr, _problems(args.problem, family["eval"],
                                                               TUNING_SEED), 100)[-1])
                  for lr in LR_GRID}
        finite = {lr: v for lr, v in finals.items() if v == v and v != float("inf")}
        best = min(finite, key=finite.get)
        curve = baseline_curve(name, best, _problems(args.problem, family["eval"],
                                                     HELD_OUT_SEED), 200)
        results[name] = {"lr": best, "tuning_final": finals, "curve": curve.tolist()}
    curve = learned_curve(rule, _problems(args.problem, family["eval"], HELD_OUT_SEED), 200)
    results["LSTM (learned)"] = {"lr": None, "curve": curve.tolist()}

    lines = ["optimizer        tuned lr   loss @100   loss @200",
             "---------------  ---------  ----------  ----------"]
    for name, r in results.items():
        lr = "-" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(f"{name:<15}  {lr:<9}  {r['curve'][100]:10.4f}  {r['curve'][200]:10.4f}")
    table = "\n".join(lines)
    print(table)
    print(f"meta-training: {epochs} epochs in {train_seconds:.0f} s")
    (out / f"{stem}.json").write_text(json.dumps(
        {"problem": args.problem, "epochs": epochs, "train_seconds": train_seconds,
         "lr_grid": LR_GRID, "meta_history": history, "results": results}, indent=1))
    (out / f"{stem}.txt").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(r["curve"], label=name + ("" if r["lr"] is None else f" (lr {r['lr']:g})"))
    ax.axvline(100, color="gray", lw=0.5, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("optimizee step")
    ax.set_ylabel(f"mean loss, {family['eval']} held-out {args.problem} problems")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)


if __name__ == "__main__":
    main()
