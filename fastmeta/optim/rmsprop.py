"""Drop-in ``torch.optim.RMSprop`` on the fused multi-tensor kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastmeta.backends import Impl
from fastmeta.ops.rmsprop import rmsprop_step_
from fastmeta.optim.optimizer import (
    as_real,
    check_fused_flags,
    new_step_counter,
    params_with_grad,
    run_closure,
    split_by_device,
)


class RMSprop(torch.optim.RMSprop):
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

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Performs a single optimization step (one fused call per param group and device)."""
        loss = run_closure(closure)
        for group in self.param_groups:
            momentum, centered = group["momentum"], group["centered"]
            params, grads, square_avgs, buffers, grad_avgs, steps = [], [], [], [], [], []
            for p, g in params_with_grad("RMSprop", group):
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = new_step_counter(p)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if momentum > 0:
                        state["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                    if centered:
                        state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(as_real(p))
                grads.append(as_real(g))
                square_avgs.append(as_real(state["square_avg"]))
                if momentum > 0:
                    buffers.append(as_real(state["momentum_buffer"]))
                if centered:
                    grad_avgs.append(as_real(state["grad_avg"]))
                steps.append(state["step"])
            lists = [params, grads, square_avgs, buffers, grad_avgs, steps]
            for p_, g_, v_, b_, a_, s_ in split_by_device(lists):
                rmsprop_step_(
                    p_, g_, v_, b_ if momentum > 0 else None, a_ if centered else None, s_,
                    lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                    weight_decay=group["weight_decay"], momentum=momentum, centered=centered,
                    maximize=group["maximize"], impl=self.impl,
                )
        return loss
