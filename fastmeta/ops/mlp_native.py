"""What the two native ReLU-MLP ops (:mod:`fastmeta.ops.mlp_unroll`, the HPO unroll, and
:mod:`fastmeta.ops.mlp_task_grads`, MAML's task gradients; both ``csrc/mlp.h``) need of the
model, the dtype and this install, checked in one place."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from fastmeta.backends import native, torch_blas_gemm

if TYPE_CHECKING:  # fused_mlp imports mlp_task_grads, which imports this module
    from fastmeta.fused_mlp import MLPSpec

__all__ = ["native_mlp_gemm"]

_DTYPES = (torch.float32, torch.float64)


def native_mlp_gemm(spec: MLPSpec, dtype: torch.dtype, binding: str) -> tuple[str | None, int]:
    """``(None, address of torch's ?gemm_)`` when ``csrc/mlp.h`` can run ``spec`` in ``dtype``
    through the extension's class ``binding``, else ``(why not, 0)``: ReLU between the layers
    (or no activation), no layer of width 0, float32/float64, CPU autocast off (torch's ops
    follow its dtype rules, the native ones would not), a little-endian CPU (see ``GemmFn``),
    the extension built with ``binding``, and torch's BLAS found
    (:func:`fastmeta.backends.torch_blas_gemm`). The caller checks the tensors themselves
    (device, shapes, contiguity)."""
    from fastmeta.fused_mlp import relu_only

    if dtype not in _DTYPES:
        return f"the native MLP ops run on float32/float64, not {dtype}", 0
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on (the torch ops follow its dtype rules)", 0
    if not relu_only(spec):
        return "the native MLP ops cover ReLU between the layers only", 0
    if any(ly.in_features == 0 or ly.out_features == 0 for ly in spec.layers):
        return "a layer has no inputs or no outputs", 0
    if sys.byteorder != "little":
        return "the native MLP ops run on little-endian CPUs only", 0
    module = native()
    if module is None or not hasattr(module, binding):  # or a build older than the binding
        return f"the extension fastmeta._C (with {binding}) is not built", 0
    gemm = torch_blas_gemm(dtype)
    if gemm is None:
        return "torch's BLAS was not found in libtorch_cpu (or FASTMETA_NO_TORCH_BLAS=1)", 0
    return None, gemm
