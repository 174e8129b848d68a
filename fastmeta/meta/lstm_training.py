"""Meta-training the LSTM rule by truncated backpropagation through the optimizee's training.

An optimizee family gives a batch of B problems with parameters ``θ [B, n]`` and per-problem
losses ``f_b(θ_b)``. The rule (:class:`~fastmeta.meta.LSTMOptimizer`) optimizes all of them at
once, every coordinate of every problem being one row of the rule's batch. The meta-loss of an
unroll of T steps from θ_0 is the sum of the optimizee losses after each update (Andrychowicz
et al. 2016, eq. 3, with all weights w_t = 1), so every update, the last one included, gets a
training signal:

.. math::
    \\mathcal{L}(\\phi) = \\sum_{t=1}^{T} \\frac{1}{B} \\sum_b f_b(\\theta_{b,t}), \\qquad
    \\theta_{t+1} = \\theta_t + \\mathrm{rule}_\\phi(\\nabla f(\\theta_t))

Training runs ``horizon`` optimizee steps (100), split into truncations of ``unroll`` steps
(20): after each truncation the meta-gradient of that truncation's loss updates the rule with
Adam, and θ and the LSTM state are carried on, detached. With ``second_order=False`` (the
paper's choice) the optimizee gradients are treated as constants, dropping the second
derivatives ∂²f/∂θ².

The meta-gradient only ever needs the rule's first derivatives (w.r.t. its weights, its state,
and with ``second_order=True`` its gradient input, through which ∂²f/∂θ² enters), so it runs on
the fused backward of :func:`fastmeta.ops.lstm_rule.lstm_rule` when the rule's ``impl`` allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from fastmeta.meta.lstm_optimizer import LSTMOptimizer
from fastmeta.ops.lstm_rule import LSTMState

#: ``(meta_loss, losses) -> (meta_loss, mean_loss)``: see :func:`meta_epoch`.
GradientReducer = Callable[[torch.Tensor, torch.Tensor], tuple[float, float]]

__all__ = [
    "DigitsMLPProblems",
    "NonFiniteMetaLoss",
    "QuadraticProblems",
    "UnrollResult",
    "meta_epoch",
    "meta_train",
    "unroll",
]

# Andrychowicz et al. 2016, section 3.1: 10-dimensional quadratics.
QUADRATIC_DIM = 10
# Section 3.2 (MNIST): one hidden layer of 20 sigmoid units, minibatches of 128.
MLP_HIDDEN = 20
MLP_BATCH = 128


class QuadraticProblems:
    """A batch of B random quadratics f_b(θ) = ||W_b θ − y_b||², W_b ``[n, n]`` and y_b
    ``[n]`` with i.i.d. standard Gaussian entries, started from θ_0 ~ N(0, I).

    Args:
        batch: B, the number of functions.
        dim: n (10 in the paper).
        generator: the source of W, y and θ_0.
        dtype: of everything.
    """

    def __init__(self, batch: int, dim: int = QUADRATIC_DIM, *,
                 generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        self.W = torch.randn(batch, dim, dim, generator=generator, dtype=dtype)
        self.y = torch.randn(batch, dim, generator=generator, dtype=dtype)
        self.theta0 = torch.randn(batch, dim, generator=generator, dtype=dtype)

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """``[B]``: f_b(θ_b) for θ ``[B, n]``."""
        residual = torch.bmm(self.W, theta.unsqueeze(-1)).squeeze(-1) - self.y
        return residual.square().sum(-1)


class DigitsMLPProblems:
    """A batch of B small MLPs (64 → 20 sigmoid → 10) classifying scikit-learn's 8x8 digits
    with cross-entropy; each :meth:`loss` call draws a fresh minibatch of 128 images per MLP
    (the paper's MNIST optimizee, on data that ships with scikit-learn).

    θ_b is the MLP's parameters flattened as ``[W1 (20x64), b1, W2 (10x20), b2]`` (n = 1,510),
    initialised as ``nn.Linear`` does (uniform in ±1/√fan_in). All B MLPs run in one batched
    forward (``baddbmm``).

    Args:
        batch: B, the number of MLPs.
        generator: the source of the initialisations and of every minibatch.
        images, labels: the data (default: all 1,797 digits, pixels in [0, 1]).
    """

    def __init__(self, batch: int, *, generator: torch.Generator | None = None,
                 images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 minibatch: int = MLP_BATCH) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        if images is None or labels is None:
            from fastmeta.tasks.digits import load_digit_images

            by_digit = load_digit_images()
            images = torch.cat([by_digit[d].reshape(-1, 64) for d in sorted(by_digit)])
            labels = torch.cat([torch.full((len(by_digit[d]),), d) for d in sorted(by_digit)])
        self.images, self.labels = images.reshape(len(images), -1), labels
        self.generator = generator if generator is not None else torch.Generator()
        self.minibatch = minibatch
        features = self.images.shape[1]
        self.sizes = [(MLP_HIDDEN, features), (MLP_HIDDEN,), (10, MLP_HIDDEN), (10,)]
        fan_ins = [features, features, MLP_HIDDEN, MLP_HIDDEN]  # of the layer each piece is in
        pieces = []
        for shape, fan_in in zip(self.sizes, fan_ins):
            numel = shape[0] * (shape[1] if len(shape) == 2 else 1)
            uniform = torch.rand(batch, numel, generator=self.generator) * 2 - 1
            pieces.append(uniform / fan_in ** 0.5)
        self.theta0 = torch.cat(pieces, dim=1)

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """``[B]``: each MLP's cross-entropy on its own fresh minibatch."""
        return self.loss_on(theta, self.draw_minibatches(theta.shape[0]))

    def draw_minibatches(self, batch: int) -> torch.Tensor:
        """``[batch, m]``: image indices of a fresh minibatch for each of ``batch`` MLPs, from
        the generator (what each :meth:`loss` call draws)."""
        return torch.randint(len(self.images), (batch, self.minibatch), generator=self.generator)

    def loss_on(self, theta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``[B]``: each MLP's cross-entropy on the images ``index [B, m]``."""
        batch = theta.shape[0]
        x, y = self.images[index], self.labels[index]  # [B, m, 64], [B, m]
        w1, b1, w2, b2 = torch.split(theta, [s[0] * (s[1] if len(s) == 2 else 1)
                                             for s in self.sizes], dim=1)
        h = torch.sigmoid(torch.baddbmm(b1.unsqueeze(1), x,
                                        w1.view(batch, *self.sizes[0]).transpose(1, 2)))
        logits = torch.baddbmm(b2.unsqueeze(1), h, w2.view(batch, *self.sizes[2]).transpose(1, 2))
        per_example = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), y.reshape(-1),
                                                        reduction="none")
        return per_example.view(batch, -1).mean(1)


class UnrollResult(NamedTuple):
    """What :func:`unroll` returns."""

    #: () Σ_{t=1..T} mean_b f_b(θ_t), the losses after each update (differentiable w.r.t.
    #: the rule).
    meta_loss: torch.Tensor
    #: [B, n] the parameters after the unroll.
    theta: torch.Tensor
    #: the rule's state after the unroll.
    state: LSTMState | None
    #: [steps, B] each problem's loss before each step (detached).
    losses: torch.Tensor


def unroll(rule: LSTMOptimizer, loss_fn: Callable[[torch.Tensor], torch.Tensor],
           theta: torch.Tensor, state: LSTMState | None, steps: int, *,
           second_order: bool = False) -> UnrollResult:
    """``steps`` rule steps on a batch of problems, differentiable w.r.t. the rule's weights.

    Args:
        rule: the learned rule.
        loss_fn: ``θ [B, n] -> [B]`` losses of the B problems.
        theta: ``[B, n]`` starting parameters.
        state: the rule's state for the ``B·n`` coordinates (None: zeros).
        steps: the number of optimizee steps.
        second_order: differentiate through the optimizee gradients (otherwise they are
            constants, as in the paper).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if theta.dim() != 2:
        raise ValueError(f"theta must be [B, n], got {list(theta.shape)}")
    # The optimizee gradients need autograd even when the caller runs without it.
    with torch.enable_grad():
        if not theta.requires_grad:
            theta = theta.detach().requires_grad_()
        meta_loss = theta.new_zeros(())
        losses = []
        for _ in range(steps):
            loss = loss_fn(theta)
            if loss.shape != theta.shape[:1]:
                raise ValueError(f"loss_fn must return one loss per problem [B], got "
                                 f"{list(loss.shape)}")
            # retain_graph: the meta-loss backpropagates through this loss's graph later.
            (grad,) = torch.autograd.grad(loss.sum(), theta, create_graph=second_order,
                                          retain_graph=True)
            if not second_order:
                grad = grad.detach()
            update, state = rule(grad.reshape(-1), state)
            theta = theta + update.view_as(theta)
            if losses:  # f(θ_0) does not depend on this unroll's updates
                meta_loss = meta_loss + loss.mean()
            losses.append(loss.detach())
        meta_loss = meta_loss + loss_fn(theta).mean()  # f(θ_T): the last update's signal
    return UnrollResult(meta_loss, theta, state, torch.stack(losses))


def outer_lr_at(epoch: int, lr: float, decay_epoch: int | None, decay_factor: float) -> float:
    """The outer Adam's learning rate in meta-epoch ``epoch`` (from 0): ``lr``, times
    ``decay_factor`` from ``decay_epoch`` on (a single step decay; None: never)."""
    return lr * decay_factor if decay_epoch is not None and epoch >= decay_epoch else lr


def set_outer_lr(outer: torch.optim.Optimizer, epoch: int, lr: float, decay_epoch: int | None,
                 decay_factor: float) -> None:
    """Sets :func:`outer_lr_at` on every group of ``outer``, at the start of each epoch (so a
    run resumed from a checkpoint, whose optimizer state holds an older lr, agrees)."""
    for group in outer.param_groups:
        group["lr"] = outer_lr_at(epoch, lr, decay_epoch, decay_factor)


def check_lr_decay(decay_epoch: object, decay_factor: object) -> None:
    """Raises ValueError unless ``decay_epoch`` is None or an int >= 1 and ``decay_factor`` a
    number in (0, 1]."""
    if decay_epoch is not None and (isinstance(decay_epoch, bool)
                                    or not isinstance(decay_epoch, int) or decay_epoch < 1):
        raise ValueError(f"outer_lr_decay_epoch must be None or an int >= 1, got "
                         f"{decay_epoch!r}")
    if (isinstance(decay_factor, bool) or not isinstance(decay_factor, (int, float))
            or not 0 < decay_factor <= 1):
        raise ValueError(f"outer_lr_decay_factor must be a number in (0, 1], got "
                         f"{decay_factor!r}")


def meta_train(rule: LSTMOptimizer,
               make_problems: Callable[[torch.Generator], QuadraticProblems | DigitsMLPProblems],
               *, epochs: int, horizon: int = 100, unroll_steps: int = 20, lr: float = 1e-3,
               lr_decay_epoch: int | None = None, lr_decay_factor: float = 1.0,
               second_order: bool = False, seed: int = 0,
               on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Meta-trains ``rule`` in place by truncated BPTT; returns each epoch's mean loss.

    Each epoch samples fresh problems (``make_problems(generator)``), optimizes them for
    ``horizon`` steps in truncations of ``unroll_steps``, and after each truncation takes one
    Adam step on the rule's weights, at ``lr`` (times ``lr_decay_factor`` from epoch
    ``lr_decay_epoch`` on, see :func:`outer_lr_at`).
    """
    check_lr_decay(lr_decay_epoch, lr_decay_factor)
    for name, value in (("epochs", epochs), ("horizon", horizon), ("unroll_steps", unroll_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if horizon % unroll_steps:
        raise ValueError(f"horizon ({horizon}) must be a multiple of unroll_steps "
                         f"({unroll_steps})")
    from fastmeta.optim import Adam  # the optim layer sits above this module's imports

    generator = torch.Generator().manual_seed(seed)
    outer = Adam(rule.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        set_outer_lr(outer, epoch, lr, lr_decay_epoch, lr_decay_factor)
        history.append(meta_epoch(rule, outer, make_problems(generator), horizon=horizon,
                                  unroll_steps=unroll_steps, second_order=second_order))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    return history


class NonFiniteMetaLoss(FloatingPointError):
    """A truncation's meta-loss was not finite; the rule was not updated on it."""

    def __init__(self, truncation: int) -> None:
        super().__init__(f"the meta-loss is not finite at truncation {truncation}; the rule "
                         "was not updated")
        self.truncation = truncation


def meta_epoch(rule: LSTMOptimizer, outer: torch.optim.Optimizer,
               problems: QuadraticProblems | DigitsMLPProblems, *, horizon: int,
               unroll_steps: int, second_order: bool = False,
               reduce_gradients: GradientReducer | None = None) -> float:
    """One meta-epoch of truncated BPTT: optimizes ``problems`` for ``horizon`` steps, and after
    each truncation of ``unroll_steps`` takes one ``outer`` step on the rule's weights. Returns
    the mean optimizee loss over the epoch's steps.

    Args:
        reduce_gradients: called after each truncation's backward, before the outer step, as
            ``reduce_gradients(meta_loss, losses) -> (meta_loss, mean_loss)``: it may replace
            the rule's gradients (a distributed run sums them over the processes, see
            :mod:`fastmeta.distributed`) and returns the meta-loss and mean optimizee loss to
            use (the whole batch's). The finiteness check then reads its meta-loss, so that
            every process stops together.

    Raises:
        NonFiniteMetaLoss: a truncation's meta-loss is not finite; the rule is left as it was
            before that truncation (no step on a NaN gradient).
    """
    truncations = horizon // unroll_steps
    theta, state, total = problems.theta0, None, 0.0
    for t in range(truncations):
        result = unroll(rule, problems.loss, theta, state, unroll_steps,
                        second_order=second_order)
        outer.zero_grad()
        if reduce_gradients is None:
            if not torch.isfinite(result.meta_loss):
                raise NonFiniteMetaLoss(t + 1)
            result.meta_loss.backward()
            mean_loss = float(result.losses.mean())
        else:
            result.meta_loss.backward()
            meta_loss, mean_loss = reduce_gradients(result.meta_loss, result.losses)
            if not math.isfinite(meta_loss):
                raise NonFiniteMetaLoss(t + 1)
        outer.step()
        theta = result.theta.detach()
        state = LSTMState(*(s.detach() for s in result.state))
        total += mean_loss
    return total / truncations
