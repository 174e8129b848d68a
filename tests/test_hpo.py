"""fastmeta.hpo: the unrolled hypergradient against eager autograd, the reparametrization, bad
input, the failure path, the Optuna baselines and ``fastmeta hpo`` end to end. Tiny budgets:
these assert behaviour, not the quality of a search."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

from fastmeta import backends, hpo
from fastmeta.backends import Impl
from fastmeta.cli import main
from fastmeta.flat import FlatLayout
from tests.conftest import impl_param

# The bound for the hypergradient against the eager implementation, in float64.
HYPERGRAD_RTOL = 1e-5


def _tiny_task(steps: int = 6, dtype: torch.dtype = torch.float32) -> hpo.HPOTask:
    """A 5-4-3 tanh MLP on a fixed random 3-class problem (the MLP can fit it)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g)

    def split(n: int):
        x = torch.randn(n, 5, generator=g, dtype=torch.float64).to(dtype)
        return x, (x.double() @ w.double()).argmax(1)

    def make_model() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)

    return hpo.HPOTask("tiny", make_model, split(64), split(32), split(32), steps=steps,
                       batch_size=16)


def _hypergrads(task: hpo.HPOTask, z: torch.Tensor, *, segments: int, unroll: int):
    """The hypergradient of each of ``segments`` truncated segments, carrying the state, by
    the fused path and by eager autograd; returns both lists and the final params."""
    model = task.model(0)
    layout = FlatLayout.of(model)
    groups = hpo.layer_groups(model)
    reparam = hpo.Reparametrization(len(groups))
    index = hpo._layer_index(layout, groups)
    theta = layout.flatten(model).requires_grad_()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    layer_of = {n: i for i, names in enumerate(groups) for n in names}
    buffer, buffers = None, None
    batches = task.batches(1)
    fused, eager = [], []
    for _ in range(segments):
        chunk = [(task.train[0][i], task.train[1][i]) for i in (next(batches)
                                                                 for _ in range(unroll))]
        zf = z.clone().requires_grad_()
        lr, mu, wd = reparam.decode(zf)
        val, theta_k, buffer_k = hpo.unrolled_validation_loss(
            model, layout, theta, buffer, lr[index], mu, wd, chunk, task.val)
        fused.append((val.detach(), torch.autograd.grad(val, zf)[0]))

        ze = z.clone().requires_grad_()
        lr, mu, wd = reparam.decode(ze)
        val_e, params_k, buffers_k = hpo.unrolled_validation_loss_reference(
            model, params, buffers, {n: lr[layer_of[n]] for n in params}, mu, wd, chunk,
            task.val)
        eager.append((val_e.detach(), torch.autograd.grad(val_e, ze)[0]))

        theta, buffer = theta_k.detach().requires_grad_(), buffer_k.detach()
        params = {n: p.detach().requires_grad_() for n, p in params_k.items()}
        buffers = {n: b.detach() for n, b in buffers_k.items()}
    return fused, eager, layout.views(theta), params


@pytest.mark.parametrize("impl", [impl_param("native"), "reference"])
def test_hypergradient_matches_eager_autograd(impl, monkeypatch):
    monkeypatch.setenv("FASTMETA_IMPL", impl)
    task = _tiny_task(dtype=torch.float64)
    reparam = hpo.Reparametrization(2)
    z = reparam.encode(hpo.SGDHyperparameters((0.3, 0.1), 0.7, 1e-2), dtype=torch.float64)
    # Two segments: the first starts a run (b_1 = d_1), the second carries θ and b.
    with backends.trace() as calls:
        fused, eager, theta, params = _hypergrads(task, z, segments=2, unroll=5)
    assert ("momentum", Impl(impl)) in calls or ("sgd_step", Impl(impl)) in calls, calls
    for (val_f, g_f), (val_e, g_e) in zip(fused, eager):
        torch.testing.assert_close(val_f, val_e, rtol=1e-12, atol=0)
        assert g_e.abs().min() > 0, "every hyperparameter must get a gradient"
        torch.testing.assert_close(g_f, g_e, rtol=HYPERGRAD_RTOL, atol=0)
    for name, p in params.items():
        torch.testing.assert_close(theta[name], p.detach(), rtol=1e-12, atol=1e-14)


def test_hypergradient_matches_finite_differences():
    """The eager oracle itself: the gradient w.r.t. z against central differences."""
    task = _tiny_task(dtype=torch.float64)
    reparam = hpo.Reparametrization(2)
    z = reparam.encode(hpo.SGDHyperparameters((0.3, 0.1), 0.7, 1e-2), dtype=torch.float64)
    fused, _, _, _ = _hypergrads(task, z, segments=1, unroll=4)
    eps = 1e-6
    for i in range(z.numel()):
        e = torch.zeros_like(z)
        e[i] = eps
        plus, _, _, _ = _hypergrads(task, z + e, segments=1, unroll=4)
        minus, _, _, _ = _hypergrads(task, z - e, segments=1, unroll=4)
        numeric = (plus[0][0] - minus[0][0]) / (2 * eps)
        torch.testing.assert_close(fused[0][1][i], numeric, rtol=1e-5, atol=1e-9)


def test_reparametrization_round_trips_and_stays_in_the_box():
    space = hpo.SearchSpace()
    reparam = hpo.Reparametrization(3, space)
    hp = hpo.SGDHyperparameters((1e-3, 0.02, 0.5), 0.9, 3e-5)
    back = reparam.hyperparameters(reparam.encode(hp, dtype=torch.float64))
    assert back.lr == pytest.approx(hp.lr, rel=1e-12)
    assert back.momentum == pytest.approx(hp.momentum, rel=1e-12)
    assert back.weight_decay == pytest.approx(hp.weight_decay, rel=1e-12)
    z = torch.tensor([-1e4, 0.0, 1e4, 50.0, -50.0], dtype=torch.float64)
    z = torch.cat([z, torch.randn(1000, dtype=torch.float64) * 30]).view(-1, 5)
    for row in z:
        lr, mu, wd = reparam.decode(row)
        assert ((lr >= space.lr[0]) & (lr <= space.lr[1])).all()
        assert space.momentum[0] <= mu <= space.momentum[1]
        assert space.weight_decay[0] <= wd <= space.weight_decay[1]


@pytest.mark.parametrize("hp, match", [
    (hpo.SGDHyperparameters((0.0, 0.1), 0.5, 1e-4), r"lr\[0\] must be a finite number > 0"),
    (hpo.SGDHyperparameters((0.1, -0.1), 0.5, 1e-4), r"lr\[1\] must be a finite number > 0"),
    (hpo.SGDHyperparameters((0.1, 0.1), 1.0, 1e-4), r"momentum must lie in \[0, 1\)"),
    (hpo.SGDHyperparameters((0.1, 0.1), -0.1, 1e-4), r"momentum must lie in \[0, 1\)"),
    (hpo.SGDHyperparameters((0.1, 0.1), 0.5, -1.0), r"weight_decay must be a finite number"),
    (hpo.SGDHyperparameters((0.1,), 0.5, 1e-4), r"lr has 1 value\(s\) but the model has 2"),
    (hpo.SGDHyperparameters((5.0, 0.1), 0.5, 1e-4), r"lr\[0\]=5.0 must lie strictly inside"),
    (hpo.SGDHyperparameters((0.1, 0.1), 0.0, 1e-4), r"momentum=0.0 must lie strictly inside"),
])
def test_bad_hyperparameters_are_refused(hp, match):
    with pytest.raises(ValueError, match=match):
        hpo.hypergrad_search(_tiny_task(), max_runs=1, initial=hp)


def test_bad_search_options_are_refused():
    task = _tiny_task()
    with pytest.raises(ValueError, match="give a budget"):
        hpo.hypergrad_search(task)
    with pytest.raises(ValueError, match="hyper_lr must be"):
        hpo.hypergrad_search(task, max_runs=1, hyper_lr=0.0)
    with pytest.raises(ValueError, match="unroll must be"):
        hpo.search(task, "hypergrad", max_runs=1, unroll=0)
    with pytest.raises(ValueError, match="method must be one of"):
        hpo.search(task, "grid", max_runs=1)
    with pytest.raises(ValueError, match="momentum must lie in"):
        hpo.SearchSpace(momentum=(0.0, 1.0))
    with pytest.raises(ValueError, match="log scale"):
        hpo.SearchSpace(weight_decay=(0.0, 0.1))
    with pytest.raises(ValueError, match="momentum must lie in"):
        hpo.train_run(task, hpo.SGDHyperparameters((0.1, 0.1), 1.5, 0.0), seed=0)


def test_hypergrad_search_improves_and_counts(monkeypatch):
    task = _tiny_task(steps=8)
    result = hpo.hypergrad_search(task, max_runs=9, seed=0, unroll=4, hyper_lr=0.2)
    assert result.training_runs == 9  # the start, then 4 rounds and their scored runs
    assert result.notes["hyper_steps"] == 8
    assert result.train_steps == 9 * task.steps
    losses = [h["val_loss"] for h in result.history]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert result.best_val_loss == min(losses) < losses[0]
    assert result.nonfinite == 0 and 0 <= result.test_accuracy <= 1


def test_nonfinite_validation_loss_is_reported_and_the_search_goes_on(monkeypatch):
    calls = {"n": 0}
    real = hpo._validation_loss

    def fails_once(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        # Call 1 is the scored starting run; call 2 is the first unrolled hyper-step.
        return loss * math.nan if calls["n"] == 2 else loss

    monkeypatch.setattr(hpo, "_validation_loss", fails_once)
    messages = []
    task = _tiny_task(steps=8)
    result = hpo.hypergrad_search(task, max_runs=7, unroll=4, hyper_lr=0.2,
                                  progress=messages.append)
    assert result.nonfinite == 1
    assert any("non-finite validation loss" in m and "halved to 0.1" in m for m in messages)
    assert result.notes["hyper_lr_final"] == pytest.approx(0.1)
    # The failed round ended at once; the two later rounds took their 2 hyper-steps each.
    assert result.notes["hyper_steps"] == 4
    assert result.training_runs == 7 and result.best_val_loss is not None


def test_nonfinite_training_run_is_recorded_not_raised():
    task = _tiny_task()
    task.train[0][0, 0] = math.inf  # every run that sees example 0 diverges
    run = hpo.train_run(task, hpo.SGDHyperparameters((0.1, 0.1), 0.5, 1e-4), seed=0)
    assert run.val_loss is None and run.test_accuracy is None


@pytest.mark.parametrize("method", hpo.OPTUNA_METHODS)
def test_optuna_baselines_run(method):
    pytest.importorskip("optuna")
    if method == "cmaes":
        pytest.importorskip("cmaes")
    result = hpo.optuna_search(_tiny_task(), method, max_runs=4, seed=0)
    assert result.training_runs == 4 and len(result.history) == 4
    assert result.best_val_loss == min(h["val_loss"] for h in result.history)
    space = hpo.SearchSpace()
    for h in result.history:
        hp = h["hyperparameters"]
        assert all(space.lr[0] <= v <= space.lr[1] for v in hp["lr"])
        assert space.momentum[0] <= hp["momentum"] <= space.momentum[1]


def test_missing_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "fastmeta\[hpo\]"'):
        hpo.optuna_search(_tiny_task(), "tpe", max_runs=1)


def test_cli_missing_optuna(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert main(["hpo", "--method", "random", "--budget", "1", "--out", str(tmp_path)]) == 2
    assert 'pip install "fastmeta[hpo]"' in capsys.readouterr().err


def test_cli_end_to_end(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(hpo.TASKS, "digits-mlp", lambda seed: _tiny_task(steps=8))
    methods = ["hypergrad"] + (["random"] if _has("optuna") else [])
    for method in methods:
        extra = ["--unroll", "4"] if method == "hypergrad" else []
        assert main(["hpo", "--task", "digits-mlp", "--method", method, "--budget", "0.5",
                     "--out", str(tmp_path), *extra]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary["results"]) == sorted(f"{m}-seed0" for m in methods)
    for r in summary["results"].values():
        assert r["training_runs"] >= 1 and r["best_val_loss"] is not None
        assert r["method"] in out
    assert "best val loss" in out and "training runs" in out
    if _has("matplotlib"):
        assert (tmp_path / "hpo.png").stat().st_size > 0
    assert main(["hpo", "--method", "random", "--budget", "1", "--unroll", "4",
                 "--out", str(tmp_path)]) == 2
    assert "--unroll applies to the hypergrad method only" in capsys.readouterr().err


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
