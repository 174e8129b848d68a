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

import sys
from typing import TYPE_CHECKING

import torch

from fastmeta.backends import Impl, native, note, resolve, torch_blas_gemm
from fastmeta.ops import tensor_lists as tl

if TYPE_CHECKING:  # fused_mlp imports this module
    from fastmeta.fused_mlp import MLPSpec

__all__ = ["NativeMLPTaskGrads"]

OP = "mlp_task_grads"
_LOSS_CODES = {"cross_entropy": 0, "mse": 1}  # mlp::Loss in csrc/mlp.h
_DTYPES = (torch.float32, torch.float64)


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
        """The native op where it applies, else None (the torch path of
        :class:`~fastmeta.fused_mlp.MLPSpec`).

        It applies to a ReLU MLP (or one with no activation) on float32/float64 CPU tensors,
        with the native extension built (``FASTMETA_IMPL=reference`` turns it off) and torch's
        BLAS found (:func:`fastmeta.backends.torch_blas_gemm`). ``theta`` is the contiguous
        ``[T, N]`` buffer, and ``(x, y)`` the ``[T, B, ...]`` batch that
        :meth:`~fastmeta.fused_mlp.MLPSpec.check_batch` accepted (labels in range).
        """
        if (theta.device.type != "cpu" or theta.dim() != 2 or theta.numel() == 0
                or theta.dtype not in _DTYPES or not theta.is_contiguous()
                or sys.byteorder != "little"):  # see GemmFn in csrc/mlp.h
            return None
        if resolve(Impl.AUTO, theta.device, op=OP, record=False) is not Impl.NATIVE:
            return None
        module = native()
        if not hasattr(module, "MlpTaskGrads"):  # an older build
            return None
        from fastmeta.fused_mlp import relu_only  # fused_mlp imports this module

        if not relu_only(spec) or any(ly.in_features == 0 or ly.out_features == 0
                                      for ly in spec.layers):
            return None
        gemm = torch_blas_gemm(theta.dtype)
        if gemm is None:
            return None
        note(OP, Impl.NATIVE)
        return cls(spec, loss, theta, x, y, gemm)

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
