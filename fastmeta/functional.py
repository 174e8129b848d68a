"""Stateless, out-of-place, differentiable optimizer steps for meta-learning.

Every function here takes ``(params, grads, state)`` and returns ``(new_params, new_state)``;
nothing is modified in place, and the result is differentiable (to second order) with respect
to the params, the gradients, the state and every hyperparameter given as a tensor. That is
what MAML-style inner loops and learned hyperparameters need.

``params`` is one of

* a flat tensor ``[N]`` (one task),
* a task-batched tensor ``[T, N]``: one fused kernel call updates every task,
* a list of tensors of any shapes (one task); the list is concatenated into one buffer for the
  kernel, and the same structure is returned.

The state has the params' structure; ``None`` starts from zero. The fast path is a flat or
task-batched buffer: there, a chain of steps saves only the gradients (and the params under
weight decay) between forward and backward, because the backward recomputes the optimizer state
(see :mod:`fastmeta.ops.tensor_lists`).

Hyperparameters are keyword-only numbers or tensors. ``lr`` may be a number, a () tensor,
``[T]`` (one per task), or ``[N]``/``[T, N]`` (one per parameter, as in Meta-SGD; for a list
of params, a list of tensors shaped like them). The other hyperparameters may be numbers, ()
tensors or ``[T]`` tensors.

``first_order=True`` treats the gradients as constants (FOMAML): no graph is kept through them,
and nothing extra is saved. ``impl`` picks the implementation (:mod:`fastmeta.backends`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Union

import torch

from fastmeta.backends import Impl, resolve
from fastmeta.ops.adagrad import adagrad_step
from fastmeta.ops.adam import adam_step
from fastmeta.ops.rmsprop import rmsprop_step
from fastmeta.ops.sgd import sgd_step
from fastmeta.ops.tensor_lists import is_zero

__all__ = [
    "AdagradState",
    "AdamState",
    "MomentumState",
    "RmspropState",
    "adagrad",
    "adam",
    "adamw",
    "momentum",
    "rmsprop",
    "sgd",
]

Params = Union[torch.Tensor, Sequence[torch.Tensor]]
Hyper = Union[float, torch.Tensor]
LearningRate = Union[float, torch.Tensor, Sequence[torch.Tensor]]


class MomentumState(NamedTuple):
    """State of :func:`momentum`: the momentum buffer, shaped like the params."""

    momentum_buffer: Params


class AdamState(NamedTuple):
    """State of :func:`adam`/:func:`adamw`: steps taken and the two moments."""

    step: int
    exp_avg: Params
    exp_avg_sq: Params


class AdagradState(NamedTuple):
    """State of :func:`adagrad`: steps taken and the running sum of squared gradients."""

    step: int
    state_sum: Params


class RmspropState(NamedTuple):
    """State of :func:`rmsprop`; ``momentum_buffer``/``grad_avg`` are None when unused."""

    square_avg: Params
    momentum_buffer: Params | None
    grad_avg: Params | None


_SHARED_ARGS = """params: ``[N]``, ``[T, N]`` or a list of tensors.
        grads: the gradients of a loss at ``params``, in the same structure.
        state: the previous step's state, or None to start from zero."""
_SHARED_KEYWORDS = """first_order: treat ``grads`` as constants (FOMAML): no graph through them.
        impl: which implementation runs; see :mod:`fastmeta.backends`."""


def _doc(fn):
    fn.__doc__ = fn.__doc__.replace("{shared_args}", _SHARED_ARGS).replace(
        "{shared_keywords}", _SHARED_KEYWORDS)
    return fn


# ---- Structure: one flat buffer for the kernels, the caller's structure back --------------


class _Layout:
    """Concatenates a list of tensors into one ``[N]`` buffer and splits results back."""

    def __init__(self, params: Sequence[torch.Tensor], op: str):
        if len(params) == 0:
            raise ValueError(f"{op}: params is an empty list")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{op}: params[{i}] must be a tensor, got {type(p).__name__}")
        self.op = op
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]

    def flat(self, name: str, tensors: Sequence[torch.Tensor] | None) -> torch.Tensor | None:
        if tensors is None:
            return None
        if isinstance(tensors, torch.Tensor) or len(tensors) != len(self.shapes):
            got = "a tensor" if isinstance(tensors, torch.Tensor) else f"{len(tensors)} tensors"
            raise ValueError(f"{self.op}: {name} must be a list of {len(self.shapes)} tensors "
                             f"like params, got {got}")
        for i, (t, shape) in enumerate(zip(tensors, self.shapes)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{self.op}: {name}[{i}] must be a tensor, got "
                                f"{type(t).__name__}")
            if t.shape != shape:
                raise ValueError(f"{self.op}: {name}[{i}] has shape {tuple(t.shape)} but "
                                 f"params[{i}] has shape {tuple(shape)}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def split(self, flat: torch.Tensor | None) -> list[torch.Tensor] | None:
        if flat is None:
            return None
        return [t.view(shape) for t, shape in zip(flat.split(self.numels), self.shapes)]


def _structure(op: str, params: Params):
    """``(layout, flat_params)``; the layout is None for a tensor (used as it is)."""
    if isinstance(params, torch.Tensor):
        return None, params
    layout = _Layout(params, op)
    return layout, layout.flat("params", params)


def _flat(layout, name, tensors):
    return tensors if layout is None else layout.flat(name, tensors)


def _unflat(layout, tensor):
    return tensor if layout is None else layout.split(tensor)


def _lr(layout, lr: LearningRate):
    if layout is None or isinstance(lr, (torch.Tensor, float, int)):
        return lr
    return layout.flat("lr", lr)


def _grads(layout, grads, first_order: bool):
    flat = _flat(layout, "grads", grads)
    if first_order and isinstance(flat, torch.Tensor):
        flat = flat.detach()
    return flat


def _zeros(flat_params: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(flat_params, memory_format=torch.contiguous_format).detach()


# ---- The steps -----------------------------------------------------------------------------


@_doc
def sgd(
    params: Params,
    grads: Params,
    state: None = None,
    *,
    lr: LearningRate,
    weight_decay: Hyper = 0.0,
    maximize: bool = False,
    first_order: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> tuple[Params, None]:
    """Plain gradient descent, the MAML inner step.

    .. math::
        \\theta' = \\theta - \\gamma (\\pm g + \\lambda \\theta)

    Args:
        {shared_args} SGD has none: pass None.
        lr: the step size γ (per task or per element for Meta-SGD).
        weight_decay: λ.
        maximize: ascend instead of descend.
        {shared_keywords}

    Returns:
        ``(new_params, None)``.

    Example:
        >>> theta = torch.zeros(4, 10, requires_grad=True)  # 4 tasks
        >>> g = torch.ones(4, 10)
        >>> new_theta, _ = sgd(theta, g, lr=torch.tensor([0.1, 0.2, 0.3, 0.4]))
        >>> new_theta[:, 0]
        tensor([-0.1000, -0.2000, -0.3000, -0.4000], grad_fn=<SelectBackward0>)
    """
    op = "sgd"
    if state is not None:
        raise ValueError(f"{op}: plain SGD has no state; pass None")
    layout, flat = _structure(op, params)
    new, _ = sgd_step(flat, _grads(layout, grads, first_order), lr=_lr(layout, lr),
                      weight_decay=weight_decay, maximize=maximize, impl=impl)
    return _unflat(layout, new), None


@_doc
def momentum(
    params: Params,
    grads: Params,
    state: MomentumState | None = None,
    *,
    lr: LearningRate,
    momentum: Hyper = 0.9,
    dampening: Hyper = 0.0,
    nesterov: bool = False,
    weight_decay: Hyper = 0.0,
    maximize: bool = False,
    first_order: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> tuple[Params, MomentumState]:
    """SGD with (heavy-ball or Nesterov) momentum, as ``torch.optim.SGD`` defines it.

    .. math::
        \\begin{aligned}
        d &= \\pm g + \\lambda \\theta \\\\
        b' &= d \\ \\text{(first step)}, \\qquad b' = \\mu b + (1 - \\tau) d \\ \\text{(later)} \\\\
        \\theta' &= \\theta - \\gamma (d + \\mu b') \\ \\text{(Nesterov)}, \\qquad
            \\theta' = \\theta - \\gamma b' \\ \\text{(otherwise)}
        \\end{aligned}

    (Polyak, 1964; Sutskever et al., 2013, http://proceedings.mlr.press/v28/sutskever13.html.)

    Args:
        {shared_args}
        lr: the step size γ.
        momentum: μ. dampening: τ. weight_decay: λ.
        nesterov: use Nesterov momentum (needs zero dampening).
        maximize: ascend instead of descend.
        {shared_keywords}

    Returns:
        ``(new_params, MomentumState(new_momentum_buffer))``.

    Example:
        >>> theta, g = torch.zeros(10), torch.ones(10)
        >>> theta, state = momentum(theta, g, lr=0.1)
        >>> theta, state = momentum(theta, g, state, lr=0.1)
        >>> theta[0]
        tensor(-0.2900)
    """
    op = "momentum"
    if is_zero(momentum):
        raise ValueError(f"{op}: momentum must not be 0 (use sgd for plain gradient descent)")
    layout, flat = _structure(op, params)
    buffer = None
    if state is not None:
        buffer = _flat(layout, "state.momentum_buffer", state.momentum_buffer)
    new, new_buffer = sgd_step(
        flat, _grads(layout, grads, first_order), buffer, lr=_lr(layout, lr), momentum=momentum,
        dampening=dampening, nesterov=nesterov, weight_decay=weight_decay, maximize=maximize,
        impl=impl,
    )
    return _unflat(layout, new), MomentumState(_unflat(layout, new_buffer))


def _adam(op, params, grads, state, *, lr, betas, eps, weight_decay, eps_root, maximize,
          decoupled, first_order, impl):
    layout, flat = _structure(op, params)
    if state is None:
        state = AdamState(0, None, None)
    exp_avg = _flat(layout, "state.exp_avg", state.exp_avg)
    exp_avg_sq = _flat(layout, "state.exp_avg_sq", state.exp_avg_sq)
    if exp_avg is None or exp_avg_sq is None:
        # The native kernels read an absent state as zeros; on a [T, 1M] buffer allocating
        # and zeroing two states took a third of a differentiable step. The other paths get
        # real zeros.
        native_path = resolve(impl, flat.device, op=op, record=False) is Impl.NATIVE
        if not (native_path and exp_avg is None and exp_avg_sq is None):
            exp_avg = _zeros(flat) if exp_avg is None else exp_avg
            exp_avg_sq = _zeros(flat) if exp_avg_sq is None else exp_avg_sq
    beta1, beta2 = betas
    step = state.step + 1
    new, m, v = adam_step(
        flat, _grads(layout, grads, first_order), exp_avg, exp_avg_sq, step=step,
        lr=_lr(layout, lr), beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        eps_root=eps_root, maximize=maximize, decoupled_weight_decay=decoupled, impl=impl,
    )
    return _unflat(layout, new), AdamState(step, _unflat(layout, m), _unflat(layout, v))


_ADAM_MATHS = """
    .. math::
        \\begin{aligned}
        m' &= \\beta_1 m + (1 - \\beta_1) \\hat g, \\qquad
        v' = \\beta_2 v + (1 - \\beta_2) \\hat g^2 \\\\
        \\theta' &= \\tilde\\theta - \\frac{\\gamma}{1 - \\beta_1^t}
            \\frac{m'}{\\sqrt{v' / (1 - \\beta_2^t) + \\epsilon_{root}} + \\epsilon}
        \\end{aligned}
"""


@_doc
def adam(
    params: Params,
    grads: Params,
    state: AdamState | None = None,
    *,
    lr: LearningRate,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    eps_root: Hyper = 0.0,
    maximize: bool = False,
    first_order: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> tuple[Params, AdamState]:
    """Adam (Kingma & Ba, 2015, https://arxiv.org/abs/1412.6980), as ``torch.optim.Adam``.

    With ĝ = ±g + λθ (coupled weight decay) and θ̃ = θ:
    {maths}
    ``eps_root`` > 0 (optax's name) keeps the derivative of the square root finite where v' is
    0 (a zero gradient on a zero state), so meta-gradients have no NaN; 0 is torch's Adam.

    Args:
        {shared_args}
        lr: the step size γ. betas: (β1, β2). eps: ε. weight_decay: λ. eps_root: ε_root.
        maximize: ascend instead of descend.
        {shared_keywords}

    Returns:
        ``(new_params, AdamState(step, exp_avg, exp_avg_sq))``.

    Example:
        >>> theta = torch.zeros(2, 3, requires_grad=True)
        >>> new_theta, state = adam(theta, torch.ones(2, 3), lr=0.1, eps_root=1e-12)
        >>> new_theta.detach()[0]
        tensor([-0.1000, -0.1000, -0.1000])
        >>> state.step
        1
    """
    return _adam("adam", params, grads, state, lr=lr, betas=betas, eps=eps,
                 weight_decay=weight_decay, eps_root=eps_root, maximize=maximize,
                 decoupled=False, first_order=first_order, impl=impl)


@_doc
def adamw(
    params: Params,
    grads: Params,
    state: AdamState | None = None,
    *,
    lr: LearningRate,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 1e-2,
    eps_root: Hyper = 0.0,
    maximize: bool = False,
    first_order: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> tuple[Params, AdamState]:
    """AdamW (Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101), as
    ``torch.optim.AdamW``: Adam with decoupled weight decay.

    With ĝ = ±g and θ̃ = θ(1 − γλ):
    {maths}
    Args:
        {shared_args}
        lr: the step size γ. betas: (β1, β2). eps: ε. weight_decay: λ. eps_root: ε_root.
        maximize: ascend instead of descend.
        {shared_keywords}

    Returns:
        ``(new_params, AdamState(step, exp_avg, exp_avg_sq))``.

    Example:
        >>> theta = torch.ones(3)
        >>> new_theta, state = adamw(theta, torch.ones(3), lr=0.1, weight_decay=0.5)
        >>> new_theta
        tensor([0.8500, 0.8500, 0.8500])
    """
    return _adam("adamw", params, grads, state, lr=lr, betas=betas, eps=eps,
                 weight_decay=weight_decay, eps_root=eps_root, maximize=maximize,
                 decoupled=True, first_order=first_order, impl=impl)


adam.__doc__ = adam.__doc__.replace("{maths}", _ADAM_MATHS)
adamw.__doc__ = adamw.__doc__.replace("{maths}", _ADAM_MATHS)


@_doc
def rmsprop(
    params: Params,
    grads: Params,
    state: RmspropState | None = None,
    *,
    lr: LearningRate,
    alpha: Hyper = 0.99,
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    momentum: Hyper = 0.0,
    centered: bool = False,
    maximize: bool = False,
    first_order: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> tuple[Params, RmspropState]:
    """RMSprop (Hinton, Lecture 6e; Graves, 2013, https://arxiv.org/abs/1308.0850 for the
    centered form), as ``torch.optim.RMSprop``.

    .. math::
        \\begin{aligned}
        \\hat g &= \\pm g + \\lambda \\theta, \\qquad v' = \\alpha v + (1 - \\alpha) \\hat g^2 \\\\
        \\bar g' &= \\alpha \\bar g + (1 - \\alpha) \\hat g, \\quad
            \\delta = \\sqrt{v' - \\bar g'^2} + \\epsilon \\ \\text{(centered)}, \\qquad
            \\delta = \\sqrt{v'} + \\epsilon \\ \\text{(otherwise)} \\\\
        b' &= \\mu b + \\hat g / \\delta, \\ \\theta' = \\theta - \\gamma b' \\ (\\mu > 0),
            \\qquad \\theta' = \\theta - \\gamma \\hat g / \\delta \\ \\text{(otherwise)}
        \\end{aligned}

    Args:
        {shared_args}
        lr: the step size γ. alpha: α. eps: ε. weight_decay: λ. momentum: μ.
        centered: normalise by the variance estimate instead of the second moment.
        maximize: ascend instead of descend.
        {shared_keywords}

    Returns:
        ``(new_params, RmspropState(square_avg, momentum_buffer, grad_avg))``.

    Example:
        >>> theta, state = rmsprop(torch.zeros(3), torch.ones(3), lr=0.01, alpha=0.75)
        >>> theta
        tensor([-0.0200, -0.0200, -0.0200])
    """
    op = "rmsprop"
    layout, flat = _structure(op, params)
    if state is None:
        state = RmspropState(None, None, None)
    has_momentum = not is_zero(momentum)
    square_avg = _flat(layout, "state.square_avg", state.square_avg)
    buffer = _flat(layout, "state.momentum_buffer", state.momentum_buffer)
    grad_avg = _flat(layout, "state.grad_avg", state.grad_avg)
    square_avg = _zeros(flat) if square_avg is None else square_avg
    if has_momentum and buffer is None:
        buffer = _zeros(flat)
    if centered and grad_avg is None:
        grad_avg = _zeros(flat)
    new, v, b, a = rmsprop_step(
        flat, _grads(layout, grads, first_order), square_avg, buffer if has_momentum else None,
        grad_avg if centered else None, lr=_lr(layout, lr), alpha=alpha, eps=eps,
        weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize,
        impl=impl,
    )
    return _unflat(layout, new), RmspropState(_unflat(layout, v), _unflat(layout, b),
                                              _unflat(layout, a))


@_doc
def adagrad(
    params: Params,
    grads: Params,
    state: AdagradState | None = None,
    *,
    lr: LearningRate,
    lr_decay: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    eps: Hyper = 1e-10,
    initial_accumulator_value: float = 0.0,
    maximize: bool = False,
    first_order: bool = False,
    impl: Impl | str = Impl.AUTO,
) -> tuple[Params, AdagradState]:
    """Adagrad (Duchi et al., 2011, https://jmlr.org/papers/v12/duchi11a.html), as
    ``torch.optim.Adagrad``.

    .. math::
        \\begin{aligned}
        \\hat g &= \\pm g + \\lambda \\theta, \\qquad s' = s + \\hat g^2 \\\\
        \\theta' &= \\theta - \\frac{\\gamma}{1 + (t - 1) \\eta}
            \\frac{\\hat g}{\\sqrt{s'} + \\epsilon}
        \\end{aligned}

    Args:
        {shared_args}
        lr: the step size γ. lr_decay: η. weight_decay: λ. eps: ε.
        initial_accumulator_value: the starting value of s when ``state`` is None.
        maximize: ascend instead of descend.
        {shared_keywords}

    Returns:
        ``(new_params, AdagradState(step, state_sum))``.

    Example:
        >>> theta, state = adagrad(torch.zeros(3), torch.full((3,), 2.0), lr=0.5)
        >>> theta
        tensor([-0.5000, -0.5000, -0.5000])
    """
    op = "adagrad"
    layout, flat = _structure(op, params)
    if state is None:
        state = AdagradState(0, None)
    state_sum = _flat(layout, "state.state_sum", state.state_sum)
    if state_sum is None:
        state_sum = _zeros(flat).fill_(initial_accumulator_value)
    step = state.step + 1
    new, new_sum = adagrad_step(
        flat, _grads(layout, grads, first_order), state_sum, step=step, lr=_lr(layout, lr),
        lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize, impl=impl,
    )
    return _unflat(layout, new), AdagradState(step, _unflat(layout, new_sum))
