"""Where fastmeta decides which implementation of an op runs: the one and only place.

Every op takes ``impl=`` (an :class:`Impl` or its name). ``auto`` resolves per device:

* CPU tensors run the native C++ kernels (``fastmeta._C``) when the extension is built;
* CUDA tensors run the Triton kernels when Triton imports;
* anything else, or a missing implementation, runs the plain-PyTorch reference and warns once.

An explicit ``impl=`` (or the ``FASTMETA_IMPL`` environment variable, which replaces ``auto``)
is obeyed or raises :class:`ImplementationUnavailable`; it never degrades silently.

``TRITON_INTERPRET=1`` makes Triton run on CPU tensors, which is how the Triton kernels are
tested on machines without a GPU. ``auto`` never picks Triton for CPU tensors.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "Impl",
    "ImplementationUnavailable",
    "available",
    "native",
    "resolve",
    "torch_blas_gemm",
    "trace",
    "triton_kernels",
]

IMPL_ENV_VAR = "FASTMETA_IMPL"


class Impl(str, enum.Enum):
    """The implementations an op can run."""

    AUTO = "auto"
    REFERENCE = "reference"
    NATIVE = "native"
    TRITON = "triton"


class ImplementationUnavailable(RuntimeError):
    """Raised when an implementation that was asked for explicitly cannot run."""


_native_module: ModuleType | None = None
_native_error: str | None = None
_native_loaded = False
_triton_error: str | None = None
_triton_checked = False
_warned: set[tuple[str, str]] = set()
_trace_stack: list[list[tuple[str, Impl]]] = []


def native() -> ModuleType | None:
    """The compiled extension ``fastmeta._C``, or None when it is not built."""
    global _native_module, _native_error, _native_loaded
    if not _native_loaded:
        _native_loaded = True
        try:
            _native_module = importlib.import_module("fastmeta._C")
        except ImportError as exc:
            _native_error = f"{exc}"
    return _native_module


_blas_gemm: dict[torch.dtype, int | None] = {}
# Set FASTMETA_NO_TORCH_BLAS=1 to keep the native code from calling torch's BLAS (the MLP
# unroll of fastmeta.hpo and MAML's MLP task gradients then run their torch paths).
_NO_TORCH_BLAS = "FASTMETA_NO_TORCH_BLAS"


def torch_blas_gemm(dtype: torch.dtype) -> int | None:
    """The address of the Fortran BLAS ``sgemm_`` (float32) or ``dgemm_`` (float64) that
    torch's CPU library carries (MKL on x86-64 builds), for native code that multiplies small
    matrices without a torch call per product; None where torch's library does not export it,
    for another dtype, or with ``FASTMETA_NO_TORCH_BLAS=1``.

    Found with ctypes in the already-loaded ``libtorch_cpu``, so the extension itself links
    against no torch or BLAS library (csrc/mlp.h passes the integers so that an LP64
    and an ILP64 BLAS read them alike).
    """
    if os.environ.get(_NO_TORCH_BLAS, "0") == "1":
        return None
    if dtype not in _blas_gemm:
        name = {torch.float32: "sgemm_", torch.float64: "dgemm_"}.get(dtype)
        address = None
        if name is not None:
            import ctypes
            import glob

            lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
            for path in sorted(glob.glob(os.path.join(lib_dir, "libtorch_cpu.*"))):
                try:
                    address = ctypes.cast(getattr(ctypes.CDLL(path), name),
                                          ctypes.c_void_p).value
                except (OSError, AttributeError):
                    continue
                break
        _blas_gemm[dtype] = address
    return _blas_gemm[dtype]


def _triton_importable() -> bool:
    global _triton_error, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        try:
            importlib.import_module("triton")
        except ImportError as exc:
            _triton_error = f"{exc}"
    return _triton_error is None


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_kernels(op: str) -> ModuleType:
    """The Triton kernel module ``fastmeta.kernels.<op>``; imported lazily, so a CPU-only user
    never needs Triton."""
    return importlib.import_module(f"fastmeta.kernels.{op}")


def _why_unavailable(impl: Impl, device: torch.device) -> str | None:
    """None when ``impl`` can run on ``device``, else the reason it cannot."""
    if impl is Impl.REFERENCE:
        return None
    if impl is Impl.NATIVE:
        if device.type != "cpu":
            return f"the native kernels run on CPU tensors only, and these are on {device}"
        if native() is None:
            return (
                f"the extension fastmeta._C is not built ({_native_error}); reinstall without "
                "FASTMETA_NO_EXTENSIONS=1 and with a C++17 compiler"
            )
        return None
    if impl is Impl.TRITON:
        if not _triton_importable():
            return f"Triton does not import ({_triton_error}); pip install triton"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return (
            f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
            f"and these are on {device}"
        )
    raise ValueError(f"impl: unknown implementation {impl!r}")


def _parse(impl: Impl | str) -> Impl:
    try:
        return Impl(impl)
    except ValueError:
        names = ", ".join(i.value for i in Impl)
        raise ValueError(f"impl: expected one of {names}, got {impl!r}") from None


def _warn_once(op: str, message: str) -> None:
    key = (op, message)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def requested_impl(impl: Impl | str) -> Impl:
    """What the caller asked for: ``impl``, or the ``FASTMETA_IMPL`` environment variable where
    ``impl`` is ``auto`` and the variable is set (``auto`` when neither names one)."""
    requested = _parse(impl)
    if requested is Impl.AUTO:
        env = os.environ.get(IMPL_ENV_VAR, "").strip()
        if env:
            requested = _parse(env)
    return requested


def resolve(impl: Impl | str, device: torch.device, *, op: str, record: bool = True) -> Impl:
    """Turns a requested implementation into the one that will run ``op`` on ``device``.

    Args:
        impl: what the caller asked for; ``auto`` (the default everywhere) may be replaced by
            the ``FASTMETA_IMPL`` environment variable.
        device: where the op's tensors live.
        op: the op's name, used in messages and in :func:`trace`.
        record: note the choice for :func:`trace` (False when resolving ahead of a run).

    Raises:
        ImplementationUnavailable: an explicitly requested implementation cannot run here.
    """
    # The common case first (auto on a CPU tensor with the extension built and no override):
    # the general path below costs ~9 µs, as much as a whole differentiable step on a small
    # buffer such as CAVIA's [25, 5] context.
    if (impl is Impl.AUTO and _native_module is not None and device.type == "cpu"
            and IMPL_ENV_VAR not in os.environ):
        if record and _trace_stack:
            _trace_stack[-1].append((op, Impl.NATIVE))
        return Impl.NATIVE
    requested = requested_impl(impl)
    if requested is not Impl.AUTO:
        why = _why_unavailable(requested, device)
        if why is not None:
            raise ImplementationUnavailable(f"{op}: impl={requested.value} was requested but {why}")
        chosen = requested
    else:
        preferred = {"cpu": Impl.NATIVE, "cuda": Impl.TRITON}.get(device.type)
        if preferred is None:
            why = f"fastmeta has no fused kernel for {device.type} tensors"
        else:
            why = _why_unavailable(preferred, device)
        if why is None:
            chosen = preferred
        else:
            _warn_once(op, f"fastmeta: {op} falls back to the PyTorch reference because {why}")
            chosen = Impl.REFERENCE
    if record:
        note(op, chosen)
    return chosen


def is_auto(impl: Impl | str) -> bool:
    """True when ``impl`` leaves the choice to fastmeta: ``auto``, with no ``FASTMETA_IMPL``
    override."""
    return _parse(impl) is Impl.AUTO and not os.environ.get(IMPL_ENV_VAR, "").strip()


def note(op: str, impl: Impl) -> None:
    """Records that ``op`` ran on ``impl``, for :func:`trace`; ops that resolved their
    implementation earlier (see :mod:`fastmeta.ops.prepared`) call it on every run."""
    if _trace_stack:
        _trace_stack[-1].append((op, impl))


@contextlib.contextmanager
def trace() -> Iterator[list[tuple[str, Impl]]]:
    """Records ``(op, impl)`` for every op resolved inside the block; tests use it to check
    which implementation actually ran.

    Example:
        >>> with trace() as calls:
        ...     fastmeta.ops.sgd.sgd_step_(params, grads, lr=0.1)
        >>> calls
        [('sgd_step_', <Impl.NATIVE: 'native'>)]
    """
    calls: list[tuple[str, Impl]] = []
    _trace_stack.append(calls)
    try:
        yield calls
    finally:
        _trace_stack.pop()


def available() -> dict[str, Any]:
    """What this install can run: the native extension and its ISA, Triton, CUDA, and whether
    native code can call torch's BLAS."""
    module = native()
    triton_ok = _triton_importable()
    triton_version = None
    if triton_ok:
        triton_version = getattr(importlib.import_module("triton"), "__version__", None)
    return {
        "native": module is not None,
        "native_error": None if module is not None else _native_error,
        "isa": module.isa() if module is not None else None,
        "native_threads": module.num_threads() if module is not None else None,
        "openmp": module.has_openmp() if module is not None else None,
        "triton": triton_ok,
        "triton_version": triton_version,
        "triton_error": _triton_error,
        "triton_interpreted": triton_interpreted(),
        "cuda": torch.cuda.is_available(),
        "impl_override": os.environ.get(IMPL_ENV_VAR) or None,
        # torch's BLAS, which the native MLP ops call (the HPO unroll, MAML's task gradients;
        # False: not found or FASTMETA_NO_TORCH_BLAS=1, and they run their torch paths).
        "torch_blas": torch_blas_gemm(torch.float32) is not None,
    }
