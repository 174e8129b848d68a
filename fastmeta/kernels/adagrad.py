"""Triton kernel for the fused in-place Adagrad step; the maths is in :mod:`fastmeta.ops.adagrad`.

The decayed learning rate depends on each tensor's step count, so the launcher turns the
(already incremented) counters into a float64 table with torch ops, on the params' device, and
each program loads its tensor's entry: the counters are never read on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastmeta.kernels import tensor_table as tt

# Elements per program: a multiple of every warp count's vector width that keeps the three
# streams of one program (p, g and the sum of squares) in registers.
BLOCK_SIZE = 1024


@triton.jit
def _adagrad_kernel(
    param_addrs,  # int64[T]: address of each param
    grad_addrs,  # int64[T]: address of each grad
    state_sum_addrs,  # int64[T]: address of each sum of squared gradients
    clrs,  # float64[T]: lr / (1 + (t - 1) * lr_decay) of each tensor
    block_tensor,  # int64[B]: the tensor each program updates
    block_start,  # int64[B]: the first element of each program's block
    numels,  # int64[T]: elements of each tensor
    hyper,  # float64[2]: weight_decay, eps
    ELEM: tl.constexpr,  # storage type of every tensor of this launch
    COMPUTE: tl.constexpr,  # arithmetic type: fp64 for fp64, else fp32
    HAS_WEIGHT_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offsets = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numels + t)
    p_ptr = tl.load(param_addrs + t).to(tl.pointer_type(ELEM))
    g_ptr = tl.load(grad_addrs + t).to(tl.pointer_type(ELEM))
    s_ptr = tl.load(state_sum_addrs + t).to(tl.pointer_type(ELEM))
    p = tl.load(p_ptr + offsets, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offsets, mask=mask).to(COMPUTE)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + tl.load(hyper + 0).to(COMPUTE) * p
    s = tl.load(s_ptr + offsets, mask=mask).to(COMPUTE) + g * g
    tl.store(s_ptr + offsets, s.to(ELEM), mask=mask)
    denom = tt.sqrt_rn(s, COMPUTE) + tl.load(hyper + 1).to(COMPUTE)
    clr = tl.load(clrs + t).to(COMPUTE)
    p = p - clr * tt.div_rn(g, denom, COMPUTE)
    tl.store(p_ptr + offsets, p.to(ELEM), mask=mask)


def adagrad_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state_sums: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """Increments ``state_steps`` and launches :func:`_adagrad_kernel` once per dtype present
    in ``params`` (inputs validated by :func:`fastmeta.ops.adagrad.adagrad_step_`)."""
    device = params[0].device
    torch._foreach_add_(list(state_steps), 1)
    hyper = tt.hyper_table([weight_decay, eps], device)
    for dtype, idx in tt.group_by_dtype(len(params), [p.dtype for p in params]).items():
        sub_params = [params[i] for i in idx]
        block_tensor, block_start, numels = tt.block_table(
            [p.numel() for p in sub_params], BLOCK_SIZE, device
        )
        if block_tensor.numel() == 0:
            continue
        steps = tt.step_table([state_steps[i] for i in idx], device)
        _adagrad_kernel[(block_tensor.numel(),)](
            tt.address_table(sub_params, device),
            tt.address_table([grads[i] for i in idx], device),
            tt.address_table([state_sums[i] for i in idx], device),
            lr / (1.0 + (steps - 1.0) * lr_decay),
            block_tensor,
            block_start,
            numels,
            hyper,
            ELEM=tt.TRITON_DTYPES[dtype],
            COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
            HAS_WEIGHT_DECAY=weight_decay != 0.0,
            MAXIMIZE=maximize,
            BLOCK=BLOCK_SIZE,
        )
