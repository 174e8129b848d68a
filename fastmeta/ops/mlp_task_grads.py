"""Every task's loss gradient of a ReLU MLP in one native call, and its reverse pass in another:
the op behind :class:`fastmeta.fused_mlp.TaskLossGrad` (MAML's inner steps and query on a
plain MLP) on the CPU.

For T tasks, each with its own parameters (row t of θ ``[T, N]``) and batch, the forward
computes :math:`g_t = \\nabla \\ell_t(\\theta_t)`, the loss :math:`\\ell_t` and the output, and
the backward :math:`\\bar\\theta_t = H_t(\\theta_t)\\,\\bar g_t + \\bar\\ell_t\\, g_t`
(``csrc/mlp.h`` has the maths; :class:`fastmeta.fused_mlp.MLPSpec` is its torch twin, which the
tests compare it with). In torch ops the sinusoid MLP's forward and backward are ~60 calls of a
few µs each on matrices of 10 x 40; here each is one call that loops over the tasks (in
parallel) with the products on torch's own BLAS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastmeta.backends import Impl, ImplementationUnavailable, native, note, requested_impl
from fastmeta.ops import tensor_lists as tl
from fastmeta.ops.mlp_native import native_mlp_gemm

if TYPE_CHECKING:  # fused_mlp imports this module
    from fastmeta.fused_mlp import MLPSpec

__all__ = ["NativeMLPTaskGrads"]

OP = "mlp_task_grads"
_LOSS_CODES = {"cross_entropy": 0, "mse": 1}  # mlp::Loss in csrc/mlp.h


class NativeMLPTaskGrads:
    """One forward of :class:`fastmeta.fused_mlp.TaskLossGrad` on the native kernels
    (``fastmeta._C.MlpTaskGrads``), and the tape its backward reads.

    Build it with :meth:`maybe`, which returns None where the torch path has to run instead.
    The native object keeps the tape (the hidden activations, every layer's δ and, for the
    cross-entropy, the scaled softmax) in memory of its own; this object keeps the inputs it
    reads, not its outputs: the gradients are handed back to :meth:`backward`, so that an
    autograd node holding this object holds no tensor it returned (no reference cycle through
    the outputs' ``grad_fn``).
    """

    def __init__(self, spec: MLPSpec, loss: str, theta: torch.Tensor, x: torch.Tensor,
                 y: torch.Tensor, gemm: int) -> None:
        tasks, numel = theta.shape
        batch = x.shape[1]
        self.theta, self.x, self.y = theta, x.contiguous(), y.contiguous()
        self.grads = torch.empty_like(theta)
        self.losses = theta.new_empty(tasks)
        self.outputs = theta.new_empty((tasks, batch, spec.classes))
        self.native = native().MlpTaskGrads(
            gemm, spec.native_layers, _LOSS_CODES[loss], tasks, batch, numel, theta.data_ptr(),
            self.x.data_ptr(), self.y.data_ptr(), self.grads.data_ptr(),
            self.losses.data_ptr(), self.outputs.data_ptr(), tl.DTYPE_CODES[theta.dtype])

    @classmethod
    def maybe(cls, spec: MLPSpec, loss: str, theta: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor) -> NativeMLPTaskGrads | None:
        """The native op where it applies, else None (the torch ops of
        :class:`~fastmeta.fused_mlp.MLPSpec` run instead).

        It applies to a ReLU MLP (or one with no activation) on float32/float64 CPU tensors
        outside autocast: θ the contiguous ``[T, N]`` buffer, ``x`` ``[T, B, in_features]`` of
        θ's dtype, ``y`` ``[T, B]`` int64 labels (cross-entropy) or ``[T, B, C]`` targets of
        θ's dtype, with the native extension built and torch's BLAS found
        (:func:`fastmeta.backends.torch_blas_gemm`). A label out of ``[0, C)`` raises
        ``IndexError`` (the torch ops raise too).

        ``FASTMETA_IMPL`` is obeyed: ``reference`` runs the torch ops; ``native`` runs this op
        or raises :class:`~fastmeta.backends.ImplementationUnavailable` saying why it cannot;
        ``triton`` runs the torch ops, as on a GPU (there is no Triton kernel for this op).
        """
        requested = requested_impl(Impl.AUTO)
        if requested in (Impl.REFERENCE, Impl.TRITON):
            note(OP, Impl.REFERENCE)
            return None
        why, gemm = cls._why_not(spec, loss, theta, x, y)
        if why is None:
            note(OP, Impl.NATIVE)
            return cls(spec, loss, theta, x, y, gemm)
        if requested is Impl.NATIVE:
            raise ImplementationUnavailable(f"{OP}: impl=native was requested but {why}")
        note(OP, Impl.REFERENCE)
        return None

    @staticmethod
    def _why_not(spec: MLPSpec, loss: str, theta: torch.Tensor, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[str | None, int]:
        """``(None, gemm address)`` when the op can run these tensors, else ``(reason, 0)``."""
        if theta.device.type != "cpu":
            return f"the native MLP op runs on CPU tensors, and θ is on {theta.device}", 0
        tasks = theta.shape[0] if theta.dim() == 2 else 0
        if (theta.dim() != 2 or tasks < 1 or theta.shape[1] != spec.layout.numel
                or not theta.is_contiguous()):
            return (f"θ is not a contiguous [T, {spec.layout.numel}] buffer with T >= 1 "
                    f"(shape {list(theta.shape)})"), 0
        try:  # what MLPSpec.loss_grad reads, as the op reads it; label ranges raise in the op
            spec.check_batch(x, y, dtype=theta.dtype, device=theta.device, loss=loss,
                             tasks=tasks, check_range=False)
        except ValueError as error:  # fused_mlp.UnsupportedModel (fused_mlp imports this module)
            return str(error), 0
        return native_mlp_gemm(spec, theta.dtype, "MlpTaskGrads")

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the forward: ``(grads [T, N], losses [T], outputs [T, B, C])``. It returns its
        own buffers and lets go of them, so call it once."""
        self.native.forward()
        out = self.grads, self.losses, self.outputs
        self.grads = self.losses = self.outputs = None
        return out

    def backward(self, grad_bar: torch.Tensor | None, losses_bar: torch.Tensor | None,
                 grads: torch.Tensor) -> torch.Tensor:
        """:math:`\\bar\\theta_t = H_t \\bar g_t + \\bar\\ell_t g_t` (a None term is absent,
        not both), with ``grads`` what :meth:`forward` returned."""
        if grad_bar is not None:
            grad_bar = grad_bar.contiguous()
        if losses_bar is not None:
            losses_bar = losses_bar.contiguous()
        theta_bar = torch.empty_like(self.theta)
        self.native.backward(tl._ptr(grad_bar), tl._ptr(losses_bar), grads.data_ptr(),
                             theta_bar.data_ptr())
        return theta_bar
