"""``fastmeta train maml`` / ``fastmeta eval``: runs resume exactly, and report bad input
(``fastmeta train cavia`` shares this machinery; its runs are tested in test_cavia.py)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fastmeta.cli import main
from fastmeta.meta import MAML, runs
from fastmeta.meta.training import load_checkpoint, save_checkpoint

SMALL = ["--task", "sinusoid", "--meta-batch", "4", "--eval-every", "5", "--eval-tasks", "10",
         "--eval-steps", "1", "--seed", "3"]


def _train(tmp_path, name, iterations, *extra):
    out = tmp_path / name
    rc = main(["train", "maml", *SMALL, "--iterations", str(iterations), "--out", str(out),
               *extra])
    assert rc == 0
    return out


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    straight = _train(tmp_path, "straight", 15)
    interrupted = _train(tmp_path, "resumed", 10)
    resumed = _train(tmp_path, "resumed", 15, "--resume")
    assert resumed == interrupted
    a = load_checkpoint(straight / "checkpoint.pt")
    b = load_checkpoint(resumed / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == 15
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)
    with open(resumed / "metrics.csv") as f:
        iterations = [int(row["iteration"]) for row in csv.DictReader(f)]
    assert iterations == [5, 10, 15]  # no row written twice across the resume


def test_run_writes_metrics_summary_and_plot(tmp_path):
    out = _train(tmp_path, "run", 5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"][0]["tasks"] == 10
    assert (out / "adapted.png").stat().st_size > 0
    assert main(["eval", str(out / "checkpoint.pt"), "--tasks", "20", "--steps", "1"]) == 0


def test_eval_draws_pool_independent_task_sets(tmp_path, capsys):
    out = _train(tmp_path, "run", 5)
    learner, config = runs.load_trained(out / "checkpoint.pt")
    pooled = runs.evaluate(learner, config, tasks=30, steps=2, shots=5, draws=3)
    singles = [runs.evaluate(learner, config, tasks=30, steps=2, shots=5, seed=runs.EVAL_SEED + d)
               for d in range(3)]
    # Draw d is exactly the one-draw evaluation with seed EVAL_SEED + d; the pool is all 90.
    assert pooled["draw_losses"] == pytest.approx([s["loss"]["mean"] for s in singles], rel=1e-12)
    assert pooled["tasks"] == 90 and pooled["loss"]["n"] == 90
    assert pooled["loss"]["mean"] == pytest.approx(sum(pooled["draw_losses"]) / 3, rel=1e-9)
    assert pooled["seeds"] == [runs.EVAL_SEED, runs.EVAL_SEED + 2]
    assert "draw_losses" not in singles[0]
    assert singles[1]["loss"]["mean"] != singles[0]["loss"]["mean"]  # independent sets
    with pytest.raises(ValueError, match="draws"):
        runs.evaluate(learner, config, tasks=30, steps=1, draws=0)
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.pt"), "--tasks", "30", "--steps", "2",
                 "--shots", "5", "--draws", "3"]) == 0
    printed = capsys.readouterr().out
    assert "90 tasks" in printed and f"seeds {runs.EVAL_SEED}-{runs.EVAL_SEED + 2}" in printed
    assert f"{pooled['loss']['mean']:.4f}" in printed
    assert main(["eval", str(out / "checkpoint.pt"), "--tasks", "30", "--steps", "2",
                 "--shots", "5", "--seed", str(runs.EVAL_SEED + 1)]) == 0
    assert f"{singles[1]['loss']['mean']:.4f}" in capsys.readouterr().out
    assert main(["eval", str(out / "checkpoint.pt"), "--draws", "0"]) == 2
    assert "--draws" in capsys.readouterr().err


def test_corrupt_checkpoint_is_reported_not_loaded(tmp_path, capsys):
    out = _train(tmp_path, "run", 5)
    ckpt = out / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    assert main(["eval", str(ckpt)]) == 2
    assert "checkpoint" in capsys.readouterr().err.lower()


def test_resume_with_another_model_is_refused(tmp_path, capsys):
    _train(tmp_path, "run", 5)
    rc = main(["train", "maml", *SMALL, "--iterations", "10", "--out", str(tmp_path / "run"),
               "--first-order", "--resume"])
    assert rc == 2
    assert "first_order" in capsys.readouterr().err


def test_resume_without_checkpoint_is_refused(tmp_path, capsys):
    rc = main(["train", "maml", *SMALL, "--iterations", "5", "--out", str(tmp_path / "none"),
               "--resume"])
    assert rc == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_omniglot_without_root_is_refused():
    with pytest.raises(ValueError, match="--omniglot-root"):
        runs.default_config(task="omniglot")


def test_same_seed_same_run(tmp_path):
    a = load_checkpoint(_train(tmp_path, "a", 5) / "checkpoint.pt")
    b = load_checkpoint(_train(tmp_path, "b", 5) / "checkpoint.pt")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)


def test_checkpoint_from_before_cavia_still_loads_and_resumes(tmp_path):
    """A MAML checkpoint whose config predates the algorithm/context keys reads as MAML."""
    out = _train(tmp_path, "old", 5)
    payload = load_checkpoint(out / "checkpoint.pt")
    for key in ("algorithm", "num_context_params", "context_mode"):
        del payload["config"][key]
    save_checkpoint(out / "checkpoint.pt", payload)
    learner, config = runs.load_trained(out / "checkpoint.pt")
    assert isinstance(learner, MAML) and config["algorithm"] == "maml"
    assert main(["eval", str(out / "checkpoint.pt"), "--tasks", "10", "--steps", "1"]) == 0
    _train(tmp_path, "old", 10, "--resume")
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 10
