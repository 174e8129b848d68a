"""The native max-pool (fastmeta/ops/max_pool.py, csrc/max_pool.cpp) against F.max_pool2d: values,
first and second derivatives, torch's tie and NaN rules, every dtype and the dispatch."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta.ops.max_pool as max_pool_op
from fastmeta import backends
from fastmeta.backends import Impl, ImplementationUnavailable
from fastmeta.flat import FlatLayout
from fastmeta.ops.max_pool import max_pool2d, native_layers, native_pool_modules, native_window

pytestmark = pytest.mark.native

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (shape, kernel_size): 2x2 with even and odd sizes and every row width from 1 to 19 outputs
# (the AVX-512 row covers 8 outputs per step, with a masked tail), 3-D input, larger and
# rectangular windows, a 1x1 window.
CASES = ([((2, 3, 2 * w + odd, 2 * w + odd), 2) for w in range(1, 20) for odd in (0, 1)]
         + [((75, 8, 28, 28), 2), ((4, 7, 7), 2), ((2, 3, 9, 10), 3), ((2, 2, 6, 9), (2, 3)),
            ((1, 2, 5, 5), 1), ((3, 2, 16, 16), 4)])


def _data(shape, dtype, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    # ReLU zeros (whole windows of ties), rounded values (more ties), NaN and -inf.
    x = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3, 0.0, x)
    x = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.2, x.round(), x)
    flat = x.view(-1)
    flat[torch.randint(flat.numel(), (max(1, flat.numel() // 50),), generator=gen)] = float("nan")
    flat[torch.randint(flat.numel(), (max(1, flat.numel() // 50),), generator=gen)] = -float("inf")
    return x.to(dtype)


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit: the sign of zero and the NaN payloads too."""
    assert a.dtype == b.dtype and a.shape == b.shape
    kind = _BITS[a.element_size()]
    return torch.equal(a.contiguous().view(kind), b.contiguous().view(kind))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kernel", CASES)
def test_values_and_gradients_equal_torch(shape, kernel, dtype):
    x = _data(shape, dtype).requires_grad_()
    ours = max_pool2d(x, kernel, impl="native")
    ref = F.max_pool2d(x, kernel)
    assert ours.dtype == dtype and ours.shape == ref.shape
    assert _same(ours, ref)
    grad_out = torch.randn(ref.shape, dtype=torch.float64).to(dtype)
    grad_out[..., ::3, ::2] = -0.0  # torch's backward turns these into +0.0
    (g_ours,) = torch.autograd.grad(ours, x, grad_out)
    (g_ref,) = torch.autograd.grad(ref, x, grad_out)
    # Exactly torch's winner, also for ties, NaNs and the rows/columns floor mode drops.
    assert _same(g_ours, g_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,kernel", [((2, 3, 9, 9), 2), ((3, 5, 17), 2), ((2, 2, 7, 11), 3)])
def test_second_derivatives_equal_torch(shape, kernel, dtype):
    x = _data(shape, dtype).nan_to_num(neginf=-3.0).requires_grad_()
    v = torch.randn(F.max_pool2d(x, kernel).shape, dtype=dtype, requires_grad=True)
    w = torch.randn(shape, dtype=dtype, requires_grad=True)
    u = torch.randn(v.shape, dtype=dtype)
    results = []
    for pool in (lambda t: max_pool2d(t, kernel, impl="native"), lambda t: F.max_pool2d(t, kernel)):
        # gx = S(v), the scatter; its derivative along w is the gather G(w); the gather's
        # derivative along u is the scatter again. gx does not depend on x (zero curvature).
        (gx,) = torch.autograd.grad(pool(x), x, v, create_graph=True)
        gxx, gv = torch.autograd.grad(gx, (x, v), w, create_graph=True, allow_unused=True)
        (gw,) = torch.autograd.grad(gv, w, u)
        assert gxx is None or not gxx.any()
        results.append((gx.detach(), gv.detach(), gw))
    for a, b in zip(*results):
        assert _same(a, b)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    pool = lambda t: max_pool2d(t, 2, impl="native")  # noqa: E731
    assert torch.autograd.gradcheck(pool, (x,))
    assert torch.autograd.gradgradcheck(pool, (x,))
    # The backward as a function of the output gradient, and its own backward (the gather).
    g = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    scatter = lambda t: torch.autograd.grad(pool(x), x, t, create_graph=True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(scatter, (g,))
    assert torch.autograd.gradgradcheck(scatter, (g,))


def test_non_contiguous_output_gradient():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    grad_out = torch.randn(4, 4, 3, 2).permute(2, 3, 0, 1)  # [3, 2, 4, 4], not contiguous
    ours = torch.autograd.grad(max_pool2d(x[:, :, :, :].reshape(3, 2, 8, 8), 2, impl="native"),
                               x, grad_out)
    ref = torch.autograd.grad(F.max_pool2d(x.reshape(3, 2, 8, 8), 2), x, grad_out)
    assert torch.equal(ours[0], ref[0])


@pytest.mark.parametrize("call,reason", [
    (lambda x: dict(kernel_size=3, stride=2), "overlap"),
    (lambda x: dict(kernel_size=2, padding=1), "padding"),
    (lambda x: dict(kernel_size=2, dilation=2), "dilation"),
    (lambda x: dict(kernel_size=2, return_indices=True), "return_indices"),
    (lambda x: dict(kernel_size=2, ceil_mode=True), "ceil_mode"),
    (lambda x: dict(kernel_size=10), "smaller than one window"),
    (lambda x: dict(kernel_size=(2, 10)), "smaller than one window"),
    (lambda x: dict(kernel_size=(16, 16)), "255 elements"),
])
def test_calls_the_kernel_does_not_cover_run_torch(call, reason):
    x = torch.randn(2, 3, 9, 9)
    kwargs = call(x)
    assert reason in native_window(x, **kwargs)
    with backends.trace() as calls:
        try:
            ours = max_pool2d(x, **kwargs)
        except RuntimeError as e:  # torch's own error for a window larger than the input
            with pytest.raises(RuntimeError, match=re.escape(str(e))):
                F.max_pool2d(x, **kwargs)
            return
    assert calls == [("max_pool2d", Impl.REFERENCE)]
    ref = F.max_pool2d(x, **kwargs)
    if isinstance(ref, tuple):
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    else:
        assert torch.equal(ours, ref)
    with pytest.raises(ImplementationUnavailable, match="impl=native.*" + reason.split()[-1]):
        max_pool2d(x, impl="native", **kwargs)


def test_ceil_mode_on_whole_windows_and_other_layouts():
    x = torch.randn(2, 3, 8, 8)
    assert native_window(x, 2, ceil_mode=True) == (2, 2)
    assert torch.equal(max_pool2d(x, 2, ceil_mode=True), F.max_pool2d(x, 2, ceil_mode=True))
    assert "not contiguous" in native_window(x.transpose(2, 3), 2)
    assert "not contiguous" in native_window(x.contiguous(memory_format=torch.channels_last), 2)
    assert "dtype" in native_window(x.int(), 2)
    assert "shape" in native_window(torch.randn(3, 8), 2)
    assert "shape" in native_window(torch.randn(0, 3, 8, 8), 2)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(max_pool2d(cl, 2), F.max_pool2d(cl, 2))


def test_dispatch_and_its_errors(monkeypatch):
    x = torch.randn(2, 3, 8, 8)
    with backends.trace() as calls:
        max_pool2d(x, 2)
        max_pool2d(x, 2, impl="reference")
    assert calls == [("max_pool2d", Impl.NATIVE), ("max_pool2d", Impl.REFERENCE)]
    with pytest.raises(ImplementationUnavailable, match="no Triton max-pool"):
        max_pool2d(x, 2, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        max_pool2d(x, 2, impl="fast")
    monkeypatch.setenv("FASTMETA_IMPL", "reference")
    with backends.trace() as calls:
        max_pool2d(x, 2)
    assert calls == [("max_pool2d", Impl.REFERENCE)]


def test_under_vmap_it_runs_torch():
    x = torch.randn(4, 3, 8, 8)
    with backends.trace() as calls:
        out = torch.func.vmap(lambda t: max_pool2d(t, 2))(x)
    assert calls == [("max_pool2d", Impl.REFERENCE)]
    assert torch.equal(out, F.max_pool2d(x, 2))


@pytest.fixture
def all_sizes(monkeypatch):
    """The automatic routing (the mode, fastmeta's functional calls) takes the kernel from
    MIN_NATIVE_ELEMENTS input elements up; tests on small tensors lower that to 0."""
    monkeypatch.setattr(max_pool_op, "MIN_NATIVE_ELEMENTS", 0)


def test_automatic_routing_leaves_small_pools_to_torch():
    net = nn.Sequential(nn.MaxPool2d(2))
    small = torch.randn(2, 4, 8, 8)
    large = torch.randn(2, 16, 64, 64)  # 131,072 elements: the threshold
    assert large.numel() == max_pool_op.MIN_NATIVE_ELEMENTS
    for context in (native_layers, lambda: native_pool_modules(net)):
        with backends.trace() as calls, context():
            net(small)
            net(large)
        assert calls == [("max_pool2d", Impl.NATIVE)]
    # An explicit call takes the kernel at any size.
    with backends.trace() as calls:
        max_pool2d(small, 2)
    assert calls == [("max_pool2d", Impl.NATIVE)]


def test_native_pool_modules_patches_and_restores():
    class OwnPool(nn.MaxPool2d):
        pass

    custom = nn.MaxPool2d(2)
    custom.forward = lambda x: x  # an instance-level forward of the user's: left alone
    net = nn.Sequential(nn.MaxPool2d(2), OwnPool(2), custom, nn.Sequential(nn.MaxPool2d(2)))
    x = torch.randn(1, 2, 128, 128).repeat(40, 4, 1, 1)  # above the threshold after two pools
    with backends.trace() as calls, native_pool_modules(net):
        assert "forward" in net[0].__dict__ and "forward" in net[3][0].__dict__
        assert "forward" not in net[1].__dict__ and net[2].forward(x) is x
        y = net(x)
    assert calls == [("max_pool2d", Impl.NATIVE)] * 2  # net[0] and net[3][0]
    assert torch.equal(y, net(x))
    assert "forward" not in net[0].__dict__ and "forward" not in net[3][0].__dict__
    assert custom.forward(x) is x
    with pytest.raises(RuntimeError, match="boom"), native_pool_modules(net):
        raise RuntimeError("boom")
    assert "forward" not in net[0].__dict__


def test_native_pool_modules_nests_shares_and_copies(all_sizes):
    import copy

    shared = nn.MaxPool2d(2)
    net = nn.Sequential(shared, nn.ReLU(), shared)  # one pool used twice: patched once
    x = torch.randn(2, 3, 16, 16)
    with backends.trace() as calls, native_pool_modules(net):
        with native_pool_modules(net):  # nested on the same module
            net(x)
        assert "forward" in shared.__dict__  # the outer block still holds it
        clone = copy.deepcopy(net)  # a copy made inside the block
        net(x)
        clone(x)
    assert calls == [("max_pool2d", Impl.NATIVE)] * 4  # the copy ran torch's pool
    assert "forward" not in shared.__dict__
    with backends.trace() as calls:
        assert torch.equal(clone(x), net(x))  # the copy keeps behaving as nn.MaxPool2d
    assert calls == []
    # A forward the user sets inside the block is theirs: not removed on exit.
    with native_pool_modules(net):
        mine = lambda t: t  # noqa: E731
        shared.forward = mine
    assert shared.forward is mine
    # return_indices=True: the kernel does not cover it, torch's result comes back.
    pool = nn.MaxPool2d(2, return_indices=True)
    with native_pool_modules(pool):
        out, idx = pool(x)
    ref_out, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)


def test_fastmeta_calls_use_the_kernel_from_the_threshold_up():
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.MaxPool2d(2), nn.MaxPool2d(2))
    layout = FlatLayout.of(net)
    theta = layout.flatten(net)
    # 32 x 16 x 16 x 16 = 131,072 elements into the first pool, 32,768 into the second.
    x = torch.randn(32, 1, 16, 16)
    with backends.trace() as calls:
        out = layout.call_unchecked(net, theta, (x,))
    assert calls == [("max_pool2d", Impl.NATIVE)]
    torch.testing.assert_close(out, net(x))
    with backends.trace() as calls:
        layout.call_unchecked(net, theta, (x[:31],))  # 126,976: both pools stay with torch
    assert calls == []


def test_native_layers_routes_modules_and_functional_calls(all_sizes):
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.MaxPool2d(3, stride=1))
    x = torch.randn(5, 1, 12, 12)
    with backends.trace() as calls, native_layers():
        y = net(x)
        z = F.max_pool2d(y, 2)
    # The overlapping MaxPool2d(3, stride=1) is not the kernel's: the mode leaves it to torch.
    assert calls == [("max_pool2d", Impl.NATIVE), ("max_pool2d", Impl.NATIVE)]
    assert torch.equal(y, net(x)) and torch.equal(z, F.max_pool2d(net(x), 2))


def test_functional_calls_of_fastmeta_use_it_for_max_pool_models_only(all_sizes):
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten())
    plain = nn.Sequential(nn.Linear(3, 2))
    for model, x, expected in ((pooled, torch.randn(2, 1, 8, 8), [("max_pool2d", Impl.NATIVE)]),
                               (plain, torch.randn(2, 3), [])):
        layout = FlatLayout.of(model)
        with backends.trace() as calls:
            out = layout.call_unchecked(model, layout.flatten(model), (x,))
        assert calls == expected
        assert torch.equal(out, model(x))


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_every_isa_build_agrees(isa):
    """The AVX-512 and AVX2 builds have their own 2x2 float32 rows; every build must give torch's
    bits, on every row width (masked tails) and odd sizes, with NaNs and -0.0 gradients."""
    import fastmeta._C as C

    if isa == C.isa():
        pytest.skip(f"{isa} is the default build here")
    code = (
        "import torch, torch.nn.functional as F\n"
        "from fastmeta.ops.max_pool import max_pool2d\n"
        "torch.manual_seed(0)\n"
        "bad = 0\n"
        "for w in range(1, 21):\n"
        "  for odd in (0, 1):\n"
        "    x = torch.randn(3, 5, 2 * w + odd, 2 * w + odd).relu().requires_grad_()\n"
        "    x.data[0, 0, 0, :3] = float('nan')\n"
        "    y = max_pool2d(x, 2, impl='native'); r = F.max_pool2d(x, 2)\n"
        "    g = torch.randn(r.shape); g[..., ::2, ::3] = -0.0\n"
        "    a = torch.autograd.grad(y, x, g)[0]; b = torch.autograd.grad(r, x, g)[0]\n"
        "    bad += not torch.equal(y.view(torch.int32), r.view(torch.int32))\n"
        "    bad += not torch.equal(a.view(torch.int32), b.view(torch.int32))\n"
        "print(bad)\n"
    )
    env = {**os.environ, "FASTMETA_CPU_ISA": isa}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if res.returncode != 0 and "does not support it" in res.stderr:
        pytest.skip(f"this CPU does not run {isa}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0"]


@pytest.mark.parametrize("stride", [None, (), [2, 2], (2,), 2])
def test_stride_forms(stride):
    x = torch.randn(2, 3, 8, 8)
    assert native_window(x, [2, 2], stride) == (2, 2)
    with backends.trace() as calls:
        assert torch.equal(max_pool2d(x, (2, 2), stride), F.max_pool2d(x, 2))
    assert calls == [("max_pool2d", Impl.NATIVE)]


def test_fake_tensors_and_torch_compile_run_torch():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # no real data pointer: never the kernel (it crashed before)
        x = torch.randn(2, 3, 8, 8)
        assert "FakeTensor" in native_window(x, 2)
        assert max_pool2d(x, 2).shape == (2, 3, 4, 4)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Flatten())
    layout = FlatLayout.of(net)
    theta = layout.flatten(net)
    x = torch.randn(3, 1, 8, 8)
    compiled = torch.compile(lambda th, t: layout.call_unchecked(net, th, (t,)),
                             backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(theta, x), net(x))


def test_routed_pool_compiles_into_one_graph(monkeypatch):
    # routed_max_pool2d (FiLMConv4's pool) under torch.compile is torch's pool, traced without a
    # graph break, even for inputs the kernel would take (its storage is never read).
    monkeypatch.setattr("fastmeta.ops.max_pool.MIN_NATIVE_ELEMENTS", 0)
    from fastmeta.meta.networks import FiLMConv4

    torch.manual_seed(0)
    net = FiLMConv4(num_context_params=3, filters=4, image_size=8)
    x, context = torch.rand(2, 3, 1, 8, 8), torch.randn(2, 3)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", fullgraph=True)  # raises at a graph break
    torch.testing.assert_close(compiled(x, context), net(x, context))


def test_batched_backward_under_vmap_equals_torch():
    """The backward runs under vmap for is_grads_batched=True: the scatter then runs in torch
    ops, as does the gather of the backward's backward."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    grads = torch.randn(5, 2, 3, 4, 4, dtype=torch.float64)
    grads[:, :, :, ::2] = -0.0
    v = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(5, 2, 3, 8, 8, dtype=torch.float64)
    results = []
    for pool in (lambda t: max_pool2d(t, 2, impl="native"), lambda t: F.max_pool2d(t, 2)):
        (batched,) = torch.autograd.grad(pool(x), x, grads, is_grads_batched=True)
        (gx,) = torch.autograd.grad(pool(x), x, v, create_graph=True)
        (gv,) = torch.autograd.grad(gx, v, ws, is_grads_batched=True)
        results.append((batched, gv))
    for a, b in zip(*results):
        assert _same(a, b)


def test_the_mode_leaves_uncovered_pools_alone_even_when_native_is_forced(monkeypatch,
                                                                          all_sizes):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(3, stride=2), nn.MaxPool2d(2))
    layout = FlatLayout.of(net)
    x = torch.randn(2, 1, 16, 16)
    monkeypatch.setenv("FASTMETA_IMPL", "native")
    with backends.trace() as calls:
        out = layout.call_unchecked(net, layout.flatten(net), (x,))
    assert calls == [("max_pool2d", Impl.NATIVE)]  # the 2x2 one; the overlapping one is torch's
    assert torch.equal(out, net(x))


def test_fastmeta_calls_under_torch_func_skip_the_mode():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2))
    layout = FlatLayout.of(net)
    rows = layout.expand(layout.flatten(net), 3)
    x = torch.randn(3, 2, 1, 8, 8)
    with backends.trace() as calls:
        out = torch.func.vmap(lambda r, t: layout.call_unchecked(net, r, (t,)))(rows, x)
    assert calls == []  # no mode, so F.max_pool2d went straight to torch
    torch.testing.assert_close(out, torch.stack([net(t) for t in x]))
