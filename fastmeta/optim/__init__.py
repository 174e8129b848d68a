"""Drop-in replacements for ``torch.optim``: the same classes, one fused call per param group.

>>> from fastmeta.optim import Adam  # instead of torch.optim.Adam
"""

from __future__ import annotations

from fastmeta.optim.adagrad import Adagrad
from fastmeta.optim.adam import Adam, AdamW
from fastmeta.optim.hypergrad import SGDHD, AdamHD
from fastmeta.optim.learned import Learned
from fastmeta.optim.rmsprop import RMSprop
from fastmeta.optim.sgd import SGD

__all__ = ["SGD", "SGDHD", "Adagrad", "Adam", "AdamHD", "AdamW", "Learned", "RMSprop"]
