"""Shared meta-training machinery: seeding, atomic and verified checkpoints, CSV metrics,
progress, and mean ± 95% CI."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch

from fastmeta.meta import training
from fastmeta.meta.networks import MLP
from fastmeta.meta.training import (
    CheckpointError,
    MetricsWriter,
    Progress,
    checkpoint_payload,
    load_checkpoint,
    mean_ci,
    read_metrics,
    restore,
    save_checkpoint,
    seed_everything,
)
from fastmeta.optim import Adam
from fastmeta.tasks import SinusoidTasks


def _draws():
    legacy_numpy = np.random.rand(3).tolist()  # noqa: NPY002 - the global RNG is under test
    return torch.rand(3).tolist(), legacy_numpy, [random.random() for _ in range(3)]


def test_seed_everything_repeats_all_rngs():
    seed_everything(7)
    first = _draws()
    seed_everything(7)
    assert _draws() == first
    seed_everything(8)
    assert _draws() != first


def _trained_state(tmp_path):
    """A model and outer optimizer after two steps, and a seeded task sampler."""
    seed_everything(0)
    model = MLP()
    opt = Adam(model.parameters(), lr=1e-3)
    tasks = SinusoidTasks(seed=1)
    for _ in range(2):
        ep = tasks.sample(4, 5)
        loss = torch.nn.functional.mse_loss(model(ep.support_x), ep.support_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt, tasks


def _continue(model, opt, tasks):
    """What a resumed run does next: sample tasks, draw from every global RNG, take a step."""
    ep = tasks.sample(4, 5)
    loss = torch.nn.functional.mse_loss(model(ep.support_x), ep.support_y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return ep.support_x.clone(), _draws(), [p.detach().clone() for p in model.parameters()]


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    model, opt, tasks = _trained_state(tmp_path)
    config = {"task": "sinusoid", "shots": 5, "inner_lr": 0.01, "first_order": False,
              "hidden": [40, 40], "out": None}
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, checkpoint_payload(iteration=2, model=model, optimizer=opt,
                                             config=config, tasks=tasks, best_val=0.5))
    expected = _continue(model, opt, tasks)

    # a fresh process: different weights, fresh optimizer, fresh sampler, scrambled RNGs
    seed_everything(123)
    model2 = MLP()
    opt2 = Adam(model2.parameters(), lr=1e-3)
    tasks2 = SinusoidTasks(seed=99)
    payload = load_checkpoint(path)
    assert payload["config"] == config
    assert payload["extra"]["best_val"] == 0.5
    assert restore(payload, model=model2, optimizer=opt2, tasks=tasks2) == 2
    actual = _continue(model2, opt2, tasks2)
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=0)
    assert actual[1] == expected[1]
    for a, b in zip(actual[2], expected[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_file_mode(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"iteration": 0})
    assert path.stat().st_mode & 0o777 == training.NEW_FILE_MODE
    path.chmod(0o600)
    save_checkpoint(path, {"iteration": 1})
    assert path.stat().st_mode & 0o777 == 0o600


def test_checkpoint_is_a_weights_only_torch_file(tmp_path):
    model, opt, _ = _trained_state(tmp_path)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, checkpoint_payload(iteration=2, model=model, optimizer=opt))
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == training.CHECKPOINT_FORMAT
    assert raw["version"] == training.CHECKPOINT_VERSION
    assert set(raw["payload"]) == {"iteration", "model", "optimizer", "config", "rng", "extra"}


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"iteration": 1, "w": torch.ones(3)})
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half the file, then die
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(training.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"iteration": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


def test_crash_before_rename_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"iteration": 1})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(training.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_corrupt_checkpoint_is_reported_not_loaded(tmp_path, damage):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"iteration": 3, "w": torch.arange(4096, dtype=torch.float32)})
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "flip":
        i = data.find(np.arange(4096, dtype=np.float32)[1000:1004].tobytes())
        assert i > 0
        data[i] ^= 0xFF
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"\x00garbage" * 100)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_checksum_mismatch_is_reported(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"iteration": 3, "w": torch.ones(4)})
    envelope = torch.load(path, weights_only=True)
    envelope["payload"]["w"][0] = 2.0  # a valid torch file whose contents changed
    torch.save(envelope, path)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_foreign_or_future_checkpoints_are_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="not a fastmeta checkpoint"):
        load_checkpoint(path)
    save_checkpoint(path, {"iteration": 0})
    envelope = torch.load(path, weights_only=True)
    envelope["version"] = training.CHECKPOINT_VERSION + 1
    torch.save(envelope, path)
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_rejects_values_weights_only_cannot_load(tmp_path):
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint(tmp_path / "ckpt.pt", {"fn": print})
    assert not list(tmp_path.iterdir())


def test_restore_reports_missing_state(tmp_path):
    payload = checkpoint_payload(iteration=1)
    with pytest.raises(CheckpointError, match="no model"):
        restore(payload, model=MLP())
    with pytest.raises(CheckpointError, match="'tasks'"):
        restore(payload, tasks=SinusoidTasks(seed=0))


def test_metrics_resume_drops_rows_past_checkpoint(tmp_path):
    path = tmp_path / "metrics.csv"
    fields = ["iteration", "loss", "val_mse"]
    with MetricsWriter(path, fields) as log:
        for it in range(1, 6):
            log.write({"iteration": it, "loss": 1.0 / it})
    # the run crashed after iteration 5; its last checkpoint was at iteration 3
    with MetricsWriter(path, fields, resume_from=3) as log:
        for it in range(4, 8):
            log.write({"iteration": it, "loss": 2.0 / it, "val_mse": 0.1})
    rows = read_metrics(path)
    assert [int(r["iteration"]) for r in rows] == list(range(1, 8))
    assert float(rows[2]["loss"]) == pytest.approx(1 / 3)
    assert float(rows[3]["loss"]) == pytest.approx(2 / 4)
    assert rows[0]["val_mse"] == "" and rows[5]["val_mse"] == "0.1"


def test_metrics_fresh_run_starts_over_and_resume_without_file(tmp_path):
    path = tmp_path / "metrics.csv"
    with MetricsWriter(path, ["iteration", "loss"]) as log:
        log.write({"iteration": 1, "loss": 1})
    with MetricsWriter(path, ["iteration", "loss"]) as log:
        log.write({"iteration": 1, "loss": 5})
    assert [r["loss"] for r in read_metrics(path)] == ["5"]
    other = tmp_path / "sub" / "new.csv"
    with MetricsWriter(other, ["iteration", "loss"], resume_from=10) as log:
        log.write({"iteration": 11, "loss": 0})
    assert [r["iteration"] for r in read_metrics(other)] == ["11"]


def test_metrics_errors(tmp_path):
    path = tmp_path / "metrics.csv"
    with MetricsWriter(path, ["iteration", "loss"]) as log:
        with pytest.raises(ValueError):
            log.write({"iteration": 1, "accuracy": 0.5})
    with pytest.raises(ValueError, match="columns"):
        MetricsWriter(path, ["iteration", "accuracy"], resume_from=1)
    with pytest.raises(ValueError, match="step_key"):
        MetricsWriter(path, ["loss"])


def test_progress_plain_shows_running_loss():
    out = io.StringIO()
    with Progress(4, use_tqdm=False, file=out, every_s=0, desc="maml") as bar:
        for loss in (4.0, 2.0, 0.0):
            bar.update(loss=loss)
        bar.update(val_mse=0.25)
    lines = out.getvalue().splitlines()
    assert lines[0] == "maml 1/4 loss=4"
    assert lines[-1] == "maml 4/4 loss=2 val_mse=0.25"
    assert bar.running_loss == 2.0


def test_progress_plain_throttles_and_resumes():
    out = io.StringIO()
    with Progress(1000, initial=990, use_tqdm=False, file=out, every_s=3600) as bar:
        for _ in range(10):
            bar.update(loss=1.0)
    assert out.getvalue().splitlines() == ["meta-train 991/1000 loss=1",
                                           "meta-train 1000/1000 loss=1"]


def test_progress_running_window():
    bar = Progress(500, disable=True)
    for i in range(training.RUNNING_WINDOW + 50):
        bar.update(loss=0.0 if i < 50 else 1.0)
    assert bar.running_loss == 1.0


def test_progress_tqdm_shows_running_loss():
    pytest.importorskip("tqdm", reason="tqdm is not installed")
    out = io.StringIO()
    with Progress(3, use_tqdm=True, file=out) as bar:
        bar.update(loss=0.5)
        bar.update(loss=1.5)
        bar.update(loss=1.0)
    assert "loss=1" in out.getvalue() and "3/3" in out.getvalue()


def test_mean_ci():
    values = [1.0, 2.0, 3.0, 4.0]
    est = mean_ci(values)
    assert est.mean == 2.5 and est.n == 4
    assert est.ci == pytest.approx(1.959964 * np.std(values, ddof=1) / 2, rel=1e-6)
    assert mean_ci(torch.tensor(values)) == est
    assert mean_ci(np.array(values)) == est
    assert mean_ci(values, confidence=0.99).ci > est.ci
    assert "2.5 ±" in str(est)
    assert math.isnan(mean_ci([3.0]).ci)
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            mean_ci(bad)
    with pytest.raises(ValueError, match="confidence"):
        mean_ci(values, confidence=95)
