"""Benchmarks of one meta-step against the ways people write it today, all in the same run.

MAML (:func:`rows`: inner loop + query loss + meta-gradient + outer step):

* ``torch.func vmap``: ``vmap`` over tasks of a ``grad``-based inner loop (second order);
* ``batched eager`` (MLPs only): every task at once, written plainly: the fast weights as one
  ``[T, N]`` buffer, each Linear as a ``baddbmm`` on its ``[T, out, in]`` slice, one
  ``autograd.grad`` w.r.t. the buffer and ``w - lr * g``. The issue's "plain batched-bmm
  version": the fused engine has to beat it too;
* ``eager loop``: a Python loop over tasks with ``autograd.grad(create_graph=True)`` and
  per-tensor ``p - lr * g`` updates on ``functional_call`` (learn2learn's pattern);
* ``higher``: ``higher.innerloop_ctx`` per task, when higher is installed.

Workloads: the sinusoid MLP (T=25, K=10; 1 and 5 inner steps) and the conv-4 network on 5-way
1-shot 28x28 episodes (T=8, 1 inner step). The sides of a row take turns, one call or a ~2 ms
block at a time (:func:`fastmeta.bench.harness.time_round_robin`).

CAVIA (:func:`cavia_rows`: inner loop + query loss + meta-gradient, no outer step, so that only
the meta-step itself is compared), second order, on the sinusoid (T=25, K=10, 5 context
params, one inner step with lr 1.0):

* ``torch.func vmap``: ``vmap`` over tasks of ``functional_call`` with a per-task context and a
  ``torch.func.grad`` inner step;
* ``batched eager``: the same batched maths as fastmeta (θ shared, one forward of every task
  with a ``[T, d]`` context) with the update written ``φ - α g`` in plain torch: what is left
  when the fused update is taken out.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fastmeta.bench import harness
from fastmeta.meta import CAVIA, MAML, MLP, Conv4
from fastmeta.optim import Adam

INNER_LR = 0.01
# Zintgraf et al. 2019's sinusoid setting: 5 context params, inner lr 1.0.
CAVIA_CONTEXT = 5
CAVIA_INNER_LR = 1.0


def _vmap_step(model, loss_fn, steps: int, outer):
    names = [n for n, _ in model.named_parameters()]

    def task_loss(params, x, y):
        return loss_fn(functional_call(model, params, (x,)), y)

    def query_loss(params, xs, ys, xq, yq):
        for _ in range(steps):
            g = grad(task_loss)(params, xs, ys)
            params = {n: params[n] - INNER_LR * g[n] for n in names}
        return task_loss(params, xq, yq)

    batched = vmap(query_loss, in_dims=(None, 0, 0, 0, 0), randomness="different")

    def step(ep):
        params = dict(model.named_parameters())
        loss = batched(params, ep.support_x, ep.support_y, ep.query_x, ep.query_y).mean()
        outer.zero_grad()
        loss.backward()
        outer.step()

    return step


def _batched_eager_step(model, loss_fn, steps: int, outer):
    if loss_fn is not F.mse_loss:
        raise ValueError("the batched eager baseline is written for F.mse_loss (the sinusoid)")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shapes = [(m.out_features, m.in_features) for m in linears]
    if not linears or any(m.bias is None for m in linears) or not all(
            isinstance(m, (torch.nn.Linear, torch.nn.ReLU, torch.nn.Sequential, MLP))
            for m in model.modules()):
        raise ValueError("the batched eager baseline is written for Linear/ReLU MLPs")
    params = [t for m in linears for t in (m.weight, m.bias)]

    def forward(flat, x):
        offset = 0
        for i, (out_f, in_f) in enumerate(shapes):
            w = flat[:, offset:offset + out_f * in_f].view(-1, out_f, in_f)
            offset += out_f * in_f
            b = flat[:, offset:offset + out_f].unsqueeze(1)
            offset += out_f
            x = torch.baddbmm(b, x, w.transpose(1, 2))
            if i < len(shapes) - 1:
                x = torch.relu(x)
        return x

    def losses(flat, x, y):
        return (forward(flat, x) - y).square().mean((1, 2))

    def step(ep):
        tasks = ep.support_x.shape[0]
        flat = torch.cat([p.reshape(-1) for p in params]).expand(tasks, -1)
        for _ in range(steps):
            (g,) = torch.autograd.grad(losses(flat, ep.support_x, ep.support_y).sum(), flat,
                                       create_graph=True)
            flat = flat - INNER_LR * g
        loss = losses(flat, ep.query_x, ep.query_y).mean()
        outer.zero_grad()
        loss.backward()
        outer.step()

    return step


def _eager_step(model, loss_fn, steps: int, outer):
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def step(ep):
        outer.zero_grad()
        total = 0.0
        for t in range(ep.support_x.shape[0]):
            fast = params
            for _ in range(steps):
                out = functional_call(model, dict(zip(names, fast)), (ep.support_x[t],))
                g = torch.autograd.grad(loss_fn(out, ep.support_y[t]), fast, create_graph=True)
                fast = [p - INNER_LR * gi for p, gi in zip(fast, g)]
            out = functional_call(model, dict(zip(names, fast)), (ep.query_x[t],))
            total = total + loss_fn(out, ep.query_y[t])
        (total / ep.support_x.shape[0]).backward()
        outer.step()

    return step


def _higher_step(model, loss_fn, steps: int, outer):
    import higher

    inner = torch.optim.SGD(model.parameters(), lr=INNER_LR)

    def step(ep):
        outer.zero_grad()
        tasks = ep.support_x.shape[0]
        for t in range(tasks):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fm, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fm(ep.support_x[t]), ep.support_y[t]))
                (loss_fn(fm(ep.query_x[t]), ep.query_y[t]) / tasks).backward()
        outer.step()

    return step


def _fastmeta_step(model, loss_fn, steps: int, outer_lr: float):
    maml = MAML(model, loss_fn=loss_fn, inner_lr=INNER_LR, inner_steps=steps)
    outer = Adam(maml.parameters(), lr=outer_lr)

    def step(ep):
        out = maml(ep)
        outer.zero_grad()
        out.loss.backward()
        outer.step()

    return step


def _row(name: str, make_model: Callable[[], torch.nn.Module], loss_fn, episode, steps: int,
         *, baselines: list[str], min_run_time: float) -> harness.Row:
    torch.manual_seed(0)
    fastmeta_step = _fastmeta_step(make_model(), loss_fn, steps, 1e-3)
    step_fns: dict[str, Callable[[], None]] = {"fastmeta": lambda: fastmeta_step(episode)}
    timings: dict[str, harness.Timing | None] = {}
    notes = {}
    makers = {"torch.func vmap": _vmap_step, "batched eager": _batched_eager_step,
              "eager loop": _eager_step, "higher": _higher_step}
    for baseline in baselines:
        if baseline == "higher" and importlib.util.find_spec("higher") is None:
            timings[baseline] = None
            notes["higher"] = "higher is not installed (skipped)"
            continue
        torch.manual_seed(0)
        model = make_model()
        step = makers[baseline](model, loss_fn, steps, torch.optim.Adam(model.parameters()))
        step_fns[baseline] = lambda s=step: s(episode)
    # Round-robin, at least ROUND_ROBIN_MIN_CYCLES calls of each side: a conv-4 step takes
    # about a second, and a best-of-3-calls comparison swung from 0.78x to 1.12x between runs.
    measured = harness.time_round_robin(step_fns, min_run_time=min_run_time)
    ours = measured.pop("fastmeta")
    timings.update(measured)
    notes["timing"] = "round-robin"
    return harness.Row(name=name, ours=ours, baselines={b: timings[b] for b in baselines},
                       notes=notes)


def rows(*, min_run_time: float, quick: bool = False) -> Iterator[harness.Row]:
    from fastmeta.tasks import SinusoidTasks

    sinusoid = SinusoidTasks(seed=0).sample(25, shots=10)
    for steps in (1, 5):
        yield _row(f"MAML sinusoid T=25 K=10, {steps} step(s)", MLP, F.mse_loss, sinusoid,
                   steps, baselines=["torch.func vmap", "batched eager", "eager loop",
                                     "higher"],
                   min_run_time=min_run_time)
    if quick:
        return
    gen = torch.Generator().manual_seed(0)
    from fastmeta.tasks import Episode

    conv = Episode(
        support_x=torch.rand(8, 5, 1, 28, 28, generator=gen),
        support_y=torch.arange(5).repeat(8, 1),
        query_x=torch.rand(8, 75, 1, 28, 28, generator=gen),
        query_y=torch.arange(5).repeat_interleave(15).repeat(8, 1),
    )
    yield _row("MAML conv-4 5-way 1-shot T=8, 1 step", lambda: Conv4(1, 5, image_size=28),
               F.cross_entropy, conv, 1, baselines=["torch.func vmap", "eager loop"],
               min_run_time=min_run_time)


# ---- CAVIA ------------------------------------------------------------------------------------


def _cavia_fastmeta_step(model, episode, steps: int):
    cavia = CAVIA(model, loss_fn=F.mse_loss, num_context_params=CAVIA_CONTEXT,
                  inner_lr=CAVIA_INNER_LR, inner_steps=steps)

    def step():
        cavia.zero_grad(set_to_none=True)
        cavia(episode).loss.backward()

    return step


def _cavia_vmap_step(model, episode, steps: int):
    def task_loss(phi, params, x, y):
        inputs = torch.cat([x, phi.expand(x.shape[0], -1)], dim=-1)
        return F.mse_loss(functional_call(model, params, (inputs,)), y)

    def query_loss(params, xs, ys, xq, yq):
        phi = torch.zeros(CAVIA_CONTEXT, dtype=xs.dtype)
        for _ in range(steps):
            phi = phi - CAVIA_INNER_LR * grad(task_loss)(phi, params, xs, ys)
        return task_loss(phi, params, xq, yq)

    batched = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))

    def step():
        model.zero_grad(set_to_none=True)
        params = dict(model.named_parameters())
        batched(params, episode.support_x, episode.support_y, episode.query_x,
                episode.query_y).mean().backward()

    return step


def _cavia_batched_eager_step(model, episode, steps: int):
    tasks = episode.num_tasks

    def loss(phi, x, y):
        inputs = torch.cat([x, phi.unsqueeze(1).expand(tasks, x.shape[1], -1)], dim=-1)
        return (model(inputs) - y).square().mean((1, 2))

    def step():
        model.zero_grad(set_to_none=True)
        phi = torch.zeros(tasks, CAVIA_CONTEXT, requires_grad=True)
        for _ in range(steps):
            (g,) = torch.autograd.grad(loss(phi, episode.support_x, episode.support_y).sum(),
                                       phi, create_graph=True)
            phi = phi - CAVIA_INNER_LR * g
        loss(phi, episode.query_x, episode.query_y).mean().backward()

    return step


def cavia_rows(*, min_run_time: float) -> Iterator[harness.Row]:
    from fastmeta.tasks import SinusoidTasks

    episode = SinusoidTasks(seed=0).sample(25, shots=10)
    steps = 1
    makers = {"fastmeta": _cavia_fastmeta_step, "torch.func vmap": _cavia_vmap_step,
              "batched eager": _cavia_batched_eager_step}
    step_fns = {}
    for name, maker in makers.items():
        torch.manual_seed(0)
        step_fns[name] = maker(MLP(in_features=1 + CAVIA_CONTEXT), episode, steps)
    measured = harness.time_round_robin(step_fns, min_run_time=min_run_time)
    ours = measured.pop("fastmeta")
    yield harness.Row(name=f"CAVIA sinusoid T=25 K=10 d={CAVIA_CONTEXT}, {steps} step",
                      ours=ours, baselines=dict(measured),
                      notes={"measured": "forward + meta-gradient, second order, no outer step",
                             "timing": "round-robin"})
