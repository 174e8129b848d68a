"""Few-shot episodes from a local folder in the Omniglot layout. Nothing is ever downloaded.

The layout is the one of the official release (github.com/brendenlake/omniglot), once
``images_background`` and/or ``images_evaluation`` are unzipped into one folder::

    <root>/<alphabet>/<character>/*.png

Every character is a class; its rotations by 90, 180 and 270 degrees are classes of their own
(Santoro et al. 2016; Vinyals et al. 2016), 4 x 1623 = 6492 classes for the full set. Images
are read as grayscale and resized to 28x28 (Vinyals et al.), values in [0, 1] as stored
(Omniglot's background is white, 1).

Splits are made over *characters*, before rotating, so that no rotation of a meta-test
character is seen in meta-training.

References:
    Lake, Salakhutdinov, Tenenbaum. Human-level concept learning through probabilistic program
    induction. Science 2015.
    Vinyals et al. Matching Networks for One Shot Learning. NeurIPS 2016.
    Santoro et al. Meta-Learning with Memory-Augmented Neural Networks. ICML 2016.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from fastmeta.tasks.episodes import ROTATIONS, FewShotTasks, TensorClass, check_rotations

__all__ = ["OmniglotFolder", "omniglot_tasks"]

# Vinyals et al. 2016 resize Omniglot's 105x105 images to 28x28.
IMAGE_SIZE = 28
# Default meta-train / meta-val / meta-test fractions of the characters: about Vinyals et al.'s
# 1200 training characters of 1623 (0.74), with a validation slice taken from the training part.
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
SPLIT_NAMES = ("train", "val", "test")
IMAGE_SUFFIX = ".png"


class ImageReadError(ValueError):
    """An image file that cannot be read or decoded."""


def _read_image(path: Path, size: int) -> torch.Tensor:
    """``[1, size, size]`` uint8 grayscale image."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("reading Omniglot images needs Pillow: pip install pillow") from e
    try:
        with Image.open(path) as image:
            image = image.convert("L").resize((size, size), Image.Resampling.LANCZOS)
            data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ImageReadError(f"cannot read image file {path}: {e}") from e
    return data.view(1, size, size)


class OmniglotFolder:
    """An index of the characters in ``<root>/<alphabet>/<character>/*.png``.

    Scanning only lists the files; images are read (all of them, once) when :meth:`tasks`
    builds a sampler, so an unreadable file is reported before training starts.

    Args:
        root: the folder holding one sub-folder per alphabet.
        image_size: images are resized to ``image_size x image_size``.
        rotations: rotations in degrees; each one makes every character a separate class.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: no ``<alphabet>/<character>`` folder under ``root``.

    Example:
        >>> folder = OmniglotFolder("data/omniglot")  # doctest: +SKIP
        >>> splits = folder.split(seed=0)  # doctest: +SKIP
        >>> train = folder.tasks(splits["train"], seed=1)  # doctest: +SKIP
        >>> episode = train.sample(32, ways=5, shots=1, queries=15)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int = IMAGE_SIZE,
        rotations: Sequence[int] = ROTATIONS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Omniglot root {str(self.root)!r} does not exist or is not "
                                    "a folder (expected <root>/<alphabet>/<character>/*.png)")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        self.image_size = image_size
        self.rotations = check_rotations(rotations)
        #: "alphabet/character" -> sorted image paths
        self.files: dict[str, list[Path]] = {}
        for alphabet in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                images = sorted(p for p in character.iterdir()
                                if p.is_file() and p.suffix.lower() == IMAGE_SUFFIX)
                self.files[f"{alphabet.name}/{character.name}"] = images
        if not self.files:
            raise ValueError(f"no classes under {str(self.root)!r}: expected "
                             "<root>/<alphabet>/<character>/*.png")

    @property
    def characters(self) -> list[str]:
        """Every character, as ``"alphabet/character"``, sorted."""
        return list(self.files)

    @property
    def alphabets(self) -> list[str]:
        return sorted({c.split("/", 1)[0] for c in self.files})

    def split(
        self,
        *,
        by: str = "character",
        fractions: Sequence[float] = SPLIT_FRACTIONS,
        seed: int = 0,
    ) -> dict[str, list[str]]:
        """A seeded meta-train / meta-val / meta-test split of the characters.

        Args:
            by: ``"character"`` shuffles the characters; ``"alphabet"`` shuffles whole
                alphabets, so meta-test alphabets are never seen in meta-training.
            fractions: the three fractions (normalised to sum to 1). Each part with a positive
                fraction gets at least one unit, the rest by largest remainder.
            seed: the split's seed, independent of any episode sampler.

        Returns:
            ``{"train": [...], "val": [...], "test": [...]}`` lists of characters.

        Raises:
            ValueError: bad arguments, or too few units to give every part with a positive
                fraction at least one.
        """
        if by not in ("character", "alphabet"):
            raise ValueError(f"by must be 'character' or 'alphabet', got {by!r}")
        fractions = tuple(float(f) for f in fractions)
        if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
            raise ValueError(f"fractions must be 3 non-negative numbers, got {fractions}")
        units = self.characters if by == "character" else self.alphabets
        order = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed))
        units = [units[i] for i in order.tolist()]
        counts = _allocate(len(units), fractions)
        if counts is None:
            raise ValueError(f"cannot split {len(units)} {by}s into parts with fractions "
                             f"{fractions} without leaving one empty")
        bounds = [0, counts[0], counts[0] + counts[1], len(units)]
        parts = {name: units[bounds[i]:bounds[i + 1]] for i, name in enumerate(SPLIT_NAMES)}
        if by == "alphabet":
            parts = {name: [c for c in self.characters if c.split("/", 1)[0] in set(alphabets)]
                     for name, alphabets in parts.items()}
        return parts

    def tasks(self, characters: Sequence[str] | None = None, *,
              seed: int | None = None) -> FewShotTasks:
        """Reads the images of ``characters`` (default: all) and returns their episode sampler.

        Raises:
            KeyError: a character that is not in this folder.
            ImageReadError: an image file that cannot be decoded (the message names it).
        """
        names = self.characters if characters is None else list(characters)
        unknown = [c for c in names if c not in self.files]
        if unknown:
            raise KeyError(f"characters not found under {str(self.root)!r}: {unknown[:5]}")
        classes = []
        for name in names:
            paths = self.files[name]
            if paths:
                images = torch.stack([_read_image(p, self.image_size) for p in paths])
            else:
                images = torch.empty(0, 1, self.image_size, self.image_size, dtype=torch.uint8)
            classes.extend(TensorClass(name, images, rotation=r) for r in self.rotations)
        return FewShotTasks(classes, seed=seed)


def _allocate(n: int, fractions: Sequence[float]) -> list[int] | None:
    """Splits n units by ``fractions``: at least one per positive fraction, then largest
    remainder. ``None`` when n is too small for that."""
    total = sum(fractions)
    shares = [f / total * n for f in fractions]
    counts = [max(1, int(s)) if f > 0 else 0 for f, s in zip(fractions, shares)]
    if sum(1 for f in fractions if f > 0) > n:
        return None
    while sum(counts) > n:  # the minimum of one unit overdrew: take back from the largest part
        counts[counts.index(max(counts))] -= 1
    by_remainder = sorted(range(len(shares)), key=lambda i: shares[i] - counts[i], reverse=True)
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def omniglot_tasks(
    root: str | os.PathLike,
    split: str = "train",
    *,
    by: str = "character",
    fractions: Sequence[float] = SPLIT_FRACTIONS,
    split_seed: int = 0,
    rotations: Sequence[int] = ROTATIONS,
    image_size: int = IMAGE_SIZE,
    seed: int | None = None,
) -> FewShotTasks:
    """The episode sampler of one part (``"train"``, ``"val"`` or ``"test"``) of a local
    Omniglot folder: :class:`OmniglotFolder` + :meth:`~OmniglotFolder.split` +
    :meth:`~OmniglotFolder.tasks`. ``seed`` seeds the episodes, ``split_seed`` the split."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    folder = OmniglotFolder(root, image_size=image_size, rotations=rotations)
    characters = folder.split(by=by, fractions=fractions, seed=split_seed)[split]
    return folder.tasks(characters, seed=seed)
