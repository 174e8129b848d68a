"""Multi-tensor launches for Triton: one kernel launch covers a whole list of tensors.

The launcher hands the kernel a table of addresses (one int64 per tensor and per role: param,
grad, state...) and a table of blocks: program ``i`` works on ``BLOCK`` elements of tensor
``block_tensor[i]`` starting at ``block_start[i]``. That is how torch's fused CUDA optimizers
avoid one launch per tensor, written in Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastmeta.ops.tensor_lists import DTYPE_CODES

# The Triton element type of each supported torch dtype.
TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}
assert set(TRITON_DTYPES) == set(DTYPE_CODES)


@triton.jit
def program_block(block_tensor, block_start, numels, BLOCK: tl.constexpr):
    """The tensor, element offsets and bounds mask of this program's block of a multi-tensor
    launch (see :func:`block_table`)."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offsets = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    return t, offsets, offsets < tl.load(numels + t)


def group_by_dtype(count: int, dtypes: Sequence[torch.dtype]) -> dict[torch.dtype, list[int]]:
    """Indices of the tensors of each dtype: one launch per dtype present in the list."""
    groups: dict[torch.dtype, list[int]] = {}
    for i in range(count):
        groups.setdefault(dtypes[i], []).append(i)
    return groups


def address_table(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """An int64 tensor of data addresses, on ``device``. An empty list (an unused state) gives
    a one-entry table of zeros, which a kernel compiled without that state never reads."""
    addresses = [t.data_ptr() for t in tensors] or [0]
    return torch.tensor(addresses, dtype=torch.int64).to(device, non_blocking=True)


def block_table(
    numels: Sequence[int], block: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(block_tensor, block_start, numel)`` for a grid of one program per block."""
    counts = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.int64)
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_block = torch.cumsum(counts, 0) - counts
    block_start = (torch.arange(int(counts.sum())) - first_block[block_tensor]) * block
    numel = torch.tensor(list(numels), dtype=torch.int64)
    return (
        block_tensor.to(device, non_blocking=True),
        block_start.to(device, non_blocking=True),
        numel.to(device, non_blocking=True),
    )


def hyper_table(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Hyperparameters as a float64 tensor, so fp64 params see them at full precision."""
    return torch.tensor(list(values), dtype=torch.float64).to(device, non_blocking=True)


def step_table(steps: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The step counters as a float64 tensor on ``device``, gathered by torch ops so that no
    value goes through the host: torch.optim may keep the counters on the CPU while the params
    are on the GPU. All counters of one call must share one device."""
    stacked = torch.stack([s.reshape(()) for s in steps])
    return stacked.to(device=device, dtype=torch.float64, non_blocking=True)


@triton.jit
def sqrt_rn(x, COMPUTE: tl.constexpr):
    """Correctly rounded square root, as torch computes it: ``tl.sqrt`` is the fast
    approximate one for fp32 on NVIDIA, and ``tl.sqrt_rn`` accepts fp32 only."""
    if COMPUTE == tl.float64:
        root = tl.sqrt(x)
    else:
        root = tl.sqrt_rn(x)
    return root


@triton.jit
def div_rn(x, y, COMPUTE: tl.constexpr):
    """Correctly rounded division, as torch computes it: ``/`` of fp32 is the approximate
    ``div.full`` on NVIDIA, and ``tl.math.div_rn`` accepts fp32 only."""
    if COMPUTE == tl.float64:
        quotient = x / y
    else:
        quotient = tl.math.div_rn(x, y)
    return quotient


# ---- Task-batched [T, N] launches (the differentiable steps of fastmeta/ops/tensor_lists.py) --
# One program covers BLOCK columns of every task row (it loops over the tasks), so the gradient
# of a per-element lr shared by the tasks is summed in registers, without atomics. Each program
# writes its per-task hyperparameter-gradient sums to its own slot of a float64 [H, T, programs]
# table, which the launcher sums in a fixed order: deterministic, like the native kernels.


def or_dummy(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an optional tensor; the kernel is compiled not to touch it."""
    return fallback if t is None else t


def compute_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def batched_layout(grad: torch.Tensor) -> tuple[int, int]:
    """``(T, N)`` of an ``[N]`` or ``[T, N]`` buffer."""
    return (1, grad.shape[0]) if grad.dim() == 1 else (grad.shape[0], grad.shape[1])


def lr_stride(lr: torch.Tensor | None, numel: int) -> int:
    """Elements between two tasks' rows of a per-element lr: 0 for one [N] lr shared by all."""
    return numel if lr is not None and lr.dim() == 2 else 0


def hyper_partials(d_table: torch.Tensor, programs: int) -> torch.Tensor:
    """The per-program slots of the hyperparameter gradients, float64 [H, T, programs]."""
    return torch.zeros(*d_table.shape, programs, dtype=torch.float64, device=d_table.device)
