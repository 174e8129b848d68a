"""RMSprop, plain and centered, with optional momentum: the reference and the in-place op.

.. math::
    \\begin{aligned}
    g_t &= \\pm g_t + \\lambda \\theta_{t-1} \\\\
    v_t &= \\alpha v_{t-1} + (1 - \\alpha) g_t^2 \\\\
    \\bar g_t &= \\alpha \\bar g_{t-1} + (1 - \\alpha) g_t, \\quad
        d_t = \\sqrt{v_t - \\bar g_t^2} + \\epsilon \\quad \\text{(centered)} \\\\
    d_t &= \\sqrt{v_t} + \\epsilon \\quad \\text{(otherwise)} \\\\
    b_t &= \\mu b_{t-1} + g_t / d_t, \\quad \\theta_t = \\theta_{t-1} - \\gamma b_t
        \\quad \\text{(momentum > 0)} \\\\
    \\theta_t &= \\theta_{t-1} - \\gamma g_t / d_t \\quad \\text{(otherwise)}
    \\end{aligned}

as ``torch.optim.RMSprop`` defines it (Hinton, Lecture 6e; Graves, 2013,
https://arxiv.org/abs/1308.0850 for the centered form).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmeta import backends
from fastmeta._autograd import Function
from fastmeta.backends import Impl
from fastmeta.ops import tensor_lists as tl


def rmsprop_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    momentum_buffer: torch.Tensor | None = None,
    grad_avg: torch.Tensor | None = None,
    *,
    lr: float | torch.Tensor,
    alpha: float | torch.Tensor = 0.99,
    eps: float | torch.Tensor = 1e-8,
    weight_decay: float | torch.Tensor = 0.0,
    momentum: float | torch.Tensor = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One RMSprop step in plain differentiable PyTorch (the spec of the kernels).

    Returns:
        ``(param, square_avg, momentum_buffer, grad_avg)``, new tensors; the buffer is None
        when ``momentum`` is 0 and grad_avg is None unless ``centered``.
    """
    g = -grad if maximize else grad
    if not tl.is_zero(weight_decay):
        g = g + weight_decay * param
    v = alpha * square_avg + (1 - alpha) * (g * g)
    new_grad_avg = None
    if centered:
        if grad_avg is None:
            raise ValueError("rmsprop_step_reference: centered needs grad_avg")
        new_grad_avg = grad_avg + (1 - alpha) * (g - grad_avg)
        denom = (v - new_grad_avg * new_grad_avg).sqrt() + eps
    else:
        denom = v.sqrt() + eps
    new_buffer = None
    if not tl.is_zero(momentum):
        if momentum_buffer is None:
            raise ValueError("rmsprop_step_reference: momentum needs momentum_buffer")
        new_buffer = momentum * momentum_buffer + g / denom
        return param - lr * new_buffer, v, new_buffer, new_grad_avg
    return param - lr * (g / denom), v, None, new_grad_avg


def check_rmsprop_hyperparameters(*, lr: float, alpha: float, eps: float, weight_decay: float,
                                  momentum: float) -> None:
    """torch.optim.RMSprop's rules for valid hyperparameters, with its messages."""
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= momentum:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= alpha:
        raise ValueError(f"Invalid alpha value: {alpha}")


def rmsprop_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    square_avgs: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    grad_avgs: Sequence[torch.Tensor] | None,
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> None:
    """Updates params and RMSprop state in place, in one fused call.

    Args:
        square_avgs: running averages of g², shaped like params.
        momentum_buffers: needed when ``momentum`` is not 0 (start them at zero, as torch does).
        grad_avgs: running averages of g; needed when ``centered``.
        state_steps: one-element float tensors counting the steps taken; incremented here.
        lr, alpha, eps, weight_decay, momentum, centered, maximize: as in ``torch.optim.RMSprop``.
        impl: which implementation runs; see :mod:`fastmeta.backends`.
    """
    op = "rmsprop_step_"
    device = tl.check_params(op, params)
    tl.check_like_params(op, "grads", grads, params)
    tl.check_like_params(op, "square_avgs", square_avgs, params)
    step_dtype = tl.check_steps(op, state_steps, params)
    hyper = dict(
        lr=tl.check_scalar(op, "lr", lr), alpha=tl.check_scalar(op, "alpha", alpha),
        eps=tl.check_scalar(op, "eps", eps),
        weight_decay=tl.check_scalar(op, "weight_decay", weight_decay),
        momentum=tl.check_scalar(op, "momentum", momentum),
    )
    check_rmsprop_hyperparameters(**hyper)
    buffers: Sequence[torch.Tensor] = []
    if hyper["momentum"] != 0.0:
        if momentum_buffers is None:
            raise ValueError(f"{op}: momentum_buffers is required when momentum != 0")
        tl.check_like_params(op, "momentum_buffers", momentum_buffers, params)
        buffers = momentum_buffers
    averages: Sequence[torch.Tensor] = []
    if centered:
        if grad_avgs is None:
            raise ValueError(f"{op}: grad_avgs is required when centered=True")
        tl.check_like_params(op, "grad_avgs", grad_avgs, params)
        averages = grad_avgs
    which = backends.resolve(impl, device, op=op)
    if len(params) == 0:
        return
    if which is Impl.REFERENCE:
        _rmsprop_step_reference_(params, grads, square_avgs, buffers, averages, state_steps,
                                 centered=centered, maximize=maximize, **hyper)
        return
    for name, tensors in (("params", params), ("square_avgs", square_avgs),
                          ("momentum_buffers", buffers), ("grad_avgs", averages)):
        tl.check_contiguous(op, name, tensors)
    grads = tl.contiguous_inputs(grads)
    if which is Impl.NATIVE:
        tl.require_cpu_steps(op, state_steps)
        backends.native().rmsprop_step(
            tl.pointers(params), tl.pointers(grads), tl.pointers(square_avgs),
            tl.pointers(buffers), tl.pointers(averages), tl.pointers(state_steps), step_dtype,
            tl.numels(params), tl.dtype_codes(params), centered=centered, maximize=maximize,
            **hyper,
        )
    else:
        backends.triton_kernels("rmsprop").rmsprop_step_(
            params, grads, square_avgs, buffers, averages, state_steps, centered=centered,
            maximize=maximize, **hyper,
        )


@torch.no_grad()
def _rmsprop_step_reference_(params, grads, square_avgs, buffers, averages, steps,
                             **hyper) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        steps[i] += 1
        compute = tl.compute_dtype(p.dtype)
        new_p, v, b, a = rmsprop_step_reference(
            p.to(compute), g.to(compute), square_avgs[i].to(compute),
            buffers[i].to(compute) if buffers else None,
            averages[i].to(compute) if averages else None, **hyper,
        )
        p.copy_(new_p)
        square_avgs[i].copy_(v)
        if b is not None:
            buffers[i].copy_(b)
        if a is not None:
            averages[i].copy_(a)


# ---- Out-of-place, task-batched, differentiable step ---------------------------------------


class _RmspropRule(tl.StepRule):
    name = "rmsprop"
    state_names = ("square_avg", "momentum_buffer", "grad_avg")
    hyper_names = ("lr", "alpha", "eps", "weight_decay", "momentum")

    def out_states(self, cfg):
        f = cfg.flags
        return tuple(n for n, on in zip(self.state_names,
                                        (True, f["has_momentum"], f["centered"])) if on)

    def flags(self, cfg):
        f = cfg.flags
        return ((tl.FLAG_MAXIMIZE if f["maximize"] else 0)
                | (tl.FLAG_CENTERED if f["centered"] else 0)
                | (tl.FLAG_MOMENTUM if f["has_momentum"] else 0)
                | (tl.FLAG_WEIGHT_DECAY if cfg.needs_param else 0))

    def reference(self, cfg, param, grad, states, hyper):
        f = cfg.flags
        hyper = dict(hyper)
        if not f["has_momentum"]:
            hyper["momentum"] = 0.0
        new_p, v, b, a = rmsprop_step_reference(
            param, grad, states["square_avg"], states.get("momentum_buffer"),
            states.get("grad_avg"), centered=f["centered"], maximize=f["maximize"], **hyper,
        )
        out = {"square_avg": v}
        if b is not None:
            out["momentum_buffer"] = b
        if a is not None:
            out["grad_avg"] = a
        return new_p, out


RMSPROP_RULE = _RmspropRule()


class RmspropFunction(Function):
    """One fused, differentiable RMSprop step on ``[N]`` or ``[T, N]`` buffers.

    Inputs: ``(cfg, param, grad, square_avg, momentum_buffer, grad_avg, *tensor_hyperparameters)``;
    outputs ``(param, square_avg, [momentum_buffer], [grad_avg])``.
    """

    @staticmethod
    def forward(cfg, param, grad, *rest):
        states, hypers = tl.split_inputs(RMSPROP_RULE, rest)
        return tl.step_forward(RMSPROP_RULE, cfg, param, grad, states, hypers)

    @staticmethod
    def setup_context(ctx, inputs, output):
        tl.step_setup_context(RMSPROP_RULE, ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grad_outputs):
        # ĝ = ±g + λθ ; v' = αv + (1−α)ĝ² ; a' = αa + (1−α)ĝ, w = v' − a'² (centered; else
        # w = v') ; r = √w ; δ = r + ε ; u = ĝ/δ ; b' = μb + u, θ' = θ − γb' (momentum; else
        # θ' = θ − γu). Given θ̄', v̄', b̄', ā':
        #   momentum: b̄'' = b̄' − γθ̄' = ū, γ̄ = −Σ θ̄' b', b̄ = μ b̄'', μ̄ = Σ b̄'' b
        #   plain:    ū = −γθ̄', γ̄ = −Σ θ̄' u
        #   δ̄ = −ū ĝ/δ² = ε̄ ;  w̄ = δ̄/(2r) ;  v̄'' = v̄' + w̄ ;  ā'' = ā' − 2a'w̄
        #   ĝ̄ = ū/δ + 2(1−α)ĝ v̄'' + (1−α)ā'' ;  v̄ = α v̄'' ;  ā = α ā''
        #   ᾱ = Σ v̄''(v − ĝ²) + ā''(a − ĝ) ;  ḡ = ±ĝ̄ ;  θ̄ = θ̄' + λĝ̄ ;  λ̄ = Σ ĝ̄ θ
        return tl.step_backward(RMSPROP_RULE, ctx, grad_outputs)

    @staticmethod
    def vmap(info, in_dims, cfg, *args):
        return tl.step_vmap(RmspropFunction, RMSPROP_RULE, info, in_dims, cfg, *args)


def rmsprop_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    momentum_buffer: torch.Tensor | None = None,
    grad_avg: torch.Tensor | None = None,
    *,
    lr: float | torch.Tensor,
    alpha: float | torch.Tensor = 0.99,
    eps: float | torch.Tensor = 1e-8,
    weight_decay: float | torch.Tensor = 0.0,
    momentum: float | torch.Tensor = 0.0,
    centered: bool = False,
    maximize: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One out-of-place, differentiable RMSprop step on an ``[N]`` or ``[T, N]`` buffer.

    Args:
        param, grad, square_avg: ``[N]`` or ``[T, N]`` tensors of one dtype and device.
        momentum_buffer: needed when ``momentum`` is not 0 (start it at zero, as torch does).
        grad_avg: needed when ``centered``.
        lr: a number, a () tensor, ``[T]`` (per task), or ``[N]``/``[T, N]`` (per element).
        alpha, eps, weight_decay, momentum: numbers, () tensors or ``[T]`` tensors.
        centered, maximize: as in ``torch.optim.RMSprop``.
        impl: which implementation runs; see :mod:`fastmeta.backends`.

    Returns:
        ``(new_param, new_square_avg, new_momentum_buffer, new_grad_avg)``; the last two are
        None when unused.
    """
    op = "rmsprop_step"
    hyper = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum)
    check_rmsprop_hyperparameters(**{k: (0.0 if isinstance(v, torch.Tensor) else float(v))
                                     for k, v in hyper.items()})
    has_momentum = not tl.is_zero(momentum)
    if has_momentum and momentum_buffer is None:
        raise ValueError(f"{op}: momentum_buffer is required when momentum != 0")
    if centered and grad_avg is None:
        raise ValueError(f"{op}: grad_avg is required when centered=True")
    new_p, states = tl.run_step(
        RmspropFunction, RMSPROP_RULE, op, impl, param, grad,
        {"square_avg": square_avg, "momentum_buffer": momentum_buffer if has_momentum else None,
         "grad_avg": grad_avg if centered else None}, hyper,
        dict(centered=centered, maximize=maximize, has_momentum=has_momentum),
    )
    return (new_p, states["square_avg"], states.get("momentum_buffer"), states.get("grad_avg"))
