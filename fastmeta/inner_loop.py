"""K differentiable inner-loop steps for T tasks at once, on a flat ``[T, N]`` buffer.

.. math::
    \\begin{aligned}
    g^{(k)}_t &= \\nabla_\\theta \\, \\ell\\big(f(x_t; \\theta^{(k)}_t), y_t\\big) \\\\
    \\theta^{(k+1)}, s^{(k+1)} &= \\mathrm{step}\\big(\\theta^{(k)}, g^{(k)}, s^{(k)}, k\\big)
    \\end{aligned}

for every task t, with :math:`\\theta^{(k)}` the ``[T, N]`` buffer. The update is one call for
all tasks: a ``fastmeta.functional`` rule (one fused kernel) or any torch function. Only the
gradients are computed per task, with one of two strategies:

* ``"vmap"``: ``torch.func.vmap(torch.func.grad_and_value(task_loss))`` over the T rows;
* ``"loop"``: a Python loop runs the forward of each task on its row's views, then one
  ``torch.autograd.grad`` of the summed loss gives all T gradients (tasks are independent, so
  the gradient of the sum w.r.t. row t is task t's gradient).

References:
    Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks.
    ICML 2017. https://arxiv.org/abs/1703.03400 (MAML; first-order MAML is ``create_graph=False``)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, Union

import torch
from torch import nn

from fastmeta.flat import FlatLayout

__all__ = ["InnerLoopResult", "STRATEGIES", "inner_loop", "resolve_strategy"]

StepFn = Callable[[torch.Tensor, torch.Tensor, Any, int], "tuple[torch.Tensor, Any]"]
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]

STRATEGIES = ("auto", "vmap", "loop")

# Measured with benchmarks-free timing on this project's 2-core CPU dev machine (torch 2.13,
# float32, best of 5): forward of K=1 inner step + meta-backward, second order. See
# resolve_strategy for the rule these numbers give.
#   sinusoid MLP 1-40-40-1, T=25, 10-shot:  vmap  TBD ms   loop  TBD ms
#   conv net                                  vmap  TBD ms   loop  TBD ms


class InnerLoopResult(NamedTuple):
    """What :func:`inner_loop` returns."""

    #: ``[T, N]`` adapted parameters, differentiable w.r.t. the starting point.
    params: torch.Tensor
    #: the step function's state after the last step.
    state: Any
    #: ``[K, T]`` support loss of each task before each step (detached when first order).
    losses: torch.Tensor


def resolve_strategy(strategy: str, module: nn.Module, layout: FlatLayout, device: torch.device) -> str:
    """Turns ``strategy`` into ``"vmap"`` or ``"loop"`` for this model and device.

    ``"auto"`` picks TBD.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    return "vmap"


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
    if create_graph and params.requires_grad:
        p = params
    else:
        p = params.detach().requires_grad_()
    rows = p.unbind(0)
    losses = torch.stack(
        [
            _scalar(loss_fn(layout.call_unchecked(module, rows[t], tuple(x[t] for x in inputs)), targets[t]))
            for t in range(len(rows))
        ]
    )
    (grads,) = torch.autograd.grad(losses.sum(), p, create_graph=create_graph)
    return grads, (losses if create_graph else losses.detach())


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
        strategy: ``"vmap"``, ``"loop"`` or ``"auto"`` (see :func:`resolve_strategy`).
        layout: the module's :class:`FlatLayout`, if already built.

    Returns:
        :class:`InnerLoopResult` ``(params, state, losses)``.

    Example:
        >>> import torch
        >>> from fastmeta.flat import flatten
        >>> from fastmeta.inner_loop import inner_loop
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
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
    layout.check(params, name="params", tasks=params.shape[0] if isinstance(params, torch.Tensor) and params.dim() == 2 else -1)
    tasks = params.shape[0]
    xs = _as_tuple(inputs)
    _check_data(xs, targets, tasks, params.device)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not callable(step):
        raise TypeError(f"step must be callable, got {type(step).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    layout.check_buffers(module)
    chosen = resolve_strategy(strategy, module, layout, params.device)
    if chosen == "vmap" and layout.mutable_buffers == "allow" and layout.buffer_names:
        # vmap cannot write a per-task value into one shared buffer.
        from fastmeta.flat import _mutating_modules

        if _mutating_modules(module):
            raise ValueError(
                "strategy='vmap' cannot run a forward that updates buffers in place; "
                "use strategy='loop'"
            )
    grads_fn = _vmap_grads if chosen == "vmap" else _loop_grads

    losses = []
    for k in range(steps):
        grads, loss = grads_fn(module, layout, params, xs, targets, loss_fn, create_graph)
        losses.append(loss)
        new_params, state = step(params, grads, state, k)
        if not isinstance(new_params, torch.Tensor) or new_params.shape != params.shape:
            got = list(new_params.shape) if isinstance(new_params, torch.Tensor) else type(new_params).__name__
            raise ValueError(
                f"step must return (new_params, new_state) with new_params of shape "
                f"{list(params.shape)}, got {got} at step {k}"
            )
        params = new_params
    loss_tk = torch.stack(losses) if losses else params.new_zeros(0, tasks)
    return InnerLoopResult(params, state, loss_tk)
