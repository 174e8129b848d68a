"""Learning SGD's hyperparameters: unrolled, gradient-based HPO, and Optuna as the baseline.

The hyperparameters are those of SGD with momentum and weight decay, as ``torch.optim.SGD``
defines them: one learning rate :math:`\\gamma_l` per layer :math:`l` (a layer is a module
that owns parameters: its weight and bias share one lr), one momentum :math:`\\mu` and one
weight decay :math:`\\lambda`. One *training run* trains a fresh model for ``task.steps``
minibatch steps with fixed hyperparameters; its score is the validation loss at the end.

**Hypergradients through unrolled training** (Maclaurin et al., 2015,
https://arxiv.org/abs/1502.03492; truncated as in Shaban et al., 2019,
https://arxiv.org/abs/1810.10667). The hyperparameters are a smooth function of an
unconstrained vector :math:`z = (z_1..z_L, z_\\mu, z_\\lambda)` that keeps them inside the
search space's box :math:`[a, b]` (:class:`Reparametrization`):

.. math::
    \\begin{aligned}
    \\log \\gamma_l &= \\log a_\\gamma + (\\log b_\\gamma - \\log a_\\gamma)\\,\\sigma(z_l), \\qquad
    \\mu = a_\\mu + (b_\\mu - a_\\mu)\\,\\sigma(z_\\mu), \\\\
    \\log \\lambda &= \\log a_\\lambda
        + (\\log b_\\lambda - \\log a_\\lambda)\\,\\sigma(z_\\lambda).
    \\end{aligned}

A hyper-step runs K training steps from the carried state :math:`(\\theta_0, b_0)`, with the
fused, differentiable momentum step of :func:`fastmeta.functional.momentum` on the flat
parameter buffer (the per-layer lr expanded to a per-element lr; for an MLP the K steps are one
autograd node, with the training gradients and their second-order terms written by hand in
:mod:`fastmeta.fused_mlp`, and for a ReLU MLP on the CPU that node's forward and backward are
one native call each, ``csrc/mlp.h``),

.. math::
    \\begin{aligned}
    d_k &= \\nabla_\\theta \\ell(\\theta_{k-1}; B_k) + \\lambda \\theta_{k-1}, \\qquad
    b_k = \\mu b_{k-1} + d_k \\ (b_1 = d_1 \\text{ on a fresh run}), \\qquad
    \\theta_k = \\theta_{k-1} - \\gamma \\odot b_k,
    \\end{aligned}

then takes the validation loss :math:`V(z) = \\ell(\\theta_K; D_{val})` and its exact
gradient :math:`\\nabla_z V` by reverse mode through all K steps (second order: through the
training gradients too). ``fastmeta.optim.Adam`` steps :math:`z`; :math:`(\\theta_K, b_K)` are
carried, detached, into the next hyper-step (truncation). After ``task.steps`` steps the model
starts again from a fresh initialisation, and every such round ends with a plain training run
of the current hyperparameters, scored like an Optuna trial. A non-finite validation loss or
hypergradient skips the hyper-step, halves the hyper learning rate and restarts the round.

**Baselines** (:func:`optuna_search`): Optuna's TPE, CMA-ES and random search over the same box
(log-uniform lr and weight decay, uniform momentum); one trial is one training run.

Example:
    >>> from fastmeta import hpo
    >>> task = hpo.digits_mlp_task(seed=0, steps=40)
    >>> result = hpo.hypergrad_search(task, max_runs=3, seed=0)
    >>> result.training_runs >= 3
    True
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fastmeta.functional as FF
from fastmeta._autograd import Function
from fastmeta.backends import Impl
from fastmeta.flat import FlatLayout
from fastmeta.fused_mlp import MLPSpec, UnsupportedModel
from fastmeta.ops import tensor_lists as tl
from fastmeta.ops.mlp_unroll import NativeMLPUnroll
from fastmeta.ops.sgd import SGD_RULE, prepare_sgd_step
from fastmeta.optim import SGD, Adam

__all__ = [
    "METHODS",
    "OPTUNA_METHODS",
    "HPOTask",
    "Reparametrization",
    "RunResult",
    "SGDHyperparameters",
    "SearchResult",
    "SearchSpace",
    "digits_mlp_task",
    "hypergrad_search",
    "layer_groups",
    "optuna_search",
    "plot_histories",
    "search",
    "train_run",
    "unrolled_validation_loss",
    "unrolled_validation_loss_reference",
]

#: What ``pip install`` adds the Optuna baselines (and CMA-ES's ``cmaes`` backend).
HPO_EXTRA = 'pip install "fastmeta[hpo]"'
OPTUNA_METHODS = ("tpe", "cmaes", "random")
METHODS = ("hypergrad", *OPTUNA_METHODS)
#: Training steps per hyper-step: the truncation length K of the issue.
DEFAULT_UNROLL = 20
#: Adam's lr on z: Adam moves z by about 0.05 per step, so log γ by at most
#: 0.05 · log(b/a) / 4 ≈ 0.12 per hyper-step on the default box. In a 20 s search on
#: digits-mlp (seed 0) the lrs went from 0.05 to about 0.4 in 28 rounds, without diverging.
DEFAULT_HYPER_LR = 0.05
#: Where the hypergradient search starts: a common hand-picked SGD setting.
DEFAULT_INITIAL = {"lr": 0.05, "momentum": 0.5, "weight_decay": 1e-4}
# The digits split, in fractions of the 1,797 images: train / validation / (the rest) test.
DIGITS_TRAIN_FRACTION, DIGITS_VAL_FRACTION = 0.6, 0.2
# load_digits stores pixel intensities as integers 0..16.
DIGITS_PIXEL_MAX = 16.0


# ---- Hyperparameters, their box and their reparametrization --------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """The box every method searches: ``(low, high)`` for each hyperparameter.

    lr and weight decay are searched on a log scale, so their lows must be positive.
    """

    lr: tuple[float, float] = (1e-4, 1.0)
    momentum: tuple[float, float] = (0.0, 0.99)
    weight_decay: tuple[float, float] = (1e-6, 1e-1)

    def __post_init__(self) -> None:
        for name in ("lr", "momentum", "weight_decay"):
            low, high = getattr(self, name)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"SearchSpace.{name} must be a finite (low, high) with "
                                 f"low < high, got ({low}, {high})")
        if self.lr[0] <= 0 or self.weight_decay[0] <= 0:
            raise ValueError("SearchSpace: lr and weight_decay are searched on a log scale, so "
                             f"their lows must be > 0, got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}")
        if self.momentum[0] < 0 or self.momentum[1] >= 1:
            raise ValueError(f"SearchSpace.momentum must lie in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class SGDHyperparameters:
    """SGD's hyperparameters: one lr per layer, one momentum, one weight decay."""

    lr: tuple[float, ...]
    momentum: float
    weight_decay: float

    def check(self, layers: int, space: SearchSpace | None = None, *,
              interior: bool = False) -> None:
        """Raises ``ValueError`` naming the first hyperparameter out of its valid range.

        Args:
            layers: how many lrs the model needs.
            space: also require every value inside this box.
            interior: require the open box (the reparametrization cannot reach its edges).
        """
        if len(self.lr) != layers:
            raise ValueError(f"lr has {len(self.lr)} value(s) but the model has {layers} layers "
                             "(one lr per layer)")
        for i, lr in enumerate(self.lr):
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"lr[{i}] must be a finite number > 0, got {lr}")
        if not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got "
                             f"{self.weight_decay}")
        if space is None:
            return
        values = [(f"lr[{i}]", v, space.lr) for i, v in enumerate(self.lr)]
        values += [("momentum", self.momentum, space.momentum),
                   ("weight_decay", self.weight_decay, space.weight_decay)]
        for name, v, (low, high) in values:
            inside = low < v < high if interior else low <= v <= high
            if not inside:
                edge = "strictly inside" if interior else "inside"
                why = (" (the hypergradient method reparametrizes through a sigmoid, which "
                       "never reaches the edges)" if interior else "")
                raise ValueError(f"{name}={v} must lie {edge} the search space "
                                 f"[{low}, {high}]{why}")

    def as_dict(self) -> dict[str, Any]:
        return {"lr": list(self.lr), "momentum": self.momentum,
                "weight_decay": self.weight_decay}


class Reparametrization:
    """The map from an unconstrained ``[L + 2]`` vector z to hyperparameters in the box.

    See the module docstring for the maths: a sigmoid squashes each coordinate into the box,
    on a log scale for the lrs and the weight decay, so every z is valid and the gradient
    w.r.t. z is that of the hyperparameters times the sigmoid's slope.
    """

    def __init__(self, layers: int, space: SearchSpace | None = None) -> None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.layers = layers
        self.space = space or SearchSpace()

    def _log_box(self, name: str) -> tuple[float, float]:
        low, high = getattr(self.space, name)
        return math.log(low), math.log(high)

    def encode(self, hp: SGDHyperparameters, *, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
        """z with ``decode(z) == hp``; hp must lie strictly inside the box."""
        hp.check(self.layers, self.space, interior=True)
        lo, hi = self._log_box("lr")
        units = [(math.log(v) - lo) / (hi - lo) for v in hp.lr]
        m_lo, m_hi = self.space.momentum
        units.append((hp.momentum - m_lo) / (m_hi - m_lo))
        lo, hi = self._log_box("weight_decay")
        units.append((math.log(hp.weight_decay) - lo) / (hi - lo))
        return torch.logit(torch.tensor(units, dtype=torch.float64)).to(dtype)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lr [L], momentum (), weight_decay ())``, differentiable w.r.t. z."""
        if z.shape != (self.layers + 2,):
            raise ValueError(f"z must have shape [{self.layers + 2}], got {list(z.shape)}")
        u = torch.sigmoid(z)
        lo, hi = self._log_box("lr")
        lr = torch.exp(lo + (hi - lo) * u[: self.layers])
        m_lo, m_hi = self.space.momentum
        momentum = m_lo + (m_hi - m_lo) * u[self.layers]
        lo, hi = self._log_box("weight_decay")
        weight_decay = torch.exp(lo + (hi - lo) * u[self.layers + 1])
        # exp(log b) may round one ulp past b; the clamp only removes that rounding (its
        # gradient is 1 inside the closed box, where the sigmoid already saturates).
        return (lr.clamp(*self.space.lr), momentum.clamp(*self.space.momentum),
                weight_decay.clamp(*self.space.weight_decay))

    def hyperparameters(self, z: torch.Tensor) -> SGDHyperparameters:
        """The decoded values as plain numbers."""
        with torch.no_grad():
            lr, momentum, weight_decay = self.decode(z)
        return SGDHyperparameters(tuple(float(v) for v in lr), float(momentum),
                                  float(weight_decay))


# ---- Tasks ---------------------------------------------------------------------------------


Split = tuple[torch.Tensor, torch.Tensor]


@dataclass
class HPOTask:
    """A classification problem to tune SGD on: data splits, a model, a training-run length.

    Attributes:
        name: shown in reports.
        make_model: builds a fresh model (called under a seeded RNG).
        train, val, test: ``(inputs, integer labels)``.
        steps: minibatch steps of one training run.
        batch_size: examples per minibatch.
    """

    name: str
    make_model: Callable[[], nn.Module]
    train: Split
    val: Split
    test: Split
    steps: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and "
                             f"{self.batch_size}")
        if self.batch_size > len(self.train[1]):
            raise ValueError(f"batch_size {self.batch_size} exceeds the {len(self.train[1])} "
                             "training examples")

    def model(self, seed: int) -> nn.Module:
        """A fresh model initialised from ``seed`` (torch's global RNG is left untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.make_model()

    def batches(self, seed: int) -> Iterator[torch.Tensor]:
        """Endless minibatch indices: shuffled epochs, the incomplete last batch dropped."""
        generator = torch.Generator().manual_seed(seed)
        n = len(self.train[1])
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - self.batch_size + 1, self.batch_size):
                yield order[start:start + self.batch_size]


def load_digits_split(seed: int = 0) -> tuple[Split, Split, Split]:
    """scikit-learn's 1,797 bundled 8x8 digits as ``[n, 64]`` float32 in [0, 1], shuffled by
    ``seed`` and split 60/20/20 into train, validation and test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the digits task needs scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / DIGITS_PIXEL_MAX
    y = torch.as_tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(DIGITS_TRAIN_FRACTION * len(y))
    n_val = int(DIGITS_VAL_FRACTION * len(y))
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    return tuple((x[i], y[i]) for i in parts)  # type: ignore[return-value]


def digits_mlp_task(seed: int = 0, *, steps: int = 200, batch_size: int = 128,
                    hidden: int = 100) -> HPOTask:
    """``digits-mlp``: a 64-``hidden``-10 ReLU MLP on the digits (two layers, so two lrs).

    The default run, 200 steps of 128, is about 24 epochs of the 1,078 training images.
    """
    train, val, test = load_digits_split(seed)

    def make_model() -> nn.Module:
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    return HPOTask("digits-mlp", make_model, train, val, test, steps=steps,
                   batch_size=batch_size)


TASKS: dict[str, Callable[..., HPOTask]] = {"digits-mlp": digits_mlp_task}


def layer_groups(module: nn.Module) -> list[list[str]]:
    """Parameter names grouped by the module that owns them (``"0.weight"``, ``"0.bias"`` ->
    layer ``"0"``), in ``named_parameters()`` order: one lr per group."""
    groups: dict[str, list[str]] = {}
    for name, _ in module.named_parameters():
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    return list(groups.values())


def _layer_index(layout: FlatLayout, groups: list[list[str]]) -> torch.Tensor:
    """``[N]`` long: the layer of every element of the flat buffer."""
    layer_of = {name: i for i, names in enumerate(groups) for name in names}
    return torch.cat([torch.full((e.numel,), layer_of[e.name], dtype=torch.long)
                      for e in layout.entries])


def _validation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The objective of every method (module-level so tests can make it fail)."""
    return F.cross_entropy(logits, labels)


# ---- One training run with fixed hyperparameters -------------------------------------------


@dataclass
class RunResult:
    """The end of one training run: validation loss (None if not finite) and test accuracy."""

    val_loss: float | None
    test_accuracy: float | None


def train_run(task: HPOTask, hp: SGDHyperparameters, *, seed: int,
              impl: Impl | str = Impl.AUTO) -> RunResult:
    """Trains a fresh model (init and minibatch order from ``seed``) for ``task.steps`` steps of
    ``fastmeta.optim.SGD``, one param group per layer, and scores it.

    Raises:
        ValueError: a hyperparameter out of its valid range.
    """
    model = task.model(seed)
    groups = layer_groups(model)
    hp.check(len(groups))
    params = dict(model.named_parameters())
    opt = SGD([{"params": [params[n] for n in names], "lr": lr}
               for names, lr in zip(groups, hp.lr)],
              lr=hp.lr[0], momentum=hp.momentum, weight_decay=hp.weight_decay, impl=impl)
    x, y = task.train
    batches = task.batches(seed + 1)
    for _ in range(task.steps):
        idx = next(batches)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        val = float(_validation_loss(model(task.val[0]), task.val[1]))
        if not math.isfinite(val):
            return RunResult(None, None)
        accuracy = float((model(task.test[0]).argmax(1) == task.test[1]).float().mean())
    return RunResult(val, accuracy)


# ---- Unrolled training: the fused path and its eager reference -----------------------------


def unrolled_validation_loss(
    model: nn.Module,
    layout: FlatLayout,
    theta: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    weight_decay: torch.Tensor,
    batches: Sequence[Split],
    val: Split,
    *,
    impl: Impl | str = Impl.AUTO,
    fused_model: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K = ``len(batches)`` differentiable momentum-SGD steps on the flat buffer, each with the
    fused kernels of :func:`fastmeta.functional.momentum`, then the validation loss.

    Two paths compute the same thing. For a plain MLP (an ``nn.Sequential`` of ``nn.Linear``
    with ReLU/tanh/sigmoid between them, see :class:`fastmeta.fused_mlp.MLPSpec`) the K steps
    are one autograd node: the training gradients and, in the backward, the Hessian-vector
    products they need are computed by hand (:mod:`fastmeta.fused_mlp`), with no per-step
    autograd graph; with ReLU (or no activation), float32/float64 CPU tensors, equal batches
    and the native kernels, the node's K steps and its backward are each one native call
    (``csrc/mlp.h``, matrix products on torch's BLAS). That node is differentiable
    once: a backward through it with ``create_graph=True`` raises. Any other model runs one
    :func:`fastmeta.functional.momentum` call per step on the gradient from
    ``torch.autograd.grad(..., create_graph=True)``, which is differentiable to any order.
    The validation loss is ordinary autograd on both paths.

    Args:
        model: the module ``layout`` describes (its parameters are not used).
        theta: ``[N]`` parameters at the start; give it ``requires_grad`` only if the
            gradient w.r.t. θ_0 is wanted (on the MLP path it costs one more Hessian-vector
            product).
        momentum_buffer: ``[N]``, or None at the start of a run (torch's first step).
        lr: ``[N]``, one lr per element (see :class:`Reparametrization` and
            :func:`layer_groups` for the per-layer expansion), or a number.
        momentum, weight_decay: () tensors, or numbers.
        batches: the K training minibatches.
        val: the validation set.
        impl: the implementation of the fused steps.
        fused_model: None takes the MLP path wherever it applies (for the model, and for
            batches of ``[B, in]`` inputs, needing no gradient, with int64 labels in range);
            True requires it; False never takes it.

    Returns:
        ``(validation loss, θ_K, b_K)``, differentiable w.r.t. every tensor input.

    Raises:
        fastmeta.fused_mlp.UnsupportedModel: ``fused_model=True`` and the MLP path does not
            apply; the message says why.
    """
    spec = _fused_mlp_spec(model, layout, batches, fused_model)
    if spec is not None:
        theta, buffer = _unrolled_mlp(spec, layout, theta, momentum_buffer, lr, momentum,
                                      weight_decay, batches, impl)
        val_loss = _validation_loss(layout.call_unchecked(model, theta, (val[0],)), val[1])
        return val_loss, theta, buffer
    state = None if momentum_buffer is None else FF.MomentumState(momentum_buffer)
    if not theta.requires_grad:  # autograd.grad needs it; θ̄_0 itself is then never formed
        theta = theta.detach().requires_grad_()
    for x, y in batches:
        loss = F.cross_entropy(layout.call_unchecked(model, theta, (x,)), y)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta, state = FF.momentum(theta, grad, state, lr=lr, momentum=momentum,
                                   weight_decay=weight_decay, impl=impl)
    val_loss = _validation_loss(layout.call_unchecked(model, theta, (val[0],)), val[1])
    return val_loss, theta, state.momentum_buffer


def _fused_mlp_spec(model: nn.Module, layout: FlatLayout, batches: Sequence[Split],
                    fused_model: bool | None) -> MLPSpec | None:
    """The MLP whose training :func:`_unrolled_mlp` runs, or None for the per-step path."""
    if fused_model is not None and not isinstance(fused_model, bool):
        raise TypeError(f"fused_model must be None, True or False, got {fused_model!r}")
    if fused_model is False:
        return None
    try:
        if torch._C._are_functorch_transforms_active():
            raise UnsupportedModel("torch.func transforms are active (the fused unroll is a "
                                   "once-differentiable autograd.Function)")
        spec = MLPSpec.of(model, layout)
        if not batches:
            raise UnsupportedModel("there are no training batches")
        names = [f"batches[{k}]" for k in range(len(batches))]
        for (x, y), name in zip(batches, names):
            spec.check_batch(x, y, dtype=layout.dtype, device=layout.device, name=name,
                             check_range=False)
        spec.check_class_range([y for _, y in batches], names)
    except UnsupportedModel as e:
        if fused_model:
            raise UnsupportedModel(f"unrolled_validation_loss: fused_model=True but {e}") from e
        return None
    return spec


@dataclass(frozen=True)
class _UnrollPlan:
    """The non-tensor inputs of :class:`_UnrolledMLP`."""

    spec: MLPSpec
    batches: tuple[Split, ...]
    first: tl.StepConfig  # step 1's (without a buffer when the run starts here)
    later: tl.StepConfig

    def config(self, k: int) -> tl.StepConfig:
        return self.first if k == 0 else self.later


def _unrolled_mlp(spec: MLPSpec, layout: FlatLayout, theta: torch.Tensor,
                  buffer: torch.Tensor | None, lr, momentum, weight_decay,
                  batches: Sequence[Split], impl: Impl | str):
    """Validates the hyperparameters as :func:`fastmeta.functional.momentum` does, builds the
    two step configurations once, and applies :class:`_UnrolledMLP`: ``(θ_K, b_K)``."""
    op = "momentum"
    layout.check(theta, name="theta", tasks=0)
    if tl.is_zero(momentum):  # as fastmeta.functional.momentum
        raise ValueError(f"{op}: momentum must not be 0 (use sgd for plain gradient descent)")
    # The training gradients are made inside the unroll; θ stands in for them in the checks.
    first, hypers = prepare_sgd_step(op, theta, theta, buffer, lr=lr, weight_decay=weight_decay,
                                     momentum=momentum, impl=impl)
    later = first
    if buffer is None:  # steps after the first carry a buffer
        later = first.with_states((True,))
    plan = _UnrollPlan(spec, tuple(batches), first, later)
    return _UnrolledMLP.apply(plan, theta, buffer, *hypers)


def _reference_step_vjp(cfg: tl.StepConfig, theta, grad, buffer, hypers, grad_outputs,
                        needs):
    """The VJP of one momentum step of the reference implementation: autograd of the
    reference step, ``[θ̄, ḡ, b̄, *hyperparameter gradients]``."""
    return tl.reference_vjp(SGD_RULE, cfg, theta, grad, [buffer], [h.detach() for h in hypers],
                             grad_outputs, needs, theta.shape)


class _UnrolledMLP(Function):
    """K momentum-SGD training steps of an MLP (:class:`fastmeta.fused_mlp.MLPSpec`) as one
    autograd node: ``(plan, θ_0, b_0 or None, *tensor hyperparameters) -> (θ_K, b_K)``.

    Forward, for k = 0..K-1, with no autograd graph: :math:`g_k = \\nabla \\ell(\\theta_k;
    B_k)` by hand, then the fused momentum step :math:`(\\theta_{k+1}, b_{k+1}) =
    S(\\theta_k, g_k, b_k)`; it keeps every :math:`\\theta_k, b_k, g_k` and the activations.

    Backward, for k = K-1..0, from :math:`(\\bar\\theta_{k+1}, \\bar b_{k+1})`:

    .. math::
        (\\bar\\theta^S_k, \\bar g_k, \\bar b_k, \\bar h_k) = S_k^{\\top}
            (\\bar\\theta_{k+1}, \\bar b_{k+1}), \\qquad
        \\bar\\theta_k = \\bar\\theta^S_k + H(\\theta_k)\\,\\bar g_k

    (the fused kernel's VJP, then the Hessian-vector product), and the hyperparameters'
    :math:`\\bar h_k` summed over k.

    The backward is not itself differentiable, so a backward with ``create_graph=True``
    raises at once. torch's ``@once_differentiable`` is not enough: the node it puts on the
    gradients has no edge to the inputs, so a second derivative w.r.t. z (upstream of the lr)
    never runs it, and silently lacks this node's terms.

    The trajectory (θ_k, b_k, g_k and each step's activations) lives on ``ctx``, not in
    ``save_for_backward``: it is made here, and no one else holds it.

    For a ReLU MLP on the CPU with the native kernels
    (:class:`fastmeta.ops.mlp_unroll.NativeMLPUnroll`), the loops of
    both methods are one native call each (the same maths, tested against this Python loop).
    """

    @staticmethod
    def forward(ctx, plan: _UnrollPlan, theta, buffer, *hypers):
        ctx.save_for_backward(theta, buffer, *hypers)  # inputs: autograd checks their versions
        ctx.plan = plan
        # The fused kernels with their hyperparameter table made once for the K steps (the
        # reference implementation runs tl.step_forward's reference branch instead).
        ctx.kernels = None
        if plan.first.impl is not Impl.REFERENCE:
            ctx.kernels = tl.StepKernels(SGD_RULE, plan.first, hypers, theta)
        ctx.native = NativeMLPUnroll.maybe(plan.spec, plan.batches, plan.first, plan.later,
                                           theta, buffer, ctx.kernels)
        if ctx.native is not None:  # the whole loop in one native call
            return ctx.native.forward()
        ctx.thetas, ctx.buffers, ctx.grads, ctx.tapes = [], [], [], []
        for k, (x, y) in enumerate(plan.batches):
            if k > 0:
                ctx.thetas.append(theta)
                ctx.buffers.append(buffer)
            grad, tape = plan.spec.loss_grad(theta, x, y)
            ctx.grads.append(grad)
            ctx.tapes.append(tape)
            if ctx.kernels is None:
                theta, buffer = tl.step_forward(SGD_RULE, plan.config(k), theta, grad,
                                                [buffer], hypers)
            else:
                theta, buffer = ctx.kernels.forward(plan.config(k), theta, grad, [buffer])
        return theta, buffer

    @staticmethod
    def backward(ctx, theta_bar, buffer_bar):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(
                "unrolled_validation_loss: the fused MLP unroll is differentiable once, and "
                "this backward has create_graph=True (for a second derivative); pass "
                "fused_model=False to take the per-step path, which is differentiable to any "
                "order")
        plan = ctx.plan
        theta0, buffer0, *hypers = ctx.saved_tensors
        need_theta0, need_buffer0, *need_hypers = ctx.needs_input_grad[1:]
        steps = len(plan.batches)
        kernels = ctx.kernels
        hyper_bars: list[torch.Tensor | None] = [None] * len(hypers)
        if kernels is not None:  # every step adds to these; summed once at the end
            d_lr, d_tables = kernels.new_lr_grad(), kernels.new_table_grads(steps)
        if ctx.native is not None:  # the whole reverse pass in one native call
            theta_bar, buffer_bar = ctx.native.backward(
                theta_bar, buffer_bar, d_lr, d_tables, need_theta0,
                need_buffer0 and buffer0 is not None)
        else:
            thetas, buffers = [theta0, *ctx.thetas], [buffer0, *ctx.buffers]
            for k in range(steps - 1, -1, -1):
                # θ̄_0 and b̄_0 only where asked for: at k = 0 the HVP may be skipped.
                want_theta = k > 0 or need_theta0
                want_buffer = buffers[k] is not None and (k > 0 or need_buffer0)
                needs = (want_theta, want_theta, want_buffer)
                if kernels is None:
                    d_theta, d_grad, d_buffer, *d_hypers = _reference_step_vjp(
                        plan.config(k), thetas[k], ctx.grads[k], buffers[k], hypers,
                        [theta_bar, buffer_bar], (*needs, *need_hypers))
                    for i, d in enumerate(d_hypers):
                        if d is not None:
                            hyper_bars[i] = d if hyper_bars[i] is None else hyper_bars[i].add_(d)
                else:
                    d_theta, d_grad, d_buffer = kernels.backward(
                        plan.config(k), thetas[k], ctx.grads[k], [buffers[k]],
                        [theta_bar, buffer_bar], needs, d_lr, d_tables[k])
                if want_theta:
                    # Not in place on d_theta: without weight decay it is θ̄_{k+1} itself.
                    theta_bar = plan.spec.hvp(thetas[k], ctx.tapes[k], d_grad)
                    if d_theta is not None:  # None: no θ̄_{k+1} and no weight decay
                        theta_bar.add_(d_theta)
                buffer_bar = d_buffer
        if kernels is not None:
            hyper_bars = [d if need else None for d, need in zip(
                kernels.hyper_grads(plan.later, hypers, d_lr, d_tables.sum(0)), need_hypers)]
        return (None, theta_bar if need_theta0 else None, buffer_bar if need_buffer0 else None,
                *hyper_bars)


def unrolled_validation_loss_reference(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    momentum_buffers: dict[str, torch.Tensor] | None,
    lr: dict[str, torch.Tensor],
    momentum: torch.Tensor,
    weight_decay: torch.Tensor,
    batches: Sequence[Split],
    val: Split,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`unrolled_validation_loss` in plain eager autograd: the test oracle and the
    benchmark's baseline. One tensor per parameter, ``p - lr * b`` steps, as a user would write
    it with :func:`torch.func.functional_call`.

    Args:
        params: name -> tensor (requires grad), as ``model.named_parameters()``.
        momentum_buffers: the same names, or None at the start of a run.
        lr: name -> that parameter's lr (a () tensor: its layer's).
    """
    names = list(params)
    for x, y in batches:
        loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        new_params, new_buffers = {}, {}
        for n, g in zip(names, grads):
            d = g + weight_decay * params[n]
            b = d if momentum_buffers is None else momentum * momentum_buffers[n] + d
            new_params[n] = params[n] - lr[n] * b
            new_buffers[n] = b
        params, momentum_buffers = new_params, new_buffers
    val_loss = _validation_loss(torch.func.functional_call(model, params, (val[0],)), val[1])
    return val_loss, params, momentum_buffers


# ---- Searches ------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """What one search did, for reports: the best run, its cost, and the curve.

    ``history`` holds one point per scored training run: ``{"seconds", "val_loss",
    "best_val_loss", "hyperparameters"}`` (losses None when not finite). ``training_runs``
    counts every full-length training run, including the hypergradient rounds;
    ``train_steps`` counts every training step taken, unrolled ones included.
    """

    method: str
    task: str
    seed: int
    budget_seconds: float | None
    max_runs: int | None
    best_val_loss: float | None = None
    best_hyperparameters: dict[str, Any] | None = None
    test_accuracy: float | None = None
    wall_seconds: float = 0.0
    training_runs: int = 0
    train_steps: int = 0
    nonfinite: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def record(self, started: float, hp: SGDHyperparameters, run: RunResult) -> None:
        if run.val_loss is not None and (self.best_val_loss is None
                                         or run.val_loss < self.best_val_loss):
            self.best_val_loss = run.val_loss
            self.best_hyperparameters = hp.as_dict()
            self.test_accuracy = run.test_accuracy
        if run.val_loss is None:
            self.nonfinite += 1
        self.history.append({"seconds": time.perf_counter() - started,
                             "val_loss": run.val_loss, "best_val_loss": self.best_val_loss,
                             "hyperparameters": hp.as_dict()})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check_budget(budget_seconds: float | None, max_runs: int | None) -> None:
    if budget_seconds is None and max_runs is None:
        raise ValueError("give a budget: budget_seconds, max_runs, or both")
    if budget_seconds is not None and not budget_seconds > 0:
        raise ValueError(f"budget_seconds must be > 0, got {budget_seconds}")
    if max_runs is not None and max_runs < 1:
        raise ValueError(f"max_runs must be >= 1, got {max_runs}")


def _check_hypergrad_options(unroll: int, hyper_lr: float) -> None:
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"unroll must be an int >= 1, got {unroll!r}")
    if not (math.isfinite(hyper_lr) and hyper_lr > 0):
        raise ValueError(f"hyper_lr must be a finite number > 0, got {hyper_lr}")


def _progress_line(result: SearchResult, hp: SGDHyperparameters) -> str:
    best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
    last = result.history[-1]["val_loss"] if result.history else None
    lrs = ",".join(f"{v:.3g}" for v in hp.lr)
    return (f"{result.method}: run {result.training_runs}, val loss "
            f"{'non-finite' if last is None else f'{last:.4f}'} (best {best}); lr [{lrs}] "
            f"momentum {hp.momentum:.3f} wd {hp.weight_decay:.2g}")


def hypergrad_search(
    task: HPOTask,
    *,
    budget_seconds: float | None = None,
    max_runs: int | None = None,
    seed: int = 0,
    space: SearchSpace | None = None,
    initial: SGDHyperparameters | None = None,
    unroll: int = DEFAULT_UNROLL,
    hyper_lr: float = DEFAULT_HYPER_LR,
    impl: Impl | str = Impl.AUTO,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Learns per-layer lr, momentum and weight decay by hypergradient descent through
    truncated unrolled training (see the module docstring).

    Args:
        task: what to train.
        budget_seconds: stop starting hyper-steps after this much wall time; the round in
            progress then ends with its scored run (so a search may overrun by one run).
        max_runs: at most this many training runs: the scored starting point, then a round
            and its scored run count two each.
        seed: the data order of the rounds and the init of the scored runs.
        space: the box the hyperparameters stay in.
        initial: where to start (default: lr 0.05 for every layer, momentum 0.5, weight
            decay 1e-4); must lie strictly inside ``space``.
        unroll: K, training steps per hyper-step.
        hyper_lr: the lr of ``fastmeta.optim.Adam`` on z.
        impl: the implementation of the fused steps.
        progress: called with one line of status per hyper-step and per scored run.

    Returns:
        The :class:`SearchResult`; ``notes`` has the hyper-steps taken and the final hyper lr.

    Raises:
        ValueError: a bad budget, unroll, hyper_lr, or initial hyperparameters out of range.
    """
    _check_budget(budget_seconds, max_runs)
    _check_hypergrad_options(unroll, hyper_lr)
    space = space or SearchSpace()
    template = task.model(seed)
    groups = layer_groups(template)
    if initial is None:
        initial = SGDHyperparameters((DEFAULT_INITIAL["lr"],) * len(groups),
                                     DEFAULT_INITIAL["momentum"], DEFAULT_INITIAL["weight_decay"])
    reparam = Reparametrization(len(groups), space)
    layout = FlatLayout.of(template)
    z = reparam.encode(initial, dtype=layout.dtype).requires_grad_()
    outer = Adam([z], lr=hyper_lr)
    index = _layer_index(layout, groups)
    x, y = task.train
    result = SearchResult("hypergrad", task.name, seed, budget_seconds, max_runs)
    report = progress or (lambda message: None)
    started = time.perf_counter()
    hyper_steps = 0

    def out_of_time() -> bool:
        return budget_seconds is not None and time.perf_counter() - started >= budget_seconds

    def room_for_round() -> bool:  # a round and its scored run are two training runs
        return not out_of_time() and (max_runs is None or result.training_runs + 2 <= max_runs)

    def score() -> None:
        hp = reparam.hyperparameters(z)
        result.record(started, hp, train_run(task, hp, seed=seed, impl=impl))
        result.training_runs += 1
        result.train_steps += task.steps
        report(_progress_line(result, hp))

    score()  # the starting point, so the curve starts where the search does
    round_index = 0
    while room_for_round():
        round_index += 1
        round_seed = seed * 1_000_003 + round_index
        theta = layout.flatten(task.model(round_seed))  # no θ̄_0 wanted: only z's gradient
        buffer = None
        batches = task.batches(round_seed + 1)
        done = 0
        result.training_runs += 1
        while done < task.steps and not out_of_time():
            k = min(unroll, task.steps - done)
            chunk = [(x[i], y[i]) for i in (next(batches) for _ in range(k))]
            lr, momentum, weight_decay = reparam.decode(z)
            val_loss, theta_k, buffer_k = unrolled_validation_loss(
                template, layout, theta, buffer, lr[index], momentum, weight_decay, chunk,
                task.val, impl=impl)
            (hypergrad,) = torch.autograd.grad(val_loss, z)
            done += k
            result.train_steps += k
            if not (torch.isfinite(val_loss) and torch.isfinite(hypergrad).all()):
                result.nonfinite += 1
                for group in outer.param_groups:
                    group["lr"] *= 0.5
                report(f"hypergrad: non-finite validation loss ({val_loss.item()}) after "
                       f"{done} steps of round {round_index}: hyper-step skipped, hyper lr "
                       f"halved to {outer.param_groups[0]['lr']:.3g}, round restarted")
                break
            z.grad = hypergrad
            outer.step()
            hyper_steps += 1
            theta = theta_k.detach()
            buffer = buffer_k.detach()
            if progress is not None:
                report(f"hypergrad: round {round_index}, step {done}/{task.steps}, "
                       f"unrolled val loss {val_loss.item():.4f}")
        score()
    result.wall_seconds = time.perf_counter() - started
    result.notes = {"hyper_steps": hyper_steps, "unroll": unroll, "rounds": round_index,
                    "hyper_lr_final": outer.param_groups[0]["lr"], "hyper_lr": hyper_lr,
                    "final_hyperparameters": reparam.hyperparameters(z).as_dict()}
    return result


def _import_optuna(method: str):
    try:
        import optuna
    except ImportError as e:
        raise ImportError(f"the {method!r} baseline needs Optuna, which is not installed: "
                          f"{HPO_EXTRA}") from e
    if method == "cmaes":
        try:
            import cmaes  # noqa: F401  # Optuna's CmaEsSampler imports it only when sampling
        except ImportError as e:
            raise ImportError("the 'cmaes' baseline needs the cmaes package (Optuna's CMA-ES "
                              f"backend), which is not installed: {HPO_EXTRA}") from e
    return optuna


def optuna_search(
    task: HPOTask,
    method: str,
    *,
    budget_seconds: float | None = None,
    max_runs: int | None = None,
    seed: int = 0,
    space: SearchSpace | None = None,
    impl: Impl | str = Impl.AUTO,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Optuna's TPE, CMA-ES or random search over the same box; one trial = one training run
    (:func:`train_run`, same seed as the hypergradient method's scored runs).

    A run whose validation loss is not finite is reported to Optuna as a failed trial (NaN),
    which its samplers skip, and the search goes on.

    Args:
        method: ``"tpe"``, ``"cmaes"`` or ``"random"``.
        budget_seconds, max_runs: Optuna's ``timeout`` and ``n_trials``; a started trial
            finishes, so a search may overrun by one run.
        seed: the sampler's seed and the runs' init and data order.

    Raises:
        ImportError: Optuna (or, for CMA-ES, cmaes) is missing; the message names the extra.
    """
    if method not in OPTUNA_METHODS:
        raise ValueError(f"method must be one of {OPTUNA_METHODS}, got {method!r}")
    _check_budget(budget_seconds, max_runs)
    optuna = _import_optuna(method)
    space = space or SearchSpace()
    groups = layer_groups(task.model(seed))
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our progress line replaces its log
    study = optuna.create_study(direction="minimize", sampler=samplers[method]())
    result = SearchResult(method, task.name, seed, budget_seconds, max_runs)
    report = progress or (lambda message: None)
    started = time.perf_counter()

    def objective(trial) -> float:
        hp = SGDHyperparameters(
            tuple(trial.suggest_float(f"lr_{i}", *space.lr, log=True)
                  for i in range(len(groups))),
            trial.suggest_float("momentum", *space.momentum),
            trial.suggest_float("weight_decay", *space.weight_decay, log=True))
        run = train_run(task, hp, seed=seed, impl=impl)
        result.record(started, hp, run)
        result.training_runs += 1
        result.train_steps += task.steps
        report(_progress_line(result, hp))
        return math.nan if run.val_loss is None else run.val_loss

    study.optimize(objective, n_trials=max_runs, timeout=budget_seconds, gc_after_trial=False,
                   catch=())
    result.wall_seconds = time.perf_counter() - started
    result.notes = {"optuna": optuna.__version__, "sampler": type(study.sampler).__name__}
    return result


def warm_up(task: HPOTask, *, impl: Impl | str = Impl.AUTO) -> None:
    """Two training steps, plain and unrolled: the one-off lazy initialisation of torch and
    fastmeta (about 2 s on the first backward here) must not count against a search's budget.
    """
    short = replace(task, steps=2)
    hp = SGDHyperparameters((DEFAULT_INITIAL["lr"],) * len(layer_groups(task.model(0))),
                            DEFAULT_INITIAL["momentum"], DEFAULT_INITIAL["weight_decay"])
    train_run(short, hp, seed=0, impl=impl)
    hypergrad_search(short, max_runs=3, initial=hp, unroll=1, impl=impl)


def search(task: HPOTask, method: str, **kwargs: Any) -> SearchResult:
    """:func:`hypergrad_search` or :func:`optuna_search`, by name (one of :data:`METHODS`),
    after :func:`warm_up` (outside the budget, the same for every method)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_budget(kwargs.get("budget_seconds"), kwargs.get("max_runs"))
    if method == "hypergrad":
        _check_hypergrad_options(kwargs.get("unroll", DEFAULT_UNROLL),
                                 kwargs.get("hyper_lr", DEFAULT_HYPER_LR))
    else:
        for key in ("initial", "unroll", "hyper_lr"):
            if kwargs.pop(key, None) is not None:
                raise ValueError(f"{key} applies to the hypergrad method only, not to {method}")
        _import_optuna(method)
    warm_up(task, impl=kwargs.get("impl", Impl.AUTO))
    if method == "hypergrad":
        return hypergrad_search(task, **kwargs)
    return optuna_search(task, method, **kwargs)


# ---- Reports -------------------------------------------------------------------------------


SUMMARY_FILE, PLOT_FILE = "summary.json", "hpo.png"


def update_summary(out: str | Path, result: SearchResult) -> dict[str, Any]:
    """Adds ``result`` to ``out/summary.json`` (keyed ``<method>-seed<seed>``, replacing an
    earlier run of the same key) and returns the whole summary.

    Raises:
        ValueError: the summary holds another task's results.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SUMMARY_FILE
    summary: dict[str, Any] = {"task": result.task, "results": {}}
    if path.exists():
        summary = json.loads(path.read_text())
        if summary.get("task") != result.task:
            raise ValueError(f"{path} holds results of task {summary.get('task')!r}, not "
                             f"{result.task!r}; use another --out")
    summary["results"][f"{result.method}-seed{result.seed}"] = result.to_json()
    path.write_text(json.dumps(summary, indent=1))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The results table: one row per search, then mean ± std per method over seeds."""
    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    head = ["search", "best val loss", "test acc", "wall s", "training runs", "non-finite"]
    rows = [head]
    by_method: dict[str, list[dict]] = {}
    for key, r in sorted(summary["results"].items()):
        by_method.setdefault(r["method"], []).append(r)
        rows.append([key, num(r["best_val_loss"], ".4f"), num(r["test_accuracy"], ".3f"),
                     f"{r['wall_seconds']:.1f}", str(r["training_runs"]), str(r["nonfinite"])])
    if any(len(v) > 1 for v in by_method.values()):
        for method, rs in sorted(by_method.items()):
            cells = [f"{method} (mean ± std, {len(rs)} seeds)"]
            for k, fmt in (("best_val_loss", ".4f"), ("test_accuracy", ".3f"),
                           ("wall_seconds", ".1f"), ("training_runs", ".1f")):
                vals = [r[k] for r in rs if r[k] is not None]
                if not vals:
                    cells.append("n/a")
                    continue
                mean = sum(vals) / len(vals)
                std = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5
                cells.append(f"{mean:{fmt}} ± {std:{fmt}}")
            cells.append(str(sum(r["nonfinite"] for r in rs)))
            rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_histories(summary: dict[str, Any], path: str | Path) -> bool:
    """Best validation loss so far against wall time, one line per search, one colour per
    method. Returns False (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {m: f"C{i}" for i, m in enumerate(METHODS)}
    labelled = set()
    for _, r in sorted(summary["results"].items()):
        points = [(h["seconds"], h["best_val_loss"]) for h in r["history"]
                  if h["best_val_loss"] is not None]
        if not points:
            continue
        t, v = zip(*points)
        label = None if r["method"] in labelled else r["method"]
        labelled.add(r["method"])
        ax.step(t, v, where="post", color=colours.get(r["method"]), label=label, alpha=0.8)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("best validation loss so far")
    ax.set_yscale("log")
    ax.set_title(f"{summary['task']}: SGD hyperparameter search")
    if labelled:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
