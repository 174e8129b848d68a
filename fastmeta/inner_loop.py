"""K differentiable inner-loop steps for T tasks at once, on a flat ``[T, N]`` buffer.

.. math::
    \\begin{aligned}
    g^{(k)}_t &= \\nabla_\\theta \\, \\ell\\big(f(x_t; \\theta^{(k)}_t), y_t\\big) \\\\
    \\theta^{(k+1)}, s^{(k+1)} &= \\mathrm{step}\\big(\\theta^{(k)}, g^{(k)}, s^{(k)}, k\\big)
    \\end{aligned}

for every task t, with :math:`\\theta^{(k)}` the ``[T, N]`` buffer. The update is one call for
all tasks: a ``fastmeta.functional`` rule (one fused kernel) or any torch function. Only the
gradients are computed per task, with one of three strategies:

* ``"batched"``: one forward of the model for every task at once, each layer in its
  task-batched form (``bmm``, grouped convolution; :mod:`fastmeta.batched`), then one
  ``torch.autograd.grad`` of the summed task losses;
* ``"vmap"``: ``torch.func.vmap(torch.func.grad_and_value(task_loss))`` over the T rows;
* ``"loop"``: a Python loop runs the forward of each task on its row's views, then one
  ``torch.autograd.grad`` of the summed loss gives all T gradients (tasks are independent, so
  the gradient of the sum w.r.t. row t is task t's gradient).

References:
    Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks.
    ICML 2017. https://arxiv.org/abs/1703.03400 (MAML; first-order MAML is ``create_graph=False``)
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta import fused_mlp
from fastmeta.batched import BatchedModule, unsupported
from fastmeta.flat import FlatLayout, buffer_mutating_modules

__all__ = ["STRATEGIES", "InnerLoopResult", "as_step", "batched_runner", "check_steps",
           "inner_loop", "resolve_strategy", "task_accuracy", "task_losses", "vmap_or_loop"]

StepFn = Callable[[torch.Tensor, torch.Tensor, Any, int], "tuple[torch.Tensor, Any]"]
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]

STRATEGIES = ("auto", "mlp", "batched", "vmap", "loop")

# Models on which "auto" found that vmap cannot run (data-dependent control flow, .item(), an
# op without a batching rule that cannot fall back): they use the loop from then on. Weak, so
# the cache never keeps a model alive.
_VMAP_FAILED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
# One BatchedModule per model (rebuilt when the model's layout is a new one). Weak, as above.
_RUNNERS: weakref.WeakKeyDictionary[nn.Module, tuple[Any, BatchedModule]] = (
    weakref.WeakKeyDictionary())
_SUPPORT: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], list[str]]] = (
    weakref.WeakKeyDictionary())

# How "auto" was chosen: MAML meta-steps (inner loop + query loss + meta-gradient + outer Adam
# step, float32, second order), on the project's 2-core CPU, torch 2.13, min_run_time 1-3 s:
#
#   model                                                   batched    vmap     loop    eager*
#   sinusoid MLP 1-40-40-1, T=25, 10-shot, K=1              6.1 ms     8.2 ms   -       61 ms
#                                                 K=5      19.0 ms    30.8 ms   -      251 ms
#   conv-4 64 filters, BN, 28x28, 5-way 1-shot + 15 queries
#     per class, T=8, K=1                                   1392 ms   ~2000 ms  1081 ms  1156 ms
#   (* a per-task Python loop of functional_call and p - lr * g, learn2learn's pattern)
#
# Dense models are bound by per-op overhead, which batching divides by T: batched wins. Conv
# models are bound by memory traffic: batched activations of all tasks ([75, 8·64, 28, 28], 120
# MB a layer) stream from DRAM where one task's (15 MB) stays in the 32 MB L3, so the loop wins
# there (with 5 queries per task the three were within noise of each other). So "auto" is
# batched for models without convolutions, and otherwise what it was before batched existed:
# vmap, which never lost to the loop by more than noise in the first measurements (sinusoid
# K=1 second order 5.3 vs 35.3 ms, first order 3.2 vs 16.1; conv-4 32 filters T=8 117.8 vs
# 159.3), except where vmap runs wrong or cannot run, or (later) where the inputs are large
# (both below). No timing probe at run time: it
# would cost extra inner loops, flip with machine load, and make results (which differ in
# rounding order between strategies) change from run to run. Not measured on a GPU.
#
# Correctness overrides speed: affine norm layers get wrong second-order gradients under vmap
# (see _wrong_under_vmap_second_order), so "auto" runs those models batched (when they have no
# convolutions) or in the loop when create_graph=True, and in vmap for first order.
#
# Size decides between vmap and the loop on convolutional models (later measurements, AVX-512
# machine, meta-steps with vmap against the loop timed in turn, median of 5-30 pairs each;
# conv-4 = 4 x [3x3 conv, BN, ReLU, 2x2 max-pool], 5-way, one inner step, first order unless
# noted; "positions" = examples x H x W of one task's input):
#
#   model, T=8                                positions per task     vmap/loop time
#                                             support   query
#   conv-4 64 filters 28x28, 15 q/class        3,920    58,800       2.37
#   conv-4 32 filters 28x28, 15 q/class        3,920    58,800       2.15
#   conv-4 16 filters 28x28, 15 q/class        3,920    58,800       1.55
#   conv-4 64 filters 28x28, 5-shot, 1 q/class 19,600    3,920       1.57
#   conv-4 64 filters 28x28, 5 q/class         3,920    19,600       1.45
#   conv-4 16 filters 28x28, 5-shot, 5 q/class 19,600   19,600       1.16
#   conv-4 32 filters 28x28, 5 q/class         3,920    19,600       1.05
#   conv-4 32 filters 28x28, 5-shot, 1 q/class 19,600    3,920       1.03
#   no-BN conv-4 32 filters 28x28, 15 q/class  3,920    58,800       2.22 (second order 1.75)
#   no-BN conv-4 32 filters 28x28, 5 q/class   3,920    19,600       1.02 (second order 1.16)
#   conv-4 64 filters 28x28, 1 q/class         3,920     3,920       0.85
#   conv-4 64 filters 8x8, 15 q/class            320     4,800       0.75
#   conv-4 32 filters 28x28, 1 q/class         3,920     3,920       0.68
#   no-BN conv-4 32 filters 28x28, 1 q/class   3,920     3,920       0.64 (second order 0.61)
#   conv-4 32 filters 8x8, 5 q/class             320     1,600       0.46
#
# At T=2, 4, 16 and 32 the 19,600-position rows kept the loop ahead (1.43-1.90x); the rows of
# 3,920-4,800 positions went either way (0.71-1.24x) and the 1,600-position row stayed with
# vmap (0.36-0.71x). vmap runs a convolution of all T tasks as one grouped convolution, whose
# CPU kernel is slower per example than the plain convolution the loop runs once per task as
# the images grow. So on the CPU "auto" runs a convolutional model's per-task passes in the
# loop once a task's input holds LOOP_MIN_POSITIONS positions (see resolve_strategy); each pass
# (the inner loop on the support set, the query forward) decides on its own input.
LOOP_MIN_POSITIONS = 16_384


class InnerLoopResult(NamedTuple):
    """What :func:`inner_loop` returns."""

    #: ``[T, N]`` adapted parameters, differentiable w.r.t. the starting point.
    params: torch.Tensor
    #: the step function's state after the last step.
    state: Any
    #: ``[K, T]`` support loss of each task before each step (detached when first order).
    losses: torch.Tensor


def as_step(rule: Callable[..., tuple[torch.Tensor, Any]], **hyperparameters: Any) -> StepFn:
    """A step function from a ``fastmeta.functional``-style rule and its hyperparameters.

    ``as_step(fastmeta.functional.adam, lr=1e-3)`` is
    ``lambda p, g, s, k: fastmeta.functional.adam(p, g, s, lr=1e-3)``.

    Args:
        rule: ``rule(params, grads, state, **hyperparameters) -> (new_params, new_state)``.
        **hyperparameters: passed to every call, e.g. ``lr`` (a tensor ``lr`` stays
            differentiable, as Meta-SGD needs).
    """

    def step(params: torch.Tensor, grads: torch.Tensor, state: Any, k: int) -> Any:
        return rule(params, grads, state, **hyperparameters)

    return step


def _wrong_under_vmap_second_order(module: nn.Module) -> list[str]:
    """Submodules whose second-order derivatives torch gets wrong under vmap (torch 2.13).

    Differentiating ``vmap(grad(task_loss))`` again with autograd gives meta-gradients with
    O(1) relative error through affine LayerNorm, and through affine BatchNorm/InstanceNorm
    that normalise with batch statistics (checked against finite differences and against the
    same maths without vmap; GroupNorm, RMSNorm, eval-mode BatchNorm and non-affine LayerNorm
    are right). First derivatives are right. Related upstream: pytorch/functorch#534.
    Norms written with ``F.layer_norm`` etc. inside custom modules are not detected.
    """
    names = []
    for name, m in module.named_modules():
        if isinstance(m, nn.LayerNorm):
            bad = m.elementwise_affine
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            bad = m.affine and (m.training or not m.track_running_stats)
        else:
            bad = False
        if bad:
            names.append(name or type(m).__name__)
    return names


def resolve_strategy(strategy: str, module: nn.Module, *, create_graph: bool = True,
                     inputs: Sequence[Any] = ()) -> str:
    """Turns ``strategy`` into ``"mlp"``, ``"batched"``, ``"vmap"`` or ``"loop"`` for this model.

    ``"mlp"`` (asked for by name, or taken by :func:`inner_loop` under ``"auto"`` where it
    applies, see :func:`mlp_plan`) computes the gradients of a plain MLP by hand
    (:mod:`fastmeta.fused_mlp`).

    ``"auto"`` is ``"batched"`` for a model without convolutions that :mod:`fastmeta.batched`
    can run (every layer has a task-batched form; see the measurements above). Otherwise it is
    ``"vmap"``, except where vmap cannot run, runs wrong or was measured slower; then it is
    ``"loop"``:

    * a forward that updates buffers in place (allowed with ``mutable_buffers="allow"``);
    * second order (``create_graph``) through a norm layer whose second derivatives torch
      computes wrongly under vmap (see :func:`_wrong_under_vmap_second_order`);
    * a model on which vmap already failed once in :func:`inner_loop`;
    * a convolutional model given CPU ``inputs`` of image shape ``[T, n, C, *spatial]`` with
      at least :data:`LOOP_MIN_POSITIONS` positions per task (``n × prod(spatial)``): there
      the loop was 1.02-2.4x faster than vmap (the measurements above).

    Args:
        strategy: what was asked for.
        module: the model.
        create_graph: whether the per-task gradients will be differentiated (second order).
        inputs: the task-batched inputs of the pass the strategy is for, if known (the size
            rule above needs them; without them "auto" never picks the loop for size).

    Raises:
        ValueError: an unknown strategy, ``"mlp"`` for a model that is not a plain MLP,
            ``"batched"`` for a model with a layer that has no task-batched form, or
            ``"vmap"`` where vmap cannot run or runs wrong.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "mlp":
        try:
            fused_mlp.MLPSpec.of(module)
        except fused_mlp.UnsupportedModel as e:
            raise ValueError(f"strategy='mlp' cannot run this model: {e}") from None
        return "mlp"
    if strategy in ("auto", "batched"):
        problems = _unsupported_cached(module)
        if not problems and (strategy == "batched" or not _has_convolutions(module)):
            return "batched"
        if strategy == "batched":
            raise ValueError("strategy='batched' cannot run this model: " + "; ".join(problems)
                             + " (use strategy='vmap' or 'loop')")
    mutates = buffer_mutating_modules(module)
    wrong = _wrong_under_vmap_second_order(module) if create_graph else []
    if strategy == "vmap" and mutates:
        raise ValueError(
            "strategy='vmap' cannot run a forward that updates buffers in place (running "
            f"statistics of {mutates}); use strategy='loop'"
        )
    if strategy == "vmap" and wrong:
        raise ValueError(
            f"strategy='vmap' with create_graph=True gives wrong second-order gradients through "
            f"the norm layers {wrong} (a torch bug); use strategy='loop' or create_graph=False"
        )
    if strategy != "auto":
        return strategy
    if mutates or wrong or module in _VMAP_FAILED:
        return "loop"
    # The inputs first: cheap, and below the threshold the module tree is not walked again.
    if _positions_per_task(inputs) >= LOOP_MIN_POSITIONS and _has_convolutions(module):
        return "loop"
    return "vmap"


def vmap_or_loop(module: nn.Module, run_vmap: Callable[[], Any], run_loop: Callable[[], Any], *,
                 may_fall_back: bool) -> tuple[Any, str]:
    """``(run_vmap(), "vmap")``; where vmap raises a ``RuntimeError`` and ``may_fall_back``
    (``strategy="auto"``), ``(run_loop(), "loop")`` instead, with a warning, and "auto" runs
    ``module`` in the loop from then on (:func:`resolve_strategy`). Every pass that
    "auto" may send to vmap (the inner loop, MAML's query forward) goes through here, so a
    model vmap cannot run (data-dependent control flow, say) never fails under "auto"."""
    try:
        return run_vmap(), "vmap"
    except RuntimeError as vmap_error:
        if not may_fall_back:
            raise
        # The loop raises the same error if it was not vmap's: the user's error wins.
        result = run_loop()
        _VMAP_FAILED[module] = str(vmap_error)
        warnings.warn(
            f"vmap cannot run {type(module).__name__} ({vmap_error}); strategy='auto' uses "
            "'loop' for this model from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return result, "loop"


def _positions_per_task(inputs: Sequence[Any]) -> int:
    """The largest ``n × prod(spatial)`` among CPU image inputs ``[T, n, C, *spatial]``, 0 if
    there are none (the size rule of :func:`resolve_strategy` was measured on the CPU only).

    Every tensor of 4 or more dimensions is read as ``[T, n, C, *spatial]``: Conv1d's
    ``[T, n, C, L]`` counts ``n × L`` (not measured), and a model that adds the channel
    dimension itself (inputs ``[T, n, H, W]``) is undercounted (``n × W``) and keeps vmap."""
    largest = 0
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 4 and x.device.type == "cpu":
            largest = max(largest, x.shape[1] * math.prod(x.shape[3:]))
    return largest


def check_steps(steps: Any, name: str) -> int:
    """``steps`` if it is a non-negative int (a number of inner steps), else ``ValueError``
    naming ``name``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{name} must be a non-negative int, got {steps!r}")
    return steps


def _as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    return tuple(inputs)


def _check_data(
    inputs: tuple[torch.Tensor, ...], targets: torch.Tensor, tasks: int, device: torch.device
) -> None:
    named = [(f"inputs[{i}]" if len(inputs) > 1 else "inputs", x) for i, x in enumerate(inputs)]
    for name, x in [*named, ("targets", targets)]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] != tasks:
            raise ValueError(
                f"{name} must have a leading task dimension T={tasks} (as params), got shape "
                f"{list(x.shape)}"
            )
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but params is on {device}")


def _scalar(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return one scalar tensor per task, got {shape}")
    return loss


def _has_convolutions(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _structure_key(module: nn.Module) -> tuple[Any, ...]:
    """What the batched strategy depends on: which submodules there are, and the attributes
    that decide whether (and how) each can run batched."""
    return tuple((id(m), m.training, getattr(m, "track_running_stats", None),
                  getattr(m, "running_mean", None) is None, getattr(m, "groups", None),
                  getattr(m, "padding_mode", None)) for m in module.modules())


def _unsupported_cached(module: nn.Module) -> list[str]:
    """:func:`fastmeta.batched.unsupported`, recomputed only when the module's submodules or
    their train/eval modes changed (it is asked on every inner loop)."""
    key = _structure_key(module)
    cached = _SUPPORT.get(module)
    if cached is None or cached[0] != key:
        cached = _SUPPORT[module] = (key, unsupported(module))
    return cached[1]


def batched_runner(module: nn.Module, layout: FlatLayout) -> BatchedModule:
    """The (cached) :class:`~fastmeta.batched.BatchedModule` of ``module`` with ``layout``."""
    key = (id(layout), tuple(id(m) for m in module.modules()))
    cached = _RUNNERS.get(module)
    if cached is None or cached[0] != key:  # a new layout, or a submodule was replaced
        cached = _RUNNERS[module] = (key, BatchedModule(module, layout))
    return cached[1]


def task_losses(loss_fn: LossFn, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """``[T]``: ``loss_fn(outputs[t], targets[t])`` for every task.

    ``F.mse_loss`` and ``F.cross_entropy`` (themselves, with their defaults: mean reduction;
    cross-entropy only when no target is the ignored index -100) are computed for all tasks
    with plain batched ops, equal to the per-task calls up to float rounding (the sums run in
    another order); any other ``loss_fn`` in one vmapped call (a Python loop where vmap cannot
    run it). vmap costs ~0.3 ms per call here, a tenth of a whole sinusoid meta-step.
    """
    tasks = targets.shape[0]
    if loss_fn is F.mse_loss and isinstance(outputs, torch.Tensor) and (
            outputs.shape == targets.shape):
        return (outputs - targets).square().reshape(tasks, -1).mean(1)
    if (loss_fn is F.cross_entropy and isinstance(outputs, torch.Tensor) and outputs.dim() == 3
            and targets.dim() == 2 and not targets.is_floating_point()
            and not bool((targets == -100).any())):  # ignore_index would change the mean
        per_example = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]),
                                      targets.reshape(-1), reduction="none")
        return per_example.view(tasks, -1).mean(1)
    try:
        losses = torch.func.vmap(loss_fn)(outputs, targets)
    except RuntimeError:
        losses = torch.stack([_scalar(loss_fn(outputs[t], targets[t]))
                              for t in range(targets.shape[0])])
    if not isinstance(losses, torch.Tensor) or losses.shape != (targets.shape[0],):
        raise ValueError("loss_fn must return one scalar tensor per task")
    return losses


def task_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """``[T]``: each task's accuracy for class logits ``outputs [T, n, C]`` and integer labels
    ``targets [T, n]``; None for anything else (regression)."""
    if targets.is_floating_point() or outputs.dim() != 3:
        return None
    return (outputs.argmax(-1) == targets).float().mean(-1)


def _summed_task_grads(
    params: torch.Tensor,
    create_graph: bool,
    losses_of: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grads [T, N], losses [T])`` from ``losses_of(p) -> [T]`` task losses: one
    ``autograd.grad`` of their sum. Tasks are independent, so row t of that gradient is task
    t's own. First order differentiates a detached copy: no graph back to ``params``."""
    p = params if create_graph and params.requires_grad else params.detach().requires_grad_()
    losses = losses_of(p)
    (grads,) = torch.autograd.grad(losses.sum(), p, create_graph=create_graph)
    return grads, (losses if create_graph else losses.detach())


def _batched_grads(
    run: BatchedModule,
    params: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor,
    loss_fn: LossFn,
    create_graph: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _summed_task_grads(params, create_graph,
                              lambda p: task_losses(loss_fn, run(p, inputs), targets))


def _vmap_grads(
    module: nn.Module,
    layout: FlatLayout,
    params: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor,
    loss_fn: LossFn,
    create_graph: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    def task_loss(row: torch.Tensor, xs: tuple[torch.Tensor, ...], y: torch.Tensor) -> torch.Tensor:
        return _scalar(loss_fn(layout.call_unchecked(module, row, xs), y))

    # Different dropout masks per task, as the loop strategy draws them.
    grad_fn = torch.func.vmap(torch.func.grad_and_value(task_loss), randomness="different")
    # First order: no outer graph through the gradient at all, rather than one detached after.
    grads, losses = grad_fn(params if create_graph else params.detach(), inputs, targets)
    return grads, losses


def _loop_grads(
    module: nn.Module,
    layout: FlatLayout,
    params: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor,
    loss_fn: LossFn,
    create_graph: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Task by task, each gradient right after its forward, while that task's activations are
    # still in cache (conv-4 keeps ~10 MB of them per task): one autograd.grad over the sum of
    # all the task losses ran every forward first and every backward after, and the meta-step
    # was 2-4% slower than a plain per-task loop.
    p = params if create_graph and params.requires_grad else params.detach().requires_grad_()
    grads, losses = [], []
    for t, row in enumerate(p.unbind(0)):
        loss = _scalar(loss_fn(layout.call_unchecked(module, row, tuple(x[t] for x in inputs)),
                               targets[t]))
        (grad,) = torch.autograd.grad(loss, row, create_graph=create_graph)
        grads.append(grad)
        losses.append(loss if create_graph else loss.detach())
    return torch.stack(grads), torch.stack(losses)


def _mlp_loss(loss_fn: LossFn) -> str | None:
    """The :mod:`fastmeta.fused_mlp` loss that ``loss_fn`` is, if it is one: ``F.mse_loss``,
    ``F.cross_entropy``, or their modules with the default (mean) reduction and options."""
    if loss_fn is F.mse_loss or (type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean"):
        return "mse"
    if loss_fn is F.cross_entropy or (
            type(loss_fn) is nn.CrossEntropyLoss and loss_fn.reduction == "mean"
            and loss_fn.weight is None and loss_fn.label_smoothing == 0.0
            and loss_fn.ignore_index == -100):  # -100: out of range, refused by mlp_plan
        return "cross_entropy"
    return None


def mlp_plan(module: nn.Module, layout: FlatLayout, params: torch.Tensor,
             inputs: tuple[torch.Tensor, ...], targets: torch.Tensor,
             loss_fn: LossFn) -> tuple[fused_mlp.MLPSpec, str] | str:
    """``(spec, loss)`` when :mod:`fastmeta.fused_mlp` computes exactly these task gradients:
    a plain MLP (:class:`~fastmeta.fused_mlp.MLPSpec`), ``F.mse_loss`` or ``F.cross_entropy``
    (or their modules, defaults), one ``[T, B, in]`` input of the params' dtype needing no
    gradient, targets shaped like the outputs (MSE) or ``[T, B]`` class indices in range
    (cross-entropy), and no torch.func transform around. Otherwise the reason, as a string."""
    if torch._C._are_functorch_transforms_active():
        return "torch.func transforms are active"
    try:
        spec = fused_mlp.MLPSpec.of(module, layout)
    except fused_mlp.UnsupportedModel as e:
        return str(e)
    loss = _mlp_loss(loss_fn)
    if loss is None:
        return "loss_fn is not F.mse_loss or F.cross_entropy (or their modules, defaults)"
    if len(inputs) != 1:
        return "the forward takes more than one input"
    try:
        spec.check_batch(inputs[0], targets, dtype=params.dtype, device=params.device,
                         loss=loss, tasks=params.shape[0], name="the data")
    except fused_mlp.UnsupportedModel as e:
        return str(e)
    return spec, loss


def inner_loop(
    module: nn.Module,
    params: torch.Tensor,
    inputs: Inputs,
    targets: torch.Tensor,
    *,
    loss_fn: LossFn,
    step: StepFn,
    steps: int,
    state: Any = None,
    create_graph: bool = True,
    strategy: str = "auto",
    layout: FlatLayout | None = None,
) -> InnerLoopResult:
    """Runs ``steps`` differentiable update steps for every task of a ``[T, N]`` buffer.

    Args:
        module: the model; its parameters give the layout (its own values are not used).
        params: ``[T, N]`` starting point, e.g. ``layout.expand(theta, T)``.
        inputs: support inputs with a leading T dimension (a tensor, or a tuple of tensors
            passed as positional arguments of the forward).
        targets: support targets with a leading T dimension.
        loss_fn: ``loss_fn(output_t, targets_t)`` -> scalar loss of one task.
        step: ``step(params_TN, grads_TN, state, k) -> (new_params_TN, new_state)``, out of place
            and differentiable, e.g. a ``fastmeta.functional`` rule or
            ``lambda p, g, s, k: (p - 0.01 * g, s)``.
        steps: K, the number of steps (0 returns ``params`` as it is).
        state: the step function's initial state.
        create_graph: True differentiates through the gradients (second order, MAML);
            False treats them as constants (first order, FOMAML): the result still depends
            on ``params`` through the update, but not through the gradients.
        strategy: ``"mlp"``, ``"batched"``, ``"vmap"``, ``"loop"`` or ``"auto"`` (see
            :func:`resolve_strategy`). ``"auto"`` takes ``"mlp"`` where :func:`mlp_plan`
            applies: its gradients are differentiable once (second-order MAML), and a backward
            through them with ``create_graph=True`` raises; ask for ``"batched"`` to
            differentiate further.
        layout: the module's :class:`FlatLayout`, if already built.

    Returns:
        :class:`InnerLoopResult` ``(params, state, losses)``.

    Example:
        >>> import torch
        >>> from fastmeta.flat import flatten
        >>> from fastmeta.inner_loop import inner_loop
        >>> nn = torch.nn
        >>> net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        >>> layout, theta = flatten(net)
        >>> theta.requires_grad_()  # doctest: +ELLIPSIS
        tensor(...)
        >>> x, y = torch.randn(25, 10, 1), torch.randn(25, 10, 1)
        >>> out = inner_loop(net, layout.expand(theta, 25), x, y, layout=layout,
        ...                  loss_fn=torch.nn.functional.mse_loss,
        ...                  step=lambda p, g, s, k: (p - 0.01 * g, s), steps=5)
        >>> out.params.shape, out.losses.shape
        (torch.Size([25, 121]), torch.Size([5, 25]))
    """
    if layout is None:
        layout = FlatLayout.of(module)
    else:
        layout.check_module(module)
    layout.check(params, name="params")
    if params.dim() != 2:
        raise ValueError(
            f"params must have shape [T, N] with N={layout.numel} (one row per task; use "
            f"layout.expand(theta, T)), got {list(params.shape)}"
        )
    tasks = params.shape[0]
    xs = _as_tuple(inputs)
    _check_data(xs, targets, tasks, params.device)
    check_steps(steps, "steps")
    if not callable(step):
        raise TypeError(f"step must be callable, got {type(step).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    layout.check_buffers(module)
    chosen = resolve_strategy(strategy, module, create_graph=create_graph, inputs=xs)
    mlp = None
    if chosen == "mlp" or (strategy == "auto" and chosen == "batched" and steps > 0):
        mlp = mlp_plan(module, layout, params, xs, targets, loss_fn)
        if isinstance(mlp, str):
            if chosen == "mlp":
                raise ValueError(f"strategy='mlp' cannot run this inner loop: {mlp}")
            mlp = None
        else:
            chosen = "mlp"
    # Looked up once, not at every step (the lookup walks the module tree).
    run = batched_runner(module, layout) if chosen == "batched" else None

    losses = []
    for k in range(steps):
        if chosen == "vmap":
            task_args = (module, layout, params, xs, targets, loss_fn, create_graph)
            (grads, loss), chosen = vmap_or_loop(
                module, functools.partial(_vmap_grads, *task_args),
                functools.partial(_loop_grads, *task_args),
                may_fall_back=strategy == "auto" and k == 0,
            )
        elif chosen == "mlp":
            grads, loss, _ = fused_mlp.task_loss_grads(*mlp, params, xs[0], targets,
                                                       create_graph=create_graph)
        elif chosen == "batched":
            grads, loss = _batched_grads(run, params, xs, targets, loss_fn, create_graph)
        else:
            grads, loss = _loop_grads(module, layout, params, xs, targets, loss_fn, create_graph)
        losses.append(loss)
        out = step(params, grads, state, k)
        new_params = out[0] if isinstance(out, (tuple, list)) and len(out) == 2 else out
        if (
            not isinstance(out, (tuple, list))
            or len(out) != 2
            or not isinstance(new_params, torch.Tensor)
            or new_params.shape != params.shape
        ):
            got = (
                f"new_params of shape {list(new_params.shape)}"
                if isinstance(new_params, torch.Tensor) and isinstance(out, (tuple, list))
                else f"a {type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            )
            raise ValueError(
                f"step must return (new_params, new_state) with new_params of shape "
                f"{list(params.shape)}; got {got} at step {k}"
            )
        state = out[1]
        params = new_params
    loss_tk = torch.stack(losses) if losses else params.new_zeros(0, tasks)
    return InnerLoopResult(params, state, loss_tk)
