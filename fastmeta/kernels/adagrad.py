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
    t, offsets, mask = tt.program_block(block_tensor, block_start, numels, BLOCK)
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


# ---- Out-of-place, task-batched, differentiable step (fastmeta/ops/adagrad.py) --------------
# The VJP is written out in AdagradFunction.backward; see tensor_table for the [T, N] layout.

# Columns per program of the batched kernels: the loop over tasks keeps ~8 streams live.
BATCHED_BLOCK = 512


@triton.jit
def _adagrad_batched_forward_kernel(
    param,  # [T, N] θ (unused unless HAS_PARAM)
    grad,  # [T, N] g
    state_sum,  # [T, N] s
    param_out,  # [T, N] θ' (unused unless WANT_PARAM)
    state_sum_out,  # [T, N] s'
    hyper,  # float64 [4, T]: lr, lr_decay, weight_decay, eps per task
    lr,  # per-element lr, [N] or [T, N] (unused unless HAS_LR)
    tasks, numel, lr_stride, step,
    COMPUTE: tl.constexpr, HAS_PARAM: tl.constexpr, WANT_PARAM: tl.constexpr,
    HAS_LR: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < numel
    for t in range(tasks):
        offs = tl.cast(t, tl.int64) * numel + cols
        k = (1.0 + (step - 1.0) * tl.load(hyper + 1 * tasks + t)).to(COMPUTE)
        wd = tl.load(hyper + 2 * tasks + t).to(COMPUTE)
        eps = tl.load(hyper + 3 * tasks + t).to(COMPUTE)
        if HAS_LR:
            lr_t = tl.load(lr + tl.cast(t, tl.int64) * lr_stride + cols, mask=mask).to(COMPUTE)
        else:
            lr_t = tl.load(hyper + t).to(COMPUTE)
        g = tl.load(grad + offs, mask=mask).to(COMPUTE)
        if MAXIMIZE:
            g = -g
        p = tl.zeros_like(g)
        if HAS_PARAM:
            p = tl.load(param + offs, mask=mask).to(COMPUTE)
            g = g + wd * p
        s = tl.load(state_sum + offs, mask=mask).to(COMPUTE) + g * g
        tl.store(state_sum_out + offs, s.to(state_sum_out.dtype.element_ty), mask=mask)
        if WANT_PARAM:
            den = tt.sqrt_rn(s, COMPUTE) + eps
            new_p = p - (lr_t / k) * tt.div_rn(g, den, COMPUTE)
            tl.store(param_out + offs, new_p.to(param_out.dtype.element_ty), mask=mask)


@triton.jit
def _adagrad_batched_backward_kernel(
    param,  # [T, N] θ (unused unless HAS_PARAM)
    grad,  # [T, N] g
    state_sum,  # [T, N] s
    grad_param_out,  # [T, N] θ̄' (unused unless HAS_GP)
    grad_state_sum_out,  # [T, N] s̄' (unused unless HAS_GS)
    d_param,  # [T, N] θ̄
    d_grad,  # [T, N] ḡ
    d_state_sum,  # [T, N] s̄
    d_lr,  # per-element lr gradient, shaped like lr (unused unless HAS_LR)
    partial,  # float64 [4, T, programs]: per-program hyperparameter-gradient sums
    hyper,  # float64 [4, T]
    lr,  # per-element lr (unused unless HAS_LR)
    tasks, numel, lr_stride, step, programs,
    COMPUTE: tl.constexpr, HAS_PARAM: tl.constexpr, HAS_LR: tl.constexpr,
    HAS_GP: tl.constexpr, HAS_GS: tl.constexpr, MAXIMIZE: tl.constexpr,
    WANT_DP: tl.constexpr, WANT_DG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < numel
    lr_acc = tl.zeros([BLOCK], dtype=COMPUTE)
    for t in range(tasks):
        offs = tl.cast(t, tl.int64) * numel + cols
        k = (1.0 + (step - 1.0) * tl.load(hyper + 1 * tasks + t)).to(COMPUTE)
        wd = tl.load(hyper + 2 * tasks + t).to(COMPUTE)
        eps = tl.load(hyper + 3 * tasks + t).to(COMPUTE)
        if HAS_LR:
            lr_t = tl.load(lr + tl.cast(t, tl.int64) * lr_stride + cols, mask=mask).to(COMPUTE)
        else:
            lr_t = tl.load(hyper + t).to(COMPUTE)
        sign = 1.0
        if MAXIMIZE:
            sign = -1.0
        p = tl.zeros([BLOCK], dtype=COMPUTE)
        if HAS_PARAM:
            p = tl.load(param + offs, mask=mask).to(COMPUTE)
        gh = sign * tl.load(grad + offs, mask=mask).to(COMPUTE) + wd * p
        s = tl.load(state_sum + offs, mask=mask).to(COMPUTE) + gh * gh
        root = tl.sqrt(s)
        den = root + eps
        clr = lr_t / k
        gp = tl.zeros_like(gh)
        if HAS_GP:
            gp = tl.load(grad_param_out + offs, mask=mask).to(COMPUTE)
        clr_bar = -gp * (gh / den)
        denbar = clr * gp * gh / (den * den)
        # where ĝ = 0 on a zero sum θ' does not depend on s': no 0/0
        sbar = tl.where(denbar == 0.0, 0.0, denbar / (2.0 * tl.where(denbar == 0.0, 1.0, root)))
        if HAS_GS:
            sbar += tl.load(grad_state_sum_out + offs, mask=mask).to(COMPUTE)
        ghbar = -clr * gp / den + 2.0 * gh * sbar
        tl.store(d_state_sum + offs, sbar.to(d_state_sum.dtype.element_ty), mask=mask)
        if WANT_DG:
            tl.store(d_grad + offs, (sign * ghbar).to(d_grad.dtype.element_ty), mask=mask)
        if WANT_DP:
            tl.store(d_param + offs, (gp + wd * ghbar).to(d_param.dtype.element_ty), mask=mask)
        lr_bar = tl.where(mask, clr_bar / k, 0.0)
        if HAS_LR:
            if lr_stride == 0:
                lr_acc += lr_bar
            else:
                tl.store(d_lr + tl.cast(t, tl.int64) * lr_stride + cols,
                         lr_bar.to(d_lr.dtype.element_ty), mask=mask)
        else:
            tl.store(partial + (0 * tasks + t) * programs + pid, tl.sum(lr_bar.to(tl.float64)))
        decay_bar = tl.where(mask, clr_bar * (-lr_t * (step - 1.0) / (k * k)), 0.0)
        tl.store(partial + (1 * tasks + t) * programs + pid, tl.sum(decay_bar.to(tl.float64)))
        wd_bar = tl.where(mask, ghbar * p, 0.0)
        tl.store(partial + (2 * tasks + t) * programs + pid, tl.sum(wd_bar.to(tl.float64)))
        eps_bar = tl.where(mask, denbar, 0.0)
        tl.store(partial + (3 * tasks + t) * programs + pid, tl.sum(eps_bar.to(tl.float64)))
    if HAS_LR:
        if lr_stride == 0:
            tl.store(d_lr + cols, lr_acc.to(d_lr.dtype.element_ty), mask=mask)


def step_forward(rule, param, grad, states, param_out, states_out, table, lr, *, step, flags):
    """Launches the batched forward (inputs validated by fastmeta.ops.tensor_lists)."""
    from fastmeta.ops import tensor_lists as ops_tl

    tasks, numel = tt.batched_layout(grad)
    if tasks * numel == 0:
        return
    _adagrad_batched_forward_kernel[(triton.cdiv(numel, BATCHED_BLOCK),)](
        tt.or_dummy(param, grad), grad, states[0], tt.or_dummy(param_out, grad), states_out[0],
        table, tt.or_dummy(lr, grad), tasks, numel, tt.lr_stride(lr, numel), float(step),
        COMPUTE=tt.compute_type(grad.dtype), HAS_PARAM=param is not None,
        WANT_PARAM=param_out is not None, HAS_LR=lr is not None,
        MAXIMIZE=bool(flags & ops_tl.FLAG_MAXIMIZE), BLOCK=BATCHED_BLOCK,
    )


def step_backward(rule, param, grad, states, grad_param_out, grad_states_out, d_param, d_grad,
                  d_states, d_lr, d_table, table, lr, *, step, flags):
    """Launches the batched VJP and sums the per-program hyperparameter gradients into
    ``d_table`` ([H, T], float64)."""
    from fastmeta.ops import tensor_lists as ops_tl

    tasks, numel = tt.batched_layout(grad)
    if tasks * numel == 0:
        if d_lr is not None:
            d_lr.zero_()
        return
    programs = triton.cdiv(numel, BATCHED_BLOCK)
    partial = tt.hyper_partials(d_table, programs)
    _adagrad_batched_backward_kernel[(programs,)](
        tt.or_dummy(param, grad), grad, states[0], tt.or_dummy(grad_param_out, grad),
        tt.or_dummy(grad_states_out[0], grad), tt.or_dummy(d_param, grad),
        tt.or_dummy(d_grad, grad), d_states[0],
        tt.or_dummy(d_lr, grad), partial, table, tt.or_dummy(lr, grad), tasks, numel,
        tt.lr_stride(lr, numel), float(step), programs,
        COMPUTE=tt.compute_type(grad.dtype), HAS_PARAM=param is not None,
        HAS_LR=lr is not None, HAS_GP=grad_param_out is not None,
        WANT_DP=d_param is not None, WANT_DG=d_grad is not None,
        HAS_GS=grad_states_out[0] is not None, MAXIMIZE=bool(flags & ops_tl.FLAG_MAXIMIZE),
        BLOCK=BATCHED_BLOCK,
    )
    d_table.copy_(partial.sum(-1))
