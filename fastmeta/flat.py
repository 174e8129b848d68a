"""Flat parameters: a module's parameters in one contiguous ``[N]`` (or ``[T, N]``) buffer.

A :class:`FlatLayout` records where each parameter lives in the flat buffer (name, shape,
offset). It turns a buffer back into per-tensor *views* for :func:`torch.func.functional_call`,
so the loss of task t is computed from row t of a ``[T, N]`` buffer with no copies, and the
fused update of ``fastmeta.functional`` touches every task's fast weights in one call.

Buffers (BatchNorm running statistics, for example) are not part of the flat buffer. The
module's own buffers are passed through unchanged. A forward that would update them in place
(a norm layer that tracks running statistics, in training mode) is an error by default,
because each task would overwrite the statistics of the last, and under ``vmap`` the update
cannot run at all. Pass ``mutable_buffers="allow"`` to keep torch's in-place behaviour.

Example:
    >>> import torch
    >>> from fastmeta.flat import flatten
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
    >>> layout, theta = flatten(net)            # theta: [N], a detached copy
    >>> theta.requires_grad_()                  # doctest: +ELLIPSIS
    tensor(...)
    >>> theta_T = layout.expand(theta, 25)      # [25, N], differentiable w.r.t. theta
    >>> x = torch.randn(10, 1)
    >>> y = layout.functional_call(net, theta_T[3], (x,))   # task 3's weights, as views
    >>> y.shape
    torch.Size([10, 1])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastmeta._autograd import Function
from fastmeta.ops.max_pool import native_pool_modules

__all__ = ["MUTABLE_BUFFERS", "FlatEntry", "FlatLayout", "buffer_mutating_modules", "flatten"]

#: What to do with a forward that would update module buffers in place.
MUTABLE_BUFFERS = ("error", "allow")


@dataclass(frozen=True)
class FlatEntry:
    """One parameter's place in the flat buffer: elements ``[offset, offset + numel)``."""

    name: str
    shape: torch.Size
    offset: int
    numel: int


def buffer_mutating_modules(module: nn.Module) -> list[str]:
    """Names of the submodules whose forward, as the module stands now, updates a buffer in place.

    Only norm layers that track running statistics are known to do so (BatchNorm, InstanceNorm
    with ``track_running_stats=True``, in training mode). A custom module that writes to its
    buffers is not detected.
    """
    names = []
    for name, m in module.named_modules():
        if (
            isinstance(m, nn.modules.batchnorm._NormBase)
            and m.training
            and m.track_running_stats
            and m.running_mean is not None
        ):
            names.append(name or type(m).__name__)
    return names


class FlatLayout:
    """Where each parameter of a module lives in a flat ``[N]`` (or ``[..., N]``) buffer.

    Build it with :meth:`FlatLayout.of` (or :func:`flatten`). The layout is a description, not a
    container: it holds no tensors, and any buffer of the right size, dtype and device can be
    viewed through it. Tied parameters appear once, as ``module.named_parameters()`` lists them.

    Attributes:
        entries: one :class:`FlatEntry` per parameter, in ``named_parameters()`` order.
        numel: N, the total number of elements.
        dtype, device: those of every parameter (a flat buffer has only one of each).
        buffer_names: the module's buffers, which are passed through unchanged.
        mutable_buffers: ``"error"`` or ``"allow"``; see the module docstring.
    """

    def __init__(
        self,
        entries: tuple[FlatEntry, ...],
        *,
        dtype: torch.dtype,
        device: torch.device,
        buffer_names: tuple[str, ...] = (),
        mutable_buffers: str = "error",
        slots: tuple[tuple[str, int], ...] | None = None,
    ) -> None:
        if mutable_buffers not in MUTABLE_BUFFERS:
            raise ValueError(
                f"mutable_buffers must be one of {MUTABLE_BUFFERS}, got {mutable_buffers!r}"
            )
        self.entries = entries
        self.numel = sum(e.numel for e in entries)
        self.dtype = dtype
        self.device = torch.device(device)
        self.buffer_names = buffer_names
        self.mutable_buffers = mutable_buffers
        # (name, entry index) for every place functional_call must set: one per parameter, plus
        # one per other module that holds a tied parameter. Tying is resolved here, not by
        # functional_call(tie_weights=True), which corrupts a module reachable under two names
        # (pytorch/pytorch#164759: Sequential(lin, act, lin) leaves lin.weight swapped).
        self.slots = (
            slots if slots is not None else tuple((e.name, i) for i, e in enumerate(entries))
        )

    @classmethod
    def of(cls, module: nn.Module, *, mutable_buffers: str = "error") -> FlatLayout:
        """Records the layout of ``module``'s parameters.

        Args:
            module: every parameter must be a dense floating-point tensor, and all of them must
                share one dtype and one device.
            mutable_buffers: ``"error"`` makes a forward that would update buffers in place
                raise (here, if the module is in that state now, and at every call);
                ``"allow"`` lets it update them.

        Raises:
            TypeError: ``module`` is not an ``nn.Module``, or a parameter is not floating point.
            ValueError: the module has no parameters, or mixes dtypes or devices.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        entries: list[FlatEntry] = []
        offset = 0
        first: tuple[str, torch.Tensor] | None = None
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                raise TypeError(
                    f"module parameter {name!r} has dtype {p.dtype}; a flat buffer holds "
                    "floating-point parameters only"
                )
            if p.layout != torch.strided:
                raise TypeError(f"module parameter {name!r} is {p.layout}; only dense is supported")
            if first is None:
                first = (name, p)
            elif p.dtype != first[1].dtype or p.device != first[1].device:
                raise ValueError(
                    f"module parameter {name!r} is {p.dtype} on {p.device} but {first[0]!r} is "
                    f"{first[1].dtype} on {first[1].device}; a flat buffer needs one dtype and "
                    "one device"
                )
            entries.append(FlatEntry(name, p.shape, offset, p.numel()))
            offset += p.numel()
        if first is None:
            raise ValueError(f"module ({type(module).__name__}) has no parameters to flatten")
        index = {id(p): i for i, (_, p) in enumerate(module.named_parameters())}
        slots = tuple(
            (f"{prefix}.{attr}" if prefix else attr, index[id(p)])
            for prefix, m in module.named_modules()  # each module instance once
            for attr, p in m._parameters.items()
            if p is not None
        )
        layout = cls(
            tuple(entries),
            slots=slots,
            dtype=first[1].dtype,
            device=first[1].device,
            buffer_names=tuple(name for name, _ in module.named_buffers()),
            mutable_buffers=mutable_buffers,
        )
        layout.check_buffers(module)
        return layout

    # ---- validation -------------------------------------------------------------------------

    def check(self, flat: Any, *, name: str = "flat", tasks: int | None = None) -> None:
        """Checks that ``flat`` is a buffer of this layout: ``[N]`` or ``[T, N]``.

        Args:
            flat: the tensor to check.
            name: the argument name used in error messages.
            tasks: None accepts ``[N]`` or ``[T, N]``; 0 requires ``[N]``; a positive T requires
                ``[T, N]``.

        Raises:
            TypeError: not a tensor, or the wrong dtype.
            ValueError: the wrong shape, N or T, or the wrong device.
        """
        if not isinstance(flat, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(flat).__name__}")
        if tasks is None:
            ok_dims = (1, 2)
            want = f"[N] or [T, N] with N={self.numel}"
        elif tasks == 0:
            ok_dims = (1,)
            want = f"[N] with N={self.numel}"
        else:
            ok_dims = (2,)
            want = f"[T, N] with T={tasks}, N={self.numel}"
        if flat.dim() not in ok_dims:
            raise ValueError(f"{name} must have shape {want}, got {list(flat.shape)}")
        if flat.shape[-1] != self.numel:
            raise ValueError(
                f"{name} has N={flat.shape[-1]} elements per row but the module's parameters "
                f"have N={self.numel} (shape {list(flat.shape)}, expected {want})"
            )
        if tasks and flat.shape[0] != tasks:
            raise ValueError(
                f"{name} has T={flat.shape[0]} rows but T={tasks} tasks were expected "
                f"(shape {list(flat.shape)})"
            )
        if flat.dtype != self.dtype:
            raise TypeError(
                f"{name} has dtype {flat.dtype} but the module's parameters are {self.dtype}"
            )
        if flat.device != self.device:
            raise ValueError(
                f"{name} is on {flat.device} but the module's parameters are on {self.device}"
            )

    def check_module(self, module: nn.Module, *, name: str = "module") -> None:
        """Checks that ``module``'s parameters are still those this layout describes."""
        params = dict(module.named_parameters())
        if list(params) != [e.name for e in self.entries]:
            raise ValueError(
                f"{name}'s parameters {list(params)} are not those of the layout "
                f"{[e.name for e in self.entries]}; build a new layout with FlatLayout.of({name})"
            )
        for e in self.entries:
            p = params[e.name]
            if p.shape != e.shape or p.dtype != self.dtype or p.device != self.device:
                raise ValueError(
                    f"{name} parameter {e.name!r} is {list(p.shape)} {p.dtype} on {p.device} but "
                    f"the layout has {list(e.shape)} {self.dtype} on {self.device}; build a new "
                    f"layout with FlatLayout.of({name})"
                )

    def check_buffers(self, module: nn.Module) -> None:
        """Raises if ``mutable_buffers="error"`` and a forward of ``module`` would update buffers.

        Raises:
            RuntimeError: naming the submodules, and the ways out.
        """
        if self.mutable_buffers == "allow":
            return
        names = buffer_mutating_modules(module)
        if names:
            raise RuntimeError(
                f"module's forward would update buffers in place (running statistics of "
                f"{names}). Each task would overwrite them, and vmap cannot run it. Use "
                "track_running_stats=False, call module.eval(), or build the layout with "
                "mutable_buffers='allow' (and strategy='loop')"
            )

    # ---- flat <-> module --------------------------------------------------------------------

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter views of ``flat`` (``[..., N]`` gives ``[..., *shape]`` views). No copy.

        Works on rows of a ``[T, N]`` buffer, on the whole buffer, and inside ``torch.func``
        transforms. Unchecked: call :meth:`check` first where ``flat`` comes from a user.
        """
        lead = flat.shape[:-1]
        return {
            e.name: flat.narrow(-1, e.offset, e.numel).view(*lead, *e.shape) for e in self.entries
        }

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The ``[..., N]`` buffer cut into each parameter's flat ``[..., numel]`` chunk, in
        buffer order, by one ``split_with_sizes``. Unlike :meth:`views`, the chunks may not be
        modified in place under autograd; in exchange their backward is one node that
        concatenates the parameters' gradients, where each ``narrow``'s backward fills a zero
        buffer the size of the whole row and copies its slice in (conv-4, 18 parameters of a
        112k-element row, T = 8 tasks: ~150 such fills per pass)."""
        return flat.split_with_sizes([e.numel for e in self.entries], dim=-1)

    def functional_call(
        self,
        module: nn.Module,
        flat: torch.Tensor,
        args: Any = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        """Runs ``module(*args, **kwargs)`` with the parameters viewed from the ``[N]`` ``flat``.

        The module's buffers are used as they are. Gradients of the output flow back to
        ``flat`` (and from a row of a ``[T, N]`` buffer, to that buffer).

        Args:
            module: the module this layout was built from.
            flat: an ``[N]`` buffer, typically a row ``params[t]`` of a ``[T, N]`` buffer.
            args: a positional argument, or a tuple of them.
            kwargs: keyword arguments of the forward.
        """
        self.check(flat, name="flat", tasks=0)
        self.check_buffers(module)
        return self.call_unchecked(module, flat, args, kwargs)

    def call_unchecked(
        self,
        module: nn.Module,
        flat: torch.Tensor,
        args: Any = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        """:meth:`functional_call` without the checks, for loops that validated once.

        A module with ``nn.MaxPool2d`` layers runs inside
        :func:`fastmeta.ops.max_pool.native_pool_modules`: their non-overlapping CPU windows on
        inputs of at least ``MIN_NATIVE_ELEMENTS`` (131,072) elements take the native kernel
        (torch's NCHW max-pool was a fifth of a conv-4 MAML step); everything else runs as it is.
        """
        views = [c.view(e.shape) for e, c in zip(self.entries, self.split(flat))]
        named = {name: views[i] for name, i in self.slots}
        # (Under vmap and while torch.compile traces, the kernel cannot run.)
        pools = (flat.device.type == "cpu" and not torch._C._are_functorch_transforms_active()
                 and not torch.compiler.is_compiling())
        with native_pool_modules(module) if pools else contextlib.nullcontext():
            return torch.func.functional_call(
                module, named, args, kwargs, tie_weights=False, strict=False
            )

    def flatten(self, module: nn.Module) -> torch.Tensor:
        """A new contiguous ``[N]`` buffer holding ``module``'s parameters (detached)."""
        self.check_module(module)
        with torch.no_grad():
            return torch.cat([p.reshape(-1) for p in self._params(module)])

    def load_(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Writes the ``[N]`` buffer ``flat`` into ``module``'s parameters, in place."""
        self.check(flat, name="flat", tasks=0)
        self.check_module(module)
        with torch.no_grad():
            for p, v in zip(self._params(module), self.views(flat).values()):
                p.copy_(v)

    def expand(self, flat: torch.Tensor, tasks: int, *, contiguous: bool = True) -> torch.Tensor:
        """The ``[N]`` meta-parameters repeated as a ``[T, N]`` task buffer, differentiable
        w.r.t. ``flat`` (the backward sums the T rows' gradients).

        Args:
            flat: ``[N]``.
            tasks: T, at least 1.
            contiguous: True copies into a new contiguous ``[T, N]`` buffer, as the fused
                kernels need; False returns a zero-copy expanded view (stride 0 over tasks)
                for pure-torch step functions.
        """
        self.check(flat, name="flat", tasks=0)
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
            raise ValueError(f"tasks must be a positive int, got {tasks!r}")
        out = flat.unsqueeze(0).expand(tasks, self.numel)
        return out.contiguous() if contiguous else out

    def stack(self, module: nn.Module, tasks: int) -> torch.Tensor:
        """``module``'s parameters θ repeated as a new contiguous ``[T, N]`` task buffer,
        differentiable w.r.t. those parameters (the backward sums the T rows).

        The same values as ``expand(torch.cat([p.reshape(-1) ...]), T)``, as one autograd node
        instead of one per parameter plus two: on small models, where per-node overhead is the
        cost of a meta-step, that matters.
        """
        self.check_module(module)
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
            raise ValueError(f"tasks must be a positive int, got {tasks!r}")
        return _StackParams.apply(self, tasks, *self._params(module))

    def _params(self, module: nn.Module) -> Iterator[torch.Tensor]:
        return (p for _, p in module.named_parameters())

    def __repr__(self) -> str:
        return (
            f"FlatLayout(N={self.numel}, tensors={len(self.entries)}, dtype={self.dtype}, "
            f"device={self.device}, buffers={len(self.buffer_names)}, "
            f"mutable_buffers={self.mutable_buffers!r})"
        )


class _StackParams(Function):
    """The parameters -> ``[T, N]`` (each row θ); backward: the row sum, split per parameter,
    with differentiable ops (so it can be differentiated again)."""

    @staticmethod
    def forward(layout: FlatLayout, tasks: int, *params: torch.Tensor) -> torch.Tensor:
        out = params[0].new_empty(tasks, layout.numel)
        for e, p in zip(layout.entries, params):
            out.narrow(1, e.offset, e.numel).copy_(p.reshape(1, e.numel).expand(tasks, -1))
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.layout = inputs[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        total = grad.sum(0)
        return (None, None, *(total.narrow(0, e.offset, e.numel).view(e.shape)
                              for e in ctx.layout.entries))


def flatten(
    module: nn.Module, *, mutable_buffers: str = "error"
) -> tuple[FlatLayout, torch.Tensor]:
    """The layout of ``module``'s parameters and a new ``[N]`` buffer holding them (detached).

    Args:
        module: see :meth:`FlatLayout.of`.
        mutable_buffers: see :meth:`FlatLayout.of`.
    """
    layout = FlatLayout.of(module, mutable_buffers=mutable_buffers)
    return layout, layout.flatten(module)
