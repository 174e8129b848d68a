"""The fused LSTM rule (``csrc/lstm_rule.cpp``, ``fastmeta/kernels/lstm_rule.py``) against the
``nn.LSTMCell`` reference: forward and backward parity, derivatives, the non-finite policy,
determinism of the weight gradients, and the wiring into ``LSTMOptimizer``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from fastmeta import backends
from fastmeta.meta import LSTMOptimizer, LSTMState
from fastmeta.ops.lstm_rule import (
    LSTMRuleWeights,
    lstm_rule,
    lstm_rule_reference,
)
from tests.conftest import impl_param
from tests.tolerances import assert_close

P = 10.0
FUSED = [impl_param("native"), impl_param("triton")]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


def _gradients(n: int, dtype: torch.dtype) -> torch.Tensor:
    """n gradients over many magnitudes, with the special values first (as many as fit):
    zero, tiny on both sides of the preprocessing threshold e^-p, NaN and ±inf."""
    threshold = math.exp(-P)
    special = [0.0, 0.5 * threshold, -0.25 * threshold, float("nan"), 3.0 * threshold,
               float("inf"), -1e-3, float("-inf"), 7.0]
    g = torch.randn(n, dtype=dtype) * torch.logspace(-9, 1, max(n, 1), dtype=dtype)[:n]
    k = min(n, len(special))
    g[:k] = torch.tensor(special[:k], dtype=dtype)
    return g


def _setup(n: int, hidden: int, dtype: torch.dtype, *, with_state: bool = True):
    rule = LSTMOptimizer(hidden_size=hidden).to(dtype)
    g = _gradients(n, dtype)
    state = (LSTMState(*(0.5 * torch.randn(n, hidden, dtype=dtype) for _ in range(4)))
             if with_state else None)
    return rule, g, state


def _run(rule, g, state, impl):
    """Forward of ``impl`` (or the module reference) and the gradients of a random linear
    function of every output w.r.t. g, the state and every weight."""
    g = g.clone().requires_grad_()
    st = LSTMState(*(s.clone().requires_grad_() for s in state)) if state is not None else None
    if impl == "reference":
        update, new_state, skipped = lstm_rule_reference(g, st, rule.cell1, rule.cell2,
                                                         rule.head, p=P)
    else:
        weights = LSTMRuleWeights.from_modules(rule.cell1, rule.cell2, rule.head)
        with backends.trace() as calls:
            update, new_state, skipped = lstm_rule(g, st, weights, p=P, impl=impl)
        assert calls == [("lstm_rule", backends.Impl(impl))]
    outputs = [update, *new_state]
    gen = torch.Generator().manual_seed(1)
    # Drawn in float32 (exact in float64 too), so a float64 run sees the same cotangents.
    cotangents = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs]
    inputs = [g, *(st if st is not None else ()), *rule.parameters()]
    grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    return [o.detach() for o in outputs], skipped, grads


def _assert_as_accurate_as_the_reference(actual, expected, exact, name):
    """A float32 gradient, by flash-attention's rule: its largest error against the float64
    reference may be at most twice the float32 reference's own, plus assert_close's default
    tolerance at the tensor's scale. Elementwise assert_close is not a fair test here: ∂L/∂g of
    a tiny g is e^p ≈ 2.2e4 times a sum with cancellation, where two correct float32
    computations (different summation orders) differ by a few ulp of the sum's terms."""
    if actual.numel() == 0:
        assert actual.shape == expected.shape
        return
    exact = exact.to(actual.dtype)
    error = (actual - exact).abs().max()
    reference_error = (expected - exact).abs().max()
    allowed = 2 * reference_error + 1e-5 + 1.3e-6 * exact.abs().max()
    assert error <= allowed, (
        f"{name}: max error {error:.3g}, the float32 reference's {reference_error:.3g}")


def _check_parity(impl, n, hidden, dtype, *, with_state=True):
    """Outputs and gradients of ``impl`` against the nn.LSTMCell reference: assert_close in
    float64 and for the float32 outputs; float32 gradients as explained above."""
    torch.manual_seed(0)
    rule, g, state = _setup(n, hidden, dtype, with_state=with_state)
    outs, skipped, grads = _run(rule, g, state, impl)
    ref_outs, ref_skipped, ref_grads = _run(rule, g, state, "reference")
    assert torch.equal(skipped, ref_skipped)
    names = ["update", *LSTMState._fields, "d/dgrad",
             *(f"d/d{s}" for s in (LSTMState._fields if with_state else ())),
             *(f"d/d{name}" for name, _ in rule.named_parameters())]
    actual, expected = [*outs, *grads], [*ref_outs, *ref_grads]
    if dtype == torch.float64:
        for name, a, b in zip(names, actual, expected):
            assert_close(a, b, msg=name)
    else:
        rule64 = LSTMOptimizer(hidden_size=hidden).double()
        rule64.load_state_dict(rule.state_dict())
        state64 = LSTMState(*(s.double() for s in state)) if with_state else None
        _, _, exact_grads = _run(rule64, g.double(), state64, "reference")
        for name, a, b in zip(names, outs, ref_outs):
            assert_close(a, b, msg=name)
        for name, a, b, e in zip(names[len(outs):], grads, ref_grads, exact_grads):
            _assert_as_accurate_as_the_reference(a, b, e, name)
    return g, state, outs, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4, 20])
@pytest.mark.parametrize("n", [0, 1, 37])
@pytest.mark.parametrize("impl", [impl_param("native")])
def test_native_forward_and_backward_match_the_lstmcell_reference(impl, n, hidden, dtype):
    """37 is not a multiple of any ISA's block (4 to 32 coordinates); n = 1 is a lone tail."""
    _check_parity(impl, n, hidden, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.native
def test_native_spans_many_chunks(dtype):
    """n = 2,600 runs five chunks (four of 576 and the last of 296, bindings.cpp's lstm_chunk)
    on the threads: each keeps its own weight-gradient sums."""
    _check_parity("native", 2600, 20, dtype)


@pytest.mark.parametrize("impl", FUSED)
def test_strided_weights_and_state_get_gradients_in_their_own_layout(impl):
    """A weight or a state passed as a transposed view: the kernels read contiguous copies, and
    the gradients autograd receives must be laid out like the inputs, not like the copies."""
    torch.manual_seed(0)
    hidden, n = 4, 37
    rule = LSTMOptimizer(hidden_size=hidden).double()
    weights = LSTMRuleWeights.from_modules(rule.cell1, rule.cell2, rule.head)
    w_hh1_t = weights.weight_hh1.detach().t().contiguous().requires_grad_()  # [H, 4H]
    h1_t = torch.randn(hidden, n, dtype=torch.float64, requires_grad=True)  # [H, n]
    rest = [torch.randn(n, hidden, dtype=torch.float64) for _ in range(3)]
    g = torch.randn(n, dtype=torch.float64)
    grads = {}
    for which in (impl, "reference"):
        strided = weights._replace(weight_hh1=w_hh1_t.t())
        update, state, _ = lstm_rule(g, LSTMState(h1_t.t(), *rest), strided, impl=which)
        loss = (update * torch.linspace(-1, 1, n, dtype=torch.float64)).sum() + state.c2.sum()
        grads[which] = torch.autograd.grad(loss, (w_hh1_t, h1_t))
    for name, a, b in zip(("weight_hh1", "h1"), grads[impl], grads["reference"]):
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", FUSED)
def test_first_step_without_state_matches(impl, dtype):
    _check_parity(impl, 11, 4, dtype, with_state=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4, 20])
@pytest.mark.parametrize("n", [0, 1, 19])
@pytest.mark.parametrize("impl", [impl_param("triton")])
def test_triton_forward_and_backward_match_the_lstmcell_reference(impl, n, hidden, dtype):
    """Under TRITON_INTERPRET=1 on the CPU (kept small: the interpreter is slow)."""
    _check_parity(impl, n, hidden, dtype)


@pytest.mark.parametrize("impl", FUSED)
def test_non_finite_gradients_skip_their_coordinate_and_pass_state_gradients(impl):
    g, state, outs, grads = _check_parity(impl, 9, 4, torch.float64)
    bad = ~torch.isfinite(g)
    assert bad.sum() == 3
    update, h1, c1, h2, c2 = outs
    assert torch.all(update[bad] == 0)
    for new, old in zip((h1, c1, h2, c2), state):
        assert torch.equal(new[bad], old[bad])
    # ∂L/∂g is 0 for a skipped g, and its state's gradient is the incoming one (identity).
    assert torch.all(grads[0][bad] == 0)
    gen = torch.Generator().manual_seed(1)  # _run's cotangents
    cotangents = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    for d_state, incoming in zip(grads[1:5], cotangents[1:]):
        assert torch.equal(d_state[bad], incoming[bad])


@pytest.mark.native
def test_native_gradcheck_in_float64():
    """Every input: the gradient (all three branches of the preprocessing, and a NaN), the
    four states and every weight tensor."""
    torch.manual_seed(0)
    n, hidden = 6, 3
    g = torch.tensor([0.3, -2e-5, 1e-6, -0.02, float("nan"), 1.5], dtype=torch.float64)
    state = [0.4 * torch.randn(n, hidden, dtype=torch.float64) for _ in range(4)]
    rule = LSTMOptimizer(hidden_size=hidden).double()
    weights = [w.detach().clone()
               for w in LSTMRuleWeights.from_modules(rule.cell1, rule.cell2, rule.head)]
    inputs = [t.requires_grad_() for t in (g, *state, *weights)]

    def fn(grad, *rest):
        update, new_state, _ = lstm_rule(grad, LSTMState(*rest[:4]), LSTMRuleWeights(*rest[4:]),
                                         p=P, impl="native")
        return (update, *new_state)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.native
def test_create_graph_falls_back_to_the_differentiable_reference():
    """Second derivatives (gradgradcheck) are exact: the backward under create_graph is the
    reference's VJP."""
    torch.manual_seed(0)
    n, hidden = 3, 2
    g = torch.tensor([0.3, -2e-5, -0.02], dtype=torch.float64)
    state = [0.4 * torch.randn(n, hidden, dtype=torch.float64) for _ in range(4)]
    rule = LSTMOptimizer(hidden_size=hidden).double()
    weights = [w.detach().clone()
               for w in LSTMRuleWeights.from_modules(rule.cell1, rule.cell2, rule.head)]
    inputs = [t.requires_grad_() for t in (g, *state, weights[0], weights[6])]

    def fn(grad, h1, c1, h2, c2, w_ih1, w_head):
        w = LSTMRuleWeights(w_ih1, *weights[1:6], w_head, weights[7])
        update, new_state, _ = lstm_rule(grad, LSTMState(h1, c1, h2, c2), w, p=P,
                                         impl="native")
        return (update, *new_state)

    assert torch.autograd.gradgradcheck(fn, inputs)


_DETERMINISM_SCRIPT = textwrap.dedent("""
    import torch
    from fastmeta.meta import LSTMOptimizer
    torch.manual_seed(0)
    rule = LSTMOptimizer(impl="native")
    g = torch.randn(5000) * 1e-2
    update, state = rule(g, rule.initial_state(5000))
    (update.sum() + state.c2.sum()).backward()
    print(torch.cat([p.grad.reshape(-1) for p in rule.parameters()]).double().sum().item(),
          torch.cat([p.grad.reshape(-1) for p in rule.parameters()]).abs().sum().item())
""")


@pytest.mark.native
def test_weight_gradients_do_not_depend_on_the_thread_count():
    results = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT], env=env,
                             capture_output=True, text=True, check=True)
        results.append(out.stdout.strip())
    assert results[0] == results[1]


@pytest.mark.native
def test_lstm_optimizer_runs_the_fused_kernel_and_matches_its_reference_over_steps():
    torch.manual_seed(0)
    fused = LSTMOptimizer()
    reference = LSTMOptimizer(impl="reference")
    reference.load_state_dict(fused.state_dict())
    g = [torch.randn(300) * 0.1 for _ in range(4)]
    s_f = s_r = None
    for step in g:
        with backends.trace() as calls:
            u_f, s_f = fused(step, s_f)
        assert calls == [("lstm_rule", backends.Impl.NATIVE)]
        u_r, s_r = reference(step, s_r)
        assert_close(u_f, u_r)
        for a, b in zip(s_f, s_r):
            assert_close(a, b)


@pytest.mark.native
@pytest.mark.parametrize("second_order", [False, True], ids=["first_order", "second_order"])
def test_unroll_meta_gradient_is_the_same_fused_or_not(second_order):
    """Truncated BPTT through the fused op (weights, states, and with second_order the
    optimizee gradients too) gives the reference's meta-gradient."""
    from fastmeta.meta.lstm_training import QuadraticProblems, unroll

    problems = QuadraticProblems(3, dim=4, generator=torch.Generator().manual_seed(1),
                                 dtype=torch.float64)
    meta_grads = []
    for impl in ("native", "reference"):
        torch.manual_seed(0)
        rule = LSTMOptimizer(hidden_size=5, impl=impl).double()
        result = unroll(rule, problems.loss, problems.theta0, None, 4, second_order=second_order)
        meta_grads.append(torch.autograd.grad(result.meta_loss, list(rule.parameters())))
    for a, b in zip(*meta_grads):
        assert_close(a, b)


def test_bad_inputs_are_named():
    rule = LSTMOptimizer(hidden_size=4)
    weights = LSTMRuleWeights.from_modules(rule.cell1, rule.cell2, rule.head)
    with pytest.raises(ValueError, match="weight_hh2 has shape"):
        lstm_rule(torch.zeros(3), None, weights._replace(weight_hh2=torch.zeros(16, 5)))
    with pytest.raises(ValueError, match="state.c1 has shape"):
        state = LSTMState.zeros(3, 4, dtype=torch.float32)
        lstm_rule(torch.zeros(3), state._replace(c1=torch.zeros(3, 5)), weights)
    with pytest.raises(ValueError, match="flat"):
        lstm_rule(torch.zeros(3, 1), None, weights)
    with pytest.raises(ValueError, match="impl"):
        lstm_rule(torch.zeros(3), None, weights, impl="fastest")


@pytest.mark.native
def test_unsupported_dtypes_raise_when_asked_for_and_fall_back_when_automatic():
    rule = LSTMOptimizer(hidden_size=4).to(torch.bfloat16)
    weights = LSTMRuleWeights.from_modules(rule.cell1, rule.cell2, rule.head)
    g = torch.randn(5, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32 and float64"):
        lstm_rule(g, None, weights, impl="native")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with backends.trace() as calls:
            update, _, _ = lstm_rule(g, None, weights)
    assert calls == [("lstm_rule", backends.Impl.REFERENCE)]
    assert update.dtype == torch.bfloat16
    expected, _, _ = lstm_rule_reference(g, None, rule.cell1, rule.cell2, rule.head)
    assert torch.equal(update, expected)
    assert all("fastmeta" in str(w.message) for w in caught)
