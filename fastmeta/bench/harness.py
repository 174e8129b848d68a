"""The shared benchmark harness: timing, the memory roofline, machine info and reports.

* CPU timing uses ``torch.utils.benchmark.Timer`` with **every thread** the machine has
  (its default of one thread would hide the parallel speed of torch and of our kernels alike),
  a warm-up, and ``blocked_autorange``; we report the median and the 20th/80th percentiles of
  the per-block times.
* CUDA timing uses ``triton.testing.do_bench`` (which flushes L2 and syncs).
* The roofline is measured in the same run: ``fastmeta._C.stream`` reads R float32 arrays and
  writes W of them back in place, in one pass, with the same threads and chunking as the
  optimizer kernels. A kernel that moves the same bytes cannot beat it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# Seconds of repeated calls behind each measurement; enough for tens of blocks on small ops.
DEFAULT_MIN_RUN_TIME = 0.5
# Calls made before timing starts: page faults, lazy allocations and OpenMP team start-up.
WARMUP_CALLS = 3


@dataclass
class Timing:
    """Seconds per call: the median and the 20th/80th percentiles of the timed blocks."""

    median: float
    p20: float
    p80: float
    blocks: int

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: how noisy the measurement was."""
        return (self.p80 - self.p20) / self.median if self.median else 0.0


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_fn(
    fn: Callable[[], Any],
    *,
    device: str = "cpu",
    min_run_time: float = DEFAULT_MIN_RUN_TIME,
    label: str = "",
) -> Timing:
    """Times ``fn()`` (which must leave things ready for another call)."""
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return Timing(ms[0] / 1e3, ms[1] / 1e3, ms[2] / 1e3, blocks=0)
    from torch.utils.benchmark import Timer

    for _ in range(WARMUP_CALLS):
        fn()
    timer = Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), label=label
    )
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = sorted(m.times)
    return Timing(
        median=statistics.median(times),
        p20=_quantile(times, 0.2),
        p80=_quantile(times, 0.8),
        blocks=len(times),
    )


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    min_run_time: float = DEFAULT_MIN_RUN_TIME,
    device: str = "cpu",
) -> dict[str, Timing]:
    """Times every ``fns[name]`` in ``rounds`` interleaved rounds of ``min_run_time / rounds``
    seconds each and keeps each side's fastest round (by median).

    On a shared machine another process that starts in the middle of a measurement slows
    whatever runs then; interleaving spreads such bursts over every side alike, and keeping the
    least disturbed round (as ``timeit`` keeps the minimum) treats all sides the same way.
    """
    best: dict[str, Timing] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time_fn(fn, min_run_time=min_run_time / rounds, device=device)
            if name not in best or t.median < best[name].median:
                best[name] = t
    return best


# Round-robin timing: each slot times a block of calls lasting about this long, and every
# side gets at least this many blocks.
ROUND_ROBIN_BLOCK_SECONDS = 2e-3
ROUND_ROBIN_MIN_CYCLES = 10


def time_round_robin(
    fns: dict[str, Callable[[], Any]],
    *,
    min_run_time: float = DEFAULT_MIN_RUN_TIME,
    min_cycles: int = ROUND_ROBIN_MIN_CYCLES,
) -> dict[str, Timing]:
    """Times every ``fns[name]`` in turn, one short block of calls each (about
    :data:`ROUND_ROBIN_BLOCK_SECONDS`, or one call if a call is longer), cycle after cycle (each
    cycle starting one side later),
    until the cycles have taken ``min_run_time`` seconds per side (and at least ``min_cycles``
    cycles); each side's median and percentiles are over its blocks, in seconds per call.
    Slow sides make long cycles, so the fast sides get fewer blocks than ``min_run_time``
    suggests (a 12 ms step timed beside a 70 ms for-loop baseline: ~30 blocks in 7 s);
    ``min_cycles`` sets the number of samples behind every median directly.

    For memory-bound steps on a shared machine. The bandwidth left to us here drifts by tens
    of percent within seconds (the same 16M-element Adam step measured 9.8 ms and 15.0 ms in
    two runs a minute apart), so sides timed one after the other, or in a few long rounds,
    compare different machines. Alternating blocks of a few milliseconds gives every side the
    same mix of quiet and busy moments, and the median of many blocks is then a fair
    comparison (the stream floor included). CPU only.

    The blocks are timed with ``time.perf_counter`` in this process, whose torch and OpenMP
    thread counts are left at their defaults (every core), which is what ``time_fn``'s
    ``Timer(..., num_threads=torch.get_num_threads())`` asks for; ``Timer.timeit`` itself
    would add at least two warm-up calls to every block (a conv-4 MAML step takes a second).
    """
    if isinstance(min_cycles, bool) or not isinstance(min_cycles, int) or min_cycles < 1:
        raise ValueError(f"min_cycles must be an int >= 1, got {min_cycles!r}")
    for fn in fns.values():
        for _ in range(WARMUP_CALLS):
            fn()
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        started = time.perf_counter()
        fn()
        single = max(time.perf_counter() - started, 1e-7)
        calls[name] = max(1, round(ROUND_ROBIN_BLOCK_SECONDS / single))
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    budget_end = time.perf_counter() + min_run_time * len(fns)
    cycles = 0
    names = list(fns)
    while cycles < min_cycles or time.perf_counter() < budget_end:
        # Each cycle starts one side later, so that no side always follows the same other
        # (whose data then fills the caches, or whose dirty lines it has to write back).
        for i in range(len(names)):
            name = names[(cycles + i) % len(names)]
            started = time.perf_counter()
            for _ in range(calls[name]):
                fns[name]()
            per_call[name].append((time.perf_counter() - started) / calls[name])
        cycles += 1
    timings = {}
    for name, values in per_call.items():
        values.sort()
        timings[name] = Timing(median=statistics.median(values), p20=_quantile(values, 0.2),
                               p80=_quantile(values, 0.8), blocks=len(values))
    return timings


def stream_probe(sizes: int | list[int], reads: int, writes: int) -> Callable[[], None] | None:
    """The roofline probe on fresh float32 arrays: ``reads`` streams in, ``writes`` of them
    written back in place. Each stream is one array of ``sizes`` elements, or, given a list,
    one array per entry: a workload of many tensors is probed on tensors of the same sizes,
    since each tensor's start and end (a chunk cut short, the hardware prefetchers starting
    over) costs the stream kernel as it costs the optimizer. On the ResNet-18 list, one flat
    array per stream ran up to ~10% faster than the 62 tensors. None without the extension."""
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    if any(n < 0 for n in sizes):
        raise ValueError(f"stream_probe: sizes must be >= 0, got {sizes}")
    sizes = [n for n in sizes if n > 0]
    if not sizes:
        return None
    arrays = [[torch.rand(n) for n in sizes] for _ in range(reads)]
    probe = stream_probe_on(lambda: arrays, writes)
    if probe is not None:
        probe.arrays = arrays  # type: ignore[attr-defined]  # alive as long as the probe
    return probe


def stream_probe_on(
    streams: Callable[[], list[list[torch.Tensor]]], writes: int
) -> Callable[[], None] | None:
    """The roofline probe on given tensors: ``streams()`` returns one list of float32 CPU
    tensors per stream (tensor t of every stream has the same number of elements), the
    ``writes`` first streams written back in place. It is called at the probe's first call,
    so it may name optimizer state that the first step creates. None without the extension.

    Run on an optimizer's own params, grads and state, it measures what moving those very
    bytes costs, wherever they were allocated: on this machine tensors allocated at different
    moments of a process streamed up to ~5% apart, which a probe on fresh arrays cannot see.
    The probe overwrites the tensors with junk (their mean and small offsets); an optimizer
    timed alongside then steps from junk, which may hold a NaN (Adam's square root of a
    negative second moment): that changes no timing on the CPU, which runs NaN arithmetic at
    full speed, but do not read the values."""
    from fastmeta import backends

    native = backends.native()
    if native is None:
        return None
    bound: list[Any] = []

    def probe() -> None:
        if not bound:
            lists = streams()
            for i, tensors in enumerate(lists):
                if len(tensors) != len(lists[0]):
                    raise ValueError(f"stream_probe_on: stream {i} has {len(tensors)} tensors, "
                                     f"stream 0 has {len(lists[0])}")
                for j, (t, first) in enumerate(zip(tensors, lists[0])):
                    if (t.dtype != torch.float32 or t.device.type != "cpu"
                            or not t.is_contiguous() or t.numel() != first.numel()):
                        raise ValueError(f"stream_probe_on: tensor {j} of stream {i} is not a "
                                         "contiguous float32 CPU tensor matching stream 0's")
            bound.extend([[[t.data_ptr() for t in tensors] for tensors in lists],
                          [t.numel() for t in lists[0]], lists])
        native.stream(bound[0], writes, bound[1])

    return probe


_cuda_copy_bandwidth: float | None = None


def cuda_copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (bytes read + bytes written), measured once
    per process on 1 GiB: the GPU's practical memory roofline."""
    global _cuda_copy_bandwidth
    if _cuda_copy_bandwidth is None:
        src = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device="cuda")
        dst = torch.empty_like(src)
        t = time_fn(lambda: dst.copy_(src), device="cuda")
        _cuda_copy_bandwidth = 2 * src.numel() * 4 / t.median
        del src, dst
    return _cuda_copy_bandwidth


def cuda_copy_floor(nbytes: int) -> Timing:
    """The time the copy roofline needs to move ``nbytes`` (read + written)."""
    seconds = nbytes / cuda_copy_bandwidth()
    return Timing(seconds, seconds, seconds, blocks=0)


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a result needs next to it to mean anything."""
    from fastmeta import backends

    info = backends.available()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_threads": info["native_threads"],
        "isa": info["isa"],
        "torch": torch.__version__,
        "triton": info["triton_version"],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@dataclass
class Row:
    """One benchmark row: a workload, our time, and each baseline's time from the same run."""

    name: str
    ours: Timing
    baselines: dict[str, Timing | None] = field(default_factory=dict)
    floor: Timing | None = None
    #: the stream probe on our own tensors (:func:`stream_probe_on`), where measured
    floor_same_tensors: Timing | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def speedup(self, baseline: str) -> float | None:
        """baseline time / our time (>1 means we are faster)."""
        t = self.baselines.get(baseline)
        return None if t is None else t.median / self.ours.median

    def roofline(self) -> float | None:
        """The stream floor as a fraction of our time (1.0 means at the floor)."""
        return self._fraction(self.floor)

    def roofline_same_tensors(self) -> float | None:
        """The stream floor on our own tensors as a fraction of our time."""
        return self._fraction(self.floor_same_tensors)

    def _fraction(self, floor: Timing | None) -> float | None:
        return None if floor is None else floor.median / self.ours.median

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ours": asdict(self.ours),
            "baselines": {k: asdict(v) if v else None for k, v in self.baselines.items()},
            "floor": asdict(self.floor) if self.floor else None,
            "speedup": {k: self.speedup(k) for k in self.baselines},
            "roofline_fraction": self.roofline(),
            "floor_same_tensors": (asdict(self.floor_same_tensors)
                                   if self.floor_same_tensors else None),
            "roofline_fraction_same_tensors": self.roofline_same_tensors(),
            "notes": self.notes,
        }


def format_table(rows: list[Row], baselines: list[str]) -> str:
    """A plain-text table: our median (spread), each baseline's median and our speedup over it,
    and the percentage of the stream roofline (fresh arrays; and on our own tensors when any
    row measured it)."""
    same = any(r.floor_same_tensors is not None for r in rows)
    head = (["workload", "fastmeta"] + [f"{b} (x)" for b in baselines] + ["% floor"]
            + (["% floor (same tensors)"] if same else []))
    lines = [head]
    for r in rows:
        cells = [r.name, f"{r.ours.median * 1e3:.4f} ms ±{r.ours.spread * 50:.0f}%"]
        for b in baselines:
            t = r.baselines.get(b)
            cells.append("-" if t is None else f"{t.median * 1e3:.4f} ({r.speedup(b):.2f}x)")
        fractions = [r.roofline()] + ([r.roofline_same_tensors()] if same else [])
        cells += ["-" if frac is None else f"{100 * frac:.0f}%" for frac in fractions]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for k, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: str, benchmark: str, rows: list[Row], extra: dict | None = None) -> None:
    payload = {"benchmark": benchmark, "machine": machine_info(),
               "rows": [r.to_json() for r in rows]}
    if extra:
        payload.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
