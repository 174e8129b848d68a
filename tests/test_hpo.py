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
from fastmeta.fused_mlp import UnsupportedModel
from fastmeta.ops import mlp_native, mlp_unroll
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


def _hypergrads(task: hpo.HPOTask, z: torch.Tensor, *, segments: int, unroll: int,
                fused_model: bool | None = None):
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
            model, layout, theta, buffer, lr[index], mu, wd, chunk, task.val,
            fused_model=fused_model)
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


@pytest.mark.parametrize("fused_model", [None, False], ids=["mlp_path", "per_step_path"])
@pytest.mark.parametrize("impl", [impl_param("native"), "reference"])
def test_hypergradient_matches_eager_autograd(impl, fused_model, monkeypatch):
    monkeypatch.setenv("FASTMETA_IMPL", impl)
    task = _tiny_task(dtype=torch.float64)
    reparam = hpo.Reparametrization(2)
    z = reparam.encode(hpo.SGDHyperparameters((0.3, 0.1), 0.7, 1e-2), dtype=torch.float64)
    # Two segments: the first starts a run (b_1 = d_1), the second carries θ and b.
    with backends.trace() as calls:
        fused, eager, theta, params = _hypergrads(task, z, segments=2, unroll=5,
                                                  fused_model=fused_model)
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


# ---- The MLP path of unrolled_validation_loss (fastmeta.fused_mlp) --------------------------

# The MLP path against eager autograd in float64: the same maths, summed in another order.
MLP_RTOL = 1e-10
# float32: the MLP path's error against float64 may be at most twice eager float32's, plus
# this fraction of the largest entry (an error that happens to be ~0 on the eager side).
F32_ERROR_RATIO, F32_FLOOR = 2.0, 1e-6
MLP_MODELS = {
    "tanh": lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)),
    "relu_no_bias": lambda: nn.Sequential(
        nn.Linear(5, 6, bias=False), nn.ReLU(), nn.Linear(6, 4, bias=False), nn.ReLU(),
        nn.Linear(4, 3, bias=False)),
    "sigmoid": lambda: nn.Sequential(nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 3)),
    "linear": lambda: nn.Sequential(nn.Linear(5, 3)),
    "relu": lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(),
                                  nn.Linear(4, 3)),
}
# The models the native unroll (csrc/mlp.h) runs: ReLU between the layers, or none.
NATIVE_UNROLL_MODELS = ("relu", "relu_no_bias", "linear")
UNSUPPORTED_MODELS = {
    "GELU": lambda: nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3)),
    "BatchNorm1d": lambda: nn.Sequential(
        nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Tanh(),
        nn.Linear(4, 3)),
    "Unflatten": lambda: nn.Sequential(  # a convolution
        nn.Unflatten(1, (1, 5)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 3)),
    "last module": lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3),
                                         nn.Tanh()),
}


def _mlp_problem(make_model, dtype: torch.dtype, *, batches: int = 7, batch_size: int = 8):
    """A model, its layout, training batches, a validation set, a start (θ_0, no buffer),
    hyperparameters (per-element lr, () momentum and weight decay) and a probe r that puts
    <r, b_K> in the objective, so that b_K's gradient is used too."""
    g = torch.Generator().manual_seed(0)
    model = make_model().to(dtype)
    layout = FlatLayout.of(model)
    x = torch.randn(batches * batch_size, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (batches * batch_size,), generator=g)
    train = [(x[i:i + batch_size], y[i:i + batch_size])
             for i in range(0, batches * batch_size, batch_size)]
    val = torch.randn(20, 5, generator=g, dtype=dtype), torch.randint(0, 3, (20,), generator=g)
    n = layout.numel
    hypers = (0.1 + 0.4 * torch.rand(n, generator=g, dtype=dtype),
              torch.tensor(0.7, dtype=dtype), torch.tensor(1e-2, dtype=dtype))
    probe = torch.randn(n, generator=g, dtype=dtype)
    return model, layout, train, val, (layout.flatten(model), None), hypers, probe


def _unroll(path: str, model, layout, state, hypers, batches, val, probe, *, impl="auto"):
    """One segment from fresh leaves, by ``path``: ``auto``, ``mlp`` (required), ``per_step``
    or ``eager`` (:func:`hpo.unrolled_validation_loss_reference`). Returns the validation loss,
    θ_K, b_K, the gradients of ``val loss + <probe, b_K>`` w.r.t. (θ_0, b_0 when given, lr,
    momentum, weight decay), and whether the MLP path ran."""
    theta = state[0].clone().requires_grad_()
    buffer = None if state[1] is None else state[1].clone().requires_grad_()
    lr, momentum, weight_decay = (h.clone().requires_grad_() for h in hypers)
    if path == "eager":
        val_loss, params, buffers = hpo.unrolled_validation_loss_reference(
            model, layout.views(theta), None if buffer is None else layout.views(buffer),
            layout.views(lr), momentum, weight_decay, batches, val)
        theta_k = torch.cat([params[e.name].reshape(-1) for e in layout.entries])
        buffer_k = torch.cat([buffers[e.name].reshape(-1) for e in layout.entries])
        took_mlp = False
    else:
        fused_model = {"auto": None, "mlp": True, "per_step": False}[path]
        val_loss, theta_k, buffer_k = hpo.unrolled_validation_loss(
            model, layout, theta, buffer, lr, momentum, weight_decay, batches, val, impl=impl,
            fused_model=fused_model)
        took_mlp = type(theta_k.grad_fn).__name__ == "_UnrolledMLPBackward"
    inputs = [t for t in (theta, buffer, lr, momentum, weight_decay) if t is not None]
    grads = torch.autograd.grad(val_loss + (probe * buffer_k).sum(), inputs)
    return val_loss.detach(), theta_k.detach(), buffer_k.detach(), grads, took_mlp


def _unroll_paths(make_model, dtype: torch.dtype, *paths: str):
    """A fresh :func:`_mlp_problem` and one :func:`_unroll` of it per path."""
    problem = _mlp_problem(make_model, dtype)
    model, layout, batches, val, state, hypers, probe = problem
    return problem, [_unroll(path, model, layout, state, hypers, batches, val, probe)
                     for path in paths]


def _assert_mlp_close(actual, expected):
    values = [*actual[:3], *actual[3]], [*expected[:3], *expected[3]]
    for a, e in zip(*values):
        torch.testing.assert_close(a, e, rtol=MLP_RTOL, atol=MLP_RTOL * float(e.abs().max()))


@pytest.mark.parametrize("impl", [impl_param(i) for i in ("native", "reference", "triton")])
@pytest.mark.parametrize("name", list(MLP_MODELS))
def test_mlp_path_matches_eager_autograd(impl, name):
    model, layout, batches, val, state, hypers, probe = _mlp_problem(MLP_MODELS[name],
                                                                     torch.float64)
    # The first segment starts a run (no buffer); the second carries θ and b.
    for segment in (batches[:4], batches[4:]):
        with backends.trace() as calls:
            mlp = _unroll("mlp", model, layout, state, hypers, segment, val, probe, impl=impl)
        assert mlp[4] and ("momentum", Impl(impl)) in calls, calls
        eager = _unroll("eager", model, layout, state, hypers, segment, val, probe)
        assert all(g.abs().max() > 0 for g in eager[3]), "every input must get a gradient"
        _assert_mlp_close(mlp, eager)
        state = mlp[1], mlp[2]


@pytest.mark.parametrize("name", list(MLP_MODELS))
def test_mlp_path_in_float32_is_as_accurate_as_eager(name):
    problem, (mlp, eager) = _unroll_paths(MLP_MODELS[name], torch.float32, "mlp", "eager")
    model, _, batches, val, state, hypers, probe = problem
    model64 = model.double()  # the same start, hyperparameters and data, in float64
    up = [t.double() for t in (*state[:1], *hypers, probe)]
    batches64 = [(x.double(), y) for x, y in batches]
    ref = _unroll("eager", model64, FlatLayout.of(model64), (up[0], None), up[1:4],
                  batches64, (val[0].double(), val[1]), up[4])
    for a, e, r in zip([*mlp[:3], *mlp[3]], [*eager[:3], *eager[3]], [*ref[:3], *ref[3]]):
        error, eager_error = (a.double() - r).abs().max(), (e.double() - r).abs().max()
        assert error <= F32_ERROR_RATIO * eager_error + F32_FLOOR * r.abs().max(), (
            error, eager_error)


@pytest.mark.parametrize("impl", [impl_param("native"), "reference"])
def test_mlp_path_takes_numbers_and_no_weight_decay(impl):
    """Number hyperparameters, and weight decay the number 0 (the step's param VJP is then
    the identity: the incoming θ̄ is passed on, and must not be overwritten)."""
    model, layout, batches, val, state, _, _ = _mlp_problem(MLP_MODELS["tanh"], torch.float64)
    results = {}
    for fused_model in (True, False):
        theta = state[0].clone().requires_grad_()
        buffer = (state[0] * 0.1).requires_grad_()
        val_loss, theta_k, buffer_k = hpo.unrolled_validation_loss(
            model, layout, theta, buffer, 0.3, 0.9, 0.0, batches, val, impl=impl,
            fused_model=fused_model)
        grads = torch.autograd.grad(val_loss + buffer_k.sum(), [theta, buffer])
        results[fused_model] = (val_loss.detach(), theta_k.detach(), buffer_k.detach()), grads
    _assert_mlp_close((*results[True][0], results[True][1]),
                      (*results[False][0], results[False][1]))


def _spy_native_unroll(monkeypatch) -> list[int]:
    """Counts the native unroll's forward calls."""
    calls: list[int] = []
    forward = mlp_unroll.NativeMLPUnroll.forward

    def counted(self):
        calls.append(1)
        return forward(self)

    monkeypatch.setattr(mlp_unroll.NativeMLPUnroll, "forward", counted)
    return calls


def _native_and_python(monkeypatch, make_model, dtype, *, in_features=5, batch_size=8,
                       steps=7, start_buffer=False, theta_grad=True, lr_form="element",
                       lr=0.3):
    """One unroll by the native path and one by the Python loop, from the same start:
    [val loss, θ_K, b_K, *gradients of val loss + <r, b_K> w.r.t. every input that wants one]
    for each, after checking that the native path ran exactly once."""
    g = torch.Generator().manual_seed(0)
    model = make_model().to(dtype)
    layout = FlatLayout.of(model)
    classes = list(model.modules())[-1].out_features
    x = torch.randn(steps * batch_size, in_features, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (steps * batch_size,), generator=g)
    batches = [(x[i:i + batch_size], y[i:i + batch_size])
               for i in range(0, steps * batch_size, batch_size)]
    val = (torch.randn(20, in_features, generator=g, dtype=dtype),
           torch.randint(0, classes, (20,), generator=g))
    theta0 = layout.flatten(model)
    buffer0 = torch.randn(layout.numel, generator=g, dtype=dtype) if start_buffer else None
    lr = {"element": 0.1 + 0.4 * torch.rand(layout.numel, generator=g, dtype=dtype),
          "scalar": torch.tensor(lr, dtype=dtype), "number": lr}[lr_form]
    probe = torch.randn(layout.numel, generator=g, dtype=dtype)
    calls = _spy_native_unroll(monkeypatch)
    results = []
    for _ in ("native", "python"):
        theta = theta0.clone().requires_grad_(theta_grad)
        buffer = None if buffer0 is None else buffer0.clone().requires_grad_()
        lr_t = lr.clone().requires_grad_() if isinstance(lr, torch.Tensor) else lr
        mu = torch.tensor(0.7, dtype=dtype, requires_grad=True)
        wd = torch.tensor(1e-2, dtype=dtype, requires_grad=True)
        val_loss, theta_k, buffer_k = hpo.unrolled_validation_loss(
            model, layout, theta, buffer, lr_t, mu, wd, batches, val, impl="native",
            fused_model=True)
        inputs = [t for t in (theta, buffer, lr_t, mu, wd)
                  if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(val_loss + (probe * buffer_k).sum(), inputs)
        results.append([val_loss.detach(), theta_k.detach(), buffer_k.detach(), *grads])
        monkeypatch.setattr(mlp_native, "torch_blas_gemm", lambda dtype: None)  # then the loop
    assert len(calls) == 1, "the native unroll must run once, for the first unroll only"
    return results


def _assert_native_matches(results, dtype):
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert len(results[0]) == len(results[1])
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * float(e.abs().max()))


def _skip_without_blas(dtype):
    if backends.torch_blas_gemm(dtype) is None:
        pytest.skip("torch's library exports no BLAS gemm here")


@pytest.mark.native
@pytest.mark.parametrize("start", ["no_buffer", "buffer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", NATIVE_UNROLL_MODELS)
def test_native_unroll_matches_the_python_loop(name, dtype, start, monkeypatch):
    """The native unroll against _UnrolledMLP's Python loop (the same maths on torch ops):
    θ_K, b_K and every input's gradient, from a run's start and from a carried buffer."""
    _skip_without_blas(dtype)
    _assert_native_matches(_native_and_python(monkeypatch, MLP_MODELS[name], dtype,
                                              start_buffer=start == "buffer"), dtype)


@pytest.mark.native
@pytest.mark.parametrize("lr_form", ["element", "scalar", "number"])
@pytest.mark.parametrize("theta_grad", [True, False], ids=["theta0_grad", "no_theta0_grad"])
def test_native_unroll_gradients_asked_for(theta_grad, lr_form, monkeypatch):
    """θ_0 with and without a gradient (HPO's case: none, and the last H v is skipped), and
    the lr per element, a () tensor (its gradient from the step's hyperparameter table) or a
    number."""
    _skip_without_blas(torch.float64)
    _assert_native_matches(_native_and_python(
        monkeypatch, MLP_MODELS["relu"], torch.float64, start_buffer=True,
        theta_grad=theta_grad, lr_form=lr_form), torch.float64)


@pytest.mark.native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("steps", [1, 20])
def test_native_unroll_on_the_digits_mlp_shape(steps, dtype, monkeypatch):
    """The benchmark's shape, 64-100-10 with batches of 32 (large enough for MKL's blocked
    products), and a single step."""
    _skip_without_blas(dtype)
    _assert_native_matches(_native_and_python(
        monkeypatch, lambda: nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10)),
        dtype, in_features=64, batch_size=32, steps=steps), dtype)


@pytest.mark.native
def test_native_unroll_diverges_as_the_python_loop_does(monkeypatch):
    """A diverging run (lr 1e60): the same non-finite entries on both paths (ReLU's mask
    keeps the incoming gradient where the activation is NaN, as torch's threshold_backward)."""
    _skip_without_blas(torch.float64)
    native_bad, python_bad = _native_and_python(monkeypatch, MLP_MODELS["relu"], torch.float64,
                                                lr_form="number", theta_grad=True, lr=1e60)
    assert not torch.isfinite(python_bad[1]).all(), "the run must diverge"
    for a, e in zip(native_bad, python_bad):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.native
def test_native_unroll_takes_numbers_and_no_weight_decay(monkeypatch):
    """Scalar lr (no per-element lr gradient), weight decay the number 0 (θ̄ passes through
    the step), and only θ_0's and b_0's gradients asked for."""
    if backends.torch_blas_gemm(torch.float64) is None:
        pytest.skip("torch's library exports no BLAS gemm here")
    model, layout, batches, val, state, _, _ = _mlp_problem(MLP_MODELS["relu"], torch.float64)
    calls = _spy_native_unroll(monkeypatch)
    results = []
    for _ in range(2):
        theta = state[0].clone().requires_grad_()
        buffer = (state[0] * 0.1).requires_grad_()
        val_loss, theta_k, buffer_k = hpo.unrolled_validation_loss(
            model, layout, theta, buffer, 0.3, 0.9, 0.0, batches, val, impl="native",
            fused_model=True)
        grads = torch.autograd.grad(val_loss + buffer_k.sum(), [theta, buffer])
        results.append([val_loss.detach(), theta_k.detach(), buffer_k.detach(), *grads])
        monkeypatch.setattr(mlp_native, "torch_blas_gemm", lambda dtype: None)
    assert len(calls) == 1
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12 * float(e.abs().max()))


@pytest.mark.native
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("case", ["tanh", "unequal batches", "reference impl", "no BLAS",
                                  "zero-width layer"])
def test_native_unroll_leaves_the_rest_to_the_python_loop(case, monkeypatch):
    models = {**MLP_MODELS, "zero-width layer": lambda: nn.Sequential(
        nn.Linear(5, 0), nn.ReLU(), nn.Linear(0, 3))}
    name = case if case in ("tanh", "zero-width layer") else "relu"
    model, layout, batches, val, state, hypers, probe = _mlp_problem(models[name],
                                                                     torch.float64)
    impl = "reference" if case == "reference impl" else "native"
    if case == "unequal batches":
        batches = [*batches[:-1], (batches[-1][0][:5], batches[-1][1][:5])]
    if case == "no BLAS":
        monkeypatch.setenv("FASTMETA_NO_TORCH_BLAS", "1")
    calls = _spy_native_unroll(monkeypatch)
    mlp = _unroll("mlp", model, layout, state, hypers, batches, val, probe, impl=impl)
    assert mlp[4] and not calls
    eager = _unroll("eager", model, layout, state, hypers, batches, val, probe)
    _assert_mlp_close(mlp, eager)


def test_torch_blas_gemm_is_found_or_none(monkeypatch):
    for dtype in (torch.float32, torch.float64):
        address = backends.torch_blas_gemm(dtype)
        assert address is None or (isinstance(address, int) and address > 0)
    assert backends.torch_blas_gemm(torch.float16) is None
    monkeypatch.setenv("FASTMETA_NO_TORCH_BLAS", "1")
    assert backends.torch_blas_gemm(torch.float32) is None


@pytest.mark.parametrize("fused_model", [None, True, False])
def test_zero_momentum_number_is_refused_on_both_paths(fused_model):
    model, layout, batches, val, state, (lr, _, wd), _ = _mlp_problem(MLP_MODELS["tanh"],
                                                                      torch.float64)
    with pytest.raises(ValueError, match="momentum must not be 0"):
        hpo.unrolled_validation_loss(model, layout, state[0].requires_grad_(), None, lr, 0,
                                     wd, batches, val, fused_model=fused_model)


@pytest.mark.parametrize("why", list(UNSUPPORTED_MODELS))
def test_unsupported_models_take_the_per_step_path(why):
    problem, (auto, per_step) = _unroll_paths(UNSUPPORTED_MODELS[why], torch.float64, "auto",
                                              "per_step")
    model, layout, batches, val, state, hypers, probe = problem
    assert not auto[4]
    _assert_mlp_close(auto, per_step)
    with pytest.raises(UnsupportedModel, match=f"fused_model=True but .*{why}"):
        _unroll("mlp", model, layout, state, hypers, batches, val, probe)


def _ignored_label(batches):
    x, y = batches[1]
    y = y.clone()
    y[0] = -100  # F.cross_entropy's ignore_index
    return [batches[0], (x, y), *batches[2:]]


def _input_requiring_grad(batches):
    x, y = batches[0]
    return [(x.clone().requires_grad_(), y), *batches[1:]]


@pytest.mark.parametrize("change, why", [
    (_ignored_label, r"batches\[1\] has a class index outside \[0, 3\)"),
    (_input_requiring_grad, r"batches\[0\]'s inputs require grad"),
    (lambda batches: [], "no training batches"),
])
def test_unsupported_batches_take_the_per_step_path(change, why):
    model, layout, batches, val, state, hypers, probe = _mlp_problem(MLP_MODELS["tanh"],
                                                                     torch.float64)
    batches = change(batches)
    if batches:
        assert not _unroll("auto", model, layout, state, hypers, batches, val, probe)[4]
    with pytest.raises(UnsupportedModel, match=why):
        _unroll("mlp", model, layout, state, hypers, batches, val, probe)


def test_mlp_path_cannot_be_differentiated_twice():
    """A second derivative through the MLP path raises, w.r.t. the lr itself and w.r.t. z
    upstream of it (which torch's @once_differentiable would let through silently)."""
    task = _tiny_task(dtype=torch.float64)
    model = task.model(0)
    layout = FlatLayout.of(model)
    reparam = hpo.Reparametrization(2)
    index = hpo._layer_index(layout, hpo.layer_groups(model))
    z = reparam.encode(hpo.SGDHyperparameters((0.3, 0.1), 0.7, 1e-2), dtype=torch.float64)
    batches = [(task.train[0][i:i + 16], task.train[1][i:i + 16]) for i in (0, 16)]
    for fused_model in (True, False):
        z_leaf = z.clone().requires_grad_()
        lr, momentum, weight_decay = reparam.decode(z_leaf)
        lr = lr[index]
        val_loss, _, _ = hpo.unrolled_validation_loss(
            model, layout, layout.flatten(model).requires_grad_(), None, lr, momentum,
            weight_decay, batches, task.val, fused_model=fused_model)
        if fused_model:
            for wrt in (lr, z_leaf):
                with pytest.raises(RuntimeError, match="differentiable once.*fused_model=False"):
                    torch.autograd.grad(val_loss, wrt, create_graph=True, retain_graph=True)
        else:  # the per-step path is differentiable to any order
            (grad,) = torch.autograd.grad(val_loss, z_leaf, create_graph=True)
            assert torch.autograd.grad(grad.sum(), z_leaf)[0].abs().max() > 0


def test_fused_model_must_be_a_bool_or_none():
    model, layout, batches, val, state, hypers, _ = _mlp_problem(MLP_MODELS["tanh"],
                                                                 torch.float64)
    with pytest.raises(TypeError, match="fused_model must be None, True or False"):
        hpo.unrolled_validation_loss(model, layout, state[0], None, *hypers, batches, val,
                                     fused_model="yes")


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
