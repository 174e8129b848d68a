"""Drop-in ``torch.optim.Adam`` and ``torch.optim.AdamW`` on the fused multi-tensor kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastmeta.backends import Impl
from fastmeta.ops.adam import adam_step_
from fastmeta.ops.prepared import PreparedStep
from fastmeta.optim.optimizer import (
    FusedOptimizer,
    as_real,
    check_fused_flags,
    new_step_counter,
    params_with_grad,
    pick,
    real_grads,
    run_closure,
    run_plans,
)


def _adam_step(optimizer, closure, *, name: str, decoupled: bool):
    loss = run_closure(closure)
    for index, group in enumerate(optimizer.param_groups):
        beta1, beta2 = group["betas"]
        if optimizer._fast_step(
            index, group, (group["amsgrad"],), "adam", group["lr"], beta1, beta2, group["eps"],
            group["weight_decay"], group["amsgrad"], group["maximize"],
            group.get("decoupled_weight_decay", decoupled),
        ) is not None:
            continue
        with torch.no_grad():
            _adam_step_group(optimizer, index, group, name=name, decoupled=decoupled)
    return loss


def _adam_step_group(optimizer, index: int, group: dict, *, name: str, decoupled: bool) -> None:
    """The general path: any param subset, device mix, complex params or new state."""
    message = f"{name} does not support sparse gradients, please consider SparseAdam instead"
    params, grads = params_with_grad(name, group, sparse_message=message)
    if not params:
        return
    amsgrad = group["amsgrad"]

    def prepare(indices, params=params, amsgrad=amsgrad):
        sub = pick(params, indices)
        states = []
        for p in sub:
            state = optimizer.state[p]
            if len(state) == 0:
                state["step"] = new_step_counter(p)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            states.append(state)
        return PreparedStep(
            "adam_step_", adam_step_, "adam_step", [as_real(p) for p in sub],
            [("exp_avgs", [as_real(s["exp_avg"]) for s in states]),
             ("exp_avg_sqs", [as_real(s["exp_avg_sq"]) for s in states]),
             ("max_exp_avg_sqs",
              [as_real(s["max_exp_avg_sq"]) for s in states] if amsgrad else None)],
            [s["step"] for s in states], impl=optimizer.impl, watch_state=False,
        )

    plans = optimizer._plans(index, params, (amsgrad,), prepare)
    beta1, beta2 = group["betas"]
    run_plans(
        plans, real_grads(optimizer, index, grads), lr=group["lr"], beta1=beta1,
        beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=amsgrad,
        maximize=group["maximize"],
        decoupled_weight_decay=group.get("decoupled_weight_decay", decoupled),
    )


class Adam(FusedOptimizer, torch.optim.Adam):
    """``torch.optim.Adam`` with one fused kernel call per param group.

    The maths is torch's (see :mod:`fastmeta.ops.adam`; Kingma & Ba, 2015,
    https://arxiv.org/abs/1412.6980). Arguments, defaults, errors, param groups, schedulers and
    the ``state_dict`` layout are those of ``torch.optim.Adam``: a state_dict moves between the
    two classes in both directions. ``foreach`` and ``fused`` are accepted and change nothing;
    ``differentiable=True`` and ``capturable=True`` are refused.

    Args:
        impl: which implementation runs the fused step: ``"auto"`` (native C++ on CPU tensors,
            Triton on CUDA), ``"native"``, ``"triton"`` or ``"reference"``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Adam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        impl: Impl | str = Impl.AUTO,
    ) -> None:
        check_fused_flags(type(self).__name__, differentiable=differentiable,
                          capturable=capturable)
        extra = {"decoupled_weight_decay": True} if decoupled_weight_decay else {}
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, **extra)
        self.impl = Impl(impl)

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Performs a single optimization step (one fused call per param group and device)."""
        return _adam_step(self, closure, name="Adam", decoupled=False)


class AdamW(FusedOptimizer, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay; Loshchilov & Hutter, 2019,
    https://arxiv.org/abs/1711.05101) with one fused kernel call per param group.

    Everything said of :class:`Adam` holds here, with torch's AdamW defaults
    (``weight_decay=1e-2``).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AdamW(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        impl: Impl | str = Impl.AUTO,
    ) -> None:
        check_fused_flags(type(self).__name__, differentiable=differentiable,
                          capturable=capturable)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize)
        self.impl = Impl(impl)

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Performs a single optimization step (one fused call per param group and device)."""
        return _adam_step(self, closure, name="AdamW", decoupled=True)
