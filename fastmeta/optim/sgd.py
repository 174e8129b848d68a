"""Drop-in ``torch.optim.SGD`` on the fused multi-tensor kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastmeta.backends import Impl
from fastmeta.ops.prepared import PreparedStep
from fastmeta.ops.sgd import sgd_step_
from fastmeta.optim.optimizer import (
    FusedOptimizer,
    as_real,
    check_fused_flags,
    params_with_grad,
    pick,
    real_grads,
    run_closure,
    run_plans,
)


class SGD(FusedOptimizer, torch.optim.SGD):
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

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Performs a single optimization step (one fused call per param group and device;
        two when some params get their momentum buffer on this step)."""
        loss = run_closure(closure)
        for index, group in enumerate(self.param_groups):
            momentum = group["momentum"]
            if self._fast_step(index, group, (momentum != 0,), "sgd", group["lr"],
                               group["weight_decay"], momentum, group["dampening"],
                               group["nesterov"], group["maximize"]) is not None:
                continue
            with torch.no_grad():
                self._step_group(index, group)
        return loss

    def _step_group(self, index: int, group: dict) -> None:
        """The general path: any param subset, device mix, complex params or new buffers."""
        params, grads = params_with_grad("SGD", group)
        if not params:
            return
        momentum = group["momentum"]
        hyper = dict(
            lr=group["lr"], weight_decay=group["weight_decay"], momentum=momentum,
            dampening=group["dampening"], nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        layout = (momentum != 0,)
        plans = self._cached_plans(index, params, layout)
        grads = real_grads(self, index, grads)
        if plans is None:
            fresh = [i for i, p in enumerate(params)
                     if momentum != 0 and self.state[p].get("momentum_buffer") is None]
            if fresh:
                # Buffers that start now take torch's first-step rule (buffer = d): those
                # params get a call of their own, and the plans are rebuilt next step.
                fresh_set = set(fresh)
                running = [i for i in range(len(params)) if i not in fresh_set]
                for subset, first in ((fresh, True), (running, False)):
                    if subset:
                        sub = pick(params, subset)
                        plans = self._plans(index, sub, layout,
                                            self._preparer(sub, momentum), cache=False)
                        run_plans(plans, pick(grads, subset), first_step=first, **hyper)
                return
            plans = self._plans(index, params, layout, self._preparer(params, momentum))
        run_plans(plans, grads, first_step=False, **hyper)

    def _preparer(self, params: list[torch.Tensor], momentum: float):
        def prepare(indices):
            sub = pick(params, indices)
            buffers = None
            if momentum != 0:
                buffers = []
                for p in sub:
                    state = self.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                    buffers.append(as_real(state["momentum_buffer"]))
            return PreparedStep("sgd_step_", sgd_step_, "sgd_step", [as_real(p) for p in sub],
                                [("momentum_buffers", buffers)], None, impl=self.impl,
                                watch_state=False)

        return prepare
