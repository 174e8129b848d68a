"""fastmeta: fused, differentiable optimizer kernels for PyTorch, and meta-learning on them.

Layers, bottom up (see DESIGN.md): references and kernels (``fastmeta.ops``, ``csrc/``,
``fastmeta.kernels``) → drop-in optimizers (``fastmeta.optim``) → meta-learning.
"""

from __future__ import annotations

from fastmeta import backends
from fastmeta.backends import Impl, available

__version__ = "0.1.0"

__all__ = ["Impl", "__version__", "available", "backends"]
