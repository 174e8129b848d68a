"""The fused in-place Adagrad op: every implementation against the reference, and bad input."""

from __future__ import annotations

import pytest
import torch

from fastmeta import backends
from fastmeta.backends import Impl
from fastmeta.ops.adagrad import adagrad_step_, adagrad_step_reference
from tests.conftest import ALL_IMPLS
from tests.tolerances import assert_close, assert_close_after_steps

# Awkward sizes: empty, one element, around the native chunk (16384) and Triton block (1024).
SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (16385,), (3, 5, 7), (64, 1, 3, 3)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Few steps: each one runs every program of the Triton interpreter.
STEPS = 3
# Every flag, in few combinations. ``initial_accumulator_value`` is torch.optim.Adagrad's
# starting value of the sums; the tests apply it, the op has no such argument.
OPTIONS = [
    dict(lr=1e-2),
    dict(lr=1e-2, lr_decay=0.1, initial_accumulator_value=0.1),
    dict(lr=1e-2, weight_decay=0.1, eps=1e-6, initial_accumulator_value=0.5),
    dict(lr=1e-2, lr_decay=0.05, weight_decay=0.05, maximize=True),
]


def _option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


def _split(options: dict) -> tuple[dict, float]:
    """The op's hyperparameters, and the sums' starting value."""
    hyper = dict(options)
    return hyper, hyper.pop("initial_accumulator_value", 0.0)


def _store(dst: torch.Tensor, src: torch.Tensor, *, truncate_bf16: bool) -> None:
    """``dst.copy_(src)``; with ``truncate_bf16``, bf16 is stored by truncation as Triton's CPU
    interpreter stores it (see tests/tolerances.py), so that the interpreted kernel is compared
    with the same roundings. Rounding differently would let a state that is a near-cancelling
    sum (a momentum buffer, a moving average) drift by more than a ulp of its own value.
    """
    if truncate_bf16 and dst.dtype == torch.bfloat16:
        src = (src.float().view(torch.int32) & -(1 << 16)).view(torch.float32)
    dst.copy_(src)


def _reference_run(params, grads, sums, steps, hyper, *, truncate_bf16=False):
    """Applies adagrad_step_reference tensor by tensor, in the compute dtype."""
    params = [p.clone() for p in params]
    sums = [s.clone() for s in sums]
    steps = [s.clone() for s in steps]
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads)):
            steps[i] += 1
            compute = torch.float64 if p.dtype == torch.float64 else torch.float32
            new_p, new_sum = adagrad_step_reference(
                p.to(compute), g.to(compute), sums[i].to(compute), step=steps[i].item(), **hyper
            )
            _store(p, new_p, truncate_bf16=truncate_bf16)
            _store(sums[i], new_sum, truncate_bf16=truncate_bf16)
    return params, sums, steps


def _assert_matches(params, sums, steps, expected, *, impl, steps_taken):
    expected_params, expected_sums, expected_steps = expected
    for p, e in zip(params, expected_params):
        assert_close_after_steps(p, e, impl=impl, steps=steps_taken)
    for s, e in zip(sums, expected_sums):
        assert_close_after_steps(s, e, impl=impl, steps=steps_taken)
    for s, e in zip(steps, expected_steps):
        assert s.dtype == e.dtype
        assert torch.equal(s, e), (s, e)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=_option_id)
def test_matches_reference_over_steps(impl, dtype, options):
    hyper, initial = _split(options)
    params = [torch.randn(s, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, dtype=dtype) for s in SHAPES] for _ in range(STEPS)]
    sums = [torch.full_like(p, initial) for p in params]
    # Per-tensor counters, so that every tensor has its own decayed learning rate.
    steps = [torch.tensor(float(i % 3)) for i in range(len(SHAPES))]
    expected = _reference_run(params, grads, sums, steps, hyper,
                              truncate_bf16=impl == "triton")
    with backends.trace() as calls:
        for k in range(STEPS):
            adagrad_step_(params, grads[k], sums, steps, impl=impl, **hyper)
    assert set(calls) == {("adagrad_step_", Impl(impl))}
    _assert_matches(params, sums, steps, expected, impl=impl, steps_taken=STEPS)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_mixed_dtypes_and_steps_in_one_call(impl):
    """One launch per dtype, each with the step counters of its own tensors (interleaved),
    float64 counters shaped (1,), and a dtype group whose only tensor is empty."""
    dtypes = [torch.float32, torch.float64, torch.float32, torch.bfloat16, torch.float64,
              torch.float16]
    shapes = [(100,), (1030,), (5, 7), (300,), (1,), (0,)]
    hyper = dict(lr=1e-2, lr_decay=0.2, weight_decay=0.01)
    params = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    grads = [[torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)] for _ in range(2)]
    sums = [torch.rand(s).to(d) for s, d in zip(shapes, dtypes)]
    steps = [torch.tensor([float(k)], dtype=torch.float64) for k in (0, 5, 2, 9, 1, 3)]
    expected = _reference_run(params, grads, sums, steps, hyper,
                              truncate_bf16=impl == "triton")
    for k in range(2):
        adagrad_step_(params, grads[k], sums, steps, impl=impl, **hyper)
    _assert_matches(params, sums, steps, expected, impl=impl, steps_taken=2)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("options", OPTIONS, ids=_option_id)
def test_matches_torch_optim(impl, options):
    """The reference is the spec; this checks the spec against torch.optim from a fresh state."""
    hyper, initial = _split(options)
    shapes = [(1,), (1025,), (3, 5, 7)]
    torch_params = [torch.randn(s, requires_grad=True) for s in shapes]
    params = [p.detach().clone() for p in torch_params]
    opt = torch.optim.Adagrad(torch_params, initial_accumulator_value=initial, foreach=False,
                              **hyper)
    sums = [torch.full_like(p, initial) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    for _ in range(2):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        opt.step()
        adagrad_step_(params, grads, sums, steps, impl=impl, **hyper)
    for i, tp in enumerate(torch_params):
        assert_close(params[i], tp.detach())
        assert_close(sums[i], opt.state[tp]["sum"])
        assert torch.equal(steps[i], opt.state[tp]["step"])


def test_reference_is_the_formula():
    p, g, s = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25]), torch.tensor([0.1, 0.2])
    new_p, new_sum = adagrad_step_reference(p, g, s, step=3, lr=0.1, lr_decay=0.5, eps=1e-10)
    torch.testing.assert_close(new_sum, s + g * g)
    torch.testing.assert_close(new_p, p - 0.1 / (1 + 2 * 0.5) * g / ((s + g * g).sqrt() + 1e-10))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_non_contiguous_grad_is_read_correctly(impl):
    p = torch.randn(8, 6)
    g = torch.randn(6, 8).t()  # non-contiguous view
    s, step = torch.rand(8, 6), torch.tensor(0.0)
    expected_p, expected_sum = adagrad_step_reference(p, g, s, step=1, lr=0.1)
    adagrad_step_([p], [g], [s], [step], lr=0.1, impl=impl)
    assert_close(p, expected_p)
    assert_close(s, expected_sum)


@pytest.mark.parametrize("impl", [i for i in ALL_IMPLS if i.values[0] != "reference"])
@pytest.mark.parametrize("name", ["params", "state_sums"])
def test_non_contiguous_state_is_refused_not_copied(impl, name):
    tensors = {"params": [torch.randn(8, 6)], "state_sums": [torch.rand(8, 6)]}
    tensors[name] = [torch.rand(6, 8).t()]
    step = torch.tensor(4.0)
    before = {n: t[0].clone() for n, t in tensors.items()}
    with pytest.raises(ValueError, match=rf"{name}\[0\] is not contiguous"):
        adagrad_step_(tensors["params"], [torch.randn(8, 6)], tensors["state_sums"], [step],
                      lr=0.1, impl=impl)
    for n, t in tensors.items():
        assert torch.equal(t[0], before[n]), n
    assert step.item() == 4.0


def test_non_contiguous_state_on_reference_is_updated_in_place():
    p, s = torch.randn(6, 8).t(), torch.rand(6, 8).t()
    g = torch.randn(8, 6)
    expected_p, expected_sum = adagrad_step_reference(p, g, s, step=1, lr=0.1)
    adagrad_step_([p], [g], [s], [torch.tensor(0.0)], lr=0.1, impl="reference")
    assert_close(p, expected_p)
    assert_close(s, expected_sum)


def _call(impl, params=None, grads=None, state_sums=None, steps=None, **hyper):
    """adagrad_step_ on one 3-element fp32 tensor, with any argument replaced."""
    adagrad_step_(
        params if params is not None else [torch.ones(3)],
        grads if grads is not None else [torch.ones(3)],
        state_sums if state_sums is not None else [torch.zeros(3)],
        steps if steps is not None else [torch.tensor(0.0)],
        impl=impl,
        **{"lr": 0.1, **hyper},
    )


@pytest.mark.parametrize("impl", ["auto", "reference"])
class TestBadInput:
    def test_state_shape_mismatch(self, impl):
        with pytest.raises(ValueError, match=r"state_sums\[0\] has shape \(4,\) but params\[0\] "
                           r"has shape \(3,\)"):
            _call(impl, state_sums=[torch.zeros(4)])

    def test_state_dtype_mismatch(self, impl):
        with pytest.raises(TypeError, match=r"state_sums\[0\] has dtype torch.float16"):
            _call(impl, state_sums=[torch.zeros(3, dtype=torch.float16)])

    def test_state_length_mismatch(self, impl):
        with pytest.raises(ValueError, match="state_sums has 0 tensors but params has 1"):
            _call(impl, state_sums=[])

    def test_step_counters_of_mixed_dtype(self, impl):
        with pytest.raises(TypeError, match=r"state_steps\[1\] has dtype torch.float32; step "
                           "counters must all be float32 or all float64"):
            _call(impl, params=[torch.ones(3)] * 2, grads=[torch.ones(3)] * 2,
                  state_sums=[torch.zeros(3), torch.zeros(3)],
                  steps=[torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0)])

    def test_missing_step_counters(self, impl):
        with pytest.raises(ValueError, match="state_steps has 2 tensors but params has 1"):
            _call(impl, steps=[torch.tensor(0.0), torch.tensor(0.0)])

    def test_grad_on_another_device(self, impl):
        with pytest.raises(ValueError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
            _call(impl, grads=[torch.ones(3, device="meta")])

    def test_negative_lr(self, impl):
        with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
            _call(impl, lr=-0.1)

    def test_negative_lr_decay(self, impl):
        with pytest.raises(ValueError, match="Invalid lr_decay value: -0.5"):
            _call(impl, lr_decay=-0.5)

    def test_negative_weight_decay(self, impl):
        with pytest.raises(ValueError, match="Invalid weight_decay value: -0.1"):
            _call(impl, weight_decay=-0.1)

    def test_negative_eps(self, impl):
        with pytest.raises(ValueError, match="Invalid epsilon value: -1e-10"):
            _call(impl, eps=-1e-10)

    def test_single_tensor_instead_of_list(self, impl):
        with pytest.raises(TypeError, match="state_sums must be a list of tensors"):
            _call(impl, state_sums=torch.zeros(3))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_tensor_lr(impl):
    p, g, s, step = torch.ones(5), torch.ones(5), torch.zeros(5), torch.tensor(0.0)
    adagrad_step_([p], [g], [s], [step], lr=torch.tensor(0.25), impl=impl)
    assert_close(p, torch.full((5,), 0.75))
    assert step.item() == 1.0


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_empty_list_is_a_no_op(impl):
    adagrad_step_([], [], [], [], lr=0.1, impl=impl)
