"""Drop-in ``torch.optim.Adagrad`` on the fused multi-tensor kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastmeta.backends import Impl
from fastmeta.ops.adagrad import adagrad_step_
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


class Adagrad(FusedOptimizer, torch.optim.Adagrad):
    """``torch.optim.Adagrad`` with one fused kernel call per param group.

    The maths is torch's (see :mod:`fastmeta.ops.adagrad`; Duchi et al., 2011). Arguments,
    defaults, errors, param groups, schedulers and the ``state_dict`` layout (``step`` and
    ``sum``, created at construction as torch does) are those of ``torch.optim.Adagrad``.
    ``foreach`` and ``fused`` are accepted and change nothing; ``differentiable=True`` is
    refused.

    Args:
        impl: which implementation runs the fused step: ``"auto"`` (native C++ on CPU tensors,
            Triton on CUDA), ``"native"``, ``"triton"`` or ``"reference"``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Adagrad(model.parameters(), lr=0.01)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        impl: Impl | str = Impl.AUTO,
    ) -> None:
        check_fused_flags(type(self).__name__, differentiable=differentiable)
        super().__init__(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps,
                         maximize=maximize)
        self.impl = Impl(impl)

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Performs a single optimization step (one fused call per param group and device)."""
        loss = run_closure(closure)
        for index, group in enumerate(self.param_groups):
            if self._fast_step(index, group, (), "adagrad", group["lr"], group["lr_decay"],
                               group["weight_decay"], group["eps"], group["maximize"]) is not None:
                continue
            with torch.no_grad():
                self._step_group(index, group)
        return loss

    def _step_group(self, index: int, group: dict) -> None:
        """The general path: any param subset, device mix, complex params or new state."""
        params, grads = params_with_grad("Adagrad", group)
        if not params:
            return

        def prepare(indices, params=params):
            sub = pick(params, indices)
            states = []
            for p in sub:
                state = self.state[p]
                if len(state) == 0:  # added by add_param_group: initialised as torch does
                    init = self.defaults["initial_accumulator_value"]
                    state["step"] = new_step_counter(p)
                    state["sum"] = torch.full_like(
                        p, complex(init, init) if p.is_complex() else init,
                        memory_format=torch.preserve_format,
                    )
                states.append(state)
            return PreparedStep(
                "adagrad_step_", adagrad_step_, "adagrad_step", [as_real(p) for p in sub],
                [("state_sums", [as_real(s["sum"]) for s in states])],
                [s["step"] for s in states], impl=self.impl, watch_state=False,
            )

        plans = self._plans(index, params, (), prepare)
        run_plans(
            plans, real_grads(self, index, grads), lr=group["lr"], lr_decay=group["lr_decay"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        )
