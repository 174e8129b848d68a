"""SGD with momentum, dampening and Nesterov momentum: the reference and the in-place op.

.. math::
    \\begin{aligned}
    d_t &= \\pm g_t + \\lambda \\theta_{t-1} \\\\
    b_t &= d_t \\ \\text{(first step)}, \\qquad b_t = \\mu b_{t-1} + (1-\\tau) d_t \\
        \\text{(later)} \\\\
    d_t &\\leftarrow d_t + \\mu b_t \\ \\text{(Nesterov)}, \\qquad d_t \\leftarrow b_t \\
        \\text{(momentum)} \\\\
    \\theta_t &= \\theta_{t-1} - \\gamma d_t
    \\end{aligned}

with learning rate γ, weight decay λ, momentum μ and dampening τ, exactly as
``torch.optim.SGD`` defines it (Sutskever et al. 2013 for the Nesterov form).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmeta import backends
from fastmeta._autograd import Function
from fastmeta.backends import Impl
from fastmeta.ops import tensor_lists as tl


def sgd_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None = None,
    *,
    lr: float | torch.Tensor,
    weight_decay: float | torch.Tensor = 0.0,
    momentum: float | torch.Tensor = 0.0,
    dampening: float | torch.Tensor = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SGD step in plain, differentiable PyTorch: the spec the kernels are tested against.

    Out of place. Hyperparameters may be numbers or tensors that broadcast against ``param``.

    Returns:
        ``(new_param, new_momentum_buffer)``; the buffer is None when ``momentum`` is 0.
    """
    d = -grad if maximize else grad
    if not tl.is_zero(weight_decay):
        d = d + weight_decay * param
    new_buffer = None
    if not tl.is_zero(momentum):
        if first_step:
            new_buffer = d
        else:
            if momentum_buffer is None:
                raise ValueError(
                    "sgd_step_reference: momentum_buffer is needed after the first step")
            new_buffer = momentum * momentum_buffer + (1 - dampening) * d
        d = d + momentum * new_buffer if nesterov else new_buffer
    return param - lr * d, new_buffer


def check_sgd_hyperparameters(
    op: str, *, lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool
) -> None:
    """torch.optim.SGD's rules for valid hyperparameters, with its messages."""
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def sgd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None = None,
    *,
    lr: float | torch.Tensor,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> None:
    """Updates ``params`` (and the momentum buffers) in place with one fused call.

    Args:
        params: tensors to update, all on one device; float32/64, float16 or bfloat16.
        grads: their gradients, same shapes and dtypes.
        momentum_buffers: one buffer per param; needed when ``momentum`` is not 0. On the
            first step their contents are ignored and overwritten, as torch does.
        lr, weight_decay, momentum, dampening, nesterov, maximize: as in ``torch.optim.SGD``.
        first_step: the buffers are new (torch's ``momentum_buffer is None``).
        impl: which implementation runs; see :mod:`fastmeta.backends`.

    Example:
        >>> p, g = torch.ones(3), torch.full((3,), 0.5)
        >>> sgd_step_([p], [g], lr=0.1)
        >>> p
        tensor([0.9500, 0.9500, 0.9500])
    """
    op = "sgd_step_"
    device = tl.check_params(op, params)
    tl.check_like_params(op, "grads", grads, params)
    lr = tl.check_scalar(op, "lr", lr)
    weight_decay = tl.check_scalar(op, "weight_decay", weight_decay)
    momentum = tl.check_scalar(op, "momentum", momentum)
    dampening = tl.check_scalar(op, "dampening", dampening)
    check_sgd_hyperparameters(
        op, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov,
    )
    buffers: Sequence[torch.Tensor] = []
    if momentum != 0.0:
        if momentum_buffers is None:
            raise ValueError(f"{op}: momentum_buffers is required when momentum != 0")
        tl.check_like_params(op, "momentum_buffers", momentum_buffers, params)
        buffers = momentum_buffers
    hyper = dict(
        lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening,
        nesterov=nesterov, maximize=maximize, first_step=first_step,
    )
    which = backends.resolve(impl, device, op=op)
    if len(params) == 0:
        return
    if which is Impl.REFERENCE:
        _sgd_step_reference_(params, grads, buffers, **hyper)
        return
    tl.check_contiguous(op, "params", params)
    tl.check_contiguous(op, "momentum_buffers", buffers)
    grads = tl.contiguous_inputs(grads)
    if which is Impl.NATIVE:
        backends.native().sgd_step(
            tl.pointers(params), tl.pointers(grads), tl.pointers(buffers),
            tl.numels(params), tl.dtype_codes(params), **hyper,
        )
    else:
        backends.triton_kernels("sgd").sgd_step_(params, grads, buffers, **hyper)


@torch.no_grad()
def _sgd_step_reference_(params, grads, buffers, **hyper) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        compute = tl.compute_dtype(p.dtype)
        b = buffers[i].to(compute) if buffers else None
        new_p, new_b = sgd_step_reference(p.to(compute), g.to(compute), b, **hyper)
        p.copy_(new_p)
        if new_b is not None:
            buffers[i].copy_(new_b)


# ---- Out-of-place, task-batched, differentiable step ---------------------------------------


class _SgdRule(tl.StepRule):
    name = "sgd"
    state_names = ("momentum_buffer",)
    hyper_names = ("lr", "weight_decay", "momentum", "dampening")

    def out_states(self, cfg):
        return ("momentum_buffer",) if cfg.flags["has_momentum"] else ()

    def flags(self, cfg):
        f = cfg.flags
        return ((tl.FLAG_MAXIMIZE if f["maximize"] else 0)
                | (tl.FLAG_NESTEROV if f["nesterov"] else 0)
                | (tl.FLAG_FIRST_STEP if not cfg.states[0] else 0)
                | (tl.FLAG_MOMENTUM if f["has_momentum"] else 0)
                | (tl.FLAG_WEIGHT_DECAY if cfg.needs_param else 0))

    def reference(self, cfg, param, grad, states, hyper):
        f = cfg.flags
        momentum = hyper["momentum"] if f["has_momentum"] else 0.0
        new_p, new_b = sgd_step_reference(
            param, grad, states.get("momentum_buffer"), lr=hyper["lr"],
            weight_decay=hyper["weight_decay"], momentum=momentum,
            dampening=hyper["dampening"], nesterov=f["nesterov"], maximize=f["maximize"],
            first_step="momentum_buffer" not in states,
        )
        return new_p, ({"momentum_buffer": new_b} if new_b is not None else {})


SGD_RULE = _SgdRule()


class SgdFunction(Function):
    """One fused, differentiable SGD/momentum step on ``[N]`` or ``[T, N]`` buffers.

    Inputs: ``(cfg, param, grad, momentum_buffer, *tensor_hyperparameters)``; outputs
    ``(param, [momentum_buffer])``. See :mod:`fastmeta.ops.tensor_lists` for what is saved.
    """

    @staticmethod
    def forward(cfg, param, grad, *rest):
        states, hypers = tl.split_inputs(SGD_RULE, rest)
        return tl.step_forward(SGD_RULE, cfg, param, grad, states, hypers)

    @staticmethod
    def setup_context(ctx, inputs, output):
        tl.step_setup_context(SGD_RULE, ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grad_outputs):
        # With p̄' = ∂L/∂θ', b̄' = ∂L/∂b' (zero when absent), s = ±1 (maximize) and u the update
        # (θ' = θ − γu):
        #   ū = −γ p̄',  γ̄ = −Σ p̄'·u
        #   momentum:  b̄'' = b̄' + (μū if Nesterov else ū)
        #              d̄ = (ū if Nesterov) + (b̄'' first step, (1−τ)b̄'' later)
        #              b̄ = μ b̄'',  μ̄ = Σ (Nesterov ? ū·b' : 0) + b̄''·b,  τ̄ = −Σ b̄''·d
        #   plain:     d̄ = ū
        #   θ̄ = p̄' + λ d̄,  ḡ = s d̄,  λ̄ = Σ d̄·θ
        return tl.step_backward(SGD_RULE, ctx, grad_outputs)

    @staticmethod
    def vmap(info, in_dims, cfg, *args):
        return tl.step_vmap(SgdFunction, SGD_RULE, info, in_dims, cfg, *args)


def _check_sgd_step_args(op: str, *, lr, weight_decay, momentum, dampening, nesterov: bool,
                         momentum_buffer: torch.Tensor | None) -> bool:
    """The out-of-place step's rules for its hyperparameters (numbers must be >= 0; Nesterov
    needs a momentum and no dampening; a buffer needs a momentum), with ``op`` in the
    messages. Returns whether there is a momentum. Tensor values are checked by the callers'
    reparametrizations, not here (reading them would sync a GPU)."""
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
        if not isinstance(value, torch.Tensor) and value < 0.0:
            raise ValueError(f"{op}: {name} must be >= 0, got {value}")
    has_momentum = not tl.is_zero(momentum)
    if nesterov and (not has_momentum or not tl.is_zero(dampening)):
        raise ValueError(f"{op}: Nesterov momentum requires a momentum and zero dampening")
    if momentum_buffer is not None and not has_momentum:
        raise ValueError(f"{op}: momentum_buffer was given but momentum is 0")
    return has_momentum


def _sgd_step_inputs(momentum_buffer, *, lr, weight_decay, momentum, dampening, nesterov,
                     maximize, has_momentum) -> tuple[dict, dict, dict]:
    """The ``(states, hypers, flags)`` of one SGD step, as :func:`tl.prepare_step` and
    :func:`tl.run_step` take them."""
    return ({"momentum_buffer": momentum_buffer},
            dict(lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening),
            dict(nesterov=nesterov, maximize=maximize, has_momentum=has_momentum))


def prepare_sgd_step(op: str, param: torch.Tensor, grad: torch.Tensor,
                     momentum_buffer: torch.Tensor | None, *, lr, weight_decay=0.0, momentum=0.0,
                     dampening=0.0, nesterov: bool = False, maximize: bool = False,
                     impl: Impl | str = Impl.AUTO) -> tuple[tl.StepConfig, list]:
    """What :func:`sgd_step` checks and resolves before its kernels run, for a caller that
    runs the fused kernels itself (:class:`tl.StepKernels`), e.g. many steps with the same
    hyperparameters: ``(cfg, tensor_hypers)`` as :func:`tl.prepare_step` returns them, with
    ``op`` in the messages."""
    has_momentum = _check_sgd_step_args(op, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                        dampening=dampening, nesterov=nesterov,
                                        momentum_buffer=momentum_buffer)
    return tl.prepare_step(SGD_RULE, op, impl, param, grad, *_sgd_step_inputs(
        momentum_buffer, lr=lr, weight_decay=weight_decay, momentum=momentum,
        dampening=dampening, nesterov=nesterov, maximize=maximize, has_momentum=has_momentum))


def sgd_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None = None,
    *,
    lr: float | torch.Tensor,
    weight_decay: float | torch.Tensor = 0.0,
    momentum: float | torch.Tensor = 0.0,
    dampening: float | torch.Tensor = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One out-of-place, differentiable SGD/momentum step on an ``[N]`` or ``[T, N]`` buffer.

    Args:
        param, grad: ``[N]`` or ``[T, N]`` tensors of one dtype and device.
        momentum_buffer: shaped like ``param``; None on the first momentum step.
        lr: a number, a () tensor, ``[T]`` (per task), or ``[N]``/``[T, N]`` (per element).
        weight_decay, momentum, dampening: numbers, () tensors or ``[T]`` tensors.
        nesterov, maximize: as in ``torch.optim.SGD``.
        impl: which implementation runs; see :mod:`fastmeta.backends`.

    Returns:
        ``(new_param, new_momentum_buffer)``; the buffer is None when ``momentum`` is 0.
    """
    op = "sgd_step"
    has_momentum = _check_sgd_step_args(op, lr=lr, weight_decay=weight_decay,
                                        momentum=momentum, dampening=dampening,
                                        nesterov=nesterov, momentum_buffer=momentum_buffer)
    if (not has_momentum and not isinstance(lr, torch.Tensor) and tl.is_zero(weight_decay)
            and backends.is_auto(impl)):
        # Plain gradient descent with a number lr: θ − lr·(±g) is one torch.add, already a
        # single pass over memory (2 reads, 1 write, as the fused kernel) and differentiable
        # to any order by autograd. The custom Function around the kernel would only add its
        # fixed cost: ~175 µs per step (forward + backward) on CAVIA's [25, 5] context here.
        # The fused kernels take over when there is something to fuse (momentum, weight
        # decay, a tensor, per-task or per-element lr) or when an implementation is asked for.
        tl.check_batched_param(op, param)
        tl.check_batched_like(op, "grads", grad, param)
        lr = tl.batched_hyper(op, "lr", lr, param, per_element=True)
        backends.note(op, Impl.REFERENCE)
        return torch.add(param, grad, alpha=lr if maximize else -lr), None
    new_p, states = tl.run_step(SgdFunction, SGD_RULE, op, impl, param, grad, *_sgd_step_inputs(
        momentum_buffer, lr=lr, weight_decay=weight_decay, momentum=momentum,
        dampening=dampening, nesterov=nesterov, maximize=maximize, has_momentum=has_momentum))
    return new_p, states.get("momentum_buffer")
