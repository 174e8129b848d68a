"""Meta-training across processes and machines, on ``torch.distributed``.

A distributed meta-step splits one meta-batch of T tasks across the W processes (ranks) of a
``torchrun`` job:

1. every rank samples the **whole** meta-batch with the same seeded sampler, so the sampler's
   state (and a checkpoint of it) does not depend on W, and keeps its own contiguous share of
   the tasks (:func:`owned_tasks`);
2. the inner loops of those tasks run locally;
3. each rank's meta-gradient (of the mean query loss over *its* tasks) is weighted by
   ``T_r / T`` and summed over the ranks by **one** ``all_reduce`` of a flat bucket holding every
   ``.grad`` (:func:`all_reduce_gradients`), which gives every rank the mean-over-tasks
   meta-gradient of the single-process run:

   .. math::
       \\sum_r \\frac{T_r}{T} \\nabla \\frac{1}{T_r} \\sum_{t \\in r} \\mathcal{L}_t
       = \\nabla \\frac{1}{T} \\sum_t \\mathcal{L}_t

4. every rank takes the same outer step, so the meta-parameters and the outer optimizer's state
   stay identical everywhere; whatever transforms the meta-gradient (clipping) runs after the
   all-reduce.

In exact arithmetic this is the single-process run. In floating point the sum over tasks is
taken in another order (within each rank, then across ranks), so the meta-parameters agree to
rounding: about 1e-7 relative in float32 after 50 sinusoid MAML iterations on 2 ranks, 1e-16 in
float64 (``tests/test_distributed.py`` measures it).

Faults: every collective runs under the process group's timeout (:data:`DEFAULT_TIMEOUT_S`,
``timeout_s=``), and with gloo a failed or timed-out collective raises
:class:`DistributedError`, which names the collective, this rank and the peer error. A peer
that died is usually reported at once (its sockets close); one that hangs is reported when the
timeout expires. With NCCL the timeout is enforced by torch's NCCL watchdog, which by default
aborts the process rather than raising: the job still ends instead of hanging, but without
this module's message (only the gloo path is tested here; no GPU was available).

Backends: gloo for tensors on the CPU, NCCL for CUDA (each process on the GPU of its
``LOCAL_RANK``).

Example (run under ``torchrun --nproc_per_node=2``)::

    from fastmeta import distributed
    with distributed.session() as ctx:
        share = distributed.owned_tasks(episode.num_tasks)
        out = maml(episode.select_tasks(share.start, share.stop))
        outer.zero_grad(); out.loss.backward()
        distributed.all_reduce_gradients(maml.parameters(),
                                         scale=len(share) / episode.num_tasks)
        outer.step()
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from fastmeta.flat import FlatEntry, FlatLayout

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TORCHRUN_VARIABLES",
    "DistributedContext",
    "DistributedError",
    "all_gather_object",
    "all_reduce_gradients",
    "barrier",
    "broadcast_object",
    "broadcast_parameters",
    "check_same_config",
    "context",
    "exit_skipping_teardown",
    "init",
    "is_initialized",
    "is_main_process",
    "missing_torchrun_variables",
    "on_main",
    "owned_tasks",
    "session",
    "shutdown",
]

#: Seconds a collective (or the rendezvous) may wait for the other ranks before it fails.
#: Longer than rank 0's periodic evaluation and checkpoint in a default run, during which the
#: other ranks wait in the next all-reduce; far shorter than torch's default of 30 minutes, so
#: a dead or hung peer is reported in minutes.
DEFAULT_TIMEOUT_S = 300.0
#: The variables ``torchrun`` sets for each process, which :func:`init` reads by default.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# The timeout :func:`init` gave the process group it made (None: not made here).
_timeout_s: float | None = None


class DistributedError(RuntimeError):
    """A collective failed or timed out: a peer died, hung, or could not be reached."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job.

    Attributes:
        rank: this process, ``0..world_size-1``.
        world_size: W, the number of processes.
        local_rank: this process on its machine (its GPU, with NCCL).
        backend: ``"gloo"`` or ``"nccl"``.
        device: where the tensors of the collectives live.
        timeout_s: how long a collective may wait for the others (None: a process group
            that :func:`init` did not make, with whatever timeout its maker gave it).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float | None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, metrics and progress."""
        return self.rank == 0


# ---- setting up and tearing down ----------------------------------------------------------------


def missing_torchrun_variables() -> list[str]:
    """The :data:`TORCHRUN_VARIABLES` not set in this process's environment (empty under
    ``torchrun``)."""
    return [name for name in TORCHRUN_VARIABLES if not os.environ.get(name)]


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"{name} is not set: launch with torchrun, or pass it explicitly")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an int") from None


def _check_timeout(timeout_s: float) -> float:
    if (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
            or not math.isfinite(timeout_s) or timeout_s <= 0):
        raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
    return float(timeout_s)


def _check_rank(rank: Any, world_size: Any) -> None:
    for name, value, least in (("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size, got rank={rank}, world_size={world_size}")


def _backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def is_initialized() -> bool:
    """Whether this process is in a ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def init(
    *,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> DistributedContext:
    """Joins the process group of a job.

    By default everything comes from the ``torchrun`` environment (:data:`TORCHRUN_VARIABLES`,
    rendezvous at ``env://``); any of it can be given explicitly instead, e.g.
    ``init(rank=r, world_size=2, init_method="tcp://127.0.0.1:29500")``.

    Args:
        rank, world_size: this process and the number of processes (default: ``RANK`` and
            ``WORLD_SIZE``).
        init_method: the rendezvous URL (default ``env://``: ``MASTER_ADDR``/``MASTER_PORT``).
        device: where the collectives' tensors live (default: ``cuda:LOCAL_RANK`` when CUDA is
            available, else the CPU).
        backend: default ``"nccl"`` for a CUDA device, ``"gloo"`` for the CPU.
        timeout_s: how long the rendezvous and every collective may wait for the other ranks
            before raising, instead of hanging on a dead peer.

    Returns:
        This process's :class:`DistributedContext`.

    Raises:
        ValueError: a missing or bad argument or environment variable, named.
        RuntimeError: a process group is already initialized (use :func:`context`), or
            ``torch.distributed`` is not available in this build.
        DistributedError: the rendezvous failed or timed out.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialized; use "
                           "fastmeta.distributed.context() to describe it")
    timeout_s = _check_timeout(timeout_s)
    rank = _env_int("RANK") if rank is None else rank
    world_size = _env_int("WORLD_SIZE") if world_size is None else world_size
    _check_rank(rank, world_size)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if init_method is None:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise ValueError(f"{' and '.join(missing)} not set: launch with torchrun, or pass "
                             "init_method (e.g. 'tcp://127.0.0.1:29500')")
        init_method = "env://"
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    backend = backend or _backend_for(device)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs a CUDA device, got device={device}")
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator eagerly, to this GPU
    where = init_method if init_method != "env://" else (
        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"rank {rank} of {world_size} could not join the process group at {where} within "
            f"{timeout_s:g} s ({backend}): {_first_line(exc)}") from exc
    global _timeout_s
    _timeout_s = timeout_s
    return DistributedContext(rank, world_size, local_rank, backend, device, timeout_s)


def context() -> DistributedContext:
    """The :class:`DistributedContext` of the process group this process is in (whoever
    initialized it).

    Raises:
        RuntimeError: no process group is initialized.
    """
    if not is_initialized():
        raise RuntimeError("no torch.distributed process group is initialized; call "
                           "fastmeta.distributed.init() (or launch with torchrun)")
    backend = str(dist.get_backend())
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend
              else torch.device("cpu"))
    return DistributedContext(rank, dist.get_world_size(), local_rank, backend, device,
                              _timeout_s)


def shutdown() -> None:
    """Leaves the process group (``destroy_process_group``); nothing if there is none."""
    global _timeout_s
    if is_initialized():
        dist.destroy_process_group()
    _timeout_s = None


@contextlib.contextmanager
def session(**init_kwargs: Any) -> Iterator[DistributedContext]:
    """:func:`init` on entry and :func:`shutdown` on exit, even on an error. If a process group
    already exists (the caller made it) it is used as it is, whatever ``init_kwargs`` say, and
    left in place.

    Args:
        **init_kwargs: those of :func:`init`.
    """
    if is_initialized():
        yield context()
        return
    ctx = init(**init_kwargs)
    try:
        yield ctx
    finally:
        shutdown()


def is_main_process() -> bool:
    """True on rank 0 of a process group, and in a process that is in none."""
    return not is_initialized() or dist.get_rank() == 0


# ---- which tasks are whose ----------------------------------------------------------------------


def owned_tasks(num_tasks: int, *, rank: int | None = None,
                world_size: int | None = None) -> range:
    """The tasks of a T-task meta-batch that ``rank`` owns: a contiguous range, the first
    ``T mod W`` ranks taking one task more than the others.

    The meta-batch itself comes from the run's seeded sampler, drawn whole on every rank, so
    which task a rank gets depends only on the seed, T, W and the rank.

    Args:
        num_tasks: T.
        rank, world_size: default: those of the current process group (0 and 1 outside one).

    Raises:
        ValueError: T < W (a rank would have no task), or a bad argument.
    """
    if rank is None or world_size is None:
        here = (dist.get_rank(), dist.get_world_size()) if is_initialized() else (0, 1)
        rank = here[0] if rank is None else rank
        world_size = here[1] if world_size is None else world_size
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
    _check_rank(rank, world_size)
    if num_tasks < world_size:
        raise ValueError(f"a meta-batch of {num_tasks} task(s) cannot be split across "
                         f"{world_size} processes: every process needs at least one task "
                         "(raise the meta-batch or use fewer processes)")
    base, extra = divmod(num_tasks, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


# ---- collectives --------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _collective(name: str) -> Iterator[None]:
    """Turns a failed or timed-out collective into a :class:`DistributedError` that says
    which, where, after how long, and what the peer's transport reported."""
    started = time.monotonic()
    try:
        yield
    except RuntimeError as exc:  # DistBackendError, DistNetworkError and gloo's own errors
        if isinstance(exc, DistributedError):
            raise
        here = context()
        timeout = "" if here.timeout_s is None else f" (timeout {here.timeout_s:g} s)"
        raise DistributedError(
            f"{name} failed on rank {here.rank} of {here.world_size} after "
            f"{time.monotonic() - started:.1f} s{timeout}: another rank "
            f"died, hung or became unreachable. {here.backend}: {_first_line(exc)}") from exc


def _check_tensors(tensors: Sequence[torch.Tensor], what: str) -> tuple[torch.dtype,
                                                                         torch.device]:
    if not tensors:
        raise ValueError(f"{what}: no parameters given")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{what}: parameter {i} must be a floating-point tensor, got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{what}: parameter {i} is {t.dtype} on {t.device} but parameter 0 "
                             f"is {first.dtype} on {first.device}; one flat bucket holds one "
                             "dtype on one device")
    if str(dist.get_backend()) == "nccl" and first.device.type != "cuda":
        raise ValueError(f"{what}: the process group's backend is NCCL, which cannot reduce "
                         f"tensors on {first.device}; use gloo for CPU tensors")
    return first.dtype, first.device


def _layout(tensors: Sequence[torch.Tensor], dtype: torch.dtype,
            device: torch.device) -> FlatLayout:
    """Where each tensor sits in one flat bucket: a :class:`~fastmeta.flat.FlatLayout` of the
    tensors themselves (not of one module's parameters: Meta-SGD's learned lr is outside it)."""
    entries, offset = [], 0
    for i, t in enumerate(tensors):
        entries.append(FlatEntry(str(i), t.shape, offset, t.numel()))
        offset += t.numel()
    return FlatLayout(tuple(entries), dtype=dtype, device=device)


def all_reduce_gradients(
    params: Iterable[torch.Tensor],
    *,
    scale: float = 1.0,
    extra: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Sums every parameter's ``.grad`` across the ranks, in place, with **one** ``all_reduce``.

    The gradients are copied into one flat bucket (laid out by a
    :class:`~fastmeta.flat.FlatLayout`), multiplied by ``scale``, summed over the ranks, and
    written back. With ``scale = T_r / T`` (this rank's share of the tasks) and each rank's
    gradient that of its mean task loss, every rank ends with the mean-over-tasks gradient of
    the whole meta-batch. A parameter whose ``.grad`` is None on a rank counts as zero there,
    and stays None only if it is None on every rank (so an optimizer skips it as it would in
    one process).

    Args:
        params: the meta-parameters (e.g. ``learner.parameters()``), in the same order on every
            rank; one dtype on one device.
        scale: this rank's weight in the sum.
        extra: a few numbers to sum across the ranks in the same collective, unscaled (e.g.
            each rank's share of the meta-loss, for logging).

    Returns:
        ``extra`` summed over the ranks (a 1-d tensor), or None.

    Raises:
        DistributedError: the all-reduce failed or timed out (a peer died or hung).
        RuntimeError: no process group is initialized.
    """
    if not is_initialized():
        raise RuntimeError("all_reduce_gradients needs a torch.distributed process group; call "
                           "fastmeta.distributed.init() (or launch with torchrun)")
    params = list(params)
    dtype, device = _check_tensors(params, "all_reduce_gradients")
    layout = _layout(params, dtype, device)
    extra_t = (None if extra is None else
               torch.as_tensor(extra, dtype=dtype, device=device).reshape(-1))
    n, k = layout.numel, len(params)
    bucket = torch.empty(n + k + (0 if extra_t is None else extra_t.numel()), dtype=dtype,
                         device=device)
    grads, present = bucket[:n], bucket[n:n + k]
    views = list(layout.views(grads).values())
    with torch.no_grad():
        for i, (p, view) in enumerate(zip(params, views)):
            if p.grad is None:
                view.zero_()
                present[i] = 0
            else:
                view.copy_(p.grad)
                present[i] = 1
        if scale != 1.0:
            grads.mul_(scale)
        if extra_t is not None:
            bucket[n + k:].copy_(extra_t)
        with _collective(f"all_reduce of the meta-gradient ({n} elements)"):
            dist.all_reduce(bucket, op=dist.ReduceOp.SUM)
            # Reading the result waits for it (NCCL only queues the collective), so a failure
            # surfaces here too.
            counts = present.tolist()
        for p, view, count in zip(params, views, counts):
            if count == 0:
                continue
            if p.grad is None:
                p.grad = view.clone()
            else:
                p.grad.copy_(view)
    return None if extra_t is None else bucket[n + k:].clone()


def broadcast_parameters(params: Iterable[torch.Tensor], *, src: int = 0) -> None:
    """Overwrites every rank's ``params`` with those of rank ``src``, in one flat broadcast, so
    that all ranks start from the same meta-parameters whatever they initialized.

    Raises:
        DistributedError: the broadcast failed or timed out.
    """
    params = list(params)
    dtype, device = _check_tensors(params, "broadcast_parameters")
    layout = _layout(params, dtype, device)
    with torch.no_grad():
        bucket = torch.cat([p.detach().reshape(-1) for p in params])
        with _collective(f"broadcast of the meta-parameters from rank {src}"):
            dist.broadcast(bucket, src=src)
        for p, view in zip(params, layout.views(bucket).values()):
            p.copy_(view)


def broadcast_object(obj: Any, *, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable object) on every rank.

    Raises:
        DistributedError: the broadcast failed or timed out.
    """
    box = [obj]
    with _collective(f"broadcast of an object from rank {src}"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank.

    Raises:
        DistributedError: the gather failed or timed out.
    """
    out: list[Any] = [None] * dist.get_world_size()
    with _collective("all_gather of an object"):
        dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run on rank 0 alone; its result, or the exception it raised, on
    every rank (so that, e.g., a checkpoint only rank 0 can read fails the same way
    everywhere instead of leaving the other ranks waiting). Outside a process group it is
    just ``fn(*args, **kwargs)``.

    Raises:
        Exception: what ``fn`` raised on rank 0 (on rank 0 itself, with its traceback).
        DistributedError: the broadcast of the outcome failed or timed out.
    """
    if not is_initialized():
        return fn(*args, **kwargs)
    result: Any = None
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            error = exc
    shipped = error
    if error is not None:
        try:
            pickle.dumps(error)
        except Exception:  # an exception that cannot travel is sent as its text
            shipped = RuntimeError(f"{type(error).__name__}: {error}")
    result, shipped = broadcast_object((result, shipped))
    if error is not None:
        raise error
    if shipped is not None:
        raise shipped
    return result


def check_same_config(config: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> None:
    """Raises on every rank if the ranks were not given the same ``config`` (the keys in
    ``ignore``, such as a path that may differ from machine to machine, aside): a job whose
    ranks train different things would silently average unrelated gradients.

    Raises:
        ValueError: naming each key on which a rank disagrees with rank 0.
        DistributedError: the gather failed or timed out.
    """
    skip = set(ignore)
    configs = all_gather_object({k: v for k, v in config.items() if k not in skip})
    for rank, other in enumerate(configs[1:], start=1):
        keys = sorted(k for k in set(configs[0]) | set(other)
                      if configs[0].get(k) != other.get(k))
        if keys:
            raise ValueError(
                f"the processes were given different configs: rank {rank} has "
                + ", ".join(f"{k}={other.get(k)!r}" for k in keys) + " where rank 0 has "
                + ", ".join(f"{k}={configs[0].get(k)!r}" for k in keys)
                + " (launch every process with the same options)")


def barrier() -> None:
    """Waits until every rank gets here (or raises :class:`DistributedError` on timeout)."""
    with _collective("barrier"):
        dist.barrier()


def exit_skipping_teardown(code: int) -> NoReturn:
    """Flushes stdout and stderr and ends the process with ``code`` through ``os._exit``,
    skipping the interpreter's teardown: for a process that joined a process group and has
    nothing left to do. With torch 2.13's gloo, the C++ teardown at interpreter exit sometimes
    aborts ("terminate called without an active exception", exit -6) even after
    ``destroy_process_group``, after failed collectives and successful runs alike (see
    :func:`fastmeta.cli.console_main`)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a closed pipe must not skip the exit
            stream.flush()
    os._exit(code)
