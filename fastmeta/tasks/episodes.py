"""The episode every task source returns, and N-way K-shot sampling over a set of classes.

An :class:`Episode` holds a meta-batch of T tasks: support and query sets, each with a leading
task dimension. :class:`FewShotTasks` draws N-way K-shot classification episodes from any list
of :class:`ImageClass` (Omniglot characters, scikit-learn digits, ...), so every image source
shares one sampler, one RNG discipline and one set of errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["Episode", "FewShotTasks", "ImageClass", "SeededSampler", "TensorClass",
           "check_episode", "check_task_batch"]

# Quarter turns a rotation may take, in degrees (Omniglot's extra classes, Santoro et al. 2016).
ROTATIONS = (0, 90, 180, 270)


@dataclasses.dataclass(frozen=True)
class Episode:
    """A meta-batch of T tasks, each with a support set and a query set.

    Shapes: ``support_x [T, S, ...]``, ``support_y [T, S, ...]``, ``query_x [T, Q, ...]``,
    ``query_y [T, Q, ...]``. For N-way K-shot classification S = N·K and the targets are int64
    labels in ``0..N-1``; for regression the targets have a trailing feature dimension.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _EPISODE_FIELDS and not isinstance(value, torch.Tensor):
                raise TypeError(f"Episode.{f.name} must be a tensor, got {type(value).__name__}")
        for x, y, name in ((self.support_x, self.support_y, "support"),
                           (self.query_x, self.query_y, "query")):
            if x.dim() < 2 or y.dim() < 2:
                raise ValueError(
                    f"{name}_x and {name}_y need a leading task and example dimension [T, n, ...], "
                    f"got {list(x.shape)} and {list(y.shape)}"
                )
            if x.shape[:2] != y.shape[:2]:
                raise ValueError(
                    f"{name}_x {list(x.shape)} and {name}_y {list(y.shape)} disagree on [T, n]"
                )
        if self.support_x.shape[0] != self.query_x.shape[0]:
            raise ValueError(
                f"support ({self.support_x.shape[0]} tasks) and query ({self.query_x.shape[0]} "
                "tasks) disagree on T"
            )
        if self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise ValueError(
                f"support_x {list(self.support_x.shape)} and query_x {list(self.query_x.shape)} "
                "have different example shapes"
            )

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks."""
        return self.support_x.shape[0]

    def select_tasks(self, start: int, stop: int) -> Episode:
        """The tasks ``start..stop-1`` as an episode of the same type (no copy: views).

        Every tensor field, those of subclasses included (a sinusoid's ``amplitude``), has the
        leading task dimension and is sliced along it. This is how a distributed run gives each
        process its own contiguous share of a meta-batch that every process sampled whole.

        Raises:
            ValueError: a range that is empty or not within ``0..T``.
        """
        tasks = self.num_tasks
        for name, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if not 0 <= start < stop <= tasks:
            raise ValueError(f"select_tasks({start}, {stop}): expected 0 <= start < stop <= T "
                             f"= {tasks}")
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, *args: Any, **kwargs: Any) -> Episode:
        """A copy with every floating tensor moved/cast (``Tensor.to`` arguments); integer
        tensors (labels) are only moved, never cast."""
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                if value.is_floating_point():
                    value = value.to(*args, **kwargs)
                else:
                    device = _device_of(args, kwargs)
                    value = value if device is None else value.to(device)
            moved[f.name] = value
        return dataclasses.replace(self, **moved)


_EPISODE_FIELDS = ("support_x", "support_y", "query_x", "query_y")


def check_task_batch(x: Any, name: str) -> None:
    """Raises ``ValueError`` unless ``x`` is a tensor ``[T, n, ...]`` (a leading task
    dimension), naming it ``name``."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"{name} must be a tensor [T, n, ...] with a leading task dimension")


def check_episode(episode: Any) -> None:
    """Raises ``TypeError`` unless ``episode`` is an :class:`Episode` (the meta-learners'
    common entry check)."""
    if not isinstance(episode, Episode):
        raise TypeError(f"expected an Episode (fastmeta.tasks.Episode), got "
                        f"{type(episode).__name__}")


def _device_of(args: tuple, kwargs: dict) -> torch.device | None:
    if "device" in kwargs:
        return torch.device(kwargs["device"])
    for a in args:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def check_rotations(rotations: Sequence[int]) -> tuple[int, ...]:
    """Validates a list of rotations in degrees (each a multiple of 90 in [0, 360))."""
    rotations = tuple(rotations)
    bad = [r for r in rotations if r not in ROTATIONS]
    if not rotations or bad or len(set(rotations)) != len(rotations):
        raise ValueError(f"rotations must be distinct values of {ROTATIONS}, got {rotations}")
    return rotations


class ImageClass:
    """One class of images: a name, a number of examples, and a way to load some of them.

    Subclasses implement :meth:`load`; ``rotation`` (degrees, counter-clockwise) makes the
    rotated copy of a class a class of its own.
    """

    def __init__(self, name: str, rotation: int = 0) -> None:
        self.name = name if rotation == 0 else f"{name}@rot{rotation}"
        self.rotation = rotation

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, indices: torch.Tensor) -> torch.Tensor:
        """``[len(indices), C, H, W]`` float images in [0, 1], unrotated."""
        raise NotImplementedError

    def load(self, indices: torch.Tensor) -> torch.Tensor:
        images = self._load(indices)
        if self.rotation:
            images = torch.rot90(images, k=self.rotation // 90, dims=(-2, -1))
        return images


class TensorClass(ImageClass):
    """A class whose images are already in memory, ``[n, C, H, W]``."""

    def __init__(self, name: str, images: torch.Tensor, rotation: int = 0) -> None:
        super().__init__(name, rotation)
        if images.dim() != 4:
            raise ValueError(
                f"class {name!r}: images must be [n, C, H, W], got {list(images.shape)}"
            )
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def _load(self, indices: torch.Tensor) -> torch.Tensor:
        images = self.images[indices]
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return images


class SeededSampler:
    """A task sampler's RNG: its own ``torch.Generator`` from ``seed``, or, with ``seed=None``,
    torch's global RNG. :meth:`state_dict` captures what a resumed run needs to draw the same
    tasks again."""

    def __init__(self, seed: int | None = None) -> None:
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's RNG state (``None`` when it draws from the global RNG, which
        :func:`fastmeta.meta.training.capture_rng_state` saves)."""
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["generator"]
        if (saved is None) != (self.generator is None):
            raise ValueError(
                "the saved sampler state and this sampler disagree on whether it has its own "
                f"seed (saved: {'seeded' if saved is not None else 'global RNG'}, here: "
                f"{'seeded' if self.generator is not None else 'global RNG'})"
            )
        if saved is not None:
            self.generator.set_state(saved)


class FewShotTasks(SeededSampler):
    """N-way K-shot classification episodes over a fixed list of classes.

    For each task, ``ways`` classes are drawn without replacement and given the labels
    ``0..ways-1`` in a random order; from each class ``shots + queries`` distinct examples are
    drawn, the first ``shots`` for the support set and the rest for the query set. Examples are
    ordered by label (``support_y[t] == [0]*shots + [1]*shots + ...``).

    Args:
        classes: the classes to draw from.
        seed: seeds this sampler's own ``torch.Generator``; ``None`` draws from torch's global
            RNG. Either way :meth:`state_dict` captures what a resumed run needs.

    Example:
        >>> import torch
        >>> from fastmeta.tasks import FewShotTasks, TensorClass
        >>> classes = [TensorClass(str(c), torch.rand(6, 1, 8, 8)) for c in range(10)]
        >>> ep = FewShotTasks(classes, seed=0).sample(4, ways=5, shots=1, queries=2)
        >>> ep.support_x.shape, ep.query_y.shape
        (torch.Size([4, 5, 1, 8, 8]), torch.Size([4, 10]))
    """

    def __init__(self, classes: Sequence[ImageClass], *, seed: int | None = None) -> None:
        super().__init__(seed)
        self.classes = list(classes)
        if not self.classes:
            raise ValueError("FewShotTasks needs at least one class, got none")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _check(self, ways: int, shots: int, queries: int) -> None:
        for name, value, least in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if ways > self.num_classes:
            raise ValueError(f"{ways}-way episodes need {ways} classes, but only "
                             f"{self.num_classes} are available")
        smallest = min(self.classes, key=len)
        if len(smallest) < shots + queries:
            raise ValueError(
                f"class {smallest.name!r} has {len(smallest)} examples, fewer than "
                f"shots + queries = {shots} + {queries} = {shots + queries}"
            )

    def sample(
        self,
        num_tasks: int,
        *,
        ways: int,
        shots: int,
        queries: int,
        generator: torch.Generator | None = None,
    ) -> Episode:
        """Draws ``num_tasks`` episodes.

        Args:
            num_tasks: T.
            ways: N, classes per task.
            shots: K, support examples per class.
            queries: query examples per class.
            generator: overrides this sampler's generator (e.g. a fixed one for evaluation).

        Returns:
            An :class:`Episode` with ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]``,
            ``query_x [T, N*queries, C, H, W]``, ``query_y [T, N*queries]`` (int64).

        Raises:
            ValueError: bad counts, more ways than classes, or a class with fewer than
                ``shots + queries`` examples.
        """
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        self._check(ways, shots, queries)
        g = self.generator if generator is None else generator
        labels = torch.arange(ways)
        support_x, query_x = [], []
        for _ in range(num_tasks):
            chosen = torch.randperm(self.num_classes, generator=g)[:ways]  # label i -> chosen[i]
            s, q = [], []
            for c in chosen.tolist():
                cls = self.classes[c]
                picks = torch.randperm(len(cls), generator=g)[: shots + queries]
                images = cls.load(picks)
                s.append(images[:shots])
                q.append(images[shots:])
            support_x.append(torch.cat(s))
            query_x.append(torch.cat(q))
        return Episode(
            support_x=torch.stack(support_x),
            support_y=labels.repeat_interleave(shots).expand(num_tasks, -1).contiguous(),
            query_x=torch.stack(query_x),
            query_y=labels.repeat_interleave(queries).expand(num_tasks, -1).contiguous(),
        )
