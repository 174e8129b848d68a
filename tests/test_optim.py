"""fastmeta.optim against torch.optim: one database of optimizer configurations and error
inputs drives every generic test (in the spirit of torch's OptimizerInfo)."""

from __future__ import annotations

import copy
import pickle
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import fastmeta.optim as fo
from fastmeta import backends
from fastmeta.backends import Impl
from tests.conftest import ALL_IMPLS
from tests.tolerances import assert_close


@dataclass
class OptimizerInfo:
    ours: type
    theirs: type
    configs: list[dict[str, Any]]
    # Constructor kwargs that torch rejects; ours must reject them with the same message.
    bad_configs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.ours.__name__


ADAM_CONFIGS = [
    {},
    {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-6},
    {"lr": 1e-2, "weight_decay": 0.1},
    {"lr": 1e-2, "amsgrad": True},
    {"lr": 1e-2, "maximize": True, "weight_decay": 0.05, "amsgrad": True},
    {"lr": torch.tensor(1e-2)},
]
ADAM_BAD = [
    {"lr": -1.0}, {"eps": -1e-8}, {"betas": (1.0, 0.999)}, {"betas": (0.9, -0.1)},
    {"weight_decay": -0.1},
]

OPTIMIZERS = [
    OptimizerInfo(
        fo.SGD, torch.optim.SGD,
        configs=[
            {"lr": 0.05},
            {"lr": 0.05, "momentum": 0.9},
            {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
            {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
            {"lr": 0.05, "momentum": 0.5, "maximize": True, "weight_decay": 0.1},
            {"lr": torch.tensor(0.05), "momentum": 0.9},
        ],
        bad_configs=[{"lr": -0.1}, {"lr": 0.1, "momentum": -0.5},
                     {"lr": 0.1, "weight_decay": -1.0}, {"lr": 0.1, "nesterov": True},
                     {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}],
    ),
    OptimizerInfo(fo.Adam, torch.optim.Adam, configs=ADAM_CONFIGS, bad_configs=ADAM_BAD),
    OptimizerInfo(fo.AdamW, torch.optim.AdamW,
                  configs=ADAM_CONFIGS + [{"lr": 1e-2, "weight_decay": 0.0}],
                  bad_configs=ADAM_BAD),
    OptimizerInfo(
        fo.Adagrad, torch.optim.Adagrad,
        configs=[
            {},
            {"lr": 0.1, "lr_decay": 0.01},
            {"lr": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.5},
            {"lr": 0.1, "eps": 1e-3, "maximize": True},
        ],
        bad_configs=[{"lr": -0.1}, {"lr_decay": -0.1}, {"weight_decay": -0.1}, {"eps": -1.0},
                     {"initial_accumulator_value": -1.0}],
    ),
    OptimizerInfo(
        fo.RMSprop, torch.optim.RMSprop,
        configs=[
            {},
            {"lr": 1e-2, "alpha": 0.9, "eps": 1e-4},
            {"lr": 1e-2, "centered": True},
            {"lr": 1e-2, "momentum": 0.9},
            {"lr": 1e-2, "momentum": 0.5, "centered": True, "weight_decay": 0.1},
            {"lr": 1e-2, "maximize": True, "centered": True},
        ],
        bad_configs=[{"lr": -0.1}, {"eps": -1.0}, {"momentum": -0.1}, {"weight_decay": -1.0},
                     {"alpha": -0.5}],
    ),
]

CASES = [
    pytest.param(info, config, id=f"{info.name}-{i}")
    for info in OPTIMIZERS
    for i, config in enumerate(info.configs)
]

# Every awkward shape in one list: matrices, a vector, a scalar-like, empty, 3-d.
SHAPES = [(3, 5), (5,), (1,), (0,), (2, 3, 4), (40,)]


def _params(dtype=torch.float32, shapes=SHAPES):
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


def _grad_sequence(params, steps, *, skip=None):
    """Random grads per step; ``skip(step, index)`` True leaves that grad None."""
    seq = []
    for k in range(steps):
        seq.append([None if skip and skip(k, i) else torch.randn_like(p)
                    for i, p in enumerate(params)])
    return seq


def _run(opt, params, grads_seq):
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()


def _clone_config(config):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in config.items()}


def _assert_same_state(ours, theirs):
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours["state"].keys() == sd_theirs["state"].keys()
    for idx, state in sd_theirs["state"].items():
        assert sd_ours["state"][idx].keys() == state.keys(), idx
        for key, value in state.items():
            mine = sd_ours["state"][idx][key]
            if key == "step":
                assert mine.dtype == value.dtype and mine.device == value.device
                assert mine.item() == value.item()
            else:
                assert_close(mine, value, msg=f"state[{idx}][{key}]")
    for g_ours, g_theirs in zip(sd_ours["param_groups"], sd_theirs["param_groups"]):
        assert g_ours.keys() == g_theirs.keys()


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("info,config", CASES)
def test_matches_torch_over_20_steps(info, config, impl):
    steps = 20
    params = _params()
    theirs_params = [p.detach().clone().requires_grad_() for p in params]
    # Param 2 has no grad on even steps: it must be skipped, as torch skips it.
    grads = _grad_sequence(params, steps, skip=lambda k, i: i == 2 and k % 2 == 0)
    ours = info.ours(params, impl=impl, **_clone_config(config))
    theirs = info.theirs(theirs_params, **_clone_config(config))
    with backends.trace() as calls:
        _run(ours, params, grads)
    _run(theirs, theirs_params, grads)
    assert calls and {impl_ for _, impl_ in calls} == {Impl(impl)}
    for p, q in zip(params, theirs_params):
        assert_close(p.detach(), q.detach())
    _assert_same_state(ours, theirs)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_float64_is_tighter(info):
    config = info.configs[-1] if not isinstance(info.configs[-1].get("lr"), torch.Tensor) \
        else info.configs[1]
    params = _params(torch.float64)
    theirs_params = [p.detach().clone().requires_grad_() for p in params]
    grads = _grad_sequence(params, 20)
    _run(info.ours(params, **config), params, grads)
    _run(info.theirs(theirs_params, **config), theirs_params, grads)
    for p, q in zip(params, theirs_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", [i for i in ALL_IMPLS if i.values[0] != "reference"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_params_match_the_fp32_reference(info, dtype, impl):
    """bf16/fp16 params are updated with fp32 arithmetic inside the kernel, rounded once."""
    config = info.configs[1]
    params = _params(dtype)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    grads = _grad_sequence(params, 3)
    _run(info.ours(params, impl=impl, **config), params, grads)
    _run(info.ours(ref_params, impl="reference", **config), ref_params, grads)
    for p, q in zip(params, ref_params):
        if impl == "triton" and dtype == torch.bfloat16:  # interpreter truncates; see tolerances
            torch.testing.assert_close(p.detach(), q.detach(), rtol=3 * 2**-7, atol=3 * 2**-7)
        else:
            assert_close(p.detach(), q.detach())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_mixed_dtypes_in_one_group(info):
    config = info.configs[1]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    params = [torch.randn(17, dtype=d, requires_grad=True) for d in dtypes]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    grads = _grad_sequence(params, 3)
    with backends.trace() as calls:
        _run(info.ours(params, **config), params, grads)
    assert len(calls) == 3  # one call per step for the whole mixed group
    _run(info.ours(ref_params, impl="reference", **config), ref_params, grads)
    for p, q in zip(params, ref_params):
        assert_close(p.detach(), q.detach())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
@pytest.mark.parametrize("direction", ["torch_to_fastmeta", "fastmeta_to_torch"])
def test_state_dict_moves_between_torch_and_fastmeta(info, direction):
    config = info.configs[1]
    params = _params()
    grads = _grad_sequence(params, 10)
    first, second = (info.theirs, info.ours) if direction == "torch_to_fastmeta" \
        else (info.ours, info.theirs)
    opt1 = first(params, **config)
    _run(opt1, params, grads[:5])
    saved = copy.deepcopy(opt1.state_dict())
    # Continue in the other library from the saved state...
    continued = [p.detach().clone().requires_grad_() for p in params]
    opt2 = second(continued, **config)
    opt2.load_state_dict(saved)
    _run(opt2, continued, grads[5:])
    # ...and in the first one, uninterrupted.
    _run(opt1, params, grads[5:])
    for p, q in zip(continued, params):
        assert_close(p.detach(), q.detach())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
@pytest.mark.parametrize("bad", range(5))
def test_invalid_hyperparameters_raise_like_torch(info, bad):
    if bad >= len(info.bad_configs):
        pytest.skip("no more bad configs for this optimizer")
    config = info.bad_configs[bad]
    with pytest.raises(Exception) as theirs:
        info.theirs(_params(), **config)
    with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value))):
        info.ours(_params(), **config)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_same_constructor_defaults_as_torch(info):
    params = _params()
    assert info.ours(params).defaults.keys() == info.theirs(params).defaults.keys()
    for key, value in info.theirs(params).defaults.items():
        assert info.ours(params).defaults[key] == value, key


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_param_groups_schedulers_closures_and_zero_grad(info):
    lr0 = 0.05
    a, b = _params(shapes=[(4, 3)]), _params(shapes=[(6,)])
    a2, b2 = ([p.detach().clone().requires_grad_() for p in ps] for ps in (a, b))
    ours = info.ours([{"params": a}], lr=lr0)
    theirs = info.theirs([{"params": a2}], lr=lr0)
    ours.add_param_group({"params": b, "lr": 2 * lr0})
    theirs.add_param_group({"params": b2, "lr": 2 * lr0})
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=2, gamma=0.5)
    sched_theirs = torch.optim.lr_scheduler.StepLR(theirs, step_size=2, gamma=0.5)
    target = torch.randn(4, 3)

    def closure_for(params):
        def closure():
            loss = ((params[0] - target) ** 2).sum() + params[1].pow(2).sum()
            loss.backward()
            return loss
        return closure

    for _ in range(6):
        ours.zero_grad()
        theirs.zero_grad()
        loss_ours = ours.step(closure_for([a[0], b[0]]))
        loss_theirs = theirs.step(closure_for([a2[0], b2[0]]))
        torch.testing.assert_close(loss_ours, loss_theirs)
        sched_ours.step()
        sched_theirs.step()
    assert ours.param_groups[1]["lr"] == theirs.param_groups[1]["lr"]
    for p, q in zip(a + b, a2 + b2):
        assert_close(p.detach(), q.detach())
    ours.zero_grad()
    assert all(p.grad is None for p in a + b)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_sparse_gradient_is_refused(info):
    p = torch.randn(5, requires_grad=True)
    p.grad = torch.ones(5).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        info.ours([p]).step()


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_complex_params_are_updated_as_real_views_like_torch(info):
    config = info.configs[1]
    p = torch.randn(6, dtype=torch.complex64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    grads = [[torch.randn(6, dtype=torch.complex64)] for _ in range(5)]
    _run(info.ours([p], **config), [p], grads)
    _run(info.theirs([q], **config), [q], grads)
    torch.testing.assert_close(p.detach(), q.detach())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_differentiable_is_refused(info):
    with pytest.raises(ValueError, match="not differentiable; use fastmeta.functional"):
        info.ours(_params(), differentiable=True)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_is_a_torch_optimizer_of_the_same_kind(info):
    opt = info.ours(_params())
    assert isinstance(opt, info.theirs)
    assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.native
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_one_native_call_per_group_per_step(info):
    params = _params()
    opt = info.ours([{"params": params[:3]}, {"params": params[3:]}], **info.configs[1])
    with backends.trace() as calls:
        _run(opt, params, _grad_sequence(params, 2))
    assert [impl for _, impl in calls] == [Impl.NATIVE] * 4


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_param_moved_by_data_assignment_is_followed(info):
    """The optimizers reuse validated tensor lists between steps; replacing a param's storage
    (``p.data = ...``) must be noticed, never written through the old address."""
    config = info.configs[1]
    params = _params()
    theirs_params = [p.detach().clone().requires_grad_() for p in params]
    grads = _grad_sequence(params, 6)
    ours, theirs = info.ours(params, **config), info.theirs(theirs_params, **config)
    _run(ours, params, grads[:3])
    _run(theirs, theirs_params, grads[:3])
    for ps in (params, theirs_params):
        ps[0].data = ps[0].data.clone() + 1.0
    _run(ours, params, grads[3:])
    _run(theirs, theirs_params, grads[3:])
    for p, q in zip(params, theirs_params):
        assert_close(p.detach(), q.detach())


@pytest.mark.native
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_native_fast_path_runs_and_steps_aside_when_the_group_changes(info, monkeypatch):
    """From the second step on, a group whose params all have dense contiguous grads is
    stepped by one ``PreparedGroup`` call; anything else (a missing grad, a strided grad, a
    param moved, a param swapped in the group's list) takes the general path, and every step
    still matches torch."""
    config = info.configs[1]
    params = _params()
    theirs_params = [p.detach().clone().requires_grad_() for p in params]
    ours, theirs = info.ours(params, **config), info.theirs(theirs_params, **config)
    grads = _grad_sequence(params, 12, skip=lambda k, i: k == 4 and i == 2)
    # Step 6: a strided gradient (a transposed view) for the (3, 5) param.
    grads[6][0] = torch.randn(5, 3).t()

    def perturb(step, ps):
        if step == 8:  # the param's storage replaced
            ps[4].data = ps[4].data.clone() * 0.5
        if step == 10:  # the group's list now holds a new tensor in the same slot
            ps[5] = ps[5].detach().clone().requires_grad_()
            return ps[5]
        return None

    from fastmeta.optim.optimizer import FusedOptimizer

    general_path_steps = []  # every general-path step looks up the cached plans first
    cached_plans = FusedOptimizer._cached_plans

    def counting_cached_plans(self, *args):
        general_path_steps.append(step)
        return cached_plans(self, *args)

    monkeypatch.setattr(FusedOptimizer, "_cached_plans", counting_cached_plans)
    for step, step_grads in enumerate(grads):
        for opt, ps in ((ours, params), (theirs, theirs_params)):
            swapped = perturb(step, ps)
            if swapped is not None:
                opt.param_groups[0]["params"][5] = swapped
            _run(opt, ps, [step_grads])
        if step in (2, 3, 5, 7, 9, 11):
            assert 0 in ours.__dict__.get("_fastmeta_fast", {}), f"no fast path at step {step}"
        for p, q in zip(params, theirs_params):
            assert_close(p.detach(), q.detach(), msg=f"step {step}")
    # Steps 0-1 prepare (SGD's momentum buffers start on step 0), 4, 6, 8 and 10 are
    # perturbed, 5 (and 11 for SGD, whose new param starts its buffer on step 10) prepare again.
    assert not set(general_path_steps) & {2, 3, 7, 9}
    assert {4, 6, 8, 10} <= set(general_path_steps)


@pytest.mark.native
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_deepcopy_of_a_prepared_optimizer_steps_its_own_params(info):
    """The prepared plans hold addresses: a deep copy (as in checkpointing by copy) must not
    inherit them, and must step its own tensors exactly as the original steps its own."""
    config = info.configs[1]
    params = _params()
    opt = info.ours(params, **config)
    grads = _grad_sequence(params, 6)
    _run(opt, params, grads[:3])
    twin = copy.deepcopy(opt)
    twin_params = twin.param_groups[0]["params"]
    _run(opt, params, grads[3:])
    _run(twin, twin_params, grads[3:])
    for p, q in zip(params, twin_params):
        assert p is not q
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    # The requested implementation survives pickling (torch pickles only defaults, state and
    # param groups).
    assert pickle.loads(pickle.dumps(info.ours(_params(), impl="reference"))).impl \
        is Impl.REFERENCE


@pytest.mark.native
def test_sgd_fast_path_follows_momentum_switched_on():
    params = _params()
    theirs_params = [p.detach().clone().requires_grad_() for p in params]
    ours, theirs = fo.SGD(params, lr=0.05), torch.optim.SGD(theirs_params, lr=0.05)
    for step, step_grads in enumerate(_grad_sequence(params, 8)):
        if step == 4:
            for opt in (ours, theirs):
                opt.param_groups[0]["momentum"] = 0.9
        _run(ours, params, [step_grads])
        _run(theirs, theirs_params, [step_grads])
        for p, q in zip(params, theirs_params):
            assert_close(p.detach(), q.detach(), msg=f"step {step}")


@pytest.mark.native
def test_prepared_step_refuses_to_run_after_a_param_moved():
    from fastmeta.ops.prepared import PreparedStep
    from fastmeta.ops.sgd import sgd_step_

    p = torch.ones(4)
    step = PreparedStep("sgd_step_", sgd_step_, "sgd_step", [p], [("momentum_buffers", None)],
                        None, impl="native")
    p.data = torch.zeros(8)
    with pytest.raises(RuntimeError, match="moved since this step was prepared"):
        step([torch.ones(8)], lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0,
             nesterov=False, maximize=False, first_step=False)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_step_hooks_and_profiler_label_still_work(info):
    """fastmeta skips torch's step wrapper when nothing listens; hooks and the profiler must
    still see every step."""
    params = _params()
    opt = info.ours(params, **info.configs[1])
    calls = []
    pre = opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    glob = register_optimizer_step_post_hook(
        lambda o, a, k: calls.append("global"))
    try:
        _run(opt, params, _grad_sequence(params, 2))
    finally:
        pre.remove()
        post.remove()
        glob.remove()
    assert calls == ["pre", "post", "global"] * 2
    _run(opt, params, _grad_sequence(params, 1))  # no hooks: the fast path
    assert len(calls) == 6
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _run(opt, params, _grad_sequence(params, 1))
    names = {e.name for e in prof.events()}
    assert f"Optimizer.step#{info.ours.__name__}.step" in names
