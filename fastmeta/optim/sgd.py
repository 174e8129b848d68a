"""Drop-in ``torch.optim.SGD`` on the fused multi-tensor kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastmeta.backends import Impl
from fastmeta.ops.sgd import sgd_step_
from fastmeta.optim.optimizer import (
    as_real,
    check_fused_flags,
    params_with_grad,
    run_closure,
    split_by_device,
)


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize) with one fused
    kernel call per param group.

    The maths is torch's (see :mod:`fastmeta.ops.sgd`; Sutskever et al., 2013 for Nesterov).
    Arguments, defaults, errors, param groups, schedulers and the ``state_dict`` layout
    (``momentum_buffer`` per param) are those of ``torch.optim.SGD``. ``foreach`` and
    ``fused`` are accepted and change nothing; ``differentiable=True`` is refused.

    Args:
        impl: which implementation runs the fused step: ``"auto"`` (native C++ on CPU tensors,
            Triton on CUDA), ``"native"``, ``"triton"`` or ``"reference"``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        impl: Impl | str = Impl.AUTO,
    ) -> None:
        check_fused_flags(type(self).__name__, differentiable=differentiable)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        self.impl = Impl(impl)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Performs a single optimization step (one fused call per param group and device;
        two when some params get their momentum buffer on this step)."""
        loss = run_closure(closure)
        for group in self.param_groups:
            momentum = group["momentum"]
            # Params whose buffer starts now take torch's first-step rule (buffer = d), so
            # they go in a call of their own.
            fresh: list[list[torch.Tensor]] = [[], [], []]
            running: list[list[torch.Tensor]] = [[], [], []]
            for p, g in params_with_grad("SGD", group):
                buf = None
                target = running
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["momentum_buffer"] = buf
                        target = fresh
                target[0].append(as_real(p))
                target[1].append(as_real(g))
                if buf is not None:
                    target[2].append(as_real(buf))
            for first_step, lists in ((True, fresh), (False, running)):
                for params, grads, buffers in split_by_device(lists):
                    sgd_step_(
                        params, grads, buffers if momentum != 0 else None,
                        lr=group["lr"], weight_decay=group["weight_decay"], momentum=momentum,
                        dampening=group["dampening"], nesterov=group["nesterov"],
                        maximize=group["maximize"], first_step=first_step, impl=self.impl,
                    )
        return loss
