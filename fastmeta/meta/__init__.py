"""Meta-learning on the fused engine: networks, shared training machinery, and algorithms."""

from __future__ import annotations

from fastmeta.meta.cavia import CAVIA, CAVIAOutput
from fastmeta.meta.lstm_optimizer import LSTMOptimizer, LSTMState
from fastmeta.meta.maml import MAML, MetaOutput
from fastmeta.meta.networks import MLP, Conv4, FiLMConv4

__all__ = ["CAVIA", "MAML", "MLP", "CAVIAOutput", "Conv4", "FiLMConv4", "LSTMOptimizer",
           "LSTMState", "MetaOutput"]
