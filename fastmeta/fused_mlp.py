"""The training-loss gradient and Hessian-vector product of a plain MLP, by hand, on the flat
parameter buffer: what unrolled differentiation through training needs, without autograd.

Differentiating through K training steps needs, per step, the minibatch gradient
:math:`g(\\theta)` and, in the backward, :math:`H(\\theta)\\bar g` (second order). With
autograd, ``torch.autograd.grad(loss, θ, create_graph=True)`` records some 40 nodes per step
of a two-layer MLP and the backward differentiates each of them twice; on small models that
Python and graph overhead, not the arithmetic, is the cost. For ``nn.Sequential`` MLPs trained
with mean cross-entropy or mean squared error both are a handful of matrix products, written
here directly, for one task (θ ``[N]``) or for T tasks at once (θ ``[T, N]``, one row per task,
each with its own batch: ``[T, B, in]``).

**Maths** (rows are examples; :math:`B` examples, :math:`L` linear layers
:math:`W_l \\in \\mathbb{R}^{o_l \\times i_l}`, :math:`b_l`, elementwise activation
:math:`\\sigma` after every layer but the last):

.. math::
    \\begin{aligned}
    h_0 &= x, \\qquad a_l = h_{l-1} W_l^\\top + b_l, \\qquad h_l = \\sigma(a_l), \\qquad
        z = a_L, \\qquad P = \\operatorname{softmax}(z), \\\\
    \\ell(\\theta) &= -\\tfrac1B \\textstyle\\sum_r \\log P_{r, y_r}, \\qquad
        \\delta_L = (P - \\operatorname{onehot}(y)) / B, \\qquad
        \\delta_{l-1} = (\\delta_l W_l) \\odot \\sigma'(a_{l-1}), \\\\
    \\nabla_{W_l} \\ell &= \\delta_l^\\top h_{l-1}, \\qquad
        \\nabla_{b_l} \\ell = \\textstyle\\sum_r \\delta_l.
    \\end{aligned}

With mean squared error over the :math:`C` outputs instead,
:math:`\\ell = \\tfrac1{BC} \\sum (z - y)^2`, :math:`\\delta_L = 2(z - y)/(BC)` and, below,
:math:`\\mathcal{R}\\delta_L = 2\\mathcal{R}z/(BC)`.

The Hessian-vector product :math:`H(\\theta) v` is the directional derivative
:math:`\\mathcal{R}\\{\\cdot\\} = \\tfrac{d}{dt}(\\cdot)(\\theta + t v)|_{t=0}` of the gradient
(Pearlmutter's R-operator, forward over reverse, https://doi.org/10.1162/neco.1994.6.1.147),
with :math:`v = (V_l, c_l)` split like :math:`\\theta` and :math:`\\mathcal{R}h_0 = 0`:

.. math::
    \\begin{aligned}
    \\mathcal{R}a_l &= \\mathcal{R}h_{l-1} W_l^\\top + h_{l-1} V_l^\\top + c_l, \\qquad
        \\mathcal{R}h_l = \\sigma'(a_l) \\odot \\mathcal{R}a_l, \\\\
    \\mathcal{R}\\delta_L &= \\big(P \\odot \\mathcal{R}z
        - P \\odot \\textstyle\\sum_c (P \\odot \\mathcal{R}z)\\big) / B, \\\\
    \\mathcal{R}\\delta_{l-1} &= (\\mathcal{R}\\delta_l W_l + \\delta_l V_l) \\odot
        \\sigma'(a_{l-1})
        + (\\delta_l W_l) \\odot \\sigma''(a_{l-1}) \\odot \\mathcal{R}a_{l-1}, \\\\
    (Hv)_{W_l} &= \\mathcal{R}\\delta_l^\\top h_{l-1} + \\delta_l^\\top \\mathcal{R}h_{l-1},
        \\qquad (Hv)_{b_l} = \\textstyle\\sum_r \\mathcal{R}\\delta_l.
    \\end{aligned}

The derivatives of the activation come from its output :math:`h = \\sigma(a)`, by the ops
autograd itself uses: ReLU :math:`\\sigma' = [h > 0]` (0 at the kink), :math:`\\sigma'' = 0`;
tanh :math:`\\sigma' = 1 - h^2`, :math:`\\sigma'' = -2h\\sigma'`; sigmoid
:math:`\\sigma' = h(1 - h)`, :math:`\\sigma'' = (1 - 2h)\\sigma'`. Since :math:`\\sigma''` is
:math:`\\sigma'` times a function of :math:`h`, the last term of :math:`\\mathcal{R}\\delta_{l-1}`
is :math:`\\delta_{l-1} \\odot (\\sigma''/\\sigma') \\odot \\mathcal{R}a_{l-1}`: the
product needs only each layer's input :math:`h_{l-1}`, :math:`\\delta_l` and :math:`P`.

Only models whose output is *exactly* this computation are accepted (:meth:`MLPSpec.of`); any
other module, a subclass, a forward or backward hook, a module used twice or tied weights make
it refuse rather than guess.

Example:
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> layout = FlatLayout.of(model)
    >>> spec = MLPSpec.of(model, layout)
    >>> theta = layout.flatten(model)
    >>> x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    >>> grad, tape = spec.loss_grad(theta, x, y)
    >>> hv = spec.hvp(theta, tape, torch.ones_like(theta))
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta._autograd import Function
from fastmeta.flat import FlatLayout
from fastmeta.ops.mlp_task_grads import NativeMLPTaskGrads

__all__ = ["LOSSES", "MLPSpec", "MLPTape", "TaskLossGrad", "UnsupportedModel", "mlp_spec",
           "relu_only", "task_loss_grads"]


class UnsupportedModel(ValueError):
    """The model is not an MLP that :class:`MLPSpec` can differentiate by hand; the message
    says why."""


@dataclass(frozen=True)
class _Activation:
    """An elementwise activation σ and its derivatives, from its output h = σ(a).

    Attributes:
        forward: a -> σ(a).
        backward: (u, h) -> u ⊙ σ'(a), by the op autograd itself uses for this activation.
        curvature: h -> σ''(a) / σ'(a) (None where σ'' = 0), so that
            u ⊙ σ''(a) = (u ⊙ σ'(a)) ⊙ curvature(h).
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    curvature: Callable[[torch.Tensor], torch.Tensor] | None


# Exact types only: a subclass may override forward.
_ACTIVATIONS: dict[type, _Activation] = {
    nn.ReLU: _Activation(torch.relu,
                         lambda u, h: torch.ops.aten.threshold_backward.default(u, h, 0), None),
    nn.Tanh: _Activation(torch.tanh, torch.ops.aten.tanh_backward.default,
                         lambda h: h * -2.0),  # σ'' = -2hσ'
    nn.Sigmoid: _Activation(torch.sigmoid, torch.ops.aten.sigmoid_backward.default,
                            lambda h: 1.0 - 2.0 * h),  # σ'' = (1 - 2h)σ'
}


@dataclass(frozen=True)
class _Layer:
    """One ``nn.Linear``: which chunks of the flat buffer (layout entries) hold its weight
    ``[out, in]`` and its bias."""

    weight: int
    bias: int | None
    out_features: int
    in_features: int


@dataclass
class MLPTape:
    """What :meth:`MLPSpec.loss_grad` keeps for :meth:`MLPSpec.hvp` (layers counted from 0).

    Attributes:
        params: :math:`(W_l, b_l)` of every layer, views of θ.
        inputs: :math:`h_{l-1}`, the input of every layer (the first is the batch ``x``).
        deltas: :math:`\\delta_l` of every layer.
        scaled_probs: cross-entropy: :math:`P / B`, the softmax of the logits over the batch
            size; mean squared error: None.
        mse_scale: mean squared error: :math:`2 / (B C)`, so that
            :math:`\\delta_L = 2 (z - y) / (B C)`; cross-entropy: None.
        outputs: the model's output :math:`z` (the logits).
    """

    params: list[tuple[torch.Tensor, torch.Tensor | None]]
    inputs: list[torch.Tensor]
    deltas: list[torch.Tensor]
    scaled_probs: torch.Tensor | None
    mse_scale: float | None
    outputs: torch.Tensor


LOSSES = ("cross_entropy", "mse")


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for batches of matrices ``[T, m, k] @ [T, k, n]``.

    torch's CPU ``bmm`` runs one ``select`` + ``addmm_`` per task once a product has 400
    multiply-adds or more (a few µs each: 0.1 ms per product at T = 25), so products with a
    dimension of 1, which the first and last layers of a narrow MLP have (the sinusoid's
    1-40-40-1), are written as one broadcast multiply (and a sum) instead (on every device:
    the same arithmetic, one kernel either way).
    """
    if a.shape[-1] == 1:  # an outer product per task
        return a * b
    if b.shape[-1] == 1:  # matrix-vector
        return (a * b.transpose(1, 2)).sum(2, keepdim=True)
    if a.shape[-2] == 1:  # vector-matrix
        return (a.transpose(1, 2) * b).sum(1, keepdim=True)
    return torch.bmm(a, b)


def _linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """:math:`h W^\top + b`, for one task (``h [B, in]``, ``w [out, in]``) or T tasks (a
    leading T on all three)."""
    if w.dim() == 2:
        return F.linear(h, w, b)
    out = _bmm(h, w.transpose(1, 2))
    return out if b is None else out.add_(b.unsqueeze(1))


def _mm(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` for matrices or batches of matrices, into ``out`` if given."""
    if a.dim() == 2:
        return torch.mm(a, b, out=out)
    product = _bmm(a, b)
    return product if out is None else out.copy_(product)


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place, for matrices or batches of matrices."""
    return acc.addmm_(a, b) if a.dim() == 2 else acc.add_(_bmm(a, b))


class MLPSpec:
    """An ``nn.Sequential`` of ``nn.Linear`` layers with ``nn.ReLU``/``nn.Tanh``/``nn.Sigmoid``
    between them, read as positions in a :class:`~fastmeta.flat.FlatLayout` buffer, with its
    mean cross-entropy or mean-squared-error gradient and Hessian-vector product (see the
    module docstring).

    Build it with :meth:`of` (or :func:`mlp_spec`). It holds no tensors, only the layout it
    reads the buffer with: every method takes the flat parameter buffer θ, ``[N]`` or
    ``[T, N]``.
    """

    def __init__(self, layers: tuple[_Layer, ...], activations: tuple[_Activation, ...],
                 layout: FlatLayout) -> None:
        self.layers = layers
        self.activations = activations
        self.layout = layout
        self.in_features = layers[0].in_features
        self.classes = layers[-1].out_features

    @functools.cached_property
    def native_layers(self) -> list[int]:
        """(weight offset, bias offset or -1, in, out) per layer, flat: how the native ops
        (:mod:`fastmeta.ops.mlp_unroll`, :mod:`fastmeta.ops.mlp_task_grads`) are told where
        each layer lives in the buffer. Built on first use: a spec on the torch path never
        needs it."""
        entries = self.layout.entries
        return [value for ly in self.layers for value in (
            entries[ly.weight].offset, -1 if ly.bias is None else entries[ly.bias].offset,
            ly.in_features, ly.out_features)]

    @classmethod
    def of(cls, model: nn.Module, layout: FlatLayout | None = None) -> MLPSpec:
        """The spec of ``model``, whose parameters ``layout`` (default: ``FlatLayout.of(model)``)
        places in the flat buffer.

        Raises:
            UnsupportedModel: ``model`` is not exactly such an MLP, or ``layout`` is not its.
        """
        body, prefix = model, ""
        if type(model) is not nn.Sequential:
            # A model class may declare that its forward is exactly one nn.Sequential child's
            # (fastmeta.meta.MLP does): the declaration is read on the exact class only, so a
            # subclass (which may override forward) is refused.
            name = vars(type(model)).get("fused_mlp_body")
            body = getattr(model, name, None) if isinstance(name, str) else None
            if type(body) is not nn.Sequential or len(list(model.children())) != 1:
                raise UnsupportedModel(f"the model is a {type(model).__name__}, not an "
                                       "nn.Sequential (or a class declaring fused_mlp_body)")
            prefix = name + "."
        hooks = [getattr(nn.modules.module, name, None) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks",
            "_global_forward_hooks_always_called", "_global_backward_hooks",
            "_global_backward_pre_hooks")]
        if any(hooks):
            raise UnsupportedModel("global module forward or backward hooks are registered")
        # named_children() lists a module used twice once: Sequential(L1, t, L2, t, L2) would
        # read as L1 -> t -> L2.
        modules = list(body._modules.items())
        if len({id(m) for _, m in modules}) != len(modules) or any(m is None for _, m in modules):
            raise UnsupportedModel("the nn.Sequential uses a module twice (or holds None)")
        outer = [("", model)] + ([(prefix[:-1], body)] if prefix else [])
        for j, (name, m) in enumerate([*outer, *modules]):
            if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                    or m._backward_pre_hooks or "forward" in vars(m)):
                where = "the model" if j == 0 else f"module {name!r}"
                raise UnsupportedModel(f"{where} has forward or backward hooks or a replaced "
                                       "forward")
        linears: list[tuple[str, nn.Linear]] = []
        activations: list[_Activation] = []
        for j, (name, m) in enumerate(modules):
            where = f"module {name!r} ({type(m).__name__})"
            if j % 2 == 1:  # between two Linears
                act = _ACTIVATIONS.get(type(m))
                if act is None:
                    raise UnsupportedModel(f"{where} is not an nn.ReLU, nn.Tanh or nn.Sigmoid "
                                           "between two nn.Linear layers")
                activations.append(act)
            elif type(m) is not nn.Linear:
                raise UnsupportedModel(f"{where} is not an nn.Linear (an MLP alternates "
                                       "nn.Linear and activations)")
            elif linears and m.in_features != linears[-1][1].out_features:
                raise UnsupportedModel(f"{where} takes {m.in_features} features but the "
                                       f"layer before gives {linears[-1][1].out_features}")
            else:
                linears.append((name, m))
        if len(linears) == len(activations):
            last = type(modules[-1][1]).__name__ if modules else "none"
            raise UnsupportedModel(f"the last module ({last}) is not an nn.Linear (the logits "
                                   "must be the last layer's output)")
        layout = FlatLayout.of(model) if layout is None else layout
        entries = {e.name: (i, e) for i, e in enumerate(layout.entries)}
        layers: list[_Layer] = []
        for name, m in linears:
            w, b = entries.get(f"{prefix}{name}.weight"), entries.get(f"{prefix}{name}.bias")
            if (w is None or w[1].shape != (m.out_features, m.in_features)
                    or (m.bias is not None and (b is None or b[1].shape != (m.out_features,)))):
                raise UnsupportedModel(f"module {name!r}'s parameters are not in the layout as "
                                       "its own (tied weights, or the layout of another model)")
            layers.append(_Layer(w[0], None if m.bias is None else b[0], m.out_features,
                                 m.in_features))
        if len(entries) != len(layers) + sum(layer.bias is not None for layer in layers):
            raise UnsupportedModel("the layout holds parameters that are not the model's")
        return cls(tuple(layers), tuple(activations), layout)

    def split(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """:math:`(W_l, b_l)` of every layer: views of the flat ``[N]`` buffer (``[out, in]``
        and ``[out]``), or of a ``[T, N]`` one (``[T, out, in]`` and ``[T, out]``)."""
        chunks = self.layout.split(flat)
        lead = flat.shape[:-1]
        # view, not unflatten: Tensor.unflatten is a Python wrapper, and this runs four times
        # per training step of an unrolled loop.
        return [(chunks[layer.weight].view(*lead, layer.out_features, layer.in_features),
                 None if layer.bias is None else chunks[layer.bias]) for layer in self.layers]

    def check_batch(self, x: object, y: object, *, dtype: torch.dtype, device: torch.device,
                    loss: str = "cross_entropy", tasks: int | None = None,
                    name: str = "batch", check_range: bool = True) -> None:
        """Raises :class:`UnsupportedModel` unless :meth:`loss_grad` computes exactly what
        ``F.cross_entropy`` / ``F.mse_loss`` of the model's output differentiates for
        ``(x, y)``: ``x`` a ``[B, in_features]`` tensor (``[T, B, in_features]`` with
        ``tasks``) of ``dtype`` on ``device`` that needs no gradient, ``B >= 1``; ``y`` int64
        class indices ``[B]`` (``[T, B]``) in ``[0, classes)`` (so not cross-entropy's
        ignored -100), or for ``"mse"`` targets shaped like the output, of ``dtype``, needing
        no gradient. The class range check reads the labels (a sync on a GPU); a caller with
        many batches may pass ``check_range=False`` and check them all at once with
        :meth:`check_class_range`."""
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise UnsupportedModel(f"{name} is not a pair of tensors")
        lead = () if tasks is None else (tasks,)
        shape = "[B, " if tasks is None else "[T, B, "
        if (x.shape[:-2] != lead or x.dim() != len(lead) + 2 or x.shape[-1] != self.in_features
                or x.shape[-2] == 0):
            raise UnsupportedModel(f"{name}'s inputs have shape {list(x.shape)}, not {shape}"
                                   f"{self.in_features}] with B >= 1" + (
                                       f" and T = {tasks}" if tasks is not None else ""))
        if x.dtype != dtype or x.device != device:
            raise UnsupportedModel(f"{name}'s inputs are {x.dtype} on {x.device}, not {dtype} "
                                   f"on {device}")
        if x.requires_grad:
            raise UnsupportedModel(f"{name}'s inputs require grad (only the parameters are "
                                   "differentiated)")
        rows = (*lead, x.shape[-2])
        if loss == "mse":
            want = (*rows, self.classes)
            if y.shape != want or y.dtype != dtype or y.device != device or y.requires_grad:
                raise UnsupportedModel(f"{name}'s targets are {y.dtype} {list(y.shape)} on "
                                       f"{y.device}, not {dtype} {list(want)} on {device} "
                                       "needing no gradient")
            return
        if loss != "cross_entropy":
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if y.dtype != torch.int64 or y.shape != rows or y.device != device:
            raise UnsupportedModel(f"{name}'s labels are {y.dtype} {list(y.shape)} on "
                                   f"{y.device}, not int64 {list(rows)} class indices on "
                                   f"{device}")
        if check_range:
            self.check_class_range([y], [name])

    def check_class_range(self, labels: list[torch.Tensor], names: list[str]) -> None:
        """Raises :class:`UnsupportedModel`, naming the first offending ``names[i]``, unless
        every class index in ``labels`` lies in ``[0, classes)``: one read of all of them
        (and more only to name the culprit). The labels are int64 tensors on one device, as
        :meth:`check_batch` checks them.

        Raises:
            ValueError: ``labels`` and ``names`` differ in length.
        """
        if len(labels) != len(names):
            raise ValueError(f"check_class_range: {len(labels)} label tensors but "
                             f"{len(names)} names")
        named = [(y, name) for y, name in zip(labels, names) if y.numel() > 0]
        if not named:
            return

        def in_range(y: torch.Tensor) -> bool:
            low, high = torch.stack(torch.aminmax(y)).tolist()  # one read (a GPU sync)
            return low >= 0 and high < self.classes  # -100 (ignore_index) is outside

        if in_range(named[0][0] if len(named) == 1 else torch.cat([y.reshape(-1)
                                                                   for y, _ in named])):
            return
        culprit = next(name for y, name in named if not in_range(y))
        raise UnsupportedModel(f"{culprit} has a class index outside [0, {self.classes})")

    def loss_grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                  out: torch.Tensor | None = None, loss: str = "cross_entropy",
                  want_losses: bool = False):
        """:math:`\\nabla_\\theta \\ell(\\theta; x, y)` of the mean loss, without autograd; for
        T tasks at once, each task's own gradient (of the sum of the task losses).

        Args:
            theta: ``[N]`` flat parameters, or ``[T, N]`` (one row per task).
            x: ``[B, in_features]`` inputs (``[T, B, in_features]`` for T tasks).
            y: cross-entropy: ``[B]`` (``[T, B]``) class indices in ``[0, classes)`` (no
                ``ignore_index``: an index out of range raises on the CPU; on a GPU it is a
                device-side assert); mean squared error: targets
                shaped like the output, ``[B, classes]`` (``[T, B, classes]``).
            out: buffer shaped like ``theta`` to write the gradient into (default: new).
            loss: ``"cross_entropy"`` (``F.cross_entropy``, mean over the batch) or ``"mse"``
                (``F.mse_loss``, mean over the batch and the outputs).
            want_losses: also return the loss value(s): ``()``, or ``[T]`` for T tasks.

        Returns:
            ``(grad, tape)``, or ``(grad, tape, losses)`` with ``want_losses``: the gradient
            shaped like ``theta`` and what :meth:`hvp` needs.
        """
        params = self.split(theta)
        grad = torch.empty_like(theta) if out is None else out
        h = x
        inputs = [x]
        for i, (w, b) in enumerate(params):
            a = _linear(h, w, b)
            if i < len(self.activations):
                h = self.activations[i].forward(a)
                inputs.append(h)
        rows = x.shape[-2]
        scaled_probs, mse_scale, losses = None, None, None
        if loss == "cross_entropy":
            if want_losses:
                log_probs = torch.log_softmax(a, -1)
                losses = -log_probs.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(-1)
                scaled_probs = log_probs.exp_().mul_(1.0 / rows)
            else:
                scaled_probs = torch.softmax(a, -1).mul_(1.0 / rows)
            # δ_L = P/B - onehot(y)/B; scatter_add raises on a label out of range.
            delta = scaled_probs.scatter_add(-1, y.unsqueeze(-1),
                                             scaled_probs.new_full((*y.shape, 1), -1.0 / rows))
        elif loss == "mse":
            mse_scale = 2.0 / (rows * a.shape[-1])
            error = a - y
            if want_losses:
                losses = error.square().mean((-2, -1))
            delta = error.mul_(mse_scale)  # δ_L = 2 (z - y) / (B C)
        else:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        deltas = [delta]
        for i, (gw, gb) in reversed(list(enumerate(self.split(grad)))):
            _mm(delta.transpose(-2, -1), inputs[i], out=gw)
            if gb is not None:
                torch.sum(delta, -2, out=gb)
            if i > 0:
                delta = self.activations[i - 1].backward(_mm(delta, params[i][0]), inputs[i])
                deltas.append(delta)
        deltas.reverse()
        tape = MLPTape(params, inputs, deltas, scaled_probs, mse_scale, a)
        return (grad, tape, losses) if want_losses else (grad, tape)

    def hvp(self, theta: torch.Tensor, tape: MLPTape, v: torch.Tensor, *,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`H(\\theta) v`, the Hessian of the loss :meth:`loss_grad` differentiated (at
        the same θ and batch, whose activations ``tape`` holds) times ``v``; for T tasks, each
        task's own Hessian times its row of ``v``.

        Args:
            theta: ``[N]`` or ``[T, N]``, as given to :meth:`loss_grad` (``tape`` holds its
                views).
            tape: what :meth:`loss_grad` returned for it.
            v: direction shaped like ``theta``.
            out: buffer shaped like ``theta`` to write the product into (default: new).
        """
        hv = torch.empty_like(theta) if out is None else out
        params, directions = tape.params, self.split(v)
        last = len(self.layers) - 1
        r_inputs: list[torch.Tensor | None] = [None]  # Rh_0 = 0
        r_pre: list[torch.Tensor] = []
        for i, ((w, _), (dw, db)) in enumerate(zip(params, directions)):
            h = tape.inputs[i]
            ra = _linear(h, dw, db)
            if i > 0:
                _addmm_(ra, r_inputs[i], w.transpose(-2, -1))
            r_pre.append(ra)
            if i < last:
                r_inputs.append(self.activations[i].backward(ra, tape.inputs[i + 1]))
        if tape.scaled_probs is not None:
            # With Q = P/B: Rδ_L = Q ⊙ Rz - Q ⊙ Σ_c (P ⊙ Rz) = Q ⊙ Rz - B Q ⊙ Σ_c (Q ⊙ Rz).
            q = tape.scaled_probs
            q_rz = q * r_pre[-1]
            r_delta = torch.addcmul(q_rz, q, q_rz.sum(-1, keepdim=True), value=-q.shape[-2])
        else:
            r_delta = r_pre[-1].mul_(tape.mse_scale)  # Rδ_L = 2 Rz / (B C)
        for i, (hw, hb) in reversed(list(enumerate(self.split(hv)))):
            _mm(r_delta.transpose(-2, -1), tape.inputs[i], out=hw)
            if i > 0:
                _addmm_(hw, tape.deltas[i].transpose(-2, -1), r_inputs[i])
            if hb is not None:
                torch.sum(r_delta, -2, out=hb)
            if i > 0:
                act, h = self.activations[i - 1], tape.inputs[i]
                u = _addmm_(_mm(r_delta, params[i][0]), tape.deltas[i], directions[i][0])
                r_delta = act.backward(u, h)
                if act.curvature is not None:  # (δ_l W_l) ⊙ σ'' ⊙ Ra = δ_{l-1} ⊙ σ''/σ' ⊙ Ra
                    r_delta.addcmul_(tape.deltas[i - 1] * act.curvature(h), r_pre[i - 1])
        return hv


def relu_only(spec: MLPSpec) -> bool:
    """True when every activation of ``spec`` is ReLU (what the native MLP ops of
    :mod:`fastmeta.ops.mlp_unroll` and :mod:`fastmeta.ops.mlp_task_grads` cover)."""
    return all(act is _ACTIVATIONS[nn.ReLU] for act in spec.activations)


def mlp_spec(model: nn.Module, layout: FlatLayout | None = None) -> MLPSpec | None:
    """:meth:`MLPSpec.of`, or None when the model is not a supported MLP."""
    try:
        return MLPSpec.of(model, layout)
    except UnsupportedModel:
        return None


class TaskLossGrad(Function):
    r"""Every task's training gradient as one autograd node, differentiable once:
    ``(spec, loss, θ, x, y) -> (g, ℓ, z)`` with :math:`g_t = \nabla \ell_t(\theta_t)`, the task
    losses :math:`\ell_t` and the outputs :math:`z` (not differentiable: for accuracies), by
    :meth:`MLPSpec.loss_grad`. Its backward is

    .. math::
        \bar\theta_t = H_t(\theta_t)\,\bar g_t + \bar\ell_t\, g_t

    by :meth:`MLPSpec.hvp`: what second-order MAML needs from an inner step, without the ~30
    autograd nodes per step that ``autograd.grad(..., create_graph=True)`` records (and
    differentiates again) for a small MLP. On the CPU, for a ReLU MLP in float32/float64, the
    forward and the backward are one native call each
    (:class:`fastmeta.ops.mlp_task_grads.NativeMLPTaskGrads`, the same maths); elsewhere they
    are the torch ops of :class:`MLPSpec`. The backward is not itself differentiable: with
    ``create_graph=True`` it raises rather than return a silently incomplete third derivative.
    """

    @staticmethod
    def forward(ctx, spec: MLPSpec, loss: str, theta, x, y):
        theta = theta.contiguous()  # e.g. the first step's expand()ed [T, N]
        grad, losses, outputs, ctx.tape = _loss_grads(spec, loss, theta, x, y)
        ctx.spec, ctx.theta = spec, theta
        # The outputs are saved through save_for_backward, not as ctx attributes (nor held by
        # the native op): an output held by its own node's ctx is a reference cycle, which
        # keeps every step's tape alive until Python's cyclic collector runs.
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(outputs)
        ctx.set_materialize_grads(False)
        return grad, losses, outputs

    @staticmethod
    def backward(ctx, grad_bar, losses_bar, outputs_bar):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(
                "fused_mlp.TaskLossGrad: the hand-written MLP gradient is differentiable once, "
                "and this backward has create_graph=True (a third derivative); use "
                "strategy='batched' for that")
        if grad_bar is None and losses_bar is None:
            return None, None, None, None, None
        (grad,) = ctx.saved_tensors
        if isinstance(ctx.tape, NativeMLPTaskGrads):
            return None, None, ctx.tape.backward(grad_bar, losses_bar, grad), None, None
        theta_bar = None
        if grad_bar is not None:
            theta_bar = ctx.spec.hvp(ctx.theta, ctx.tape, grad_bar.contiguous())
        if losses_bar is not None:
            term = losses_bar.unsqueeze(-1) * grad
            theta_bar = term if theta_bar is None else theta_bar.add_(term)
        return None, None, theta_bar, None, None


def task_loss_grads(
    spec: MLPSpec, loss: str, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
    create_graph: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grads, losses, outputs)`` of every task (see :class:`TaskLossGrad`): differentiable
    (once) w.r.t. ``theta`` with ``create_graph``; otherwise constants, as a first-order inner
    step wants them."""
    if create_graph and torch.is_grad_enabled() and theta.requires_grad:
        return TaskLossGrad.apply(spec, loss, theta, x, y)
    with torch.no_grad():
        grad, losses, outputs, _ = _loss_grads(spec, loss, theta.detach().contiguous(), x, y)
    return grad, losses, outputs


def _loss_grads(
    spec: MLPSpec, loss: str, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, NativeMLPTaskGrads | MLPTape]:
    """``(grads, losses, outputs, tape)`` of every task of the contiguous ``[T, N]`` θ: on the
    native op where it applies (the tape is then the op, whose backward gives
    :math:`H\\bar g + \\bar\\ell g`), else on :meth:`MLPSpec.loss_grad` (an :class:`MLPTape`
    for :meth:`MLPSpec.hvp`, without the outputs, which it does not need)."""
    op = NativeMLPTaskGrads.maybe(spec, loss, theta, x, y)
    if op is not None:
        return (*op.forward(), op)
    grad, tape, losses = spec.loss_grad(theta, x, y, loss=loss, want_losses=True)
    outputs, tape.outputs = tape.outputs, None
    return grad, losses, outputs, tape
