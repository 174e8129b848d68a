"""Hypergradient descent (Baydin et al., ICLR 2018): SGD-HD and Adam-HD as fused in-place ops.

The learning rate α becomes a parameter too. After each step θ_t = θ_{t−1} − α_t u_t, with
u_t the step's lr-free direction, the derivative of the objective at the *next* point with
respect to the lr that produced it is

.. math::
    h_{t} = \\frac{\\partial f(\\theta_{t-1})}{\\partial \\alpha_{t-1}}
          = \\nabla f(\\theta_{t-1}) \\cdot \\frac{\\partial \\theta_{t-1}}{\\partial \\alpha_{t-1}}
          = -\\, d_t \\cdot u_{t-1},

so each step first moves α by plain gradient descent with the hypergradient learning rate β,
then takes the base step with the new α:

.. math::
    \\begin{aligned}
    d_t &= \\pm g_t + \\lambda \\theta_{t-1}
        && \\text{(the gradient the step sees: maximize, weight decay)} \\\\
    \\alpha_t &= \\alpha_{t-1} - \\beta h_t = \\alpha_{t-1} + \\beta\\, d_t \\cdot u_{t-1}
        && (u_0 = 0) \\\\
    u_t &= \\begin{cases}
        d_t & \\text{SGD-HD} \\\\
        b_t \\ \\text{or}\\ d_t + \\mu b_t & \\text{with momentum (torch's buffer } b_t
            \\text{), or Nesterov} \\\\
        \\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon) & \\text{Adam-HD}
    \\end{cases} \\\\
    \\theta_t &= \\theta_{t-1} - \\alpha_t u_t
    \\end{aligned}

The dot product runs over every tensor of the call (one param group). It is a reduction
fused into the step: the native and Triton kernels compute it in a first phase (per-chunk
partial sums in float64, added in a fixed order, so the result does not depend on the thread
count) and update in a second phase of the same call. ``u_t`` is kept as a state tensor
(``direction``) for the next step.

With zero momentum this is exactly the paper's SGD-HD; with Nesterov momentum and no dampening,
its SGDN-HD; and Adam-HD is the paper's Algorithm 4 (with torch's ε placement,
``√v̂ + ε``).

Reference:
    Baydin, Cornish, Martínez Rubio, Schmidt, Wood. Online Learning Rate Adaptation with
    Hypergradient Descent. ICLR 2018. https://arxiv.org/abs/1703.04782
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmeta import backends
from fastmeta.backends import Impl
from fastmeta.ops import tensor_lists as tl
from fastmeta.ops.sgd import check_sgd_hyperparameters

__all__ = ["adam_hd_step_", "hypergradient_dot", "sgd_hd_step_"]


def hypergradient_dot(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      directions: Sequence[torch.Tensor], *, weight_decay: float,
                      maximize: bool) -> float:
    """Σ_i d_i · u_i over every tensor, in float64 (the reference of the fused reduction)."""
    total = torch.zeros((), dtype=torch.float64)
    for p, g, u in zip(params, grads, directions):
        if g.numel() == 0:
            continue
        d = g.double().neg() if maximize else g.double()
        if weight_decay != 0.0:
            d = d + weight_decay * p.double()
        total = total + torch.dot(d.reshape(-1), u.double().reshape(-1)).cpu()
    return float(total)


def _param_and_gradient(p: torch.Tensor, g: torch.Tensor, *, weight_decay: float,
                        maximize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """θ and d = ±g + λθ in the compute dtype (fp32 for low-precision params)."""
    cdtype = tl.compute_dtype(p.dtype)
    pc = p.to(cdtype)
    d = g.to(cdtype)
    if maximize:
        d = -d
    if weight_decay != 0.0:
        d = d + weight_decay * pc
    return pc, d


def _sgd_hd_reference_(params, grads, momentum_buffers, directions, *, lr, weight_decay,
                       momentum, dampening, nesterov, maximize, first_step) -> None:
    for i, (p, g, u) in enumerate(zip(params, grads, directions)):
        pc, d = _param_and_gradient(p, g, weight_decay=weight_decay, maximize=maximize)
        cdtype = pc.dtype
        step = d
        if momentum_buffers:
            b = d if first_step else (
                momentum * momentum_buffers[i].to(cdtype) + (1.0 - dampening) * d)
            momentum_buffers[i].copy_(b)
            step = d + momentum * b if nesterov else b
        u.copy_(step)
        p.copy_(pc - lr * step)


def _adam_hd_reference_(params, grads, exp_avgs, exp_avg_sqs, directions, steps, *, lr,
                        beta1, beta2, eps, weight_decay, maximize) -> None:
    for p, g, m, v, u, step in zip(params, grads, exp_avgs, exp_avg_sqs, directions, steps):
        step += 1
        t = float(step.item())
        pc, d = _param_and_gradient(p, g, weight_decay=weight_decay, maximize=maximize)
        cdtype = pc.dtype
        mc = m.to(cdtype)
        mc = mc + (1.0 - beta1) * (d - mc)
        vc = beta2 * v.to(cdtype) + (1.0 - beta2) * d * d
        m.copy_(mc)
        v.copy_(vc)
        bc1 = 1.0 - beta1 ** t
        bc2_sqrt = (1.0 - beta2 ** t) ** 0.5
        direction = (mc / bc1) / (vc.sqrt() / bc2_sqrt + eps)
        u.copy_(direction)
        p.copy_(pc - lr * direction)


def _check_lists(op: str, params, lists: dict[str, Sequence[torch.Tensor] | None]):
    device = tl.check_params(op, params)
    for name, tensors in lists.items():
        if tensors is not None:
            tl.check_like_params(op, name, tensors, params)
    return device


def _check_hypergrad_lr(op: str, lr: float, hypergrad_lr: float) -> None:
    if hypergrad_lr < 0.0:
        raise ValueError(f"{op}: Invalid hypergradient learning rate (hypergrad_lr): "
                         f"{hypergrad_lr}")
    if lr != lr or lr in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: the learning rate is not finite ({lr}); hypergradient descent "
                         "diverged (lower hypergrad_lr)")


def _run(op: str, impl: Impl, device: torch.device, params, reference, native_call,
         triton_call, *, lr: float, hypergrad_lr: float, dot_inputs) -> tuple[float, float]:
    """Dispatches one HD step; returns ``(h, new_lr)``."""
    if impl is Impl.NATIVE:
        tl.check_contiguous(op, "params", params)
        return native_call()
    if impl is Impl.TRITON:
        return triton_call()
    params, grads, directions, weight_decay, maximize = dot_inputs
    dot = hypergradient_dot(params, grads, directions, weight_decay=weight_decay,
                            maximize=maximize)
    new_lr = lr + hypergrad_lr * dot
    with torch.no_grad():
        reference(new_lr)
    return -dot, new_lr


def sgd_hd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    directions: Sequence[torch.Tensor],
    *,
    lr: float,
    hypergrad_lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> tuple[float, float]:
    """One SGD-HD step in place over a param group: updates the lr, then the params.

    Args:
        params: tensors to update, one device; float32/64, float16 or bfloat16.
        grads: their gradients.
        momentum_buffers: one per param when ``momentum`` is not 0, else None. On the first
            step their contents are ignored, as in torch.
        directions: one per param: the previous step's lr-free direction ``u_{t−1}`` (zeros
            before the first step); overwritten with ``u_t``.
        lr: α_{t−1}, the learning rate before this step.
        hypergrad_lr: β.
        weight_decay, momentum, dampening, nesterov, maximize: as in ``torch.optim.SGD``.
        first_step: the momentum buffers are new.
        impl: which implementation runs; see :mod:`fastmeta.backends`.

    Returns:
        ``(h, new_lr)``: the hypergradient ∂f/∂α and α_t = α_{t−1} − β·h, the lr this step
        used.
    """
    op = "sgd_hd_step_"
    device = _check_lists(op, params, {"grads": grads, "momentum_buffers": momentum_buffers,
                                        "directions": directions})
    lr = tl.check_scalar(op, "lr", lr)
    hypergrad_lr = tl.check_scalar(op, "hypergrad_lr", hypergrad_lr)
    weight_decay = tl.check_scalar(op, "weight_decay", weight_decay)
    momentum = tl.check_scalar(op, "momentum", momentum)
    dampening = tl.check_scalar(op, "dampening", dampening)
    check_sgd_hyperparameters(op, lr=abs(lr), momentum=momentum, dampening=dampening,
                              weight_decay=weight_decay, nesterov=nesterov)
    _check_hypergrad_lr(op, lr, hypergrad_lr)
    if momentum != 0.0 and momentum_buffers is None:
        raise ValueError(f"{op}: momentum is {momentum} but no momentum_buffers were given")
    buffers = list(momentum_buffers) if momentum != 0.0 else []
    which = backends.resolve(impl, device, op=op)
    grads_c = tl.contiguous_inputs(grads)
    flags = dict(weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                 nesterov=nesterov, maximize=maximize, first_step=first_step)

    def native_call():
        for name, tensors in (("momentum_buffers", buffers), ("directions", directions)):
            tl.check_contiguous(op, name, tensors)
        return backends.native().sgd_hd_step(
            tl.pointers(params), tl.pointers(grads_c), tl.pointers(buffers),
            tl.pointers(directions), tl.numels(params), tl.dtype_codes(params), lr=lr,
            hypergrad_lr=hypergrad_lr, **flags)

    def triton_call():
        return backends.triton_kernels("hypergrad").sgd_hd_step_(
            list(params), grads_c, buffers, list(directions), lr=lr, hypergrad_lr=hypergrad_lr,
            **flags)

    def reference(new_lr):
        _sgd_hd_reference_(params, grads, buffers, directions, lr=new_lr, **flags)

    return _run(op, which, device, params, reference, native_call, triton_call, lr=lr,
                hypergrad_lr=hypergrad_lr,
                dot_inputs=(params, grads, directions, weight_decay, maximize))


def adam_hd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float,
    hypergrad_lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> tuple[float, float]:
    """One Adam-HD step in place over a param group: updates the lr, then the params.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: as for :func:`fastmeta.ops.adam.adam_step_`.
        directions: the previous step's ``m̂/(√v̂ + ε)`` per param (zeros before the first
            step); overwritten with this step's.
        state_steps: one-element step counters, incremented in place.
        lr: α_{t−1}.
        hypergrad_lr: β.
        beta1, beta2, eps, weight_decay, maximize: as in ``torch.optim.Adam`` (L2 weight
            decay added to the gradient).
        impl: which implementation runs; see :mod:`fastmeta.backends`.

    Returns:
        ``(h, new_lr)`` as for :func:`sgd_hd_step_`.
    """
    op = "adam_hd_step_"
    device = _check_lists(op, params, {"grads": grads, "exp_avgs": exp_avgs,
                                        "exp_avg_sqs": exp_avg_sqs, "directions": directions})
    lr = tl.check_scalar(op, "lr", lr)
    hypergrad_lr = tl.check_scalar(op, "hypergrad_lr", hypergrad_lr)
    beta1 = tl.check_scalar(op, "beta1", beta1)
    beta2 = tl.check_scalar(op, "beta2", beta2)
    eps = tl.check_scalar(op, "eps", eps)
    weight_decay = tl.check_scalar(op, "weight_decay", weight_decay)
    for name, value, low, high in (("beta1", beta1, 0.0, 1.0), ("beta2", beta2, 0.0, 1.0)):
        if not low <= value < high:
            raise ValueError(f"{op}: Invalid {name} parameter: {value} (must be in [0, 1))")
    if eps < 0.0:
        raise ValueError(f"{op}: Invalid epsilon value: {eps}")
    if weight_decay < 0.0:
        raise ValueError(f"{op}: Invalid weight_decay value: {weight_decay}")
    _check_hypergrad_lr(op, lr, hypergrad_lr)
    step_dtype = tl.check_steps(op, state_steps, params)
    which = backends.resolve(impl, device, op=op)
    grads_c = tl.contiguous_inputs(grads)
    flags = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                 maximize=maximize)

    def native_call():
        for name, tensors in (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                              ("directions", directions)):
            tl.check_contiguous(op, name, tensors)
        tl.require_cpu_steps(op, state_steps)
        return backends.native().adam_hd_step(
            tl.pointers(params), tl.pointers(grads_c), tl.pointers(exp_avgs),
            tl.pointers(exp_avg_sqs), tl.pointers(directions), tl.pointers(state_steps),
            step_dtype, tl.numels(params), tl.dtype_codes(params), lr=lr,
            hypergrad_lr=hypergrad_lr, **flags)

    def triton_call():
        return backends.triton_kernels("hypergrad").adam_hd_step_(
            list(params), grads_c, list(exp_avgs), list(exp_avg_sqs), list(directions),
            list(state_steps), lr=lr, hypergrad_lr=hypergrad_lr, **flags)

    def reference(new_lr):
        _adam_hd_reference_(params, grads, exp_avgs, exp_avg_sqs, directions, state_steps,
                            lr=new_lr, **flags)

    return _run(op, which, device, params, reference, native_call, triton_call, lr=lr,
                hypergrad_lr=hypergrad_lr,
                dot_inputs=(params, grads, directions, weight_decay, maximize))
