"""pytest-benchmark entries for the fused LSTM rule (the workloads of ``bench_lstm``).

Run with ``python -m pytest benchmarks --benchmark-only``; each group holds the fused rule and its
``nn.LSTMCell`` reference on the same workload.
"""

from __future__ import annotations

import pytest

from benchmarks.bench_lstm import step_workload, unroll_workload

# Smaller than bench_lstm's 2^20 coordinates: pytest-benchmark repeats each call many times.
STEP_COORDINATES = 1 << 16


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_lstm_rule_step(benchmark, implementation):
    """One no-grad step of the learned rule on 64K coordinates."""
    fn = step_workload(STEP_COORDINATES)[implementation]
    benchmark.group = "LSTM rule step, 64K coordinates"
    benchmark(fn)


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_lstm_rule_unroll(benchmark, implementation):
    """A 20-step unroll on 128 ten-dimensional quadratics, plus its meta-gradient."""
    fn = unroll_workload()[implementation]
    benchmark.group = "LSTM rule unroll 20 x 128 quadratics + backward"
    benchmark(fn)
