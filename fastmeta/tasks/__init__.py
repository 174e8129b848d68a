"""Meta-learning tasks: each source returns an :class:`Episode` with a leading task dimension.

* :class:`SinusoidTasks`: Finn et al. 2017's sinusoid regression;
* :class:`OmniglotFolder` / :func:`omniglot_tasks`: a local folder in the Omniglot layout, with
  rotations as extra classes (needs Pillow; never downloads);
* :func:`digits_tasks`: scikit-learn's bundled 8x8 digits, held-out classes for meta-test
  (needs scikit-learn).

Optional dependencies are imported only when a source is used.
"""

from __future__ import annotations

from fastmeta.tasks.digits import digits_tasks
from fastmeta.tasks.episodes import Episode, FewShotTasks, ImageClass, SeededSampler, TensorClass
from fastmeta.tasks.omniglot import ImageReadError, OmniglotFolder, omniglot_tasks
from fastmeta.tasks.sinusoid import SinusoidEpisode, SinusoidTasks, sinusoid

__all__ = [
    "Episode",
    "FewShotTasks",
    "ImageClass",
    "ImageReadError",
    "OmniglotFolder",
    "SeededSampler",
    "SinusoidEpisode",
    "SinusoidTasks",
    "TensorClass",
    "digits_tasks",
    "omniglot_tasks",
    "sinusoid",
]
