"""SGD-HD and Adam-HD (Baydin et al. 2018) against a plain PyTorch implementation of the
paper's update rules, for every implementation, and the torch.optim contract."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fastmeta.optim as fo
from fastmeta.backends import Impl
from fastmeta.ops.hypergrad import adam_hd_step_, sgd_hd_step_
from tests.conftest import ALL_IMPLS
from tests.tolerances import assert_close

STEPS = 100


# ---- The paper's rules, written plainly (the oracle) -------------------------------------------


class PlainSGDHD:
    """Baydin et al. 2018, Algorithm 1 (SGD-HD) and, with momentum, SGDN-HD (Algorithm 2) and
    the heavy-ball variant, on a list of tensors; torch's momentum buffer conventions."""

    def __init__(self, params, lr, beta, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.params, self.lr, self.beta = params, lr, beta
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.prev_update = [torch.zeros_like(p) for p in params]  # u_{t-1}, lr-free
        self.buffers = None

    @torch.no_grad()
    def step(self):
        grads = [p.grad + self.weight_decay * p for p in self.params]
        # h_t = ∇f(θ_{t−1}) · ∂θ_{t−1}/∂α = −g_t · u_{t−1};  α_t = α_{t−1} − β h_t
        h = -sum(float((g * u).sum()) for g, u in zip(grads, self.prev_update))
        self.lr = self.lr - self.beta * h
        if self.momentum:
            if self.buffers is None:
                self.buffers = [g.clone() for g in grads]
            else:
                self.buffers = [self.momentum * b + g for b, g in zip(self.buffers, grads)]
            updates = ([g + self.momentum * b for g, b in zip(grads, self.buffers)]
                       if self.nesterov else [b.clone() for b in self.buffers])
        else:
            updates = grads
        for p, u in zip(self.params, updates):
            p -= self.lr * u
        self.prev_update = updates
        return h


class PlainAdamHD:
    """Baydin et al. 2018, Algorithm 4 (Adam-HD), with torch's ε placement."""

    def __init__(self, params, lr, beta, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.beta = params, lr, beta
        self.b1, self.b2 = betas
        self.eps = eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.prev_update = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        grads = [p.grad for p in self.params]
        h = -sum(float((g * u).sum()) for g, u in zip(grads, self.prev_update))
        self.lr = self.lr - self.beta * h
        updates = []
        for i, (p, g) in enumerate(zip(self.params, grads)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            m_hat = self.m[i] / (1 - self.b1 ** self.t)
            v_hat = self.v[i] / (1 - self.b2 ** self.t)
            u = m_hat / (v_hat.sqrt() + self.eps)
            p -= self.lr * u
            updates.append(u)
        self.prev_update = updates
        return h


# ---- A real problem: logistic regression and a small MLP on fixed random data ----------------


def _problem(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)  # the same numbers in every dtype
    x = torch.randn(96, 12, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 4, (96,), generator=gen)
    shapes = [(16, 12), (16,), (4, 16), (4,)]
    params = [(0.3 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype)
              .requires_grad_() for s in shapes]

    def loss_of(ps):
        return F.cross_entropy(F.linear(torch.tanh(F.linear(x, ps[0], ps[1])), ps[2], ps[3]), y)

    return params, loss_of


def _train(opt_step, params, loss_of, steps=STEPS):
    losses = []
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = loss_of(params)
        loss.backward()
        losses.append(float(loss.detach()))
        opt_step()
    return losses


SGD_CONFIGS = [
    {"lr": 0.05, "hypergrad_lr": 0.01},
    {"lr": 0.05, "hypergrad_lr": 0.01, "weight_decay": 0.01},
    {"lr": 0.02, "hypergrad_lr": 0.005, "momentum": 0.9},
    {"lr": 0.02, "hypergrad_lr": 0.005, "momentum": 0.9, "nesterov": True},
]


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: "-".join(c)[:40])
def test_sgd_hd_matches_the_papers_rule_step_by_step(impl, config):
    ours_params, loss_of = _problem(torch.float64)
    plain_params = [p.detach().clone().requires_grad_() for p in ours_params]
    ours = fo.SGDHD(ours_params, impl=impl, **config)
    plain = PlainSGDHD(plain_params, config["lr"], config["hypergrad_lr"],
                       momentum=config.get("momentum", 0.0),
                       nesterov=config.get("nesterov", False),
                       weight_decay=config.get("weight_decay", 0.0))
    for step in range(STEPS):
        for params in (ours_params, plain_params):
            for p in params:
                p.grad = None
            loss_of(params).backward()
        ours.step()
        h = plain.step()
        lr = ours.param_groups[0]["lr"]
        assert math.isclose(lr, plain.lr, rel_tol=1e-6), (step, lr, plain.lr)
        assert math.isclose(ours.param_groups[0]["hypergradient"], h, rel_tol=1e-6,
                            abs_tol=1e-12), step
        for p, q in zip(ours_params, plain_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-12)
    assert plain.lr != config["lr"]  # the lr did move


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_adam_hd_matches_the_papers_rule_step_by_step(impl):
    ours_params, loss_of = _problem(torch.float64)
    plain_params = [p.detach().clone().requires_grad_() for p in ours_params]
    ours = fo.AdamHD(ours_params, lr=1e-2, hypergrad_lr=1e-5, impl=impl)
    plain = PlainAdamHD(plain_params, 1e-2, 1e-5)
    for step in range(STEPS):
        for params in (ours_params, plain_params):
            for p in params:
                p.grad = None
            loss_of(params).backward()
        ours.step()
        h = plain.step()
        assert math.isclose(ours.param_groups[0]["lr"], plain.lr, rel_tol=1e-6), step
        assert math.isclose(ours.param_groups[0]["hypergradient"], h, rel_tol=1e-6,
                            abs_tol=1e-12), step
        for p, q in zip(ours_params, plain_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-12)
    assert plain.lr != 1e-2


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_float32_training_follows_the_float64_rule(impl):
    """fp32 params: the kernels' float64 dot product keeps the learned lr on the fp64 path."""
    params64, loss64 = _problem(torch.float64)
    params32, loss32 = _problem(torch.float32)
    runs = []
    for params, loss_of in ((params64, loss64), (params32, loss32)):
        opt = fo.SGDHD(params, lr=0.05, hypergrad_lr=0.01, impl=impl)
        _train(opt.step, params, loss_of, steps=30)
        runs.append(opt.param_groups[0]["lr"])
    assert math.isclose(runs[0], runs[1], rel_tol=1e-4)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_ops_return_the_hypergradient_and_the_new_lr(impl):
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(40, generator=gen), torch.randn(3, 5, generator=gen)]
    grads = [torch.randn_like(p) for p in params]
    directions = [torch.randn_like(p) for p in params]
    expected_dot = sum(float((g.double() * u.double()).sum()) for g, u in zip(grads, directions))
    h, new_lr = sgd_hd_step_([p.clone() for p in params], grads, None,
                             [u.clone() for u in directions], lr=0.1, hypergrad_lr=0.5,
                             impl=impl)
    assert math.isclose(h, -expected_dot, rel_tol=1e-9)
    assert math.isclose(new_lr, 0.1 + 0.5 * expected_dot, rel_tol=1e-9)
    steps = [torch.zeros(()) for _ in params]
    h, new_lr = adam_hd_step_(
        [p.clone() for p in params], grads, [torch.zeros_like(p) for p in params],
        [torch.zeros_like(p) for p in params], [u.clone() for u in directions], steps,
        lr=0.1, hypergrad_lr=0.5, impl=impl)
    assert math.isclose(h, -expected_dot, rel_tol=1e-9)
    assert all(float(s) == 1.0 for s in steps)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_params_that_start_late_take_torchs_first_momentum_step(impl):
    """A param whose grad first appears at step 3 starts its buffer at b = d (torch's rule),
    in the same fused call as the others, also with dampening."""
    torch.manual_seed(0)
    a, b = torch.randn(5, requires_grad=True), torch.randn(4, requires_grad=True)
    a2, b2 = (t.detach().clone().requires_grad_() for t in (a, b))
    ours = fo.SGDHD([a, b], lr=0.1, hypergrad_lr=0.0, momentum=0.9, dampening=0.3, impl=impl)
    theirs = torch.optim.SGD([a2, b2], lr=0.1, momentum=0.9, dampening=0.3)
    for step in range(6):
        ga, gb = torch.randn(5), torch.randn(4)
        a.grad, a2.grad = ga.clone(), ga.clone()
        b.grad, b2.grad = (gb.clone(), gb.clone()) if step >= 3 else (None, None)
        ours.step()
        theirs.step()
        assert_close(a.detach(), a2.detach())
        assert_close(b.detach(), b2.detach())


def test_state_dict_round_trip_continues_identically():
    params, loss_of = _problem(torch.float64)
    opt = fo.AdamHD(params, lr=1e-2, hypergrad_lr=1e-5)
    _train(opt.step, params, loss_of, steps=10)
    saved_params = [p.detach().clone().requires_grad_() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    _train(opt.step, params, loss_of, steps=10)
    restored = fo.AdamHD(saved_params, lr=1.0, hypergrad_lr=1.0)
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["lr"] == saved["param_groups"][0]["lr"]
    _train(restored.step, saved_params, loss_of, steps=10)
    assert restored.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, q in zip(params, saved_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


def test_each_group_learns_its_own_lr_and_schedulers_compose():
    params, loss_of = _problem(torch.float64)
    opt = fo.SGDHD([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], lr=0.05,
                   hypergrad_lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    before = []
    for step in range(10):
        _train(opt.step, params, loss_of, steps=1)
        before.append([g["lr"] for g in opt.param_groups])
        scheduler.step()
        if step == 4:  # StepLR halved what hypergradient descent had learned
            assert [g["lr"] for g in opt.param_groups] == [lr / 2 for lr in before[-1]]
    first, second = opt.param_groups
    assert first["lr"] != second["lr"]
    assert first["hypergradient"] != second["hypergradient"]


def test_tensor_lr_is_updated_in_place():
    params, loss_of = _problem(torch.float64)
    lr = torch.tensor(0.05)
    opt = fo.SGDHD(params, lr=lr, hypergrad_lr=0.01)
    _train(opt.step, params, loss_of, steps=3)
    assert opt.param_groups[0]["lr"] is lr
    assert float(lr) != 0.05


@pytest.mark.parametrize("cls", [fo.SGDHD, fo.AdamHD])
@pytest.mark.parametrize("bad,match", [
    ({"lr": -0.1}, "Invalid learning rate"),
    ({"hypergrad_lr": -1e-3}, "Invalid hypergrad_lr"),
    ({"weight_decay": -0.1}, "Invalid weight_decay"),
])
def test_invalid_hyperparameters_raise(cls, bad, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.zeros(2, requires_grad=True)], **bad)


def test_a_diverged_lr_is_reported_not_used():
    p = torch.zeros(3, requires_grad=True)
    opt = fo.SGDHD([p], lr=0.1, hypergrad_lr=0.1)
    opt.param_groups[0]["lr"] = float("inf")
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="not finite.*diverged"):
        opt.step()


def test_sparse_gradients_are_refused():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        fo.AdamHD([p]).step()


@pytest.mark.native
def test_one_native_call_per_group_per_step():
    from fastmeta import backends

    params, loss_of = _problem(torch.float32)
    opt = fo.SGDHD([{"params": params[:2]}, {"params": params[2:]}], lr=0.05)
    with backends.trace() as calls:
        _train(opt.step, params, loss_of, steps=3)
    assert calls == [("sgd_hd_step_", Impl.NATIVE)] * 6
