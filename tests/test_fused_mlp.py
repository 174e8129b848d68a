"""fastmeta.fused_mlp: the hand-written gradient and Hessian-vector product against autograd in
float64, and the models and batches it must refuse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmeta import backends
from fastmeta.flat import FlatLayout
from fastmeta.fused_mlp import (
    MLPSpec,
    TaskLossGrad,
    UnsupportedModel,
    mlp_spec,
    task_loss_grads,
)

# Both sides compute the same products in float64, in a different order.
RTOL = 1e-10
ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid]
IN_FEATURES, CLASSES = 5, 3


def _mlp(activation: type[nn.Module], depth: int, bias: bool) -> nn.Sequential:
    """``depth`` Linear layers 5 -> 7 -> 6 -> ... -> 3 with ``activation`` between them."""
    widths = [IN_FEATURES, 7, 6, 4][:depth] + [CLASSES]
    modules: list[nn.Module] = []
    for i in range(depth):
        if i:
            modules.append(activation())
        modules.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
    return nn.Sequential(*modules).double()


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """rtol RTOL, with an absolute floor at RTOL of the largest entry (some entries are sums
    that cancel to nearly 0)."""
    torch.testing.assert_close(actual, expected, rtol=RTOL,
                               atol=RTOL * float(expected.abs().max()))


def _autograd_grad_and_hvp(model, layout, theta, x, y, v):
    theta = theta.detach().requires_grad_()
    loss = F.cross_entropy(layout.call_unchecked(model, theta, (x,)), y)
    (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
    (hv,) = torch.autograd.grad(grad, theta, v)
    return grad.detach(), hv


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: a.__name__)
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch", [1, 9])
def test_gradient_and_hvp_match_autograd(activation, depth, bias, batch):
    model = _mlp(activation, depth, bias)
    layout = FlatLayout.of(model)
    spec = MLPSpec.of(model, layout)
    theta = layout.flatten(model)
    x = torch.randn(batch, IN_FEATURES, dtype=torch.float64) * 2
    y = torch.randint(0, CLASSES, (batch,))
    v = torch.randn_like(theta)
    grad, tape = spec.loss_grad(theta, x, y)
    hv = spec.hvp(theta, tape, v)
    expected_grad, expected_hv = _autograd_grad_and_hvp(model, layout, theta, x, y, v)
    _close(grad, expected_grad)
    _close(hv, expected_hv)


def test_outputs_are_written_into_the_given_buffers():
    model = _mlp(nn.Tanh, 2, True)
    layout = FlatLayout.of(model)
    spec = MLPSpec.of(model, layout)
    theta = layout.flatten(model)
    x, y = torch.randn(6, IN_FEATURES, dtype=torch.float64), torch.randint(0, CLASSES, (6,))
    out = torch.full_like(theta, float("nan"))
    grad, tape = spec.loss_grad(theta, x, y, out=out)
    assert grad is out and torch.isfinite(out).all()
    hv_out = torch.full_like(theta, float("nan"))
    v = torch.randn_like(theta)
    assert spec.hvp(theta, tape, v, out=hv_out) is hv_out
    _close(hv_out, _autograd_grad_and_hvp(model, layout, theta, x, y, v)[1])


def test_relu_kink_has_zero_slope_as_in_autograd():
    """Pre-activations exactly 0 (zero weights and bias): autograd's ReLU derivative there is
    0, and so is ours."""
    model = _mlp(nn.ReLU, 2, True)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    layout = FlatLayout.of(model)
    spec = MLPSpec.of(model, layout)
    theta = layout.flatten(model)
    x, y = torch.randn(4, IN_FEATURES, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    v = torch.randn_like(theta)
    grad, tape = spec.loss_grad(theta, x, y)
    expected_grad, expected_hv = _autograd_grad_and_hvp(model, layout, theta, x, y, v)
    _close(grad, expected_grad)
    _close(spec.hvp(theta, tape, v), expected_hv)


def test_float32_matches_autograd():
    model = _mlp(nn.Sigmoid, 3, True).float()
    layout = FlatLayout.of(model)
    spec = MLPSpec.of(model, layout)
    theta = layout.flatten(model)
    x, y = torch.randn(16, IN_FEATURES), torch.randint(0, CLASSES, (16,))
    v = torch.randn_like(theta)
    grad, tape = spec.loss_grad(theta, x, y)
    expected_grad, expected_hv = _autograd_grad_and_hvp(model, layout, theta, x, y, v)
    torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(spec.hvp(theta, tape, v), expected_hv)


def test_label_out_of_range_raises():
    model = _mlp(nn.ReLU, 2, True)
    layout = FlatLayout.of(model)
    theta = layout.flatten(model)
    x = torch.randn(2, IN_FEATURES, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="out of bounds"):
        MLPSpec.of(model, layout).loss_grad(theta, x, torch.tensor([0, CLASSES]))


class _MyLinear(nn.Linear):
    pass


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _tied() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    return model


def _hooked() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    return model


UNSUPPORTED = [
    (lambda: _TwoLayers(), "not an nn.Sequential"),
    (lambda: nn.Sequential(), "last module"),
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3)),
     r"module '1' \(GELU\) is not an nn.ReLU"),
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False),
                           nn.ReLU(), nn.Linear(4, 3)), r"'1' \(BatchNorm1d\)"),
    (lambda: nn.Sequential(nn.Unflatten(1, (1, 5)), nn.Conv1d(1, 2, 3), nn.Flatten(),
                           nn.Linear(6, 3)), r"'0' \(Unflatten\) is not an nn.Linear"),
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh()),
     r"last module \(Tanh\) is not an nn.Linear"),
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)), r"'1' \(Linear\) is not an nn.ReLU"),
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.ReLU(), nn.Linear(4, 3)),
     r"'2' \(ReLU\) is not an nn.Linear"),
    (lambda: nn.Sequential(_MyLinear(5, 4), nn.ReLU(), nn.Linear(4, 3)),
     r"'0' \(_MyLinear\) is not an nn.Linear"),
    (_tied, "tied weights"),
    (_hooked, "module '0' has forward or backward hooks"),
]


@pytest.mark.parametrize("make, match", UNSUPPORTED)
def test_unsupported_models_are_refused(make, match):
    model = make()
    assert mlp_spec(model) is None
    with pytest.raises(UnsupportedModel, match=match):
        MLPSpec.of(model)


def test_layout_of_another_model_is_refused():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    other = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(UnsupportedModel, match="layout of another model"):
        MLPSpec.of(model, FlatLayout.of(other))


def test_global_forward_hooks_are_refused():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        with pytest.raises(UnsupportedModel, match="global module forward or backward hooks"):
            MLPSpec.of(model)
    finally:
        handle.remove()
    assert mlp_spec(model) is not None


@pytest.mark.parametrize("x, y, match", [
    (torch.randn(4, 6), torch.zeros(4, dtype=torch.long), r"shape \[4, 6\], not \[B, 5\]"),
    (torch.randn(0, 5), torch.zeros(0, dtype=torch.long), "B >= 1"),
    (torch.randn(4, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.long), "float64"),
    (torch.randn(4, 5, requires_grad=True), torch.zeros(4, dtype=torch.long), "require grad"),
    (torch.randn(4, 5), torch.zeros(4), "labels are torch.float32"),
    (torch.randn(4, 5), torch.zeros(3, dtype=torch.long), r"labels .* \[3\]"),
    ("x", torch.zeros(4, dtype=torch.long), "not a pair of tensors"),
])
def test_unsupported_batches_are_refused(x, y, match):
    spec = MLPSpec.of(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)))
    with pytest.raises(UnsupportedModel, match=match):
        spec.check_batch(x, y, dtype=torch.float32, device=torch.device("cpu"))


def test_class_indices_out_of_range_are_refused_and_named():
    spec = MLPSpec.of(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)))
    cpu = torch.device("cpu")
    good, x = torch.tensor([0, 2, 1]), torch.randn(3, 5)
    for bad in (torch.tensor([0, 3, 1]), torch.tensor([0, -100, 1])):  # == classes; ignored
        with pytest.raises(UnsupportedModel, match=r"batch has a class index outside \[0, 3\)"):
            spec.check_batch(x, bad, dtype=torch.float32, device=cpu)
        spec.check_batch(x, bad, dtype=torch.float32, device=cpu, check_range=False)
        # T tasks: [T, B] labels.
        with pytest.raises(UnsupportedModel, match="class index outside"):
            spec.check_batch(x.expand(2, 3, 5), torch.stack([good, bad]),
                             dtype=torch.float32, device=cpu, tasks=2)
        # Many batches in one read; the first offending one is named.
        with pytest.raises(UnsupportedModel, match=r"^third has"):
            spec.check_class_range([good, torch.tensor([], dtype=torch.long), bad, bad],
                                   ["first", "second", "third", "fourth"])
    spec.check_class_range([good, torch.stack([good, good])], ["a", "b"])
    spec.check_class_range([torch.tensor([], dtype=torch.long)], ["empty"])
    spec.check_class_range([], [])
    with pytest.raises(ValueError, match="2 label tensors but 1 names"):
        spec.check_class_range([good, good], ["a"])


# ---- T tasks at once ([T, N] params), mean squared error, and the autograd node for MAML -----


def _narrow_mlp(activation: type[nn.Module], widths: tuple[int, ...],
                bias: bool = True) -> nn.Sequential:
    modules: list[nn.Module] = []
    for i in range(len(widths) - 1):
        if i:
            modules.append(activation())
        modules.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
    return nn.Sequential(*modules).double()


def _loss_widths(loss: str, widths: tuple[int, ...]) -> tuple[int, ...]:
    """``widths`` with at least two classes for the cross-entropy."""
    return (*widths[:-1], 2) if loss == "cross_entropy" and widths[-1] == 1 else widths


def _task_batch(loss: str, tasks: int, rows: int, widths: tuple[int, ...]):
    x = torch.randn(tasks, rows, widths[0], dtype=torch.float64)
    if loss == "mse":
        return x, torch.randn(tasks, rows, widths[-1], dtype=torch.float64)
    return x, torch.randint(0, widths[-1], (tasks, rows))


def _autograd_task_grads_and_hvps(model, layout, params, x, y, v, loss):
    """Each task's gradient and Hessian-vector product by autograd, one task at a time."""
    loss_fn = F.mse_loss if loss == "mse" else F.cross_entropy
    grads, hvps, losses = [], [], []
    for t in range(params.shape[0]):
        theta = params[t].detach().requires_grad_()
        value = loss_fn(layout.call_unchecked(model, theta, (x[t],)), y[t])
        (grad,) = torch.autograd.grad(value, theta, create_graph=True)
        (hv,) = torch.autograd.grad(grad, theta, v[t])
        grads.append(grad.detach())
        hvps.append(hv)
        losses.append(value.detach())
    return torch.stack(grads), torch.stack(hvps), torch.stack(losses)


# (1, 6, 5, 1) has the sinusoid network's 1-wide input and output, which take the broadcast
# products instead of bmm; (4, 6, 3) takes bmm everywhere.
@pytest.mark.parametrize("widths", [(1, 6, 5, 1), (4, 6, 3)], ids=["narrow", "wide"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: a.__name__)
def test_task_batched_gradient_hvp_and_losses_match_autograd(widths, loss, activation):
    widths = _loss_widths(loss, widths)
    torch.manual_seed(0)
    model = _narrow_mlp(activation, widths)
    layout = FlatLayout.of(model)
    spec = MLPSpec.of(model, layout)
    tasks = 4
    params = layout.flatten(model).expand(tasks, -1) + 0.3 * torch.randn(
        tasks, layout.numel, dtype=torch.float64)
    x, y = _task_batch(loss, tasks, 7, widths)
    v = torch.randn_like(params)
    grad, tape, losses = spec.loss_grad(params, x, y, loss=loss, want_losses=True)
    hv = spec.hvp(params, tape, v)
    expected = _autograd_task_grads_and_hvps(model, layout, params, x, y, v, loss)
    _close(grad, expected[0])
    _close(hv, expected[1])
    _close(losses, expected[2])


def _node_problem(activation: type[nn.Module], widths: tuple[int, ...], loss: str, tasks: int,
                  rows: int, *, spread: float = 0.0):
    """A model's spec, a task batch and ``[T, N]`` params (its weights, each task's row moved
    by ``spread`` noise) that require grad."""
    torch.manual_seed(0)
    model = _narrow_mlp(activation, widths)
    layout = FlatLayout.of(model)
    x, y = _task_batch(loss, tasks, rows, widths)
    params = (layout.flatten(model).expand(tasks, -1).clone()
              + spread * torch.randn(tasks, layout.numel, dtype=torch.float64))
    return MLPSpec.of(model, layout), x, y, params.requires_grad_()


@pytest.mark.parametrize("loss, activation, widths", [
    ("mse", nn.Tanh, (1, 5, 4, 1)), ("cross_entropy", nn.ReLU, (3, 5, 4))])
def test_task_loss_grad_node_passes_gradcheck(loss, activation, widths):
    spec, x, y, params = _node_problem(activation, widths, loss, 3, 4, spread=0.1)

    def node(p):
        grad, losses, _ = TaskLossGrad.apply(spec, loss, p, x, y)
        return grad, losses

    assert torch.autograd.gradcheck(node, (params,))


def test_task_loss_grad_node_refuses_a_third_derivative():
    spec, x, y, params = _node_problem(nn.ReLU, (2, 4, 1), "mse", 2, 3)
    grad, _, _ = TaskLossGrad.apply(spec, "mse", params, x, y)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(grad.square().sum(), params, create_graph=True)


def test_a_class_declaring_its_sequential_body_is_read_but_not_its_subclasses():
    from fastmeta.meta import MLP

    net = MLP().double()
    spec = MLPSpec.of(net)
    assert spec.in_features == 1 and spec.classes == 1 and len(spec.layers) == 3

    class Shifted(MLP):
        def forward(self, x):
            return super().forward(x) + 1

    with pytest.raises(UnsupportedModel, match="fused_mlp_body"):
        MLPSpec.of(Shifted())


def test_a_module_used_twice_and_backward_hooks_are_refused():
    tanh, hidden = nn.Tanh(), nn.Linear(4, 4)
    twice = nn.Sequential(nn.Linear(3, 4), tanh, hidden, tanh, hidden).double()
    with pytest.raises(UnsupportedModel, match="uses a module twice"):
        MLPSpec.of(twice)
    hooked = _mlp(nn.ReLU, 2, True)
    hooked[0].register_full_backward_hook(lambda *args: None)
    with pytest.raises(UnsupportedModel, match="backward hooks"):
        MLPSpec.of(hooked)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_task_batched_edge_shapes_match_autograd(loss):
    """One task, one example, no bias, a single layer, and inputs that are a non-contiguous
    view: the shapes where a broadcast shortcut or a strided write could go wrong."""
    torch.manual_seed(1)
    for widths, bias in (((3, 2), False), ((1, 4, 1), False), ((2, 1, 3), True)):
        widths = _loss_widths(loss, widths)
        model = _narrow_mlp(nn.Sigmoid, widths, bias)
        layout = FlatLayout.of(model)
        spec = MLPSpec.of(model, layout)
        for tasks, rows in ((1, 1), (3, 2)):
            params = layout.flatten(model).expand(tasks, -1).contiguous()
            x, y = _task_batch(loss, tasks, rows, widths)
            x = torch.cat([x, x], dim=-1)[..., ::2]  # same values, strided
            v = torch.randn_like(params)
            grad, tape, losses = spec.loss_grad(params, x, y, loss=loss, want_losses=True)
            expected = _autograd_task_grads_and_hvps(model, layout, params, x.contiguous(), y,
                                                     v, loss)
            _close(grad, expected[0])
            _close(spec.hvp(params, tape, v), expected[1])
            _close(losses, expected[2])


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU], ids=["torch-ops", "native-on-cpu"])
def test_task_loss_grad_node_frees_its_tape_without_the_cycle_collector(activation):
    import gc
    import weakref

    spec, x, y, params = _node_problem(activation, (2, 4, 1), "mse", 2, 3)
    gc.disable()
    try:
        grad, losses, outputs = TaskLossGrad.apply(spec, "mse", params, x, y)
        alive = [weakref.ref(t) for t in (grad, outputs)]
        (grad.square().sum() + losses.sum()).backward()
        del grad, losses, outputs
        assert all(ref() is None for ref in alive), "the node's outputs outlived it"
    finally:
        gc.enable()


# ---- The native op (csrc/mlp.h, fastmeta.ops.mlp_task_grads) against the torch ops ---------


def _node_forward_backward(spec, loss, params, x, y, grad_weights, loss_weights):
    """TaskLossGrad's outputs and the gradient w.r.t. ``params`` of
    ``Σ grad_weights ⊙ g + Σ loss_weights ⊙ ℓ`` (a None weight leaves that term out)."""
    p = params.detach().clone().requires_grad_()
    grad, losses, outputs = TaskLossGrad.apply(spec, loss, p, x, y)
    total = sum(term for term in (
        None if grad_weights is None else (grad * grad_weights).sum(),
        None if loss_weights is None else (losses * loss_weights).sum()) if term is not None)
    (theta_bar,) = torch.autograd.grad(total, p)
    return grad.detach(), losses.detach(), outputs, theta_bar


def _ran_native(calls) -> bool:
    return ("mlp_task_grads", backends.Impl.NATIVE) in calls


needs_native = pytest.mark.skipif(
    backends.native() is None or not hasattr(backends.native(), "MlpTaskGrads")
    or backends.torch_blas_gemm(torch.float64) is None,
    reason="the native extension (with MlpTaskGrads) or torch's BLAS is missing")


@needs_native
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("widths, bias", [((1, 6, 5, 1), True), ((4, 6, 3), True),
                                          ((3, 2), True), ((2, 1, 3), False), ((1, 4, 1), False)],
                         ids=["sinusoid-like", "wide", "one-layer", "width-1", "no-bias"])
@pytest.mark.parametrize("terms", ["both", "grad", "losses"])
def test_native_task_grads_match_the_torch_ops(monkeypatch, loss, widths, bias, terms):
    """Forward (gradients, losses, outputs) and backward (H ḡ + ℓ̄ g, each term alone and
    both) of the native op equal the torch ops of MLPSpec in float64, over one task with one
    example, several tasks, and strided inputs."""
    widths = _loss_widths(loss, widths)
    torch.manual_seed(2)
    model = _narrow_mlp(nn.ReLU, widths, bias)
    layout = FlatLayout.of(model)
    spec = MLPSpec.of(model, layout)
    for tasks, rows in ((1, 1), (5, 4)):
        params = layout.flatten(model).expand(tasks, -1) + 0.5 * torch.randn(
            tasks, layout.numel, dtype=torch.float64)
        x, y = _task_batch(loss, tasks, rows, widths)
        x = torch.cat([x, x], dim=-1)[..., ::2]  # same values, strided
        grad_weights = None if terms == "losses" else torch.randn_like(params)
        loss_weights = None if terms == "grad" else torch.randn(tasks, dtype=torch.float64)
        with backends.trace() as calls:
            native = _node_forward_backward(spec, loss, params, x, y, grad_weights, loss_weights)
        assert _ran_native(calls)
        monkeypatch.setenv("FASTMETA_IMPL", "reference")
        with backends.trace() as calls:
            reference = _node_forward_backward(spec, loss, params, x, y, grad_weights,
                                               loss_weights)
        monkeypatch.delenv("FASTMETA_IMPL")
        assert not _ran_native(calls)
        for actual, expected in zip(native, reference):
            _close(actual, expected)


@needs_native
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_native_task_grads_in_float32_match_float64(loss):
    spec, x, y, params = _node_problem(nn.ReLU, (3, 16, 8, 4), loss, 6, 5, spread=0.3)
    weights = torch.randn_like(params)
    exact = _node_forward_backward(spec, loss, params, x, y, weights, torch.ones(6).double())
    spec32 = MLPSpec.of(_narrow_mlp(nn.ReLU, (3, 16, 8, 4)).float())
    with backends.trace() as calls:
        single = _node_forward_backward(spec32, loss, params.float(), x.float(),
                                        y.float() if loss == "mse" else y, weights.float(),
                                        torch.ones(6))
    assert _ran_native(calls)
    for actual, expected in zip(single, exact):
        torch.testing.assert_close(actual.double(), expected, rtol=1e-4,
                                   atol=1e-5 * float(expected.abs().max()))


@needs_native
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_native_task_grads_node_passes_gradcheck(loss):
    spec, x, y, params = _node_problem(nn.ReLU, (2, 5, 4, 3), loss, 3, 4, spread=0.1)

    def node(p):
        grad, losses, _ = TaskLossGrad.apply(spec, loss, p, x, y)
        return grad, losses

    with backends.trace() as calls:
        assert torch.autograd.gradcheck(node, (params,))
    assert _ran_native(calls)


def test_the_torch_ops_run_where_the_native_op_does_not_apply(monkeypatch):
    """Tanh (the native op is ReLU only), no torch BLAS, and FASTMETA_IMPL=reference all run
    the torch ops, with the same results."""
    spec, x, y, params = _node_problem(nn.Tanh, (2, 4, 1), "mse", 2, 3)
    with backends.trace() as calls:
        TaskLossGrad.apply(spec, "mse", params, x, y)
    assert not _ran_native(calls)
    spec, x, y, params = _node_problem(nn.ReLU, (2, 4, 1), "mse", 2, 3, spread=0.2)
    with backends.trace() as calls:
        expected = TaskLossGrad.apply(spec, "mse", params, x, y)
    assert _ran_native(calls) or backends.native() is None
    for env in ("FASTMETA_NO_TORCH_BLAS", "FASTMETA_IMPL"):
        monkeypatch.setenv(env, "1" if env == "FASTMETA_NO_TORCH_BLAS" else "reference")
        with backends.trace() as calls:
            got = TaskLossGrad.apply(spec, "mse", params, x, y)
        monkeypatch.delenv(env)
        assert not _ran_native(calls)
        for actual, want in zip(got, expected):
            _close(actual.detach(), want.detach())


@needs_native
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_native_task_grads_in_parallel_match_the_torch_ops(monkeypatch, loss):
    """T = 25 tasks of 10 rows on a 1-40-40-5 network: enough work that the tasks run on
    every OpenMP thread; the no-grad path (first-order steps, evaluation) too, and a backward
    run twice (retain_graph) gives the same result."""
    spec, x, y, params = _node_problem(nn.ReLU, (1, 40, 40, 5), loss, 25, 10, spread=0.2)
    weights, loss_weights = torch.randn_like(params), torch.randn(25, dtype=torch.float64)
    native = _node_forward_backward(spec, loss, params, x, y, weights, loss_weights)
    with backends.trace() as calls:
        no_grad = task_loss_grads(spec, loss, params, x, y, create_graph=False)
    assert _ran_native(calls)
    p = params.detach().clone().requires_grad_()
    grad, losses, _ = TaskLossGrad.apply(spec, loss, p, x, y)
    total = (grad * weights).sum() + (losses * loss_weights).sum()
    first = torch.autograd.grad(total, p, retain_graph=True)[0]
    assert torch.equal(first, torch.autograd.grad(total, p)[0])
    monkeypatch.setenv("FASTMETA_IMPL", "reference")
    reference = _node_forward_backward(spec, loss, params, x, y, weights, loss_weights)
    reference_no_grad = task_loss_grads(spec, loss, params, x, y, create_graph=False)
    for actual, expected in [*zip(native, reference), *zip(no_grad, reference_no_grad)]:
        _close(actual, expected)


def test_inputs_the_native_op_cannot_read_run_the_torch_ops(monkeypatch):
    """x or targets of another dtype than θ (a float64 lr promotes θ after the first inner
    step), targets that broadcast, and int32 labels: the torch ops run, with their results
    (the native op would read the bytes as something else)."""
    spec, x, y, params = _node_problem(nn.ReLU, (2, 4, 3), "mse", 2, 3, spread=0.2)
    cases = [("mse", params, x.float(), y), ("mse", params, x, y.float()),
             ("mse", params, x, y[:, :1]), ("mse", params.float(), x, y.float()),
             ("cross_entropy", params, x, torch.tensor([[0, 2, 1], [1, 1, 0]], dtype=torch.int32))]
    for loss, theta, xs, ys in cases:
        with backends.trace() as calls:
            try:
                got = TaskLossGrad.apply(spec, loss, theta, xs, ys)
            except RuntimeError as error:  # e.g. torch's scatter_add refuses int32 labels
                got = error
        assert not _ran_native(calls), (loss, xs.dtype, ys.dtype, list(ys.shape))
        monkeypatch.setenv("FASTMETA_IMPL", "reference")
        try:
            want = TaskLossGrad.apply(spec, loss, theta, xs, ys)
        except RuntimeError as error:
            want = error
        monkeypatch.delenv("FASTMETA_IMPL")
        if isinstance(want, Exception):
            assert type(got) is type(want) and str(got) == str(want)
        else:
            for actual, expected in zip(got, want):
                torch.testing.assert_close(actual.detach(), expected.detach())


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_a_class_label_out_of_range_raises_on_both_paths(monkeypatch, impl):
    spec, x, _, params = _node_problem(nn.ReLU, (2, 4, 3), "cross_entropy", 2, 3)
    if impl == "reference":
        monkeypatch.setenv("FASTMETA_IMPL", "reference")
    for label in (3, -1):
        y = torch.tensor([[0, 1, 2], [1, label, 0]])
        with pytest.raises((IndexError, RuntimeError), match="out of|outside"):
            TaskLossGrad.apply(spec, "cross_entropy", params, x, y)


def test_fastmeta_impl_is_obeyed(monkeypatch):
    """native: the op, or an error saying why not (tanh); triton: the torch ops, as on a GPU
    (the op has no Triton kernel)."""
    spec, x, y, params = _node_problem(nn.Tanh, (2, 4, 1), "mse", 2, 3)
    monkeypatch.setenv("FASTMETA_IMPL", "native")
    with pytest.raises(backends.ImplementationUnavailable, match="ReLU"):
        TaskLossGrad.apply(spec, "mse", params, x, y)
    monkeypatch.setenv("FASTMETA_IMPL", "triton")
    with backends.trace() as calls:
        TaskLossGrad.apply(spec, "mse", params, x, y)
    assert calls == [("mlp_task_grads", backends.Impl.REFERENCE)]
    if backends.native() is not None and backends.torch_blas_gemm(torch.float64) is not None:
        spec, x, y, params = _node_problem(nn.ReLU, (2, 4, 1), "mse", 2, 3)
        monkeypatch.setenv("FASTMETA_IMPL", "native")
        with backends.trace() as calls:
            TaskLossGrad.apply(spec, "mse", params, x, y)
        assert calls == [("mlp_task_grads", backends.Impl.NATIVE)]


@needs_native
def test_autocast_runs_the_torch_ops():
    spec, x, y, params = _node_problem(nn.ReLU, (2, 4, 1), "mse", 2, 3)
    with torch.autocast("cpu"), backends.trace() as calls:
        TaskLossGrad.apply(spec, "mse", params.float(), x.float(), y.float())
    assert not _ran_native(calls)


def test_zero_tasks_give_empty_results():
    spec, x, y, params = _node_problem(nn.ReLU, (2, 4, 1), "mse", 2, 3)
    grads, losses, outputs = task_loss_grads(spec, "mse", params[:0].detach(), x[:0], y[:0],
                                             create_graph=False)
    assert grads.shape == (0, params.shape[1]) and losses.shape == (0,)
    assert outputs.shape == (0, 3, 1)


@needs_native
def test_native_float32_loss_is_summed_without_drift():
    """200,000 squared errors: a float32 running sum drifts by ~1e-5 relative; the native op
    sums in double, like torch's reduction."""
    torch.manual_seed(3)
    model = _narrow_mlp(nn.ReLU, (2, 4, 10)).float()
    spec = MLPSpec.of(model)
    params = spec.layout.flatten(model).unsqueeze(0).contiguous()
    x, y = torch.randn(1, 20000, 2), torch.randn(1, 20000, 10) * 3
    with backends.trace() as calls:
        _, losses, _ = task_loss_grads(spec, "mse", params, x, y, create_graph=False)
    assert _ran_native(calls)
    exact = F.mse_loss(spec.layout.call_unchecked(model.double(), params[0].double(),
                                                  (x[0].double(),)), y[0].double())
    torch.testing.assert_close(losses[0].double(), exact, rtol=2e-7, atol=0)
