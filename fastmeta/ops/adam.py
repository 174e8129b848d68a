"""Adam and AdamW: the reference and the in-place multi-tensor op.

.. math::
    \\begin{aligned}
    \\theta &\\leftarrow \\theta (1 - \\gamma \\lambda) \\quad \\text{(AdamW, decoupled decay)} \\\\
    g_t &= \\pm g_t + \\lambda \\theta_{t-1} \\quad \\text{(Adam, coupled decay)} \\\\
    m_t &= \\beta_1 m_{t-1} + (1 - \\beta_1) g_t \\\\
    v_t &= \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2 \\\\
    \\hat v_t &= \\max(\\hat v_{t-1}, v_t) \\ \\text{(amsgrad)}, \\quad \\hat v_t = v_t \\
        \\text{(otherwise)} \\\\
    \\theta_t &= \\theta_{t-1} - \\frac{\\gamma}{1 - \\beta_1^t}
        \\frac{m_t}{\\sqrt{\\hat v_t / (1 - \\beta_2^t) + \\epsilon_{root}} + \\epsilon}
    \\end{aligned}

as ``torch.optim.Adam`` / ``AdamW`` define it (Kingma & Ba, 2015, https://arxiv.org/abs/1412.6980;
Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101). ``eps_root`` (optax's name) keeps
the derivative of the square root finite at zero for differentiable use; it is 0 for torch.optim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmeta import backends
from fastmeta._autograd import Function
from fastmeta.backends import Impl
from fastmeta.ops import tensor_lists as tl


def adam_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None = None,
    *,
    step: float | torch.Tensor,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor = 0.9,
    beta2: float | torch.Tensor = 0.999,
    eps: float | torch.Tensor = 1e-8,
    weight_decay: float | torch.Tensor = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    eps_root: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One Adam/AdamW step in plain differentiable PyTorch (the spec of the kernels).

    Args:
        step: the step number *after* this update (1 on the first step), for bias correction.

    Returns:
        ``(param, exp_avg, exp_avg_sq, max_exp_avg_sq)``, new tensors; the last is None
        unless ``amsgrad``.
    """
    if decoupled_weight_decay and not tl.is_zero(weight_decay):
        param = param * (1 - lr * weight_decay)
    g = -grad if maximize else grad
    if not decoupled_weight_decay and not tl.is_zero(weight_decay):
        g = g + weight_decay * param
    m = exp_avg + (1 - beta1) * (g - exp_avg)
    v = beta2 * exp_avg_sq + (1 - beta2) * (g * g)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    new_max = None
    v_hat = v
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("adam_step_reference: amsgrad needs max_exp_avg_sq")
        new_max = torch.maximum(max_exp_avg_sq, v)
        v_hat = new_max
    if tl.is_zero(eps_root):
        sqrt_bc2 = bias_correction2**0.5
        denom = v_hat.sqrt() / sqrt_bc2 + eps
    else:
        denom = (v_hat / bias_correction2 + eps_root).sqrt() + eps
    return param - (lr / bias_correction1) * (m / denom), m, v, new_max


def check_adam_hyperparameters(*, lr: float, beta1: float, beta2: float, eps: float,
                               weight_decay: float) -> None:
    """torch.optim.Adam's rules for valid hyperparameters, with its messages."""
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def adam_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> None:
    """Updates params, moments and step counters in place, with one fused call per dtype.

    Args:
        params, grads: the tensors and their gradients (float32/64, float16, bfloat16).
        exp_avgs, exp_avg_sqs: first and second moments, shaped like params.
        max_exp_avg_sqs: running maxima of the second moment; needed when ``amsgrad``.
        state_steps: one-element float tensors counting the steps taken; incremented here.
        lr, beta1, beta2, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.Adam``.
        decoupled_weight_decay: AdamW's decay (``torch.optim.AdamW``).
        impl: which implementation runs; see :mod:`fastmeta.backends`.

    Example:
        >>> p, g = torch.ones(3), torch.ones(3)
        >>> m, v, step = torch.zeros(3), torch.zeros(3), torch.tensor(0.0)
        >>> adam_step_([p], [g], [m], [v], None, [step], lr=0.1)
        >>> p
        tensor([0.9000, 0.9000, 0.9000])
    """
    op = "adam_step_"
    device = tl.check_params(op, params)
    tl.check_like_params(op, "grads", grads, params)
    tl.check_like_params(op, "exp_avgs", exp_avgs, params)
    tl.check_like_params(op, "exp_avg_sqs", exp_avg_sqs, params)
    maxima: Sequence[torch.Tensor] = []
    if amsgrad:
        if max_exp_avg_sqs is None:
            raise ValueError(f"{op}: max_exp_avg_sqs is required when amsgrad=True")
        tl.check_like_params(op, "max_exp_avg_sqs", max_exp_avg_sqs, params)
        maxima = max_exp_avg_sqs
    step_dtype = tl.check_steps(op, state_steps, params)
    hyper = dict(
        lr=tl.check_scalar(op, "lr", lr), beta1=tl.check_scalar(op, "beta1", beta1),
        beta2=tl.check_scalar(op, "beta2", beta2), eps=tl.check_scalar(op, "eps", eps),
        weight_decay=tl.check_scalar(op, "weight_decay", weight_decay),
    )
    check_adam_hyperparameters(**hyper)
    flags = dict(amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
    which = backends.resolve(impl, device, op=op)
    if len(params) == 0:
        return
    if which is Impl.REFERENCE:
        _adam_step_reference_(params, grads, exp_avgs, exp_avg_sqs, maxima, state_steps,
                              **hyper, **flags)
        return
    for name, tensors in (("params", params), ("exp_avgs", exp_avgs),
                          ("exp_avg_sqs", exp_avg_sqs), ("max_exp_avg_sqs", maxima)):
        tl.check_contiguous(op, name, tensors)
    grads = tl.contiguous_inputs(grads)
    if which is Impl.NATIVE:
        tl.require_cpu_steps(op, state_steps)
        backends.native().adam_step(
            tl.pointers(params), tl.pointers(grads), tl.pointers(exp_avgs),
            tl.pointers(exp_avg_sqs), tl.pointers(maxima), tl.pointers(state_steps), step_dtype,
            tl.numels(params), tl.dtype_codes(params), **hyper, **flags,
        )
    else:
        backends.triton_kernels("adam").adam_step_(
            params, grads, exp_avgs, exp_avg_sqs, maxima, state_steps, **hyper, **flags
        )


@torch.no_grad()
def _adam_step_reference_(params, grads, exp_avgs, exp_avg_sqs, maxima, steps, **hyper) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        steps[i] += 1
        compute = tl.compute_dtype(p.dtype)
        new_p, m, v, vmax = adam_step_reference(
            p.to(compute), g.to(compute), exp_avgs[i].to(compute), exp_avg_sqs[i].to(compute),
            maxima[i].to(compute) if maxima else None, step=steps[i].item(), **hyper,
        )
        p.copy_(new_p)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        if vmax is not None:
            maxima[i].copy_(vmax)


# ---- Out-of-place, task-batched, differentiable step ---------------------------------------


class _AdamRule(tl.StepRule):
    name = "adam"
    state_names = ("exp_avg", "exp_avg_sq")
    hyper_names = ("lr", "beta1", "beta2", "eps", "weight_decay", "eps_root")

    def out_states(self, cfg):
        return self.state_names

    def flags(self, cfg):
        f = cfg.flags
        return ((tl.FLAG_MAXIMIZE if f["maximize"] else 0)
                | (tl.FLAG_DECOUPLED if f["decoupled_weight_decay"] else 0)
                | (tl.FLAG_EPS_ROOT if not tl.is_zero(cfg.floats.get("eps_root", 1.0)) else 0)
                | (tl.FLAG_WEIGHT_DECAY if cfg.needs_param else 0))

    def reference(self, cfg, param, grad, states, hyper):
        f = cfg.flags
        zeros = None if len(states) == 2 else torch.zeros_like(grad)  # absent: a zero state
        new_p, m, v, _ = adam_step_reference(
            param, grad, states.get("exp_avg", zeros), states.get("exp_avg_sq", zeros),
            step=f["step"],
            maximize=f["maximize"], decoupled_weight_decay=f["decoupled_weight_decay"], **hyper,
        )
        return new_p, {"exp_avg": m, "exp_avg_sq": v}


ADAM_RULE = _AdamRule()


class AdamFunction(Function):
    """One fused, differentiable Adam/AdamW step on ``[N]`` or ``[T, N]`` buffers.

    Inputs: ``(cfg, param, grad, exp_avg, exp_avg_sq, *tensor_hyperparameters)``; outputs
    ``(param, exp_avg, exp_avg_sq)``. It saves the gradient (and the param under weight decay);
    the moments are recomputed in the backward (see :mod:`fastmeta.ops.tensor_lists`).
    """

    @staticmethod
    def forward(cfg, param, grad, *rest):
        states, hypers = tl.split_inputs(ADAM_RULE, rest)
        return tl.step_forward(ADAM_RULE, cfg, param, grad, states, hypers)

    @staticmethod
    def setup_context(ctx, inputs, output):
        tl.step_setup_context(ADAM_RULE, ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grad_outputs):
        # ĝ = ±g + λθ (Adam) ; θ̃ = θ(1 − γλ) (AdamW) ; m' = m + (1−β1)(ĝ − m) ;
        # v' = β2 v + (1−β2)ĝ² ; r = √(v'/bc2 + ε_r) ; δ = r + ε ; a = γ/bc1 ; θ' = θ̃ − a m'/δ,
        # with bc_i = 1 − β_i^t. Given θ̄', m̄', v̄':
        #   ā = −θ̄' m'/δ ;  γ̄ = Σ ā/bc1 (− λ θ θ̄' for AdamW) ;  bc̄1 = −ā γ/bc1²
        #   m̄'' = m̄' − θ̄' a/δ ;  δ̄ = θ̄' a m'/δ² = ε̄ ;  x̄ = δ̄/(2r) = ε̄_r
        #   v̄'' = v̄' + x̄/bc2 ;  bc̄2 = −x̄ v'/bc2²
        #   ĝ̄ = (1−β1) m̄'' + 2(1−β2) ĝ v̄'' ;  m̄ = β1 m̄'' ;  v̄ = β2 v̄'' ;  ḡ = ±ĝ̄
        #   β̄1 = Σ m̄''(m − ĝ) − bc̄1 t β1^(t−1) ;  β̄2 = Σ v̄''(v − ĝ²) − bc̄2 t β2^(t−1)
        #   θ̄ = θ̄' + λ ĝ̄, λ̄ = Σ ĝ̄ θ (Adam) ;  θ̄ = θ̄'(1 − γλ), λ̄ = −Σ γ θ θ̄' (AdamW)
        return tl.step_backward(ADAM_RULE, ctx, grad_outputs)

    @staticmethod
    def vmap(info, in_dims, cfg, *args):
        return tl.step_vmap(AdamFunction, ADAM_RULE, info, in_dims, cfg, *args)


def adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor = 0.9,
    beta2: float | torch.Tensor = 0.999,
    eps: float | torch.Tensor = 1e-8,
    weight_decay: float | torch.Tensor = 0.0,
    eps_root: float | torch.Tensor = 0.0,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One out-of-place, differentiable Adam/AdamW step on an ``[N]`` or ``[T, N]`` buffer.

    Args:
        param, grad, exp_avg, exp_avg_sq: ``[N]`` or ``[T, N]`` tensors of one dtype and device.
        step: the step number after this update (1 on the first step).
        lr: a number, a () tensor, ``[T]`` (per task), or ``[N]``/``[T, N]`` (per element).
        beta1, beta2, eps, weight_decay, eps_root: numbers, () tensors or ``[T]`` tensors.
        maximize, decoupled_weight_decay: as in ``torch.optim.Adam``/``AdamW``.
        impl: which implementation runs; see :mod:`fastmeta.backends`.

    Returns:
        ``(new_param, new_exp_avg, new_exp_avg_sq)``.
    """
    op = "adam_step"
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{op}: step must be an int >= 1 (the step number after this update), "
                         f"got {step!r}")
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                 eps_root=eps_root)
    numbers = {k: v for k, v in hyper.items() if not isinstance(v, torch.Tensor)}
    check_adam_hyperparameters(**{k: float(numbers.get(k, 0.0)) for k in
                                  ("lr", "beta1", "beta2", "eps", "weight_decay")})
    new_p, states = tl.run_step(
        AdamFunction, ADAM_RULE, op, impl, param, grad,
        {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, hyper,
        dict(step=step, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay),
    )
    return new_p, states["exp_avg"], states["exp_avg_sq"]
