"""Triton kernel for the fused in-place SGD step; the maths is in :mod:`fastmeta.ops.sgd`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastmeta.kernels import tensor_table as tt

# Elements per program: 1024 is a multiple of every warp count's vector width and keeps a
# program's working set in registers for the 3–5 streams of this kernel.
BLOCK_SIZE = 1024


@triton.jit
def _sgd_kernel(
    param_addrs,  # int64[T]: address of each param
    grad_addrs,  # int64[T]: address of each grad
    buffer_addrs,  # int64[T]: address of each momentum buffer (unused without momentum)
    block_tensor,  # int64[B]: the tensor each program updates
    block_start,  # int64[B]: the first element of each program's block
    numels,  # int64[T]: elements of each tensor
    hyper,  # float64[4]: lr, weight_decay, momentum, dampening
    ELEM: tl.constexpr,  # storage type of every tensor of this launch
    COMPUTE: tl.constexpr,  # arithmetic type: fp64 for fp64, else fp32
    HAS_MOMENTUM: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offsets = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numels + t)
    p_ptr = tl.load(param_addrs + t).to(tl.pointer_type(ELEM))
    g_ptr = tl.load(grad_addrs + t).to(tl.pointer_type(ELEM))
    lr = tl.load(hyper + 0).to(COMPUTE)
    p = tl.load(p_ptr + offsets, mask=mask).to(COMPUTE)
    d = tl.load(g_ptr + offsets, mask=mask).to(COMPUTE)
    if MAXIMIZE:
        d = -d
    if HAS_WEIGHT_DECAY:
        d = d + tl.load(hyper + 1).to(COMPUTE) * p
    if HAS_MOMENTUM:
        b_ptr = tl.load(buffer_addrs + t).to(tl.pointer_type(ELEM))
        mu = tl.load(hyper + 2).to(COMPUTE)
        if FIRST_STEP:
            b = d
        else:
            keep = 1.0 - tl.load(hyper + 3).to(COMPUTE)
            b = mu * tl.load(b_ptr + offsets, mask=mask).to(COMPUTE) + keep * d
        tl.store(b_ptr + offsets, b.to(ELEM), mask=mask)
        if NESTEROV:
            d = d + mu * b
        else:
            d = b
    tl.store(p_ptr + offsets, (p - lr * d).to(ELEM), mask=mask)


def sgd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> None:
    """Launches :func:`_sgd_kernel` once per dtype present in ``params`` (inputs validated by
    :func:`fastmeta.ops.sgd.sgd_step_`)."""
    device = params[0].device
    hyper = tt.hyper_table([lr, weight_decay, momentum, dampening], device)
    for dtype, idx in tt.group_by_dtype(len(params), [p.dtype for p in params]).items():
        sub_params = [params[i] for i in idx]
        block_tensor, block_start, numels = tt.block_table(
            [p.numel() for p in sub_params], BLOCK_SIZE, device
        )
        if block_tensor.numel() == 0:
            continue
        _sgd_kernel[(block_tensor.numel(),)](
            tt.address_table(sub_params, device),
            tt.address_table([grads[i] for i in idx], device),
            tt.address_table([momentum_buffers[i] for i in idx] if momentum_buffers else [], device),
            block_tensor,
            block_start,
            numels,
            hyper,
            ELEM=tt.TRITON_DTYPES[dtype],
            COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
            HAS_MOMENTUM=bool(momentum_buffers),
            HAS_WEIGHT_DECAY=weight_decay != 0.0,
            NESTEROV=nesterov,
            MAXIMIZE=maximize,
            FIRST_STEP=first_step,
            BLOCK=BLOCK_SIZE,
        )
