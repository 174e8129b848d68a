"""Online hypergradient descent (Baydin et al., ICLR 2018) as drop-in optimizers.

:class:`SGDHD` (plain, heavy-ball or Nesterov momentum) and :class:`AdamHD` learn their
learning rate while they train: before each step the group's lr moves by
``β · (d_t · u_{t−1})``, the dot product of the gradient with the previous step's direction,
taken over every param of the group (:mod:`fastmeta.ops.hypergrad` has the maths). The dot
product is a reduction fused into the step kernel: one native (or Triton) call per group does
both.

The torch.optim contract holds: constructor validation, param groups (each group learns its
own lr), ``add_param_group``, ``zero_grad``, closures, hooks and ``state_dict``. Each step
writes the new lr back to ``group["lr"]`` (a tensor lr is updated in place) and the last
hypergradient to ``group["hypergradient"]``. The ``lr_scheduler`` schedulers compose with
it: a scheduler that rescales ``group["lr"]`` (StepLR, ExponentialLR, ...; their chainable
form) rescales the learned lr, and hypergradient descent continues from there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastmeta.backends import Impl
from fastmeta.ops.hypergrad import adam_hd_step_, sgd_hd_step_
from fastmeta.ops.prepared import PreparedStep
from fastmeta.ops.sgd import check_sgd_hyperparameters
from fastmeta.optim.optimizer import (
    FusedOptimizer,
    as_real,
    check_fused_flags,
    device_groups,
    new_step_counter,
    params_with_grad,
    real_grads,
    run_closure,
)

__all__ = ["AdamHD", "SGDHD"]


def _check_hypergrad_lr(value: float) -> None:
    if not 0.0 <= value:
        raise ValueError(f"Invalid hypergrad_lr value: {value}")


def _one_device(name: str, params: list[torch.Tensor]) -> None:
    if len(device_groups(params)) > 1:
        raise ValueError(f"{name}: the params of one group must share a device: the "
                         "hypergradient is one dot product over the whole group")


def _store_lr(group: dict, new_lr: float, hypergradient: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(new_lr)
    else:
        group["lr"] = new_lr
    group["hypergradient"] = hypergradient


def _zeros_like(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, memory_format=torch.contiguous_format)


class SGDHD(FusedOptimizer, torch.optim.Optimizer):
    """SGD whose learning rate is learned online by hypergradient descent (SGD-HD; with
    ``momentum`` and ``nesterov=True``, SGDN-HD).

    .. math::
        \\alpha_t = \\alpha_{t-1} + \\beta\\, d_t \\cdot u_{t-1}, \\qquad
        \\theta_t = \\theta_{t-1} - \\alpha_t u_t

    with d_t the gradient (plus weight decay, sign-flipped by ``maximize``) and u_t the step
    direction: d_t, torch's momentum buffer b_t, or d_t + μ b_t for Nesterov.

    Args:
        params: iterable of params or param groups.
        lr: the initial learning rate α_0.
        hypergrad_lr: β, the hypergradient learning rate (the paper uses 1e-3 for SGD-HD on
            its MNIST logistic regression).
        momentum, dampening, weight_decay, nesterov, maximize: as in ``torch.optim.SGD``.
        impl: ``"auto"`` (native C++ on CPU tensors, Triton on CUDA), ``"native"``,
            ``"triton"`` or ``"reference"``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SGDHD(model.parameters(), lr=0.01, hypergrad_lr=1e-3)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
        >>> opt.param_groups[0]["lr"]  # learned
        0.01
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, hypergrad_lr: float = 1e-3,
                 momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
                 nesterov: bool = False, *, maximize: bool = False,
                 differentiable: bool = False, impl: Impl | str = Impl.AUTO) -> None:
        check_fused_flags(type(self).__name__, differentiable=differentiable)
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        check_sgd_hyperparameters("SGDHD", lr=float(lr), momentum=momentum,
                                  dampening=dampening, weight_decay=weight_decay,
                                  nesterov=nesterov)
        _check_hypergrad_lr(hypergrad_lr)
        defaults = dict(lr=lr, hypergrad_lr=hypergrad_lr, momentum=momentum,
                        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, hypergradient=0.0)
        super().__init__(params, defaults)
        self.impl = Impl(impl)

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Performs a single optimization step: the lr update and the SGD step, one fused
        call per param group."""
        loss = run_closure(closure)
        for index, group in enumerate(self.param_groups):
            momentum = group["momentum"]
            result = self._fast_step(index, group, (momentum != 0,), "sgd_hd", group["lr"],
                                     group["hypergrad_lr"], group["weight_decay"], momentum,
                                     group["dampening"], group["nesterov"], group["maximize"])
            if result is not None:
                _store_lr(group, result[1], result[0])
                continue
            with torch.no_grad():
                self._step_group(index, group)
        return loss

    def _step_group(self, index: int, group: dict) -> None:
        params, grads = params_with_grad("SGDHD", group)
        if not params:
            return
        _one_device("SGDHD", params)
        momentum = group["momentum"]
        fresh = [p for p in params
                 if momentum != 0 and self.state[p].get("momentum_buffer") is None]
        first_step = bool(fresh) and len(fresh) == len(params)
        if fresh and not first_step:
            # Some buffers start now, others run: torch's first-step rule (b = d) for the new
            # ones, in the same call, by starting them at τ·d/μ (b = μ·τd/μ + (1 − τ)d = d).
            tau = group["dampening"]
            for p in fresh:
                d = -p.grad if group["maximize"] else p.grad.clone()
                if group["weight_decay"] != 0:
                    d = d + group["weight_decay"] * p
                self.state[p]["momentum_buffer"] = (tau / momentum) * d
        layout = (momentum != 0,)
        plans = self._plans(index, params, layout, self._preparer(params, momentum),
                            cache=not fresh)
        (_, plan), = plans
        hypergradient, new_lr = plan(
            real_grads(self, index, grads), validated=True, grads_from_params=True,
            lr=group["lr"], hypergrad_lr=group["hypergrad_lr"],
            weight_decay=group["weight_decay"], momentum=momentum,
            dampening=group["dampening"], nesterov=group["nesterov"],
            maximize=group["maximize"], first_step=first_step,
        )
        _store_lr(group, new_lr, hypergradient)

    def _preparer(self, params: list[torch.Tensor], momentum: float):
        def prepare(indices):
            assert indices is None  # one device (checked above)
            buffers = None
            for p in params:
                state = self.state[p]
                if "direction" not in state:
                    state["direction"] = _zeros_like(p)
                if momentum != 0 and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = _zeros_like(p)
            if momentum != 0:
                buffers = [as_real(self.state[p]["momentum_buffer"]) for p in params]
            return PreparedStep(
                "sgd_hd_step_", sgd_hd_step_, "sgd_hd_step", [as_real(p) for p in params],
                [("momentum_buffers", buffers),
                 ("directions", [as_real(self.state[p]["direction"]) for p in params])],
                None, impl=self.impl, watch_state=False)

        return prepare


class AdamHD(FusedOptimizer, torch.optim.Optimizer):
    """Adam whose learning rate is learned online by hypergradient descent (Adam-HD).

    .. math::
        \\alpha_t = \\alpha_{t-1} + \\beta\\, d_t \\cdot u_{t-1}, \\qquad
        u_t = \\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon), \\qquad
        \\theta_t = \\theta_{t-1} - \\alpha_t u_t

    Args:
        params: iterable of params or param groups.
        lr: the initial learning rate α_0.
        hypergrad_lr: β (the paper uses 1e-7 for Adam-HD: Adam's direction is of order 1 per
            coordinate, so the dot product is large).
        betas, eps, weight_decay (L2, added to the gradient), maximize: as in
            ``torch.optim.Adam``.
        impl: which implementation runs the fused step.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AdamHD(model.parameters(), lr=1e-3, hypergrad_lr=1e-7)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, hypergrad_lr: float = 1e-7,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, *, maximize: bool = False,
                 differentiable: bool = False, impl: Impl | str = Impl.AUTO) -> None:
        check_fused_flags(type(self).__name__, differentiable=differentiable)
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        _check_hypergrad_lr(hypergrad_lr)
        defaults = dict(lr=lr, hypergrad_lr=hypergrad_lr, betas=betas, eps=eps,
                        weight_decay=weight_decay, maximize=maximize, hypergradient=0.0)
        super().__init__(params, defaults)
        self.impl = Impl(impl)

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Performs a single optimization step: the lr update and the Adam step, one fused
        call per param group."""
        loss = run_closure(closure)
        for index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            result = self._fast_step(index, group, (), "adam_hd", group["lr"],
                                     group["hypergrad_lr"], beta1, beta2, group["eps"],
                                     group["weight_decay"], group["maximize"])
            if result is not None:
                _store_lr(group, result[1], result[0])
                continue
            with torch.no_grad():
                self._step_group(index, group)
        return loss

    def _step_group(self, index: int, group: dict) -> None:
        message = "AdamHD does not support sparse gradients"
        params, grads = params_with_grad("AdamHD", group, sparse_message=message)
        if not params:
            return
        _one_device("AdamHD", params)

        def prepare(indices):
            assert indices is None  # one device (checked above)
            states = []
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = new_step_counter(p)
                    state["exp_avg"] = _zeros_like(p)
                    state["exp_avg_sq"] = _zeros_like(p)
                    state["direction"] = _zeros_like(p)
                states.append(state)
            return PreparedStep(
                "adam_hd_step_", adam_hd_step_, "adam_hd_step", [as_real(p) for p in params],
                [("exp_avgs", [as_real(s["exp_avg"]) for s in states]),
                 ("exp_avg_sqs", [as_real(s["exp_avg_sq"]) for s in states]),
                 ("directions", [as_real(s["direction"]) for s in states])],
                [s["step"] for s in states], impl=self.impl, watch_state=False)

        (_, plan), = self._plans(index, params, (), prepare)
        beta1, beta2 = group["betas"]
        hypergradient, new_lr = plan(
            real_grads(self, index, grads), validated=True, grads_from_params=True,
            lr=group["lr"], hypergrad_lr=group["hypergrad_lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"], maximize=group["maximize"],
        )
        _store_lr(group, new_lr, hypergradient)
