"""What every fastmeta drop-in optimizer shares.

Each optimizer subclasses the ``torch.optim`` class of the same name, so the constructor, its
defaults and validation, param groups, ``add_param_group``, ``zero_grad``, hooks, schedulers
and the ``state_dict()`` layout are torch's own. Only ``step`` is replaced: it gathers each
param group's tensors and updates all of them with one fused call (per device) through
:mod:`fastmeta.ops`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from fastmeta.backends import Impl

try:  # the dtype torch.optim uses for step counters (float64 when that is the default dtype)
    from torch.optim.optimizer import _get_scalar_dtype as scalar_dtype
except ImportError:  # pragma: no cover - older torch

    def scalar_dtype() -> torch.dtype:
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


IMPL_DOC = """impl: which implementation runs the fused step: ``"auto"`` (native C++ on CPU tensors,
            Triton on CUDA tensors), ``"native"``, ``"triton"`` or ``"reference"``; see
            :mod:`fastmeta.backends`."""


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


def params_with_grad(
    name: str, group: dict, *, sparse_message: str | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(param, grad)`` pairs of a group that have a gradient; sparse ones are refused."""
    for p in group["params"]:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise RuntimeError(
                sparse_message or f"{name} does not support sparse gradients"
            )
        yield p, g


def split_by_device(tensors_lists: list[list[torch.Tensor]]) -> list[list[list[torch.Tensor]]]:
    """Splits parallel lists (params first) into one set per device; one fused call each."""
    params = tensors_lists[0]
    if not params:
        return []
    device = params[0].device
    if all(p.device == device for p in params):
        return [tensors_lists]
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        by_device.setdefault(p.device, []).append(i)
    return [[[lst[i] for i in idx] if lst else [] for lst in tensors_lists]
            for idx in by_device.values()]


__all__ = [
    "IMPL_DOC",
    "Impl",
    "as_real",
    "check_fused_flags",
    "new_step_counter",
    "params_with_grad",
    "run_closure",
    "scalar_dtype",
    "split_by_device",
]
