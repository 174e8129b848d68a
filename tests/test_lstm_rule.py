"""The learned LSTM rule (Andrychowicz et al. 2016): preprocessing, the nn.LSTMCell reference,
the non-finite policy, rule files, and the ``Learned`` optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastmeta.meta import LSTMOptimizer, LSTMState
from fastmeta.ops.lstm_rule import lstm_rule_reference, preprocess_gradient
from fastmeta.optim import Learned
from tests.tolerances import assert_close

P = 10.0


def test_preprocessing_matches_the_paper():
    g = torch.tensor([2.0, -0.5, 1e-3, -1e-3, 1e-6, -1e-6, 0.0], dtype=torch.float64)
    x = preprocess_gradient(g, P)
    threshold = math.exp(-P)  # 4.5e-5
    for gi, (a, b) in zip(g.tolist(), x.tolist()):
        if abs(gi) >= threshold:
            assert a == pytest.approx(math.log(abs(gi)) / P)
            assert b == pytest.approx(math.copysign(1.0, gi))
        else:
            assert a == -1.0
            assert b == pytest.approx(math.exp(P) * gi)


def test_preprocessing_is_differentiable_everywhere_it_is_used():
    g = torch.tensor([3.0, -2e-3, 1e-7, 0.0], dtype=torch.float64, requires_grad=True)
    x = preprocess_gradient(g, P)
    (d,) = torch.autograd.grad(x.sum(), g)
    assert torch.isfinite(d).all()
    assert d[0] == pytest.approx(1 / (P * 3.0))  # d/dg log|g|/p; the sign's derivative is 0
    assert d[2] == pytest.approx(math.exp(P)) and d[3] == pytest.approx(math.exp(P))


def _explicit_lstm_cell(x, h, c, cell):
    gates = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c2), c2


def test_reference_is_the_two_layer_lstm_of_the_paper():
    torch.manual_seed(0)
    rule = LSTMOptimizer().double()
    g = torch.randn(50, dtype=torch.float64) * torch.logspace(-8, 1, 50, dtype=torch.float64)
    state = LSTMState(*(0.3 * torch.randn(50, 20, dtype=torch.float64) for _ in range(4)))
    update, new_state = rule(g, state)
    x = preprocess_gradient(g, P)
    h1, c1 = _explicit_lstm_cell(x, state.h1, state.c1, rule.cell1)
    h2, c2 = _explicit_lstm_cell(h1, state.h2, state.c2, rule.cell2)
    assert_close(update, 0.1 * (h2 @ rule.head.weight.T + rule.head.bias).squeeze(-1))
    for got, want in zip(new_state, (h1, c1, h2, c2)):
        assert_close(got, want)


def test_reference_gradcheck_in_float64():
    torch.manual_seed(0)
    rule = LSTMOptimizer(hidden_size=3).double()
    g = (torch.randn(4, dtype=torch.float64) * 0.1).requires_grad_()
    state = [(0.2 * torch.randn(4, 3, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    weights = list(rule.parameters())

    def fn(grad, *rest):
        st = LSTMState(*rest[:4])
        update, new_state, _ = lstm_rule_reference(grad, st, rule.cell1, rule.cell2, rule.head)
        return (update, *new_state)

    assert torch.autograd.gradcheck(fn, (g, *state))
    # and w.r.t. the rule's weights (what meta-training learns)
    loss = fn(g, *state)[0].square().sum()
    grads = torch.autograd.grad(loss, weights)
    assert all(torch.isfinite(w).all() for w in grads)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradients_leave_their_coordinate_and_state_alone(bad):
    torch.manual_seed(0)
    rule = LSTMOptimizer()
    g = torch.randn(6)
    state = LSTMState(*(torch.randn(6, 20) for _ in range(4)))
    g_bad = g.clone()
    g_bad[2] = bad
    update, new_state, skipped = rule.step(g_bad, state)
    assert skipped.tolist() == [False, False, True, False, False, False]
    assert update[2] == 0
    for old, new in zip(state, new_state):
        assert torch.equal(new[2], old[2])
        assert torch.isfinite(new).all()
    # every other coordinate is exactly what it is without the bad one
    keep = torch.tensor([0, 1, 3, 4, 5])
    clean_update, clean_state = rule(g[keep], LSTMState(*(s[keep] for s in state)))
    assert_close(update[keep], clean_update)
    for new, clean in zip(new_state, clean_state):
        assert_close(new[keep], clean)


def test_rule_files_load_with_weights_only_and_check_the_architecture(tmp_path):
    torch.manual_seed(0)
    rule = LSTMOptimizer(hidden_size=7, output_scale=0.05)
    path = tmp_path / "rule.pt"
    rule.save(path)
    loaded = LSTMOptimizer.load(path)
    assert loaded.config() == rule.config()
    for a, b in zip(rule.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    # a file whose weights do not fit the architecture it names
    payload = torch.load(path, weights_only=True)
    payload["config"]["hidden_size"] = 8
    torch.save(payload, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="do not fit the architecture"):
        LSTMOptimizer.load(tmp_path / "wrong.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fastmeta LSTMOptimizer rule file"):
        LSTMOptimizer.load(tmp_path / "other.pt")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="hidden_size"):
        LSTMOptimizer(hidden_size=0)
    with pytest.raises(ValueError, match="output_scale"):
        LSTMOptimizer(output_scale=0.0)
    with pytest.raises(ValueError, match="flat"):
        LSTMOptimizer()(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="state.h1"):
        LSTMOptimizer()(torch.zeros(3), LSTMState.zeros(4, 20, dtype=torch.float32))
    with pytest.raises(TypeError, match="float32 and float64"):
        Learned([nn.Parameter(torch.zeros(3, dtype=torch.float16))], rule=LSTMOptimizer())
    with pytest.raises(TypeError, match="rule must be"):
        Learned([nn.Parameter(torch.zeros(3))], rule=42)


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def test_learned_applies_the_rule_to_every_coordinate_with_its_own_state():
    torch.manual_seed(0)
    rule = LSTMOptimizer()
    model = _model()
    opt = Learned([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                  rule=rule)
    manual = [p.detach().clone() for p in model.parameters()]
    states = [None] * len(manual)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        with torch.no_grad():
            for i, (w, g) in enumerate(zip(manual, grads)):
                update, states[i] = rule(g.reshape(-1), states[i])
                w.add_(update.view_as(w))
        for p, w in zip(model.parameters(), manual):
            assert_close(p.detach(), w)
    assert all(opt.state[p]["step"] == 5 for p in model.parameters())


def test_learned_state_dict_round_trip_continues_identically():
    rule = LSTMOptimizer()
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    a = _model()
    opt_a = Learned(a.parameters(), rule=rule)
    train(a, opt_a, 6)
    b = _model()
    opt_b = Learned(b.parameters(), rule=rule)
    train(b, opt_b, 3)
    c = _model()
    c.load_state_dict(b.state_dict())
    opt_c = Learned(c.parameters(), rule=rule)
    opt_c.load_state_dict(opt_b.state_dict())
    train(c, opt_c, 3)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


def test_learned_skips_params_without_grad_and_counts_non_finite_entries():
    model = _model()
    opt = Learned(model.parameters(), rule=LSTMOptimizer())
    w, b = model[0].weight, model[0].bias
    before_b = b.detach().clone()
    w.grad = torch.randn_like(w)
    w.grad[0, 0] = float("nan")
    before = w.detach().clone()
    opt.step()
    assert w[0, 0] == before[0, 0]
    assert not torch.equal(w, before)
    assert torch.equal(b, before_b) and not opt.state[b]
    assert opt.state[w]["nonfinite"] == 1
    assert torch.isfinite(opt.state[w]["h1"]).all()


# ---- meta-training ------------------------------------------------------------------------


def test_quadratics_are_the_papers_family():
    from fastmeta.meta.lstm_training import QuadraticProblems

    g = torch.Generator().manual_seed(0)
    problems = QuadraticProblems(4, generator=g, dtype=torch.float64)
    theta = torch.randn(4, 10, dtype=torch.float64)
    expected = torch.stack([(problems.W[b] @ theta[b] - problems.y[b]).square().sum()
                            for b in range(4)])
    assert_close(problems.loss(theta), expected)
    with pytest.raises(ValueError, match="batch"):
        QuadraticProblems(0)


@pytest.mark.parametrize("second_order", [False, True], ids=["first_order", "second_order"])
def test_unroll_meta_gradient_matches_finite_differences(second_order):
    """The meta-gradient of an unroll w.r.t. the rule's head, against central differences
    (float64). Second order: of the unroll itself. First order: of the same unroll with the
    optimizee gradients frozen at their values (what first order differentiates)."""
    from fastmeta.meta.lstm_training import QuadraticProblems, unroll

    torch.manual_seed(0)
    rule = LSTMOptimizer(hidden_size=4).double()
    problems = QuadraticProblems(2, dim=3, generator=torch.Generator().manual_seed(1),
                                 dtype=torch.float64)
    weight = rule.head.weight
    frozen = []  # the optimizee gradients of the unperturbed unroll

    def frozen_gradient_loss(theta):
        loss = problems.loss(theta)
        if not frozen_gradients_recorded:
            frozen.append(torch.autograd.grad(loss.sum(), theta, retain_graph=True)[0].detach())
        return loss

    frozen_gradients_recorded = False
    result = unroll(rule, frozen_gradient_loss, problems.theta0, None, 3,
                    second_order=second_order)
    frozen_gradients_recorded = True
    (analytic,) = torch.autograd.grad(result.meta_loss, weight)

    def meta_loss():
        if second_order:
            return unroll(rule, problems.loss, problems.theta0, None, 3,
                          second_order=True).meta_loss
        theta, state, total = problems.theta0, None, 0.0
        for g in frozen[:3]:  # the unroll also evaluates f(θ_3), whose gradient is unused
            update, state = rule(g.reshape(-1), state)
            theta = theta + update.view_as(theta)
            total = total + problems.loss(theta).mean()  # the loss after each update
        return total

    eps, numeric = 1e-6, torch.zeros_like(weight)
    with torch.no_grad():
        for j in range(weight.shape[1]):
            weight[0, j] += eps
            up = meta_loss()
            weight[0, j] -= 2 * eps
            down = meta_loss()
            weight[0, j] += eps
            numeric[0, j] = (up - down) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_meta_training_reduces_the_held_out_loss():
    from fastmeta.meta.lstm_training import QuadraticProblems, meta_train, unroll

    torch.manual_seed(0)
    rule = LSTMOptimizer()
    held_out = QuadraticProblems(32, generator=torch.Generator().manual_seed(123))

    def final_loss():
        with torch.enable_grad():
            result = unroll(rule, held_out.loss, held_out.theta0, None, 20)
        return float(held_out.loss(result.theta.detach()).mean())

    before = final_loss()
    history = meta_train(rule, lambda g: QuadraticProblems(32, generator=g), epochs=15,
                         horizon=20, unroll_steps=10, lr=3e-3)
    assert len(history) == 15 and history[-1] < history[0]
    assert final_loss() < 0.5 * before


def test_every_update_of_a_truncation_gets_a_training_signal():
    """With one-step truncations the meta-loss is f(θ_1): the rule must still learn."""
    from fastmeta.meta.lstm_training import QuadraticProblems, meta_train

    rule = LSTMOptimizer(hidden_size=3)
    before = [w.detach().clone() for w in rule.parameters()]
    meta_train(rule, lambda g: QuadraticProblems(4, generator=g), epochs=1, horizon=2,
               unroll_steps=1)
    assert all(not torch.equal(a, b) for a, b in zip(before, rule.parameters()))
    with pytest.raises(ValueError, match="unroll_steps"):
        meta_train(rule, lambda g: QuadraticProblems(4, generator=g), epochs=1, unroll_steps=0)


def test_rule_files_keep_their_dtype_and_learned_resumes_across_dtypes(tmp_path):
    rule = LSTMOptimizer().double()
    rule.save(tmp_path / "rule64.pt")
    assert LSTMOptimizer.load(tmp_path / "rule64.pt").head.weight.dtype == torch.float64
    # float64 params with a float32 rule: the loaded state (cast to the params' dtype by
    # torch.optim) still runs
    model = _model().double()
    opt = Learned(model.parameters(), rule=LSTMOptimizer())
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    again = Learned(model.parameters(), rule=opt.rule)
    again.load_state_dict(opt.state_dict())
    again.step()
    assert all(again.state[p]["step"] == 2 for p in model.parameters())


def test_digits_mlp_problems_are_batched_mlps():
    pytest.importorskip("sklearn", reason="the digits need scikit-learn")
    from fastmeta.meta.lstm_training import DigitsMLPProblems

    problems = DigitsMLPProblems(3, generator=torch.Generator().manual_seed(0))
    theta = problems.theta0 + 0.1 * torch.randn_like(problems.theta0)
    state = problems.generator.get_state()
    losses = problems.loss(theta)
    problems.generator.set_state(state)  # the same minibatches again, for the reference
    index = torch.randint(len(problems.images), (3, 128), generator=problems.generator)
    for b in range(3):
        net = nn.Sequential(nn.Linear(64, 20), nn.Sigmoid(), nn.Linear(20, 10))
        nn.utils.vector_to_parameters(theta[b], net.parameters())
        expected = nn.functional.cross_entropy(net(problems.images[index[b]]),
                                               problems.labels[index[b]])
        assert_close(losses[b], expected)
    assert problems.theta0.shape == (3, 64 * 20 + 20 + 20 * 10 + 10)
