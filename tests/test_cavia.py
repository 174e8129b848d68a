"""CAVIA: the meta-gradient against plain torch.func, context-only adaptation, per-task
normalisation, errors, and the ``fastmeta train cavia`` / ``fastmeta eval`` runs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from fastmeta.cli import main
from fastmeta.meta import CAVIA, MLP, Conv4, FiLMConv4, runs
from fastmeta.meta.training import load_checkpoint, read_metrics
from fastmeta.optim import Adam
from fastmeta.tasks import Episode, FewShotTasks, SinusoidTasks, TensorClass
from tests.conftest import meta_train_sinusoid
from tests.test_tasks import omniglot_root  # noqa: F401 (a fixture)

# "The meta-gradient equals a plain torch.func implementation to 1e-5 relative" (issue 6).
META_GRAD_RTOL = 1e-5
CONTEXT = 3
INNER_LR = 0.5


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _concat_setup(tasks: int = 4):
    torch.manual_seed(0)
    model = MLP(in_features=1 + CONTEXT, hidden=(16, 16)).double()
    episode = SinusoidTasks(seed=0, dtype=torch.float64).sample(tasks, shots=5, queries=6)
    return model, episode, F.mse_loss


def _film_setup(tasks: int = 3):
    torch.manual_seed(0)
    model = FiLMConv4(in_channels=1, ways=3, num_context_params=CONTEXT, filters=4,
                      image_size=8).double()
    classes = [TensorClass(str(c), torch.rand(5, 1, 8, 8, dtype=torch.float64))
               for c in range(5)]
    episode = FewShotTasks(classes, seed=0).sample(tasks, ways=3, shots=1, queries=2)
    return model, episode, F.cross_entropy


SETUPS = {"concat": _concat_setup, "film": _film_setup}


def reference_meta_grads(model, episode, *, mode, steps, first_order, loss_fn):
    """CAVIA written plainly with torch.func: per task, a context φ ∈ R^d starting at 0,
    ``torch.func.grad`` for the inner step, ``functional_call`` with θ, vmapped over tasks."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    dtype = next(model.parameters()).dtype

    def task_loss(phi, p, x, y):
        if mode == "concat":
            out = functional_call(model, p, (torch.cat([x, phi.expand(x.shape[0], -1)], -1),))
        else:
            out = functional_call(model, p, (x[None], phi[None]))[0]
        return loss_fn(out, y)

    def adapt_then_query(p, sx, sy, qx, qy):
        phi = torch.zeros(CONTEXT, dtype=dtype)
        for _ in range(steps):
            g = grad(task_loss)(phi, p, sx, sy)
            if first_order:
                g = g.detach()
            phi = phi - INNER_LR * g
        return task_loss(phi, p, qx, qy)

    ep = episode
    losses = vmap(adapt_then_query, in_dims=(None, 0, 0, 0, 0))(
        params, ep.support_x, ep.support_y, ep.query_x, ep.query_y)
    grads = torch.autograd.grad(losses.mean(), list(params.values()))
    return losses.mean().detach(), torch.cat([g.reshape(-1) for g in grads])


def _cavia_grads(cavia, episode):
    cavia.zero_grad(set_to_none=True)
    out = cavia(episode)
    out.loss.backward()
    return out, torch.cat([p.grad.reshape(-1) for p in cavia.model.parameters()])


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("mode", ["concat", "film"])
def test_meta_gradient_matches_torch_func(mode, steps, first_order):
    model, episode, loss_fn = SETUPS[mode]()
    cavia = CAVIA(model, loss_fn=loss_fn, num_context_params=CONTEXT, context_mode=mode,
                  inner_lr=INNER_LR, inner_steps=steps, first_order=first_order)
    out, theta_grad = _cavia_grads(cavia, episode)
    ref_loss, ref_grad = reference_meta_grads(model, episode, mode=mode, steps=steps,
                                              first_order=first_order, loss_fn=loss_fn)
    torch.testing.assert_close(out.loss.detach(), ref_loss)
    assert _rel_err(theta_grad, ref_grad) <= META_GRAD_RTOL
    # the inner gradient really reaches θ in second order: the two orders differ
    if not first_order:
        cavia.first_order = True
        assert _rel_err(_cavia_grads(cavia, episode)[1], ref_grad) > 1e-3


@pytest.mark.parametrize("mode", ["concat", "film"])
def test_any_loss_function_gives_the_same_result_as_the_batched_ones(mode):
    """F.mse_loss and F.cross_entropy are computed for all tasks at once; any other loss is
    mapped over the tasks with vmap. Both give the same per-task losses and meta-gradient."""
    model, episode, loss_fn = SETUPS[mode]()
    batched = CAVIA(model, loss_fn=loss_fn, num_context_params=CONTEXT, context_mode=mode,
                    inner_steps=2)
    mapped = CAVIA(model, loss_fn=lambda o, y: loss_fn(o, y), num_context_params=CONTEXT,
                   context_mode=mode, inner_steps=2)
    out_b, grad_b = _cavia_grads(batched, episode)
    out_m, grad_m = _cavia_grads(mapped, episode)
    torch.testing.assert_close(out_m.query_losses, out_b.query_losses)
    torch.testing.assert_close(out_m.support_losses, out_b.support_losses)
    torch.testing.assert_close(grad_m, grad_b)


def test_adaptation_changes_only_the_context_from_zero():
    model, episode, _ = _concat_setup()
    cavia = CAVIA(model, loss_fn=F.mse_loss, num_context_params=CONTEXT, inner_lr=INNER_LR)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = cavia(episode)
    for n, p in model.named_parameters():  # adaptation never writes θ ...
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)
        assert p.grad is None  # ... nor gives it a gradient before the meta-loss's backward
    assert [n for n, _ in cavia.named_parameters()] == [f"model.{n}" for n in before]
    # steps=0 leaves the context at zero; one step is -α ∇_φ L_S(θ, 0), task by task
    assert torch.equal(cavia.adapt(episode.support_x, episode.support_y, steps=0)[0],
                       torch.zeros(episode.num_tasks, CONTEXT, dtype=torch.float64))
    for t in range(episode.num_tasks):
        phi = torch.zeros(CONTEXT, dtype=torch.float64, requires_grad=True)
        x = torch.cat([episode.support_x[t], phi.expand(5, -1)], -1)
        (g,) = torch.autograd.grad(F.mse_loss(model(x), episode.support_y[t]), phi)
        torch.testing.assert_close(out.context[t], -INNER_LR * g)
    # each call starts from zero: the previous call's adaptation leaves nothing behind
    other = SinusoidTasks(seed=5, dtype=torch.float64).sample(4, shots=5, queries=6)
    cavia(other)
    torch.testing.assert_close(cavia(episode).context, out.context, rtol=0, atol=0)
    # evaluation: detached results, no gradient for θ
    ev = cavia.evaluate(episode, steps=3)
    assert ev.support_losses.shape == (3, 4) and ev.context.shape == (4, CONTEXT)
    assert not ev.loss.requires_grad and not ev.context.requires_grad
    assert all(p.grad is None for p in cavia.parameters())
    assert ev.support_losses[-1].mean() < ev.support_losses[0].mean()
    assert ev.accuracy is None


def test_film_tasks_do_not_see_each_other():
    model, episode, _ = _film_setup(tasks=3)
    cavia = CAVIA(model, loss_fn=F.cross_entropy, num_context_params=CONTEXT,
                  context_mode="film", inner_lr=INNER_LR, inner_steps=2)
    context = torch.randn(3, CONTEXT, dtype=torch.float64)
    alone = model(episode.query_x[:1], context[:1])
    together = model(episode.query_x, context)
    torch.testing.assert_close(together[:1], alone)
    # change the other tasks' images and contexts: task 0's output and adaptation stay the same
    changed_x = episode.query_x.clone()
    changed_x[1:] = torch.rand_like(changed_x[1:]) * 3
    changed_context = context.clone()
    changed_context[1:] += 1
    torch.testing.assert_close(model(changed_x, changed_context)[:1], alone)
    changed = Episode(torch.cat([episode.support_x[:1], changed_x[1:, :3]]), episode.support_y,
                      changed_x, episode.query_y)
    a, b = cavia(episode), cavia(changed)
    torch.testing.assert_close(b.context[0], a.context[0])
    torch.testing.assert_close(b.query_losses[0], a.query_losses[0])
    assert a.accuracy.shape == (3,)


def test_sinusoid_training_reduces_the_loss():
    """300 meta-iterations in the paper's setting (5 context params, inner lr 1.0, one step,
    Adam at 1e-3, meta-gradient clamped to [-10, 10]) take the held-out MSE from 4.35 to 2.0."""
    torch.manual_seed(0)
    cavia = CAVIA(MLP(in_features=1 + 5), loss_fn=F.mse_loss, num_context_params=5)
    before, after = meta_train_sinusoid(cavia, Adam(cavia.parameters(), lr=1e-3), 300,
                                        held_out_tasks=200, clamp=10.0)
    assert after < 0.6 * before, (before, after)


def test_errors():
    mlp = MLP(in_features=1 + CONTEXT)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="num_context_params"):
            CAVIA(mlp, loss_fn=F.mse_loss, num_context_params=bad)
    with pytest.raises(ValueError, match="context_mode"):
        CAVIA(mlp, loss_fn=F.mse_loss, num_context_params=CONTEXT, context_mode="add")
    with pytest.raises(ValueError, match="inner_lr"):
        CAVIA(mlp, loss_fn=F.mse_loss, num_context_params=CONTEXT, inner_lr=-1.0)
    with pytest.raises(ValueError, match="inner_steps"):
        CAVIA(mlp, loss_fn=F.mse_loss, num_context_params=CONTEXT, inner_steps=-1)
    # FiLM on a model without conv layers, or on a conv model without FiLM layers
    with pytest.raises(ValueError, match="context_mode='film'.*MLP.*has none"):
        CAVIA(mlp, loss_fn=F.mse_loss, num_context_params=CONTEXT, context_mode="film")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 3))
    with pytest.raises(ValueError, match="no FiLM layers"):
        CAVIA(conv, loss_fn=F.cross_entropy, num_context_params=CONTEXT, context_mode="film")
    with pytest.raises(ValueError, match="BatchNorm"):
        CAVIA(Conv4(filters=4, image_size=8), loss_fn=F.cross_entropy, num_context_params=2,
              context_mode="film")
    # context sizes that do not match the model
    film = FiLMConv4(ways=3, num_context_params=4, filters=4, image_size=8)
    with pytest.raises(ValueError, match="num_context_params=3 does not match.*4"):
        CAVIA(film, loss_fn=F.cross_entropy, num_context_params=3, context_mode="film")
    with pytest.raises(ValueError, match="num_context_params=5.*only 4"):
        CAVIA(mlp, loss_fn=F.mse_loss, num_context_params=5)
    cavia = CAVIA(mlp, loss_fn=F.mse_loss, num_context_params=2)  # 1 + 2 != 4 inputs
    episode = SinusoidTasks(seed=0).sample(2, shots=5)
    with pytest.raises(ValueError, match=r"num_context_params=2.*1 \+ 2 != 4"):
        cavia(episode)
    cavia = CAVIA(mlp, loss_fn=F.mse_loss, num_context_params=CONTEXT)
    with pytest.raises(ValueError, match=r"context must be \[T, num_context_params\]"):
        cavia.predict(torch.zeros(3, CONTEXT), episode.query_x)
    with pytest.raises(ValueError, match="features"):
        cavia.predict(torch.zeros(2, CONTEXT), torch.zeros(2, 5, 1, 8, 8))
    # wrong episode type, and a loss that is not one scalar per task
    with pytest.raises(TypeError, match="Episode"):
        cavia((episode.support_x, episode.support_y, episode.query_x, episode.query_y))
    with pytest.raises(ValueError, match="steps"):
        cavia.evaluate(episode, steps=-2)
    per_example = CAVIA(mlp, loss_fn=lambda o, y: (o - y).square(), num_context_params=CONTEXT)
    with pytest.raises(ValueError, match="one scalar (loss|tensor) per task"):
        per_example(episode)


# ---- fastmeta train cavia / fastmeta eval ----------------------------------------------------


def test_the_paper_protocol_is_the_default_of_a_cavia_run():
    sinusoid = runs.default_config(algorithm="cavia")
    expected = {"num_context_params": 5, "context_mode": "concat", "inner_lr": 1.0,
                "inner_steps": 1, "meta_batch": 25, "outer_lr": 1e-3, "grad_clip": 10.0,
                "shots": 10, "iterations": 50000, "eval_tasks": 1000, "eval_shots": [5, 10, 20],
                "eval_steps": [1, 10], "inner_optimizer": "sgd", "learn_inner_lr": False}
    assert {k: sinusoid[k] for k in expected} == expected
    cavia = runs.build(sinusoid)
    assert isinstance(cavia, CAVIA) and cavia.model.layers[0].in_features == 1 + 5
    assert [m.out_features for m in cavia.model.modules() if isinstance(m, nn.Linear)] == [
        40, 40, 1]
    digits = runs.default_config(algorithm="cavia", task="digits")
    assert (digits["num_context_params"], digits["context_mode"]) == (100, "film")
    assert isinstance(runs.build(digits).model, FiLMConv4)
    # MAML's defaults are Finn et al.'s, as before CAVIA existed
    maml = runs.default_config()
    assert (maml["algorithm"], maml["inner_lr"], maml["iterations"], maml["grad_clip"],
            maml["num_context_params"], maml["context_mode"]) == ("maml", 0.01, 30000, None,
                                                                  None, None)


SMALL = ["--task", "sinusoid", "--meta-batch", "4", "--eval-every", "5", "--eval-tasks", "10",
         "--eval-steps", "1", "--eval-shots", "5", "--seed", "3"]


def _train(tmp_path, name, iterations, *extra):
    out = tmp_path / name
    rc = main(["train", "cavia", *SMALL, "--iterations", str(iterations), "--out", str(out),
               *extra])
    assert rc == 0
    return out


def test_cli_resume_continues_exactly_and_eval_reads_the_checkpoint(tmp_path, capsys):
    straight = _train(tmp_path, "straight", 15)
    _train(tmp_path, "resumed", 10)
    resumed = _train(tmp_path, "resumed", 15, "--resume")
    a = load_checkpoint(straight / "checkpoint.pt")
    b = load_checkpoint(resumed / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == 15
    assert a["config"]["algorithm"] == "cavia" and a["config"]["num_context_params"] == 5
    assert a["model"]["model.layers.0.weight"].shape == (40, 1 + 5)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)
    assert [int(r["iteration"]) for r in read_metrics(resumed / "metrics.csv")] == [5, 10, 15]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["config"]["inner_lr"] == 1.0 and summary["config"]["grad_clip"] == 10.0
    assert [(e["shots"], e["steps"]) for e in summary["evaluation"]] == [(5, 1)]
    for plot in ("adapted.png", "context.png"):
        assert (straight / plot).stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", str(straight / "checkpoint.pt"), "--tasks", "20", "--steps", "1", "3",
                 "--shots", "5", "20"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("20-shot, 3 step(s), 20 tasks: loss ")
    # a MAML run cannot resume a CAVIA checkpoint
    rc = main(["train", "maml", *SMALL, "--iterations", "20", "--out", str(straight),
               "--resume"])
    assert rc == 2
    assert "algorithm='cavia'" in capsys.readouterr().err


def test_cli_digits_film_run(tmp_path):
    pytest.importorskip("sklearn", reason="the digits tasks need scikit-learn")
    out = tmp_path / "digits"
    rc = main(["train", "cavia", "--task", "digits", "--ways", "3", "--shots", "1",
               "--queries", "2", "--meta-batch", "2", "--filters", "4", "--iterations", "2",
               "--eval-every", "2", "--eval-tasks", "4", "--eval-steps", "1",
               "--num-context-params", "8", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["context_mode"] == "film"
    assert 0 <= summary["evaluation"][0]["accuracy"]["mean"] <= 1
    assert load_checkpoint(out / "checkpoint.pt")["model"]["model.blocks.0.film.weight"].shape \
        == (2 * 4, 8)


@pytest.mark.parametrize(("args", "message"), [
    (["cavia", "--context-mode", "film"], "context_mode='film'"),
    (["cavia", "--num-context-params", "0"], "num_context_params"),
    (["cavia", "--inner-optimizer", "adam"], "inner_optimizer"),
    (["cavia", "--learn-inner-lr", "per_param"], "learn_inner_lr"),
    (["maml", "--num-context-params", "5"], "num_context_params is a CAVIA option"),
])
def test_cli_rejects_bad_cavia_options(tmp_path, capsys, args, message):
    rc = main(["train", *args, "--iterations", "1", "--out", str(tmp_path / "run")])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_run_without_matplotlib_skips_the_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = _train(tmp_path, "no-plots", 5)
    assert not (out / "adapted.png").exists() and not (out / "context.png").exists()
    assert "matplotlib is not installed: not writing adapted.png and context.png" in \
        capsys.readouterr().err
    assert (out / "summary.json").exists()


@pytest.mark.parametrize("algorithm", ["cavia", "maml"])
def test_cli_omniglot_folder_run(tmp_path, omniglot_root, algorithm):  # noqa: F811
    """A folder in the Omniglot layout (generated PNGs) trains and evaluates end to end."""
    out = tmp_path / "omniglot"
    rc = main(["train", algorithm, "--task", "omniglot", "--omniglot-root", str(omniglot_root),
               "--ways", "2", "--shots", "1", "--queries", "1", "--meta-batch", "2",
               "--filters", "4", "--iterations", "2", "--eval-every", "2", "--eval-tasks", "4",
               "--eval-steps", "1", *(["--num-context-params", "8"] if algorithm == "cavia"
                                      else []), "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["task"] == "omniglot"
    assert 0 <= summary["evaluation"][0]["accuracy"]["mean"] <= 1
