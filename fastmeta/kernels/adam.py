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
    t, offsets, mask = tt.program_block(block_tensor, block_start, numels, BLOCK)
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


# ---- Out-of-place, task-batched, differentiable step (fastmeta/ops/adam.py: AdamFunction) ---
# The VJP is written out in AdamFunction.backward; see tensor_table for the [T, N] layout.

# Columns per program of the batched kernels: the loop over tasks keeps ~10 streams live.
BATCHED_BLOCK = 512


@triton.jit
def _adam_batched_forward_kernel(
    param,  # [T, N] θ (unused unless HAS_PARAM)
    grad,  # [T, N] g
    exp_avg,  # [T, N] m
    exp_avg_sq,  # [T, N] v
    param_out,  # [T, N] θ' (unused unless WANT_PARAM)
    exp_avg_out,  # [T, N] m'
    exp_avg_sq_out,  # [T, N] v'
    hyper,  # float64 [6, T]: lr, beta1, beta2, eps, weight_decay, eps_root per task
    lr,  # per-element lr, [N] or [T, N] (unused unless HAS_LR)
    tasks, numel, lr_stride, step,
    COMPUTE: tl.constexpr, HAS_PARAM: tl.constexpr, WANT_PARAM: tl.constexpr,
    HAS_LR: tl.constexpr, DECOUPLED: tl.constexpr, EPS_ROOT: tl.constexpr,
    MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < numel
    for t in range(tasks):
        offs = tl.cast(t, tl.int64) * numel + cols
        beta1 = tl.load(hyper + 1 * tasks + t)
        beta2 = tl.load(hyper + 2 * tasks + t)
        eps = tl.load(hyper + 3 * tasks + t).to(COMPUTE)
        wd = tl.load(hyper + 4 * tasks + t).to(COMPUTE)
        eps_root = tl.load(hyper + 5 * tasks + t).to(COMPUTE)
        bc1 = (1.0 - tl.exp(step * tl.log(beta1))).to(COMPUTE)  # β^t for β > 0; β = 0 below
        bc1 = tl.where(beta1 == 0.0, 1.0, bc1).to(COMPUTE)
        bc2 = (1.0 - tl.exp(step * tl.log(beta2))).to(COMPUTE)
        bc2 = tl.where(beta2 == 0.0, 1.0, bc2).to(COMPUTE)
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
        if not DECOUPLED:
            g = g + wd * p
        m = tl.load(exp_avg + offs, mask=mask).to(COMPUTE)
        m = m + (1.0 - beta1.to(COMPUTE)) * (g - m)
        v = beta2.to(COMPUTE) * tl.load(exp_avg_sq + offs, mask=mask).to(COMPUTE) \
            + (1.0 - beta2.to(COMPUTE)) * (g * g)
        tl.store(exp_avg_out + offs, m.to(exp_avg_out.dtype.element_ty), mask=mask)
        tl.store(exp_avg_sq_out + offs, v.to(exp_avg_sq_out.dtype.element_ty), mask=mask)
        if WANT_PARAM:
            if EPS_ROOT:
                den = tt.sqrt_rn(tt.div_rn(v, bc2, COMPUTE) + eps_root, COMPUTE) + eps
            else:
                den = tt.div_rn(tt.sqrt_rn(v, COMPUTE), tt.sqrt_rn(bc2, COMPUTE), COMPUTE) + eps
            if DECOUPLED:
                p = p * (1.0 - lr_t * wd)
            new_p = p - (lr_t / bc1) * tt.div_rn(m, den, COMPUTE)
            tl.store(param_out + offs, new_p.to(param_out.dtype.element_ty), mask=mask)


@triton.jit
def _adam_batched_backward_kernel(
    param,  # [T, N] θ (unused unless HAS_PARAM)
    grad,  # [T, N] g
    exp_avg,  # [T, N] m
    exp_avg_sq,  # [T, N] v
    grad_param_out,  # [T, N] θ̄' (unused unless HAS_GP)
    grad_exp_avg_out,  # [T, N] m̄' (unused unless HAS_GM)
    grad_exp_avg_sq_out,  # [T, N] v̄' (unused unless HAS_GV)
    d_param,  # [T, N] θ̄
    d_grad,  # [T, N] ḡ
    d_exp_avg,  # [T, N] m̄
    d_exp_avg_sq,  # [T, N] v̄
    d_lr,  # per-element lr gradient, shaped like lr (unused unless HAS_LR)
    partial,  # float64 [6, T, programs]: per-program hyperparameter-gradient sums
    hyper,  # float64 [6, T]
    lr,  # per-element lr (unused unless HAS_LR)
    tasks, numel, lr_stride, step, programs,
    COMPUTE: tl.constexpr, HAS_PARAM: tl.constexpr, HAS_LR: tl.constexpr,
    HAS_GP: tl.constexpr, HAS_GM: tl.constexpr, HAS_GV: tl.constexpr,
    WANT_DP: tl.constexpr, WANT_DG: tl.constexpr,
    DECOUPLED: tl.constexpr, EPS_ROOT: tl.constexpr, MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < numel
    lr_acc = tl.zeros([BLOCK], dtype=COMPUTE)
    for t in range(tasks):
        offs = tl.cast(t, tl.int64) * numel + cols
        beta1 = tl.load(hyper + 1 * tasks + t)
        beta2 = tl.load(hyper + 2 * tasks + t)
        eps = tl.load(hyper + 3 * tasks + t).to(COMPUTE)
        wd = tl.load(hyper + 4 * tasks + t).to(COMPUTE)
        eps_root = tl.load(hyper + 5 * tasks + t).to(COMPUTE)
        pow1 = tl.where(beta1 == 0.0, 0.0, tl.exp(step * tl.log(beta1)))  # β1^t
        pow2 = tl.where(beta2 == 0.0, 0.0, tl.exp(step * tl.log(beta2)))
        bc1 = (1.0 - pow1).to(COMPUTE)
        bc2 = (1.0 - pow2).to(COMPUTE)
        # d(bc)/dβ = −t β^(t−1); at β = 0 it is −1 for t = 1, else 0
        dbc1 = tl.where(beta1 == 0.0, tl.where(step == 1.0, -1.0, 0.0), -step * pow1 / beta1)
        dbc2 = tl.where(beta2 == 0.0, tl.where(step == 1.0, -1.0, 0.0), -step * pow2 / beta2)
        dbc1 = dbc1.to(COMPUTE)
        dbc2 = dbc2.to(COMPUTE)
        b1 = beta1.to(COMPUTE)
        b2 = beta2.to(COMPUTE)
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
        gh = sign * tl.load(grad + offs, mask=mask).to(COMPUTE)
        if not DECOUPLED:
            gh = gh + wd * p
        m = tl.load(exp_avg + offs, mask=mask).to(COMPUTE)
        v = tl.load(exp_avg_sq + offs, mask=mask).to(COMPUTE)
        mn = m + (1.0 - b1) * (gh - m)
        vn = b2 * v + (1.0 - b2) * (gh * gh)
        if EPS_ROOT:
            root = tl.sqrt(vn / bc2 + eps_root)
        else:
            root = tl.sqrt(vn / bc2)
        den = root + eps
        gp = tl.zeros_like(gh)
        if HAS_GP:
            gp = tl.load(grad_param_out + offs, mask=mask).to(COMPUTE)
        a = lr_t / bc1
        abar = -gp * (mn / den)
        bc1bar = -abar * lr_t / (bc1 * bc1)
        mbar = -gp * a / den
        if HAS_GM:
            mbar += tl.load(grad_exp_avg_out + offs, mask=mask).to(COMPUTE)
        denbar = gp * a * mn / (den * den)
        # where m' = 0 (zero gradient on zero state) θ' does not depend on v': no 0/0
        xbar = tl.where(denbar == 0.0, 0.0, denbar / (2.0 * tl.where(denbar == 0.0, 1.0, root)))
        vbar = xbar / bc2
        if HAS_GV:
            vbar += tl.load(grad_exp_avg_sq_out + offs, mask=mask).to(COMPUTE)
        bc2bar = -xbar * vn / (bc2 * bc2)
        ghbar = (1.0 - b1) * mbar + 2.0 * (1.0 - b2) * gh * vbar
        tl.store(d_exp_avg + offs, (b1 * mbar).to(d_exp_avg.dtype.element_ty), mask=mask)
        tl.store(d_exp_avg_sq + offs, (b2 * vbar).to(d_exp_avg_sq.dtype.element_ty), mask=mask)
        if WANT_DG:
            tl.store(d_grad + offs, (sign * ghbar).to(d_grad.dtype.element_ty), mask=mask)
        if DECOUPLED:
            dp = gp * (1.0 - lr_t * wd)
            lr_bar = abar / bc1 - wd * p * gp
            wd_bar = -lr_t * p * gp
        else:
            dp = gp + wd * ghbar
            lr_bar = abar / bc1
            wd_bar = ghbar * p
        if WANT_DP:
            tl.store(d_param + offs, dp.to(d_param.dtype.element_ty), mask=mask)
        lr_bar = tl.where(mask, lr_bar, 0.0)
        if HAS_LR:
            if lr_stride == 0:
                lr_acc += lr_bar
            else:
                tl.store(d_lr + tl.cast(t, tl.int64) * lr_stride + cols,
                         lr_bar.to(d_lr.dtype.element_ty), mask=mask)
        else:
            tl.store(partial + (0 * tasks + t) * programs + pid, tl.sum(lr_bar.to(tl.float64)))
        b1_bar = tl.where(mask, mbar * (m - gh) + bc1bar * dbc1, 0.0)
        tl.store(partial + (1 * tasks + t) * programs + pid, tl.sum(b1_bar.to(tl.float64)))
        b2_bar = tl.where(mask, vbar * (v - gh * gh) + bc2bar * dbc2, 0.0)
        tl.store(partial + (2 * tasks + t) * programs + pid, tl.sum(b2_bar.to(tl.float64)))
        eps_bar = tl.where(mask, denbar, 0.0)
        tl.store(partial + (3 * tasks + t) * programs + pid, tl.sum(eps_bar.to(tl.float64)))
        wd_bar = tl.where(mask, wd_bar, 0.0)
        tl.store(partial + (4 * tasks + t) * programs + pid, tl.sum(wd_bar.to(tl.float64)))
        er_bar = tl.where(mask, xbar, 0.0)
        tl.store(partial + (5 * tasks + t) * programs + pid, tl.sum(er_bar.to(tl.float64)))
    if HAS_LR:
        if lr_stride == 0:
            tl.store(d_lr + cols, lr_acc.to(d_lr.dtype.element_ty), mask=mask)


def step_forward(rule, param, grad, states, param_out, states_out, table, lr, *, step, flags):
    """Launches the batched forward (inputs validated by fastmeta.ops.tensor_lists)."""
    from fastmeta.ops import tensor_lists as ops_tl

    tasks, numel = tt.batched_layout(grad)
    if tasks * numel == 0:
        return
    _adam_batched_forward_kernel[(triton.cdiv(numel, BATCHED_BLOCK),)](
        tt.or_dummy(param, grad), grad, states[0], states[1], tt.or_dummy(param_out, grad),
        states_out[0], states_out[1], table, tt.or_dummy(lr, grad), tasks, numel,
        tt.lr_stride(lr, numel), float(step),
        COMPUTE=tt.compute_type(grad.dtype), HAS_PARAM=param is not None,
        WANT_PARAM=param_out is not None, HAS_LR=lr is not None,
        DECOUPLED=bool(flags & ops_tl.FLAG_DECOUPLED), EPS_ROOT=bool(flags & ops_tl.FLAG_EPS_ROOT),
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
    _adam_batched_backward_kernel[(programs,)](
        tt.or_dummy(param, grad), grad, states[0], states[1],
        tt.or_dummy(grad_param_out, grad), tt.or_dummy(grad_states_out[0], grad),
        tt.or_dummy(grad_states_out[1], grad), tt.or_dummy(d_param, grad),
        tt.or_dummy(d_grad, grad), d_states[0], d_states[1],
        tt.or_dummy(d_lr, grad), partial, table, tt.or_dummy(lr, grad), tasks, numel,
        tt.lr_stride(lr, numel), float(step), programs,
        COMPUTE=tt.compute_type(grad.dtype), HAS_PARAM=param is not None,
        HAS_LR=lr is not None, HAS_GP=grad_param_out is not None,
        WANT_DP=d_param is not None, WANT_DG=d_grad is not None,
        HAS_GM=grad_states_out[0] is not None, HAS_GV=grad_states_out[1] is not None,
        DECOUPLED=bool(flags & ops_tl.FLAG_DECOUPLED), EPS_ROOT=bool(flags & ops_tl.FLAG_EPS_ROOT),
        MAXIMIZE=bool(flags & ops_tl.FLAG_MAXIMIZE), BLOCK=BATCHED_BLOCK,
    )
    d_table.copy_(partial.sum(-1))
