"""The MAML and CAVIA papers' networks: shapes, no mutated buffers, torch.func.functional_call,
and FiLMConv4's per-task normalisation and FiLM."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from fastmeta import backends
from fastmeta.backends import Impl
from fastmeta.flat import buffer_mutating_modules
from fastmeta.meta.networks import MLP, Conv4, FiLMConv4


def test_mlp_is_finn_sinusoid_network():
    net = MLP()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1, 40), (40, 40), (40, 1)]
    assert sum(p.numel() for p in net.parameters()) == 1761
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 2
    assert net(torch.zeros(25, 10, 1)).shape == (25, 10, 1)


def test_mlp_functional_call_and_vmap():
    net = MLP()
    x = torch.randn(3, 10, 1)
    params = dict(net.named_parameters())
    torch.testing.assert_close(functional_call(net, params, (x,)), net(x))
    batched = {k: torch.stack([v, 2 * v, -v]) for k, v in params.items()}
    out = vmap(lambda p, xt: functional_call(net, p, (xt,)))(batched, x)
    for t, scale in enumerate((1, 2, -1)):
        scaled = {k: scale * v for k, v in params.items()}
        torch.testing.assert_close(out[t], functional_call(net, scaled, (x[t],)))


@pytest.mark.parametrize(("image_size", "features"), [(28, 64), (8, 64), (84, 64 * 25)])
def test_conv4_shapes(image_size, features):
    net = Conv4(in_channels=1, ways=5, image_size=image_size)
    assert net.head.in_features == features
    assert net(torch.randn(7, 1, image_size, image_size)).shape == (7, 5)


def test_conv4_is_the_paper_architecture():
    net = Conv4(in_channels=3, ways=20, filters=32, image_size=84)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 32, (3, 3))] + [(32, 32, (3, 3))] * 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 4
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 4
    assert net.head.out_features == 20


def test_conv4_pooling_before_relu_is_the_papers_block():
    # Conv4 pools before its ReLU; the paper's order (ReLU, then pool) gives equal outputs and
    # equal first and second derivatives, ties and non-positive windows included (torch.equal:
    # a -0.0 where the paper's order gives +0.0, see _conv_block, would compare equal).
    torch.manual_seed(0)
    net = Conv4(in_channels=1, ways=3, filters=4, image_size=8).double()
    paper = copy.deepcopy(net)
    for block in paper.features:
        assert isinstance(block[2], (nn.MaxPool2d, nn.Identity)) and isinstance(block[3], nn.ReLU)
        block[2], block[3] = block[3], block[2]
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    x[0] = -1.0  # a constant image: equal values in most windows, non-positive planes
    x[1, :, ::2] = x[1, :, 1::2]  # each even row equal to the next: ties within every window

    def first_and_second(model):
        params = list(model.parameters())
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), params, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), params)
        return out, grads, second

    for ours, theirs in zip(first_and_second(net), first_and_second(paper)):
        if isinstance(ours, torch.Tensor):
            assert torch.equal(ours, theirs)
        else:
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_conv4_skips_pooling_past_1x1():
    net = Conv4(image_size=8)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3


def test_conv4_batchnorm_has_no_running_stats():
    net = Conv4(filters=8)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 4
    assert all(not m.track_running_stats and m.running_mean is None for m in norms)
    assert list(net.buffers()) == []
    assert buffer_mutating_modules(net) == []
    # transductive: eval mode normalises with the batch's statistics too
    x = torch.randn(6, 1, 28, 28)
    train_out = net.train()(x)
    torch.testing.assert_close(net.eval()(x), train_out)
    # ... so an example's output depends on the batch it is in
    assert not torch.allclose(net(x[:3])[0], train_out[0])


def test_conv4_functional_call_and_vmap():
    net = Conv4(filters=8, ways=3)
    x = torch.randn(2, 4, 1, 28, 28)
    params = dict(net.named_parameters())
    torch.testing.assert_close(functional_call(net, params, (x[0],)), net(x[0]))
    other = {k: v + 0.1 for k, v in params.items()}
    assert not torch.allclose(functional_call(net, other, (x[0],)), net(x[0]))
    batched = {k: torch.stack([v, other[k]]) for k, v in params.items()}
    out = vmap(lambda p, xt: functional_call(net, p, (xt,)))(batched, x)
    torch.testing.assert_close(out[0], net(x[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], functional_call(net, other, (x[1],)), rtol=1e-5, atol=1e-5)


def test_conv4_second_order_gradient_through_functional_call():
    net = Conv4(filters=4, ways=2, image_size=8).double()
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    params = dict(net.named_parameters())
    loss = nn.functional.cross_entropy(functional_call(net, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    fast = {k: v - 0.1 * g for (k, v), g in zip(params.items(), grads)}
    meta = nn.functional.cross_entropy(functional_call(net, fast, (x,)), y)
    meta_grads = torch.autograd.grad(meta, list(params.values()))
    assert all(torch.isfinite(g).all() for g in meta_grads)


@pytest.mark.parametrize("kwargs", [{"ways": 0}, {"in_channels": 0}, {"filters": 0},
                                    {"image_size": 0}])
def test_conv4_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        Conv4(**kwargs)


def test_conv4_rejects_wrong_image_size():
    with pytest.raises(ValueError, match="expects"):
        Conv4(image_size=28)(torch.zeros(2, 1, 8, 8))


# ---- FiLMConv4 (CAVIA) -----------------------------------------------------------------------


def _film_net(**kwargs):
    kwargs = {"in_channels": 1, "ways": 3, "num_context_params": 4, "filters": 4,
              "image_size": 8, **kwargs}
    return FiLMConv4(**kwargs).double()


def _film_reference(net, x, context):
    """FiLMConv4 written out per task: conv, nn.functional.batch_norm on that task's batch
    alone, then h·(1 + γ) + β, ReLU, max-pool; the head."""
    outputs = []
    for t in range(x.shape[0]):
        h = x[t]
        for block in net.blocks:
            h = nn.functional.conv2d(h, block.conv.weight, block.conv.bias, padding=1)
            h = nn.functional.batch_norm(h, None, None, block.norm_weight, block.norm_bias,
                                         training=True)
            if block.film is not None:
                gamma, beta = block.film(context[t]).chunk(2)
                h = h * (1 + gamma.view(-1, 1, 1)) + beta.view(-1, 1, 1)
            h = torch.relu(h)
            if block.pool:
                h = nn.functional.max_pool2d(h, 2)
        outputs.append(net.head(h.flatten(1)))
    return torch.stack(outputs)


def test_film_conv4_is_per_task_batchnorm_then_film():
    torch.manual_seed(0)
    net = _film_net()
    for block in net.blocks:  # make the norm's affine part and FiLM's bias non-trivial
        nn.init.normal_(block.norm_weight, 1.0, 0.3)
        nn.init.normal_(block.norm_bias, 0.0, 0.3)
        nn.init.normal_(block.film.bias, 0.0, 0.3)
    x = torch.randn(3, 5, 1, 8, 8, dtype=torch.float64) * 2 + 1
    context = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(net(x, context), _film_reference(net, x, context))


def test_film_conv4_at_zero_context_is_conv4_on_each_task():
    torch.manual_seed(0)
    film, conv4 = _film_net(), Conv4(in_channels=1, ways=3, filters=4, image_size=8).double()
    for block, (conv, norm, _, _) in zip(film.blocks, conv4.features):
        conv.load_state_dict(block.conv.state_dict())
        norm.weight.data.normal_(1.0, 0.3)
        norm.bias.data.normal_(0.0, 0.3)
        block.norm_weight.data.copy_(norm.weight)
        block.norm_bias.data.copy_(norm.bias)
    conv4.head.load_state_dict(film.head.state_dict())
    x = torch.randn(3, 5, 1, 8, 8, dtype=torch.float64)
    out = film(x, torch.zeros(3, 4, dtype=torch.float64))
    for t in range(3):
        torch.testing.assert_close(out[t], conv4(x[t]))
    assert not torch.allclose(film(x, torch.ones(3, 4, dtype=torch.float64)), out)


def test_film_conv4_second_derivatives():
    """gradgradcheck of the output w.r.t. the context and a conv weight: CAVIA's meta-gradient
    differentiates ∂L/∂φ with respect to θ."""
    torch.manual_seed(0)
    net = _film_net(filters=2, image_size=4, num_context_params=2)
    x = torch.randn(2, 3, 1, 4, 4, dtype=torch.float64)
    context = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    weight = net.blocks[1].conv.weight.detach().clone().requires_grad_()
    params = dict(net.named_parameters())

    def f(ctx, w):
        return functional_call(net, {**params, "blocks.1.conv.weight": w}, (x, ctx))

    assert torch.autograd.gradgradcheck(f, (context, weight))


@pytest.mark.native
def test_film_conv4_pools_large_inputs_on_the_kernel_bit_for_bit(monkeypatch):
    # Its pooling is routed_max_pool2d: the native kernel from MIN_NATIVE_ELEMENTS up (set to 0
    # here), torch's pool under FASTMETA_IMPL=reference; outputs and gradients are identical.
    monkeypatch.setattr("fastmeta.ops.max_pool.MIN_NATIVE_ELEMENTS", 0)
    torch.manual_seed(0)
    net = FiLMConv4(num_context_params=3, filters=4, image_size=8).double()
    x, context = torch.rand(2, 3, 1, 8, 8, dtype=torch.float64), torch.randn(2, 3).double()

    def output_and_grads():
        with backends.trace() as calls:
            out = net(x, context)
            grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
        return out, grads, calls

    out, grads, calls = output_and_grads()
    assert ("max_pool2d", Impl.NATIVE) in calls
    monkeypatch.setenv("FASTMETA_IMPL", "reference")
    ref, ref_grads, calls = output_and_grads()
    assert ("max_pool2d", Impl.NATIVE) not in calls
    assert torch.equal(out, ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_film_conv4_blocks_and_parameters():
    net = FiLMConv4(ways=5, num_context_params=100, filters=32, image_size=84,
                    film_blocks=(2,))
    assert [b.film is not None for b in net.blocks] == [False, False, True, False]
    assert net.blocks[2].film.in_features == 100 and net.blocks[2].film.out_features == 64
    assert net.head.in_features == 32 * 5 * 5
    assert list(net.buffers()) == [] and buffer_mutating_modules(net) == []
    assert net(torch.zeros(2, 3, 1, 84, 84), torch.zeros(2, 100)).shape == (2, 3, 5)
    assert "film_blocks=(2,)" in repr(net)


@pytest.mark.parametrize("kwargs", [{"num_context_params": 0}, {"film_blocks": ()},
                                    {"film_blocks": (4,)}, {"film_blocks": (1, 1)},
                                    {"filters": 0}])
def test_film_conv4_rejects_bad_config(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        FiLMConv4(**{"num_context_params": 2, **kwargs})


def test_film_conv4_rejects_bad_inputs():
    net = FiLMConv4(num_context_params=2, image_size=8, filters=4)
    with pytest.raises(ValueError, match=r"x \[T, S, 1, 8, 8\]"):
        net(torch.zeros(2, 1, 8, 8), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"context \[T, num_context_params\] = \[2, 2\]"):
        net(torch.zeros(2, 3, 1, 8, 8), torch.zeros(2, 3))
