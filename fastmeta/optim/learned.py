"""``Learned``: a trained :class:`~fastmeta.meta.LSTMOptimizer` rule as a ``torch.optim``
optimizer."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fastmeta.meta.lstm_optimizer import LSTMOptimizer
from fastmeta.ops.lstm_rule import LSTMState

__all__ = ["Learned"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)


class Learned(torch.optim.Optimizer):
    """Applies a learned coordinatewise rule: θ ← θ + rule(∇θ) for every parameter coordinate,
    each coordinate carrying its own LSTM state (Andrychowicz et al. 2016).

    Each step concatenates the gradients of a param group and runs the rule once over all of
    its coordinates. The per-parameter state (``h1, c1, h2, c2`` of shape ``[numel, hidden]``,
    ``step``, and ``nonfinite``: how many gradient entries were skipped as NaN/inf, which leave
    their coordinate and its state unchanged) is ordinary optimizer state, so ``state_dict()`` /
    ``load_state_dict()`` work as for any ``torch.optim`` optimizer. The rule itself is a
    constructor argument (as ``lr`` is for SGD): save it with :meth:`LSTMOptimizer.save`. The
    rule runs as one fused kernel call per param group (``rule.impl``, ``auto`` by default; see
    :func:`fastmeta.ops.lstm_rule.lstm_rule`).

    Args:
        params: parameters or param groups (float32 or float64, on the rule's device).
        rule: a :class:`LSTMOptimizer`, or the path of a rule file.

    Example:
        >>> import torch
        >>> from fastmeta.meta import LSTMOptimizer
        >>> from fastmeta.optim import Learned
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = Learned(model.parameters(), rule=LSTMOptimizer())
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> opt.step()
    """

    def __init__(self, params: Iterable[Any], rule: LSTMOptimizer | str | os.PathLike) -> None:
        if isinstance(rule, (str, os.PathLike)):
            rule = LSTMOptimizer.load(rule)
        if not isinstance(rule, LSTMOptimizer):
            raise TypeError(f"rule must be an LSTMOptimizer or the path of a rule file, got "
                            f"{type(rule).__name__}")
        super().__init__(params, defaults={})
        self.rule = rule
        device = rule.head.weight.device
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in SUPPORTED_DTYPES:
                    raise TypeError(f"Learned supports float32 and float64 params, got a "
                                    f"{p.dtype} param of shape {list(p.shape)}")
                if p.device != device:
                    raise ValueError(f"a param is on {p.device} but the rule is on {device}; "
                                     "move the rule (rule.to(device)) or the model")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One learned update of every param that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rule_dtype = self.rule.head.weight.dtype
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("Learned does not support sparse gradients")
            for p in params:
                if not self.state[p]:
                    state = self.state[p]
                    zeros = self.rule.initial_state(p.numel(), dtype=rule_dtype, device=p.device)
                    state.update(zip(LSTMState._fields, zeros))
                    state["step"] = 0
                    state["nonfinite"] = 0
            grads = torch.cat([p.grad.reshape(-1).to(rule_dtype) for p in params])
            # .to(): load_state_dict casts state to each param's dtype; the rule computes in
            # its own.
            hidden = LSTMState(*(torch.cat([self.state[p][name].to(rule_dtype) for p in params])
                                 for name in LSTMState._fields))
            update, new_hidden, skipped = self.rule.step(grads, hidden)
            offset = 0
            for p in params:
                n = p.numel()
                p.add_(update[offset:offset + n].view_as(p).to(p.dtype))
                state = self.state[p]
                for name, value in zip(LSTMState._fields, new_hidden):
                    state[name] = value[offset:offset + n]
                state["step"] += 1
                state["nonfinite"] += int(skipped[offset:offset + n].sum())
                offset += n
        return loss
