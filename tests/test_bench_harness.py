"""The benchmark harness (fastmeta/bench/harness.py): how the round-robin timing calls the sides,
and what the stream probes read and write, not how fast anything is (tests never assert a
timing)."""

from __future__ import annotations

import pytest
import torch

import fastmeta.optim as fo
from fastmeta import backends
from fastmeta.bench import harness
from fastmeta.bench.optimizers import STREAMS, make_params, own_streams


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


def test_round_robin_runs_at_least_min_cycles():
    fns = {"a": lambda: None, "b": lambda: None}
    timings = harness.time_round_robin(fns, min_run_time=0.0, min_cycles=25)
    assert [t.blocks for t in timings.values()] == [25, 25]
    with pytest.raises(ValueError, match="min_cycles must be an int >= 1"):
        harness.time_round_robin(fns, min_run_time=0.0, min_cycles=0)


def _needs_native():
    if backends.native() is None:
        pytest.skip("the native extension is not built")


def test_stream_probe_on_given_tensor_lists_reads_every_stream_and_writes_the_first():
    _needs_native()
    sizes = [5, 17, 40_000]  # a list of uneven tensors, one longer than a chunk
    streams = [[torch.rand(n) for n in sizes] for _ in range(3)]
    before = [[t.clone() for t in s] for s in streams]
    probe = harness.stream_probe_on(lambda: streams, writes=2)
    probe()
    for t in range(len(sizes)):
        total = sum(before[s][t] for s in range(3)) / 5  # the probe scales by 1/(reads+writes)
        torch.testing.assert_close(streams[0][t], total)
        torch.testing.assert_close(streams[1][t], total + 1)
        torch.testing.assert_close(streams[2][t], before[2][t])  # read only


def test_stream_probe_makes_one_fresh_array_per_size_in_every_stream():
    _needs_native()
    sizes = [5, 0, 40_000]
    probe = harness.stream_probe(sizes, 4, 3)
    arrays = probe.arrays
    assert [[t.numel() for t in stream] for stream in arrays] == [[5, 40_000]] * 4
    before = [[t.clone() for t in stream] for stream in arrays]
    probe()
    for t in range(2):
        total = sum(before[s][t] for s in range(4)) / 7
        torch.testing.assert_close(arrays[2][t], total + 2)  # the third stream is written
        torch.testing.assert_close(arrays[3][t], before[3][t])  # the fourth only read
    assert [t.numel() for t in harness.stream_probe(12, 1, 1).arrays[0]] == [12]
    assert harness.stream_probe([0, 0], 3, 2) is None
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        harness.stream_probe([4, -1], 3, 2)


def test_stream_probe_on_refuses_streams_that_do_not_match():
    _needs_native()
    probe = harness.stream_probe_on(lambda: [[torch.rand(4)], [torch.rand(5)]], writes=1)
    with pytest.raises(ValueError, match="tensor 0 of stream 1"):
        probe()


def test_own_streams_lists_params_state_and_grads_as_the_step_moves_them():
    for name, cls, config in (("SGD", fo.SGD, {"lr": 0.1, "momentum": 0.9}),
                              ("Adam", fo.Adam, {"lr": 0.1})):
        params = make_params([(3, 2), (4,)])
        opt = cls(params, **config)
        opt.step()
        reads, writes = STREAMS[name]
        streams = own_streams(opt, reads, writes)
        assert len(streams) == reads
        assert streams[0] == params and streams[-1] == [p.grad for p in params]
        assert all(s[i].shape == p.shape for s in streams for i, p in enumerate(params))
        with pytest.raises(ValueError, match="reads"):
            own_streams(opt, reads + 1, writes)
