"""The fused in-place RMSprop op: every implementation against the reference, and bad input."""

from __future__ import annotations

import pytest
import torch

from fastmeta import backends
from fastmeta.backends import Impl
from fastmeta.ops.rmsprop import rmsprop_step_, rmsprop_step_reference
from tests.conftest import ALL_IMPLS
from tests.tolerances import assert_close, assert_close_after_steps

# Awkward sizes: empty, one element, around the native chunk (16384) and Triton block (1024).
SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (16385,), (3, 5, 7), (64, 1, 3, 3)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Few steps: each one runs every program of the Triton interpreter.
STEPS = 3
# Every flag, in few combinations: each one costs a run of the Triton interpreter per dtype.
OPTIONS = [
    dict(lr=1e-2),
    dict(lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=0.1),
    dict(lr=1e-2, momentum=0.9, maximize=True),
    dict(lr=1e-2, centered=True),
    dict(lr=1e-2, centered=True, momentum=0.5, maximize=True, weight_decay=0.05),
]
STATE_NAMES = ("square_avgs", "momentum_buffers", "grad_avgs")


def _option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


def _make_state(shapes, dtypes, options):
    """A resumed state (averages as after some steps), consistent for the centered form: the
    square average exceeds the squared grad average, as every update keeps it."""
    grad_avgs = [0.3 * torch.randn(s) for s in shapes]
    return {
        "square_avgs": [(a * a + 0.1 + torch.rand(s)).to(d)
                        for a, s, d in zip(grad_avgs, shapes, dtypes)],
        "momentum_buffers": ([(0.1 * torch.randn(s)).to(d) for s, d in zip(shapes, dtypes)]
                             if options.get("momentum") else None),
        "grad_avgs": ([a.to(d) for a, d in zip(grad_avgs, dtypes)]
                      if options.get("centered") else None),
    }


def _store(dst: torch.Tensor, src: torch.Tensor, *, truncate_bf16: bool) -> None:
    """``dst.copy_(src)``; with ``truncate_bf16``, bf16 is stored by truncation as Triton's CPU
    interpreter stores it (see tests/tolerances.py), so that the interpreted kernel is compared
    with the same roundings. Rounding differently would let a state that is a near-cancelling
    sum (a momentum buffer, a moving average) drift by more than a ulp of its own value.
    """
    if truncate_bf16 and dst.dtype == torch.bfloat16:
        src = (src.float().view(torch.int32) & -(1 << 16)).view(torch.float32)
    dst.copy_(src)


def _reference_run(params, grads, state, steps, options, *, truncate_bf16=False):
    """Applies rmsprop_step_reference tensor by tensor, in the compute dtype."""
    params = [p.clone() for p in params]
    state = {k: [t.clone() for t in v] if v is not None else None for k, v in state.items()}
    steps = [s.clone() for s in steps]
    v, b, a = (state[k] for k in STATE_NAMES)
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads)):
            steps[i] += 1
            compute = torch.float64 if p.dtype == torch.float64 else torch.float32
            new_p, new_v, new_b, new_a = rmsprop_step_reference(
                p.to(compute), g.to(compute), v[i].to(compute),
                b[i].to(compute) if b else None, a[i].to(compute) if a else None, **options,
            )
            _store(p, new_p, truncate_bf16=truncate_bf16)
            _store(v[i], new_v, truncate_bf16=truncate_bf16)
            if b:
                _store(b[i], new_b, truncate_bf16=truncate_bf16)
            if a:
                _store(a[i], new_a, truncate_bf16=truncate_bf16)
    return params, state, steps


def _assert_matches(params, state, steps, expected, *, impl, steps_taken):
    expected_params, expected_state, expected_steps = expected
    for p, e in zip(params, expected_params):
        assert_close_after_steps(p, e, impl=impl, steps=steps_taken)
    for name in STATE_NAMES:
        if expected_state[name] is None:
            assert state[name] is None
            continue
        for actual, e in zip(state[name], expected_state[name]):
            assert_close_after_steps(actual, e, impl=impl, steps=steps_taken)
    for s, e in zip(steps, expected_steps):
        assert s.dtype == e.dtype
        assert torch.equal(s, e), (s, e)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=_option_id)
def test_matches_reference_over_steps(impl, dtype, options):
    params = [torch.randn(s, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, dtype=dtype) for s in SHAPES] for _ in range(STEPS)]
    state = _make_state(SHAPES, [dtype] * len(SHAPES), options)
    steps = [torch.tensor(float(i % 3)) for i in range(len(SHAPES))]
    expected = _reference_run(params, grads, state, steps, options,
                              truncate_bf16=impl == "triton")
    with backends.trace() as calls:
        for k in range(STEPS):
            rmsprop_step_(params, grads[k], *(state[n] for n in STATE_NAMES), steps, impl=impl,
                          **options)
    assert set(calls) == {("rmsprop_step_", Impl(impl))}
    _assert_matches(params, state, steps, expected, impl=impl, steps_taken=STEPS)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_mixed_dtypes_in_one_call(impl):
    """One launch per dtype, float64 counters shaped (1,), and a dtype group whose only tensor
    is empty."""
    dtypes = [torch.float32, torch.float64, torch.float32, torch.bfloat16, torch.float64,
              torch.float16]
    shapes = [(100,), (1030,), (5, 7), (300,), (1,), (0,)]
    options = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)
    params = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    grads = [[torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)] for _ in range(2)]
    state = _make_state(shapes, dtypes, options)
    steps = [torch.tensor([float(k)], dtype=torch.float64) for k in (0, 5, 2, 9, 1, 3)]
    expected = _reference_run(params, grads, state, steps, options,
                              truncate_bf16=impl == "triton")
    for k in range(2):
        rmsprop_step_(params, grads[k], *(state[n] for n in STATE_NAMES), steps, impl=impl,
                      **options)
    _assert_matches(params, state, steps, expected, impl=impl, steps_taken=2)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("options", OPTIONS, ids=_option_id)
def test_matches_torch_optim(impl, options):
    """The reference is the spec; this checks the spec against torch.optim from a fresh state."""
    shapes = [(1,), (1025,), (3, 5, 7)]
    torch_params = [torch.randn(s, requires_grad=True) for s in shapes]
    params = [p.detach().clone() for p in torch_params]
    opt = torch.optim.RMSprop(torch_params, foreach=False, **options)
    state = {
        "square_avgs": [torch.zeros_like(p) for p in params],
        "momentum_buffers": ([torch.zeros_like(p) for p in params]
                             if options.get("momentum") else None),
        "grad_avgs": [torch.zeros_like(p) for p in params] if options.get("centered") else None,
    }
    steps = [torch.tensor(0.0) for _ in params]
    for _ in range(2):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        opt.step()
        rmsprop_step_(params, grads, *(state[n] for n in STATE_NAMES), steps, impl=impl,
                      **options)
    torch_names = {"square_avgs": "square_avg", "momentum_buffers": "momentum_buffer",
                   "grad_avgs": "grad_avg"}
    for i, tp in enumerate(torch_params):
        assert_close(params[i], tp.detach())
        for name, torch_name in torch_names.items():
            if state[name] is not None:
                assert_close(state[name][i], opt.state[tp][torch_name])
        assert torch.equal(steps[i], opt.state[tp]["step"])


def test_reference_is_the_formula():
    p, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    v, b, a = torch.tensor([0.3, 0.4]), torch.tensor([0.1, -0.1]), torch.tensor([0.2, 0.1])
    new_p, new_v, new_b, new_a = rmsprop_step_reference(
        p, g, v, b, a, lr=0.1, alpha=0.9, eps=1e-8, momentum=0.5, centered=True
    )
    expected_v = 0.9 * v + 0.1 * g * g
    expected_a = 0.9 * a + 0.1 * g
    expected_b = 0.5 * b + g / ((expected_v - expected_a**2).sqrt() + 1e-8)
    torch.testing.assert_close(new_v, expected_v)
    torch.testing.assert_close(new_a, expected_a)
    torch.testing.assert_close(new_b, expected_b)
    torch.testing.assert_close(new_p, p - 0.1 * expected_b)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_non_contiguous_grad_is_read_correctly(impl):
    p = torch.randn(8, 6)
    g = torch.randn(6, 8).t()  # non-contiguous view
    v, step = torch.rand(8, 6), torch.tensor(0.0)
    expected_p, expected_v, _, _ = rmsprop_step_reference(p, g, v, lr=0.1)
    rmsprop_step_([p], [g], [v], None, None, [step], lr=0.1, impl=impl)
    assert_close(p, expected_p)
    assert_close(v, expected_v)


@pytest.mark.parametrize("impl", [i for i in ALL_IMPLS if i.values[0] != "reference"])
@pytest.mark.parametrize("name", ["params", *STATE_NAMES])
def test_non_contiguous_state_is_refused_not_copied(impl, name):
    tensors = {n: [torch.rand(8, 6)] for n in ("params", *STATE_NAMES)}
    tensors[name] = [torch.rand(6, 8).t()]
    step = torch.tensor(4.0)
    before = {n: t[0].clone() for n, t in tensors.items()}
    with pytest.raises(ValueError, match=rf"{name}\[0\] is not contiguous"):
        rmsprop_step_(tensors["params"], [torch.randn(8, 6)],
                      *(tensors[n] for n in STATE_NAMES), [step], lr=0.1, momentum=0.9,
                      centered=True, impl=impl)
    for n, t in tensors.items():
        assert torch.equal(t[0], before[n]), n
    assert step.item() == 4.0


def test_non_contiguous_state_on_reference_is_updated_in_place():
    p, v, b = torch.randn(6, 8).t(), torch.rand(6, 8).t(), torch.randn(6, 8).t()
    g = torch.randn(8, 6)
    expected_p, expected_v, expected_b, _ = rmsprop_step_reference(p, g, v, b, lr=0.1,
                                                                   momentum=0.9)
    rmsprop_step_([p], [g], [v], [b], None, [torch.tensor(0.0)], lr=0.1, momentum=0.9,
                  impl="reference")
    assert_close(p, expected_p)
    assert_close(v, expected_v)
    assert_close(b, expected_b)


def _call(impl, params=None, grads=None, square_avgs=None, momentum_buffers=None,
          grad_avgs=None, steps=None, **options):
    """rmsprop_step_ on one 3-element fp32 tensor, with any argument replaced."""
    rmsprop_step_(
        params if params is not None else [torch.ones(3)],
        grads if grads is not None else [torch.ones(3)],
        square_avgs if square_avgs is not None else [torch.zeros(3)],
        momentum_buffers,
        grad_avgs,
        steps if steps is not None else [torch.tensor(0.0)],
        impl=impl,
        **{"lr": 0.1, **options},
    )


@pytest.mark.parametrize("impl", ["auto", "reference"])
class TestBadInput:
    def test_state_shape_mismatch(self, impl):
        with pytest.raises(ValueError, match=r"square_avgs\[0\] has shape \(4,\) but params\[0\] "
                           r"has shape \(3,\)"):
            _call(impl, square_avgs=[torch.zeros(4)])

    def test_momentum_without_buffers(self, impl):
        with pytest.raises(ValueError, match="momentum_buffers is required when momentum != 0"):
            _call(impl, momentum=0.9)

    def test_buffer_shape_mismatch(self, impl):
        with pytest.raises(ValueError, match=r"momentum_buffers\[0\] has shape \(2,\)"):
            _call(impl, momentum=0.9, momentum_buffers=[torch.zeros(2)])

    def test_centered_without_grad_avgs(self, impl):
        with pytest.raises(ValueError, match="grad_avgs is required when centered=True"):
            _call(impl, centered=True)

    def test_grad_avg_dtype_mismatch(self, impl):
        with pytest.raises(TypeError, match=r"grad_avgs\[0\] has dtype torch.bfloat16"):
            _call(impl, centered=True, grad_avgs=[torch.zeros(3, dtype=torch.bfloat16)])

    def test_step_counters_of_mixed_dtype(self, impl):
        with pytest.raises(TypeError, match=r"state_steps\[1\] has dtype torch.float64; step "
                           "counters must all be float32 or all float64"):
            _call(impl, params=[torch.ones(3)] * 2, grads=[torch.ones(3)] * 2,
                  square_avgs=[torch.zeros(3), torch.zeros(3)],
                  steps=[torch.tensor(0.0), torch.tensor(0.0, dtype=torch.float64)])

    def test_missing_step_counters(self, impl):
        with pytest.raises(ValueError, match="state_steps has 0 tensors but params has 1"):
            _call(impl, steps=[])

    def test_grad_on_another_device(self, impl):
        with pytest.raises(ValueError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
            _call(impl, grads=[torch.ones(3, device="meta")])

    def test_negative_lr(self, impl):
        with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
            _call(impl, lr=-0.1)

    @pytest.mark.parametrize("name,message", [
        ("alpha", "Invalid alpha value"), ("eps", "Invalid epsilon value"),
        ("momentum", "Invalid momentum value"), ("weight_decay", "Invalid weight_decay value"),
    ])
    def test_negative_hyperparameter(self, impl, name, message):
        with pytest.raises(ValueError, match=f"{message}: -0.5"):
            _call(impl, **{name: -0.5})

    def test_single_tensor_instead_of_list(self, impl):
        with pytest.raises(TypeError, match="square_avgs must be a list of tensors"):
            _call(impl, square_avgs=torch.zeros(3))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_tensor_lr(impl):
    p, g, v, step = torch.ones(5), torch.ones(5), torch.zeros(5), torch.tensor(0.0)
    rmsprop_step_([p], [g], [v], None, None, [step], lr=torch.tensor(0.25), alpha=0.75,
                  impl=impl)
    # v = 0.25, so the step is lr * g / (sqrt(v) + eps) = 0.25 / (0.5 + 1e-8).
    assert_close(p, torch.full((5,), 1 - 0.25 / (0.5 + 1e-8)))
    assert step.item() == 1.0


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_empty_list_is_a_no_op(impl):
    rmsprop_step_([], [], [], None, None, [], lr=0.1, impl=impl)
