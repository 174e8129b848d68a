"""MAML / first-order MAML / Meta-SGD: the meta-gradient against plain torch.func, and errors."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from fastmeta import backends
from fastmeta import inner_loop as inner_loop_module
from fastmeta.backends import Impl
from fastmeta.meta import MAML, MLP, Conv4
from fastmeta.optim import Adam
from fastmeta.tasks import Episode, FewShotTasks, SinusoidTasks, TensorClass
from tests.conftest import meta_train_sinusoid

INNER_LR = 0.01
BETAS = (0.9, 0.999)
EPS = 1e-8
EPS_ROOT = 1e-12  # keeps d sqrt(v)/dv finite where a ReLU gives an exactly-zero gradient
# "The meta-gradient equals a plain torch.func implementation to 1e-5 relative" (issue 5).
META_GRAD_RTOL = 1e-5


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _inner_update(p, g, m, v, k, lr, opt):
    """One plain-torch inner step on a dict of tensors: SGD, or Adam as torch.optim defines it."""
    if opt == "sgd":
        return {n: p[n] - lr[n] * g[n] for n in p}, m, v
    t = k + 1
    b1, b2 = BETAS
    m = {n: b1 * m[n] + (1 - b1) * g[n] for n in p}
    v = {n: b2 * v[n] + (1 - b2) * g[n] ** 2 for n in p}
    p = {n: p[n] - lr[n] / (1 - b1 ** t) * m[n] / (torch.sqrt(v[n] / (1 - b2 ** t) + EPS_ROOT)
                                                   + EPS) for n in p}
    return p, m, v


def _lr_dict(model, lr):
    """The inner lr as a dict like the params: a float, a () tensor, or a flat [N] tensor."""
    if isinstance(lr, torch.Tensor) and lr.dim() == 1:
        out, offset = {}, 0
        for n, p in model.named_parameters():
            out[n] = lr[offset: offset + p.numel()].view(p.shape)
            offset += p.numel()
        return out
    return {n: lr for n, _ in model.named_parameters()}


def reference_meta_grads(model, episode, *, steps, first_order, opt, lr, loss_fn, use_vmap):
    """The meta-gradient of plain torch.func (vmap over tasks of grad) or of a per-task loop."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    lr_leaf = lr.detach().clone().requires_grad_() if isinstance(lr, torch.Tensor) else lr

    def task_loss(p, x, y):
        return loss_fn(functional_call(model, p, (x,)), y)

    def adapt_then_query(p, sx, sy, qx, qy):
        lrs = _lr_dict(model, lr_leaf)
        m = {n: torch.zeros_like(t) for n, t in p.items()}
        v = dict(m)
        for k in range(steps):
            if use_vmap:
                g = grad(task_loss)(p, sx, sy)
            else:
                loss = task_loss(p, sx, sy)
                g = dict(zip(p, torch.autograd.grad(loss, list(p.values()),
                                                    create_graph=not first_order)))
            if first_order:
                g = {n: t.detach() for n, t in g.items()}
            p, m, v = _inner_update(p, g, m, v, k, lrs, opt)
        return task_loss(p, qx, qy)

    ep = episode
    if use_vmap:
        losses = vmap(adapt_then_query, in_dims=(None, 0, 0, 0, 0))(
            params, ep.support_x, ep.support_y, ep.query_x, ep.query_y)
    else:
        losses = torch.stack([adapt_then_query(params, ep.support_x[t], ep.support_y[t],
                                               ep.query_x[t], ep.query_y[t])
                              for t in range(ep.num_tasks)])
    inputs = list(params.values()) + ([lr_leaf] if isinstance(lr, torch.Tensor) else [])
    grads = torch.autograd.grad(losses.mean(), inputs)
    theta_grad = torch.cat([g.reshape(-1) for g in grads[: len(params)]])
    return losses.mean().detach(), theta_grad, (grads[-1] if isinstance(lr, torch.Tensor) else None)


def _maml_grads(maml, episode):
    maml.zero_grad()
    out = maml(episode)
    out.loss.backward()
    theta_grad = torch.cat([p.grad.reshape(-1) for p in maml.model.parameters()])
    lr_grad = maml.inner_lr.grad if isinstance(maml.inner_lr, torch.Tensor) else None
    return out.loss.detach(), theta_grad, lr_grad


def _sinusoid_setup(dtype=torch.float64):
    torch.manual_seed(0)
    model = MLP().to(dtype)
    episode = SinusoidTasks(seed=0, dtype=dtype).sample(4, shots=5, queries=6)
    return model, episode


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("steps", [1, 5])
def test_meta_gradient_matches_torch_func(steps, first_order, opt):
    model, episode = _sinusoid_setup()
    kwargs = {"betas": BETAS, "eps": EPS, "eps_root": EPS_ROOT} if opt == "adam" else {}
    maml = MAML(model, loss_fn=F.mse_loss, inner_lr=INNER_LR, inner_steps=steps,
                first_order=first_order, inner_optimizer=opt, inner_kwargs=kwargs)
    loss, theta_grad, _ = _maml_grads(maml, episode)
    ref_loss, ref_grad, _ = reference_meta_grads(model, episode, steps=steps,
                                                 first_order=first_order, opt=opt, lr=INNER_LR,
                                                 loss_fn=F.mse_loss, use_vmap=True)
    torch.testing.assert_close(loss, ref_loss)
    assert _rel_err(theta_grad, ref_grad) <= META_GRAD_RTOL


def test_meta_gradient_float32_matches_torch_func():
    model, episode = _sinusoid_setup(torch.float32)
    maml = MAML(model, loss_fn=F.mse_loss, inner_lr=INNER_LR, inner_steps=5)
    _, theta_grad, _ = _maml_grads(maml, episode)
    _, ref_grad, _ = reference_meta_grads(model, episode, steps=5, first_order=False, opt="sgd",
                                          lr=INNER_LR, loss_fn=F.mse_loss, use_vmap=True)
    assert _rel_err(theta_grad, ref_grad) <= META_GRAD_RTOL


@pytest.mark.parametrize("learn", ["scalar", "per_param"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_meta_sgd_learns_the_inner_lr(learn, first_order):
    model, episode = _sinusoid_setup()
    maml = MAML(model, loss_fn=F.mse_loss, inner_lr=INNER_LR, inner_steps=2,
                first_order=first_order, learn_inner_lr=learn)
    n = sum(p.numel() for p in model.parameters())
    assert maml.inner_lr.shape == ((n,) if learn == "per_param" else ())
    with torch.no_grad():  # make the per-parameter rates differ, as after some training
        maml.inner_lr.mul_(torch.rand_like(maml.inner_lr) + 0.5)
    assert {id(p) for p in maml.parameters()} >= {id(maml.inner_lr)}
    _, theta_grad, lr_grad = _maml_grads(maml, episode)
    _, ref_theta, ref_lr = reference_meta_grads(model, episode, steps=2, first_order=first_order,
                                                opt="sgd", lr=maml.inner_lr, loss_fn=F.mse_loss,
                                                use_vmap=True)
    assert _rel_err(theta_grad, ref_theta) <= META_GRAD_RTOL
    assert lr_grad.shape == maml.inner_lr.shape
    assert _rel_err(lr_grad, ref_lr) <= META_GRAD_RTOL


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_conv4_batchnorm_meta_gradient(first_order, monkeypatch):
    # Every max-pool on the kernel, however small (the routing's size threshold set to 0).
    monkeypatch.setattr("fastmeta.ops.max_pool.MIN_NATIVE_ELEMENTS", 0)
    torch.manual_seed(0)
    model = Conv4(in_channels=1, ways=3, filters=4, image_size=8).double()
    classes = [TensorClass(str(c), torch.rand(4, 1, 8, 8, dtype=torch.float64))
               for c in range(5)]
    episode = FewShotTasks(classes, seed=0).sample(2, ways=3, shots=1, queries=2)
    maml = MAML(model, loss_fn=F.cross_entropy, inner_lr=0.1, inner_steps=2,
                first_order=first_order)
    with backends.trace() as calls:
        loss, theta_grad, _ = _maml_grads(maml, episode)
    if backends.native() is not None and not first_order:  # the loop: native max-pools
        assert ("max_pool2d", Impl.NATIVE) in calls
    # second order through BatchNorm: a per-task loop (vmap's second derivatives are wrong there)
    ref_loss, ref_grad, _ = reference_meta_grads(model, episode, steps=2, first_order=first_order,
                                                 opt="sgd", lr=0.1, loss_fn=F.cross_entropy,
                                                 use_vmap=False)
    torch.testing.assert_close(loss, ref_loss)
    assert _rel_err(theta_grad, ref_grad) <= META_GRAD_RTOL


@pytest.mark.native
def test_conv4_float32_native_layers_match_the_reference(monkeypatch):
    """conv-4 at the benchmark's image size in float32: the meta-gradient with the native
    max-pool (and fused update) equals the one with FASTMETA_IMPL=reference (torch's pooling)."""
    monkeypatch.setattr("fastmeta.ops.max_pool.MIN_NATIVE_ELEMENTS", 0)
    torch.manual_seed(0)
    model = Conv4(in_channels=1, ways=5, filters=8, image_size=28)
    gen = torch.Generator().manual_seed(0)
    episode = Episode(torch.rand(2, 5, 1, 28, 28, generator=gen), torch.arange(5).repeat(2, 1),
                      torch.rand(2, 10, 1, 28, 28, generator=gen),
                      torch.arange(5).repeat_interleave(2).repeat(2, 1))
    maml = MAML(model, loss_fn=F.cross_entropy, inner_lr=0.1, inner_steps=2)
    with backends.trace() as calls:
        loss, theta_grad, _ = _maml_grads(maml, episode)
    assert ("max_pool2d", Impl.NATIVE) in calls
    monkeypatch.setenv("FASTMETA_IMPL", "reference")
    with backends.trace() as calls:
        ref_loss, ref_grad, _ = _maml_grads(maml, episode)
    assert ("max_pool2d", Impl.NATIVE) not in calls
    torch.testing.assert_close(loss, ref_loss)
    assert _rel_err(theta_grad, ref_grad) <= 1e-5


def _small_conv_episode(support: int, queries: int) -> Episode:
    gen = torch.Generator().manual_seed(0)
    return Episode(torch.rand(3, support, 1, 6, 6, generator=gen, dtype=torch.float64),
                   torch.randint(0, 2, (3, support), generator=gen),
                   torch.rand(3, queries, 1, 6, 6, generator=gen, dtype=torch.float64),
                   torch.randint(0, 2, (3, queries), generator=gen))


def _spy(monkeypatch, owner, name, calls, label):
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(label) or real(*a, **k))


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("support,queries", [(1, 4), (4, 1)], ids=["query-large", "support-large"])
def test_query_and_support_each_pick_vmap_or_the_loop_by_size(first_order, support, queries,
                                                             monkeypatch):
    # A conv net without BatchNorm (so second order may run vmap too): the pass whose inputs
    # hold 4 x 6 x 6 positions per task runs the loop, the one with 1 x 6 x 6 runs vmap.
    monkeypatch.setattr(inner_loop_module, "LOOP_MIN_POSITIONS", 4 * 6 * 6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).double()
    episode = _small_conv_episode(support, queries)
    inner, query = [], []
    _spy(monkeypatch, inner_loop_module, "_vmap_grads", inner, "vmap")
    _spy(monkeypatch, inner_loop_module, "_loop_grads", inner, "loop")
    real_predict = MAML._predict
    monkeypatch.setattr(MAML, "_predict",
                        lambda self, p, x, c: query.append(c) or real_predict(self, p, x, c))
    maml = MAML(model, loss_fn=F.cross_entropy, inner_lr=0.1, inner_steps=2,
                first_order=first_order)
    loss, theta_grad, _ = _maml_grads(maml, episode)
    large, small = ["loop"], ["vmap"]
    assert inner == 2 * (large if support > queries else small)
    assert query == (small if support > queries else large)
    ref_loss, ref_grad, _ = reference_meta_grads(model, episode, steps=2, first_order=first_order,
                                                 opt="sgd", lr=0.1, loss_fn=F.cross_entropy,
                                                 use_vmap=True)
    torch.testing.assert_close(loss, ref_loss)
    assert _rel_err(theta_grad, ref_grad) <= META_GRAD_RTOL
    # Evaluation and predict() take the same routes, to the same numbers as vmap throughout.
    vmap_maml = MAML(model, loss_fn=F.cross_entropy, inner_lr=0.1, inner_steps=2,
                     first_order=first_order, strategy="vmap")
    torch.testing.assert_close(maml.evaluate(episode).query_losses,
                               vmap_maml.evaluate(episode).query_losses)
    params = maml.adapt(episode.support_x, episode.support_y)[0]
    torch.testing.assert_close(maml.predict(params, episode.query_x),
                               vmap_maml.predict(params, episode.query_x))


class _DataDependentConv(nn.Module):
    """A conv net whose forward branches on its data: vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * 6 * 6, 2)

    def forward(self, x):
        h = self.conv(x)
        return self.head((h if h.sum() > 0 else -h).flatten(1))


def test_a_model_vmap_cannot_run_falls_back_to_the_loop_in_the_query_pass_too(monkeypatch):
    # The support set is large (the loop, so vmap is never tried there) and the query set small
    # (vmap, which fails): the query forward falls back to the loop with a warning, and "auto"
    # runs the model in the loop from then on.
    monkeypatch.setattr(inner_loop_module, "LOOP_MIN_POSITIONS", 4 * 6 * 6)
    monkeypatch.setattr(inner_loop_module, "_VMAP_FAILED", weakref.WeakKeyDictionary())
    torch.manual_seed(0)
    model = _DataDependentConv().double()
    episode = _small_conv_episode(4, 1)
    maml = MAML(model, loss_fn=F.cross_entropy, inner_lr=0.1, first_order=True)
    with pytest.raises(RuntimeError, match="data-dependent control flow"):
        MAML(model, loss_fn=F.cross_entropy, inner_lr=0.1, first_order=True,
             strategy="vmap")(episode)
    with pytest.warns(RuntimeWarning, match="uses 'loop' for this model"):
        loss = maml(episode).loss
    assert model in inner_loop_module._VMAP_FAILED
    loop = MAML(model, loss_fn=F.cross_entropy, inner_lr=0.1, first_order=True, strategy="loop")
    torch.testing.assert_close(loss, loop(episode).loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(maml.evaluate(episode).loss, loop.evaluate(episode).loss)


def test_strategies_agree():
    model, episode = _sinusoid_setup()
    results = []
    for strategy in ("auto", "mlp", "batched", "vmap", "loop"):
        maml = MAML(model, loss_fn=F.mse_loss, inner_steps=3, strategy=strategy)
        results.append(_maml_grads(maml, episode)[1])
    for other in results[1:]:
        torch.testing.assert_close(other, results[0])


def _classifier_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(1)
    episode = Episode(torch.randn(4, 6, 6, generator=gen, dtype=torch.float64),
                      torch.randint(0, 3, (4, 6), generator=gen),
                      torch.randn(4, 9, 6, generator=gen, dtype=torch.float64),
                      torch.randint(0, 3, (4, 9), generator=gen))
    return model, episode


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_mlp_strategy_classifier_matches_torch_func(first_order):
    """A cross-entropy MLP on the hand-written path (which 'auto' takes) against torch.func,
    with the query accuracy from the same node."""
    model, episode = _classifier_setup()
    maml = MAML(model, loss_fn=F.cross_entropy, inner_lr=INNER_LR, inner_steps=2,
                first_order=first_order, strategy="mlp")
    loss, theta_grad, _ = _maml_grads(maml, episode)
    ref_loss, ref_grad, _ = reference_meta_grads(model, episode, steps=2,
                                                 first_order=first_order, opt="sgd",
                                                 lr=INNER_LR, loss_fn=F.cross_entropy,
                                                 use_vmap=True)
    torch.testing.assert_close(loss, ref_loss)
    assert _rel_err(theta_grad, ref_grad) <= META_GRAD_RTOL
    batched = MAML(model, loss_fn=F.cross_entropy, inner_lr=INNER_LR, inner_steps=2,
                   first_order=first_order, strategy="batched")
    torch.testing.assert_close(maml(episode).accuracy, batched(episode).accuracy)


def test_mlp_strategy_refuses_what_it_cannot_compute_and_auto_falls_back():
    model, episode = _sinusoid_setup()

    def huber(out, y):
        return F.huber_loss(out, y)

    with pytest.raises(ValueError, match="strategy='mlp' cannot run this inner loop"):
        MAML(model, loss_fn=huber, strategy="mlp")(episode)
    with pytest.raises(ValueError, match="strategy='mlp' cannot run this model"):
        MAML(Conv4(in_channels=1, ways=3, filters=4, image_size=8), loss_fn=F.cross_entropy,
             strategy="mlp")
    # 'auto' with a loss it does not know runs the batched strategy, to the same meta-gradient
    # as torch.func.
    maml = MAML(model, loss_fn=huber, inner_lr=INNER_LR, inner_steps=2)
    _, theta_grad, _ = _maml_grads(maml, episode)
    _, ref_grad, _ = reference_meta_grads(model, episode, steps=2, first_order=False, opt="sgd",
                                          lr=INNER_LR, loss_fn=huber, use_vmap=True)
    assert _rel_err(theta_grad, ref_grad) <= META_GRAD_RTOL


def test_evaluate_adapts_without_graph_and_reports_accuracy():
    torch.manual_seed(0)
    model = Conv4(in_channels=1, ways=3, filters=4, image_size=8)
    classes = [TensorClass(str(c), torch.rand(5, 1, 8, 8)) for c in range(4)]
    episode = FewShotTasks(classes, seed=0).sample(3, ways=3, shots=1, queries=3)
    maml = MAML(model, loss_fn=F.cross_entropy, inner_lr=0.4)
    before = maml.evaluate(episode, steps=0)
    after = maml.evaluate(episode, steps=5)
    assert after.query_losses.shape == after.accuracy.shape == (3,)
    assert after.support_losses.shape == (5, 3)
    assert not after.loss.requires_grad and not after.params.requires_grad
    assert all(p.grad is None for p in maml.parameters())
    assert after.support_losses[-1].mean() < before.query_losses.mean() + 10  # finite, ran
    assert ((after.accuracy >= 0) & (after.accuracy <= 1)).all()
    assert maml(episode).accuracy.shape == (3,)
    regression = MAML(MLP(), loss_fn=F.mse_loss)
    assert regression.evaluate(SinusoidTasks(seed=0).sample(2, 5)).accuracy is None


def test_sinusoid_training_reduces_the_meta_loss():
    torch.manual_seed(0)
    maml = MAML(MLP(), loss_fn=F.mse_loss, inner_lr=INNER_LR)
    before, after = meta_train_sinusoid(maml, Adam(maml.parameters(), lr=1e-2), 60,
                                        held_out_tasks=100)
    assert after < 0.8 * before


def test_custom_rule_and_dtype_move():
    model, episode = _sinusoid_setup()

    def plain_sgd(params, grads, state, *, lr):
        return params - lr * grads, state

    maml = MAML(MLP(), loss_fn=F.mse_loss, inner_optimizer=plain_sgd, inner_steps=2).double()
    maml.model.load_state_dict(model.state_dict())
    builtin = MAML(model, loss_fn=F.mse_loss, inner_steps=2)
    torch.testing.assert_close(_maml_grads(maml, episode)[1], _maml_grads(builtin, episode)[1])
    assert maml.layout.dtype == torch.float64
    assert "inner_optimizer='plain_sgd'" in repr(maml)


def test_errors():
    bn = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    with pytest.raises(RuntimeError, match="running statistics"):
        MAML(bn, loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match="inner_optimizer"):
        MAML(MLP(), loss_fn=F.mse_loss, inner_optimizer="lbfgs")
    with pytest.raises(ValueError, match="learn_inner_lr"):
        MAML(MLP(), loss_fn=F.mse_loss, learn_inner_lr=True)
    with pytest.raises(ValueError, match="inner_lr"):
        MAML(MLP(), loss_fn=F.mse_loss, inner_kwargs={"lr": 0.1})
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(MLP(), loss_fn=F.mse_loss, inner_steps=-1)
    maml = MAML(MLP(), loss_fn=F.mse_loss)
    with pytest.raises(TypeError, match="Episode"):
        maml((torch.zeros(2, 5, 1),) * 4)
    with pytest.raises(ValueError, match="disagree"):
        maml(Episode(torch.zeros(2, 5, 1), torch.zeros(2, 4, 1),
                     torch.zeros(2, 5, 1), torch.zeros(2, 5, 1)))
    with pytest.raises(ValueError, match="leading task dimension"):
        maml.predict(torch.zeros(2, 1761), torch.zeros(3))


def _graph_nodes(tensor: torch.Tensor) -> set[str]:
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def test_auto_takes_the_hand_written_mlp_path_for_the_sinusoid_network():
    model, episode = _sinusoid_setup()
    nodes = _graph_nodes(MAML(model, loss_fn=F.mse_loss, inner_steps=2)(episode).loss)
    assert "TaskLossGradBackward" in nodes
    nodes = _graph_nodes(MAML(model, loss_fn=F.mse_loss, inner_steps=2,
                              strategy="batched")(episode).loss)
    assert "TaskLossGradBackward" not in nodes


def test_cross_entropy_with_an_in_range_ignore_index_is_not_taken_by_hand():
    """nn.CrossEntropyLoss(ignore_index=0) leaves class 0 out of the mean, which the
    hand-written path does not do: 'auto' must take the batched path, to the same losses."""
    model, episode = _classifier_setup()
    loss_fn = nn.CrossEntropyLoss(ignore_index=0)
    auto = MAML(model, loss_fn=loss_fn, inner_lr=INNER_LR, inner_steps=1)(episode)
    batched = MAML(model, loss_fn=loss_fn, inner_lr=INNER_LR, inner_steps=1,
                   strategy="batched")(episode)
    assert "TaskLossGradBackward" not in _graph_nodes(auto.loss)
    torch.testing.assert_close(auto.query_losses, batched.query_losses)
    torch.testing.assert_close(auto.support_losses, batched.support_losses)


def test_auto_on_a_plain_mlp_refuses_a_third_derivative_clearly():
    model, episode = _sinusoid_setup()
    loss = MAML(model, loss_fn=F.mse_loss, inner_steps=1)(episode).loss
    # The meta-gradient with a graph (for a meta-Hessian) is where it stops, with the remedy.
    with pytest.raises(RuntimeError, match="differentiable once.*strategy='batched'"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    loss = MAML(model, loss_fn=F.mse_loss, inner_steps=1, strategy="batched")(episode).loss
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    assert sum(g.sum() for g in grads).requires_grad
