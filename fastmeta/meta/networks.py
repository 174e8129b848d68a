"""The networks of the MAML paper: the sinusoid MLP and the conv-4 few-shot classifier.

Both are plain ``nn.Module`` s with no buffers that their forward mutates, so they run under
``torch.func.functional_call`` (and vmap) with a task's fast weights.

References:
    Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks.
    ICML 2017. https://arxiv.org/abs/1703.03400 (section 5.1: the MLP; section 5.2: conv-4,
    after Vinyals et al. 2016)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "Conv4"]

# Finn et al. 2017, section 5.1: "a neural network with 2 hidden layers of size 40 with ReLU".
SINUSOID_HIDDEN = (40, 40)
# Finn et al. 2017, section 5.2: "4 modules with a 3x3 convolutions and 64 filters".
CONV4_FILTERS = 64
CONV4_BLOCKS = 4
KERNEL_SIZE = 3
POOL = 2


class MLP(nn.Module):
    """A ReLU MLP; the defaults are the sinusoid network of Finn et al., 1-40-40-1.

    Args:
        in_features: input size.
        out_features: output size.
        hidden: the hidden layer sizes.

    Example:
        >>> import torch
        >>> from fastmeta.meta.networks import MLP
        >>> MLP()(torch.zeros(25, 10, 1)).shape
        torch.Size([25, 10, 1])
    """

    def __init__(self, in_features: int = 1, out_features: int = 1,
                 hidden: Sequence[int] = SINUSOID_HIDDEN) -> None:
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _conv_block(in_channels: int, filters: int, pool: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, filters, KERNEL_SIZE, padding=KERNEL_SIZE // 2),
        # Transductive BatchNorm as in MAML: always the statistics of the current batch, no
        # running statistics, so the forward mutates no buffer and works functionally.
        nn.BatchNorm2d(filters, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(POOL) if pool else nn.Identity(),
    )


class Conv4(nn.Module):
    """The conv-4 classifier of MAML: 4 blocks of [3x3 conv, BatchNorm, ReLU, 2x2 max-pool],
    then a linear head.

    BatchNorm never tracks running statistics (``track_running_stats=False``): it normalises
    with the statistics of the batch it sees, in training and in evaluation alike, which is the
    transductive setting of the MAML paper. The convolutions are padded ("same"), and a block
    whose input is already 1x1 skips its pooling, so small images such as the 8x8 digits
    (8 → 4 → 2 → 1 → 1) keep all four blocks; 28x28 Omniglot gives 28 → 14 → 7 → 3 → 1.

    Args:
        in_channels: image channels (1 for Omniglot and digits, 3 for MiniImageNet).
        ways: the number of classes, N.
        filters: filters of every conv layer (64 in the paper; 32 for MiniImageNet).
        image_size: the height and width of the (square) input images.

    Input ``[B, C, H, W]``, output ``[B, ways]`` logits.

    Example:
        >>> import torch
        >>> from fastmeta.meta.networks import Conv4
        >>> Conv4(in_channels=1, ways=5, image_size=28)(torch.zeros(5, 1, 28, 28)).shape
        torch.Size([5, 5])
    """

    def __init__(self, in_channels: int = 1, ways: int = 5, *, filters: int = CONV4_FILTERS,
                 image_size: int = 28) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("ways", ways), ("filters", filters),
                            ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.image_size = image_size
        size = image_size
        blocks = []
        for i in range(CONV4_BLOCKS):
            pool = size >= POOL
            blocks.append(_conv_block(in_channels if i == 0 else filters, filters, pool))
            if pool:
                size //= POOL
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(filters * size * size, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"Conv4 expects [B, C, {self.image_size}, {self.image_size}] "
                             f"images, got {list(x.shape)}")
        return self.head(self.features(x).flatten(1))
