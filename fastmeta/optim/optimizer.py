"""What every fastmeta drop-in optimizer shares.

Each optimizer subclasses the ``torch.optim`` class of the same name, so the constructor, its
defaults and validation, param groups, ``add_param_group``, ``zero_grad``, hooks, schedulers
and the ``state_dict()`` layout are torch's own. Only ``step`` is replaced: it updates every
tensor of a param group with one fused call (per device) through :mod:`fastmeta.ops`.

A step on a small model is dominated by per-tensor Python work, so each group's tensor lists
are validated once into :class:`~fastmeta.ops.prepared.PreparedStep` objects ("plans") and
reused while the same params have gradients, the state layout flags are unchanged, and no
param or state tensor has moved. ``load_state_dict`` and ``add_param_group`` drop the plans.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from fastmeta import backends
from fastmeta.backends import Impl
from fastmeta.ops.prepared import PreparedStep
from fastmeta.ops.tensor_lists import check_scalar

try:  # torch's global step hooks: when any is registered, torch's own step wrapper runs
    from torch.optim.optimizer import (
        _global_optimizer_post_hooks,
        _global_optimizer_pre_hooks,
    )
except ImportError:  # pragma: no cover - a torch without them: always use its wrapper
    _global_optimizer_pre_hooks = _global_optimizer_post_hooks = None

try:  # the dtype torch.optim uses for step counters (float64 when that is the default dtype)
    from torch.optim.optimizer import _get_scalar_dtype as scalar_dtype
except ImportError:  # pragma: no cover - older torch

    def scalar_dtype() -> torch.dtype:
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def check_fused_flags(name: str, *, differentiable: bool, capturable: bool = False) -> None:
    """torch's ``foreach`` and ``fused`` are accepted and have no effect (fastmeta is always
    fused). ``differentiable`` and ``capturable`` are refused: they would change semantics."""
    if differentiable:
        raise ValueError(
            f"fastmeta.optim.{name} updates params in place and is not differentiable; use "
            "fastmeta.functional for differentiable (meta-learning) updates"
        )
    if capturable:
        raise ValueError(
            f"fastmeta.optim.{name} does not support capturable=True (CUDA graph capture); use "
            f"torch.optim.{name}(capturable=True)"
        )


def run_closure(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def new_step_counter(param: torch.Tensor) -> torch.Tensor:
    """A step counter laid out as torch.optim lays it out: a CPU scalar for CPU params (and
    for torch's non-fused CUDA path); on the param's device for CUDA, so the Triton path never
    syncs."""
    device = param.device if param.device.type == "cuda" else torch.device("cpu")
    return torch.zeros((), dtype=scalar_dtype(), device=device)


def as_real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors are updated as their real views, as torch.optim does."""
    return torch.view_as_real(t) if t.is_complex() else t


def params_with_grad(name: str, group: dict, *, sparse_message: str | None = None
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The params of a group that have a gradient, and those gradients; sparse ones are
    refused with torch's message."""
    # List comprehensions: this runs on every step, for every param of the group.
    params = [p for p in group["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    if any([g.is_sparse for g in grads]):
        raise RuntimeError(sparse_message or f"{name} does not support sparse gradients")
    return params, grads


def device_groups(params: Sequence[torch.Tensor]) -> list[list[int] | None]:
    """Indices of the params on each device; ``[None]`` (all of them) when there is one."""
    device = params[0].device
    if all(p.device == device for p in params):
        return [None]
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        by_device.setdefault(p.device, []).append(i)
    return list(by_device.values())


def pick(items: Sequence, indices: list[int] | None) -> list:
    return list(items) if indices is None else [items[i] for i in indices]


Plans = list[tuple["list[int] | None", PreparedStep]]


class FusedOptimizer:
    """Mixin for the drop-in optimizers: caches each group's prepared plans.

    A cached plan holds the group's state tensors and checks on every step that no param has
    moved (``p.data = ...`` is detected and the plan rebuilt). The state is the optimizer's
    own: ``load_state_dict`` and ``add_param_group`` drop the plans, but replacing an entry of
    ``optimizer.state`` (or its storage) by hand must be followed by
    ``optimizer._drop_plans()``.
    """

    @staticmethod
    def profile_hook_step(func):
        """torch's step wrapper (step pre/post hooks, the profiler's ``Optimizer.step#...``
        label), run only when something listens: a registered hook or an active profiler.

        Entering ``record_function`` costs ~13 µs per step here, as much as the fused kernel
        on a small model; with no profiler and no hook it records nothing anyway.
        """
        with_hooks = torch.optim.Optimizer.profile_hook_step(func)
        if _global_optimizer_pre_hooks is None:
            return with_hooks

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            self = args[0]
            if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                    or _global_optimizer_pre_hooks or _global_optimizer_post_hooks
                    or torch.autograd._profiler_enabled()):
                return with_hooks(*args, **kwargs)
            out = func(*args, **kwargs)
            self._optimizer_step_code()
            return out

        return wrapper

    def _cached_plans(self, group_index: int, params: list[torch.Tensor], layout: tuple):
        """The plans cached for these params with grads and this state layout, if still valid
        (every plan is checked before any runs)."""
        entry = self.__dict__.get("_fastmeta_plans", {}).get(group_index)
        if entry is None:
            return None
        key_params, key_layout, plans, _ = entry
        if key_layout != layout or len(key_params) != len(params):
            return None
        for a, b in zip(key_params, params):
            if a is not b:
                return None
        for _, plan in plans:
            if not plan.still_valid():
                return None
        return plans

    def _plans(
        self,
        group_index: int,
        params: list[torch.Tensor],
        layout: tuple,
        prepare: Callable[[list[int] | None], PreparedStep],
        *,
        cache: bool = True,
    ) -> Plans:
        """The plans of one group for these params with grads, built by ``prepare(indices)``
        on a miss. ``layout`` holds the group flags that decide which state lists exist."""
        plans = self._cached_plans(group_index, params, layout) if cache else None
        if plans is not None:
            return plans
        plans = [(idx, prepare(idx)) for idx in device_groups(params)]
        plans_by_group = self.__dict__.setdefault("_fastmeta_plans", {})
        fast_by_group = self.__dict__.setdefault("_fastmeta_fast", {})
        fast_by_group.pop(group_index, None)
        if cache:
            has_complex = any(p.is_complex() for p in params)
            plans_by_group[group_index] = (params, layout, plans, has_complex)
            group_params = self.param_groups[group_index]["params"]
            # The native fast path takes whole groups: every param has a grad, one device,
            # no complex params (their plans hold real views, not the group's tensors).
            if len(plans) == 1 and not has_complex and len(params) == len(group_params):
                native_group = plans[0][1].native_group(group_params)
                if native_group is not None:
                    fast_by_group[group_index] = (layout, native_group, plans[0][1].op)
        else:
            plans_by_group.pop(group_index, None)
        return plans

    def _fast_step(self, group_index: int, group: dict, layout: tuple, kernel: str, *hyper):
        """One native call for the whole group when its prepared plan still holds (see
        ``PreparedGroup`` in csrc/bindings.cpp): the group's params unchanged and unmoved, each
        with a dense, contiguous ``.grad``. Returns what the kernel returns (True, or the
        hypergradient optimizers' ``(h, new_lr)``); None, having done nothing, otherwise: the
        caller then takes the general path, which re-prepares or raises as needed. ``hyper``
        are the kernel's arguments after the params, in order; ``lr`` (first) may be a
        tensor."""
        fast_by_group = self.__dict__.get("_fastmeta_fast")
        entry = fast_by_group.get(group_index) if fast_by_group else None
        if entry is None or entry[0] != layout:
            return None
        layout, native_group, op = entry
        lr = hyper[0]
        if isinstance(lr, torch.Tensor):
            hyper = (check_scalar(op, "lr", lr), *hyper[1:])
        try:
            result = getattr(native_group, kernel)(group["params"], *hyper)
        except TypeError:  # an unusual hyperparameter (a tensor beta, ...): the general path
            return None
        if result is None or result is False:
            return None
        backends.note(op, Impl.NATIVE)
        return result

    def _drop_plans(self) -> None:
        self.__dict__.pop("_fastmeta_plans", None)
        self.__dict__.pop("_fastmeta_fast", None)

    def load_state_dict(self, state_dict) -> None:
        self._drop_plans()
        super().load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        self._drop_plans()
        super().add_param_group(param_group)

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; the requested
        # implementation travels too (the plans never do: they hold addresses).
        state = super().__getstate__()
        state["impl"] = self.__dict__.get("impl", Impl.AUTO)
        return state

    def __setstate__(self, state) -> None:
        self._drop_plans()
        super().__setstate__(state)
        self.__dict__.setdefault("impl", Impl.AUTO)  # pickled before impl travelled with it


def real_grads(optimizer: FusedOptimizer, group_index: int, grads: list[torch.Tensor]
               ) -> list[torch.Tensor]:
    """Complex gradients as real views, as their params were prepared; a cached group without
    complex params skips the per-tensor check."""
    entry = optimizer.__dict__.get("_fastmeta_plans", {}).get(group_index)
    if entry is not None and not entry[3]:
        return grads
    return [torch.view_as_real(g) if g.is_complex() else g for g in grads]


def run_plans(plans: Plans, grads: list[torch.Tensor], **hyper) -> None:
    """Runs a group's plans (just validated by :meth:`FusedOptimizer._plans`) on the params'
    ``.grad`` tensors."""
    for indices, plan in plans:
        plan(pick(grads, indices), validated=True, grads_from_params=True, **hyper)
