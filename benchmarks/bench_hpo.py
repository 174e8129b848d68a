"""``python -m benchmarks.bench_hpo``: one unrolled hyper-step of :mod:`fastmeta.hpo` (K
training steps of momentum SGD with per-layer lr and weight decay, the validation loss, and its
gradient w.r.t. the hyperparameters through all K steps) on the digits MLP.

* fastmeta: :func:`fastmeta.hpo.unrolled_validation_loss` on the flat parameter buffer. The
  digits model is a plain ReLU MLP, so the K steps run as one autograd node: the fused momentum
  kernels, with the training gradients and (in the backward) the Hessian-vector products
  written by hand instead of a per-step autograd graph; on the CPU the node's forward and
  backward are one native call each (``csrc/mlp.h``, the products on torch's BLAS);
* eager (per tensor): the same maths in plain eager autograd, one tensor per parameter and
  ``p - lr * b`` steps through :func:`torch.func.functional_call`
  (:func:`fastmeta.hpo.unrolled_validation_loss_reference`), as a user would write it;
* eager (flat): eager autograd on the same flat buffer as fastmeta, to separate what the
  fused step gains from what the flat layout gains.

All sides run in the same process, interleaved (:func:`fastmeta.bench.harness.time_interleaved`)
with every torch thread. The issue's target: fastmeta at least 2x faster than eager.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fastmeta import hpo
from fastmeta.bench import harness
from fastmeta.flat import FlatLayout

# Interleaved rounds per measurement: enough to dodge a burst from another process.
ROUNDS = 3


def _flat_eager(model, layout, theta, buffer, lr, momentum, weight_decay, batches, val):
    """:func:`hpo.unrolled_validation_loss` with the step as eager torch ops on the flat
    buffer (torch.optim.SGD's maths)."""
    for x, y in batches:
        loss = F.cross_entropy(layout.call_unchecked(model, theta, (x,)), y)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        d = grad + weight_decay * theta
        buffer = d if buffer is None else momentum * buffer + d
        theta = theta - lr * buffer
    return F.cross_entropy(layout.call_unchecked(model, theta, (val[0],)), val[1])


def hyper_steps(task: hpo.HPOTask, unroll: int, impl: str):
    """The three sides, each a closure that computes one hypergradient from the same state."""
    model = task.model(0)
    layout = FlatLayout.of(model)
    groups = hpo.layer_groups(model)
    reparam = hpo.Reparametrization(len(groups))
    index = hpo._layer_index(layout, groups)
    layer_of = {n: i for i, names in enumerate(groups) for n in names}
    z = reparam.encode(hpo.SGDHyperparameters((0.05,) * len(groups), 0.5, 1e-4))
    z.requires_grad_()
    theta = layout.flatten(model).requires_grad_()
    buffer = torch.randn(layout.numel) * 1e-2  # a carried momentum buffer, mid-run
    params = {n: v.detach().clone().requires_grad_() for n, v in layout.views(theta).items()}
    buffers = {n: v.clone() for n, v in layout.views(buffer).items()}
    batches = task.batches(1)
    chunk = [(task.train[0][i], task.train[1][i]) for i in (next(batches)
                                                             for _ in range(unroll))]

    start = theta.detach()  # as hypergrad_search passes it: only z's gradient is wanted

    def fused():
        lr, mu, wd = reparam.decode(z)
        # θ_0 without requires_grad tells fastmeta's unroll that θ̄_0 is not wanted; the eager
        # sides need it for autograd.grad, whose engine skips θ̄_0 by itself.
        val, _, _ = hpo.unrolled_validation_loss(model, layout, start, buffer, lr[index], mu,
                                                 wd, chunk, task.val, impl=impl)
        return torch.autograd.grad(val, z)[0]

    def eager():
        lr, mu, wd = reparam.decode(z)
        val, _, _ = hpo.unrolled_validation_loss_reference(
            model, params, buffers, {n: lr[layer_of[n]] for n in params}, mu, wd, chunk,
            task.val)
        return torch.autograd.grad(val, z)[0]

    def eager_flat():
        lr, mu, wd = reparam.decode(z)
        val = _flat_eager(model, layout, theta, buffer, lr[index], mu, wd, chunk, task.val)
        return torch.autograd.grad(val, z)[0]

    return {"fastmeta": fused, "eager (per tensor)": eager, "eager (flat)": eager_flat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unroll", type=int, default=hpo.DEFAULT_UNROLL, help="K")
    parser.add_argument("--min-run-time", type=float, default=harness.DEFAULT_MIN_RUN_TIME,
                        help="seconds of repeated calls per side")
    parser.add_argument("--impl", default="auto", help="fastmeta's implementation")
    parser.add_argument("--json", help="write the row and machine info here")
    args = parser.parse_args()
    task = hpo.digits_mlp_task(seed=0)
    fns = hyper_steps(task, args.unroll, args.impl)
    reference = fns["eager (per tensor)"]()
    for name, fn in fns.items():  # the sides must compute the same thing before being timed
        torch.testing.assert_close(fn(), reference, rtol=1e-3, atol=1e-6, msg=name)
    times = harness.time_interleaved(fns, rounds=ROUNDS, min_run_time=args.min_run_time)
    baselines = [name for name in fns if name != "fastmeta"]
    row = harness.Row(name=f"digits-mlp hyper-step, K={args.unroll}", ours=times["fastmeta"],
                      baselines={b: times[b] for b in baselines},
                      notes={"threads": torch.get_num_threads(), "impl": args.impl})
    print(f"{torch.get_num_threads()} thread(s)")
    print(harness.format_table([row], baselines))
    if args.json:
        harness.write_json(args.json, "bench_hpo", [row])


if __name__ == "__main__":
    main()
