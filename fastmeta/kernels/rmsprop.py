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
    t, offsets, mask = tt.program_block(block_tensor, block_start, numels, BLOCK)
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


# ---- Out-of-place, task-batched, differentiable step (fastmeta/ops/rmsprop.py) --------------
# The VJP is written out in RmspropFunction.backward; see tensor_table for the [T, N] layout.

# Columns per program of the batched kernels: the loop over tasks keeps ~14 streams live.
BATCHED_BLOCK = 512


@triton.jit
def _rmsprop_batched_forward_kernel(
    param,  # [T, N] θ (unused unless HAS_PARAM)
    grad,  # [T, N] g
    square_avg,  # [T, N] v
    momentum_buffer,  # [T, N] b (unused unless MOMENTUM)
    grad_avg,  # [T, N] a (unused unless CENTERED)
    param_out,  # [T, N] θ' (unused unless WANT_PARAM)
    square_avg_out,  # [T, N] v'
    momentum_buffer_out,  # [T, N] b' (unused unless MOMENTUM)
    grad_avg_out,  # [T, N] a' (unused unless CENTERED)
    hyper,  # float64 [5, T]: lr, alpha, eps, weight_decay, momentum per task
    lr,  # per-element lr, [N] or [T, N] (unused unless HAS_LR)
    tasks, numel, lr_stride,
    COMPUTE: tl.constexpr, HAS_PARAM: tl.constexpr, WANT_PARAM: tl.constexpr,
    HAS_LR: tl.constexpr, MOMENTUM: tl.constexpr, CENTERED: tl.constexpr,
    MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < numel
    for t in range(tasks):
        offs = tl.cast(t, tl.int64) * numel + cols
        alpha = tl.load(hyper + 1 * tasks + t).to(COMPUTE)
        eps = tl.load(hyper + 2 * tasks + t).to(COMPUTE)
        wd = tl.load(hyper + 3 * tasks + t).to(COMPUTE)
        mu = tl.load(hyper + 4 * tasks + t).to(COMPUTE)
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
        v = alpha * tl.load(square_avg + offs, mask=mask).to(COMPUTE) + (1.0 - alpha) * (g * g)
        tl.store(square_avg_out + offs, v.to(square_avg_out.dtype.element_ty), mask=mask)
        w = v
        if CENTERED:
            a = tl.load(grad_avg + offs, mask=mask).to(COMPUTE)
            a = a + (1.0 - alpha) * (g - a)
            tl.store(grad_avg_out + offs, a.to(grad_avg_out.dtype.element_ty), mask=mask)
            w = v - a * a
        u = tt.div_rn(g, tt.sqrt_rn(w, COMPUTE) + eps, COMPUTE)
        if MOMENTUM:
            u = mu * tl.load(momentum_buffer + offs, mask=mask).to(COMPUTE) + u
            tl.store(momentum_buffer_out + offs, u.to(momentum_buffer_out.dtype.element_ty),
                     mask=mask)
        if WANT_PARAM:
            tl.store(param_out + offs, (p - lr_t * u).to(param_out.dtype.element_ty), mask=mask)


@triton.jit
def _rmsprop_batched_backward_kernel(
    param,  # [T, N] θ (unused unless HAS_PARAM)
    grad,  # [T, N] g
    square_avg,  # [T, N] v
    momentum_buffer,  # [T, N] b (unused unless MOMENTUM)
    grad_avg,  # [T, N] a (unused unless CENTERED)
    grad_param_out,  # [T, N] θ̄' (unused unless HAS_GP)
    grad_square_avg_out,  # [T, N] v̄' (unused unless HAS_GV)
    grad_momentum_buffer_out,  # [T, N] b̄' (unused unless HAS_GB)
    grad_grad_avg_out,  # [T, N] ā' (unused unless HAS_GA)
    d_param,  # [T, N] θ̄
    d_grad,  # [T, N] ḡ
    d_square_avg,  # [T, N] v̄
    d_momentum_buffer,  # [T, N] b̄ (unused unless MOMENTUM)
    d_grad_avg,  # [T, N] ā (unused unless CENTERED)
    d_lr,  # per-element lr gradient, shaped like lr (unused unless HAS_LR)
    partial,  # float64 [5, T, programs]: per-program hyperparameter-gradient sums
    hyper,  # float64 [5, T]
    lr,  # per-element lr (unused unless HAS_LR)
    tasks, numel, lr_stride, programs,
    COMPUTE: tl.constexpr, HAS_PARAM: tl.constexpr, HAS_LR: tl.constexpr,
    HAS_GP: tl.constexpr, HAS_GV: tl.constexpr, HAS_GB: tl.constexpr, HAS_GA: tl.constexpr,
    WANT_DP: tl.constexpr, WANT_DG: tl.constexpr,
    MOMENTUM: tl.constexpr, CENTERED: tl.constexpr, MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < numel
    lr_acc = tl.zeros([BLOCK], dtype=COMPUTE)
    for t in range(tasks):
        offs = tl.cast(t, tl.int64) * numel + cols
        alpha = tl.load(hyper + 1 * tasks + t).to(COMPUTE)
        eps = tl.load(hyper + 2 * tasks + t).to(COMPUTE)
        wd = tl.load(hyper + 3 * tasks + t).to(COMPUTE)
        mu = tl.load(hyper + 4 * tasks + t).to(COMPUTE)
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
        v = tl.load(square_avg + offs, mask=mask).to(COMPUTE)
        vn = alpha * v + (1.0 - alpha) * (gh * gh)
        w = vn
        a = tl.zeros_like(gh)
        an = tl.zeros_like(gh)
        if CENTERED:
            a = tl.load(grad_avg + offs, mask=mask).to(COMPUTE)
            an = a + (1.0 - alpha) * (gh - a)
            w = vn - an * an
        root = tl.sqrt(w)
        den = root + eps
        u = gh / den
        gp = tl.zeros_like(gh)
        if HAS_GP:
            gp = tl.load(grad_param_out + offs, mask=mask).to(COMPUTE)
        mu_bar = tl.zeros_like(gh)
        if MOMENTUM:
            b = tl.load(momentum_buffer + offs, mask=mask).to(COMPUTE)
            bn = mu * b + u
            bbar = -lr_t * gp
            if HAS_GB:
                bbar += tl.load(grad_momentum_buffer_out + offs, mask=mask).to(COMPUTE)
            lr_bar = -gp * bn
            ubar = bbar
            tl.store(d_momentum_buffer + offs, (mu * bbar).to(d_momentum_buffer.dtype.element_ty),
                     mask=mask)
            mu_bar = bbar * b
        else:
            ubar = -lr_t * gp
            lr_bar = -gp * u
        denbar = -ubar * gh / (den * den)
        # where ĝ = 0 on a zero state θ' does not depend on w: no 0/0
        wbar = tl.where(denbar == 0.0, 0.0, denbar / (2.0 * tl.where(denbar == 0.0, 1.0, root)))
        vbar = wbar
        if HAS_GV:
            vbar += tl.load(grad_square_avg_out + offs, mask=mask).to(COMPUTE)
        ghbar = ubar / den + 2.0 * (1.0 - alpha) * gh * vbar
        alpha_bar = vbar * (v - gh * gh)
        if CENTERED:
            abar = -2.0 * an * wbar
            if HAS_GA:
                abar += tl.load(grad_grad_avg_out + offs, mask=mask).to(COMPUTE)
            ghbar += (1.0 - alpha) * abar
            alpha_bar += abar * (a - gh)
            tl.store(d_grad_avg + offs, (alpha * abar).to(d_grad_avg.dtype.element_ty), mask=mask)
        tl.store(d_square_avg + offs, (alpha * vbar).to(d_square_avg.dtype.element_ty), mask=mask)
        if WANT_DG:
            tl.store(d_grad + offs, (sign * ghbar).to(d_grad.dtype.element_ty), mask=mask)
        if WANT_DP:
            tl.store(d_param + offs, (gp + wd * ghbar).to(d_param.dtype.element_ty), mask=mask)
        lr_bar = tl.where(mask, lr_bar, 0.0)
        if HAS_LR:
            if lr_stride == 0:
                lr_acc += lr_bar
            else:
                tl.store(d_lr + tl.cast(t, tl.int64) * lr_stride + cols,
                         lr_bar.to(d_lr.dtype.element_ty), mask=mask)
        else:
            tl.store(partial + (0 * tasks + t) * programs + pid, tl.sum(lr_bar.to(tl.float64)))
        alpha_bar = tl.where(mask, alpha_bar, 0.0)
        tl.store(partial + (1 * tasks + t) * programs + pid, tl.sum(alpha_bar.to(tl.float64)))
        eps_bar = tl.where(mask, denbar, 0.0)
        tl.store(partial + (2 * tasks + t) * programs + pid, tl.sum(eps_bar.to(tl.float64)))
        wd_bar = tl.where(mask, ghbar * p, 0.0)
        tl.store(partial + (3 * tasks + t) * programs + pid, tl.sum(wd_bar.to(tl.float64)))
        mu_bar = tl.where(mask, mu_bar, 0.0)
        tl.store(partial + (4 * tasks + t) * programs + pid, tl.sum(mu_bar.to(tl.float64)))
    if HAS_LR:
        if lr_stride == 0:
            tl.store(d_lr + cols, lr_acc.to(d_lr.dtype.element_ty), mask=mask)


def step_forward(rule, param, grad, states, param_out, states_out, table, lr, *, step, flags):
    """Launches the batched forward (inputs validated by fastmeta.ops.tensor_lists)."""
    from fastmeta.ops import tensor_lists as ops_tl

    tasks, numel = tt.batched_layout(grad)
    if tasks * numel == 0:
        return
    _rmsprop_batched_forward_kernel[(triton.cdiv(numel, BATCHED_BLOCK),)](
        tt.or_dummy(param, grad), grad, states[0], tt.or_dummy(states[1], grad),
        tt.or_dummy(states[2], grad), tt.or_dummy(param_out, grad), states_out[0],
        tt.or_dummy(states_out[1], grad), tt.or_dummy(states_out[2], grad), table,
        tt.or_dummy(lr, grad), tasks, numel, tt.lr_stride(lr, numel),
        COMPUTE=tt.compute_type(grad.dtype), HAS_PARAM=param is not None,
        WANT_PARAM=param_out is not None, HAS_LR=lr is not None,
        MOMENTUM=bool(flags & ops_tl.FLAG_MOMENTUM), CENTERED=bool(flags & ops_tl.FLAG_CENTERED),
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
    _rmsprop_batched_backward_kernel[(programs,)](
        tt.or_dummy(param, grad), grad, states[0], tt.or_dummy(states[1], grad),
        tt.or_dummy(states[2], grad), tt.or_dummy(grad_param_out, grad),
        tt.or_dummy(grad_states_out[0], grad), tt.or_dummy(grad_states_out[1], grad),
        tt.or_dummy(grad_states_out[2], grad), tt.or_dummy(d_param, grad),
        tt.or_dummy(d_grad, grad), d_states[0],
        tt.or_dummy(d_states[1], grad), tt.or_dummy(d_states[2], grad), tt.or_dummy(d_lr, grad),
        partial, table, tt.or_dummy(lr, grad), tasks, numel, tt.lr_stride(lr, numel), programs,
        COMPUTE=tt.compute_type(grad.dtype), HAS_PARAM=param is not None,
        HAS_LR=lr is not None, HAS_GP=grad_param_out is not None,
        WANT_DP=d_param is not None, WANT_DG=d_grad is not None,
        HAS_GV=grad_states_out[0] is not None, HAS_GB=grad_states_out[1] is not None,
        HAS_GA=grad_states_out[2] is not None,
        MOMENTUM=bool(flags & ops_tl.FLAG_MOMENTUM), CENTERED=bool(flags & ops_tl.FLAG_CENTERED),
        MAXIMIZE=bool(flags & ops_tl.FLAG_MAXIMIZE), BLOCK=BATCHED_BLOCK,
    )
    d_table.copy_(partial.sum(-1))
