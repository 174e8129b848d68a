"""Triton kernel for the fused in-place RMSprop step; the maths is in
:mod:`fastmeta.ops.rmsprop`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastmeta.kernels import tensor_table as tt

# Elements per program: a multiple of every warp count's vector width that keeps the 3–5
# streams of one program (p, g, the square average, momentum and grad average) in registers.
BLOCK_SIZE = 1024


@triton.jit
def _rmsprop_kernel(
    param_addrs,  # int64[T]: address of each param
    grad_addrs,  # int64[T]: address of each grad
    square_avg_addrs,  # int64[T]: address of each running average of g²
    momentum_buffer_addrs,  # int64[T]: address of each momentum buffer (unused without momentum)
    grad_avg_addrs,  # int64[T]: address of each running average of g (unused unless centered)
    block_tensor,  # int64[B]: the tensor each program updates
    block_start,  # int64[B]: the first element of each program's block
    numels,  # int64[T]: elements of each tensor
    hyper,  # float64[6]: lr, alpha, 1 - alpha, eps, weight_decay, momentum
    ELEM: tl.constexpr,  # storage type of every tensor of this launch
    COMPUTE: tl.constexpr,  # arithmetic type: fp64 for fp64, else fp32
    HAS_MOMENTUM: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    CENTERED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offsets = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numels + t)
    p_ptr = tl.load(param_addrs + t).to(tl.pointer_type(ELEM))
    g_ptr = tl.load(grad_addrs + t).to(tl.pointer_type(ELEM))
    v_ptr = tl.load(square_avg_addrs + t).to(tl.pointer_type(ELEM))
    lr = tl.load(hyper + 0).to(COMPUTE)
    alpha = tl.load(hyper + 1).to(COMPUTE)
    one_minus_alpha = tl.load(hyper + 2).to(COMPUTE)
    eps = tl.load(hyper + 3).to(COMPUTE)
    p = tl.load(p_ptr + offsets, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offsets, mask=mask).to(COMPUTE)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + tl.load(hyper + 4).to(COMPUTE) * p
    v = alpha * tl.load(v_ptr + offsets, mask=mask).to(COMPUTE) + one_minus_alpha * (g * g)
    tl.store(v_ptr + offsets, v.to(ELEM), mask=mask)
    if CENTERED:
        a_ptr = tl.load(grad_avg_addrs + t).to(tl.pointer_type(ELEM))
        a = tl.load(a_ptr + offsets, mask=mask).to(COMPUTE)
        a = a + one_minus_alpha * (g - a)
        tl.store(a_ptr + offsets, a.to(ELEM), mask=mask)
        denom = tt.sqrt_rn(v - a * a, COMPUTE) + eps
    else:
        denom = tt.sqrt_rn(v, COMPUTE) + eps
    if HAS_MOMENTUM:
        b_ptr = tl.load(momentum_buffer_addrs + t).to(tl.pointer_type(ELEM))
        mu = tl.load(hyper + 5).to(COMPUTE)
        b = mu * tl.load(b_ptr + offsets, mask=mask).to(COMPUTE) + tt.div_rn(g, denom, COMPUTE)
        tl.store(b_ptr + offsets, b.to(ELEM), mask=mask)
        p = p - lr * b
    else:
        p = p - lr * tt.div_rn(g, denom, COMPUTE)
    tl.store(p_ptr + offsets, p.to(ELEM), mask=mask)


def rmsprop_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    square_avgs: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    grad_avgs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None:
    """Increments ``state_steps`` and launches :func:`_rmsprop_kernel` once per dtype present
    in ``params`` (inputs validated by :func:`fastmeta.ops.rmsprop.rmsprop_step_`)."""
    device = params[0].device
    torch._foreach_add_(list(state_steps), 1)
    hyper = tt.hyper_table([lr, alpha, 1.0 - alpha, eps, weight_decay, momentum], device)
    for dtype, idx in tt.group_by_dtype(len(params), [p.dtype for p in params]).items():
        sub_params = [params[i] for i in idx]
        block_tensor, block_start, numels = tt.block_table(
            [p.numel() for p in sub_params], BLOCK_SIZE, device
        )
        if block_tensor.numel() == 0:
            continue
        _rmsprop_kernel[(block_tensor.numel(),)](
            tt.address_table(sub_params, device),
            tt.address_table([grads[i] for i in idx], device),
            tt.address_table([square_avgs[i] for i in idx], device),
            tt.address_table([momentum_buffers[i] for i in idx] if momentum_buffers else [],
                             device),
            tt.address_table([grad_avgs[i] for i in idx] if centered else [], device),
            block_tensor,
            block_start,
            numels,
            hyper,
            ELEM=tt.TRITON_DTYPES[dtype],
            COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
            HAS_MOMENTUM=bool(momentum_buffers),
            HAS_WEIGHT_DECAY=weight_decay != 0.0,
            CENTERED=centered,
            MAXIMIZE=maximize,
            BLOCK=BLOCK_SIZE,
        )
