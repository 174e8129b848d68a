"""The fused in-place SGD op: every implementation against the reference, and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastmeta import backends
from fastmeta.backends import Impl
from fastmeta.ops.sgd import sgd_step_, sgd_step_reference
from tests.conftest import ALL_IMPLS
from tests.tolerances import assert_close, assert_close_after_steps

# Awkward sizes: empty, one element, around the native chunk (16384) and Triton block (1024).
SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (16385,), (3, 5, 7), (64, 1, 3, 3)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPTIONS = [
    dict(lr=0.1),
    dict(lr=0.05, weight_decay=0.01),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.02),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.1, momentum=0.5, maximize=True, weight_decay=0.1),
]


def _reference_run(params, grads, steps, options):
    """Applies sgd_step_reference tensor by tensor, in the compute dtype."""
    params = [p.clone() for p in params]
    momentum = options.get("momentum", 0.0)
    bufs = [torch.zeros_like(p) for p in params] if momentum else None
    for k in range(steps):
        for i, (p, g) in enumerate(zip(params, grads[k])):
            compute = torch.float64 if p.dtype == torch.float64 else torch.float32
            b = bufs[i].to(compute) if bufs else None
            new_p, new_b = sgd_step_reference(
                p.to(compute), g.to(compute), b, first_step=k == 0, **options
            )
            p.copy_(new_p)
            if bufs:
                bufs[i].copy_(new_b)
    return params, bufs


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS,
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_matches_reference_over_steps(impl, dtype, options):
    steps = 4
    params = [torch.randn(s, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, dtype=dtype) for s in SHAPES] for _ in range(steps)]
    expected, expected_bufs = _reference_run(params, grads, steps, options)
    bufs = [torch.zeros_like(p) for p in params] if options.get("momentum") else None
    with backends.trace() as calls:
        for k in range(steps):
            sgd_step_(params, grads[k], bufs, first_step=k == 0, impl=impl, **options)
    assert {c for c in calls} == {("sgd_step_", Impl(impl))}
    for p, e in zip(params, expected):
        assert_close_after_steps(p, e, impl=impl, steps=steps)
    if bufs:
        for b, e in zip(bufs, expected_bufs):
            assert_close_after_steps(b, e, impl=impl, steps=steps)


def test_reference_is_the_formula():
    p, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    new_p, buf = sgd_step_reference(p, g, lr=0.1, weight_decay=0.2)
    torch.testing.assert_close(new_p, p - 0.1 * (g + 0.2 * p))
    assert buf is None


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_mixed_dtypes_in_one_call(impl):
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    params = [torch.randn(100, dtype=d) for d in dtypes]
    grads = [torch.randn(100, dtype=d) for d in dtypes]
    expected = [p.double() - 0.1 * g.double() for p, g in zip(params, grads)]
    sgd_step_(params, grads, lr=0.1, impl=impl)
    for p, e in zip(params, expected):
        assert_close(p, e.to(p.dtype))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_non_contiguous_grad_is_read_correctly(impl):
    p = torch.randn(8, 6)
    g = torch.randn(6, 8).t()  # non-contiguous view
    expected = p - 0.1 * g
    sgd_step_([p], [g], lr=0.1, impl=impl)
    assert_close(p, expected)


@pytest.mark.parametrize("impl", [i for i in ALL_IMPLS if i.values[0] != "reference"])
def test_non_contiguous_param_is_refused_not_copied(impl):
    p = torch.randn(6, 8).t()
    before = p.clone()
    with pytest.raises(ValueError, match=r"params\[0\] is not contiguous"):
        sgd_step_([p], [torch.randn(8, 6)], lr=0.1, impl=impl)
    assert torch.equal(p, before)


def test_non_contiguous_param_on_reference_is_updated_in_place():
    p = torch.randn(6, 8).t()
    g = torch.randn(8, 6)
    expected = p - 0.1 * g
    sgd_step_([p], [g], lr=0.1, impl="reference")
    assert_close(p, expected)


@pytest.mark.parametrize("impl", ["auto", "reference"])
class TestBadInput:
    def test_grad_on_another_device(self, impl):
        with pytest.raises(ValueError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
            sgd_step_([torch.ones(3)], [torch.ones(3, device="meta")], lr=0.1, impl=impl)

    def test_params_on_different_devices(self, impl):
        with pytest.raises(ValueError, match=r"params\[1\] is on meta but params\[0\] is on cpu"):
            sgd_step_([torch.ones(3), torch.ones(3, device="meta")],
                      [torch.ones(3), torch.ones(3)], lr=0.1, impl=impl)

    def test_shape_mismatch(self, impl):
        with pytest.raises(ValueError, match=r"grads\[0\] has shape \(4,\) but params\[0\] has "
                           r"shape \(3,\)"):
            sgd_step_([torch.ones(3)], [torch.ones(4)], lr=0.1, impl=impl)

    def test_length_mismatch(self, impl):
        with pytest.raises(ValueError, match="grads has 1 tensors but params has 2"):
            sgd_step_([torch.ones(3), torch.ones(3)], [torch.ones(3)], lr=0.1, impl=impl)

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
    def test_integer_dtype(self, impl, dtype):
        with pytest.raises(TypeError, match=rf"params\[0\] has dtype {dtype} \(integer\)"):
            sgd_step_([torch.ones(3, dtype=dtype)], [torch.ones(3, dtype=dtype)], lr=0.1,
                      impl=impl)

    def test_complex_dtype(self, impl):
        p = torch.ones(3, dtype=torch.complex64)
        with pytest.raises(TypeError, match=r"params\[0\] has dtype torch.complex64 \(complex\)"):
            sgd_step_([p], [p.clone()], lr=0.1, impl=impl)

    def test_grad_dtype_differs(self, impl):
        with pytest.raises(TypeError, match=r"grads\[0\] has dtype torch.float64"):
            sgd_step_([torch.ones(3)], [torch.ones(3, dtype=torch.float64)], lr=0.1, impl=impl)

    def test_sparse_grad(self, impl):
        g = torch.ones(3).to_sparse()
        with pytest.raises(ValueError, match=r"grads\[0\] is sparse"):
            sgd_step_([torch.ones(3)], [g], lr=0.1, impl=impl)

    def test_negative_lr(self, impl):
        with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
            sgd_step_([torch.ones(3)], [torch.ones(3)], lr=-0.1, impl=impl)

    def test_nesterov_without_momentum(self, impl):
        with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
            sgd_step_([torch.ones(3)], [torch.ones(3)], lr=0.1, nesterov=True, impl=impl)

    def test_momentum_without_buffers(self, impl):
        with pytest.raises(ValueError, match="momentum_buffers is required"):
            sgd_step_([torch.ones(3)], [torch.ones(3)], lr=0.1, momentum=0.9, impl=impl)

    def test_single_tensor_instead_of_list(self, impl):
        with pytest.raises(TypeError, match="params must be a list of tensors"):
            sgd_step_(torch.ones(3), [torch.ones(3)], lr=0.1, impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_tensor_lr(impl):
    p, g = torch.ones(5), torch.ones(5)
    sgd_step_([p], [g], lr=torch.tensor(0.25), impl=impl)
    assert_close(p, torch.full((5,), 0.75))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_empty_list_is_a_no_op(impl):
    sgd_step_([], [], lr=0.1, impl=impl)


@pytest.mark.native
def test_native_updates_many_tensors_in_one_call_with_threads():
    """A list large enough to take the OpenMP path, with every chunk boundary exercised."""
    sizes = [16384 * 3 + 1, 5, 40000, 16384]
    params = [torch.randn(n) for n in sizes]
    grads = [torch.randn(n) for n in sizes]
    expected = [p - 0.01 * g for p, g in zip(params, grads)]
    sgd_step_(params, grads, lr=0.01, impl="native")
    for p, e in zip(params, expected):
        assert_close(p, e)


def test_all_impl_combinations_are_listed():
    assert {i.values[0] for i in ALL_IMPLS} == {i.value for i in Impl} - {"auto"}
    assert list(itertools.chain(SHAPES))
