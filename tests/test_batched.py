"""fastmeta.batched: one forward for T tasks with per-task parameters, against T separate
``functional_call`` s, in the forward and to second order; and which models qualify."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.batched import BatchedModule, unsupported
from fastmeta.flat import FlatLayout
from fastmeta.inner_loop import resolve_strategy, task_losses
from fastmeta.meta import MLP, Conv4
from tests.tolerances import assert_close

TASKS = 3


def _eval_bn_net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net.eval()


MODELS = {
    "mlp": (lambda: MLP(), (4, 1)),
    "mlp-tanh-layernorm-nobias": (
        lambda: nn.Sequential(nn.Linear(3, 5, bias=False), nn.LayerNorm(5), nn.Tanh(),
                              nn.Linear(5, 2)), (6, 3)),
    "conv4-batchnorm": (lambda: Conv4(1, 4, filters=4, image_size=8), (5, 1, 8, 8)),
    "conv-strided-eval-batchnorm": (_eval_bn_net, (4, 1, 6, 6)),
    "conv-layernorms": (
        lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm([2, 4, 4]), nn.LayerNorm(4),
                              nn.Flatten(), nn.LayerNorm(32), nn.Linear(32, 2)), (4, 1, 6, 6)),
    "conv-stride2-nobias": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, bias=False), nn.AvgPool2d(1),
                              nn.Flatten(), nn.Linear(3 * 3 * 3, 1)), (2, 2, 7, 7)),
}


def _setup(name: str):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    net = make().double()
    layout = FlatLayout.of(net)
    theta = layout.flatten(net)
    params = (theta.expand(TASKS, -1) + 0.1 * torch.randn(TASKS, layout.numel,
                                                          dtype=torch.float64))
    x = torch.randn(TASKS, *shape, dtype=torch.float64)
    return net, layout, params.requires_grad_(), x


@pytest.mark.parametrize("name", list(MODELS))
def test_matches_one_functional_call_per_task_to_second_order(name):
    net, layout, params, x = _setup(name)
    assert unsupported(net) == []
    out = BatchedModule(net, layout)(params, x)
    ref = torch.stack([layout.call_unchecked(net, params[t], (x[t],)) for t in range(TASKS)])
    assert_close(out, ref)
    # First and second derivatives: the inner gradient, then a function of it (as in MAML).
    g_out, = torch.autograd.grad(out.square().sum(), params, create_graph=True)
    g_ref, = torch.autograd.grad(ref.square().sum(), params, create_graph=True)
    assert_close(g_out, g_ref)
    h_out, = torch.autograd.grad(g_out.square().sum(), params)
    h_ref, = torch.autograd.grad(g_ref.square().sum(), params)
    torch.testing.assert_close(h_out, h_ref, rtol=1e-9, atol=1e-9 * float(h_ref.abs().max()))


def test_tasks_do_not_see_each_other():
    """Batch statistics are per task: changing task 1's examples leaves task 0's output."""
    net, layout, params, x = _setup("conv4-batchnorm")
    run = BatchedModule(net, layout)
    before = run(params, x)[0]
    x2 = x.clone()
    x2[1] = 10 * torch.randn_like(x2[1])
    assert_close(run(params, x2)[0], before)


def test_the_modules_forward_is_restored_even_after_an_error():
    net, layout, params, x = _setup("mlp")
    run = BatchedModule(net, layout)
    with pytest.raises(RuntimeError):
        run(params, torch.randn(TASKS, 4, 7, dtype=torch.float64))  # wrong feature size
    assert all("forward" not in vars(m) for m in net.modules())
    assert_close(net(x[0]), layout.call_unchecked(net, layout.flatten(net), (x[0],)))


class _MixesExamples(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h - h.mean(0)  # the mean over the batch would mix tasks once they are stacked


@pytest.mark.parametrize("net,match", [
    (nn.Sequential(nn.Conv1d(1, 1, 1)), "0: a Conv1d"),
    (nn.Sequential(nn.Conv2d(2, 2, 1, groups=2)), "Conv2d with groups"),
    (nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2)), "1: a GroupNorm"),
    (nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)),
     "1: a BatchNorm1d"),
    (_MixesExamples(), "_MixesExamples container"),
    (nn.Sequential(nn.Linear(2, 2), nn.BatchNorm2d(2)), "updates running statistics"),
])
def test_unsupported_models_are_named_and_refused(net, match):
    assert any(match in p for p in unsupported(net))
    with pytest.raises(ValueError, match=match):
        BatchedModule(net)
    with pytest.raises(ValueError, match="strategy='batched' cannot run this model"):
        resolve_strategy("batched", net)
    assert resolve_strategy("auto", net, create_graph=False) in ("vmap", "loop")


def test_auto_prefers_batched_and_follows_train_eval_changes():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm2d(2))
    assert resolve_strategy("auto", net) == "loop"  # training BN with running stats mutates
    net.eval()
    assert resolve_strategy("auto", net) == "batched"
    net.train()
    assert resolve_strategy("auto", net) == "loop"
    assert resolve_strategy("auto", MLP()) == "batched"


@pytest.mark.parametrize("loss_fn,targets", [
    (F.mse_loss, lambda: torch.randn(TASKS, 4, 2, dtype=torch.float64)),
    (F.cross_entropy, lambda: torch.randint(0, 2, (TASKS, 4))),
    (lambda out, y: F.l1_loss(out, y) * 2, lambda: torch.randn(TASKS, 4, 2, dtype=torch.float64)),
], ids=["mse", "cross_entropy", "other"])
def test_task_losses_equal_one_call_per_task(loss_fn, targets):
    outputs = torch.randn(TASKS, 4, 2, dtype=torch.float64)
    y = targets()
    expected = torch.stack([loss_fn(outputs[t], y[t]) for t in range(TASKS)])
    assert_close(task_losses(loss_fn, outputs, y), expected)


class _ScaledLinear(nn.Linear):
    def __init__(self, *args):
        super().__init__(*args)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return super().forward(x) * self.scale


class _CenteringSequential(nn.Sequential):
    def forward(self, x):
        y = super().forward(x)
        return y - y.mean(0)


@pytest.mark.parametrize("net,match", [
    (nn.Sequential(_ScaledLinear(2, 2)), "_ScaledLinear"),
    (_CenteringSequential(nn.Linear(2, 2)), "_CenteringSequential container"),
    (nn.Sequential(nn.Linear(2, 2), nn.Flatten(start_dim=0)), "Flatten over the batch"),
], ids=["linear-subclass", "sequential-subclass", "flatten-batch"])
def test_subclasses_and_batch_mixing_layers_are_refused(net, match):
    """A subclass may add a forward or parameters that the batched form would drop."""
    assert any(match in p for p in unsupported(net))


def test_the_runner_cache_keeps_no_model_alive_and_follows_replaced_layers():
    import gc
    import weakref

    from fastmeta.inner_loop import batched_runner

    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    layout = FlatLayout.of(net)
    params = layout.flatten(net).expand(TASKS, -1).clone()
    x = torch.randn(TASKS, 4, 2, dtype=torch.float64)
    batched_runner(net, layout)(params, x)
    net[2] = nn.Linear(3, 1).double()  # same shapes: the layout still fits
    out = batched_runner(net, layout)(params, x)
    ref = torch.stack([layout.call_unchecked(net, params[t], (x[t],)) for t in range(TASKS)])
    assert_close(out, ref)
    alive = weakref.ref(net)
    del net, out, ref
    gc.collect()
    assert alive() is None


def test_a_forward_already_set_on_an_instance_is_put_back():
    net, layout, params, x = _setup("mlp")
    first = net.layers[0]
    own = first.forward  # a bound method stored on the instance, as hook libraries do
    first.forward = own
    BatchedModule(net, layout)(params, x)
    assert first.__dict__["forward"] is own


def test_cross_entropy_with_ignored_targets_equals_one_call_per_task():
    outputs = torch.randn(TASKS, 4, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (TASKS, 4))
    y[0, 1] = -100
    expected = torch.stack([F.cross_entropy(outputs[t], y[t]) for t in range(TASKS)])
    assert_close(task_losses(F.cross_entropy, outputs, y), expected)
