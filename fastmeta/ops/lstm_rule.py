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

Reference:
    Andrychowicz, Denil, Gómez, Hoffman, Pfau, Schaul, Shillingford, de Freitas. Learning to
    learn by gradient descent by gradient descent. NeurIPS 2016. https://arxiv.org/abs/1606.04474
    (section 3.1 and appendix A: the preprocessing)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["LSTMState", "lstm_rule_reference", "preprocess_gradient"]


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
