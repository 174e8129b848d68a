"""Meta-learning on the fused engine: networks, shared training machinery, and algorithms."""

from __future__ import annotations

from fastmeta.meta.maml import MAML, MetaOutput
from fastmeta.meta.networks import MLP, Conv4

__all__ = ["MAML", "MLP", "Conv4", "MetaOutput"]
