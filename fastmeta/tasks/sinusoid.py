"""Sinusoid regression, exactly as in Finn et al. 2017 (section 5.1).

Each task is :math:`y = A \\sin(x - \\varphi)` with amplitude :math:`A \\sim U[0.1, 5]`, phase
:math:`\\varphi \\sim U[0, \\pi]` and inputs :math:`x \\sim U[-5, 5]`. Evaluation adapts on K
support points and measures the MSE on 100 evenly spaced points in [-5, 5].

References:
    Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks.
    ICML 2017. https://arxiv.org/abs/1703.03400 (ranges: the paper and its code,
    github.com/cbfinn/maml, data_generator.py, which computes ``amp * sin(x - phase)``)
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fastmeta.tasks.episodes import Episode, SeededSampler

__all__ = ["SinusoidEpisode", "SinusoidTasks", "sinusoid"]

# The ranges of Finn et al. 2017, section 5.1.
AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
# Evaluation points: "100 evenly spaced points" over X_RANGE (Finn et al.'s evaluation).
EVAL_POINTS = 100


def sinusoid(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """``amplitude * sin(x - phase)``, with ``amplitude``/``phase`` ``[T]`` broadcast over
    ``x [T, n, 1]``."""
    return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))


@dataclasses.dataclass(frozen=True)
class SinusoidEpisode(Episode):
    """An :class:`Episode` of sinusoid tasks, with each task's parameters for plotting.

    ``support_x``/``support_y`` are ``[T, K, 1]``; ``amplitude`` and ``phase`` are ``[T]``.
    """

    amplitude: torch.Tensor
    phase: torch.Tensor


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator, dtype):
    low, high = bounds
    return torch.rand(shape, generator=generator, dtype=dtype) * (high - low) + low


class SinusoidTasks(SeededSampler):
    """A seeded sampler of sinusoid meta-batches.

    Args:
        seed: seeds this sampler's own ``torch.Generator``; ``None`` draws from torch's global
            RNG.
        dtype: floating dtype of the returned tensors.

    Example:
        >>> from fastmeta.tasks import SinusoidTasks
        >>> tasks = SinusoidTasks(seed=0)
        >>> ep = tasks.sample(25, shots=10)
        >>> ep.support_x.shape, ep.query_y.shape, ep.amplitude.shape
        (torch.Size([25, 10, 1]), torch.Size([25, 10, 1]), torch.Size([25]))
        >>> tasks.sample(5, shots=5, grid_query=True).query_x.shape
        torch.Size([5, 100, 1])
    """

    def __init__(self, *, seed: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point, got {dtype}")
        super().__init__(seed)
        self.dtype = dtype

    def grid(self, num_points: int = EVAL_POINTS) -> torch.Tensor:
        """``[num_points, 1]`` evenly spaced inputs over [-5, 5], endpoints included."""
        return torch.linspace(*X_RANGE, num_points, dtype=self.dtype).unsqueeze(-1)

    def sample(
        self,
        num_tasks: int,
        shots: int,
        queries: int | None = None,
        *,
        grid_query: bool = False,
        generator: torch.Generator | None = None,
    ) -> SinusoidEpisode:
        """Draws ``num_tasks`` tasks with ``shots`` support points each.

        Args:
            num_tasks: T (the meta-batch size; 25 in Finn et al.).
            shots: K support points per task.
            queries: query points per task, drawn like the support points (default: K, as in
                Finn et al.'s code).
            grid_query: make the query set the :meth:`grid` (evaluation), instead of random
                points; ``queries`` is then the number of grid points (default 100).
            generator: overrides this sampler's generator (e.g. a fixed one for evaluation).

        Returns:
            A :class:`SinusoidEpisode`; every x and y is ``[T, n, 1]``.
        """
        for name, value in (("num_tasks", num_tasks), ("shots", shots)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if queries is None:
            queries = EVAL_POINTS if grid_query else shots
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise ValueError(f"queries must be an int >= 1, got {queries!r}")
        g = self.generator if generator is None else generator
        amplitude = _uniform((num_tasks,), AMPLITUDE_RANGE, g, self.dtype)
        phase = _uniform((num_tasks,), PHASE_RANGE, g, self.dtype)
        support_x = _uniform((num_tasks, shots, 1), X_RANGE, g, self.dtype)
        if grid_query:
            query_x = self.grid(queries).expand(num_tasks, -1, -1).contiguous()
        else:
            query_x = _uniform((num_tasks, queries, 1), X_RANGE, g, self.dtype)
        return SinusoidEpisode(
            support_x=support_x,
            support_y=sinusoid(support_x, amplitude, phase),
            query_x=query_x,
            query_y=sinusoid(query_x, amplitude, phase),
            amplitude=amplitude,
            phase=phase,
        )
