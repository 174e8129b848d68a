"""``fastmeta train lstm-opt`` / ``fastmeta eval`` of its checkpoints: the files a run writes,
exact resume, the comparison with tuned baselines, and refused input. Every run is tiny (a few
epochs of 4-step horizons on a handful of problems) and uses the reference rule."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys

import pytest
import torch

from fastmeta.cli import main
from fastmeta.meta import LSTMOptimizer, lstm_runs
from fastmeta.meta.lstm_training import QuadraticProblems, meta_train
from fastmeta.meta.training import CheckpointError, load_checkpoint, save_checkpoint

TINY = ["--horizon", "4", "--unroll", "2", "--meta-batch", "4", "--eval-tasks", "4",
        "--eval-every", "2", "--impl", "reference", "--seed", "3"]
# Digits MLPs have 1,510 coordinates each: fewer of them.
TINY_DIGITS = ["--problem", "digits", "--horizon", "4", "--unroll", "2", "--meta-batch", "1",
               "--eval-tasks", "1", "--eval-every", "1", "--impl", "reference", "--seed", "3"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: extra OpenMP threads only add synchronisation, which costs
    seconds per run on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(out, epochs, *extra, tiny=TINY):
    rc = main(["train", "lstm-opt", *tiny, "--epochs", str(epochs), "--out", str(out), *extra])
    assert rc == 0
    return out


def _rows(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_weights(rule, state):
    assert rule.state_dict().keys() == state.keys()
    for key, value in rule.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def _assert_same_state(a, b):
    """Two checkpoints hold bit-identical rules, outer-Adam states and problem generators."""
    assert a["iteration"] == b["iteration"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][index][key], value, rtol=0, atol=0)
    assert torch.equal(a["extra"]["generator"], b["extra"]["generator"])
    best_a, best_b = a["extra"]["best"], b["extra"]["best"]
    assert (best_a["epoch"], best_a["loss"]) == (best_b["epoch"], best_b["loss"])
    for key, value in best_a["state"].items():
        torch.testing.assert_close(best_b["state"][key], value, rtol=0, atol=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished 3-epoch quadratic run; tests that damage it work on a copy."""
    return _train(tmp_path_factory.mktemp("lstm") / "run", 3)


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def test_run_writes_checkpoint_metrics_rule_summary_and_plot(run):
    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # validation loss every --eval-every epochs and at the end; a meta-loss every epoch
    assert [r["eval_loss"] != "" for r in rows] == [False, True, True]
    assert all(math.isfinite(float(r["meta_loss"])) for r in rows)
    assert float(rows[0]["seconds"]) <= float(rows[1]["seconds"]) <= float(rows[2]["seconds"])

    payload = load_checkpoint(run / "checkpoint.pt")
    assert payload["iteration"] == 3 and payload["config"]["problem"] == "quadratic"
    _assert_same_weights(LSTMOptimizer.load(run / "rule-last.pt"), payload["model"])
    # rule.pt: the rule of the evaluation with the lowest validation loss, among those every
    # --eval-every (2) epochs: here epoch 2's, not the last (3), so it differs from rule-last.pt
    evaluated = {int(r["epoch"]): float(r["eval_loss"]) for r in rows
                 if r["eval_loss"] and int(r["epoch"]) % 2 == 0}
    selected = min(evaluated, key=evaluated.__getitem__)
    best = payload["extra"]["best"]
    assert selected == 2 and best["epoch"] == 2 and best["loss"] == evaluated[2]
    _assert_same_weights(LSTMOptimizer.load(run / "rule.pt"), best["state"])
    assert any(not torch.equal(best["state"][k], v) for k, v in payload["model"].items())

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == [4, 8] and summary["resumed_from"] is None
    assert summary["selected_epoch"] == selected
    assert summary["selected_validation_loss"] == evaluated[selected]
    assert list(summary["results"]) == [*lstm_runs.BASELINES, lstm_runs.LEARNED,
                                        lstm_runs.LAST_EPOCH]
    assert (summary["results"][lstm_runs.LEARNED]["curve"]
            != summary["results"][lstm_runs.LAST_EPOCH]["curve"])
    for r in summary["results"].values():
        assert len(r["curve"]) == 9  # steps 0..8
        assert r["loss"]["4"]["mean"] == pytest.approx(r["curve"][4])
        assert r["loss"]["8"]["n"] + r["loss"]["8"]["diverged"] == 4
        if r["lr"] is not None:  # a baseline
            finals = {float(lr): v for lr, v in r["tuning_final"].items()}
            assert sorted(finals) == sorted(lstm_runs.LR_GRID)
            assert all(v is None or math.isfinite(v) for v in finals.values())  # JSON: no NaN
            assert r["lr"] == min((lr for lr in finals if finals[lr] is not None),
                                  key=finals.__getitem__)
    # every method starts from the same held-out problems
    assert len({r["curve"][0] for r in summary["results"].values()}) == 1
    pytest.importorskip("matplotlib")
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_eval_of_a_run_reports_the_held_out_loss_of_its_summary(run, capsys):
    summary = json.loads((run / "summary.json").read_text())
    assert main(["eval", str(run / "checkpoint.pt")]) == 0
    out = capsys.readouterr().out
    assert (f"epoch {summary['selected_epoch']}'s rule, the best on validation (loss "
            f"{summary['selected_validation_loss']:.4f})") in out
    for step in (4, 8):
        loss = summary["results"][lstm_runs.LEARNED]["loss"][str(step)]["mean"]
        assert f"after {step} step(s): loss {loss:.4f}" in out
    assert main(["eval", str(run / "checkpoint.pt"), "--steps", "1", "--tasks", "2"]) == 0
    assert "on 2 held-out problems" in capsys.readouterr().out


def _assert_resumed_exactly(straight, resumed, rows_before, epochs):
    """``resumed`` (interrupted after ``len(rows_before)`` epochs, then resumed) ended where the
    uninterrupted run ``straight`` did. The interruption must fall on a multiple of
    --eval-every: a run always evaluates after its last epoch, here the interrupted one."""
    _assert_same_state(load_checkpoint(straight / "checkpoint.pt"),
                       load_checkpoint(resumed / "checkpoint.pt"))
    a, b = _rows(straight), _rows(resumed)
    assert [int(r["epoch"]) for r in b] == list(range(1, epochs + 1))
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k != "seconds"} == \
            {k: v for k, v in rb.items() if k != "seconds"}
    assert b[:len(rows_before)] == rows_before  # kept as written, not recomputed
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((resumed / "summary.json").read_text())
    # it did resume: only the epochs after the checkpoint were trained again
    assert sb["resumed_from"] == len(rows_before)
    for name in sa["results"]:
        assert sa["results"][name]["curve"] == sb["results"][name]["curve"]


def test_resume_continues_exactly_where_the_run_stopped(run, tmp_path):
    interrupted = _train(tmp_path / "resumed", 2)
    rows_before = _rows(interrupted)
    resumed = _train(tmp_path / "resumed", 3, "--resume")
    _assert_resumed_exactly(run, resumed, rows_before, 3)


def test_resume_continues_exactly_on_the_digits(tmp_path, monkeypatch):
    """The digits problems also draw every minibatch from the run's generator."""
    monkeypatch.setattr(lstm_runs, "LR_GRID", [0.1, 1.0])  # the tuning is not under test here
    straight = _train(tmp_path / "straight", 2, tiny=TINY_DIGITS)
    interrupted = _train(tmp_path / "resumed", 1, tiny=TINY_DIGITS)
    rows_before = _rows(interrupted)
    resumed = _train(tmp_path / "resumed", 2, "--resume", tiny=TINY_DIGITS)
    _assert_resumed_exactly(straight, resumed, rows_before, 2)


def test_resume_drops_the_rows_written_after_the_checkpoint(run, tmp_path):
    """A crash after an epoch's metrics row but before its checkpoint: the row is written
    again on resume, once."""
    out = _train(tmp_path / "crashed", 2)
    at_two = (out / "checkpoint.pt").read_bytes()
    _train(out, 3, "--resume")
    (out / "checkpoint.pt").write_bytes(at_two)
    _train(out, 3, "--resume")
    assert [int(r["epoch"]) for r in _rows(out)] == [1, 2, 3]
    _assert_same_state(load_checkpoint(run / "checkpoint.pt"),
                       load_checkpoint(out / "checkpoint.pt"))


def test_the_run_trains_as_meta_train_does(tmp_path):
    """The run's loop is lstm_training.meta_train plus checkpoints: same rule, same losses."""
    out = _train(tmp_path / "run", 2)
    torch.manual_seed(3)
    rule = LSTMOptimizer(impl="reference")
    history = meta_train(rule, lambda g: QuadraticProblems(4, generator=g), epochs=2, horizon=4,
                         unroll_steps=2, lr=1e-3, seed=3)
    payload = load_checkpoint(out / "checkpoint.pt")
    for key, value in rule.state_dict().items():
        torch.testing.assert_close(payload["model"][key], value, rtol=0, atol=0)
    assert [float(r["meta_loss"]) for r in _rows(out)] == history


def test_the_outer_lr_decays_as_in_meta_train_and_resumes_across_the_decay(tmp_path):
    decay = ["--outer-lr-decay-epoch", "2", "--outer-lr-decay-factor", "0.5"]
    straight = _train(tmp_path / "straight", 3, *decay)
    rules = {}
    for name, factor in (("decayed", 0.5), ("constant", 1.0)):
        torch.manual_seed(3)
        rules[name] = LSTMOptimizer(impl="reference")
        meta_train(rules[name], lambda g: QuadraticProblems(4, generator=g), epochs=3,
                   horizon=4, unroll_steps=2, lr=1e-3, lr_decay_epoch=2,
                   lr_decay_factor=factor, seed=3)
    payload = load_checkpoint(straight / "checkpoint.pt")
    assert payload["config"]["outer_lr_decay_epoch"] == 2
    for key, value in rules["decayed"].state_dict().items():
        torch.testing.assert_close(payload["model"][key], value, rtol=0, atol=0)
    assert any(not torch.equal(payload["model"][k], v)
               for k, v in rules["constant"].state_dict().items())
    # Stopped before the decay (after epochs 0 and 1), resumed into it: the same run.
    interrupted = _train(tmp_path / "resumed", 2, *decay)
    rows_before = _rows(interrupted)
    resumed = _train(tmp_path / "resumed", 3, *decay, "--resume")
    _assert_resumed_exactly(straight, resumed, rows_before, 3)


def test_outer_lr_schedule():
    from fastmeta.meta.lstm_training import outer_lr_at

    assert [outer_lr_at(e, 1e-3, 2, 0.5) for e in range(4)] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert outer_lr_at(10**6, 1e-3, None, 0.5) == 1e-3
    for problem in lstm_runs.FAMILIES:
        config = lstm_runs.default_config(problem=problem)
        assert (config["outer_lr_decay_epoch"], config["outer_lr_decay_factor"]) == (None, 1.0)


@pytest.mark.parametrize("argv, message", [
    (["lstm-opt", "--inner-lr", "0.1"], "--inner-lr: this option applies to maml and cavia"),
    (["lstm-opt", "--outer-lr-decay-factor", "1.5"],
     "outer_lr_decay_factor must be a number in (0, 1], got 1.5"),
    (["lstm-opt", "--outer-lr-decay-epoch", "0"],
     "outer_lr_decay_epoch must be None or an int >= 1, got 0"),
    (["maml", "--outer-lr-decay-epoch", "3"], "--outer-lr-decay-epoch: this option applies to "
                                              "lstm-opt only"),
    (["lstm-opt", "--task", "digits", "--iterations", "5"], "--task, --iterations: these"),
    (["maml", "--horizon", "10"], "--horizon: this option applies to lstm-opt only"),
    (["cavia", "--problem", "digits", "--second-order"], "--problem, --second-order"),
    (["lstm-opt", "--horizon", "30", "--unroll", "20"], "horizon (30) must be a multiple of "
                                                        "unroll (20)"),
    (["lstm-opt", "--epochs", "0"], "epochs must be an int >= 1, got 0"),
    (["lstm-opt", "--hidden", "-2"], "hidden must be an int >= 1"),
    (["lstm-opt", "--outer-lr", "0"], "outer_lr must be a finite number > 0"),
])
def test_bad_arguments_are_refused_by_name(tmp_path, capsys, argv, message):
    assert main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_unknown_problem_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "lstm-opt", "--problem", "mnist"])
    assert exc.value.code == 2
    assert "--problem" in capsys.readouterr().err


def test_a_diverged_tuning_lr_is_null_not_nan_in_the_results():
    """NaN is not JSON: the final tuning loss of an lr that diverged is None."""
    rule = LSTMOptimizer()
    results = lstm_runs.compare_with_baselines(rule, "quadratic", problems=2, tune_steps=3,
                                               steps=3, lr_grid=[0.01, 1e6])
    for name in lstm_runs.BASELINES:
        assert results[name]["lr"] == 0.01
    assert results["SGD"]["tuning_final"][1e6] is None
    json.dumps({name: {k: v for k, v in r.items() if k != "losses"}
                for name, r in results.items()}, allow_nan=False)


def test_eval_refuses_shots_for_a_rule(run, capsys):
    assert main(["eval", str(run / "checkpoint.pt"), "--shots", "5"]) == 2
    assert "--shots applies to maml and cavia" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--hidden", "6"], "trained with hidden=20, this run asks for hidden=6"),
    (["--problem", "digits"], "trained with problem='quadratic', this run asks for "
                              "problem='digits'"),
    (["--unroll", "4"], "trained with unroll=2, this run asks for unroll=4"),
    (["--eval-tasks", "3"], "trained with eval_tasks=4, this run asks for eval_tasks=3"),
    (["--outer-lr-decay-factor", "0.5"], "trained with outer_lr_decay_factor=1.0, this run "
                                         "asks for outer_lr_decay_factor=0.5"),
])
def test_resume_from_another_run_is_refused(run, tmp_path, capsys, extra, message):
    out = _copy(run, tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    assert main(["train", "lstm-opt", *TINY, "--epochs", "4", "--out", str(out), *extra,
                 "--resume"]) == 2
    assert message in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_maml_checkpoint_is_refused(run, tmp_path, capsys):
    out = _copy(run, tmp_path)
    payload = load_checkpoint(out / "checkpoint.pt")
    payload["config"] = {"algorithm": "maml", "task": "sinusoid"}
    save_checkpoint(out / "checkpoint.pt", payload)
    assert main(["train", "lstm-opt", *TINY, "--epochs", "4", "--out", str(out),
                 "--resume"]) == 2
    assert "a checkpoint of a 'maml' run, not of an lstm-opt run" in capsys.readouterr().err


def test_weights_that_do_not_fit_the_config_are_refused(run, tmp_path):
    out = _copy(run, tmp_path)
    payload = load_checkpoint(out / "checkpoint.pt")
    payload["config"]["hidden"] = 6  # the saved weights are those of 20 units
    save_checkpoint(out / "checkpoint.pt", payload)
    with pytest.raises(CheckpointError, match="does not fit the architecture"):
        lstm_runs.load_trained(out / "checkpoint.pt")
    config = lstm_runs.default_config(**{**payload["config"], "epochs": 4, "out": str(out)})
    with pytest.raises(CheckpointError, match="does not fit the architecture"):
        lstm_runs.train(config, resume=True, quiet=True)


def test_best_on_validation_keeps_the_rule_of_the_lowest_finite_loss():
    torch.manual_seed(0)
    rule, best = LSTMOptimizer(4), lstm_runs.BestOnValidation()
    assert best.selected(rule) is rule  # nothing kept yet
    assert best.offer(rule, 2.0, 10)
    kept = {k: v.clone() for k, v in rule.state_dict().items()}
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(1.0)
    assert not best.offer(rule, float("nan"), 20)
    assert not best.offer(rule, float("inf"), 30)
    assert not best.offer(rule, 2.0, 40)  # a tie keeps the earlier rule
    assert not best.offer(rule, 3.0, 50)
    assert (best.loss, best.epoch) == (2.0, 10)
    chosen = best.selected(rule)
    assert chosen is not rule
    _assert_same_weights(chosen, kept)
    rule.load_state_dict(kept)  # the kept copy does not alias the live weights
    with torch.no_grad():
        for p in rule.parameters():
            p.mul_(0.0)
    _assert_same_weights(best.selected(rule), kept)
    assert best.offer(rule, 1.5, 60) and best.epoch == 60
    again = lstm_runs.BestOnValidation.from_payload(best.to_payload())
    assert (again.loss, again.epoch) == (1.5, 60)
    _assert_same_weights(again.selected(rule), rule.state_dict())
    empty = lstm_runs.BestOnValidation.from_payload(None)
    assert (empty.loss, empty.epoch, empty.state) == (math.inf, None, None)
    fresh = lstm_runs.BestOnValidation.from_payload(lstm_runs.BestOnValidation().to_payload())
    assert (fresh.loss, fresh.epoch, fresh.state) == (math.inf, None, None)
    good = best.to_payload()
    for damaged in ({"loss": "low"}, [1.5, 60], {**good, "epoch": "60"}, {**good, "epoch": True},
                    {**good, "epoch": -1}, {**good, "epoch": None}, {**good, "state": None}):
        with pytest.raises(CheckpointError, match="best-on-validation record is damaged"):
            lstm_runs.BestOnValidation.from_payload(damaged)


def test_a_checkpoint_without_a_best_record_resumes_and_evaluates_its_last_rule(run, tmp_path):
    """Checkpoints written before the best-on-validation record existed."""
    out = _copy(run, tmp_path)
    payload = load_checkpoint(out / "checkpoint.pt")
    del payload["extra"]["best"]
    save_checkpoint(out / "checkpoint.pt", payload)
    rule, _ = lstm_runs.load_trained(out / "checkpoint.pt")
    _assert_same_weights(rule, payload["model"])
    assert lstm_runs.load_selection(out / "checkpoint.pt").epoch is None
    _train(out, 4, "--resume")
    assert load_checkpoint(out / "checkpoint.pt")["extra"]["best"]["epoch"] == 4


def test_a_damaged_best_record_is_refused(run, tmp_path):
    out = _copy(run, tmp_path)
    payload = load_checkpoint(out / "checkpoint.pt")
    payload["extra"]["best"]["state"] = {"not": torch.zeros(1)}
    save_checkpoint(out / "checkpoint.pt", payload)
    with pytest.raises(CheckpointError, match="best-on-validation rule does not fit"):
        lstm_runs.load_trained(out / "checkpoint.pt")
    payload["extra"]["best"] = {"loss": None}
    save_checkpoint(out / "checkpoint.pt", payload)
    with pytest.raises(CheckpointError, match="best-on-validation record is damaged"):
        lstm_runs.load_trained(out / "checkpoint.pt")


def test_corrupt_checkpoint_is_reported_and_never_loaded(run, tmp_path, capsys):
    out = _copy(run, tmp_path)
    ckpt = out / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    metrics = (out / "metrics.csv").read_bytes()
    assert main(["train", "lstm-opt", *TINY, "--epochs", "4", "--out", str(out),
                 "--resume"]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert ckpt.read_bytes() == bytes(data)  # not overwritten by a fresh run
    assert (out / "metrics.csv").read_bytes() == metrics
    assert main(["eval", str(ckpt)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_resume_without_checkpoint_is_refused(tmp_path, capsys):
    assert main(["train", "lstm-opt", *TINY, "--epochs", "2", "--out", str(tmp_path / "none"),
                 "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


class _Trap:
    """Unpickling it opens (creates) a file: what a hostile checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_checkpoints_load_with_weights_only_and_pickled_code_is_refused(run, tmp_path, capsys):
    envelope = torch.load(run / "checkpoint.pt", weights_only=True)
    assert envelope["payload"]["config"]["algorithm"] == "lstm-opt"

    out = tmp_path / "hostile"
    out.mkdir()
    marker = tmp_path / "marker"
    torch.save({"format": "fastmeta-checkpoint", "version": 1, "payload": _Trap(marker)},
               out / "checkpoint.pt")
    assert main(["train", "lstm-opt", *TINY, "--epochs", "2", "--out", str(out),
                 "--resume"]) == 2
    assert main(["eval", str(out / "checkpoint.pt")]) == 2
    assert "was not loaded" in capsys.readouterr().err
    assert not marker.exists()
    torch.load(out / "checkpoint.pt", weights_only=False)  # the trap is real:
    assert marker.exists()  # a full unpickle would have run it


def test_without_matplotlib_the_plot_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    out = _train(tmp_path / "run", 1)
    assert "matplotlib is not installed: not writing curves.png" in capsys.readouterr().err
    assert (out / "summary.json").exists() and not (out / "curves.png").exists()


class _NaNProblems:
    """Problems whose loss is NaN: the meta-loss cannot be finite."""

    def __init__(self, n, generator):
        self.theta0 = torch.randn(n, 3, generator=generator)

    def loss(self, theta):
        return theta.square().sum(-1) * float("nan")


def test_a_non_finite_meta_loss_stops_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(lstm_runs.FAMILIES, "quadratic",
                        lstm_runs.ProblemFamily(_NaNProblems, 4, 4, 2))
    out = tmp_path / "run"
    assert main(["train", "lstm-opt", *TINY, "--epochs", "2", "--out", str(out)]) == 1
    assert "the meta-loss is not finite at epoch 1, truncation 1" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()
