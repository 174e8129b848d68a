"""The networks of the MAML and CAVIA papers: the sinusoid MLP, the conv-4 few-shot classifier,
and conv-4 conditioned on a task context through FiLM.

All are plain ``nn.Module`` s with no buffers that their forward mutates, so they run under
``torch.func.functional_call`` (and vmap) with a task's fast weights.

References:
    Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks.
    ICML 2017. https://arxiv.org/abs/1703.03400 (section 5.1: the MLP; section 5.2: conv-4,
    after Vinyals et al. 2016)
    Zintgraf, Shiarlis, Kurin, Hofmann, Whiteson. Fast Context Adaptation via Meta-Learning.
    ICML 2019. https://arxiv.org/abs/1810.03642 (section 5.2: conv-4 with FiLM layers)
    Perez, Strub, de Vries, Dumoulin, Courville. FiLM: Visual Reasoning with a General
    Conditioning Layer. AAAI 2018. https://arxiv.org/abs/1709.07871
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastmeta.ops.max_pool import routed_max_pool2d

__all__ = ["MLP", "Conv4", "FiLMConv4"]

# Finn et al. 2017, section 5.1: "a neural network with 2 hidden layers of size 40 with ReLU".
SINUSOID_HIDDEN = (40, 40)
# Finn et al. 2017, section 5.2: "4 modules with a 3x3 convolutions and 64 filters".
CONV4_FILTERS = 64
CONV4_BLOCKS = 4
KERNEL_SIZE = 3
POOL = 2
# nn.BatchNorm2d's default eps, so that FiLMConv4 with a zero context computes what Conv4 computes
# on one task's batch.
NORM_EPS = 1e-5


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

    #: Its forward is exactly ``self.layers``: :mod:`fastmeta.fused_mlp` may then compute the
    #: training gradients of this class (not of subclasses) by hand.
    fused_mlp_body = "layers"

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
    # The paper's block is conv, BN, ReLU, max-pool. ReLU and max-pool commute (ReLU is monotone:
    # the largest of a window after ReLU is the ReLU of its largest; where that is positive the
    # winner is the same element, and where it is not every gradient through the window is 0),
    # so pooling first computes equal values and gradients with the ReLU and its derivatives on
    # a quarter of the elements. The only difference: a window whose largest value is -0.0,
    # not in its first place, gives -0.0 instead of +0.0 (torch.relu(-0.0) is -0.0). A conv-4
    # MAML meta-step (64 filters, 28x28, T=8, 15 queries per class) took 540 ms against 623 ms.
    return nn.Sequential(
        nn.Conv2d(in_channels, filters, KERNEL_SIZE, padding=KERNEL_SIZE // 2),
        # Transductive BatchNorm as in MAML: always the statistics of the current batch, no
        # running statistics, so the forward mutates no buffer and works functionally.
        nn.BatchNorm2d(filters, track_running_stats=False),
        nn.MaxPool2d(POOL) if pool else nn.Identity(),
        nn.ReLU(),
    )


class Conv4(nn.Module):
    """The conv-4 classifier of MAML: 4 blocks of [3x3 conv, BatchNorm, ReLU, 2x2 max-pool],
    then a linear head. Each block runs its max-pool before its ReLU, which computes the same
    function (they commute) with the ReLU on a quarter of the elements.

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


class _FiLMBlock(nn.Module):
    """One block of :class:`FiLMConv4` on ``[T·S, C, H, W]`` features and a ``[T, d]`` context:
    3x3 conv, per-task batch normalisation, FiLM (if ``film``), ReLU, 2x2 max-pool (if
    ``pool``), computed with the pool before the ReLU as in :class:`Conv4` (equal values)."""

    def __init__(self, in_channels: int, filters: int, *, pool: bool, num_context_params: int,
                 film: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, filters, KERNEL_SIZE, padding=KERNEL_SIZE // 2)
        # The affine part of the normalisation, as in BatchNorm2d (initialised to the identity).
        self.norm_weight = nn.Parameter(torch.ones(filters))
        self.norm_bias = nn.Parameter(torch.zeros(filters))
        self.film: nn.Linear | None = None
        if film:
            self.film = nn.Linear(num_context_params, 2 * filters)
            # γ = β = 0 at φ = 0 whatever the weights: the block starts as the identity
            # modulation h·(1 + γ) + β, and a zero context changes nothing.
            nn.init.zeros_(self.film.bias)
        self.pool = pool

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tasks = context.shape[0]
        h = self.conv(h).unflatten(0, (tasks, -1))  # [T, S, C, H, W]
        # Per-task statistics over (S, H, W): a task never sees another task's examples.
        var, mean = torch.var_mean(h, dim=(1, 3, 4), correction=0, keepdim=True)
        channels = (1, 1, -1, 1, 1)
        scale = self.norm_weight.view(channels) * torch.rsqrt(var + NORM_EPS)  # [T, 1, C, 1, 1]
        shift = self.norm_bias.view(channels)
        if self.film is not None:
            gamma, beta = self.film(context).view(tasks, 1, 2, -1, 1, 1).unbind(2)
            scale = scale * (1 + gamma)
            shift = shift * (1 + gamma) + beta
        # (h - mean)·scale + shift with one pass over h, folded as torch's CPU BatchNorm does.
        h = torch.addcmul(shift - mean * scale, h, scale).flatten(0, 1)
        if self.pool:
            # Pooled before the ReLU, as in Conv4 (the same function: they commute). torch's
            # pooling, or the native kernel on large CPU inputs (see fastmeta.ops.max_pool):
            # the same values and gradients.
            h = routed_max_pool2d(h, POOL)
        return torch.relu(h)


class FiLMConv4(nn.Module):
    """Conv-4 conditioned on a per-task context φ through FiLM: CAVIA's classifier.

    Block i computes, for every task t and channel c, on the conv output h of that task's
    examples:

    .. math::
        \\begin{aligned}
        \\hat h &= w_c \\frac{h - \\mu_{t,c}}{\\sqrt{\\sigma^2_{t,c} + \\epsilon}} + b_c \\\\
        (\\gamma_t, \\beta_t) &= W_i \\phi_t + v_i \\in \\mathbb{R}^{2C} \\\\
        h' &= \\mathrm{maxpool}\\big(\\mathrm{ReLU}(\\hat h \\odot (1 + \\gamma_t)
            + \\beta_t)\\big)
        \\end{aligned}

    with :math:`\\mu_{t,c}, \\sigma^2_{t,c}` the mean and (biased) variance over task t's
    examples and pixels only. That is Conv4's transductive BatchNorm applied to each task on its
    own, computed for all T tasks in one batched pass, so that no task's output depends on the
    other tasks of the meta-batch. FiLM's bias starts at zero, so at φ = 0 (where CAVIA's inner
    loop starts) the network is exactly :class:`Conv4` run on each task separately.

    CAVIA's code (github.com/lmzintgraf/cavia, ``classification/models.py``) applies
    ``γ·h + β`` after max-pooling and, by default, in the third block only; here FiLM comes
    before the ReLU and pooling, as the norm's affine part does, and modulates the blocks in
    ``film_blocks`` (default: all four).

    Args:
        in_channels: image channels.
        ways: the number of classes, N.
        num_context_params: d, the size of the context φ_t.
        filters: filters of every conv layer.
        image_size: the height and width of the (square) input images.
        film_blocks: the blocks (0-3) that FiLM modulates.

    Input ``x [T, S, C, H, W]`` and ``context [T, d]``; output ``[T, S, ways]`` logits.

    Example:
        >>> import torch
        >>> from fastmeta.meta.networks import FiLMConv4
        >>> net = FiLMConv4(ways=5, num_context_params=100, image_size=28)
        >>> net(torch.zeros(4, 5, 1, 28, 28), torch.zeros(4, 100)).shape
        torch.Size([4, 5, 5])
    """

    def __init__(self, in_channels: int = 1, ways: int = 5, *, num_context_params: int,
                 filters: int = CONV4_FILTERS, image_size: int = 28,
                 film_blocks: Sequence[int] = tuple(range(CONV4_BLOCKS))) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("ways", ways), ("filters", filters),
                            ("image_size", image_size),
                            ("num_context_params", num_context_params)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        film_blocks = tuple(film_blocks)
        if (not film_blocks or len(set(film_blocks)) != len(film_blocks)
                or any(b not in range(CONV4_BLOCKS) for b in film_blocks)):
            raise ValueError(f"film_blocks must be distinct block indices in 0..{CONV4_BLOCKS - 1}"
                             f", at least one, got {film_blocks!r}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_context_params = num_context_params
        self.film_blocks = film_blocks
        size = image_size
        blocks = []
        for i in range(CONV4_BLOCKS):
            pool = size >= POOL
            blocks.append(_FiLMBlock(in_channels if i == 0 else filters, filters, pool=pool,
                                     num_context_params=num_context_params,
                                     film=i in film_blocks))
            if pool:
                size //= POOL
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(filters * size * size, ways)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 5 or tuple(x.shape[2:]) != expected:
            raise ValueError(f"FiLMConv4 expects x [T, S, {', '.join(map(str, expected))}], got "
                             f"{list(x.shape)}")
        if context.dim() != 2 or tuple(context.shape) != (x.shape[0], self.num_context_params):
            raise ValueError(f"FiLMConv4 expects context [T, num_context_params] = "
                             f"[{x.shape[0]}, {self.num_context_params}], got "
                             f"{list(context.shape)}")
        h = x.flatten(0, 1)
        for block in self.blocks:
            h = block(h, context)
        return self.head(h.flatten(1)).unflatten(0, (x.shape[0], -1))

    def extra_repr(self) -> str:
        return f"num_context_params={self.num_context_params}, film_blocks={self.film_blocks}"
