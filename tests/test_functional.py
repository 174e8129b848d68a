"""The differentiable, task-batched steps of fastmeta.functional (and their autograd.Functions).

One database of step configurations (CASES) drives every generic test: first and second
derivatives in float64 for every input that requires grad, parity of the native and Triton
(interpreted) kernels with the reference in the forward and the backward, and the layouts
[N] and [T, N] with lr per task and per parameter.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import pytest
import torch

from fastmeta import backends
from fastmeta import functional as F
from fastmeta.backends import Impl
from fastmeta.ops.adam import adam_step_reference
from tests.conftest import impl_param
from tests.tolerances import assert_close

TASKS, NUMEL = 3, 5  # gradcheck sizes: every input gets a column of a Jacobian per element
PARITY_TASKS, PARITY_NUMEL = 3, 37  # not a multiple of any block, still quick to interpret


@dataclasses.dataclass(frozen=True)
class Case:
    """One step configuration: the functional, its state (``positive``: states that must be
    > 0, as second moments are) and the hyperparameters given as tensors (with their values;
    ``per_task`` ones are [T] in the batched layout)."""

    name: str
    fn: Callable
    state: Callable[[list[torch.Tensor]], object] | None = None
    state_names: tuple[str, ...] = ()
    positive: tuple[str, ...] = ()
    hypers: dict = dataclasses.field(default_factory=dict)
    per_task: tuple[str, ...] = ()
    floats: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


def _adam_state(tensors):
    return F.AdamState(1, *tensors)  # step 2: the bias corrections depend on the betas


def _adagrad_state(tensors):
    return F.AdagradState(2, *tensors)


CASES = [
    Case("sgd", F.sgd, hypers={"weight_decay": 0.1}, per_task=("weight_decay",)),
    Case("momentum", F.momentum, lambda s: F.MomentumState(*s), ("momentum_buffer",),
         hypers={"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.1}, per_task=("momentum",)),
    Case("momentum-first-step", F.momentum, None, (),
         hypers={"momentum": 0.8, "weight_decay": 0.1}),
    Case("nesterov", F.momentum, lambda s: F.MomentumState(*s), ("momentum_buffer",),
         hypers={"momentum": 0.8}, floats={"nesterov": True, "maximize": True}),
    Case("adam", F.adam, _adam_state, ("exp_avg", "exp_avg_sq"), ("exp_avg_sq",),
         hypers={"beta1": 0.8, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.1,
                 "eps_root": 1e-2}, per_task=("beta2",)),
    Case("adamw", F.adamw, _adam_state, ("exp_avg", "exp_avg_sq"), ("exp_avg_sq",),
         hypers={"beta1": 0.8, "beta2": 0.9, "weight_decay": 0.1}, per_task=("weight_decay",),
         floats={"eps": 1e-3, "maximize": True}),
    Case("rmsprop-centered-momentum", F.rmsprop, lambda s: F.RmspropState(*s),
         ("square_avg", "momentum_buffer", "grad_avg"), ("square_avg",),
         hypers={"alpha": 0.7, "eps": 1e-2, "weight_decay": 0.1, "momentum": 0.5},
         per_task=("alpha",), floats={"centered": True}),
    Case("rmsprop", F.rmsprop, lambda s: F.RmspropState(s[0], None, None), ("square_avg",),
         ("square_avg",), hypers={"alpha": 0.7, "eps": 1e-2}, floats={"maximize": True}),
    Case("adagrad", F.adagrad, _adagrad_state, ("state_sum",), ("state_sum",),
         hypers={"lr_decay": 0.1, "weight_decay": 0.1, "eps": 1e-2}, per_task=("eps",)),
]

# (layout, lr shape): [N] with a scalar or per-element lr; [T, N] with every lr mode.
LR_MODES = [
    ("flat", "scalar"), ("flat", "element"),
    ("batched", "scalar"), ("batched", "task"), ("batched", "element"), ("batched", "task-element"),
]


def _lr_shape(layout: str, mode: str, tasks: int, numel: int) -> tuple[int, ...]:
    return {"scalar": (), "task": (tasks,), "element": (numel,),
            "task-element": (tasks, numel)}[mode]


def _inputs(case: Case, layout: str, mode: str, dtype, tasks=TASKS, numel=NUMEL):
    """Leaf tensors for one call: params, grads, states, lr and the tensor hyperparameters,
    each requiring grad, in that order, and a function of them that returns every output."""
    shape = (numel,) if layout == "flat" else (tasks, numel)
    params = torch.randn(shape, dtype=dtype)
    grads = torch.randn(shape, dtype=dtype)
    states = [torch.rand(shape, dtype=dtype) + 0.5 if n in case.positive
              else 0.3 * torch.randn(shape, dtype=dtype) for n in case.state_names]
    lr = torch.rand(_lr_shape(layout, mode, tasks, numel), dtype=dtype) * 0.1 + 0.05
    hyper_names = list(case.hypers)
    hypers = []
    for name in hyper_names:
        value = torch.tensor(case.hypers[name], dtype=dtype)
        if name in case.per_task and layout == "batched":
            value = value * (1 - 0.1 * torch.arange(tasks, dtype=dtype))
        hypers.append(value)
    leaves = [t.requires_grad_() for t in (params, grads, *states, lr, *hypers)]
    n_states = len(states)

    def call(*args, impl="reference", first_order=False):
        p, g, *rest = args
        st, lr_, hy = rest[:n_states], rest[n_states], rest[n_states + 1:]
        kwargs = dict(zip(hyper_names, hy))
        if "beta1" in kwargs:
            kwargs["betas"] = (kwargs.pop("beta1"), kwargs.pop("beta2"))
        state = case.state(list(st)) if case.state else None
        new_p, new_state = case.fn(p, g, state, lr=lr_, **kwargs, **case.floats, impl=impl,
                                   first_order=first_order)
        outs = [new_p]
        if new_state is not None:
            outs += [s for s in new_state if isinstance(s, torch.Tensor)]
        return tuple(outs)

    return leaves, call


def _case_id(case, layout, mode):
    return f"{case}-{layout}-{mode}"


GRID = [pytest.param(c, lay, mode, id=_case_id(c, lay, mode))
        for c, (lay, mode) in itertools.product(CASES, LR_MODES)]


@pytest.mark.native
@pytest.mark.parametrize("case,layout,mode", GRID)
def test_gradcheck_native(case, layout, mode):
    """The fused native backward: every input requires grad (params, grads, states, lr and
    every tensor hyperparameter)."""
    leaves, call = _inputs(case, layout, mode, torch.float64)
    with backends.trace() as calls:
        assert torch.autograd.gradcheck(lambda *a: call(*a, impl="native"), leaves)
    assert {impl for _, impl in calls} == {Impl.NATIVE}


SECOND_ORDER = [pytest.param(c, lay, mode, id=_case_id(c, lay, mode))
                for c, (lay, mode) in itertools.product(
                    CASES, [("flat", "element"), ("batched", "task")])]


@pytest.mark.native
@pytest.mark.parametrize("case,layout,mode", SECOND_ORDER)
def test_gradgradcheck_native(case, layout, mode):
    """Double backward (MAML through the update, Hessian-vector products of the meta-loss)."""
    leaves, call = _inputs(case, layout, mode, torch.float64)
    assert torch.autograd.gradgradcheck(lambda *a: call(*a, impl="native"), leaves)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck_reference(case):
    leaves, call = _inputs(case, "batched", "task-element", torch.float64)
    assert torch.autograd.gradcheck(lambda *a: call(*a, impl="reference"), leaves)


def _parity(case, layout, mode, impl, dtype):
    leaves, call = _inputs(case, layout, mode, dtype, PARITY_TASKS, PARITY_NUMEL)
    with backends.trace() as calls:
        outs = call(*leaves, impl=impl)
    assert {i for _, i in calls} == {Impl(impl)}
    expected = call(*leaves, impl="reference")
    for out, exp in zip(outs, expected):
        assert_close(out, exp)
    cotangents = [torch.randn_like(o) for o in expected]
    got = torch.autograd.grad(outs, leaves, cotangents)
    want = torch.autograd.grad(expected, leaves, cotangents)
    for i, (a, b) in enumerate(zip(got, want)):
        # hyperparameter gradients are sums over many elements: compare them at their scale
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a / scale, b / scale,
                                   **({"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32
                                      else {"rtol": 1e-7, "atol": 1e-9}),
                                   msg=f"gradient of input {i}")


@pytest.mark.parametrize("impl", [impl_param("native"), impl_param("triton")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case,layout,mode", [
    pytest.param(c, lay, mode, id=_case_id(c, lay, mode))
    for c, (lay, mode) in itertools.product(
        CASES, [("flat", "scalar"), ("batched", "task"), ("batched", "element"),
                ("batched", "task-element")])])
def test_parity_with_reference(case, layout, mode, impl, dtype):
    _parity(case, layout, mode, impl, dtype)


def _without_weight_decay(case: Case) -> Case:
    hypers = {k: v for k, v in case.hypers.items() if k != "weight_decay"}
    return dataclasses.replace(case, hypers=hypers,
                               per_task=tuple(n for n in case.per_task if n in hypers))


@pytest.mark.parametrize("impl", [impl_param("native"), impl_param("triton")])
@pytest.mark.parametrize("wanted", ["params", "grads", "lr"])
@pytest.mark.parametrize("weight_decay", [True, False], ids=["decay", "no-decay"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_writes_only_the_wanted_gradients(case, weight_decay, wanted, impl):
    """The kernels skip the input gradients nobody asked for, and without weight decay the
    params' gradient is the incoming one itself; each wanted gradient still equals the
    reference's."""
    if not weight_decay:
        case = _without_weight_decay(case)
    leaves, call = _inputs(case, "batched", "task", torch.float64, PARITY_TASKS, PARITY_NUMEL)
    index = {"params": 0, "grads": 1, "lr": 2 + len(case.state_names)}[wanted]
    leaves = [t.detach().requires_grad_(i == index) for i, t in enumerate(leaves)]
    outs = call(*leaves, impl=impl)
    expected = call(*leaves, impl="reference")
    cotangents = [torch.randn_like(o) for o in expected]
    got, = torch.autograd.grad(outs, leaves[index], cotangents)
    want, = torch.autograd.grad(expected, leaves[index], cotangents)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.native
@pytest.mark.parametrize("lr_shape", [(3,), (12001,)], ids=["task", "element"])
def test_native_many_chunks_and_threads_is_deterministic(lr_shape):
    """Large enough for several column chunks, OpenMP, and a partial reduction block; the
    hyperparameter gradients are reduced in a fixed order, so two runs agree bit for bit."""
    case = next(c for c in CASES if c.name == "adam")
    leaves, call = _inputs(case, "batched", "scalar", torch.float64, tasks=3, numel=12001)
    leaves[len(case.state_names) + 2] = (torch.rand(lr_shape, dtype=torch.float64) * 0.1
                                         ).requires_grad_()
    outs = call(*leaves, impl="native")
    cotangents = [torch.randn_like(o) for o in outs]
    first = torch.autograd.grad(call(*leaves, impl="native"), leaves, cotangents)
    again = torch.autograd.grad(call(*leaves, impl="native"), leaves, cotangents)
    want = torch.autograd.grad(call(*leaves, impl="reference"), leaves, cotangents)
    for a, b, w in zip(first, again, want):
        assert torch.equal(a, b)
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(a / scale, w / scale, rtol=1e-9, atol=1e-11)


# ---- A chain of steps: recomputed state, saved memory, NaN ---------------------------------


def _adam_chain(theta, grads, impl, eps_root=1e-3, lr=0.1):
    state = None
    for g in grads:
        theta, state = F.adam(theta, g(theta), state, lr=lr, eps_root=eps_root, impl=impl)
    return theta, state


@pytest.mark.parametrize("impl", [impl_param("reference"), impl_param("native"),
                                  impl_param("triton")])
def test_chain_recomputes_state_exactly(impl):
    """Three steps where each step's state comes from the previous step: only the first saves
    its state, the others recompute it in the backward. Compare with eager reference ops."""
    torch.manual_seed(1)
    theta0 = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 9, dtype=torch.float64)
    grads = [lambda th, k=k: torch.sin(th * w * (k + 1)) for k in range(3)]
    theta, state = _adam_chain(theta0, grads, impl)
    loss = (theta ** 2).sum() + state.exp_avg.sum() + state.exp_avg_sq.sum()
    got, = torch.autograd.grad(loss, theta0)
    p, m, v = theta0, torch.zeros_like(theta0), torch.zeros_like(theta0)
    for k, g in enumerate(grads):
        p, m, v, _ = adam_step_reference(p, g(p), m, v, step=k + 1, lr=0.1, eps_root=1e-3)
    want, = torch.autograd.grad((p ** 2).sum() + m.sum() + v.sum(), theta0)
    assert_close(got, want)


@pytest.mark.native
@pytest.mark.parametrize("rule", ["momentum", "adam", "rmsprop", "adagrad"])
def test_chain_second_order(rule):
    """Double backward through a chain, where the later steps' input states are recomputed
    with differentiable ops."""
    fn = {"momentum": F.momentum, "adam": F.adam, "rmsprop": F.rmsprop,
          "adagrad": F.adagrad}[rule]
    extra = {"adam": {"eps_root": 1e-2, "eps": 1e-3}, "rmsprop": {"eps": 1e-2},
             "adagrad": {"eps": 1e-2}}.get(rule, {})

    def chain(theta, w, lr):
        state = None
        for k in range(3):
            theta, state = fn(theta, torch.sin(theta * w * (k + 1)), state, lr=lr, **extra,
                              impl="native")
        return theta

    inputs = (torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
              torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradgradcheck(chain, inputs)


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


@pytest.mark.native
def test_chain_saves_only_the_gradients():
    """K Adam steps without weight decay save the K gradients alone: not the moments of every
    step, and nothing of the zero initial state (absent: the kernel reads it as zeros)."""
    theta0 = torch.randn(4, 100, requires_grad=True)
    steps = 5
    grads = [torch.randn(4, 100, requires_grad=True) for _ in range(steps)]
    saved, _ = _saved_bytes(lambda: _adam_chain(theta0, [lambda th, g=g: g for g in grads],
                                                "native"))
    element = theta0.numel() * theta0.element_size()
    assert saved == steps * element


@pytest.mark.parametrize("impl", [impl_param("reference"), impl_param("native"),
                                  impl_param("triton")])
def test_adam_meta_gradient_has_no_nan_at_zero(impl):
    """Zero gradients on a zero state: √v' sits at 0, where eager autograd makes 0/0."""
    theta0 = torch.zeros(3, 8, requires_grad=True)
    lr = torch.tensor(0.1, requires_grad=True)
    state = None
    theta = theta0
    for _ in range(3):
        g = theta * 0.0  # zero, but on the graph: the meta-gradient goes through it
        theta, state = F.adam(theta, g, state, lr=lr, eps_root=1e-8, impl=impl)
    d_theta, d_lr = torch.autograd.grad(theta.sum() + state.exp_avg_sq.sum(), (theta0, lr))
    assert torch.isfinite(d_theta).all() and torch.isfinite(d_lr).all()


@pytest.mark.native
def test_fused_adam_is_finite_where_eager_is_nan():
    """With eps_root = 0, the fused backward still knows θ' does not depend on v' where m' = 0,
    and it equals the reference wherever the reference is finite."""
    theta0 = torch.randn(2, 6, requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])

    def grads(th):
        return th * mask  # some coordinates always have zero gradient

    theta, _ = _adam_chain(theta0, [grads] * 3, "native", eps_root=0.0)
    fused, = torch.autograd.grad(theta.sum(), theta0)
    theta, _ = _adam_chain(theta0, [grads] * 3, "reference", eps_root=0.0)
    eager, = torch.autograd.grad(theta.sum(), theta0)
    assert torch.isfinite(fused).all()
    assert not torch.isfinite(eager).all()
    finite = torch.isfinite(eager)
    assert_close(fused[finite], eager[finite])


# ---- First order, structure, torch.func ----------------------------------------------------


@pytest.mark.native
def test_first_order_keeps_no_graph_through_the_gradient():
    theta0 = torch.randn(3, 10, requires_grad=True)
    w = torch.randn(10, requires_grad=True)
    g = torch.autograd.grad(((theta0 * w) ** 2).sum(), theta0, create_graph=True)[0]
    first, second = [], []
    for out, first_order in ((first, True), (second, False)):
        saved, (theta, _) = _saved_bytes(
            lambda fo=first_order: F.adam(theta0, g, lr=0.1, first_order=fo, impl="native"))
        out.append(saved)
        out.append(torch.autograd.grad(theta.sum(), w, allow_unused=True)[0])
    assert first[1] is None  # no path from the new params back to w through g
    assert second[1] is not None
    assert first[0] <= second[0]


@pytest.mark.parametrize("impl", [impl_param("reference"), impl_param("native")])
def test_list_of_tensors_keeps_its_structure(impl):
    shapes = [(3, 4), (4,), (2, 1, 3)]
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    lrs = [torch.rand(s) for s in shapes]
    new, state = F.adam(params, grads, lr=lrs, impl=impl)
    flat, flat_state = F.adam(torch.cat([p.reshape(-1) for p in params]),
                              torch.cat([g.reshape(-1) for g in grads]),
                              lr=torch.cat([lr.reshape(-1) for lr in lrs]), impl="reference")
    assert [t.shape for t in new] == [torch.Size(s) for s in shapes]
    assert [t.shape for t in state.exp_avg] == [torch.Size(s) for s in shapes]
    assert_close(torch.cat([t.reshape(-1) for t in new]), flat)
    assert_close(torch.cat([t.reshape(-1) for t in state.exp_avg_sq]), flat_state.exp_avg_sq)


@pytest.mark.parametrize("impl", [impl_param("reference"), impl_param("native"),
                                  impl_param("triton")])
def test_empty_buffers(impl):
    theta = torch.zeros(3, 0, requires_grad=True)
    lr = torch.rand(3, requires_grad=True)
    new, state = F.adam(theta, torch.zeros(3, 0), lr=lr, impl=impl)
    d_theta, d_lr = torch.autograd.grad(new.sum() + state.exp_avg.sum(), (theta, lr))
    assert d_theta.shape == (3, 0) and torch.equal(d_lr, torch.zeros(3))


@pytest.mark.native
def test_vmap_maps_onto_the_task_dimension():
    params, grads = torch.randn(4, 2, 6), torch.randn(4, 2, 6)
    lr = torch.rand(4, 2)
    got = torch.func.vmap(lambda p, g, lr: F.momentum(p, g, lr=lr, impl="native")[0])(
        params, grads, lr)
    want = torch.stack([F.momentum(params[i], grads[i], lr=lr[i], impl="reference")[0]
                        for i in range(4)])
    assert_close(got, want)


@pytest.mark.native
def test_torch_func_grad_and_vmap_of_grad():
    params, grads = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)

    def loss(p, g, impl):
        return F.adam(p, g, lr=0.1, eps_root=1e-3, impl=impl)[0].pow(2).sum()

    got = torch.func.vmap(torch.func.grad(lambda p, g: loss(p, g, "native")))(params, grads)
    want = torch.func.grad(lambda p: loss(p, grads, "reference"))(params)
    assert_close(got, want)


# ---- Bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["auto", "reference"])
class TestBadInput:
    def test_grads_shape_mismatch(self, impl):
        with pytest.raises(ValueError, match=r"adam_step: grads has shape \(4,\) but params has "
                           r"shape \(3,\)"):
            F.adam(torch.ones(3), torch.ones(4), lr=0.1, impl=impl)

    def test_state_shape_mismatch(self, impl):
        state = F.AdamState(1, torch.zeros(3), torch.zeros(2, 3))
        with pytest.raises(ValueError, match=r"exp_avg_sq has shape \(2, 3\) but params has "
                           r"shape \(3,\)"):
            F.adam(torch.ones(3), torch.ones(3), state, lr=0.1, impl=impl)

    def test_wrong_task_dimension_of_state(self, impl):
        with pytest.raises(ValueError, match=r"momentum_buffer has 2 tasks .* but params has 3"):
            F.momentum(torch.ones(3, 5), torch.ones(3, 5), F.MomentumState(torch.ones(2, 5)),
                       lr=0.1, impl=impl)

    def test_wrong_task_dimension_of_lr(self, impl):
        with pytest.raises(ValueError, match=r"sgd_step: lr has shape \(4,\) but params has "
                           r"shape \(3, 5\)"):
            F.sgd(torch.ones(3, 5), torch.ones(3, 5), lr=torch.ones(4), impl=impl)

    def test_wrong_task_dimension_of_a_hyperparameter(self, impl):
        with pytest.raises(ValueError, match=r"beta1 has 2 values but params has 3 tasks"):
            F.adam(torch.ones(3, 5), torch.ones(3, 5), lr=0.1,
                   betas=(torch.full((2,), 0.9), 0.999), impl=impl)

    def test_ambiguous_lr(self, impl):
        with pytest.raises(ValueError, match="lr has shape \\(4,\\), which is ambiguous"):
            F.sgd(torch.ones(4, 4), torch.ones(4, 4), lr=torch.ones(4), impl=impl)

    def test_mixed_dtypes(self, impl):
        with pytest.raises(TypeError, match=r"grads has dtype torch.float64 but params has "
                           r"torch.float32"):
            F.sgd(torch.ones(3), torch.ones(3, dtype=torch.float64), lr=0.1, impl=impl)

    def test_half_precision_is_refused(self, impl):
        with pytest.raises(TypeError, match=r"params has dtype torch.bfloat16; the "
                           r"differentiable steps support float32 and float64"):
            F.sgd(torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16),
                  lr=0.1, impl=impl)

    def test_hyperparameter_dtype(self, impl):
        with pytest.raises(TypeError, match=r"lr has dtype torch.float64 but params has "
                           r"torch.float32"):
            F.sgd(torch.ones(3), torch.ones(3), lr=torch.tensor(0.1, dtype=torch.float64),
                  impl=impl)

    def test_hyperparameter_on_another_device(self, impl):
        with pytest.raises(ValueError, match="rmsprop_step: alpha is on meta but params is on "
                           "cpu"):
            F.rmsprop(torch.ones(3), torch.ones(3), lr=0.1,
                      alpha=torch.tensor(0.9, device="meta"), impl=impl)

    def test_grads_on_another_device(self, impl):
        with pytest.raises(ValueError, match="grads is on meta but params is on cpu"):
            F.adagrad(torch.ones(3), torch.ones(3, device="meta"), lr=0.1, impl=impl)

    def test_params_of_three_dimensions(self, impl):
        with pytest.raises(ValueError, match=r"params must be \[N\] .* or \[T, N\]"):
            F.sgd(torch.ones(2, 3, 4), torch.ones(2, 3, 4), lr=0.1, impl=impl)

    def test_list_length_mismatch(self, impl):
        with pytest.raises(ValueError, match="grads must be a list of 2 tensors like params"):
            F.sgd([torch.ones(3), torch.ones(2)], [torch.ones(3)], lr=0.1, impl=impl)

    def test_negative_lr(self, impl):
        with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
            F.adam(torch.ones(3), torch.ones(3), lr=-0.1, impl=impl)

    def test_nesterov_with_dampening(self, impl):
        with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero "
                           "dampening"):
            F.momentum(torch.ones(3), torch.ones(3), lr=0.1, nesterov=True, dampening=0.1,
                       impl=impl)
