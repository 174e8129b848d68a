"""Adagrad: the reference and the in-place multi-tensor op.

.. math::
    \\begin{aligned}
    g_t &= \\pm g_t + \\lambda \\theta_{t-1} \\\\
    s_t &= s_{t-1} + g_t^2 \\\\
    \\theta_t &= \\theta_{t-1} - \\frac{\\gamma}{1 + (t - 1)\\eta} \\frac{g_t}{\\sqrt{s_t} +
        \\epsilon}
    \\end{aligned}

with learning-rate decay η, as ``torch.optim.Adagrad`` defines it (Duchi et al., 2011,
https://jmlr.org/papers/v12/duchi11a.html).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmeta import backends
from fastmeta._autograd import Function
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


# ---- Out-of-place, task-batched, differentiable step ---------------------------------------


class _AdagradRule(tl.StepRule):
    name = "adagrad"
    state_names = ("state_sum",)
    hyper_names = ("lr", "lr_decay", "weight_decay", "eps")

    def out_states(self, cfg):
        return self.state_names

    def flags(self, cfg):
        return ((tl.FLAG_MAXIMIZE if cfg.flags["maximize"] else 0)
                | (tl.FLAG_WEIGHT_DECAY if cfg.needs_param else 0))

    def reference(self, cfg, param, grad, states, hyper):
        new_p, new_sum = adagrad_step_reference(
            param, grad, states["state_sum"], step=cfg.flags["step"],
            maximize=cfg.flags["maximize"], **hyper,
        )
        return new_p, {"state_sum": new_sum}


ADAGRAD_RULE = _AdagradRule()


class AdagradFunction(Function):
    """One fused, differentiable Adagrad step on ``[N]`` or ``[T, N]`` buffers.

    Inputs: ``(cfg, param, grad, state_sum, *tensor_hyperparameters)``; outputs
    ``(param, state_sum)``.
    """

    @staticmethod
    def forward(cfg, param, grad, *rest):
        states, hypers = tl.split_inputs(ADAGRAD_RULE, rest)
        return tl.step_forward(ADAGRAD_RULE, cfg, param, grad, states, hypers)

    @staticmethod
    def setup_context(ctx, inputs, output):
        tl.step_setup_context(ADAGRAD_RULE, ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grad_outputs):
        # ĝ = ±g + λθ ; s' = s + ĝ² ; r = √s' ; δ = r + ε ; k = 1 + (t−1)η ; c = γ/k ;
        # θ' = θ − c ĝ/δ. Given θ̄', s̄':
        #   c̄ = −θ̄' ĝ/δ ;  γ̄ = Σ c̄/k ;  η̄ = −Σ c̄ γ (t−1)/k²
        #   δ̄ = c θ̄' ĝ/δ² = ε̄ ;  s̄'' = s̄' + δ̄/(2r) = s̄
        #   ĝ̄ = −c θ̄'/δ + 2ĝ s̄'' ;  ḡ = ±ĝ̄ ;  θ̄ = θ̄' + λĝ̄ ;  λ̄ = Σ ĝ̄ θ
        return tl.step_backward(ADAGRAD_RULE, ctx, grad_outputs)

    @staticmethod
    def vmap(info, in_dims, cfg, *args):
        return tl.step_vmap(AdagradFunction, ADAGRAD_RULE, info, in_dims, cfg, *args)


def adagrad_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state_sum: torch.Tensor,
    *,
    step: int,
    lr: float | torch.Tensor,
    lr_decay: float | torch.Tensor = 0.0,
    weight_decay: float | torch.Tensor = 0.0,
    eps: float | torch.Tensor = 1e-10,
    maximize: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One out-of-place, differentiable Adagrad step on an ``[N]`` or ``[T, N]`` buffer.

    Args:
        param, grad, state_sum: ``[N]`` or ``[T, N]`` tensors of one dtype and device.
        step: the step number after this update (1 on the first step).
        lr: a number, a () tensor, ``[T]`` (per task), or ``[N]``/``[T, N]`` (per element).
        lr_decay, weight_decay, eps: numbers, () tensors or ``[T]`` tensors.
        maximize: as in ``torch.optim.Adagrad``.
        impl: which implementation runs; see :mod:`fastmeta.backends`.

    Returns:
        ``(new_param, new_state_sum)``.
    """
    op = "adagrad_step"
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{op}: step must be an int >= 1, got {step!r}")
    hyper = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps)
    check_adagrad_hyperparameters(**{k: (0.0 if isinstance(v, torch.Tensor) else float(v))
                                     for k, v in hyper.items()})
    new_p, states = tl.run_step(AdagradFunction, ADAGRAD_RULE, op, impl, param, grad,
                                {"state_sum": state_sum}, hyper,
                                dict(step=step, maximize=maximize))
    return new_p, states["state_sum"]
