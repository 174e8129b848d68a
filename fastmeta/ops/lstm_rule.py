"""The coordinatewise LSTM update rule of Andrychowicz et al. (2016): the PyTorch reference.

Every parameter coordinate i runs the same small two-layer LSTM on its preprocessed gradient,
and the LSTM's output is that coordinate's update:

.. math::
    \\begin{aligned}
    x_i &= \\begin{cases}
        \\big(\\log|g_i| / p,\\ \\operatorname{sign} g_i\\big) & |g_i| \\ge e^{-p} \\\\
        \\big(-1,\\ e^{p} g_i\\big) & \\text{otherwise}
    \\end{cases} \\\\
    (h^1_i, c^1_i) &= \\mathrm{LSTMCell}_1\\big(x_i, (h^1_i, c^1_i)\\big), \\qquad
    (h^2_i, c^2_i) = \\mathrm{LSTMCell}_2\\big(h^1_i, (h^2_i, c^2_i)\\big) \\\\
    \\theta_i' &= \\theta_i + s \\cdot (w^\\top h^2_i + b)
    \\end{aligned}

with p = 10 and the output scale s = 0.1 in the paper. The coordinates are the batch rows of
``nn.LSTMCell``: the reference below *is* ``nn.LSTMCell``, so that a fused kernel can be
checked against it.

Non-finite gradients: a coordinate whose gradient is NaN or ±inf gets no update and keeps its
hidden state, so one bad gradient cannot poison the state it would otherwise carry into every
later step (:func:`lstm_rule_reference` returns which coordinates were skipped).

Two entry points:

* :func:`lstm_rule_reference` takes the ``nn.LSTMCell`` modules: the spec and the test oracle.
* :func:`lstm_rule` takes the weights as tensors (:class:`LSTMRuleWeights`) and runs one fused
  pass over the coordinates (``csrc/lstm_rule.cpp`` on the CPU, ``fastmeta/kernels/lstm_rule.py``
  on CUDA) with a fused, hand-written backward (:class:`LSTMRuleFunction`), or the reference.

Reference:
    Andrychowicz, Denil, Gómez, Hoffman, Pfau, Schaul, Shillingford, de Freitas. Learning to
    learn by gradient descent by gradient descent. NeurIPS 2016. https://arxiv.org/abs/1606.04474
    (section 3.1 and appendix A: the preprocessing)
"""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

import torch
from torch import nn

from fastmeta import backends
from fastmeta._autograd import Function
from fastmeta.backends import Impl

__all__ = [
    "LSTMRuleFunction",
    "LSTMRuleWeights",
    "LSTMState",
    "lstm_rule",
    "lstm_rule_reference",
    "lstm_rule_weights_reference",
    "preprocess_gradient",
]

# Andrychowicz et al. 2016, appendix A: p = 10. The output scale 0.1 follows their released code.
DEFAULT_P = 10.0
DEFAULT_OUTPUT_SCALE = 0.1
# The dtypes of the fused kernels (csrc/lstm_rule.cpp dispatches on these two only).
FUSED_DTYPES = (torch.float32, torch.float64)
# Must match csrc/kernels.h: enum DType.
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


class LSTMState(NamedTuple):
    """The per-coordinate state of the rule: four ``[n, hidden]`` tensors."""

    h1: torch.Tensor
    c1: torch.Tensor
    h2: torch.Tensor
    c2: torch.Tensor

    @classmethod
    def zeros(cls, n: int, hidden: int, *, dtype: torch.dtype,
              device: torch.device | str | None = None) -> LSTMState:
        return cls(*(torch.zeros(n, hidden, dtype=dtype, device=device) for _ in range(4)))


def preprocess_gradient(grad: torch.Tensor, p: float) -> torch.Tensor:
    """``[n]`` gradients -> ``[n, 2]`` LSTM inputs (Andrychowicz et al., appendix A).

    Large gradients become (log-magnitude / p, sign), small ones (|g| < e^-p) become
    (-1, e^p · g): both features stay in [-1, 1]-ish ranges over many orders of magnitude.
    Differentiable in ``grad`` (the log branch's derivative is 1/(p·g), finite where it is
    taken; the small branch's is e^p).
    """
    threshold = math.exp(-p)
    magnitude = grad.abs()
    large = magnitude >= threshold
    # The log is only taken where it is selected; elsewhere it sees the threshold (finite).
    log_part = torch.log(torch.where(large, magnitude, torch.full_like(magnitude, threshold))) / p
    first = torch.where(large, log_part, torch.full_like(grad, -1.0))
    second = torch.where(large, torch.sign(grad), grad * math.exp(p))
    return torch.stack([first, second], dim=-1)


def lstm_rule_reference(
    grad: torch.Tensor,
    state: LSTMState | None,
    cell1: nn.LSTMCell,
    cell2: nn.LSTMCell,
    head: nn.Linear,
    *,
    p: float = 10.0,
    output_scale: float = 0.1,
) -> tuple[torch.Tensor, LSTMState, torch.Tensor]:
    """One step of the rule for ``n`` coordinates, with ``nn.LSTMCell``.

    Args:
        grad: ``[n]`` gradients (may carry a graph: second derivatives of meta-training).
        state: the previous :class:`LSTMState` (``[n, hidden]`` each), or None for zeros.
        cell1, cell2: the two ``nn.LSTMCell`` s (2 → hidden, hidden → hidden).
        head: ``nn.Linear(hidden, 1)``.
        p: the preprocessing constant.
        output_scale: s, the factor on the head's output.

    Returns:
        ``(update [n], new_state, skipped [n] bool)``: θ' = θ + update; coordinates with a
        non-finite gradient have update 0 and their old state (``skipped``).
    """
    hidden = cell1.hidden_size
    if state is None:
        state = LSTMState.zeros(grad.shape[0], hidden, dtype=grad.dtype, device=grad.device)
    skipped = ~torch.isfinite(grad)
    any_skipped = bool(skipped.any())
    clean = torch.where(skipped, torch.zeros_like(grad), grad) if any_skipped else grad
    x = preprocess_gradient(clean, p)
    h1, c1 = cell1(x, (state.h1, state.c1))
    h2, c2 = cell2(h1, (state.h2, state.c2))
    update = output_scale * head(h2).squeeze(-1)
    new_state = LSTMState(h1, c1, h2, c2)
    if any_skipped:
        keep = skipped.unsqueeze(-1)
        update = torch.where(skipped, torch.zeros_like(update), update)
        new_state = LSTMState(*(torch.where(keep, old, new)
                                for old, new in zip(state, new_state)))
    return update, new_state, skipped


# ---- The fused op ----------------------------------------------------------------------------


class LSTMRuleWeights(NamedTuple):
    """The rule's weights as tensors, in the order of the kernels (``csrc/kernels.h``:
    ``LstmWeight``). ``H`` is the hidden size; the gate order is torch's (i, f, g, o)."""

    weight_ih1: torch.Tensor  #: [4H, 2]
    weight_hh1: torch.Tensor  #: [4H, H]
    bias1: torch.Tensor  #: [4H], ``bias_ih + bias_hh`` of the first cell
    weight_ih2: torch.Tensor  #: [4H, H]
    weight_hh2: torch.Tensor  #: [4H, H]
    bias2: torch.Tensor  #: [4H]
    head_weight: torch.Tensor  #: [H]
    head_bias: torch.Tensor  #: [1]

    @classmethod
    def from_modules(cls, cell1: nn.LSTMCell, cell2: nn.LSTMCell, head: nn.Linear
                     ) -> LSTMRuleWeights:
        """The weights of two ``nn.LSTMCell`` s and an ``nn.Linear(H, 1)`` head, as views and
        sums that autograd differentiates back into the modules' parameters."""

        def bias(cell: nn.LSTMCell) -> torch.Tensor:
            w = cell.weight_ih
            b_ih = cell.bias_ih if cell.bias_ih is not None else w.new_zeros(w.shape[0])
            return b_ih + cell.bias_hh if cell.bias_hh is not None else b_ih

        head_bias = head.bias if head.bias is not None else head.weight.new_zeros(1)
        return cls(cell1.weight_ih, cell1.weight_hh, bias(cell1), cell2.weight_ih,
                   cell2.weight_hh, bias(cell2), head.weight.reshape(-1), head_bias.reshape(1))


def lstm_rule_weights_reference(
    grad: torch.Tensor,
    state: LSTMState | None,
    weights: LSTMRuleWeights,
    *,
    p: float = DEFAULT_P,
    output_scale: float = DEFAULT_OUTPUT_SCALE,
) -> tuple[torch.Tensor, LSTMState, torch.Tensor]:
    """:func:`lstm_rule_reference` on weight tensors: the same ATen op as ``nn.LSTMCell``
    (``torch.lstm_cell``), so the same maths. Plain differentiable torch, to any order."""
    w = weights
    hidden = w.weight_hh1.shape[1]
    if state is None:
        state = LSTMState.zeros(grad.shape[0], hidden, dtype=grad.dtype, device=grad.device)
    skipped = ~torch.isfinite(grad)
    any_skipped = bool(skipped.any())
    clean = torch.where(skipped, torch.zeros_like(grad), grad) if any_skipped else grad
    x = preprocess_gradient(clean, p)
    h1, c1 = torch.lstm_cell(x, (state.h1, state.c1), w.weight_ih1, w.weight_hh1, w.bias1, None)
    h2, c2 = torch.lstm_cell(h1, (state.h2, state.c2), w.weight_ih2, w.weight_hh2, w.bias2, None)
    update = output_scale * (h2 @ w.head_weight + w.head_bias)
    new_state = LSTMState(h1, c1, h2, c2)
    if any_skipped:
        keep = skipped.unsqueeze(-1)
        update = torch.where(skipped, torch.zeros_like(update), update)
        new_state = LSTMState(*(torch.where(keep, old, new)
                                for old, new in zip(state, new_state)))
    return update, new_state, skipped


class _Config:
    """The non-tensor input of :class:`LSTMRuleFunction`."""

    __slots__ = ("impl", "hidden", "p", "output_scale")

    def __init__(self, impl: Impl, hidden: int, p: float, output_scale: float) -> None:
        self.impl = impl
        self.hidden = hidden
        self.p = p
        self.output_scale = output_scale


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _kernel_forward(cfg: _Config, grad: torch.Tensor, states: list, weights: list):
    """``(update, h1', c1', h2', c2', skipped)`` from the fused forward kernel."""
    n, hidden = grad.shape[0], cfg.hidden
    update = torch.empty_like(grad)
    outs = [grad.new_empty(n, hidden) for _ in range(4)]
    skipped = torch.empty(n, dtype=torch.bool, device=grad.device)
    if n == 0:  # nothing to compute; an empty tensor's address may be 0
        return (update, *outs, skipped)
    weights = [w.contiguous() for w in weights]
    have_state = states[0] is not None
    states = [s.contiguous() for s in states] if have_state else []
    if cfg.impl is Impl.NATIVE:
        backends.native().lstm_rule_forward(
            grad.data_ptr(), [s.data_ptr() for s in states], [w.data_ptr() for w in weights],
            update.data_ptr(), [o.data_ptr() for o in outs], skipped.data_ptr(), n, hidden,
            _DTYPE_CODES[grad.dtype], cfg.p, cfg.output_scale)
    else:
        backends.triton_kernels("lstm_rule").forward(
            grad, states or None, weights, update, outs, skipped, p=cfg.p,
            output_scale=cfg.output_scale)
    return (update, *outs, skipped)


def _kernel_backward(cfg: _Config, grad, states, weights, grad_outputs, needs):
    """The fused VJP: gradients of (grad, h1, c1, h2, c2, *weights), None where not needed."""
    n, hidden = grad.shape[0], cfg.hidden
    have_state = states[0] is not None
    # The kernels write row-major outputs, whatever the layout of the input they belong to (a
    # transposed view reads through a contiguous copy): empty_like alone would keep its strides.
    contiguous = torch.contiguous_format
    d_grad = torch.empty_like(grad, memory_format=contiguous) if needs[0] else None
    d_states = [torch.empty_like(s, memory_format=contiguous) if have_state and need else None
                for s, need in zip(states, needs[1:5])]
    # Weight gradients are sums over the coordinates: zero when there are none.
    new_weight_grad = torch.empty_like if n > 0 else torch.zeros_like
    d_weights = [new_weight_grad(w, memory_format=contiguous) if need else None
                 for w, need in zip(weights, needs[5:])]
    if n > 0:
        weights_c = [w.contiguous() for w in weights]
        states_c = [s.contiguous() for s in states] if have_state else []
        go = [g.contiguous() if g is not None else None for g in grad_outputs]
        if cfg.impl is Impl.NATIVE:
            backends.native().lstm_rule_backward(
                grad.data_ptr(), [s.data_ptr() for s in states_c],
                [w.data_ptr() for w in weights_c], _ptr(go[0]), [_ptr(g) for g in go[1:5]],
                _ptr(d_grad), [_ptr(d) for d in d_states] if have_state else [],
                [_ptr(d) for d in d_weights], n, hidden, _DTYPE_CODES[grad.dtype], cfg.p,
                cfg.output_scale)
        else:
            backends.triton_kernels("lstm_rule").backward(
                grad, states_c or None, weights_c, go[0], go[1:5], d_grad,
                d_states if have_state else None, d_weights, p=cfg.p,
                output_scale=cfg.output_scale)
    return [d_grad, *d_states, *d_weights]


def _reference_vjp(cfg: _Config, grad, states, weights, grad_outputs, needs):
    """The VJP by ``torch.func.vjp`` of :func:`lstm_rule_weights_reference`: differentiable
    again, for ``create_graph=True`` (second derivatives through the rule)."""
    inputs = [grad, *states, *weights]
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs[i]]
    result: list = [None] * len(inputs)
    if not wanted:
        return result

    def forward(*primals):
        args = list(inputs)
        for i, t in zip(wanted, primals):
            args[i] = t
        st = LSTMState(*args[1:5]) if args[1] is not None else None
        update, new_state, _ = lstm_rule_weights_reference(
            args[0], st, LSTMRuleWeights(*args[5:]), p=cfg.p, output_scale=cfg.output_scale)
        return (update, *new_state)

    outs, vjp_fn = torch.func.vjp(forward, *(inputs[i] for i in wanted))
    cotangents = tuple(g if g is not None else torch.zeros_like(o)
                       for o, g in zip(outs, grad_outputs))
    for i, gi in zip(wanted, vjp_fn(cotangents)):
        result[i] = gi
    return result


class LSTMRuleFunction(Function):
    """One fused step of the rule, with a fused backward.

    Inputs: ``(cfg, grad, h1, c1, h2, c2, *LSTMRuleWeights)`` (the four states all None on a
    first step); outputs ``(update, h1', c1', h2', c2', skipped)``. Only the inputs are saved:
    the backward recomputes each block's gates (no [n, 4H] activations are kept).

    Backward, per coordinate (notation of ``csrc/lstm_rule.cpp``), with ū, h̄', c̄' incoming:

    .. math::
        \\begin{aligned}
        \\bar h_2' &\\mathrel{+}= s\\bar u\\, w, \\quad \\bar w = \\textstyle\\sum s\\bar u\\, h_2',
            \\quad \\bar b = \\textstyle\\sum s \\bar u \\\\
        \\bar c &= \\bar c' + \\bar h' o (1 - \\tanh^2 c'), \\quad \\bar c_{old} = \\bar c f \\\\
        \\bar z &= \\big(\\bar c\\, \\hat g\\, i(1-i),\\ \\bar c\\, c_{old} f(1-f),\\
            \\bar c\\, i (1-\\hat g^2),\\ \\bar h' \\tanh c'\\, o(1-o)\\big) \\\\
        \\overline{[x; h]} &= [W_{ih} | W_{hh}]^\\top \\bar z, \\quad
            \\overline{[W_{ih} | W_{hh}]} = \\textstyle\\sum \\bar z\\, [x; h]^\\top, \\quad
            \\bar b = \\textstyle\\sum \\bar z \\\\
        \\bar g &= \\bar x_0 / (p g) \\ (|g| \\ge e^{-p}), \\qquad
            \\bar g = e^p \\bar x_1 \\ \\text{(otherwise)}
        \\end{aligned}

    cell 2 first (its input h1' gets h̄1' added), then cell 1. A skipped (non-finite) coordinate
    passes its state gradients through and gets ḡ = 0. Weight gradients are summed over the
    coordinates in a fixed order (float64 partial sums per chunk), independent of the thread
    count.

    Under ``create_graph=True`` the backward is the VJP of the reference instead (differentiable
    torch ops), so second derivatives are exact but not fused.
    """

    @staticmethod
    def forward(cfg, grad, h1, c1, h2, c2, *weights):
        return _kernel_forward(cfg, grad, [h1, c1, h2, c2], list(weights))

    @staticmethod
    def setup_context(ctx, inputs, output):
        cfg, *tensors = inputs
        ctx.save_for_backward(*tensors)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(output[5])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grad_outputs):
        grad, *rest = ctx.saved_tensors
        states, weights = rest[:4], rest[4:]
        grad_outputs = grad_outputs[:5]  # skipped is not differentiable
        needs = ctx.needs_input_grad[1:]
        differentiable = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (*ctx.saved_tensors, *grad_outputs))
        if differentiable:
            grads = _reference_vjp(ctx.cfg, grad, states, weights, grad_outputs, needs)
        else:
            grads = _kernel_backward(ctx.cfg, grad, states, weights, grad_outputs, needs)
        return (None, *grads)


_warned_dtypes: set[torch.dtype] = set()


def _check(op: str, grad, state, weights) -> int:
    """Validates the op's inputs; returns the hidden size."""
    if not isinstance(grad, torch.Tensor) or grad.dim() != 1:
        raise ValueError(f"{op}: grad must be a flat [n] tensor, got "
                         f"{list(grad.shape) if isinstance(grad, torch.Tensor) else grad!r}")
    if not grad.is_floating_point():
        raise TypeError(f"{op}: grad must be a floating-point tensor, got {grad.dtype}")
    if not isinstance(weights, LSTMRuleWeights):
        raise TypeError(f"{op}: weights must be an LSTMRuleWeights, got {type(weights).__name__}")
    hidden = weights.weight_hh1.shape[-1]
    n = grad.shape[0]
    shapes = {"weight_ih1": (4 * hidden, 2), "weight_hh1": (4 * hidden, hidden),
              "bias1": (4 * hidden,), "weight_ih2": (4 * hidden, hidden),
              "weight_hh2": (4 * hidden, hidden), "bias2": (4 * hidden,),
              "head_weight": (hidden,), "head_bias": (1,)}
    for name, t in zip(LSTMRuleWeights._fields, weights):
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{op}: weights.{name} has shape {list(t.shape)}, expected "
                             f"{list(shapes[name])} for hidden size {hidden}")
        if t.dtype != grad.dtype or t.device != grad.device:
            raise ValueError(f"{op}: weights.{name} is {t.dtype} on {t.device} but grad is "
                             f"{grad.dtype} on {grad.device}")
    if state is not None:
        for name, t in zip(LSTMState._fields, state):
            if t.shape != (n, hidden):
                raise ValueError(f"{op}: state.{name} has shape {list(t.shape)}, expected "
                                 f"[{n}, {hidden}]")
            if t.dtype != grad.dtype or t.device != grad.device:
                raise ValueError(f"{op}: state.{name} is {t.dtype} on {t.device} but grad is "
                                 f"{grad.dtype} on {grad.device}")
    return hidden


def lstm_rule(
    grad: torch.Tensor,
    state: LSTMState | None,
    weights: LSTMRuleWeights,
    *,
    p: float = DEFAULT_P,
    output_scale: float = DEFAULT_OUTPUT_SCALE,
    impl: Impl | str = Impl.AUTO,
) -> tuple[torch.Tensor, LSTMState, torch.Tensor]:
    """One step of the rule for ``n`` coordinates in one fused pass, differentiable.

    Computes exactly :func:`lstm_rule_reference` (see the module docstring for the maths and
    the non-finite policy). Differentiable w.r.t. ``grad`` (second-order meta-training), the
    state and every weight, through a fused backward. Under ``create_graph=True`` the backward
    runs the reference's VJP instead, so higher derivatives are exact (not fused). The fused
    kernels run float32 and float64; other dtypes run the reference (``impl="auto"``, with a
    warning once) or raise (an explicit ``impl``). Not supported under ``torch.func.vmap``.

    Args:
        grad: ``[n]`` gradients.
        state: the previous :class:`LSTMState` (``[n, H]`` each), or None for zeros.
        weights: :class:`LSTMRuleWeights` (e.g. ``LSTMRuleWeights.from_modules(...)``).
        p: the preprocessing constant.
        output_scale: s, the factor on the head's output.
        impl: which implementation runs; see :mod:`fastmeta.backends`.

    Returns:
        ``(update [n], new_state, skipped [n] bool)``.

    Example:
        >>> from torch import nn
        >>> cells = nn.LSTMCell(2, 20), nn.LSTMCell(20, 20)
        >>> weights = LSTMRuleWeights.from_modules(*cells, nn.Linear(20, 1))
        >>> update, state, skipped = lstm_rule(torch.randn(1000), None, weights)
        >>> update.shape, state.c2.shape
        (torch.Size([1000]), torch.Size([1000, 20]))
    """
    op = "lstm_rule"
    hidden = _check(op, grad, state, weights)
    which = backends.resolve(impl, grad.device, op=op, record=False)
    if which is not Impl.REFERENCE and grad.dtype not in FUSED_DTYPES:
        if Impl(impl) is not Impl.AUTO or os.environ.get(backends.IMPL_ENV_VAR, "").strip():
            raise TypeError(f"{op}: the fused kernels run float32 and float64, not "
                            f"{grad.dtype}; use impl='reference'")
        if grad.dtype not in _warned_dtypes:
            _warned_dtypes.add(grad.dtype)
            warnings.warn(f"fastmeta: {op} falls back to the PyTorch reference for {grad.dtype}"
                          " (the fused kernels run float32 and float64)", RuntimeWarning,
                          stacklevel=2)
        which = Impl.REFERENCE
    backends.note(op, which)
    if which is Impl.REFERENCE:
        return lstm_rule_weights_reference(grad, state, weights, p=p, output_scale=output_scale)
    cfg = _Config(which, hidden, float(p), float(output_scale))
    states = tuple(state) if state is not None else (None,) * 4
    update, h1, c1, h2, c2, skipped = LSTMRuleFunction.apply(cfg, grad, *states, *weights)
    return update, LSTMState(h1, c1, h2, c2), skipped
