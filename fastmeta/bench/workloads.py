"""Parameter-list shapes the optimizer benchmarks run on.

* ``single_16m``: one fp32 tensor of 16M elements (pure bandwidth).
* ``resnet18``: the 62 parameter tensors of torchvision's ResNet-18 (11.7M elements), written
  out here so no torchvision is needed.
* ``conv4``: the 18 tensors of the MAML conv-4 few-shot network (Finn et al. 2017) on 28x28
  Omniglot, 5-way: four blocks of conv 3x3 (64 filters) + BatchNorm, and a linear head; 112k
  elements. Here per-tensor overhead, not bandwidth, decides the time.
"""

from __future__ import annotations

import math


def _resnet18_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for out_ch, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            cin = in_ch if block == 0 else out_ch
            shapes += [(out_ch, cin, 3, 3), (out_ch,), (out_ch,)]
            shapes += [(out_ch, out_ch, 3, 3), (out_ch,), (out_ch,)]
            if block == 0 and (stride != 1 or cin != out_ch):
                shapes += [(out_ch, cin, 1, 1), (out_ch,), (out_ch,)]
        in_ch = out_ch
    shapes += [(1000, 512), (1000,)]
    return shapes


def _conv4_shapes(in_channels: int = 1, filters: int = 64, ways: int = 5) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    cin = in_channels
    for _ in range(4):
        shapes += [(filters, cin, 3, 3), (filters,), (filters,), (filters,)]
        cin = filters
    return shapes + [(ways, filters), (ways,)]


WORKLOADS: dict[str, list[tuple[int, ...]]] = {
    "single_16m": [(16 * 1024 * 1024,)],
    "resnet18": _resnet18_shapes(),
    "conv4": _conv4_shapes(),
}


def sizes(shapes: list[tuple[int, ...]]) -> list[int]:
    """The number of elements of each shape."""
    return [math.prod(s) for s in shapes]


def numel(shapes: list[tuple[int, ...]]) -> int:
    """The number of elements of all the shapes together."""
    return sum(sizes(shapes))
