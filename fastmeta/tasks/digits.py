"""Few-shot episodes from scikit-learn's bundled digits (``sklearn.datasets.load_digits``).

1,797 8x8 grayscale images of the digits 0-9 (about 180 per digit) ship inside scikit-learn,
so this is a real-data demo that runs with no download. Images are ``[1, 8, 8]`` in [0, 1]
(the raw values 0..16 divided by 16).

The split holds classes out, so meta-test measures adaptation to digits never trained on:

* ``"train"``: digits 0-4, each in the 4 rotations (0/90/180/270 degrees) as separate classes,
  20 classes, so that training episodes draw varied class sets rather than the same five;
* ``"val"``: digits 5-9, unrotated, every third image of each (about 60 per digit);
* ``"test"``: digits 5-9, unrotated, the other images (about 120 per digit).

Meta-val and meta-test share the held-out digits (5 classes are the least a 5-way test needs;
10 digits cannot give two disjoint 5-class sets beside a training set), but never an image.
A 5-way test episode uses all five test digits, with labels shuffled per episode.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from fastmeta.tasks.episodes import ROTATIONS, FewShotTasks, TensorClass, check_rotations

__all__ = ["DIGIT_SPLITS", "digits_tasks"]

# Which digits each split holds out (see the module docstring).
DIGIT_SPLITS = {"train": (0, 1, 2, 3, 4), "val": (5, 6, 7, 8, 9), "test": (5, 6, 7, 8, 9)}
# Every VAL_EVERY-th image of a held-out digit goes to "val", the others to "test".
VAL_EVERY = 3
# load_digits stores pixel intensities as integers 0..16.
PIXEL_MAX = 16.0


@functools.lru_cache(maxsize=1)
def load_digit_images() -> dict[int, torch.Tensor]:
    """``{digit: [n, 1, 8, 8] float32 in [0, 1]}`` from scikit-learn's bundled copy (read once;
    treat the tensors as read-only)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the digits tasks need scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).div_(PIXEL_MAX).unsqueeze(1)
    targets = torch.as_tensor(data.target)
    return {d: images[targets == d].contiguous() for d in range(10)}


def digits_tasks(
    split: str = "train",
    *,
    rotations: Sequence[int] = ROTATIONS,
    seed: int | None = None,
) -> FewShotTasks:
    """The episode sampler of one split of the digits (see the module docstring).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        rotations: rotations that make extra classes in ``"train"`` (ignored by the held-out
            splits, which are unrotated digits).
        seed: seeds the sampler's generator; ``None`` uses torch's global RNG.

    Example:
        >>> from fastmeta.tasks import digits_tasks
        >>> ep = digits_tasks("test", seed=0).sample(8, ways=5, shots=1, queries=15)
        >>> ep.support_x.shape, ep.query_y.shape
        (torch.Size([8, 5, 1, 8, 8]), torch.Size([8, 75]))
    """
    if split not in DIGIT_SPLITS:
        raise ValueError(f"split must be one of {tuple(DIGIT_SPLITS)}, got {split!r}")
    rotations = check_rotations(rotations) if split == "train" else (0,)
    images = load_digit_images()
    classes = []
    for digit in DIGIT_SPLITS[split]:
        x = images[digit]
        if split == "val":
            x = x[::VAL_EVERY]
        elif split == "test":
            keep = torch.arange(x.shape[0]) % VAL_EVERY != 0
            x = x[keep]
        classes.extend(TensorClass(str(digit), x, rotation=r) for r in rotations)
    return FewShotTasks(classes, seed=seed)
