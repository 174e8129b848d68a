"""Flat parameters (fastmeta.flat) and the batched inner loop (fastmeta.inner_loop)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmeta import inner_loop as inner_loop_module
from fastmeta.flat import FlatLayout, flatten
from fastmeta.inner_loop import as_step, inner_loop, resolve_strategy
from tests.tolerances import assert_close

T = 5  # tasks
SHOTS = 10
LR = 0.05
STRATEGIES = ("batched", "vmap", "loop")


def sinusoid_mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The MAML sinusoid regressor (Finn et al. 2017): 1-40-40-1, ReLU."""
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    ).to(dtype)


def small_convnet(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Two conv-BN-ReLU-pool blocks and a 5-way head; BN keeps no running statistics."""
    layers: list[nn.Module] = []
    cin = 1
    for _ in range(2):
        layers += [
            nn.Conv2d(cin, 4, 3, padding=1),
            nn.BatchNorm2d(4, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        cin = 4
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 2 * 2, 5)).to(dtype)


def sinusoid_tasks(tasks: int = T, dtype: torch.dtype = torch.float32):
    amp = torch.rand(tasks, 1, 1, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(tasks, 1, 1, dtype=dtype) * torch.pi
    x = torch.rand(tasks, 2 * SHOTS, 1, dtype=dtype) * 10 - 5
    y = amp * torch.sin(x + phase)
    return x[:, :SHOTS], y[:, :SHOTS], x[:, SHOTS:], y[:, SHOTS:]


def sgd(p, g, s, k):
    return p - LR * g, s


def momentum(p, g, s, k):
    buf = g if s is None else 0.9 * s + g
    return p - LR * buf, buf


def query_loss(net, layout, params_tn, xq, yq, loss_fn=F.mse_loss):
    return sum(
        loss_fn(layout.functional_call(net, params_tn[t], (xq[t],)), yq[t])
        for t in range(params_tn.shape[0])
    )


def reference_maml(net, xs, ys, xq, yq, *, steps, create_graph=True, loss_fn=F.mse_loss):
    """Plain torch.func MAML: per task, per tensor, no flat buffer.

    Returns the adapted parameters of every task flattened to [T, N], and the meta-gradient
    w.r.t. the module's parameters flattened to [N].
    """
    theta = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}

    def support_loss(params, x, y):
        return loss_fn(torch.func.functional_call(net, params, (x,)), y)

    adapted, meta_loss = [], 0.0
    for t in range(xs.shape[0]):
        params = dict(theta)
        for _ in range(steps):
            grads = torch.func.grad(support_loss)(params, xs[t], ys[t])
            if not create_graph:
                grads = {n: g.detach() for n, g in grads.items()}
            params = {n: params[n] - LR * grads[n] for n in params}
        adapted.append(torch.cat([v.reshape(-1) for v in params.values()]))
        meta_loss = meta_loss + loss_fn(torch.func.functional_call(net, params, (xq[t],)), yq[t])
    meta_grad = torch.autograd.grad(meta_loss, list(theta.values()))
    return torch.stack(adapted).detach(), torch.cat([g.reshape(-1) for g in meta_grad])


# ---- the layout and its views --------------------------------------------------------------


def test_layout_records_names_shapes_offsets():
    net = sinusoid_mlp()
    layout = FlatLayout.of(net)
    names = [n for n, _ in net.named_parameters()]
    assert [e.name for e in layout.entries] == names
    offset = 0
    for e, (_, p) in zip(layout.entries, net.named_parameters()):
        assert (e.shape, e.offset, e.numel) == (p.shape, offset, p.numel())
        offset += p.numel()
    assert layout.numel == offset == 1761
    assert (layout.dtype, layout.device) == (torch.float32, torch.device("cpu"))


def test_round_trip_module_flat_module():
    net = sinusoid_mlp()
    layout, flat = flatten(net)
    assert flat.shape == (layout.numel,) and flat.is_contiguous() and not flat.requires_grad
    other = sinusoid_mlp()
    layout.load_(other, flat)
    for (_, a), (_, b) in zip(net.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(layout.flatten(other), flat, rtol=0, atol=0)
    # flatten copies: changing the buffer leaves the module alone until load_.
    flat.add_(1.0)
    assert not torch.equal(layout.flatten(net), flat)


def test_views_share_storage_no_copies():
    net = sinusoid_mlp()
    layout, flat = flatten(net)
    buf = layout.expand(flat, T)
    row = buf[3]
    views = layout.views(row)
    itemsize = buf.element_size()
    for e in layout.entries:
        v = views[e.name]
        assert v.shape == e.shape
        assert v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        assert v.data_ptr() == row.data_ptr() + e.offset * itemsize
    buf[3].zero_()
    assert all(bool((v == 0).all()) for v in views.values())
    # The batched views of the whole [T, N] buffer are views as well.
    for e, v in zip(layout.entries, layout.views(buf).values()):
        assert v.shape == (T, *e.shape) and v.data_ptr() == buf.data_ptr() + e.offset * itemsize


def test_expand_is_differentiable_and_optionally_zero_copy():
    layout, flat = flatten(sinusoid_mlp())
    flat.requires_grad_()
    view = layout.expand(flat, T, contiguous=False)
    assert view.stride(0) == 0 and view.data_ptr() == flat.data_ptr()
    copy = layout.expand(flat, T)
    assert copy.is_contiguous() and copy.shape == (T, layout.numel)
    w = torch.randn(T, layout.numel)
    for buf in (view, copy):
        (g,) = torch.autograd.grad((buf * w).sum(), flat)
        assert_close(g, w.sum(0))


@pytest.mark.parametrize("net_fn", [sinusoid_mlp, small_convnet], ids=["mlp", "conv"])
def test_functional_call_on_a_row_equals_the_module_with_those_weights(net_fn):
    net = net_fn()
    layout, flat = flatten(net)
    buf = layout.expand(flat, T) + 0.1 * torch.randn(T, layout.numel)
    x = torch.randn(4, 1) if net_fn is sinusoid_mlp else torch.randn(4, 1, 8, 8)
    t = 2
    other = net_fn()
    layout.load_(other, buf[t])
    assert_close(layout.functional_call(net, buf[t], (x,)), other(x))


def test_gradients_flow_from_a_row_to_the_meta_parameters():
    net = sinusoid_mlp()
    layout, theta = flatten(net)
    theta.requires_grad_()
    buf = layout.expand(theta, T)
    x, y, _, _ = sinusoid_tasks()
    t = 1
    (g_theta,) = torch.autograd.grad(
        F.mse_loss(layout.functional_call(net, buf[t], (x[t],)), y[t]), theta
    )
    # The same gradient computed on the module itself.
    F.mse_loss(net(x[t]), y[t]).backward()
    assert_close(g_theta, torch.cat([p.grad.reshape(-1) for p in net.parameters()]))


def _reused_module() -> nn.Module:
    lin = nn.Linear(3, 3, bias=False)
    return nn.Sequential(lin, nn.Tanh(), lin)  # one module under two names


def _tied_parameter() -> nn.Module:
    a, b = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
    b.weight = a.weight  # two modules, one parameter
    return nn.Sequential(a, nn.Tanh(), b)


@pytest.mark.parametrize("net_fn", [_reused_module, _tied_parameter], ids=["reused", "tied"])
def test_tied_parameters_appear_once_and_the_module_survives(net_fn):
    net = net_fn()
    weight = net[0].weight
    layout, flat = flatten(net)
    assert [e.name for e in layout.entries] == ["0.weight"] and layout.numel == 9
    x = torch.randn(2, 3)
    w2 = weight.detach() * 2
    out = layout.functional_call(net, flat * 2, (x,))
    assert_close(out, F.linear(torch.tanh(F.linear(x, w2)), w2))
    assert net[0].weight is weight and net[2].weight is weight


# ---- buffers --------------------------------------------------------------------------------


def test_buffers_pass_through_and_mutation_is_the_callers_choice():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))  # tracks running stats
    with pytest.raises(RuntimeError, match=r"running statistics of \['1'\].*mutable_buffers"):
        FlatLayout.of(net)
    net.eval()  # eval mode reads the buffers without updating them
    layout, flat = flatten(net)
    assert layout.buffer_names == ("1.running_mean", "1.running_var", "1.num_batches_tracked")
    x = torch.randn(4, 2)
    assert_close(layout.functional_call(net, flat, (x,)), net(x))
    net.train()  # the check runs at every call, not only when the layout is built
    with pytest.raises(RuntimeError, match="update buffers in place"):
        layout.functional_call(net, flat, (x,))

    allowed = FlatLayout.of(net, mutable_buffers="allow")
    before = net[1].running_mean.clone()
    allowed.functional_call(net, flat, (x,))
    assert not torch.equal(net[1].running_mean, before)
    assert resolve_strategy("auto", net) == "loop"
    with pytest.raises(ValueError, match="strategy='vmap' cannot run"):
        resolve_strategy("vmap", net)
    xs, ys = torch.randn(T, 4, 2), torch.randn(T, 4, 3)
    out = inner_loop(
        net, allowed.expand(flat, T), xs, ys, loss_fn=F.mse_loss, step=sgd, steps=1, layout=allowed
    )
    assert out.params.shape == (T, allowed.numel)


@pytest.mark.parametrize("create_graph", [True, False], ids=["second_order", "first_order"])
@pytest.mark.parametrize("strategy", ["auto", "loop"])
def test_batchnorm_without_running_stats(strategy, create_graph):
    net = small_convnet(torch.float64)
    layout, theta = flatten(net)
    assert layout.buffer_names == ()
    theta.requires_grad_()
    xs, xq = torch.randn(2, 3, 5, 1, 8, 8, dtype=torch.float64).unbind(0)
    ys, yq = torch.randint(0, 5, (2, 3, 5)).unbind(0)
    out = inner_loop(
        net,
        layout.expand(theta, 3),
        xs,
        ys,
        loss_fn=F.cross_entropy,
        step=sgd,
        steps=2,
        create_graph=create_graph,
        strategy=strategy,
        layout=layout,
    )
    (meta_grad,) = torch.autograd.grad(
        query_loss(net, layout, out.params, xq, yq, F.cross_entropy), theta
    )
    ref_params, ref_grad = reference_maml(
        net, xs, ys, xq, yq, steps=2, create_graph=create_graph, loss_fn=F.cross_entropy
    )
    assert_close(out.params.detach(), ref_params)
    assert_close(meta_grad, ref_grad)


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm1d(4, track_running_stats=False),
        nn.LayerNorm(4),
        nn.InstanceNorm1d(4, affine=True),
    ],
    ids=["batchnorm", "layernorm", "instancenorm"],
)
def test_second_order_through_affine_norms_avoids_vmap(norm):
    # torch 2.13 differentiates vmap(grad(f)) wrongly through these (O(1) relative error), so
    # auto takes the loop and an explicit vmap refuses; first order is right under vmap.
    net = nn.Sequential(nn.Linear(3, 4), norm)
    # LayerNorm has a task-batched form (plain autograd: right to every order), so auto takes
    # that; the others have none, and auto avoids vmap only for second order.
    batched = isinstance(norm, nn.LayerNorm)
    assert resolve_strategy("auto", net, create_graph=True) == ("batched" if batched else "loop")
    assert resolve_strategy("auto", net, create_graph=False) == ("batched" if batched else "vmap")
    with pytest.raises(ValueError, match="wrong second-order gradients through the norm layers"):
        resolve_strategy("vmap", net, create_graph=True)
    assert resolve_strategy("vmap", net, create_graph=False) == "vmap"
    assert resolve_strategy("auto", nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4))) == "vmap"
    assert (
        resolve_strategy(
            "auto", nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False))
        )
        == "batched"
    )


# ---- the inner loop -------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inner_loop_second_order_matches_torch_func_reference(strategy):
    net = sinusoid_mlp()
    layout, theta = flatten(net)
    theta.requires_grad_()
    xs, ys, xq, yq = sinusoid_tasks()
    steps = 3
    out = inner_loop(
        net,
        layout.expand(theta, T),
        xs,
        ys,
        loss_fn=F.mse_loss,
        step=sgd,
        steps=steps,
        strategy=strategy,
        layout=layout,
    )
    assert out.losses.shape == (steps, T)
    (meta_grad,) = torch.autograd.grad(query_loss(net, layout, out.params, xq, yq), theta)
    ref_params, ref_grad = reference_maml(net, xs, ys, xq, yq, steps=steps)
    torch.testing.assert_close(out.params.detach(), ref_params, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        meta_grad, ref_grad, rtol=1e-5, atol=1e-6 * ref_grad.abs().max().item()
    )
    # The first recorded loss is the support loss at the starting point.
    expected0 = torch.stack([F.mse_loss(net(xs[t]), ys[t]) for t in range(T)])
    assert_close(out.losses[0].detach(), expected0)


@pytest.mark.parametrize("create_graph", [True, False], ids=["second_order", "first_order"])
@pytest.mark.parametrize("step", [sgd, momentum], ids=["sgd", "momentum"])
def test_strategies_agree(create_graph, step):
    net = sinusoid_mlp(torch.float64)
    layout, theta = flatten(net)
    theta.requires_grad_()
    xs, ys, xq, yq = sinusoid_tasks(dtype=torch.float64)
    results = {}
    for strategy in STRATEGIES:
        out = inner_loop(
            net,
            layout.expand(theta, T),
            xs,
            ys,
            loss_fn=F.mse_loss,
            step=step,
            steps=3,
            create_graph=create_graph,
            strategy=strategy,
            layout=layout,
        )
        (g,) = torch.autograd.grad(query_loss(net, layout, out.params, xq, yq), theta)
        results[strategy] = (out.params.detach(), out.losses.detach(), out.state, g)
    for a, b in zip(results["vmap"], results["loop"]):
        if a is None:
            assert b is None
        else:
            assert_close(a, b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_first_order_has_no_second_order_terms(strategy):
    net = sinusoid_mlp(torch.float64)
    layout, theta = flatten(net)
    theta.requires_grad_()
    xs, ys, xq, yq = sinusoid_tasks(dtype=torch.float64)
    seen = []

    def spy(p, g, s, k):
        seen.append(g.requires_grad)
        return sgd(p, g, s, k)

    out = inner_loop(
        net,
        layout.expand(theta, T),
        xs,
        ys,
        loss_fn=F.mse_loss,
        step=spy,
        steps=3,
        create_graph=False,
        strategy=strategy,
        layout=layout,
    )
    assert seen == [False] * 3 and not out.losses.requires_grad
    (meta_grad,) = torch.autograd.grad(query_loss(net, layout, out.params, xq, yq), theta)
    # With the gradients constant, theta_K = theta - lr * sum_k g_k has an identity Jacobian,
    # so the FOMAML meta-gradient is the query gradient at the adapted weights, summed.
    adapted = out.params.detach().requires_grad_()
    (g_adapted,) = torch.autograd.grad(query_loss(net, layout, adapted, xq, yq), adapted)
    assert_close(meta_grad, g_adapted.sum(0))
    _, ref_grad = reference_maml(net, xs, ys, xq, yq, steps=3, create_graph=False)
    assert_close(meta_grad, ref_grad)
    # Second order differs: the check above would not pass by accident.
    _, second = reference_maml(net, xs, ys, xq, yq, steps=3)
    assert not torch.allclose(meta_grad, second)

    seen.clear()
    inner_loop(
        net,
        layout.expand(theta, T),
        xs,
        ys,
        loss_fn=F.mse_loss,
        step=spy,
        steps=1,
        strategy=strategy,
        layout=layout,
    )
    assert seen == [True]


def test_zero_steps_and_tuple_inputs():
    net = sinusoid_mlp()
    layout, theta = flatten(net)
    buf = layout.expand(theta, T)
    xs, ys, _, _ = sinusoid_tasks()
    out = inner_loop(net, buf, xs, ys, loss_fn=F.mse_loss, step=sgd, steps=0)
    assert out.params is buf and out.losses.shape == (0, T) and out.state is None
    a = inner_loop(net, buf, (xs,), ys, loss_fn=F.mse_loss, step=sgd, steps=1)
    b = inner_loop(net, buf, xs, ys, loss_fn=F.mse_loss, step=sgd, steps=1)
    assert_close(a.params, b.params)


def test_as_step_passes_hyperparameters_and_lr_stays_differentiable():
    def rule(params, grads, state, *, lr):  # the fastmeta.functional signature
        return params - lr[:, None] * grads, state

    net = sinusoid_mlp()
    layout, theta = flatten(net)
    lr = torch.full((T,), LR, requires_grad=True)  # one learning rate per task
    xs, ys, xq, yq = sinusoid_tasks()
    out = inner_loop(
        net,
        layout.expand(theta, T),
        xs,
        ys,
        loss_fn=F.mse_loss,
        step=as_step(rule, lr=lr),
        steps=2,
        layout=layout,
    )
    ref = inner_loop(
        net, layout.expand(theta, T), xs, ys, loss_fn=F.mse_loss, step=sgd, steps=2, layout=layout
    )
    assert_close(out.params.detach(), ref.params.detach())
    (g_lr,) = torch.autograd.grad(query_loss(net, layout, out.params, xq, yq), lr)
    assert g_lr.shape == (T,) and bool(torch.isfinite(g_lr).all()) and bool((g_lr != 0).all())


class _DataDependent(nn.Module):
    """Python control flow on a tensor value: vmap cannot trace it, the loop can."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x):
        y = self.lin(x)
        return y if y.sum() > 0 else -y


def test_auto_falls_back_to_loop_once_when_vmap_cannot_run():
    net = _DataDependent()
    layout, theta = flatten(net)
    xs, ys, _, _ = sinusoid_tasks()
    args = (net, layout.expand(theta, T), xs, ys)
    kwargs = dict(loss_fn=F.mse_loss, step=sgd, steps=2, layout=layout)
    with pytest.raises(RuntimeError):
        inner_loop(*args, strategy="vmap", **kwargs)
    with pytest.warns(RuntimeWarning, match="uses 'loop' for this model"):
        auto = inner_loop(*args, **kwargs)
    assert net in inner_loop_module._VMAP_FAILED
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = inner_loop(*args, **kwargs)
    loop = inner_loop(*args, strategy="loop", **kwargs)
    assert_close(auto.params, loop.params)
    assert_close(again.params, loop.params)


def test_auto_is_batched_for_models_with_a_task_batched_form():
    assert resolve_strategy("auto", sinusoid_mlp()) == "batched"
    # Convolutions: the loop (memory-bound, see inner_loop's measurements), or vmap for
    # first order; "batched" still runs them when asked for.
    assert resolve_strategy("auto", small_convnet(), create_graph=True) == "loop"
    assert resolve_strategy("auto", small_convnet(), create_graph=False) == "vmap"
    assert resolve_strategy("batched", small_convnet()) == "batched"
    assert resolve_strategy("auto", nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4))) == "vmap"


def test_auto_runs_convolutional_models_with_large_inputs_in_the_loop(monkeypatch):
    # The size rule (inner_loop.LOOP_MIN_POSITIONS): n x H x W of one task's [T, n, C, H, W]
    # input, for CPU tensors and convolutional models under "auto" only.
    monkeypatch.setattr(inner_loop_module, "LOOP_MIN_POSITIONS", 2 * 8 * 8)
    net = small_convnet()
    at, below = torch.zeros(3, 2, 1, 8, 8), torch.zeros(3, 1, 1, 8, 8)
    # Channels do not count: 1 x 3 x 8 x 8 elements per task is over the threshold, 1 x 8 x 8
    # positions is not.
    assert resolve_strategy("auto", net, create_graph=False,
                            inputs=(torch.zeros(3, 1, 3, 8, 8),)) == "vmap"
    assert resolve_strategy("auto", net, create_graph=False, inputs=(at,)) == "loop"
    assert resolve_strategy("auto", net, create_graph=False, inputs=(below,)) == "vmap"
    assert resolve_strategy("auto", net, create_graph=False, inputs=(below, at)) == "loop"
    assert resolve_strategy("auto", net, create_graph=False) == "vmap"
    assert resolve_strategy("auto", net, create_graph=False, inputs=(at.to("meta"),)) == "vmap"
    assert resolve_strategy("vmap", net, create_graph=False, inputs=(at,)) == "vmap"
    dense = nn.Sequential(nn.Flatten(2), nn.Linear(64, 4), nn.GroupNorm(2, 4))
    assert resolve_strategy("auto", dense, inputs=(at,)) == "vmap"

    # inner_loop decides on the support inputs it is given, and the loop gives vmap's result.
    layout, theta = flatten(net)
    ran = []
    real_loop_grads = inner_loop_module._loop_grads
    monkeypatch.setattr(inner_loop_module, "_loop_grads",
                        lambda *a, **k: ran.append("loop") or real_loop_grads(*a, **k))
    kwargs = dict(loss_fn=F.cross_entropy, step=lambda p, g, s, k: (p - 0.1 * g, s), steps=2,
                  create_graph=False, layout=layout)
    torch.manual_seed(0)
    x, y = torch.rand(3, 2, 1, 8, 8), torch.randint(0, 5, (3, 2))
    auto = inner_loop(net, layout.expand(theta, 3), x, y, **kwargs)
    assert ran == ["loop", "loop"]
    ran.clear()
    vmapped = inner_loop(net, layout.expand(theta, 3), x, y, strategy="vmap", **kwargs)
    assert ran == []
    assert_close(auto.params, vmapped.params)
    inner_loop(net, layout.expand(theta, 3), x[:, :1], y[:, :1], **kwargs)
    assert ran == []


# ---- bad inputs -----------------------------------------------------------------------------


class _IntParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.count = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(2))
        self.b = nn.Parameter(torch.ones(2, dtype=torch.float64))


def test_layout_errors():
    with pytest.raises(TypeError, match=r"module parameter 'count' has dtype torch.int64"):
        FlatLayout.of(_IntParam())
    with pytest.raises(ValueError, match=r"'b' is torch.float64 .* but 'a' is torch.float32"):
        FlatLayout.of(_Mixed())
    with pytest.raises(ValueError, match="has no parameters"):
        FlatLayout.of(nn.ReLU())
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        FlatLayout.of(torch.ones(2))
    with pytest.raises(ValueError, match="mutable_buffers must be one of"):
        FlatLayout.of(sinusoid_mlp(), mutable_buffers="yes")


def test_flat_buffer_errors():
    net = sinusoid_mlp()
    layout, flat = flatten(net)
    n = layout.numel
    x = torch.randn(3, 1)
    with pytest.raises(ValueError, match=rf"flat has N={n + 1} elements per row .* N={n}"):
        layout.functional_call(net, torch.zeros(n + 1), (x,))
    with pytest.raises(ValueError, match=r"flat must have shape \[N\]"):
        layout.functional_call(net, torch.zeros(2, n), (x,))
    with pytest.raises(
        TypeError,
        match="flat has dtype torch.float64 but the module's parameters are torch.float32",
    ):
        layout.load_(net, flat.double())
    with pytest.raises(ValueError, match="flat is on meta but the module's parameters are on cpu"):
        layout.functional_call(net, torch.zeros(n, device="meta"), (x,))
    with pytest.raises(TypeError, match="flat must be a tensor"):
        layout.expand([0.0] * n, T)
    with pytest.raises(ValueError, match="tasks must be a positive int"):
        layout.expand(flat, 0)
    with pytest.raises(ValueError, match=r"params has T=4 rows but T=5 tasks were expected"):
        layout.check(torch.zeros(4, n), name="params", tasks=5)
    with pytest.raises(ValueError, match=r"module's parameters .* are not those of the layout"):
        layout.flatten(small_convnet())
    with pytest.raises(ValueError, match=r"parameter '0.weight' is \[40, 1\] torch.float64"):
        layout.flatten(sinusoid_mlp(torch.float64))


def _bad_step(p, g, s, k):
    return p[0], s


def _no_state_step(p, g, s, k):
    return p - LR * g


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(params="1d"), ValueError, r"params must have shape \[T, N\]"),
        (dict(params="short"), ValueError, r"params has N=1760 elements per row"),
        (dict(params="f64"), TypeError, "params has dtype torch.float64"),
        (dict(targets="T-1"), ValueError, r"targets must have a leading task dimension T=5"),
        (dict(inputs="T-1"), ValueError, r"inputs must have a leading task dimension T=5"),
        (dict(inputs="meta"), ValueError, "inputs is on meta but params is on cpu"),
        (dict(steps=-1), ValueError, "steps must be a non-negative int"),
        (dict(strategy="threads"), ValueError, "strategy must be one of"),
        (
            dict(step=_bad_step),
            ValueError,
            r"step must return .* shape \[5, 1761\]; got new_params of shape \[1761\]",
        ),
        (
            dict(step=_no_state_step),
            ValueError,
            r"step must return \(new_params, new_state\) .*; got a Tensor at step 0",
        ),
        (dict(loss_fn=lambda out, y: (out - y) ** 2), ValueError, "loss_fn must return one scalar"),
    ],
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inner_loop_errors(change, error, match, strategy):
    net = sinusoid_mlp()
    layout, theta = flatten(net)
    xs, ys, _, _ = sinusoid_tasks()
    params = {
        "1d": theta,
        "short": torch.zeros(T, layout.numel - 1),
        "f64": layout.expand(theta, T).double(),
    }.get(change.get("params"), layout.expand(theta, T))
    inputs = {"T-1": xs[1:], "meta": xs.to("meta")}.get(change.get("inputs"), xs)
    targets = ys[1:] if change.get("targets") else ys
    kwargs = dict(loss_fn=F.mse_loss, step=sgd, steps=1, strategy=strategy, layout=layout)
    kwargs.update(
        {k: v for k, v in change.items() if k in ("steps", "strategy", "step", "loss_fn")}
    )
    with pytest.raises(error, match=match):
        inner_loop(net, params, inputs, targets, **kwargs)


def test_split_gives_the_views_flat_and_one_backward_node():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    layout, theta = flatten(net)
    rows = theta.detach().expand(3, -1).clone().requires_grad_()
    chunks = layout.split(rows)
    views = layout.views(rows)
    assert len(chunks) == len(layout.entries)
    for chunk, entry in zip(chunks, layout.entries):
        assert torch.equal(chunk, views[entry.name].reshape(3, entry.numel))
    assert len({c.grad_fn for c in chunks}) == 1  # one SplitWithSizes node for all of them
    (sum(c.sum() for c in chunks)).backward()
    assert torch.equal(rows.grad, torch.ones_like(rows))
