"""The native unroll of a ReLU MLP's training: the op behind :mod:`fastmeta.hpo`'s MLP path.

:class:`NativeMLPUnroll` runs K momentum-SGD steps of an MLP (:class:`fastmeta.fused_mlp.MLPSpec`
with ReLU between the layers) on mean cross-entropy in one native call, keeping the
trajectory, and their reverse pass (each step's VJP and the Hessian-vector product of its
training loss) in another: ``csrc/mlp.h`` has the maths. The Python loop of
:class:`fastmeta.hpo._UnrolledMLP` computes the same thing on torch ops and is what the tests
compare it with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmeta.backends import Impl, native
from fastmeta.fused_mlp import MLPSpec
from fastmeta.ops import tensor_lists as tl
from fastmeta.ops.mlp_native import native_mlp_gemm
from fastmeta.ops.sgd import SGD_RULE

__all__ = ["NativeMLPUnroll"]


class NativeMLPUnroll:
    """K momentum-SGD training steps of a ReLU MLP on cross-entropy, and their reverse pass, as
    two native calls (``fastmeta._C.MlpUnroll.forward`` and ``.backward``,
    csrc/mlp.h): the loop of :class:`fastmeta.hpo._UnrolledMLP` with the same maths,
    the K steps' trajectory in a few ``[K, ...]`` tensors instead of ~70 torch calls per step,
    and the matrix products on torch's own BLAS. :meth:`maybe` takes it for a ReLU MLP on the
    CPU in float32/float64 with equal batches and the native step kernels; the Python loop
    runs everything else, and the tests compare the two."""

    def __init__(self, spec: MLPSpec, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 first: tl.StepConfig, later: tl.StepConfig, theta: torch.Tensor,
                 buffer: torch.Tensor | None, kernels: tl.StepKernels, gemm: int) -> None:
        steps, batch = len(batches), batches[0][0].shape[0]
        self.theta0 = theta.detach().contiguous()
        self.buffer0 = None if buffer is None else buffer.detach().contiguous()
        self.x = torch.stack([x for x, _ in batches])
        self.y = torch.stack([y for _, y in batches])
        n = self.theta0.shape[0]
        self.thetas, self.buffers, self.grads = (self.theta0.new_empty((steps, n))
                                                 for _ in range(3))
        self.hs = [self.theta0.new_empty((steps, batch, ly.out_features))
                   for ly in spec.layers[:-1]]
        self.deltas = [self.theta0.new_empty((steps, batch, ly.out_features))
                       for ly in spec.layers]
        self.q = self.theta0.new_empty((steps, batch, spec.layers[-1].out_features))
        self.kernels = kernels
        self.needs_param = first.needs_param
        self.native = native().MlpUnroll(
            gemm, spec.native_layers, self.theta0.data_ptr(), tl._ptr(self.buffer0),
            self.x.data_ptr(), self.y.data_ptr(), steps, batch, self.thetas.data_ptr(),
            self.buffers.data_ptr(), self.grads.data_ptr(), [h.data_ptr() for h in self.hs],
            [d.data_ptr() for d in self.deltas], self.q.data_ptr(), n,
            tl.DTYPE_CODES[self.theta0.dtype], kernels.table.data_ptr(),
            tl._ptr(kernels.lr_elem), kernels.lr_stride,
            float(first.flags.get("step", 0)), SGD_RULE.flags(first), SGD_RULE.flags(later),
        )

    @classmethod
    def maybe(cls, spec: MLPSpec, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
              first: tl.StepConfig, later: tl.StepConfig, theta: torch.Tensor,
              buffer: torch.Tensor | None,
              kernels: tl.StepKernels | None) -> NativeMLPUnroll | None:
        """The native unroll where it applies, else None (the Python loop). ``batches`` are
        the K ``(x [B, in], y [B])`` minibatches that :class:`~fastmeta.fused_mlp.MLPSpec`
        checked (dtype, device, labels in range); ``first`` and ``later`` are the step
        configurations of the first step and of the others; ``kernels`` the fused step's."""
        if (kernels is None or kernels.impl is not Impl.NATIVE or theta.device.type != "cpu"
                or theta.dim() != 1 or theta.numel() == 0):
            return None
        why, gemm = native_mlp_gemm(spec, theta.dtype, "MlpUnroll")
        if why is not None:
            return None
        x0, y0 = batches[0]
        if any(x.shape != x0.shape or y.shape != y0.shape for x, y in batches):
            return None
        return cls(spec, batches, first, later, theta, buffer, kernels, gemm)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the K steps: ``(θ_K, b_K)`` (new tensors)."""
        self.native.forward()
        return self.thetas[-1].clone(), self.buffers[-1].clone()

    def backward(self, theta_bar: torch.Tensor | None, buffer_bar: torch.Tensor | None,
                 d_lr: torch.Tensor | None, d_tables: torch.Tensor, want_theta0: bool,
                 want_buffer0: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """From ``(θ̄_K, b̄_K)`` to ``(θ̄_0, b̄_0)`` (None where not wanted); adds the
        per-element lr's gradient to ``d_lr`` and writes each step's row of ``d_tables``."""
        theta_bar = None if theta_bar is None else theta_bar.contiguous()
        buffer_bar = None if buffer_bar is None else buffer_bar.contiguous()
        theta_bar0 = torch.empty_like(self.theta0) if want_theta0 else None
        buffer_bar0 = torch.empty_like(self.theta0) if want_buffer0 else None
        self.native.backward(
            self.needs_param, tl._ptr(theta_bar), tl._ptr(buffer_bar),
            tl._ptr(d_lr), d_tables.data_ptr(), d_tables.shape[1], tl._ptr(theta_bar0),
            tl._ptr(buffer_bar0))
        return theta_bar0, buffer_bar0
