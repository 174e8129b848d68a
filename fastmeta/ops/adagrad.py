"""Adagrad: the reference and the in-place multi-tensor op.

.. math::
    \\begin{aligned}
    g_t &= \\pm g_t + \\lambda \\theta_{t-1} \\\\
    s_t &= s_{t-1} + g_t^2 \\\\
    \\theta_t &= \\theta_{t-1} - \\frac{\\gamma}{1 + (t - 1)\\eta} \\frac{g_t}{\\sqrt{s_t} + \\epsilon}
    \\end{aligned}

with learning-rate decay η, as ``torch.optim.Adagrad`` defines it (Duchi et al., 2011,
https://jmlr.org/papers/v12/duchi11a.html).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmeta import backends
from fastmeta.backends import Impl
from fastmeta.ops import tensor_lists as tl


def adagrad_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    state_sum: torch.Tensor,
    *,
    step: float | torch.Tensor,
    lr: float | torch.Tensor,
    lr_decay: float | torch.Tensor = 0.0,
    weight_decay: float | torch.Tensor = 0.0,
    eps: float | torch.Tensor = 1e-10,
    maximize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Adagrad step in plain differentiable PyTorch; ``step`` counts this update (1 first).

    Returns:
        ``(param, state_sum)``, new tensors.
    """
    g = -grad if maximize else grad
    if not tl.is_zero(weight_decay):
        g = g + weight_decay * param
    clr = lr / (1 + (step - 1) * lr_decay)
    new_sum = state_sum + g * g
    return param - clr * (g / (new_sum.sqrt() + eps)), new_sum


def check_adagrad_hyperparameters(*, lr: float, lr_decay: float, weight_decay: float,
                                  eps: float) -> None:
    """torch.optim.Adagrad's rules for valid hyperparameters, with its messages."""
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= lr_decay:
        raise ValueError(f"Invalid lr_decay value: {lr_decay}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")


def adagrad_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state_sums: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> None:
    """Updates params, sums of squares and step counters in place, in one fused call.

    Args:
        state_sums: accumulated squared gradients, shaped like params.
        state_steps: one-element float tensors counting the steps taken; incremented here.
        lr, lr_decay, weight_decay, eps, maximize: as in ``torch.optim.Adagrad``.
        impl: which implementation runs; see :mod:`fastmeta.backends`.
    """
    op = "adagrad_step_"
    device = tl.check_params(op, params)
    tl.check_like_params(op, "grads", grads, params)
    tl.check_like_params(op, "state_sums", state_sums, params)
    step_dtype = tl.check_steps(op, state_steps, params)
    hyper = dict(
        lr=tl.check_scalar(op, "lr", lr), lr_decay=tl.check_scalar(op, "lr_decay", lr_decay),
        weight_decay=tl.check_scalar(op, "weight_decay", weight_decay),
        eps=tl.check_scalar(op, "eps", eps),
    )
    check_adagrad_hyperparameters(**hyper)
    which = backends.resolve(impl, device, op=op)
    if len(params) == 0:
        return
    if which is Impl.REFERENCE:
        _adagrad_step_reference_(params, grads, state_sums, state_steps, maximize=maximize,
                                 **hyper)
        return
    tl.check_contiguous(op, "params", params)
    tl.check_contiguous(op, "state_sums", state_sums)
    grads = tl.contiguous_inputs(grads)
    if which is Impl.NATIVE:
        tl.require_cpu_steps(op, state_steps)
        backends.native().adagrad_step(
            tl.pointers(params), tl.pointers(grads), tl.pointers(state_sums),
            tl.pointers(state_steps), step_dtype, tl.numels(params), tl.dtype_codes(params),
            maximize=maximize, **hyper,
        )
    else:
        backends.triton_kernels("adagrad").adagrad_step_(
            params, grads, state_sums, state_steps, maximize=maximize, **hyper
        )


@torch.no_grad()
def _adagrad_step_reference_(params, grads, state_sums, steps, **hyper) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        steps[i] += 1
        compute = tl.compute_dtype(p.dtype)
        new_p, new_sum = adagrad_step_reference(
            p.to(compute), g.to(compute), state_sums[i].to(compute), step=steps[i].item(),
            **hyper,
        )
        p.copy_(new_p)
        state_sums[i].copy_(new_sum)
