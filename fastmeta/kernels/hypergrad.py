"""Triton kernels for SGD-HD and Adam-HD; the maths is in :mod:`fastmeta.ops.hypergrad`.

A step is two launches per dtype present in the group: a reduction that writes each program's
partial Σ d·u_{t−1} (float64) to its own slot, summed on the device in a fixed order, and the
update with the new learning rate (for SGD-HD, the SGD kernel storing its direction). The new
lr is needed on the host (it is the param group's ``lr``), so each step synchronises once to
read it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastmeta.kernels import sgd as sgd_kernels
from fastmeta.kernels import tensor_table as tt

# Elements per program: as the other in-place kernels (4–8 streams per program).
BLOCK_SIZE = 1024


@triton.jit
def _hd_dot_kernel(
    param_addrs,  # int64[T] (read only with weight decay)
    grad_addrs,  # int64[T]
    direction_addrs,  # int64[T]: u_{t−1}
    block_tensor, block_start, numels,  # the block table (tensor_table.block_table)
    partial,  # float64[B]: this launch's per-program sums
    hyper,  # float64[1]: weight_decay
    ELEM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, offsets, mask = tt.program_block(block_tensor, block_start, numels, BLOCK)
    g_ptr = tl.load(grad_addrs + t).to(tl.pointer_type(ELEM))
    u_ptr = tl.load(direction_addrs + t).to(tl.pointer_type(ELEM))
    d = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    if MAXIMIZE:
        d = -d
    if HAS_WEIGHT_DECAY:
        p_ptr = tl.load(param_addrs + t).to(tl.pointer_type(ELEM))
        d = d + tl.load(hyper).to(tl.float64) * tl.load(p_ptr + offsets, mask=mask,
                                                         other=0.0).to(tl.float64)
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    tl.store(partial + tl.program_id(0), tl.sum(d * u, axis=0))


@triton.jit
def _adam_hd_kernel(
    param_addrs, grad_addrs, exp_avg_addrs, exp_avg_sq_addrs, direction_addrs,
    inv_bias_correction1s,  # float64[T]: 1 / (1 − β1^t) of each tensor
    inv_bias_correction2_sqrts,  # float64[T]: 1 / √(1 − β2^t) of each tensor
    block_tensor, block_start, numels,
    hyper,  # float64[6]: lr (the new α_t), 1 − β1, β2, 1 − β2, eps, weight_decay
    ELEM: tl.constexpr, COMPUTE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    t, offsets, mask = tt.program_block(block_tensor, block_start, numels, BLOCK)
    p_ptr = tl.load(param_addrs + t).to(tl.pointer_type(ELEM))
    g_ptr = tl.load(grad_addrs + t).to(tl.pointer_type(ELEM))
    m_ptr = tl.load(exp_avg_addrs + t).to(tl.pointer_type(ELEM))
    v_ptr = tl.load(exp_avg_sq_addrs + t).to(tl.pointer_type(ELEM))
    u_ptr = tl.load(direction_addrs + t).to(tl.pointer_type(ELEM))
    lr = tl.load(hyper + 0).to(COMPUTE)
    p = tl.load(p_ptr + offsets, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offsets, mask=mask).to(COMPUTE)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + tl.load(hyper + 5).to(COMPUTE) * p
    m = tl.load(m_ptr + offsets, mask=mask).to(COMPUTE)
    m = m + tl.load(hyper + 1).to(COMPUTE) * (g - m)
    v = (tl.load(hyper + 2).to(COMPUTE) * tl.load(v_ptr + offsets, mask=mask).to(COMPUTE)
         + tl.load(hyper + 3).to(COMPUTE) * (g * g))
    tl.store(m_ptr + offsets, m.to(ELEM), mask=mask)
    tl.store(v_ptr + offsets, v.to(ELEM), mask=mask)
    inv_bc1 = tl.load(inv_bias_correction1s + t).to(COMPUTE)
    inv_bc2_sqrt = tl.load(inv_bias_correction2_sqrts + t).to(COMPUTE)
    denom = tt.sqrt_rn(v, COMPUTE) * inv_bc2_sqrt + tl.load(hyper + 4).to(COMPUTE)
    direction = tt.div_rn(m * inv_bc1, denom, COMPUTE)
    tl.store(u_ptr + offsets, direction.to(ELEM), mask=mask)
    tl.store(p_ptr + offsets, (p - lr * direction).to(ELEM), mask=mask)


def _launches(params: Sequence[torch.Tensor]):
    """``(dtype, indices, block tables)`` per dtype present, skipping empty launches."""
    device = params[0].device
    for dtype, idx in tt.group_by_dtype(len(params), [p.dtype for p in params]).items():
        tables = tt.block_table([params[i].numel() for i in idx], BLOCK_SIZE, device)
        if tables[0].numel():
            yield dtype, idx, tables


def _dot(params, grads, directions, *, weight_decay: float, maximize: bool) -> float:
    """Σ d·u_{t−1} over the group: per-program float64 partials, summed in a fixed order."""
    device = params[0].device
    hyper = tt.hyper_table([weight_decay], device)
    partials = []
    for dtype, idx, (block_tensor, block_start, numels) in _launches(params):
        partial = torch.empty(block_tensor.numel(), dtype=torch.float64, device=device)
        _hd_dot_kernel[(block_tensor.numel(),)](
            tt.address_table([params[i] for i in idx], device),
            tt.address_table([grads[i] for i in idx], device),
            tt.address_table([directions[i] for i in idx], device),
            block_tensor, block_start, numels, partial, hyper,
            ELEM=tt.TRITON_DTYPES[dtype], HAS_WEIGHT_DECAY=weight_decay != 0.0,
            MAXIMIZE=maximize, BLOCK=BLOCK_SIZE,
        )
        partials.append(partial)
    if not partials:
        return 0.0
    return float(torch.cat(partials).sum())  # the one host sync of a step


def sgd_hd_step_(params, grads, momentum_buffers, directions, *, lr: float, hypergrad_lr: float,
                 weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                 maximize: bool, first_step: bool) -> tuple[float, float]:
    """Returns ``(h, new lr)``, h = −Σ d·u_{t−1} (inputs validated by
    :func:`fastmeta.ops.hypergrad.sgd_hd_step_`)."""
    if not params:
        return -0.0, lr
    dot = _dot(params, grads, directions, weight_decay=weight_decay, maximize=maximize)
    new_lr = lr + hypergrad_lr * dot
    sgd_kernels.sgd_step_(params, grads, momentum_buffers, lr=new_lr, weight_decay=weight_decay,
                          momentum=momentum, dampening=dampening, nesterov=nesterov,
                          maximize=maximize, first_step=first_step, directions=directions)
    return -dot, new_lr


def adam_hd_step_(params, grads, exp_avgs, exp_avg_sqs, directions, state_steps, *, lr: float,
                  hypergrad_lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, maximize: bool) -> tuple[float, float]:
    """Increments ``state_steps``; returns ``(h, new lr)``, h = −Σ d·u_{t−1} (inputs validated by
    :func:`fastmeta.ops.hypergrad.adam_hd_step_`)."""
    if not params:
        return -0.0, lr
    device = params[0].device
    torch._foreach_add_(list(state_steps), 1)
    dot = _dot(params, grads, directions, weight_decay=weight_decay, maximize=maximize)
    new_lr = lr + hypergrad_lr * dot
    hyper = tt.hyper_table([new_lr, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay], device)
    for dtype, idx, (block_tensor, block_start, numels) in _launches(params):
        steps = tt.step_table([state_steps[i] for i in idx], device)
        _adam_hd_kernel[(block_tensor.numel(),)](
            tt.address_table([params[i] for i in idx], device),
            tt.address_table([grads[i] for i in idx], device),
            tt.address_table([exp_avgs[i] for i in idx], device),
            tt.address_table([exp_avg_sqs[i] for i in idx], device),
            tt.address_table([directions[i] for i in idx], device),
            1.0 / (1.0 - beta1**steps),
            1.0 / torch.sqrt(1.0 - beta2**steps),
            block_tensor, block_start, numels, hyper,
            ELEM=tt.TRITON_DTYPES[dtype],
            COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
            HAS_WEIGHT_DECAY=weight_decay != 0.0, MAXIMIZE=maximize, BLOCK=BLOCK_SIZE,
        )
    return -dot, new_lr
