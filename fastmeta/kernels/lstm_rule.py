"""Triton kernels of the fused LSTM rule; the maths is in :mod:`fastmeta.ops.lstm_rule`.

Same semantics as ``csrc/lstm_rule.cpp``: one program handles ``BLOCK`` coordinates, holds their
``[BLOCK, H]`` states in registers (H padded to a power of two, the padding kept at exactly 0 by
zero weights), and computes every mat-vec product as a broadcast-multiply-sum (no ``tl.dot``:
H is often below ``tl.dot``'s minimum of 16, and the sums are exact in the compute dtype).
The backward recomputes the forward of its block. Its weight gradients are summed per program
into that program's own float64 row of a ``[programs, numel]`` buffer (no atomics), and the rows
are added in program order afterwards, so the result is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

# Coordinates per program: the [BLOCK, H, H] products of the mat-vecs stay within registers and
# shared memory for H <= 32 at this size.
BLOCK_SIZE = 16
# Most programs of a backward launch: each owns a float64 row of weight-gradient partial sums
# (~40 KiB at H = 20), so this caps that buffer at ~40 MiB; programs loop over blocks beyond.
MAX_BACKWARD_PROGRAMS = 1024


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _times_wt(inp, w_ptr, row0, H, K, HP: tl.constexpr, KP: tl.constexpr):
    """``inp [BLOCK, KP] @ W[row0 : row0 + H, :K]ᵀ -> [BLOCK, HP]`` (W row-major, K columns)."""
    j = tl.arange(0, HP)
    k = tl.arange(0, KP)
    mask = (j[:, None] < H) & (k[None, :] < K)
    w = tl.load(w_ptr + (row0 + j)[:, None] * K + k[None, :], mask=mask, other=0.0)
    return tl.sum(inp[:, None, :] * w[None, :, :], axis=2)


@triton.jit
def _times_w(dz, w_ptr, row0, H, K, HP: tl.constexpr, KP: tl.constexpr):
    """``dz [BLOCK, HP] @ W[row0 : row0 + H, :K] -> [BLOCK, KP]``."""
    j = tl.arange(0, HP)
    k = tl.arange(0, KP)
    mask = (j[:, None] < H) & (k[None, :] < K)
    w = tl.load(w_ptr + (row0 + j)[:, None] * K + k[None, :], mask=mask, other=0.0)
    return tl.sum(dz[:, :, None] * w[None, :, :], axis=1)


@triton.jit
def _add_outer(acc_ptr, row0, H, K, dz, inp, HP: tl.constexpr, KP: tl.constexpr):
    """``acc[(row0 + j)·K + k] += Σ_b dz[b, j]·inp[b, k]`` in float64."""
    j = tl.arange(0, HP)
    k = tl.arange(0, KP)
    mask = (j[:, None] < H) & (k[None, :] < K)
    d = tl.sum(dz[:, :, None] * inp[:, None, :], axis=0).to(tl.float64)
    ptrs = acc_ptr + (row0 + j)[:, None] * K + k[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + d, mask=mask)


@triton.jit
def _add_bias(acc_ptr, row0, H, dz, HP: tl.constexpr):
    """``acc[row0 + j] += Σ_b dz[b, j]`` in float64."""
    j = tl.arange(0, HP)
    ptrs = acc_ptr + row0 + j
    d = tl.sum(dz, axis=0).to(tl.float64)
    tl.store(ptrs, tl.load(ptrs, mask=j < H, other=0.0) + d, mask=j < H)


@triton.jit
def _add_cell_grads(d_wa, d_wh, d_b, H, KA, dzi, dzf, dzg, dzo, a, h, HP: tl.constexpr,
                    KAP: tl.constexpr):
    """A cell's weight gradients of one block: W̄_ih += Σ z̄ aᵀ, W̄_hh += Σ z̄ hᵀ, b̄ += Σ z̄."""
    _add_outer(d_wa, 0, H, KA, dzi, a, HP, KAP)
    _add_outer(d_wa, H, H, KA, dzf, a, HP, KAP)
    _add_outer(d_wa, 2 * H, H, KA, dzg, a, HP, KAP)
    _add_outer(d_wa, 3 * H, H, KA, dzo, a, HP, KAP)
    _add_outer(d_wh, 0, H, H, dzi, h, HP, HP)
    _add_outer(d_wh, H, H, H, dzf, h, HP, HP)
    _add_outer(d_wh, 2 * H, H, H, dzg, h, HP, HP)
    _add_outer(d_wh, 3 * H, H, H, dzo, h, HP, HP)
    _add_bias(d_b, 0, H, dzi, HP)
    _add_bias(d_b, H, H, dzf, HP)
    _add_bias(d_b, 2 * H, H, dzg, HP)
    _add_bias(d_b, 3 * H, H, dzo, HP)


@triton.jit
def _cell(a, wa_ptr, KA, h, wh_ptr, b_ptr, c_old, H, HP: tl.constexpr, KAP: tl.constexpr):
    """One LSTM cell on a block: gates (i, f, ĝ, o), tanh c', c', h'."""
    j = tl.arange(0, HP)
    zi = _times_wt(a, wa_ptr, 0, H, KA, HP, KAP) + _times_wt(h, wh_ptr, 0, H, H, HP, HP)
    zf = _times_wt(a, wa_ptr, H, H, KA, HP, KAP) + _times_wt(h, wh_ptr, H, H, H, HP, HP)
    zg = _times_wt(a, wa_ptr, 2 * H, H, KA, HP, KAP) + _times_wt(h, wh_ptr, 2 * H, H, H, HP, HP)
    zo = _times_wt(a, wa_ptr, 3 * H, H, KA, HP, KAP) + _times_wt(h, wh_ptr, 3 * H, H, H, HP, HP)
    zi += tl.load(b_ptr + j, mask=j < H, other=0.0)[None, :]
    zf += tl.load(b_ptr + H + j, mask=j < H, other=0.0)[None, :]
    zg += tl.load(b_ptr + 2 * H + j, mask=j < H, other=0.0)[None, :]
    zo += tl.load(b_ptr + 3 * H + j, mask=j < H, other=0.0)[None, :]
    i = tl.sigmoid(zi)
    f = tl.sigmoid(zf)
    g = _tanh(zg)
    o = tl.sigmoid(zo)
    c = f * c_old + i * g
    t = _tanh(c)
    return i, f, g, o, t, c, o * t


@triton.jit
def _cell_backward(i, f, g, o, t, c_old, dh, dc_in):
    """VJP of the cell's elementwise part: (dz_i, dz_f, dz_g, dz_o, ∂L/∂c_old)."""
    dc = dc_in + dh * o * (1.0 - t * t)
    return (dc * g * (i * (1.0 - i)), dc * c_old * (f * (1.0 - f)), dc * i * (1.0 - g * g),
            dh * t * (o * (1.0 - o)), dc * f)


@triton.jit
def _load_rows(ptr, rows, cols, n, H, HAS: tl.constexpr, dtype: tl.constexpr):
    """``[BLOCK, HP]`` rows of an ``[n, H]`` tensor; zeros where absent or out of bounds."""
    if HAS:
        mask = (rows[:, None] < n) & (cols[None, :] < H)
        return tl.load(ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(dtype)
    else:
        return tl.zeros([rows.shape[0], cols.shape[0]], dtype=dtype)


@triton.jit
def _preprocess(grad, rows, n, consts, dtype: tl.constexpr):
    """The cleaned g, its mask of finite entries, the log-branch mask and the inputs
    ``x [BLOCK, 2]`` = (log|g|/p, sign g) or (−1, e^p g)."""
    p = tl.load(consts + 0)
    exp_p = tl.load(consts + 1)
    threshold = tl.load(consts + 2)
    g = tl.load(grad + rows, mask=rows < n, other=0.0).to(dtype)
    finite = tl.abs(g) < float("inf")  # false for NaN and ±inf
    g = tl.where(finite, g, 0.0)
    mag = tl.abs(g)
    big = mag >= threshold
    x0 = tl.where(big, tl.log(tl.where(big, mag, 1.0)) / p, -1.0)
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)).to(dtype)
    x1 = tl.where(big, sign, g * exp_p)
    two = tl.arange(0, 2)
    x = tl.where(two[None, :] == 0, x0[:, None], x1[:, None])
    return g, finite, big, x


@triton.jit
def _lstm_rule_forward_kernel(
    grad,  # [n] g
    h1, c1, h2, c2,  # [n, H] the state (unused unless HAS_STATE)
    w_ih1, w_hh1, b1,  # [4H, 2], [4H, H], [4H]: cell 1 (b = b_ih + b_hh)
    w_ih2, w_hh2, b2,  # [4H, H], [4H, H], [4H]: cell 2
    w_head, b_head,  # [H], [1]: the head
    consts,  # [4] compute dtype: p, e^p, e^-p, output scale
    update,  # [n] out u
    h1_out, c1_out, h2_out, c2_out,  # [n, H] out: the new state
    skipped,  # [n] bool out: g was not finite
    n, H,
    HAS_STATE: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr,
):
    dtype = grad.dtype.element_ty
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HP)
    g, finite, big, x = _preprocess(grad, rows, n, consts, dtype)
    h1o = _load_rows(h1, rows, cols, n, H, HAS_STATE, dtype)
    c1o = _load_rows(c1, rows, cols, n, H, HAS_STATE, dtype)
    h2o = _load_rows(h2, rows, cols, n, H, HAS_STATE, dtype)
    c2o = _load_rows(c2, rows, cols, n, H, HAS_STATE, dtype)
    _, _, _, _, _, c1n, h1n = _cell(x, w_ih1, 2, h1o, w_hh1, b1, c1o, H, HP, 2)
    _, _, _, _, _, c2n, h2n = _cell(h1n, w_ih2, H, h2o, w_hh2, b2, c2o, H, HP, HP)
    wh = tl.load(w_head + cols, mask=cols < H, other=0.0)
    u = tl.load(consts + 3) * (tl.sum(h2n * wh[None, :], axis=1) + tl.load(b_head))
    rmask = rows < n
    tl.store(update + rows, tl.where(finite, u, 0.0), mask=rmask)
    tl.store(skipped + rows, (finite == 0).to(tl.int1), mask=rmask)
    keep = finite[:, None]
    offs = rows[:, None] * H + cols[None, :]
    mask = rmask[:, None] & (cols[None, :] < H)
    tl.store(h1_out + offs, tl.where(keep, h1n, h1o), mask=mask)
    tl.store(c1_out + offs, tl.where(keep, c1n, c1o), mask=mask)
    tl.store(h2_out + offs, tl.where(keep, h2n, h2o), mask=mask)
    tl.store(c2_out + offs, tl.where(keep, c2n, c2o), mask=mask)


@triton.jit
def _lstm_rule_backward_kernel(
    grad,  # [n] g
    h1, c1, h2, c2,  # [n, H] the state (unused unless HAS_STATE)
    w_ih1, w_hh1, b1, w_ih2, w_hh2, b2, w_head, b_head,  # the weights, as in the forward
    consts,  # [4]: p, e^p, e^-p, output scale
    gu,  # [n] ∂L/∂u (unused unless HAS_GU)
    gh1, gc1, gh2, gc2,  # [n, H] ∂L/∂state' (each unused unless its HAS_G* bit)
    d_grad,  # [n] out ∂L/∂g (unused unless WANT_DG)
    d_h1, d_c1, d_h2, d_c2,  # [n, H] out ∂L/∂state (unused unless WANT_DS)
    partial,  # float64 [programs, numel] out: this program's weight-gradient sums (zeroed)
    n, H, numel, blocks,
    HAS_STATE: tl.constexpr, HAS_GU: tl.constexpr, HAS_GH1: tl.constexpr,
    HAS_GC1: tl.constexpr, HAS_GH2: tl.constexpr, HAS_GC2: tl.constexpr,
    WANT_DG: tl.constexpr, WANT_DS: tl.constexpr, WANT_DW: tl.constexpr,
    HP: tl.constexpr, BLOCK: tl.constexpr,
):
    # The VJP, per coordinate (fastmeta/ops/lstm_rule.py: LSTMRuleFunction):
    #   h̄2' += s ū w;  w̄ = Σ s ū h2';  b̄ = Σ s ū
    #   c̄ = c̄' + h̄' o (1 − tanh² c');  c̄_old = c̄ f
    #   z̄ = (c̄ ĝ i(1−i), c̄ c_old f(1−f), c̄ i (1−ĝ²), h̄' tanh c' o(1−o))
    #   [x̄; h̄_old] = [W_ih | W_hh]ᵀ z̄;  [W̄_ih | W̄_hh] = Σ z̄ [x; h_old]ᵀ;  b̄ = Σ z̄
    #   ḡ = x̄0 / (p g) on the log branch, e^p x̄1 otherwise; 0 for a skipped g
    dtype = grad.dtype.element_ty
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, HP)
    two = tl.arange(0, 2)
    acc = partial + pid * numel
    # Offsets of each weight's gradient in a row of `partial` (kernels.h: LstmWeight order).
    o_hh1 = 8 * H
    o_b1 = o_hh1 + 4 * H * H
    o_ih2 = o_b1 + 4 * H
    o_hh2 = o_ih2 + 4 * H * H
    o_b2 = o_hh2 + 4 * H * H
    o_wh = o_b2 + 4 * H
    p = tl.load(consts + 0)
    exp_p = tl.load(consts + 1)
    scale = tl.load(consts + 3)
    wh = tl.load(w_head + cols, mask=cols < H, other=0.0)
    for blk in range(pid, blocks, programs):
        rows = blk * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < n
        g, finite, big, x = _preprocess(grad, rows, n, consts, dtype)
        h1o = _load_rows(h1, rows, cols, n, H, HAS_STATE, dtype)
        c1o = _load_rows(c1, rows, cols, n, H, HAS_STATE, dtype)
        h2o = _load_rows(h2, rows, cols, n, H, HAS_STATE, dtype)
        c2o = _load_rows(c2, rows, cols, n, H, HAS_STATE, dtype)
        i1, f1, g1, o1, t1, c1n, h1n = _cell(x, w_ih1, 2, h1o, w_hh1, b1, c1o, H, HP, 2)
        i2, f2, g2, o2, t2, c2n, h2n = _cell(h1n, w_ih2, H, h2o, w_hh2, b2, c2o, H, HP, HP)
        # Incoming gradients; a skipped coordinate sends nothing into the cells.
        live = finite & rmask
        su = tl.zeros([BLOCK], dtype=dtype)
        if HAS_GU:
            su = tl.where(live, scale * tl.load(gu + rows, mask=rmask, other=0.0), 0.0)
        uh1 = _load_rows(gh1, rows, cols, n, H, HAS_GH1, dtype)
        uc1 = _load_rows(gc1, rows, cols, n, H, HAS_GC1, dtype)
        uh2 = _load_rows(gh2, rows, cols, n, H, HAS_GH2, dtype)
        uc2 = _load_rows(gc2, rows, cols, n, H, HAS_GC2, dtype)
        keep = live[:, None]
        # Head and cell 2.
        dh2 = tl.where(keep, uh2, 0.0) + su[:, None] * wh[None, :]
        dzi, dzf, dzg, dzo, dc2o = _cell_backward(i2, f2, g2, o2, t2, c2o, dh2,
                                                  tl.where(keep, uc2, 0.0))
        dh1 = (tl.where(keep, uh1, 0.0) + _times_w(dzi, w_ih2, 0, H, H, HP, HP)
               + _times_w(dzf, w_ih2, H, H, H, HP, HP) + _times_w(dzg, w_ih2, 2 * H, H, H, HP, HP)
               + _times_w(dzo, w_ih2, 3 * H, H, H, HP, HP))
        dh2o = (_times_w(dzi, w_hh2, 0, H, H, HP, HP) + _times_w(dzf, w_hh2, H, H, H, HP, HP)
                + _times_w(dzg, w_hh2, 2 * H, H, H, HP, HP)
                + _times_w(dzo, w_hh2, 3 * H, H, H, HP, HP))
        if WANT_DW:
            _add_cell_grads(acc + o_ih2, acc + o_hh2, acc + o_b2, H, H, dzi, dzf, dzg, dzo,
                            h1n, h2o, HP, HP)
            d_wh = tl.sum(su[:, None] * h2n, axis=0).to(tl.float64)
            tl.store(acc + o_wh + cols, tl.load(acc + o_wh + cols, mask=cols < H, other=0.0)
                     + d_wh, mask=cols < H)
            tl.store(acc + o_wh + H, tl.load(acc + o_wh + H) + tl.sum(su.to(tl.float64)))
        # Cell 1.
        ei, ef, eg, eo, dc1o = _cell_backward(i1, f1, g1, o1, t1, c1o, dh1,
                                              tl.where(keep, uc1, 0.0))
        dx = (_times_w(ei, w_ih1, 0, H, 2, HP, 2) + _times_w(ef, w_ih1, H, H, 2, HP, 2)
              + _times_w(eg, w_ih1, 2 * H, H, 2, HP, 2) + _times_w(eo, w_ih1, 3 * H, H, 2, HP, 2))
        dh1o = (_times_w(ei, w_hh1, 0, H, H, HP, HP) + _times_w(ef, w_hh1, H, H, H, HP, HP)
                + _times_w(eg, w_hh1, 2 * H, H, H, HP, HP)
                + _times_w(eo, w_hh1, 3 * H, H, H, HP, HP))
        if WANT_DW:
            _add_cell_grads(acc, acc + o_hh1, acc + o_b1, H, 2, ei, ef, eg, eo, x, h1o, HP, 2)
        if WANT_DG:
            dx0 = tl.sum(tl.where(two[None, :] == 0, dx, 0.0), axis=1)
            dx1 = tl.sum(tl.where(two[None, :] == 1, dx, 0.0), axis=1)
            safe = tl.where(big, g, 1.0)
            dg = tl.where(big, dx0 / p / safe, dx1 * exp_p)
            tl.store(d_grad + rows, tl.where(finite, dg, 0.0), mask=rmask)
        if WANT_DS:
            # A skipped coordinate's state gradients pass through unchanged.
            offs = rows[:, None] * H + cols[None, :]
            mask = rmask[:, None] & (cols[None, :] < H)
            tl.store(d_h1 + offs, tl.where(keep, dh1o, uh1), mask=mask)
            tl.store(d_c1 + offs, tl.where(keep, dc1o, uc1), mask=mask)
            tl.store(d_h2 + offs, tl.where(keep, dh2o, uh2), mask=mask)
            tl.store(d_c2 + offs, tl.where(keep, dc2o, uc2), mask=mask)


def _consts(p: float, output_scale: float, like: torch.Tensor) -> torch.Tensor:
    # The threshold, p and e^p in the compute dtype, as torch rounds the reference's Python floats.
    return torch.tensor([p, math.exp(p), math.exp(-p), output_scale], dtype=like.dtype,
                        device=like.device)


def _hidden_pad(hidden: int) -> int:
    return max(2, triton.next_power_of_2(hidden))


def forward(grad: torch.Tensor, states: Sequence[torch.Tensor] | None,
            weights: Sequence[torch.Tensor], update: torch.Tensor,
            states_out: Sequence[torch.Tensor], skipped: torch.Tensor, *, p: float,
            output_scale: float) -> None:
    """Launches the forward (inputs validated by :func:`fastmeta.ops.lstm_rule.lstm_rule`)."""
    n, hidden = grad.shape[0], weights[1].shape[1]
    state_args = list(states) if states is not None else [grad] * 4  # unused when absent
    _lstm_rule_forward_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
        grad, *state_args, *weights, _consts(p, output_scale, grad), update, *states_out,
        skipped, n, hidden, HAS_STATE=states is not None, HP=_hidden_pad(hidden),
        BLOCK=BLOCK_SIZE,
    )


def backward(grad: torch.Tensor, states: Sequence[torch.Tensor] | None,
             weights: Sequence[torch.Tensor], grad_update: torch.Tensor | None,
             grad_states_out: Sequence[torch.Tensor | None], d_grad: torch.Tensor | None,
             d_states: Sequence[torch.Tensor | None] | None,
             d_weights: Sequence[torch.Tensor | None], *, p: float, output_scale: float) -> None:
    """Launches the backward; ``d_weights[k]`` (None: not wanted) receives the gradient of
    weight k, summed in float64. Only complete sets of state gradients are written."""
    n, hidden = grad.shape[0], weights[1].shape[1]
    blocks = triton.cdiv(n, BLOCK_SIZE)
    programs = min(blocks, MAX_BACKWARD_PROGRAMS)
    numel = sum(w.numel() for w in weights)
    want_dw = any(d is not None for d in d_weights)
    partial = torch.zeros(programs if want_dw else 1, numel, dtype=torch.float64,
                          device=grad.device)
    want_ds = d_states is not None and any(d is not None for d in d_states)
    d_state_args = [d if d is not None else torch.empty_like(states[k])
                     for k, d in enumerate(d_states)] if want_ds else [grad] * 4
    state_args = list(states) if states is not None else [grad] * 4
    go = [g if g is not None else grad for g in grad_states_out]
    _lstm_rule_backward_kernel[(programs,)](
        grad, *state_args, *weights, _consts(p, output_scale, grad),
        grad_update if grad_update is not None else grad, *go,
        d_grad if d_grad is not None else grad, *d_state_args, partial,
        n, hidden, numel, blocks,
        HAS_STATE=states is not None, HAS_GU=grad_update is not None,
        HAS_GH1=grad_states_out[0] is not None, HAS_GC1=grad_states_out[1] is not None,
        HAS_GH2=grad_states_out[2] is not None, HAS_GC2=grad_states_out[3] is not None,
        WANT_DG=d_grad is not None, WANT_DS=want_ds, WANT_DW=want_dw,
        HP=_hidden_pad(hidden), BLOCK=BLOCK_SIZE,
    )
    if want_dw:
        # Program rows in order: the same sums for the same n, whatever the scheduling.
        totals = partial.sum(0).split([w.numel() for w in weights])
        for d, total in zip(d_weights, totals):
            if d is not None:
                d.copy_(total.view(d.shape))
