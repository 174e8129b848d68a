"""Triton kernel for the fused in-place SGD step; the maths is in :mod:`fastmeta.ops.sgd`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastmeta.kernels import tensor_table as tt
from fastmeta.ops import tensor_lists as ops_tl

# Elements per program: 1024 is a multiple of every warp count's vector width and keeps a
# program's working set in registers for the 3–5 streams of this kernel.
BLOCK_SIZE = 1024


@triton.jit
def _sgd_kernel(
    param_addrs,  # int64[T]: address of each param
    grad_addrs,  # int64[T]: address of each grad
    buffer_addrs,  # int64[T]: address of each momentum buffer (unused without momentum)
    direction_addrs,  # int64[T]: SGD-HD's u_t, the lr-free direction (unused unless DIRECTION)
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
    DIRECTION: tl.constexpr,  # also store the step's direction (fastmeta/kernels/hypergrad.py)
    BLOCK: tl.constexpr,
):
    t, offsets, mask = tt.program_block(block_tensor, block_start, numels, BLOCK)
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
    if DIRECTION:
        u_ptr = tl.load(direction_addrs + t).to(tl.pointer_type(ELEM))
        tl.store(u_ptr + offsets, d.to(ELEM), mask=mask)
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
    directions: Sequence[torch.Tensor] | None = None,
) -> None:
    """Launches :func:`_sgd_kernel` once per dtype present in ``params`` (inputs validated by
    :func:`fastmeta.ops.sgd.sgd_step_`). ``directions`` (SGD-HD) receive each step's
    lr-free direction."""
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
            tt.address_table([momentum_buffers[i] for i in idx] if momentum_buffers else [],
                             device),
            tt.address_table([directions[i] for i in idx] if directions else [], device),
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
            DIRECTION=bool(directions),
            BLOCK=BLOCK_SIZE,
        )


# ---- Out-of-place, task-batched, differentiable step (fastmeta/ops/sgd.py: SgdFunction) -----
# The VJP is written out in SgdFunction.backward; see tensor_table for the [T, N] launch layout.

# Columns per program of the batched kernels: the loop over tasks keeps ~8 streams live.
BATCHED_BLOCK = 512


@triton.jit
def _sgd_batched_forward_kernel(
    param,  # [T, N] θ (unused unless HAS_PARAM)
    grad,  # [T, N] g
    buf,  # [T, N] momentum buffer b (unused on the first step)
    param_out,  # [T, N] θ' (unused unless WANT_PARAM)
    buf_out,  # [T, N] b' (unused without momentum)
    hyper,  # float64 [4, T]: lr, weight_decay, momentum, dampening per task
    lr,  # per-element lr, [N] or [T, N] (unused unless HAS_LR)
    tasks, numel, lr_stride,
    COMPUTE: tl.constexpr, HAS_PARAM: tl.constexpr, WANT_PARAM: tl.constexpr,
    HAS_LR: tl.constexpr, MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < numel
    for t in range(tasks):
        offs = tl.cast(t, tl.int64) * numel + cols
        wd = tl.load(hyper + 1 * tasks + t).to(COMPUTE)
        mu = tl.load(hyper + 2 * tasks + t).to(COMPUTE)
        keep = 1.0 - tl.load(hyper + 3 * tasks + t).to(COMPUTE)
        if HAS_LR:
            lr_t = tl.load(lr + tl.cast(t, tl.int64) * lr_stride + cols, mask=mask).to(COMPUTE)
        else:
            lr_t = tl.load(hyper + t).to(COMPUTE)
        d = tl.load(grad + offs, mask=mask).to(COMPUTE)
        if MAXIMIZE:
            d = -d
        p = tl.zeros_like(d)
        if HAS_PARAM:
            p = tl.load(param + offs, mask=mask).to(COMPUTE)
            d = d + wd * p
        u = d
        if MOMENTUM:
            if FIRST:
                b = d
            else:
                b = mu * tl.load(buf + offs, mask=mask).to(COMPUTE) + keep * d
            tl.store(buf_out + offs, b.to(buf_out.dtype.element_ty), mask=mask)
            if NESTEROV:
                u = d + mu * b
            else:
                u = b
        if WANT_PARAM:
            tl.store(param_out + offs, (p - lr_t * u).to(param_out.dtype.element_ty), mask=mask)


@triton.jit
def _sgd_batched_backward_kernel(
    param,  # [T, N] θ (unused unless HAS_PARAM)
    grad,  # [T, N] g
    buf,  # [T, N] b (unused on the first step)
    grad_param_out,  # [T, N] θ̄' (unused unless HAS_GP)
    grad_buf_out,  # [T, N] b̄' (unused unless HAS_GB)
    d_param,  # [T, N] θ̄
    d_grad,  # [T, N] ḡ
    d_buf,  # [T, N] b̄ (unused unless HAS_DB)
    d_lr,  # per-element lr gradient, shaped like lr (unused unless HAS_LR)
    partial,  # float64 [4, T, programs]: per-program hyperparameter-gradient sums
    hyper,  # float64 [4, T]
    lr,  # per-element lr (unused unless HAS_LR)
    tasks, numel, lr_stride, programs,
    COMPUTE: tl.constexpr, HAS_PARAM: tl.constexpr, HAS_LR: tl.constexpr,
    HAS_GP: tl.constexpr, HAS_GB: tl.constexpr, HAS_DB: tl.constexpr,
    WANT_DP: tl.constexpr, WANT_DG: tl.constexpr,
    MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < numel
    lr_acc = tl.zeros([BLOCK], dtype=COMPUTE)
    for t in range(tasks):
        offs = tl.cast(t, tl.int64) * numel + cols
        wd = tl.load(hyper + 1 * tasks + t).to(COMPUTE)
        mu = tl.load(hyper + 2 * tasks + t).to(COMPUTE)
        keep = 1.0 - tl.load(hyper + 3 * tasks + t).to(COMPUTE)
        if HAS_LR:
            lr_t = tl.load(lr + tl.cast(t, tl.int64) * lr_stride + cols, mask=mask).to(COMPUTE)
        else:
            lr_t = tl.load(hyper + t).to(COMPUTE)
        g = tl.load(grad + offs, mask=mask).to(COMPUTE)
        sign = 1.0
        if MAXIMIZE:
            sign = -1.0
        p = tl.zeros_like(g)
        if HAS_PARAM:
            p = tl.load(param + offs, mask=mask).to(COMPUTE)
        d = sign * g + wd * p
        gp = tl.zeros_like(g)
        if HAS_GP:
            gp = tl.load(grad_param_out + offs, mask=mask).to(COMPUTE)
        u = d
        ubar = -lr_t * gp
        dbar = ubar
        d_mu = tl.zeros_like(g)
        d_damp = tl.zeros_like(g)
        if MOMENTUM:
            b_in = tl.zeros_like(g)
            if FIRST:
                b = d
            else:
                b_in = tl.load(buf + offs, mask=mask).to(COMPUTE)
                b = mu * b_in + keep * d
            if NESTEROV:
                u = d + mu * b
            else:
                u = b
            bbar = ubar
            if NESTEROV:
                bbar = mu * ubar
            if HAS_GB:
                bbar += tl.load(grad_buf_out + offs, mask=mask).to(COMPUTE)
            if FIRST:
                dbar = bbar
            else:
                dbar = keep * bbar
                d_mu = bbar * b_in
                d_damp = -bbar * d
            if NESTEROV:
                dbar += ubar
                d_mu += ubar * b
            if HAS_DB:
                if FIRST:
                    tl.store(d_buf + offs, tl.zeros_like(g).to(d_buf.dtype.element_ty), mask=mask)
                else:
                    tl.store(d_buf + offs, (mu * bbar).to(d_buf.dtype.element_ty), mask=mask)
        lr_bar = tl.where(mask, -gp * u, 0.0)
        if WANT_DP:
            tl.store(d_param + offs, (gp + wd * dbar).to(d_param.dtype.element_ty), mask=mask)
        if WANT_DG:
            tl.store(d_grad + offs, (sign * dbar).to(d_grad.dtype.element_ty), mask=mask)
        if HAS_LR:
            if lr_stride == 0:
                lr_acc += lr_bar
            else:
                tl.store(d_lr + tl.cast(t, tl.int64) * lr_stride + cols,
                         lr_bar.to(d_lr.dtype.element_ty), mask=mask)
        else:
            tl.store(partial + (0 * tasks + t) * programs + pid, tl.sum(lr_bar.to(tl.float64)))
        sums = tl.where(mask, dbar * p, 0.0)
        tl.store(partial + (1 * tasks + t) * programs + pid, tl.sum(sums.to(tl.float64)))
        sums = tl.where(mask, d_mu, 0.0)
        tl.store(partial + (2 * tasks + t) * programs + pid, tl.sum(sums.to(tl.float64)))
        sums = tl.where(mask, d_damp, 0.0)
        tl.store(partial + (3 * tasks + t) * programs + pid, tl.sum(sums.to(tl.float64)))
    if HAS_LR:
        if lr_stride == 0:
            tl.store(d_lr + cols, lr_acc.to(d_lr.dtype.element_ty), mask=mask)


def step_forward(rule, param, grad, states, param_out, states_out, table, lr, *, step, flags):
    """Launches the batched forward (inputs validated by fastmeta.ops.tensor_lists)."""
    tasks, numel = tt.batched_layout(grad)
    if tasks * numel == 0:
        return
    grid = (triton.cdiv(numel, BATCHED_BLOCK),)
    _sgd_batched_forward_kernel[grid](
        tt.or_dummy(param, grad), grad, tt.or_dummy(states[0], grad),
        tt.or_dummy(param_out, grad), tt.or_dummy(states_out[0], grad), table,
        tt.or_dummy(lr, grad), tasks, numel, tt.lr_stride(lr, numel),
        COMPUTE=tt.compute_type(grad.dtype), HAS_PARAM=param is not None,
        WANT_PARAM=param_out is not None, HAS_LR=lr is not None,
        MOMENTUM=bool(flags & ops_tl.FLAG_MOMENTUM), FIRST=bool(flags & ops_tl.FLAG_FIRST_STEP),
        NESTEROV=bool(flags & ops_tl.FLAG_NESTEROV), MAXIMIZE=bool(flags & ops_tl.FLAG_MAXIMIZE),
        BLOCK=BATCHED_BLOCK,
    )


def step_backward(rule, param, grad, states, grad_param_out, grad_states_out, d_param, d_grad,
                  d_states, d_lr, d_table, table, lr, *, step, flags):
    """Launches the batched VJP and sums the per-program hyperparameter gradients into
    ``d_table`` ([H, T], float64)."""
    tasks, numel = tt.batched_layout(grad)
    if tasks * numel == 0:
        if d_lr is not None:
            d_lr.zero_()
        return
    programs = triton.cdiv(numel, BATCHED_BLOCK)
    partial = tt.hyper_partials(d_table, programs)
    _sgd_batched_backward_kernel[(programs,)](
        tt.or_dummy(param, grad), grad, tt.or_dummy(states[0], grad),
        tt.or_dummy(grad_param_out, grad), tt.or_dummy(grad_states_out[0], grad),
        tt.or_dummy(d_param, grad), tt.or_dummy(d_grad, grad), tt.or_dummy(d_states[0], grad),
        tt.or_dummy(d_lr, grad), partial, table,
        tt.or_dummy(lr, grad), tasks, numel, tt.lr_stride(lr, numel), programs,
        COMPUTE=tt.compute_type(grad.dtype), HAS_PARAM=param is not None,
        HAS_LR=lr is not None, HAS_GP=grad_param_out is not None,
        WANT_DP=d_param is not None, WANT_DG=d_grad is not None,
        HAS_GB=grad_states_out[0] is not None, HAS_DB=d_states[0] is not None,
        MOMENTUM=bool(flags & ops_tl.FLAG_MOMENTUM), FIRST=bool(flags & ops_tl.FLAG_FIRST_STEP),
        NESTEROV=bool(flags & ops_tl.FLAG_NESTEROV), MAXIMIZE=bool(flags & ops_tl.FLAG_MAXIMIZE),
        BLOCK=BATCHED_BLOCK,
    )
    d_table.copy_(partial.sum(-1))
