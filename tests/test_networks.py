"""The MAML paper's networks: shapes, no mutated buffers, and torch.func.functional_call."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from fastmeta.flat import buffer_mutating_modules
from fastmeta.meta.networks import MLP, Conv4


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
