"""One forward for T tasks at once, each task with its own parameters from a flat ``[T, N]`` buffer.

MAML's inner loop evaluates the same network with T different parameter vectors. ``vmap`` over
``functional_call`` does that with a batching rule per op; a Python loop does it with T
forwards. For the layers below the batched maths is a plain batched op, so :class:`BatchedModule`
runs the model's own ``forward`` once, on the examples of every task stacked as one batch,
with each parametrised layer swapped for its task-batched form:

=================  ===========================================================================
layer              task-batched form
=================  ===========================================================================
``nn.Linear``      :math:`y_t = x_t W_t^\\top + b_t`: one ``baddbmm`` over the T tasks
``nn.Conv2d``      one grouped convolution (``groups=T``) over ``[B, T·C, H, W]``
``nn.BatchNorm2d`` one ``batch_norm`` over ``[B, T·C, H·W]``: batch statistics per task
                   (transductive, as MAML) and :math:`\\gamma_t, \\beta_t`
``nn.LayerNorm``   per example, with :math:`\\gamma_t, \\beta_t`
=================  ===========================================================================

The stacked batch is example-major, ``[B·T, ...]`` (example b of task t at row b·T + t), so that
``[B·T, C, H, W]`` *is* ``[B, T·C, H, W]``: the convolutions and norms take it as a view, and
only the Linear layers transpose (their activations are small). A model of Linear/LayerNorm
layers and elementwise functions needs no stacking at all: it runs on ``[T, B, ...]``.

Layers without parameters that act on each example alone (activations, pooling, flatten,
dropout, identity) run unchanged on the stacked batch. Everything is ordinary differentiable
torch, so derivatives of every order are exact (unlike second order through norm layers under
vmap; see :func:`fastmeta.inner_loop.resolve_strategy`).

A model qualifies when every parametrised submodule is one of the layers above and every
container is a known one (``nn.Sequential``, ``nn.ModuleList``, fastmeta's networks): the
forward of an unknown container could mix examples (``x.mean(0)``), which stacking the tasks
would silently turn into mixing tasks. :func:`unsupported` names what stands in the way.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta._autograd import Function
from fastmeta.flat import FlatLayout

__all__ = ["BatchedModule", "unsupported"]

# Parameter-free layers that act elementwise: they run on any shape, [T, B, ...] included.
ELEMENTWISE = (
    nn.Identity, nn.Dropout, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh,
    nn.Sigmoid, nn.Softplus,
)
# Parameter-free layers that treat every example on its own: they run on [T·B, ...] as they are.
PER_EXAMPLE = ELEMENTWISE + (
    nn.Flatten, nn.Unflatten, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
# Layers whose task-batched form takes x as [T, B, ..., features] directly.
FEATURE_LAST = (nn.Linear, nn.LayerNorm)


def _known_containers() -> tuple[type, ...]:
    from fastmeta.meta.networks import MLP, Conv4  # the meta layer sits above this one

    return (nn.Sequential, nn.ModuleList, MLP, Conv4)


def _layer_problem(module: nn.Module) -> str | None:
    """Why ``module`` (one submodule) cannot run task-batched, or None. Types are matched
    exactly: a subclass may have its own forward or parameters, which the batched form would
    silently drop."""
    kind = type(module)
    if kind is nn.Linear or kind is nn.LayerNorm:
        return None
    if kind is nn.Conv2d:
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding,
                                                                              str):
            return "a Conv2d with groups, a padding mode or string padding"
        return None
    if kind is nn.BatchNorm2d:
        if module.training and module.track_running_stats and module.running_mean is not None:
            return "a BatchNorm2d that updates running statistics"
        return None
    if kind in (nn.Flatten, nn.Unflatten) and (
            getattr(module, "start_dim", 1) == 0 or getattr(module, "dim", 1) == 0):
        return f"a {kind.__name__} over the batch dimension"
    if kind in PER_EXAMPLE:
        return None
    if any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)):
        return f"a {kind.__name__} (no task-batched form)"
    if next(module.children(), None) is None:
        return f"a {kind.__name__} (not known to act on each example alone)"
    if kind not in _known_containers():
        return f"a {kind.__name__} container (its forward could mix examples)"
    return None


def unsupported(module: nn.Module) -> list[str]:
    """``"name: reason"`` for each submodule that keeps ``module`` from running task-batched;
    empty when :class:`BatchedModule` can run it."""
    problems = []
    for name, m in module.named_modules():
        reason = _layer_problem(m)
        if reason is not None:
            problems.append(f"{name or type(m).__name__}: {reason}")
    return problems


class BatchedModule:
    """Calls ``module`` for T tasks at once with per-task parameters from a ``[T, N]`` buffer.

    Args:
        module: the model; see :func:`unsupported` for what qualifies.
        layout: its :class:`FlatLayout` (built if not given).

    Raises:
        ValueError: naming every submodule that has no task-batched form.

    Example:
        >>> import torch
        >>> from fastmeta.batched import BatchedModule
        >>> from fastmeta.flat import FlatLayout
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(),
        ...                           torch.nn.Linear(40, 1))
        >>> params = FlatLayout.of(net).flatten(net).expand(25, -1)
        >>> BatchedModule(net)(params, torch.zeros(25, 10, 1)).shape
        torch.Size([25, 10, 1])
    """

    def __init__(self, module: nn.Module, layout: FlatLayout | None = None) -> None:
        problems = unsupported(module)
        if problems:
            raise ValueError("cannot run this model task-batched: " + "; ".join(problems))
        if layout is not None:
            layout.check_module(module)
        # Weak: a runner cached per model (fastmeta.inner_loop) must not keep the model alive.
        self._module = weakref.ref(module)
        # Calls patch the layers' forwards, so two threads must not run one model at once.
        self._lock = threading.RLock()
        self.layout = layout if layout is not None else FlatLayout.of(module)
        index_of = dict(self.layout.slots)
        # (submodule, {parameter name: entry index}) for every layer that holds parameters.
        self._layers = []
        for prefix, m in module.named_modules():
            own = {n: index_of[f"{prefix}.{n}" if prefix else n]
                   for n, p in m.named_parameters(recurse=False) if p is not None}
            if own:
                self._layers.append((m, own))
        # How each entry is viewed: Linear takes W as [T, in, out] and b as [T, 1, out], the
        # operands of baddbmm, so no transpose or unsqueeze node is left for autograd.
        self._forms = [(tuple(e.shape), False) for e in self.layout.entries]
        for m, own in self._layers:
            if isinstance(m, nn.Linear):
                i = own["weight"]
                self._forms[i] = ((m.out_features, m.in_features), True)
                if "bias" in own:
                    self._forms[own["bias"]] = ((1, m.out_features), False)
        self._forms = tuple(self._forms)
        # A model of Linear/LayerNorm layers and elementwise functions runs on [T, B, ...] as
        # it is; any other layer needs the tasks stacked into one batch dimension [B·T, ...].
        self._stack = not all(
            isinstance(m, FEATURE_LAST + ELEMENTWISE) or next(m.children(), None) is not None
            for m in module.modules())

    def __call__(self, params: torch.Tensor, inputs: torch.Tensor | Sequence[torch.Tensor],
                 ) -> Any:
        """The outputs ``[T, B, ...]`` for inputs ``[T, B, ...]`` (a tensor or a tuple of
        positional inputs) and parameters ``params [T, N]``. Unchecked: the caller validated
        the shapes."""
        xs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        tasks = params.shape[0]
        per_task = xs[0].shape[1]
        if self._stack:  # [T, B, ...] -> [B·T, ...], example-major
            xs = tuple(x.transpose(0, 1).reshape(tasks * per_task, *x.shape[2:]) for x in xs)
        # Every parameter as a [T, *shape] view, from one autograd node (not two per tensor).
        views = _TaskViews.apply(params, self.layout.entries, self._forms)
        module = self.module
        with self._lock:
            patched = []
            try:
                for m, own in self._layers:
                    weights = {n: views[i] for n, i in own.items()}
                    # An instance attribute shadows the class's forward; any forward already
                    # set on the instance (a hook library's) is put back afterwards.
                    patched.append((m, m.__dict__.get("forward")))
                    m.forward = _batched_forward(m, weights, tasks, self._stack)
                out = module(*xs)
            finally:
                for m, previous in patched:
                    if previous is None:
                        del m.forward
                    else:
                        m.forward = previous
        if not self._stack:
            return out
        return out.reshape(per_task, tasks, *out.shape[1:]).transpose(0, 1)


    @property
    def module(self) -> nn.Module:
        module = self._module()
        if module is None:
            raise RuntimeError("the module of this BatchedModule no longer exists")
        return module


class _TaskViews(Function):
    """``[T, N]`` -> one view per layout entry, ``[T, *shape]`` transposed in its last two
    dimensions where its form says so, as a single autograd node. Its backward concatenates
    the views' gradients with differentiable ops, so second order works through it."""

    @staticmethod
    def forward(params: torch.Tensor, entries: Sequence[Any],
                forms: Sequence[tuple[tuple[int, ...], bool]]) -> tuple[torch.Tensor, ...]:
        tasks = params.shape[0]
        views = []
        for e, (shape, transposed) in zip(entries, forms):
            v = params.narrow(1, e.offset, e.numel).view(tasks, *shape)
            views.append(v.transpose(-1, -2) if transposed else v)
        return tuple(views)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.entries, ctx.forms = inputs[1], inputs[2]
        ctx.tasks = inputs[0].shape[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor, None, None]:
        ref = next(g for g in grads if g is not None)
        pieces = []
        for g, e, (_, transposed) in zip(grads, ctx.entries, ctx.forms):
            if g is None:
                pieces.append(ref.new_zeros(ctx.tasks, e.numel))
            else:
                pieces.append((g.transpose(-1, -2) if transposed else g).reshape(ctx.tasks,
                                                                               e.numel))
        return torch.cat(pieces, 1), None, None


def _batched_forward(m: nn.Module, w: dict[str, torch.Tensor], tasks: int, stacked: bool
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(m, nn.Linear):
        return lambda x: _linear(x, w["weight"], w.get("bias"), tasks, stacked)
    if isinstance(m, nn.Conv2d):
        return lambda x: _conv2d(m, x, w["weight"], w.get("bias"), tasks)
    if isinstance(m, nn.BatchNorm2d):
        return lambda x: _batch_norm2d(m, x, w.get("weight"), w.get("bias"), tasks)
    if isinstance(m, nn.LayerNorm):
        return lambda x: _layer_norm(m, x, w.get("weight"), w.get("bias"), tasks, stacked)
    raise AssertionError(f"no batched form for {type(m).__name__}")  # unsupported() screens


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, tasks: int,
            stacked: bool) -> torch.Tensor:
    """``weight_t`` = Wᵀ ``[T, in, out]``, bias ``[T, 1, out]``; x ``[T, B..., in]``, or
    ``[B·T, ..., in]`` when stacked."""
    if stacked:  # [B·T, R..., in] -> [T, B·R, in] and back
        batch = x.shape[0] // tasks
        rest = x.shape[1:-1]
        xt = x.reshape(batch, tasks, -1, x.shape[-1]).transpose(0, 1).reshape(
            tasks, -1, x.shape[-1])
    elif x.dim() == 3:  # [T, B, in] as it is: not even a view node for autograd
        xt = x
    else:
        xt = x.reshape(tasks, -1, x.shape[-1])
    y = torch.bmm(xt, weight_t) if bias is None else torch.baddbmm(bias, xt, weight_t)
    if stacked:
        return y.reshape(tasks, batch, -1, y.shape[-1]).transpose(0, 1).reshape(
            batch * tasks, *rest, y.shape[-1])
    return y if x.dim() == 3 else y.reshape(*x.shape[:-1], y.shape[-1])


def _conv2d(m: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            tasks: int) -> torch.Tensor:
    """x ``[B·T, C, H, W]`` = ``[B, T·C, H, W]``: the T tasks are T groups of one
    convolution, whose output ``[B, T·O, H', W']`` is ``[B·T, O, H', W']`` again."""
    batch = x.shape[0] // tasks
    y = F.conv2d(x.reshape(batch, tasks * x.shape[1], *x.shape[2:]),
                 weight.reshape(-1, *weight.shape[2:]),
                 None if bias is None else bias.reshape(-1), m.stride, m.padding, m.dilation,
                 groups=tasks)
    return y.reshape(batch * tasks, weight.shape[1], *y.shape[2:])


def _affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            shape: tuple[int, ...]) -> torch.Tensor:
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def _batch_norm2d(m: nn.BatchNorm2d, x: torch.Tensor, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, tasks: int) -> torch.Tensor:
    """Each task normalised with its own batch statistics (or the shared running ones in
    eval mode), then scaled by its own γ, β: one native ``batch_norm`` over ``[B, T·C, H·W]``
    (a view of x ``[B·T, C, H, W]``), whose T·C channels are the tasks' channels."""
    batch, channels = x.shape[0] // tasks, x.shape[1]
    if m.training and m.track_running_stats and m.running_mean is not None:
        raise RuntimeError("a BatchNorm2d that updates running statistics (training mode with "
                           "track_running_stats=True) cannot run task-batched")
    batch_stats = m.training or not m.track_running_stats or m.running_mean is None
    running = (None, None) if batch_stats else (m.running_mean.repeat(tasks),
                                                 m.running_var.repeat(tasks))
    y = F.batch_norm(x.reshape(batch, tasks * channels, -1), *running,
                     None if weight is None else weight.reshape(-1),
                     None if bias is None else bias.reshape(-1), training=batch_stats,
                     eps=m.eps)
    return y.reshape(x.shape)


def _layer_norm(m: nn.LayerNorm, x: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, tasks: int, stacked: bool) -> torch.Tensor:
    y = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    features = m.normalized_shape
    if stacked:  # [B·T, R..., *features]: task t is every T-th row
        yt = y.reshape(x.shape[0] // tasks, tasks, -1, *features)
        shape = (1, tasks, 1, *features)
    else:
        yt = y.reshape(tasks, -1, *features)
        shape = (tasks, 1, *features)
    return _affine(yt, weight, bias, shape).reshape(x.shape)
