"""MAML, first-order MAML and Meta-SGD on the fused, task-batched inner loop.

For a meta-batch of tasks t with support set :math:`S_t` and query set :math:`Q_t`:

.. math::
    \\begin{aligned}
    \\theta^{(0)}_t &= \\theta \\\\
    \\theta^{(k+1)}_t &= \\mathrm{step}\\big(\\theta^{(k)}_t,
        \\nabla \\mathcal{L}_{S_t}(\\theta^{(k)}_t); \\alpha\\big) \\qquad k = 0..K-1 \\\\
    \\mathcal{L}_{meta}(\\theta, \\alpha)
        &= \\frac{1}{T} \\sum_t \\mathcal{L}_{Q_t}(\\theta^{(K)}_t)
    \\end{aligned}

The K steps of all T tasks run on one ``[T, N]`` buffer (:func:`fastmeta.inner_loop.inner_loop`),
each step one fused ``fastmeta.functional`` update. MAML differentiates through the inner
gradients (second order); first-order MAML treats them as constants; Meta-SGD learns one inner
learning rate per parameter, α ∈ R^N, jointly with θ. The outer step is any optimizer on
:meth:`MAML.parameters` (``fastmeta.optim.Adam`` in the paper's setting).

References:
    Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks.
    ICML 2017. https://arxiv.org/abs/1703.03400 (MAML and first-order MAML)
    Li, Zhou, Chen, Li. Meta-SGD: Learning to Learn Quickly for Few-Shot Learning. 2017.
    https://arxiv.org/abs/1707.09835
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Union

import torch
from torch import nn

from fastmeta import functional, fused_mlp
from fastmeta.backends import Impl
from fastmeta.flat import FlatLayout
from fastmeta.inner_loop import (
    as_step,
    batched_runner,
    check_steps,
    inner_loop,
    mlp_plan,
    resolve_strategy,
    task_accuracy,
    task_losses,
    vmap_or_loop,
)
from fastmeta.tasks.episodes import Episode, check_episode, check_task_batch

__all__ = ["INNER_OPTIMIZERS", "MAML", "MetaOutput"]

#: The inner update rules by name: each is a differentiable ``fastmeta.functional`` step.
INNER_OPTIMIZERS: dict[str, Callable[..., Any]] = {
    "sgd": functional.sgd,
    "momentum": functional.momentum,
    "adam": functional.adam,
    "adamw": functional.adamw,
    "rmsprop": functional.rmsprop,
    "adagrad": functional.adagrad,
}
LEARN_INNER_LR = (False, "scalar", "per_param")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Rule = Union[str, Callable[..., Any]]


class MetaOutput(NamedTuple):
    """What :meth:`MAML.forward` and :meth:`MAML.evaluate` return."""

    #: () the mean query loss over tasks: the meta-loss (detached in :meth:`MAML.evaluate`).
    loss: torch.Tensor
    #: [T] each task's query loss after adaptation.
    query_losses: torch.Tensor
    #: [K, T] each task's support loss before each inner step.
    support_losses: torch.Tensor
    #: [T] each task's query accuracy, for integer (class label) targets; else None.
    accuracy: torch.Tensor | None
    #: [T, N] the adapted parameters (fast weights).
    params: torch.Tensor


class MAML(nn.Module):
    """MAML / first-order MAML / Meta-SGD around any functionally callable ``nn.Module``.

    The meta-parameters are ``model``'s parameters (θ) and, with ``learn_inner_lr``, the inner
    learning rate (α); pass :meth:`parameters` to the outer optimizer.

    Args:
        model: the network. Its forward must run under ``torch.func.functional_call``, and must
            not update buffers in place (use BatchNorm with ``track_running_stats=False``, the
            transductive setting of MAML, or ``model.eval()``).
        loss_fn: ``loss_fn(output, target)`` -> scalar loss of one task, e.g.
            ``torch.nn.functional.mse_loss`` or ``torch.nn.functional.cross_entropy``.
        inner_lr: the inner step size α (the initial value when learned).
        inner_steps: K, the inner steps taken by :meth:`forward` (evaluation may take more).
        first_order: True is first-order MAML: the inner gradients are constants.
        inner_optimizer: a name in :data:`INNER_OPTIMIZERS` (called with ``first_order`` and
            ``impl`` too), or a ``fastmeta.functional``-style rule
            ``rule(params, grads, state, *, lr, **inner_kwargs) -> (params, state)``.
        inner_kwargs: other hyperparameters of the inner rule (e.g. ``betas``; for Adam, an
            ``eps_root`` > 0 keeps second-order meta-gradients finite where a gradient is
            exactly 0).
        learn_inner_lr: ``False`` (fixed α), ``"scalar"`` (one learned α) or ``"per_param"``
            (Meta-SGD: one learned α per parameter element).
        strategy: how the inner loop computes per-task gradients: ``"auto"``, ``"mlp"``,
            ``"batched"``, ``"vmap"`` or ``"loop"`` (see
            :func:`fastmeta.inner_loop.resolve_strategy`); under ``"auto"`` a plain MLP with
            ``F.mse_loss`` or ``F.cross_entropy`` gets its gradients (and the query loss) by
            hand, :mod:`fastmeta.fused_mlp`, and a convolutional model runs the inner loop and
            the query forward each under vmap or in the loop by the size of its inputs.
        impl: the implementation of the fused inner update (see :mod:`fastmeta.backends`).

    Example:
        >>> import torch
        >>> from fastmeta.meta import MAML, MLP
        >>> from fastmeta.optim import Adam
        >>> from fastmeta.tasks import SinusoidTasks
        >>> maml = MAML(MLP(), loss_fn=torch.nn.functional.mse_loss, inner_lr=0.01)
        >>> outer = Adam(maml.parameters(), lr=1e-3)
        >>> episode = SinusoidTasks(seed=0).sample(25, shots=10)
        >>> out = maml(episode)
        >>> outer.zero_grad(); out.loss.backward(); outer.step()
        >>> out.query_losses.shape, out.support_losses.shape
        (torch.Size([25]), torch.Size([1, 25]))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_fn: LossFn,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        inner_optimizer: Rule = "sgd",
        inner_kwargs: Mapping[str, Any] | None = None,
        learn_inner_lr: bool | str = False,
        strategy: str = "auto",
        impl: Impl | str = Impl.AUTO,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        check_steps(inner_steps, "inner_steps")
        if isinstance(inner_optimizer, str):
            if inner_optimizer not in INNER_OPTIMIZERS:
                raise ValueError(f"inner_optimizer must be one of {sorted(INNER_OPTIMIZERS)} or "
                                 f"a callable, got {inner_optimizer!r}")
            self._rule = INNER_OPTIMIZERS[inner_optimizer]
        elif callable(inner_optimizer):
            self._rule = inner_optimizer
        else:
            raise TypeError(f"inner_optimizer must be a name or a callable, got "
                            f"{type(inner_optimizer).__name__}")
        if learn_inner_lr not in LEARN_INNER_LR or learn_inner_lr is True:
            raise ValueError(f"learn_inner_lr must be one of {LEARN_INNER_LR}, got "
                             f"{learn_inner_lr!r}")
        if "lr" in (inner_kwargs or {}):
            raise ValueError("pass the inner learning rate as inner_lr, not in inner_kwargs")
        # Raises here, with the ways out, for a model whose forward would mutate buffers.
        self.layout = FlatLayout.of(model)
        self.model = model
        self.loss_fn = loss_fn
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.inner_optimizer = inner_optimizer
        self.inner_kwargs = dict(inner_kwargs or {})
        self.learn_inner_lr = learn_inner_lr
        self.strategy = strategy
        self.impl = impl
        resolve_strategy(strategy, model, create_graph=not first_order)  # fail early
        p = next(model.parameters())
        if learn_inner_lr == "scalar":
            self.inner_lr = nn.Parameter(torch.tensor(float(inner_lr), dtype=p.dtype,
                                                      device=p.device))
        elif learn_inner_lr == "per_param":
            self.inner_lr = nn.Parameter(torch.full((self.layout.numel,), float(inner_lr),
                                                    dtype=p.dtype, device=p.device))
        else:
            self.inner_lr = float(inner_lr)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> MAML:
        # .to() / .double() / .cuda() change the parameters' dtype or device: re-record them.
        super()._apply(fn, *args, **kwargs)
        self.layout = FlatLayout.of(self.model)
        return self

    # ---- the meta-parameters as one flat buffer ---------------------------------------------

    def flat_params(self) -> torch.Tensor:
        """θ as a differentiable ``[N]`` buffer (a concatenation of the model's parameters)."""
        self.layout.check_module(self.model)
        return torch.cat([p.reshape(-1) for p in self.model.parameters()])

    def _step_fn(self, *, detach: bool = False) -> Callable[..., Any]:
        lr = self.inner_lr
        if detach and isinstance(lr, torch.Tensor):
            lr = lr.detach()
        if isinstance(self.inner_optimizer, str):  # the fastmeta.functional keywords
            return as_step(self._rule, lr=lr, first_order=self.first_order, impl=self.impl,
                           **self.inner_kwargs)
        return as_step(self._rule, lr=lr, **self.inner_kwargs)

    # ---- adaptation --------------------------------------------------------------------------

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        *,
        steps: int | None = None,
        create_graph: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapts θ to every task of a support set.

        Args:
            support_x, support_y: ``[T, S, ...]`` support inputs and targets.
            steps: inner steps (default: ``inner_steps``).
            create_graph: differentiate through the inner gradients (default: not
                ``first_order``). False still keeps the result differentiable w.r.t. θ and a
                learned α through the updates, as first-order MAML needs.

        Returns:
            ``(params [T, N], support_losses [K, T])``.
        """
        if create_graph is None:
            create_graph = not self.first_order
        return self._adapt(support_x, support_y, steps, create_graph, detach=False)

    def _adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None,
               create_graph: bool, *, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
        steps = self.inner_steps if steps is None else check_steps(steps, "steps")
        check_task_batch(support_x, "support_x")
        tasks = support_x.shape[0]
        if detach:  # evaluation: no graph back to the meta-parameters at all
            start = self.layout.expand(self.flat_params().detach(), tasks)
        else:
            start = self.layout.stack(self.model, tasks)
        out = inner_loop(self.model, start, support_x, support_y, loss_fn=self.loss_fn,
                         step=self._step_fn(detach=detach), steps=steps,
                         create_graph=create_graph, strategy=self.strategy, layout=self.layout)
        return out.params, out.losses

    def predict(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's output for each task's inputs ``x [T, n, ...]`` with that task's
        parameters ``params [T, N]``: ``[T, n, ...]``."""
        check_task_batch(x, "x")
        self.layout.check(params, name="params", tasks=x.shape[0])
        return self._predict(params, x, self._query_strategy(x))

    def _query_strategy(self, x: torch.Tensor) -> str:
        # Resolved as the inner loop's strategy is, but on the query inputs: the query set is
        # often the larger one, and under "auto" its size may send a convolutional model to
        # the loop where the support set stays with vmap, or the reverse (see
        # fastmeta.inner_loop.LOOP_MIN_POSITIONS; on conv-4 with 75 queries per task a vmapped
        # query forward made the meta-step 2x slower than the loop, 2189 vs 1081 ms). Only first
        # derivatives are taken through the query forward, so vmap would be right here for
        # every layer, but the norm-layer rule (second order through affine norms) is applied
        # as in the inner loop, evaluation included, because it was the faster choice: with the
        # query under vmap, second-order conv-4 steps with BN (T=8, 8x8 and 28x28, 1-15 queries
        # per class) took 0.92-1.18x the time, and evaluate() (T=100, 8x8) 1.41x.
        return resolve_strategy(self.strategy, self.model, create_graph=not self.first_order,
                                inputs=(x,))

    def _predict(self, params: torch.Tensor, x: torch.Tensor, chosen: str) -> torch.Tensor:
        if chosen in ("batched", "mlp"):  # a plain MLP's forward alone: the batched runner
            return batched_runner(self.model, self.layout)(params, x)
        if chosen == "vmap":
            def call(row: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
                return self.layout.call_unchecked(self.model, row, (xt,))

            outputs, _ = vmap_or_loop(
                self.model, lambda: torch.func.vmap(call, randomness="different")(params, x),
                lambda: self._predict(params, x, "loop"), may_fall_back=self.strategy == "auto")
            return outputs
        return torch.stack([self.layout.call_unchecked(self.model, params[t], (x[t],))
                            for t in range(x.shape[0])])

    def _query(self, params: torch.Tensor, episode: Episode) -> tuple[torch.Tensor, ...]:
        if self.strategy in ("auto", "mlp") and torch.is_grad_enabled() and params.requires_grad:
            # A plain MLP's query loss by hand too: one autograd node whose backward is
            # ℓ̄·∇ℓ, instead of the batched forward's ~15 nodes.
            plan = mlp_plan(self.model, self.layout, params, (episode.query_x,),
                            episode.query_y, self.loss_fn)
            if not isinstance(plan, str):
                _, losses, outputs = fused_mlp.task_loss_grads(
                    *plan, params, episode.query_x, episode.query_y, create_graph=True)
                return losses, task_accuracy(outputs, episode.query_y)
            if self.strategy == "mlp":
                raise ValueError(f"strategy='mlp' cannot run the query loss: {plan}")
        outputs = self._predict(params, episode.query_x, self._query_strategy(episode.query_x))
        return (task_losses(self.loss_fn, outputs, episode.query_y),
                task_accuracy(outputs, episode.query_y))

    def forward(self, episode: Episode, *, steps: int | None = None) -> MetaOutput:
        """The meta-loss of a meta-batch: adapt on each support set, then the mean query loss.

        ``output.loss.backward()`` gives the meta-gradient of θ (and of a learned α).
        """
        check_episode(episode)
        params, support_losses = self.adapt(episode.support_x, episode.support_y, steps=steps)
        losses, accuracy = self._query(params, episode)
        return MetaOutput(losses.mean(), losses, support_losses, accuracy, params)

    def evaluate(self, episode: Episode, *, steps: int | None = None) -> MetaOutput:
        """Adapts (without a graph to θ) and measures the query loss and accuracy of each task.

        Everything returned is detached; the model's parameters get no gradient.
        """
        check_episode(episode)
        with torch.enable_grad():
            params, support_losses = self._adapt(episode.support_x, episode.support_y, steps,
                                                 create_graph=False, detach=True)
        params = params.detach()
        with torch.no_grad():
            losses, accuracy = self._query(params, episode)
        return MetaOutput(losses.mean(), losses, support_losses.detach(), accuracy, params)

    def extra_repr(self) -> str:
        name = self.inner_optimizer if isinstance(self.inner_optimizer, str) else getattr(
            self.inner_optimizer, "__name__", "custom")
        return (f"inner_optimizer={name!r}, inner_steps={self.inner_steps}, "
                f"first_order={self.first_order}, learn_inner_lr={self.learn_inner_lr!r}, "
                f"strategy={self.strategy!r}")

