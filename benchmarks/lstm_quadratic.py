"""``python -m benchmarks.lstm_quadratic [--problem quadratic|digits]``: the LSTM learned
optimizer against tuned baselines (Andrychowicz et al. 2016, sections 3.1 and 3.2).

1. Meta-train an :class:`~fastmeta.meta.LSTMOptimizer` by truncated BPTT (100 optimizee steps,
   unrolled 20 at a time, Adam at 1e-3 on the rule, first order as in the paper), fresh problems
   every meta-epoch: 128 random 10-dimensional quadratics (1,000 epochs), or 4 digits MLPs
   (64-20-10 sigmoid, minibatches of 128; 1,000 epochs) with new initialisations.
2. Tune SGD, momentum (0.9), RMSprop and Adam: each learning rate of ``LR_GRID`` runs 100
   steps on a *tuning* set of problems; the lr with the lowest mean final loss wins.
3. Evaluate everything on a *held-out* set (another seed): mean loss after 100 and after 200
   steps (the rule was trained for 100). For the digits the loss at a step is that step's
   minibatch loss, and every method sees the same minibatch sequence. The learned rule is the
   one of the meta-epoch with the lowest loss on a third, *validation* set (evaluated every
   ``EVAL_EVERY`` epochs, :class:`~fastmeta.meta.lstm_runs.BestOnValidation`); the last
   epoch's rule is reported beside it.

The tuning, validation and held-out sets are disjoint, so neither the baselines' learning rates
nor the rule's selection see the test set. The
tuning, curves, table and plot are :mod:`fastmeta.meta.lstm_runs`'s, shared with
``fastmeta train lstm-opt`` (which also checkpoints and resumes).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fastmeta.meta import LSTMOptimizer
from fastmeta.meta.lstm_runs import (
    EVAL_EVERY,
    FAMILIES,
    HORIZON,
    LAST_EPOCH,
    LR_GRID,
    OUTER_LR,
    UNROLL,
    BestOnValidation,
    compare_with_baselines,
    evaluate_and_select,
    format_table,
    plot_curves,
)
from fastmeta.meta.lstm_training import meta_train

# The keys of each method's entry in the JSON (the comparison also returns per-problem losses
# and timings, which this benchmark does not record).
RESULT_KEYS = ("lr", "tuning_final", "curve")


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
    epochs = args.epochs or family.epochs
    stem = f"lstm-{args.problem}"

    torch.manual_seed(args.seed)
    rule = LSTMOptimizer()
    best = BestOnValidation()
    validation: list[tuple[int, float]] = []  # (epoch, validation loss)
    start = time.perf_counter()
    last = [start]

    def progress(epoch: int, loss: float) -> None:
        done = epoch + 1
        val = evaluate_and_select(rule, best, args.problem, done=done, epochs=epochs,
                                  every=EVAL_EVERY, problems=family.eval, steps=HORIZON)
        if val is not None:
            validation.append((done, val if math.isfinite(val) else None))
        now = time.perf_counter()
        if now - last[0] > 10 or done == epochs:
            chosen = "none yet" if best.epoch is None else f"{best.loss:.4f} (epoch {best.epoch})"
            print(f"meta-epoch {done}/{epochs}: mean optimizee loss {loss:.4f}, best "
                  f"validation loss {chosen} ({now - start:.0f} s)", flush=True)
            last[0] = now

    history = meta_train(rule, lambda g: family.make(family.train, g),
                         epochs=epochs, horizon=HORIZON, unroll_steps=UNROLL, lr=OUTER_LR,
                         seed=args.seed, on_epoch=progress)
    train_seconds = time.perf_counter() - start
    selected = best.selected(rule)
    selected.save(out / f"{stem}-rule.pt")

    compared = compare_with_baselines(selected, args.problem, problems=family.eval,
                                      tune_steps=HORIZON, steps=2 * HORIZON,
                                      other_rules={LAST_EPOCH: rule})
    results = {name: {k: r[k] for k in RESULT_KEYS if k in r} for name, r in compared.items()}
    table = format_table(results, (HORIZON, 2 * HORIZON))
    print(table)
    print(f"meta-training: {epochs} epochs in {train_seconds:.0f} s; the learned rule is epoch "
          f"{best.epoch}'s (validation loss {best.loss:.4f})")
    (out / f"{stem}.json").write_text(json.dumps(
        {"problem": args.problem, "epochs": epochs, "train_seconds": train_seconds,
         "lr_grid": LR_GRID, "meta_history": history, "validation": validation,
         "selected_epoch": best.epoch, "results": results}, indent=1))
    (out / f"{stem}.txt").write_text(table + "\n")
    try:
        plot_curves(results, out / f"{stem}.png", horizon=HORIZON,
                    ylabel=f"mean loss, {family.eval} held-out {args.problem} problems")
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
