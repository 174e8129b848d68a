"""The fused in-place Adam/AdamW op: every implementation against the reference, and bad input."""

from __future__ import annotations

import pytest
import torch

from fastmeta import backends
from fastmeta.backends import Impl
from fastmeta.ops.adam import adam_step_, adam_step_reference
from tests.conftest import ALL_IMPLS
from tests.tolerances import assert_close, assert_close_after_steps

# Awkward sizes: empty, one element, around the native chunk (16384) and Triton block (1024).
SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (16385,), (3, 5, 7), (64, 1, 3, 3)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Few steps: each one runs every program of the Triton interpreter.
STEPS = 3
# Every flag, in few combinations: each one costs a run of the Triton interpreter per dtype.
OPTIONS = [
    dict(lr=1e-3),
    dict(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1),
    dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    dict(lr=1e-2, beta1=0.0, amsgrad=True, weight_decay=0.05),
    dict(lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.05, decoupled_weight_decay=True),
]
STATE_NAMES = ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def _option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


def _make_state(shapes, dtypes, options, first_steps, step_dtype=torch.float32):
    """A resumed state (moments as after some steps), with per-tensor step counters, so that
    every tensor has its own bias correction."""
    state = {
        "exp_avgs": [(0.1 * torch.randn(s)).to(d) for s, d in zip(shapes, dtypes)],
        "exp_avg_sqs": [(0.1 * torch.rand(s)).to(d) for s, d in zip(shapes, dtypes)],
        "max_exp_avg_sqs": (
            [(0.1 * torch.rand(s)).to(d) for s, d in zip(shapes, dtypes)]
            if options.get("amsgrad") else None
        ),
    }
    steps = [torch.tensor(float(k), dtype=step_dtype) for k in first_steps]
    return state, steps


def _clone(state, steps):
    return ({k: [t.clone() for t in v] if v is not None else None for k, v in state.items()},
            [s.clone() for s in steps])


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
    """Applies adam_step_reference tensor by tensor, in the compute dtype."""
    params = [p.clone() for p in params]
    state, steps = _clone(state, steps)
    m, v, vmax = (state[k] for k in STATE_NAMES)
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads)):
            steps[i] += 1
            compute = torch.float64 if p.dtype == torch.float64 else torch.float32
            new_p, new_m, new_v, new_max = adam_step_reference(
                p.to(compute), g.to(compute), m[i].to(compute), v[i].to(compute),
                vmax[i].to(compute) if vmax else None, step=steps[i].item(), **options,
            )
            _store(p, new_p, truncate_bf16=truncate_bf16)
            _store(m[i], new_m, truncate_bf16=truncate_bf16)
            _store(v[i], new_v, truncate_bf16=truncate_bf16)
            if vmax:
                _store(vmax[i], new_max, truncate_bf16=truncate_bf16)
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
    state, steps = _make_state(SHAPES, [dtype] * len(SHAPES), options,
                               [i % 3 for i in range(len(SHAPES))])
    expected = _reference_run(params, grads, state, steps, options,
                              truncate_bf16=impl == "triton")
    with backends.trace() as calls:
        for k in range(STEPS):
            adam_step_(params, grads[k], *(state[n] for n in STATE_NAMES), steps, impl=impl,
                       **options)
    assert set(calls) == {("adam_step_", Impl(impl))}
    _assert_matches(params, state, steps, expected, impl=impl, steps_taken=STEPS)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_mixed_dtypes_and_steps_in_one_call(impl):
    """One launch per dtype, each with the step counters of its own tensors (interleaved),
    float64 counters shaped (1,), and a dtype group whose only tensor is empty."""
    dtypes = [torch.float32, torch.float64, torch.float32, torch.bfloat16, torch.float64,
              torch.float16]
    shapes = [(100,), (1030,), (5, 7), (300,), (1,), (0,)]
    options = dict(lr=1e-2, amsgrad=True, weight_decay=0.01)
    params = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    grads = [[torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)] for _ in range(2)]
    state, steps = _make_state(shapes, dtypes, options, [0, 5, 2, 9, 1, 3],
                               step_dtype=torch.float64)
    steps = [s.reshape(1) for s in steps]
    expected = _reference_run(params, grads, state, steps, options,
                              truncate_bf16=impl == "triton")
    for k in range(2):
        adam_step_(params, grads[k], *(state[n] for n in STATE_NAMES), steps, impl=impl,
                   **options)
    _assert_matches(params, state, steps, expected, impl=impl, steps_taken=2)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("options", OPTIONS, ids=_option_id)
def test_matches_torch_optim(impl, options):
    """The reference is the spec; this checks the spec against torch.optim from a fresh state."""
    shapes = [(1,), (1025,), (3, 5, 7)]
    torch_params = [torch.randn(s, requires_grad=True) for s in shapes]
    params = [p.detach().clone() for p in torch_params]
    kwargs = dict(lr=options["lr"], betas=(options.get("beta1", 0.9), options.get("beta2", 0.999)),
                  eps=options.get("eps", 1e-8), weight_decay=options.get("weight_decay", 0.0),
                  amsgrad=options.get("amsgrad", False), maximize=options.get("maximize", False),
                  foreach=False)
    cls = torch.optim.AdamW if options.get("decoupled_weight_decay") else torch.optim.Adam
    opt = cls(torch_params, **kwargs)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params] if options.get("amsgrad") else None
    steps = [torch.tensor(0.0) for _ in params]
    for _ in range(2):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        opt.step()
        adam_step_(params, grads, m, v, vmax, steps, impl=impl, **options)
    for i, tp in enumerate(torch_params):
        torch_state = opt.state[tp]
        assert_close(params[i], tp.detach())
        assert_close(m[i], torch_state["exp_avg"])
        assert_close(v[i], torch_state["exp_avg_sq"])
        if vmax:
            assert_close(vmax[i], torch_state["max_exp_avg_sq"])
        assert torch.equal(steps[i], torch_state["step"])


def test_reference_is_the_formula():
    p, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    m, v = torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])
    new_p, new_m, new_v, new_max = adam_step_reference(p, g, m, v, step=2, lr=0.1)
    expected_m = 0.9 * m + 0.1 * g
    expected_v = 0.999 * v + 0.001 * g * g
    denom = expected_v.sqrt() / (1 - 0.999**2) ** 0.5 + 1e-8
    torch.testing.assert_close(new_m, expected_m)
    torch.testing.assert_close(new_v, expected_v)
    torch.testing.assert_close(new_p, p - 0.1 / (1 - 0.9**2) * expected_m / denom)
    assert new_max is None


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_non_contiguous_grad_is_read_correctly(impl):
    p = torch.randn(8, 6)
    g = torch.randn(6, 8).t()  # non-contiguous view
    m, v, step = torch.zeros(8, 6), torch.zeros(8, 6), torch.tensor(0.0)
    expected_p, expected_m, expected_v, _ = adam_step_reference(p, g, m, v, step=1, lr=0.1)
    adam_step_([p], [g], [m], [v], None, [step], lr=0.1, impl=impl)
    assert_close(p, expected_p)
    assert_close(m, expected_m)
    assert_close(v, expected_v)


@pytest.mark.parametrize("impl", [i for i in ALL_IMPLS if i.values[0] != "reference"])
@pytest.mark.parametrize("name", ["params", *STATE_NAMES])
def test_non_contiguous_state_is_refused_not_copied(impl, name):
    tensors = {n: [torch.randn(8, 6)] for n in ("params", *STATE_NAMES)}
    tensors[name] = [torch.randn(6, 8).t()]
    step = torch.tensor(4.0)
    before = {n: t[0].clone() for n, t in tensors.items()}
    with pytest.raises(ValueError, match=rf"{name}\[0\] is not contiguous"):
        adam_step_(tensors["params"], [torch.randn(8, 6)],
                   *(tensors[n] for n in STATE_NAMES), [step], lr=0.1, amsgrad=True, impl=impl)
    for n, t in tensors.items():
        assert torch.equal(t[0], before[n]), n
    assert step.item() == 4.0


def test_non_contiguous_state_on_reference_is_updated_in_place():
    p, m, v = (torch.randn(6, 8).t() for _ in range(3))
    v = v.abs()
    g = torch.randn(8, 6)
    expected_p, expected_m, expected_v, _ = adam_step_reference(p, g, m, v, step=1, lr=0.1)
    adam_step_([p], [g], [m], [v], None, [torch.tensor(0.0)], lr=0.1, impl="reference")
    assert_close(p, expected_p)
    assert_close(m, expected_m)
    assert_close(v, expected_v)


def _call(impl, params=None, grads=None, exp_avgs=None, exp_avg_sqs=None, max_exp_avg_sqs=None,
          steps=None, **options):
    """adam_step_ on one 3-element fp32 tensor, with any argument replaced."""
    one = [torch.ones(3)]
    adam_step_(
        params if params is not None else one,
        grads if grads is not None else [torch.ones(3)],
        exp_avgs if exp_avgs is not None else [torch.zeros(3)],
        exp_avg_sqs if exp_avg_sqs is not None else [torch.zeros(3)],
        max_exp_avg_sqs,
        steps if steps is not None else [torch.tensor(0.0)],
        impl=impl,
        **{"lr": 0.1, **options},
    )


@pytest.mark.parametrize("impl", ["auto", "reference"])
class TestBadInput:
    def test_state_shape_mismatch(self, impl):
        with pytest.raises(ValueError, match=r"exp_avgs\[0\] has shape \(4,\) but params\[0\] "
                           r"has shape \(3,\)"):
            _call(impl, exp_avgs=[torch.zeros(4)])

    def test_state_dtype_mismatch(self, impl):
        with pytest.raises(TypeError, match=r"exp_avg_sqs\[0\] has dtype torch.float64"):
            _call(impl, exp_avg_sqs=[torch.zeros(3, dtype=torch.float64)])

    def test_state_length_mismatch(self, impl):
        with pytest.raises(ValueError, match="exp_avgs has 2 tensors but params has 1"):
            _call(impl, exp_avgs=[torch.zeros(3), torch.zeros(3)])

    def test_amsgrad_without_maxima(self, impl):
        with pytest.raises(ValueError, match="max_exp_avg_sqs is required when amsgrad=True"):
            _call(impl, amsgrad=True)

    def test_maxima_shape_mismatch(self, impl):
        with pytest.raises(ValueError, match=r"max_exp_avg_sqs\[0\] has shape \(2,\)"):
            _call(impl, max_exp_avg_sqs=[torch.zeros(2)], amsgrad=True)

    def test_step_counters_of_mixed_dtype(self, impl):
        params = [torch.ones(3), torch.ones(3)]
        with pytest.raises(TypeError, match=r"state_steps\[1\] has dtype torch.float64; step "
                           "counters must all be float32 or all float64"):
            _call(impl, params=params, grads=[torch.ones(3)] * 2,
                  exp_avgs=[torch.zeros(3), torch.zeros(3)],
                  exp_avg_sqs=[torch.zeros(3), torch.zeros(3)],
                  steps=[torch.tensor(0.0), torch.tensor(0.0, dtype=torch.float64)])

    def test_integer_step_counter(self, impl):
        with pytest.raises(TypeError, match=r"state_steps\[0\] has dtype torch.int64"):
            _call(impl, steps=[torch.tensor(0)])

    def test_step_counter_with_many_elements(self, impl):
        with pytest.raises(ValueError, match=r"state_steps\[0\] must be a one-element tensor"):
            _call(impl, steps=[torch.zeros(2)])

    def test_missing_step_counters(self, impl):
        with pytest.raises(ValueError, match="state_steps has 0 tensors but params has 1"):
            _call(impl, steps=[])

    def test_grad_on_another_device(self, impl):
        with pytest.raises(ValueError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
            _call(impl, grads=[torch.ones(3, device="meta")])

    def test_negative_lr(self, impl):
        with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
            _call(impl, lr=-0.1)

    @pytest.mark.parametrize("index,betas", [(0, (1.0, 0.999)), (1, (0.9, -0.5))])
    def test_bad_beta(self, impl, index, betas):
        with pytest.raises(ValueError, match=f"Invalid beta parameter at index {index}"):
            _call(impl, beta1=betas[0], beta2=betas[1])

    def test_negative_eps(self, impl):
        with pytest.raises(ValueError, match="Invalid epsilon value: -1e-08"):
            _call(impl, eps=-1e-8)

    def test_negative_weight_decay(self, impl):
        with pytest.raises(ValueError, match="Invalid weight_decay value: -0.1"):
            _call(impl, weight_decay=-0.1)

    def test_single_tensor_instead_of_list(self, impl):
        with pytest.raises(TypeError, match="exp_avgs must be a list of tensors"):
            _call(impl, exp_avgs=torch.zeros(3))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_tensor_lr(impl):
    p, g, m, v = torch.ones(5), torch.ones(5), torch.zeros(5), torch.zeros(5)
    step = torch.tensor(0.0)
    adam_step_([p], [g], [m], [v], None, [step], lr=torch.tensor(0.25), impl=impl)
    assert_close(p, torch.full((5,), 0.75))
    assert step.item() == 1.0


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_empty_list_is_a_no_op(impl):
    adam_step_([], [], [], [], None, [], lr=0.1, impl=impl)
