"""The meta-learning benchmark's baselines compute the same meta-gradient as fastmeta, so the
benchmark times the same work on every side (fastmeta/bench/maml.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmeta.bench import maml as bench
from fastmeta.meta import MAML, MLP
from fastmeta.tasks import SinusoidTasks


class _Capture:
    """Stands in for the outer optimizer: keeps the meta-gradient instead of stepping."""

    def __init__(self, params):
        self.params = list(params)
        self.grads: list[torch.Tensor] = []

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]


def _fastmeta_meta_gradient(episode, steps):
    torch.manual_seed(0)
    maml = MAML(MLP(), loss_fn=F.mse_loss, inner_lr=bench.INNER_LR, inner_steps=steps)
    maml(episode).loss.backward()
    return [p.grad for p in maml.parameters()]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("baseline", ["torch.func vmap", "batched eager", "eager loop"])
def test_maml_baselines_compute_fastmetas_meta_gradient(baseline, steps):
    episode = SinusoidTasks(seed=0).sample(5, shots=10)
    expected = _fastmeta_meta_gradient(episode, steps)
    maker = {"torch.func vmap": bench._vmap_step, "batched eager": bench._batched_eager_step,
             "eager loop": bench._eager_step}[baseline]
    torch.manual_seed(0)
    model = MLP()
    capture = _Capture(model.parameters())
    maker(model, F.mse_loss, steps, capture)(episode)
    assert len(capture.grads) == len(expected)
    for got, want in zip(capture.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_batched_eager_baseline_refuses_what_it_does_not_write():
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with pytest.raises(ValueError, match="Linear/ReLU MLPs"):
        bench._batched_eager_step(model, F.mse_loss, 1, _Capture(model.parameters()))
    with pytest.raises(ValueError, match="F.mse_loss"):
        bench._batched_eager_step(MLP(), F.l1_loss, 1, _Capture(MLP().parameters()))


@pytest.mark.parametrize("baseline", ["torch.func vmap", "batched eager"])
def test_cavia_baselines_compute_fastmetas_meta_gradient(baseline):
    episode = SinusoidTasks(seed=0).sample(5, shots=10)
    grads = {}
    for name in ("fastmeta", baseline):
        maker = {"fastmeta": bench._cavia_fastmeta_step, "torch.func vmap": bench._cavia_vmap_step,
                 "batched eager": bench._cavia_batched_eager_step}[name]
        torch.manual_seed(0)
        model = MLP(in_features=1 + bench.CAVIA_CONTEXT)
        maker(model, episode, 1)()
        grads[name] = [p.grad for p in model.parameters()]
    for got, want in zip(grads[baseline], grads["fastmeta"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_plain_maml_sinusoid_script_runs_and_reports(tmp_path):
    """benchmarks/maml_sinusoid_plain.py (the README's plain torch.func comparison) end to end,
    a few iterations: every setting reported, each set's mean and the pool consistent."""
    import json
    import subprocess
    import sys

    out = tmp_path / "plain.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.maml_sinusoid_plain", "--iterations",
                          "3", "--tasks", "20", "--draws", "2", "--json", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert [(r["shots"], r["steps"]) for r in data["results"]] == [(5, 1), (10, 1), (5, 10),
                                                                   (10, 10)]
    for r in data["results"]:
        assert len(r["draw_means"]) == 2 and r["diverged"] == 0
        assert r["mean"] == pytest.approx(sum(r["draw_means"]) / 2, rel=1e-9)
        assert r["draw_means"][0] != r["draw_means"][1]
        assert f"{r['mean']:.4f}" in res.stdout
