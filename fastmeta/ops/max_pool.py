"""2-D max-pooling over non-overlapping windows, differentiable to any order, on a native kernel.

For a window size :math:`k_h \\times k_w` equal to the stride (``nn.MaxPool2d(2)``, the
pooling of conv-4), no padding and no dilation, each output is the maximum of its own window:

.. math::
    y_{c,i,j} = x_{c,\\,a(c,i,j)}, \\qquad
    a(c,i,j) = \\operatorname*{arg\\,max}_{(u,v) \\in W_{ij}} x_{c,u,v}, \\qquad
    W_{ij} = \\{i k_h, \\dots, i k_h + k_h - 1\\} \\times \\{j k_w, \\dots, j k_w + k_w - 1\\}

with torch's tie rule (the first maximum in row-major window order; a NaN wins over everything
before it) and floor mode (rows and columns past the last whole window are dropped). The
winner :math:`a` is piecewise constant in :math:`x`, so the derivatives are linear maps:

.. math::
    \\bar x = S_a(\\bar y) \\;\\text{(scatter: } \\bar y \\text{ to each winner, 0 elsewhere)},
    \\qquad \\bar{\\bar y} = G_a(\\bar{\\bar x}) = S_a^\\top(\\bar{\\bar x})
    \\;\\text{(gather at the winners)}

and the scatter's and the gather's own derivatives are each other, which is what second-order
MAML through a max-pool needs. The reference is ``torch.nn.functional.max_pool2d``.

Why a kernel: torch's CPU max-pool on NCHW tensors runs a generic (kernel, stride, padding,
dilation) loop and writes int64 indices. On conv-4's first layer of 75 query images
([75, 64, 28, 28] float32) it took 11.5 ms on this project's 2-core VM, against 0.4 ms for a
ReLU of the same tensor; max-pooling was a fifth of a MAML meta-step. The native kernel
(``csrc/max_pool.cpp``) keeps a one-byte winner per output instead.

On CUDA there is no Triton kernel: torch's own (cuDNN) pooling is used there, without a warning,
because it is not the slow path this op exists to replace.

:class:`native_layers` runs every ``F.max_pool2d`` (and so every ``nn.MaxPool2d``) called inside
it on this op. fastmeta's own functional calls (:meth:`fastmeta.flat.FlatLayout.call_unchecked`:
the loop strategy, MAML's query forward) use the cheaper :func:`native_pool_modules` around
each task's forward, so a user's plain ``nn.Module`` gets the kernel without being changed.
A network that calls its pooling functionally can call :func:`routed_max_pool2d` instead of
``F.max_pool2d`` (:class:`fastmeta.meta.networks.FiLMConv4` does). All three leave pools on
inputs under :data:`MIN_NATIVE_ELEMENTS` elements to torch (see there).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastmeta import backends
from fastmeta._autograd import Function
from fastmeta.backends import Impl, ImplementationUnavailable
from fastmeta.ops.tensor_lists import DTYPE_CODES

__all__ = ["MIN_NATIVE_ELEMENTS", "MaxPool2dFunction", "gather", "max_pool2d",
           "max_pool2d_reference", "native_layers", "native_pool_modules", "native_window",
           "routed_max_pool2d", "scatter"]

# The winner's position in its window is stored in one byte (csrc/max_pool.cpp).
_MAX_WINDOW = 255
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _has_data(t: torch.Tensor) -> bool:
    """Whether the kernel can read ``t`` through its data pointer: a plain tensor with storage.
    Not a FakeTensor or other subclass, nor a batched tensor of vmap (including the legacy
    vmap of ``autograd.grad(..., is_grads_batched=True)``, which functorch does not flag)."""
    return type(t) in _PLAIN_TENSORS and torch._C._has_storage(t)


def _kernel_reads(t: torch.Tensor) -> bool:
    """:func:`_has_data`, and no ``torch.func`` transform active: the scatter and gather then
    run on the kernel, else as torch ops."""
    return _has_data(t) and not torch._C._are_functorch_transforms_active()


def max_pool2d_reference(input: torch.Tensor, kernel_size: Any, stride: Any = None,
                         padding: Any = 0, dilation: Any = 1, ceil_mode: bool = False,
                         return_indices: bool = False) -> Any:
    """The spec: ``torch.nn.functional.max_pool2d``."""
    return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                        return_indices=return_indices)


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (value[0], value[1])
    if isinstance(value, (tuple, list)) and len(value) == 1:
        return _pair(value[0])
    return None


def native_window(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
                  dilation: Any = 1, ceil_mode: bool = False,
                  return_indices: bool = False) -> tuple[int, int] | str:
    """``(kernel_h, kernel_w)`` when the native kernel computes exactly this
    ``F.max_pool2d`` call, else the reason it does not (a string).

    It covers: a contiguous CPU tensor of 3 or 4 dimensions, float32/float64/float16/bfloat16,
    at least one element, windows equal to the stride with at most 255 elements, no padding,
    no dilation, floor mode (or ceil mode where the windows tile the input exactly), at least
    one window per plane, no indices returned, a plain tensor (not a subclass such as
    FakeTensor), no ``torch.func`` transform active and no ``torch.compile`` tracing."""
    if not isinstance(input, torch.Tensor):
        return "the input is not a tensor"
    # Before anything that reads the tensor's storage: dynamo cannot trace that, and would break
    # the graph at every pool.
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if not _has_data(input):
        return f"the input is a {type(input).__name__} without storage, not a plain tensor"
    if input.device.type != "cpu":
        return f"the input is on {input.device}, not the CPU"
    if input.dtype not in DTYPE_CODES:
        return f"dtype {input.dtype} is not float32, float64, float16 or bfloat16"
    if input.dim() not in (3, 4) or input.numel() == 0:
        return f"the input has shape {list(input.shape)}, not a non-empty [N, C, H, W] or [C, H, W]"
    if not input.is_contiguous():
        return "the input is not contiguous"
    if return_indices:
        return "return_indices=True (torch's int64 indices are not kept)"
    kernel = _pair(kernel_size)
    steps = kernel if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) \
        else _pair(stride)
    if kernel is None or steps is None or kernel != steps:
        return "the windows overlap or leave gaps (stride != kernel_size)"
    if _pair(padding) != (0, 0) or _pair(dilation) != (1, 1):
        return "padding or dilation"
    kh, kw = kernel
    if kh < 1 or kw < 1 or kh * kw > _MAX_WINDOW:
        return f"kernel_size {kernel} is not between 1 and {_MAX_WINDOW} elements"
    height, width = input.shape[-2:]
    if height < kh or width < kw:
        return "a plane is smaller than one window"
    if ceil_mode and (height % kh or width % kw):
        return "ceil_mode=True with a partial window"
    if torch._C._are_functorch_transforms_active():
        return "torch.func transforms are active"
    return kh, kw


def _planes(shape: torch.Size) -> int:
    planes = 1
    for size in shape[:-2]:
        planes *= size
    return planes


def _pooled_shape(shape: torch.Size, kh: int, kw: int) -> torch.Size:
    return torch.Size([*shape[:-2], shape[-2] // kh, shape[-1] // kw])


# The passes of _C.max_pool (csrc/bindings.cpp: MaxPoolPass).
_FORWARD, _SCATTER, _GATHER = 0, 1, 2


def _run(pass_: int, source: torch.Tensor, target: torch.Tensor, argmax: torch.Tensor,
         plane_shape: torch.Size, kh: int, kw: int) -> torch.Tensor:
    """One native pass over the planes of ``plane_shape`` (the input's shape); returns target."""
    backends.native().max_pool(pass_, source.data_ptr(), target.data_ptr(), argmax.data_ptr(),
                               DTYPE_CODES[source.dtype], _planes(plane_shape), plane_shape[-2],
                               plane_shape[-1], kh, kw)
    return target


def _scatter(grad_output: torch.Tensor, argmax: torch.Tensor, input_shape: torch.Size,
             kh: int, kw: int) -> torch.Tensor:
    grad_output = grad_output.contiguous()
    return _run(_SCATTER, grad_output, grad_output.new_empty(input_shape), argmax, input_shape,
                kh, kw)


def _gather(grad_input_grad: torch.Tensor, argmax: torch.Tensor, kh: int,
            kw: int) -> torch.Tensor:
    grad_input_grad = grad_input_grad.contiguous()
    shape = grad_input_grad.shape
    return _run(_GATHER, grad_input_grad, grad_input_grad.new_empty(_pooled_shape(shape, kh, kw)),
                argmax, shape, kh, kw)


def _window_index(argmax: torch.Tensor, input_shape: torch.Size, kh: int,
                  kw: int) -> torch.Tensor:
    """``[planes, OH·OW]`` int64: each winner's flat index in its ``H·W`` plane."""
    oh_n, ow_n = argmax.shape[-2:]
    a = argmax.long()
    rows = torch.arange(oh_n).view(oh_n, 1) * kh + a // kw
    cols = torch.arange(ow_n).view(1, ow_n) * kw + a % kw
    return (rows * input_shape[-1] + cols).reshape(_planes(input_shape), oh_n * ow_n)


def scatter(grad_output: torch.Tensor, argmax: torch.Tensor, input_shape: torch.Size, kh: int,
            kw: int) -> torch.Tensor:
    """``S_a(ȳ)``, differentiable: the kernel, or (under a ``torch.func`` transform, in a
    backward with ``is_grads_batched=True``, or for a tensor subclass) the same map in torch
    ops. ``scatter_add`` into zeros, so a ``-0.0`` gradient lands as ``+0.0`` as in torch."""
    if not _kernel_reads(grad_output):
        index = _window_index(argmax, input_shape, kh, kw)
        flat = grad_output.reshape(index.shape)
        return flat.new_zeros(index.shape[0], input_shape[-2] * input_shape[-1]).scatter_add(
            1, index, flat).view(input_shape)
    return _Scatter.apply(grad_output, argmax, input_shape, kh, kw)


def gather(grad_input_grad: torch.Tensor, argmax: torch.Tensor, kh: int,
           kw: int) -> torch.Tensor:
    """``G_a(x̄')``, differentiable, with the same two paths as :func:`scatter`."""
    if not _kernel_reads(grad_input_grad):
        shape = grad_input_grad.shape
        index = _window_index(argmax, shape, kh, kw)
        return grad_input_grad.reshape(index.shape[0], -1).gather(1, index).view(argmax.shape)
    return _Gather.apply(grad_input_grad, argmax, kh, kw)


class _Scatter(Function):
    """``x̄ = S_a(ȳ)``, the max-pool's backward; its derivative is the gather."""

    @staticmethod
    def forward(grad_output, argmax, input_shape, kh, kw):  # type: ignore[override]
        return _scatter(grad_output, argmax, input_shape, kh, kw)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, argmax, _, ctx.kh, ctx.kw = inputs
        ctx.save_for_backward(argmax)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (argmax,) = ctx.saved_tensors
        return gather(grad, argmax, ctx.kh, ctx.kw), None, None, None, None


class _Gather(Function):
    """``ȳ' = G_a(x̄')``, the scatter's adjoint; its derivative is the scatter."""

    @staticmethod
    def forward(grad_input_grad, argmax, kh, kw):  # type: ignore[override]
        return _gather(grad_input_grad, argmax, kh, kw)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        grad_input_grad, argmax, ctx.kh, ctx.kw = inputs
        ctx.input_shape = grad_input_grad.shape
        ctx.save_for_backward(argmax)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (argmax,) = ctx.saved_tensors
        return scatter(grad, argmax, ctx.input_shape, ctx.kh, ctx.kw), None, None, None


class MaxPool2dFunction(Function):
    """``(y, a)`` of the native kernel; the backward is :class:`_Scatter`, itself differentiable.
    ``a`` (uint8, the winner's row-major position in its window) is not differentiable."""

    @staticmethod
    def forward(input, kh, kw):  # type: ignore[override]
        shape = _pooled_shape(input.shape, kh, kw)
        argmax = torch.empty(shape, dtype=torch.uint8)
        return _run(_FORWARD, input, input.new_empty(shape), argmax, input.shape, kh, kw), argmax

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        input, ctx.kh, ctx.kw = inputs
        ctx.input_shape = input.shape
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_output, _grad_argmax):  # type: ignore[override]
        (argmax,) = ctx.saved_tensors
        return scatter(grad_output, argmax, ctx.input_shape, ctx.kh, ctx.kw), None, None


def max_pool2d(input: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
               dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False, *,
               impl: Impl | str = Impl.AUTO) -> Any:
    """``torch.nn.functional.max_pool2d``, on the native kernel where it applies.

    Same arguments and result as ``F.max_pool2d`` (equal values; gradients equal to torch's,
    including at ties and NaNs). Calls that :func:`native_window` does not cover run
    ``F.max_pool2d`` itself, as do CUDA tensors (see the module docstring).

    Args:
        impl: ``"auto"``: native where it applies; ``"reference"``: always ``F.max_pool2d``;
            ``"native"``: the kernel, or an error saying why it cannot run this call.

    Raises:
        ImplementationUnavailable: ``impl="native"`` (or ``"triton"``) was asked for and cannot
            run this call.
    """
    window = native_window(input, kernel_size, stride, padding, dilation, ceil_mode,
                           return_indices)
    return _dispatch(window, impl, input, kernel_size, stride, padding, dilation, ceil_mode,
                     return_indices)


def _dispatch(window: tuple[int, int] | str, impl: Impl | str, input: torch.Tensor,
              *args: Any) -> Any:
    """:func:`max_pool2d` once :func:`native_window` has been asked (``window``); ``args`` are
    the rest of ``F.max_pool2d``'s arguments, in its order."""
    requested = backends.requested_impl(impl)
    if requested is Impl.TRITON:
        raise ImplementationUnavailable("max_pool2d: impl=triton was requested but fastmeta has "
                                        "no Triton max-pool (torch's CUDA pooling is used)")
    if isinstance(window, str) and requested is Impl.NATIVE:
        raise ImplementationUnavailable(
            f"max_pool2d: impl=native was requested but the kernel cannot run this call: {window}")
    if isinstance(window, str) or requested is Impl.REFERENCE:
        backends.note("max_pool2d", Impl.REFERENCE)
        return max_pool2d_reference(input, *args)
    # auto without the extension: resolve warns once and says reference.
    if backends.resolve(requested, input.device, op="max_pool2d") is not Impl.NATIVE:
        return max_pool2d_reference(input, *args)
    output, _ = MaxPool2dFunction.apply(input, *window)
    return output


# Below this many input elements, :class:`native_layers` and :func:`native_pool_modules` leave a
# pool to torch. The kernel itself wins at every size when timed alone, but inside a MAML step
# each pool also costs three Python autograd nodes (forward, scatter, gather): on the 2-core
# AVX-512 VM, second-order MAML on a 32-filter conv-4 (28x28, 1 query per class, T = 8) was
# 6% slower with the kernel on every pool (8x8 digits, 5 queries: 13% slower), and level with
# torch's pool when inputs under 128K elements stayed with torch; the 64-filter conv-4 of the
# benchmark (75 queries per task) kept its whole gain (1.21x over torch's pool, median of 32
# interleaved step pairs, against 1.21x with no threshold; 1.20x / 1.16x / 1.15x at 64K / 256K /
# 1M). Explicit max_pool2d calls are not affected.
MIN_NATIVE_ELEMENTS = 1 << 17


def routed_max_pool2d(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
                      dilation: Any = 1, ceil_mode: bool = False,
                      return_indices: bool = False) -> Any:
    """``F.max_pool2d(...)``: on the kernel where it covers the call and the input has at least
    :data:`MIN_NATIVE_ELEMENTS` elements (``FASTMETA_IMPL`` then still decides), as torch's
    own call everywhere else. The call is checked once (:func:`native_window`).

    What the automatic routing runs (:func:`native_pool_modules`, :class:`native_layers`), and
    what a network that calls its pooling functionally can call instead of ``F.max_pool2d``
    (:class:`fastmeta.meta.networks.FiLMConv4` does) to get the same routing in any context:
    transforms, ``torch.compile``, CUDA and FakeTensors fall back to torch's call."""
    args = (kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    # (native_window sends torch.compile's tracing to torch before it reads any storage.)
    if not isinstance(input, torch.Tensor) or input.numel() < MIN_NATIVE_ELEMENTS:
        return max_pool2d_reference(input, *args)
    window = native_window(input, *args)
    if isinstance(window, str):
        return max_pool2d_reference(input, *args)
    return _dispatch(window, Impl.AUTO, input, *args)


# Modules whose kernel forward a native_pool_modules block holds, by id, with the number of
# blocks (nested, or in other threads) holding each; guarded by _HELD_LOCK.
_HELD: dict[int, int] = {}
_HELD_LOCK = threading.Lock()


class _KernelPoolForward:
    """The instance-level ``forward`` :func:`native_pool_modules` gives an ``nn.MaxPool2d``.

    It runs the kernel only while a block holds its module, and torch's own forward otherwise:
    a copy of the module made inside a block (``copy.deepcopy`` copies the attribute, bound to
    the copy) never holds it, so the copy behaves as a plain ``nn.MaxPool2d``."""

    def __init__(self, module: torch.nn.MaxPool2d) -> None:
        self.module = module

    def __call__(self, input: torch.Tensor) -> Any:
        m = self.module
        if id(m) not in _HELD:
            return torch.nn.MaxPool2d.forward(m, input)
        return routed_max_pool2d(input, m.kernel_size, m.stride, m.padding, m.dilation,
                                 ceil_mode=m.ceil_mode, return_indices=m.return_indices)


def _ours(module: torch.nn.Module) -> bool:
    current = module.__dict__.get("forward")
    return isinstance(current, _KernelPoolForward) and current.module is module


@contextlib.contextmanager
def native_pool_modules(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.MaxPool2d`` submodule of ``module`` (the class itself, not a
    subclass, which may have its own forward) runs the calls the kernel covers on it, from
    :data:`MIN_NATIVE_ELEMENTS` input elements up; the others, and every ``F.max_pool2d``
    called directly, run torch's kernel.

    Cheaper than :class:`native_layers`, which intercepts every torch call in the block (about
    1.3 µs each, 5% of a small conv-4 MAML step): only the pools change, through an instance
    attribute ``forward`` (:class:`_KernelPoolForward`) set when the first block takes a module
    and removed when the last one (nested, or in another thread) lets it go. A module with an
    instance-level ``forward`` of its own is left alone, and so is one set inside the block.
    Results are the same with or without the block; pickling the model inside the block
    records the attribute (a reference to this module)."""
    pools = [sub for sub in module.modules() if type(sub) is torch.nn.MaxPool2d]
    if not pools:  # the common case for models without pools: no lock, nothing to undo
        yield
        return
    held = []
    with _HELD_LOCK:
        for sub in pools:
            if "forward" not in sub.__dict__:
                sub.forward = _KernelPoolForward(sub)
            elif not _ours(sub):
                continue  # the user's own forward
            _HELD[id(sub)] = _HELD.get(id(sub), 0) + 1
            held.append(sub)
    try:
        yield
    finally:
        with _HELD_LOCK:
            for sub in held:
                left = _HELD.pop(id(sub)) - 1
                if left:
                    _HELD[id(sub)] = left
                elif _ours(sub):
                    del sub.__dict__["forward"]


class native_layers(TorchFunctionMode):
    """A context in which ``F.max_pool2d`` (and so ``nn.MaxPool2d``) runs :func:`max_pool2d`
    where the native kernel covers the call (:func:`native_window`) on an input of at least
    :data:`MIN_NATIVE_ELEMENTS` elements; every other call runs unchanged.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.MaxPool2d(2))
        >>> with native_layers():
        ...     y = net(torch.randn(4, 1, 28, 28))
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        # Only the calls the kernel covers: the others run exactly as without the mode (even
        # under FASTMETA_IMPL=native, which would make max_pool2d refuse them).
        if func is F.max_pool2d:
            return routed_max_pool2d(*args, **kwargs)
        return func(*args, **kwargs)
