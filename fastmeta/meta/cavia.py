"""CAVIA: fast context adaptation, on the fused task-batched update.

CAVIA splits the model's inputs in two: shared weights θ, meta-learned, and a small context
vector φ_t per task, the only thing the inner loop adapts. For a meta-batch of tasks t with
support set :math:`S_t` and query set :math:`Q_t`:

.. math::
    \\begin{aligned}
    \\phi^{(0)}_t &= 0 \\in \\mathbb{R}^d \\\\
    \\phi^{(k+1)}_t &= \\phi^{(k)}_t - \\alpha \\nabla_\\phi
        \\mathcal{L}_{S_t}\\big(\\theta, \\phi^{(k)}_t\\big) \\qquad k = 0..K-1 \\\\
    \\mathcal{L}_{meta}(\\theta)
        &= \\frac{1}{T} \\sum_t \\mathcal{L}_{Q_t}\\big(\\theta, \\phi^{(K)}_t\\big)
    \\end{aligned}

and the outer step descends :math:`\\nabla_\\theta \\mathcal{L}_{meta}`, which flows through
the inner gradients (second order) or, with ``first_order``, treats them as constants.

Because θ is the same for every task, nothing runs per task: the model sees all T tasks'
examples in one batch, each with its own row of a ``[T, d]`` context. The tasks are
independent in φ, so one ``torch.autograd.grad`` of :math:`\\sum_t \\mathcal{L}_{S_t}` w.r.t.
the ``[T, d]`` context gives every task's own gradient, and one fused
:func:`fastmeta.functional.sgd` call updates every context.

The context enters the network in one of two ways (the paper's choices):

* ``"concat"`` (regression): φ_t is appended to each input, ``model(cat(x, φ_t))``; the model's
  first layer therefore takes ``features + d`` inputs.
* ``"film"`` (classification): the model is called as ``model(x, context)`` and modulates its
  conv blocks with FiLM, as :class:`fastmeta.meta.networks.FiLMConv4` does; it must normalise
  per task, so that tasks batched together do not see each other.

References:
    Zintgraf, Shiarlis, Kurin, Hofmann, Whiteson. Fast Context Adaptation via Meta-Learning.
    ICML 2019. https://arxiv.org/abs/1810.03642 (code: github.com/lmzintgraf/cavia)
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from fastmeta import functional
from fastmeta.backends import Impl
from fastmeta.inner_loop import check_steps, task_accuracy, task_losses
from fastmeta.tasks.episodes import Episode, check_episode, check_task_batch

__all__ = ["CAVIA", "CONTEXT_MODES", "CAVIAOutput"]

#: How the context φ enters the model (see the module docstring).
CONTEXT_MODES = ("concat", "film")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CAVIAOutput(NamedTuple):
    """What :meth:`CAVIA.forward` and :meth:`CAVIA.evaluate` return."""

    #: () the mean query loss over tasks: the meta-loss (detached in :meth:`CAVIA.evaluate`).
    loss: torch.Tensor
    #: [T] each task's query loss after adaptation.
    query_losses: torch.Tensor
    #: [K, T] each task's support loss before each inner step (detached).
    support_losses: torch.Tensor
    #: [T] each task's query accuracy, for integer (class label) targets; else None.
    accuracy: torch.Tensor | None
    #: [T, d] the adapted context of each task.
    context: torch.Tensor


class CAVIA(nn.Module):
    """CAVIA (and its first-order variant) around a model that takes a per-task context.

    The meta-parameters are the model's parameters θ; pass :meth:`parameters` to the outer
    optimizer. The context is not a parameter: every call starts each task's φ from zero.

    Args:
        model: the network. With ``context_mode="concat"``, a module on ``[T, n, features + d]``
            inputs (e.g. ``MLP(in_features=1 + d)`` for the sinusoid); with ``"film"``, a conv
            network called as ``model(x [T, n, C, H, W], context [T, d])`` that declares its
            ``num_context_params`` (e.g. :class:`~fastmeta.meta.networks.FiLMConv4`). Its
            forward sees every task at once, so it must not hold BatchNorm layers (their batch
            statistics would mix the tasks).
        loss_fn: ``loss_fn(output, target)`` -> scalar loss of one task. ``F.mse_loss`` and
            ``F.cross_entropy`` (mean reduction) are computed for all tasks in one batched call;
            any other function is mapped over the tasks with ``torch.func.vmap``.
        num_context_params: d, the size of each task's context.
        context_mode: ``"concat"`` or ``"film"``.
        inner_lr: α, the inner step size.
        inner_steps: K, the inner steps taken by :meth:`forward` (evaluation may take more).
        first_order: treat the inner gradients as constants (first-order CAVIA).
        impl: the implementation of the fused context update (see :mod:`fastmeta.backends`).

    Example:
        >>> import torch
        >>> from fastmeta.meta import CAVIA, MLP
        >>> from fastmeta.optim import Adam
        >>> from fastmeta.tasks import SinusoidTasks
        >>> cavia = CAVIA(MLP(in_features=1 + 5), loss_fn=torch.nn.functional.mse_loss,
        ...               num_context_params=5)
        >>> outer = Adam(cavia.parameters(), lr=1e-3)
        >>> out = cavia(SinusoidTasks(seed=0).sample(25, shots=10))
        >>> outer.zero_grad(); out.loss.backward(); outer.step()
        >>> out.context.shape, out.support_losses.shape
        (torch.Size([25, 5]), torch.Size([1, 25]))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_fn: LossFn,
        num_context_params: int,
        context_mode: str = "concat",
        inner_lr: float = 1.0,
        inner_steps: int = 1,
        first_order: bool = False,
        impl: Impl | str = Impl.AUTO,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if (isinstance(num_context_params, bool) or not isinstance(num_context_params, int)
                or num_context_params < 1):
            raise ValueError(f"num_context_params must be an int >= 1, got "
                             f"{num_context_params!r}")
        if context_mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode must be one of {CONTEXT_MODES}, got "
                             f"{context_mode!r}")
        if (isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float))
                or not math.isfinite(inner_lr) or inner_lr < 0):
            raise ValueError(f"inner_lr must be a finite number >= 0, got {inner_lr!r}")
        check_steps(inner_steps, "inner_steps")
        if next(model.parameters(), None) is None:
            raise ValueError("model has no parameters to meta-learn")
        batch_norms = [name for name, m in model.named_modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if batch_norms:
            raise ValueError(
                f"model: CAVIA runs every task through the model in one batch, so BatchNorm "
                f"({', '.join(batch_norms)}) would normalise each task with the others' "
                "statistics; normalise per task instead (as FiLMConv4 does) or use a per-example "
                "norm (LayerNorm, GroupNorm)")
        self._in_features: int | None = None
        if context_mode == "concat":
            first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
            if first is not None:
                if first.in_features <= num_context_params:
                    raise ValueError(
                        f"num_context_params={num_context_params}: with context_mode='concat' "
                        f"the model's first Linear takes features + num_context_params inputs, "
                        f"but it takes only {first.in_features}")
                self._in_features = first.in_features
        else:
            if not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
                raise ValueError(
                    f"context_mode='film' modulates conv layers, and the model "
                    f"({type(model).__name__}) has none; use 'concat' for it, or a FiLM conv "
                    "network such as FiLMConv4")
            model_context = getattr(model, "num_context_params", None)
            if model_context is None:
                raise ValueError(
                    f"context_mode='film' needs a model called as model(x, context) that "
                    f"declares its num_context_params (such as FiLMConv4); "
                    f"{type(model).__name__} has no FiLM layers")
            if model_context != num_context_params:
                raise ValueError(
                    f"num_context_params={num_context_params} does not match the model, whose "
                    f"FiLM layers take {model_context} context parameters")
        self.model = model
        self.loss_fn = loss_fn
        self.num_context_params = num_context_params
        self.context_mode = context_mode
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.impl = impl

    # ---- the model on a batch of tasks ------------------------------------------------------

    def predict(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's output for each task's inputs ``x [T, n, ...]`` with that task's
        context ``context [T, d]``: ``[T, n, ...]``, all tasks in one forward."""
        check_task_batch(x, "x")
        tasks, d = x.shape[0], self.num_context_params
        if not isinstance(context, torch.Tensor) or tuple(context.shape) != (tasks, d):
            got = list(context.shape) if isinstance(context, torch.Tensor) else type(context)
            raise ValueError(f"context must be [T, num_context_params] = [{tasks}, {d}], got "
                             f"{got}")
        if self.context_mode == "film":
            return self.model(x, context)
        if x.dim() != 3:
            raise ValueError(f"context_mode='concat' appends the context to feature vectors: x "
                             f"must be [T, n, features], got {list(x.shape)}")
        if self._in_features is not None and x.shape[-1] + d != self._in_features:
            raise ValueError(
                f"num_context_params={d}: the model's first Linear takes {self._in_features} "
                f"inputs, but the data has {x.shape[-1]} features and {x.shape[-1]} + {d} != "
                f"{self._in_features}")
        inputs = torch.cat([x, context.unsqueeze(1).expand(tasks, x.shape[1], d)], dim=-1)
        return self.model(inputs)

    def task_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[T]``: ``loss_fn`` of each task's ``outputs [T, n, ...]`` against its targets
        (see :func:`fastmeta.inner_loop.task_losses`)."""
        return task_losses(self.loss_fn, outputs, targets)

    # ---- adaptation --------------------------------------------------------------------------

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        *,
        steps: int | None = None,
        create_graph: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapts a zero context to every task of a support set; θ is not changed.

        Args:
            support_x, support_y: ``[T, S, ...]`` support inputs and targets.
            steps: inner steps (default: ``inner_steps``).
            create_graph: differentiate through the inner gradients (default: not
                ``first_order``). False still keeps the context differentiable w.r.t. θ through
                the query forward, as first-order CAVIA needs.

        Returns:
            ``(context [T, d], support_losses [K, T])``, the losses detached.
        """
        steps = self.inner_steps if steps is None else check_steps(steps, "steps")
        if create_graph is None:
            create_graph = not self.first_order
        check_task_batch(support_x, "support_x")
        tasks = support_x.shape[0]
        p = next(self.model.parameters())
        context = torch.zeros(tasks, self.num_context_params, dtype=p.dtype, device=p.device,
                              requires_grad=True)
        losses = []
        for _ in range(steps):
            loss = self.task_losses(self.predict(context, support_x), support_y)
            # Σ_t L_t: row t of its gradient is task t's own gradient (the tasks share no φ).
            (grad,) = torch.autograd.grad(loss.sum(), context, create_graph=create_graph)
            context, _ = functional.sgd(context, grad, lr=self.inner_lr,
                                        first_order=not create_graph, impl=self.impl)
            losses.append(loss.detach())
        support_losses = (torch.stack(losses) if losses else
                          torch.empty(0, tasks, dtype=p.dtype, device=p.device))
        return context, support_losses

    def _query(self, context: torch.Tensor,
               episode: Episode) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = self.predict(context, episode.query_x)
        return self.task_losses(outputs, episode.query_y), task_accuracy(outputs,
                                                                         episode.query_y)

    def forward(self, episode: Episode, *, steps: int | None = None) -> CAVIAOutput:
        """The meta-loss of a meta-batch: adapt each task's context on its support set, then
        the mean query loss. ``output.loss.backward()`` gives the meta-gradient of θ."""
        check_episode(episode)
        context, support_losses = self.adapt(episode.support_x, episode.support_y, steps=steps)
        losses, accuracy = self._query(context, episode)
        return CAVIAOutput(losses.mean(), losses, support_losses, accuracy, context)

    def evaluate(self, episode: Episode, *, steps: int | None = None) -> CAVIAOutput:
        """Adapts (first order: no graph to θ is kept) and measures the query loss and accuracy
        of each task. Everything returned is detached; the model's parameters get no
        gradient."""
        check_episode(episode)
        with torch.enable_grad():
            context, support_losses = self.adapt(episode.support_x, episode.support_y,
                                                 steps=steps, create_graph=False)
        context = context.detach()
        with torch.no_grad():
            losses, accuracy = self._query(context, episode)
        return CAVIAOutput(losses.mean(), losses, support_losses, accuracy, context)

    def extra_repr(self) -> str:
        return (f"num_context_params={self.num_context_params}, "
                f"context_mode={self.context_mode!r}, inner_lr={self.inner_lr}, "
                f"inner_steps={self.inner_steps}, first_order={self.first_order}")

