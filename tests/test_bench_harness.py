"""The benchmark harness's round-robin timing (fastmeta/bench/harness.py): how it calls the
sides, not how fast they are (tests never assert a timing)."""

from __future__ import annotations

from fastmeta.bench import harness


def test_round_robin_alternates_blocks_of_every_side_and_reports_each():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("ours", "torch", "floor")}
    timings = harness.time_round_robin(fns, min_run_time=0.0)
    assert set(timings) == set(fns)
    for timing in timings.values():
        assert timing.blocks >= harness.ROUND_ROBIN_MIN_CYCLES
        assert 0 < timing.p20 <= timing.median <= timing.p80
    timed = calls[(harness.WARMUP_CALLS + 1) * len(fns):]  # after warm-up and calibration
    # Blocks come in the order of fns, cycle after cycle: each side's block is one run of
    # consecutive calls, and the sides take turns.
    runs = [timed[0]]
    for name in timed[1:]:
        if name != runs[-1]:
            runs.append(name)
    assert runs == ["ours", "torch", "floor"] * (len(runs) // 3)
    assert len(runs) // 3 == timings["ours"].blocks
