"""The benchmark harness's round-robin timing (fastmeta/bench/harness.py): how it calls the
sides, not how fast they are (tests never assert a timing)."""

from __future__ import annotations

from fastmeta.bench import harness


def test_round_robin_times_every_side_once_per_cycle_starting_one_later_each_cycle():
    calls: list[str] = []
    names = ("ours", "torch", "floor")
    fns = {name: (lambda name=name: calls.append(name)) for name in names}
    timings = harness.time_round_robin(fns, min_run_time=0.0)
    assert set(timings) == set(fns)
    cycles = timings["ours"].blocks
    assert cycles >= harness.ROUND_ROBIN_MIN_CYCLES
    for timing in timings.values():
        assert timing.blocks == cycles
        assert 0 < timing.p20 <= timing.median <= timing.p80
    timed = calls[(harness.WARMUP_CALLS + 1) * len(fns):]  # after warm-up and calibration
    # Each block is one run of consecutive calls of one side.
    runs = [timed[0]]
    for name in timed[1:]:
        if name != runs[-1]:
            runs.append(name)
    # Adjacent blocks of the same side (end of one cycle, start of the next) merge into one run,
    # so rebuild the block order from the rotation the harness promises and compare.
    expected = [names[(c + i) % 3] for c in range(cycles) for i in range(3)]
    merged = [expected[0]]
    for name in expected[1:]:
        if name != merged[-1]:
            merged.append(name)
    assert runs == merged
    # Every side follows every other side in some cycle.
    followers = {(expected[j - 1], expected[j]) for j in range(1, len(expected))}
    assert {(a, b) for a in names for b in names if a != b} <= followers
