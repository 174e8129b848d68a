"""What every meta-trainer shares: seeding, checkpoints, CSV metrics, progress, and estimates.

* :func:`seed_everything` seeds torch, numpy and Python's ``random``;
* :func:`save_checkpoint` writes atomically (a crash leaves the previous file intact) and
  :func:`load_checkpoint` refuses a corrupt or truncated file; :func:`checkpoint_payload` and
  :func:`restore` hold what ``--resume`` needs to continue exactly (states, iteration, RNGs,
  config);
* :class:`MetricsWriter` appends CSV rows, and on resume drops the rows past the checkpoint;
* :class:`Progress` shows the running meta-loss (tqdm when installed, plain lines otherwise);
* :func:`mean_ci` gives a mean and its 95% confidence interval over tasks.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import numpy as np
import torch
from torch import nn

from fastmeta import distributed as dist_runs

__all__ = [
    "CheckpointError",
    "MeanCI",
    "MetricsWriter",
    "Progress",
    "capture_rng_state",
    "checkpoint_payload",
    "load_checkpoint",
    "mean_ci",
    "read_metrics",
    "restore",
    "restore_rng_state",
    "save_checkpoint",
    "seed_everything",
]

# Checkpoint envelope: a marker, a format version bumped on incompatible payload changes, and a
# SHA-256 of the payload's contents (see _digest).
CHECKPOINT_FORMAT = "fastmeta-checkpoint"
CHECKPOINT_VERSION = 1
# The running meta-loss in the progress bar is the mean of the last RUNNING_WINDOW iterations.
RUNNING_WINDOW = 100
# Plain-text progress (no tqdm): one line every PLAIN_EVERY_S seconds at most, and at the end.
PLAIN_EVERY_S = 10.0


# ---------------------------------------------------------------------------------------------
# Seeding and RNG state


def seed_everything(seed: int) -> None:
    """Seeds Python's ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    random.seed(seed)
    # Seeding numpy's *global* (legacy) RNG is the point here: code that calls np.random.*
    # draws from it. Its seed must fit 32 bits.
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, as plain types and
    tensors only, so that they load with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what :func:`capture_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached"]))  # noqa: NPY002
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Checkpoints


class RunStart(NamedTuple):
    """Where a training run stands in its job: see :func:`start_run`."""

    #: the process group's description, or None for a single-process run.
    context: dist_runs.DistributedContext | None
    #: whether this process reads and writes the run folder and reports (rank 0, or alone).
    main: bool
    #: no progress bar and no messages (asked for, or not the main process).
    quiet: bool


def start_run(config: Mapping[str, Any], *, resume: bool, quiet: bool, distributed: bool,
              machine_specific: Sequence[str] = ("out",)) -> RunStart:
    """What every ``train`` does first. With ``distributed``, every process must have been
    given the same config and ``resume`` (``machine_specific`` keys, such as paths, aside), and
    a meta-batch of ``config["meta_batch"]`` must give every process a task; the main process
    then makes the run folder.

    Raises:
        ValueError: processes given different options, or too few tasks for them.
        RuntimeError: ``distributed`` without a process group.
    """
    context = dist_runs.context() if distributed else None
    main = context is None or context.is_main
    if context is not None:
        dist_runs.check_same_config({**config, "resume": resume}, ignore=machine_specific)
        dist_runs.owned_tasks(config["meta_batch"])  # every process needs a task: fail early
    if main:
        Path(config["out"]).mkdir(parents=True, exist_ok=True)
    return RunStart(context, main, quiet or not main)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, or of an unknown format."""


def _digest(obj: Any, h: Any) -> None:
    """Feeds a canonical encoding of a checkpoint payload into the hash ``h``.

    The payload is hashed by content (tensor bytes, dtypes, shapes, plain values, in order),
    not by its serialized bytes, so the checksum survives torch.save's container format and the
    file stays an ordinary torch checkpoint.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _digest(k, h)
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        encoded = repr(obj).encode()
        h.update(f"{type(obj).__name__}{len(encoded)}:".encode() + encoded)
    elif isinstance(obj, (torch.dtype, torch.device)):
        _digest(repr(obj), h)
    else:
        raise TypeError(
            f"a checkpoint may hold tensors, dicts, lists, tuples, str, int, float, bool and "
            f"None only (to load with weights_only=True), got {type(obj).__name__}"
        )


def _checksum(payload: Any) -> str:
    h = hashlib.sha256()
    _digest(payload, h)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Writes ``payload`` to ``path`` atomically, with a format version and a checksum.

    The file is written to a temporary file in the same folder, flushed and fsync'ed, then
    renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows); the folder is
    fsync'ed so that the rename survives a power loss. A crash at any point leaves either the
    previous checkpoint or the new one, never a partial file.

    Args:
        path: the checkpoint file.
        payload: tensors, dicts, lists, tuples and plain values only (e.g. from
            :func:`checkpoint_payload`).

    Raises:
        TypeError: a value that ``torch.load(weights_only=True)`` could not load back.
    """
    path = Path(path)
    payload = dict(payload)
    envelope = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "sha256": _checksum(payload), "payload": payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _chmod_like(fd, path)
        with os.fdopen(fd, "wb") as f:
            torch.save(envelope, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


# mkstemp creates files readable by their owner only; a new checkpoint or CSV gets the usual
# permissions of a file a user writes instead (an existing one keeps its own).
NEW_FILE_MODE = 0o644


def _chmod_like(fd: int, path: Path) -> None:
    if os.name != "posix":  # pragma: no cover
        return
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = NEW_FILE_MODE
    os.fchmod(fd, mode)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # pragma: no cover - folders cannot be opened on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, *,
                    map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``.

    Returns:
        The payload.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt (torch cannot read it, or the
            checksum does not match), or is not a fastmeta checkpoint of a known version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        envelope = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, pickle.UnpicklingError, EOFError, ...
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated and was not loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(envelope, dict) or envelope.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a fastmeta checkpoint")
    if envelope.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {envelope.get('version')!r}; this "
            f"fastmeta reads version {CHECKPOINT_VERSION}"
        )
    payload = envelope.get("payload")
    if not isinstance(payload, dict) or _checksum(payload) != envelope.get("sha256"):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt (its checksum does not match) and was not "
            "loaded"
        )
    return payload


def _state_dict_of(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def checkpoint_payload(
    *,
    iteration: int,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    config: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Everything ``--resume`` needs to continue exactly where a run stopped.

    Args:
        iteration: the number of meta-iterations completed.
        model: the meta-learner (its ``state_dict``: weights and any meta-parameters such as
            Meta-SGD's learning rates that are registered as parameters).
        optimizer: the outer optimizer (its ``state_dict``).
        config: the run's configuration, plain values only (e.g. ``vars(args)``).
        **extra: any other state: an object with ``state_dict()`` (a task sampler, a
            scheduler) is stored as its state dict, anything else as it is.

    Returns:
        ``{"iteration", "model", "optimizer", "config", "rng", "extra"}``, with ``rng`` the
        global RNG states of torch, numpy and Python at this moment.
    """
    return {
        "iteration": int(iteration),
        "model": None if model is None else model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "config": None if config is None else dict(config),
        "rng": capture_rng_state(),
        "extra": {k: _state_dict_of(v) for k, v in extra.items()},
    }


def restore(
    payload: Mapping[str, Any],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    **extra: Any,
) -> int:
    """Loads a :func:`checkpoint_payload` back into live objects and the global RNGs.

    Args:
        payload: from :func:`load_checkpoint`.
        model, optimizer: receive their saved state dicts.
        **extra: objects with ``load_state_dict`` receiving the same-named saved extra state.

    Returns:
        The iteration to continue from (the number of iterations already completed).

    Raises:
        CheckpointError: the payload lacks a state that was asked for.
    """
    for name, obj in (("model", model), ("optimizer", optimizer)):
        if obj is not None:
            if payload.get(name) is None:
                raise CheckpointError(f"the checkpoint holds no {name} state")
            obj.load_state_dict(payload[name])
    saved_extra = payload.get("extra") or {}
    for name, obj in extra.items():
        if name not in saved_extra:
            raise CheckpointError(f"the checkpoint holds no {name!r} state")
        obj.load_state_dict(saved_extra[name])
    restore_rng_state(payload["rng"])
    return int(payload["iteration"])


# ---------------------------------------------------------------------------------------------
# CSV metrics


class MetricsWriter:
    """Appends rows of metrics to a CSV file, one row per call, flushed at once.

    A fresh run (``resume_from=None``) starts a new file. A resumed run keeps the rows whose
    ``step_key`` is at most ``resume_from`` and drops the later ones (written after the
    checkpoint, they will be written again), so no step appears twice.

    Args:
        path: the CSV file.
        fieldnames: the columns; ``step_key`` must be one of them.
        resume_from: the iteration of the checkpoint being resumed, or ``None``.
        step_key: the column holding the iteration.

    Raises:
        ValueError: on resume, an existing file whose header differs from ``fieldnames``.

    Example:
        >>> with MetricsWriter("metrics.csv", ["iteration", "loss"]) as log:  # doctest: +SKIP
        ...     log.write({"iteration": 1, "loss": 0.5})
    """

    def __init__(self, path: str | os.PathLike, fieldnames: Sequence[str], *,
                 resume_from: int | None = None, step_key: str = "iteration") -> None:
        self.path = Path(path)
        self.fieldnames = list(fieldnames)
        self.step_key = step_key
        if step_key not in self.fieldnames:
            raise ValueError(f"step_key {step_key!r} is not one of the fieldnames "
                             f"{self.fieldnames}")
        kept: list[dict[str, str]] = []
        if resume_from is not None and self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is not None and reader.fieldnames != self.fieldnames:
                    raise ValueError(f"{str(self.path)!r} has the columns {reader.fieldnames}, "
                                     f"not {self.fieldnames}; cannot resume into it")
                kept = [row for row in reader if _step(row[step_key]) <= resume_from]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Rewrite the kept rows through a temporary file, atomically: a crash here must not
        # lose the metrics of the run being resumed.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                   suffix=".tmp")
        _chmod_like(fd, self.path)
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fieldnames)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.path)
        self._file: TextIO = open(self.path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.DictWriter(self._file, fieldnames=self.fieldnames)

    def write(self, row: Mapping[str, Any]) -> None:
        """Appends one row (missing columns are left empty; unknown columns raise)."""
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _step(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.inf  # an unreadable step is dropped on resume rather than kept twice


def read_metrics(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a metrics CSV, as strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Progress


def _tqdm_class() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """A progress bar over meta-iterations that shows the running meta-loss.

    With tqdm installed it is a tqdm bar; without it (or with ``use_tqdm=False``) it prints a
    plain line at most every ``every_s`` seconds and at the end. The running loss is the mean
    of the last :data:`RUNNING_WINDOW` values passed to :meth:`update`.

    Args:
        total: the last iteration.
        initial: the iteration to start from (after a resume).
        desc: a label.
        use_tqdm: ``None`` uses tqdm when it imports.
        file: where to write (default ``sys.stderr``).
        every_s: plain mode only: the least seconds between two lines (0 prints every update).
        disable: show nothing.

    Example:
        >>> with Progress(100, use_tqdm=False, disable=True) as bar:
        ...     for it in range(100):
        ...         bar.update(loss=1.0 / (it + 1))
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "meta-train",
                 use_tqdm: bool | None = None, file: TextIO | None = None,
                 every_s: float = PLAIN_EVERY_S, disable: bool = False) -> None:
        self.total, self.n, self.desc = total, initial, desc
        self.file = file
        self.every_s = every_s
        self.disable = disable
        self._losses: deque[float] = deque(maxlen=RUNNING_WINDOW)
        self._extra: dict[str, float] = {}
        self._last_print = -math.inf
        tqdm = _tqdm_class() if use_tqdm in (None, True) else None
        if use_tqdm and tqdm is None:
            raise ImportError("use_tqdm=True needs tqdm: pip install tqdm")
        self._bar = None
        if tqdm is not None and not disable:
            self._bar = tqdm(total=total, initial=initial, desc=desc, file=file,
                             dynamic_ncols=True)

    @property
    def running_loss(self) -> float:
        """The mean of the last :data:`RUNNING_WINDOW` losses (nan before the first)."""
        return statistics.fmean(self._losses) if self._losses else math.nan

    def update(self, n: int = 1, *, loss: float | None = None, **metrics: float) -> None:
        """Advances by ``n`` iterations; ``loss`` joins the running mean, and ``metrics``
        (e.g. a validation accuracy) are shown as they are until replaced."""
        self.n += n
        if loss is not None:
            self._losses.append(float(loss))
        self._extra.update({k: float(v) for k, v in metrics.items()})
        if self.disable:
            return
        if self._bar is not None:
            self._bar.set_postfix(self._postfix(), refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_print >= self.every_s or self.n >= self.total:
            self._last_print = now
            print(self._line(), file=self.file or sys.stderr, flush=True)

    def _postfix(self) -> dict[str, str]:
        out = {"loss": f"{self.running_loss:.4g}"}
        out.update({k: f"{v:.4g}" for k, v in self._extra.items()})
        return out

    def _line(self) -> str:
        fields = " ".join(f"{k}={v}" for k, v in self._postfix().items())
        return f"{self.desc} {self.n}/{self.total} {fields}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Estimates over tasks

# Two-sided 95% quantile of the standard normal (1.96), the convention of the few-shot
# literature (e.g. Finn et al. 2017, Vinyals et al. 2016 report mean ± 1.96 * std / sqrt(n)).
Z_95 = statistics.NormalDist().inv_cdf(0.975)


class MeanCI(NamedTuple):
    """A mean over n tasks and the half-width of its confidence interval."""

    mean: float
    ci: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.ci:.2g} (n={self.n})"


def mean_ci(values: Iterable[float] | torch.Tensor | np.ndarray,
            confidence: float = 0.95) -> MeanCI:
    """The mean of ``values`` and the half-width of its normal confidence interval,
    ``z * std / sqrt(n)`` with the sample standard deviation (``ddof=1``).

    Raises:
        ValueError: no values, a non-finite value, or a confidence outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    elif not isinstance(values, np.ndarray):
        values = list(values)
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    if data.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.isfinite(data).all():
        raise ValueError("mean_ci got a non-finite value")
    mean = float(data.mean())
    if data.size == 1:
        return MeanCI(mean, math.nan, 1)
    z = Z_95 if confidence == 0.95 else statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * float(data.std(ddof=1)) / math.sqrt(data.size)
    return MeanCI(mean, half, int(data.size))
