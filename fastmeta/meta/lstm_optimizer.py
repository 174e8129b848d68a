"""The learned update rule of Andrychowicz et al. (2016): a coordinatewise two-layer LSTM.

:class:`LSTMOptimizer` holds the rule's weights (two ``nn.LSTMCell`` s of 20 units and a linear
head, shared by every coordinate) and applies it to a flat gradient; the maths and the policy for
non-finite gradients are in :mod:`fastmeta.ops.lstm_rule`. Each step is one call of the fused op
:func:`fastmeta.ops.lstm_rule.lstm_rule` (C++ on the CPU, Triton on CUDA, forward and backward),
or of the ``nn.LSTMCell`` reference with ``impl="reference"``. Use a trained rule in an ordinary
training loop with :class:`fastmeta.optim.Learned`.

A rule file holds the architecture and the weights only (tensors, numbers and strings), so it
loads with ``torch.load(weights_only=True)``; :meth:`LSTMOptimizer.load` checks that the file is
a rule of the architecture it describes before building it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmeta.backends import Impl
from fastmeta.ops.lstm_rule import LSTMRuleWeights, LSTMState, lstm_rule, lstm_rule_reference

__all__ = ["RULE_FORMAT", "LSTMOptimizer", "LSTMState"]

#: The ``format`` field of a rule file.
RULE_FORMAT = "fastmeta.LSTMOptimizer/1"
# Andrychowicz et al. 2016, section 3.1: "two-layer LSTMs with 20 hidden units in each layer";
# appendix A: p = 10. The output scale 0.1 follows their released code.
HIDDEN = 20
PREPROCESS_P = 10.0
OUTPUT_SCALE = 0.1


class LSTMOptimizer(nn.Module):
    """The coordinatewise LSTM rule: ``update, state = rule(grad, state)``; θ' = θ + update.

    Args:
        hidden_size: units of each of the two LSTM layers (20 in the paper).
        preprocess_p: p of the gradient preprocessing (10 in the paper).
        output_scale: the factor on the LSTM's output (0.1).
        impl: which implementation runs the rule (see :mod:`fastmeta.backends`): ``auto`` (the
            fused kernels where they run), ``native``, ``triton`` or ``reference`` (the
            ``nn.LSTMCell`` modules themselves). Not part of the rule file; set ``rule.impl``.

    Example:
        >>> import torch
        >>> from fastmeta.meta import LSTMOptimizer
        >>> rule = LSTMOptimizer()
        >>> update, state = rule(torch.randn(1000))
        >>> update.shape, state.h1.shape
        (torch.Size([1000]), torch.Size([1000, 20]))
    """

    def __init__(self, hidden_size: int = HIDDEN, *, preprocess_p: float = PREPROCESS_P,
                 output_scale: float = OUTPUT_SCALE, impl: Impl | str = Impl.AUTO) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be an int >= 1, got {hidden_size!r}")
        if not preprocess_p > 0:
            raise ValueError(f"preprocess_p must be > 0, got {preprocess_p!r}")
        if not output_scale > 0:
            raise ValueError(f"output_scale must be > 0, got {output_scale!r}")
        self.hidden_size = hidden_size
        self.preprocess_p = float(preprocess_p)
        self.output_scale = float(output_scale)
        self.impl = Impl(impl)
        self.cell1 = nn.LSTMCell(2, hidden_size)
        self.cell2 = nn.LSTMCell(hidden_size, hidden_size)
        self.head = nn.Linear(hidden_size, 1)

    def initial_state(self, n: int, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> LSTMState:
        """Zero state for ``n`` coordinates."""
        w = self.head.weight
        return LSTMState.zeros(n, self.hidden_size, dtype=dtype or w.dtype,
                               device=device if device is not None else w.device)

    def forward(self, grad: torch.Tensor, state: LSTMState | None = None
                ) -> tuple[torch.Tensor, LSTMState]:
        """``grad [n]`` -> ``(update [n], new_state)``. Non-finite gradients: update 0 and the
        old state for those coordinates (see :mod:`fastmeta.ops.lstm_rule`)."""
        update, new_state, _ = self.step(grad, state)
        return update, new_state

    def step(self, grad: torch.Tensor, state: LSTMState | None = None
             ) -> tuple[torch.Tensor, LSTMState, torch.Tensor]:
        """:meth:`forward`, plus the ``[n]`` mask of coordinates skipped as non-finite."""
        if not isinstance(grad, torch.Tensor) or grad.dim() != 1:
            raise ValueError(f"grad must be a flat [n] tensor, got "
                             f"{list(grad.shape) if isinstance(grad, torch.Tensor) else grad!r}")
        w = self.head.weight
        if grad.dtype != w.dtype or grad.device != w.device:
            raise ValueError(f"grad is {grad.dtype} on {grad.device} but the rule's weights are "
                             f"{w.dtype} on {w.device}; convert one of them (rule.to(...))")
        if state is not None:
            for name, t in zip(LSTMState._fields, state):
                if t.shape != (grad.shape[0], self.hidden_size):
                    raise ValueError(f"state.{name} has shape {list(t.shape)}, expected "
                                     f"[{grad.shape[0]}, {self.hidden_size}]")
        if self.impl is Impl.REFERENCE:
            return lstm_rule_reference(grad, state, self.cell1, self.cell2, self.head,
                                       p=self.preprocess_p, output_scale=self.output_scale)
        weights = LSTMRuleWeights.from_modules(self.cell1, self.cell2, self.head)
        return lstm_rule(grad, state, weights, p=self.preprocess_p,
                         output_scale=self.output_scale, impl=self.impl)

    # ---- files -------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "preprocess_p": self.preprocess_p,
                "output_scale": self.output_scale}

    def save(self, path: str | os.PathLike) -> None:
        """Writes the rule (architecture and weights) to ``path``."""
        payload = {"format": RULE_FORMAT, "config": self.config(),
                   "dtype": str(self.head.weight.dtype).removeprefix("torch."),
                   "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike, *, map_location: Any = "cpu") -> LSTMOptimizer:
        """Reads a rule written by :meth:`save` (with ``weights_only=True``).

        Raises:
            ValueError: the file is not a rule file, or its weights do not fit the
                architecture it names.
        """
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != RULE_FORMAT:
            raise ValueError(f"{path} is not a fastmeta LSTMOptimizer rule file (expected "
                             f"format {RULE_FORMAT!r})")
        config, weights = payload.get("config"), payload.get("state_dict")
        known = set(cls(HIDDEN).config())
        if not isinstance(config, dict) or set(config) != known or not isinstance(weights, dict):
            raise ValueError(f"{path}: a rule file needs a config with the keys {sorted(known)} "
                             "and a state_dict")
        rule = cls(**config)
        expected = {k: tuple(v.shape) for k, v in rule.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in weights.items()}
        if expected != got:
            wrong = sorted(set(expected.items()) ^ set(got.items()))
            raise ValueError(f"{path}: the weights do not fit the architecture {config}"
                             f" (mismatched entries: {wrong[:4]})")
        dtype = getattr(torch, str(payload.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{path}: unknown dtype {payload.get('dtype')!r}")
        device = next(iter(weights.values())).device
        rule = rule.to(dtype=dtype, device=device)  # as saved, on map_location's device
        rule.load_state_dict(weights)
        return rule

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, preprocess_p={self.preprocess_p}, "
                f"output_scale={self.output_scale}, impl={self.impl.value}")
