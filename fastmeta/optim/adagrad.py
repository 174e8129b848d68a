"""Drop-in ``torch.optim.Adagrad`` on the fused multi-tensor kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastmeta.backends import Impl
from fastmeta.ops.adagrad import adagrad_step_
from fastmeta.optim.optimizer import (
    as_real,
    check_fused_flags,
    new_step_counter,
    params_with_grad,
    run_closure,
    split_by_device,
)


class Adagrad(torch.optim.Adagrad):
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

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Performs a single optimization step (one fused call per param group and device)."""
        loss = run_closure(closure)
        for group in self.param_groups:
            params, grads, sums, steps = [], [], [], []
            for p, g in params_with_grad("Adagrad", group):
                state = self.state[p]
                if len(state) == 0:  # a param added by add_param_group, initialised as torch does
                    init = self.defaults["initial_accumulator_value"]
                    state["step"] = new_step_counter(p)
                    state["sum"] = torch.full_like(
                        p, complex(init, init) if p.is_complex() else init,
                        memory_format=torch.preserve_format,
                    )
                params.append(as_real(p))
                grads.append(as_real(g))
                sums.append(as_real(state["sum"]))
                steps.append(state["step"])
            for p_, g_, s_, t_ in split_by_device([params, grads, sums, steps]):
                adagrad_step_(
                    p_, g_, s_, t_, lr=group["lr"], lr_decay=group["lr_decay"],
                    weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"], impl=self.impl,
                )
        return loss
