"""Drop-in ``torch.optim.RMSprop`` on the fused multi-tensor kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastmeta.backends import Impl
from fastmeta.ops.prepared import PreparedStep
from fastmeta.ops.rmsprop import rmsprop_step_
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


class RMSprop(FusedOptimizer, torch.optim.RMSprop):
    """``torch.optim.RMSprop`` (plain or centered, with optional momentum) with one fused
    kernel call per param group.

    The maths is torch's (see :mod:`fastmeta.ops.rmsprop`). Arguments, defaults, errors, param
    groups, schedulers and the ``state_dict`` layout (``step``, ``square_avg``, and
    ``momentum_buffer`` / ``grad_avg`` when used) are those of ``torch.optim.RMSprop``.
    ``foreach`` is accepted and changes nothing; ``differentiable=True`` and
    ``capturable=True`` are refused.

    Args:
        impl: which implementation runs the fused step: ``"auto"`` (native C++ on CPU tensors,
            Triton on CUDA), ``"native"``, ``"triton"`` or ``"reference"``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = RMSprop(model.parameters(), lr=0.01, centered=True, momentum=0.9)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        impl: Impl | str = Impl.AUTO,
    ) -> None:
        check_fused_flags(type(self).__name__, differentiable=differentiable,
                          capturable=capturable)
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered, maximize=maximize)
        self.impl = Impl(impl)

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Performs a single optimization step (one fused call per param group and device)."""
        loss = run_closure(closure)
        for index, group in enumerate(self.param_groups):
            momentum, centered = group["momentum"], group["centered"]
            if self._fast_step(index, group, (momentum > 0, centered), "rmsprop", group["lr"],
                               group["alpha"], group["eps"], group["weight_decay"], momentum,
                               centered, group["maximize"]) is not None:
                continue
            with torch.no_grad():
                self._step_group(index, group)
        return loss

    def _step_group(self, index: int, group: dict) -> None:
        """The general path: any param subset, device mix, complex params or new state."""
        params, grads = params_with_grad("RMSprop", group)
        if not params:
            return
        momentum, centered = group["momentum"], group["centered"]

        def prepare(indices, params=params, momentum=momentum, centered=centered):
            sub = pick(params, indices)
            states = []
            for p in sub:
                state = self.state[p]
                if len(state) == 0:
                    zeros = torch.zeros_like  # every RMSprop state starts at zero
                    state["step"] = new_step_counter(p)
                    state["square_avg"] = zeros(p, memory_format=torch.preserve_format)
                    if momentum > 0:
                        state["momentum_buffer"] = zeros(p, memory_format=torch.preserve_format)
                    if centered:
                        state["grad_avg"] = zeros(p, memory_format=torch.preserve_format)
                states.append(state)
            return PreparedStep(
                "rmsprop_step_", rmsprop_step_, "rmsprop_step", [as_real(p) for p in sub],
                [("square_avgs", [as_real(s["square_avg"]) for s in states]),
                 ("momentum_buffers", [as_real(s["momentum_buffer"]) for s in states]
                  if momentum > 0 else None),
                 ("grad_avgs", [as_real(s["grad_avg"]) for s in states] if centered else None)],
                [s["step"] for s in states], impl=self.impl, watch_state=False,
            )

        plans = self._plans(index, params, (momentum > 0, centered), prepare)
        run_plans(
            plans, real_grads(self, index, grads), lr=group["lr"], alpha=group["alpha"],
            eps=group["eps"], weight_decay=group["weight_decay"], momentum=momentum,
            centered=centered, maximize=group["maximize"],
        )
