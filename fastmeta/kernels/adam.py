"""Triton kernel for the fused in-place Adam/AdamW step; the maths is in :mod:`fastmeta.ops.adam`.

The bias corrections depend on each tensor's step count, so the launcher turns the (already
incremented) counters into two float64 tables with torch ops, on the params' device, and each
program loads its tensor's entries: the counters are never read on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastmeta.kernels import tensor_table as tt

# Elements per program: a multiple of every warp count's vector width that keeps the 5–7
# streams of one program (p, g, m, v and the amsgrad maximum) in registers.
BLOCK_SIZE = 1024


@triton.jit
def _adam_kernel(
    param_addrs,  # int64[T]: address of each param
    grad_addrs,  # int64[T]: address of each grad
    exp_avg_addrs,  # int64[T]: address of each first moment m
    exp_avg_sq_addrs,  # int64[T]: address of each second moment v
    max_exp_avg_sq_addrs,  # int64[T]: address of each running max of v (unused without amsgrad)
    step_sizes,  # float64[T]: lr / (1 - beta1^t) of each tensor
    bias_correction2_sqrts,  # float64[T]: sqrt(1 - beta2^t) of each tensor
    block_tensor,  # int64[B]: the tensor each program updates
    block_start,  # int64[B]: the first element of each program's block
    numels,  # int64[T]: elements of each tensor
    hyper,  # float64[6]: 1 - beta1, beta2, 1 - beta2, eps, weight_decay, 1 - lr * weight_decay
    ELEM: tl.constexpr,  # storage type of every tensor of this launch
    COMPUTE: tl.constexpr,  # arithmetic type: fp64 for fp64, else fp32
    AMSGRAD: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    DECOUPLED_WEIGHT_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offsets = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numels + t)
    p_ptr = tl.load(param_addrs + t).to(tl.pointer_type(ELEM))
    g_ptr = tl.load(grad_addrs + t).to(tl.pointer_type(ELEM))
    m_ptr = tl.load(exp_avg_addrs + t).to(tl.pointer_type(ELEM))
    v_ptr = tl.load(exp_avg_sq_addrs + t).to(tl.pointer_type(ELEM))
    one_minus_beta1 = tl.load(hyper + 0).to(COMPUTE)
    beta2 = tl.load(hyper + 1).to(COMPUTE)
    one_minus_beta2 = tl.load(hyper + 2).to(COMPUTE)
    eps = tl.load(hyper + 3).to(COMPUTE)
    p = tl.load(p_ptr + offsets, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offsets, mask=mask).to(COMPUTE)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        if DECOUPLED_WEIGHT_DECAY:
            p = p * tl.load(hyper + 5).to(COMPUTE)
        else:
            g = g + tl.load(hyper + 4).to(COMPUTE) * p
    m = tl.load(m_ptr + offsets, mask=mask).to(COMPUTE)
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * tl.load(v_ptr + offsets, mask=mask).to(COMPUTE) + one_minus_beta2 * (g * g)
    tl.store(m_ptr + offsets, m.to(ELEM), mask=mask)
    tl.store(v_ptr + offsets, v.to(ELEM), mask=mask)
    v_hat = v
    if AMSGRAD:
        vmax_ptr = tl.load(max_exp_avg_sq_addrs + t).to(tl.pointer_type(ELEM))
        previous = tl.load(vmax_ptr + offsets, mask=mask).to(COMPUTE)
        v_hat = tl.maximum(previous, v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(vmax_ptr + offsets, v_hat.to(ELEM), mask=mask)
    bc2_sqrt = tl.load(bias_correction2_sqrts + t).to(COMPUTE)
    denom = tt.div_rn(tt.sqrt_rn(v_hat, COMPUTE), bc2_sqrt, COMPUTE) + eps
    step_size = tl.load(step_sizes + t).to(COMPUTE)
    p = p - step_size * tt.div_rn(m, denom, COMPUTE)
    tl.store(p_ptr + offsets, p.to(ELEM), mask=mask)


def adam_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """Increments ``state_steps`` and launches :func:`_adam_kernel` once per dtype present in
    ``params`` (inputs validated by :func:`fastmeta.ops.adam.adam_step_`)."""
    device = params[0].device
    torch._foreach_add_(list(state_steps), 1)
    hyper = tt.hyper_table(
        [1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay, 1.0 - lr * weight_decay], device
    )
    for dtype, idx in tt.group_by_dtype(len(params), [p.dtype for p in params]).items():
        sub_params = [params[i] for i in idx]
        block_tensor, block_start, numels = tt.block_table(
            [p.numel() for p in sub_params], BLOCK_SIZE, device
        )
        if block_tensor.numel() == 0:
            continue
        steps = tt.step_table([state_steps[i] for i in idx], device)
        _adam_kernel[(block_tensor.numel(),)](
            tt.address_table(sub_params, device),
            tt.address_table([grads[i] for i in idx], device),
            tt.address_table([exp_avgs[i] for i in idx], device),
            tt.address_table([exp_avg_sqs[i] for i in idx], device),
            tt.address_table([max_exp_avg_sqs[i] for i in idx] if amsgrad else [], device),
            lr / (1.0 - beta1**steps),
            torch.sqrt(1.0 - beta2**steps),
            block_tensor,
            block_start,
            numels,
            hyper,
            ELEM=tt.TRITON_DTYPES[dtype],
            COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
            AMSGRAD=amsgrad,
            HAS_WEIGHT_DECAY=weight_decay != 0.0,
            DECOUPLED_WEIGHT_DECAY=decoupled_weight_decay,
            MAXIMIZE=maximize,
            BLOCK=BLOCK_SIZE,
        )
