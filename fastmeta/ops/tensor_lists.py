"""Validation of the tensor lists that every multi-tensor op takes, and the machinery shared by
the out-of-place, task-batched, differentiable steps (at the end of this file).

The native and Triton kernels receive raw addresses, so everything that could make them read
or write the wrong memory is checked here, once, in Python: lengths, devices, dtypes, shapes,
layouts and contiguity. Errors name the argument and the index (``grads[3]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastmeta.backends import Impl, native, resolve, triton_kernels

# Must match csrc/kernels.h: enum DType.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
}
SUPPORTED_DTYPES = tuple(DTYPE_CODES)


def check_params(op: str, params: Sequence[torch.Tensor]) -> torch.device:
    """Checks the ``params`` list and returns the one device all of them live on."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{op}: params must be a list of tensors, got a single tensor")
    if len(params) == 0:
        return torch.device("cpu")
    device = params[0].device
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{op}: params[{i}] must be a tensor, got {type(p).__name__}")
        if p.device != device:
            raise ValueError(
                f"{op}: params[{i}] is on {p.device} but params[0] is on {device}; "
                "every tensor of one call must be on the same device"
            )
        if p.is_sparse:
            raise ValueError(f"{op}: params[{i}] is sparse; only dense params are supported")
        if p.dtype not in DTYPE_CODES:
            kind = "complex" if p.is_complex() else "integer" if not p.is_floating_point() else ""
            raise TypeError(
                f"{op}: params[{i}] has dtype {p.dtype}"
                + (f" ({kind})" if kind else "")
                + "; supported dtypes are float32, float64, float16 and bfloat16"
                + (" (view complex params as real with torch.view_as_real)"
                   if kind == "complex" else "")
            )
    return device


def check_like_params(
    op: str, name: str, tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> None:
    """Checks that ``tensors`` (grads or an optimizer state list) match ``params`` one to one:
    same length, device, shape and dtype, dense."""
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a list of tensors, got a single tensor")
    if len(tensors) != len(params):
        raise ValueError(f"{op}: {name} has {len(tensors)} tensors but params has {len(params)}")
    for i, (t, p) in enumerate(zip(tensors, params)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")
        if t.is_sparse:
            raise ValueError(
                f"{op}: {name}[{i}] is sparse; fastmeta's fused kernels support dense "
                "gradients only (use torch.optim.SparseAdam for sparse ones)"
            )
        if t.device != p.device:
            raise ValueError(f"{op}: {name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
        if t.shape != p.shape:
            raise ValueError(
                f"{op}: {name}[{i}] has shape {tuple(t.shape)} but params[{i}] has shape "
                f"{tuple(p.shape)}"
            )
        if t.dtype != p.dtype:
            raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype} but params[{i}] has {p.dtype}")


def check_contiguous(op: str, name: str, tensors: Sequence[torch.Tensor]) -> None:
    """The kernels write through raw addresses, so a tensor they update in place must be
    contiguous: updating a contiguous copy would silently leave the original unchanged."""
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(
                f"{op}: {name}[{i}] is not contiguous (strides {t.stride()}); the fused "
                "kernels update it in place through its data pointer. Pass a contiguous "
                "tensor or use impl='reference'"
            )


def contiguous_inputs(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Read-only inputs (gradients) may be non-contiguous: the kernel reads a contiguous copy."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def check_scalar(op: str, name: str, value: float | torch.Tensor) -> float:
    """A hyperparameter for the in-place kernels: a Python number or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}") from None


def pointers(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def dtype_codes(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [DTYPE_CODES[t.dtype] for t in tensors]


def numels(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [t.numel() for t in tensors]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_steps(op: str, steps: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> int:
    """Per-param step counters, as torch.optim stores them: one-element float tensors of one
    dtype. Returns that dtype's code. The op increments them in place."""
    if len(steps) != len(params):
        raise ValueError(f"{op}: state_steps has {len(steps)} tensors but params has {len(params)}")
    if not steps:
        return DTYPE_CODES[torch.float32]
    dtype = steps[0].dtype
    device = steps[0].device
    for i, s in enumerate(steps):
        if not isinstance(s, torch.Tensor) or s.numel() != 1:
            raise ValueError(f"{op}: state_steps[{i}] must be a one-element tensor")
        if s.device != device:
            raise ValueError(f"{op}: state_steps[{i}] is on {s.device} but state_steps[0] is on "
                             f"{device}; step counters must share one device")
        if s.dtype not in (torch.float32, torch.float64) or s.dtype != dtype:
            raise TypeError(
                f"{op}: state_steps[{i}] has dtype {s.dtype}; step counters must all be float32 "
                "or all float64"
            )
    return DTYPE_CODES[dtype]


def require_cpu_steps(op: str, steps: Sequence[torch.Tensor]) -> None:
    """The native kernels read and increment step counters through their addresses."""
    for i, s in enumerate(steps):
        if s.device.type != "cpu":
            raise ValueError(f"{op}: state_steps[{i}] is on {s.device}; the native kernels need "
                             "CPU step counters")


def is_zero(value: float | torch.Tensor) -> bool:
    """True for a hyperparameter that is the number 0, so a term can be skipped. A tensor is
    never skipped: it may need a gradient even where its value is 0."""
    return not isinstance(value, torch.Tensor) and value == 0


# ---- Task-batched, differentiable steps ---------------------------------------------------
# The machinery every out-of-place step rule shares (fastmeta/ops/<op>.py holds the rule: its
# reference, its kernels and its autograd.Function). Layout: a param is [N] (one task) or
# [T, N] (T tasks); state tensors have the param's shape. A tensor hyperparameter is () (shared)
# or [T] (one per task); ``lr`` may also be [N] or [T, N] (one per parameter, as in Meta-SGD).
#
# Saved memory. A step saves its gradient input (and the param when weight decay reads it).
# Its input *state* is saved only when it does not come straight from another step of the same
# rule: otherwise the backward recomputes it, exactly, by re-running the fused forward from the
# first step of the chain (the "root", which saves its input state). A K-step inner loop thus
# keeps K gradients plus one copy of the state alive between forward and backward, instead of
# K copies of every moment. The first backward of the chain re-runs the K − 1 earlier forwards
# once and hands each step its input state (freed when that step's backward is done): one more
# forward of the update, and during the backward the states are back, as in eager autograd.
# Under create_graph the recomputation is done with differentiable reference ops instead, per
# step, so that second derivatives flow through it.


class StepConfig:
    """The non-tensor input of a step Function (autograd passes it through untouched).

    Attributes:
        op: the public op name (errors, :func:`fastmeta.backends.trace`).
        impl: the resolved implementation.
        floats: hyperparameters given as numbers, by name.
        tensor_names: names of the hyperparameters given as tensors, in argument order.
        flags: rule options (``maximize``, ``nesterov``, ``step``...), by name.
        states: which state inputs are present (a first momentum step has no buffer yet).
        needs_param: the backward (or the state recurrence) reads the param.
    """

    __slots__ = ("op", "impl", "floats", "tensor_names", "flags", "states", "needs_param")

    def __init__(self, op, impl, floats, tensor_names, flags, states, needs_param):
        self.op = op
        self.impl = impl
        self.floats = dict(floats)
        self.tensor_names = tuple(tensor_names)
        self.flags = dict(flags)
        self.states = tuple(states)
        self.needs_param = needs_param

    def with_states(self, states: Sequence[bool]) -> StepConfig:
        """This configuration for a step whose state inputs are ``states`` (present or not),
        e.g. the steps after a first momentum step, which carry a buffer."""
        return StepConfig(self.op, self.impl, self.floats, self.tensor_names, self.flags, states,
                          self.needs_param)

    def hyper(self, name: str, tensors: Sequence[torch.Tensor]):
        """The value of hyperparameter ``name``: its tensor, else its number."""
        if name in self.tensor_names:
            return tensors[self.tensor_names.index(name)]
        return self.floats[name]


# The dtypes of the differentiable steps (and of their kernels: csrc/elem.h,
# FASTMETA_DISPATCH_FLOAT).
BATCHED_DTYPES = (torch.float32, torch.float64)


def check_batched_param(op: str, param: torch.Tensor) -> tuple[int, int]:
    """Checks a ``[N]`` or ``[T, N]`` param and returns ``(T, N)`` (T is 1 for ``[N]``)."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{op}: params must be a tensor or a list of tensors, got "
                        f"{type(param).__name__}")
    if param.dim() not in (1, 2):
        raise ValueError(f"{op}: params must be [N] (one task) or [T, N] (T tasks), got shape "
                         f"{tuple(param.shape)}")
    if param.dtype not in BATCHED_DTYPES:
        raise TypeError(f"{op}: params has dtype {param.dtype}; the differentiable steps "
                        "support float32 and float64 (meta-gradients need the precision)")
    if param.is_sparse:
        raise ValueError(f"{op}: params is sparse; only dense params are supported")
    return (1, param.shape[0]) if param.dim() == 1 else (param.shape[0], param.shape[1])


def check_batched_like(op: str, name: str, t: torch.Tensor, param: torch.Tensor) -> None:
    """``grads`` and state tensors must match the param exactly: shape, dtype, device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.device != param.device:
        raise ValueError(f"{op}: {name} is on {t.device} but params is on {param.device}")
    if t.shape != param.shape:
        if t.dim() == param.dim() == 2 and t.shape[1] == param.shape[1]:
            raise ValueError(f"{op}: {name} has {t.shape[0]} tasks (shape {tuple(t.shape)}) but "
                             f"params has {param.shape[0]} (shape {tuple(param.shape)})")
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but params has shape "
                         f"{tuple(param.shape)}")
    if t.dtype != param.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but params has {param.dtype}; "
                        "mixed dtypes are not supported")
    if t.is_sparse:
        raise ValueError(f"{op}: {name} is sparse; only dense tensors are supported")


def batched_hyper(op: str, name: str, value: float | torch.Tensor, param: torch.Tensor, *,
                  per_element: bool = False) -> float | torch.Tensor:
    """Brings a hyperparameter to its canonical form: a number, a () tensor, a [T] tensor (one
    per task) or, when ``per_element`` (``lr``), an [N] or [T, N] tensor.

    ``[T, 1]`` is accepted as per task and ``[1, N]`` as per element; a 1-D tensor whose length
    is both T and N is ambiguous and refused.
    """
    if not isinstance(value, torch.Tensor):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{op}: {name} must be a number or a tensor, got "
                            f"{type(value).__name__}") from None
    if value.device != param.device:
        raise ValueError(f"{op}: {name} is on {value.device} but params is on {param.device}")
    if not value.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {value.dtype}")
    if value.dtype != param.dtype:
        raise TypeError(f"{op}: {name} has dtype {value.dtype} but params has {param.dtype}; "
                        "mixed dtypes are not supported")
    batched = param.dim() == 2
    tasks, numel = (param.shape[0], param.shape[1]) if batched else (1, param.shape[0])
    shape = tuple(value.shape)
    if value.numel() == 1 and value.dim() <= 1 and not (per_element and numel == 1 and
                                                        value.dim() == 1 and not batched):
        return value.reshape(())
    if batched and shape == (tasks, 1):
        return value.reshape(tasks)
    if per_element and batched and shape == (1, numel):
        return value.reshape(numel)
    if value.dim() == 1 and batched:
        is_task, is_elem = shape[0] == tasks, per_element and shape[0] == numel
        if is_task and is_elem:
            raise ValueError(f"{op}: {name} has shape {shape}, which is ambiguous for params of "
                             f"shape {tuple(param.shape)}; pass [T, 1] for one value per task "
                             "or [1, N] for one per element")
        if is_task or is_elem:
            return value
    if per_element and shape == tuple(param.shape):
        return value
    allowed = "a number, a one-element tensor"
    if batched:
        allowed += f", [T] = ({tasks},) per task"
    if per_element:
        allowed += f", [N] = ({numel},)" + (f" or [T, N] = {tuple(param.shape)}" if batched else "")
        allowed += " per element"
    if value.dim() == 1 and batched and not per_element:
        raise ValueError(f"{op}: {name} has {shape[0]} values but params has {tasks} tasks "
                         f"(expected {allowed})")
    raise ValueError(f"{op}: {name} has shape {shape} but params has shape "
                     f"{tuple(param.shape)} (expected {allowed})")


def broadcastable(name: str, value, param: torch.Tensor):
    """A canonical hyperparameter shaped to broadcast against ``param`` in a reference: a
    per-task [T] becomes [T, 1]; numbers, () tensors and per-element lrs are left alone."""
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or param.dim() != 2:
        return value
    if name != "lr" or lr_mode(value, param.shape[0], param.shape[1]) == "task":
        return value.unsqueeze(1)
    return value


# Read-only hyperparameter tables of all-number configurations; see hyper_table.
_FLOAT_TABLES: dict[tuple[Any, ...], torch.Tensor] = {}
_FLOAT_TABLES_MAX = 256


def hyper_table(cfg: StepConfig, names: Sequence[str], tensors: Sequence[torch.Tensor],
                tasks: int, numel: int, device: torch.device) -> torch.Tensor:
    """A float64 ``[H, T]`` table of per-task hyperparameter values for the kernels. A
    per-element ``lr`` goes to the kernels as its own array; its row holds zeros."""
    values = [cfg.hyper(name, tensors) for name in names]
    if device.type == "cpu" and any(isinstance(v, torch.Tensor) for v in values):
        # On the CPU a () tensor is read as its number (no sync to pay) and a per-element lr
        # row is zeros, so learned scalar hyperparameters (HPO's momentum and weight decay,
        # a Meta-SGD lr) share the cached tables below: building the table from tensors cost
        # ~40-110 µs per step here.
        numbers = []
        for name, value in zip(names, values):
            if not isinstance(value, torch.Tensor):
                numbers.append(value)
            elif value.dim() == 0:
                numbers.append(value.detach().item())
            elif name == "lr" and lr_mode(value, tasks, numel) == "element":
                numbers.append(0.0)
            else:
                break  # a per-task [T] row: built below
        else:
            values = numbers
    if not any(isinstance(v, torch.Tensor) for v in values):  # the common case: all numbers
        # The kernels only read the table, so one per (values, T, device) is kept: building it
        # (~50 µs) cost more than a whole step on a [25, 5] buffer (CAVIA's context).
        key = (tuple(values), tasks, device)
        table = _FLOAT_TABLES.get(key)
        if table is None:
            if len(_FLOAT_TABLES) >= _FLOAT_TABLES_MAX:
                _FLOAT_TABLES.clear()
            table = torch.tensor(values, dtype=torch.float64).unsqueeze(1).expand(-1, tasks)
            table = _FLOAT_TABLES[key] = table.contiguous().to(device, non_blocking=True)
        return table
    rows = []
    for name in names:
        value = cfg.hyper(name, tensors)
        if not isinstance(value, torch.Tensor):
            rows.append(torch.full((tasks,), value, dtype=torch.float64, device=device))
        elif value.dim() == 0:
            rows.append(value.detach().to(torch.float64).expand(tasks))
        elif name == "lr" and lr_mode(value, tasks, numel) == "element":
            rows.append(torch.zeros(tasks, dtype=torch.float64, device=device))
        else:
            rows.append(value.detach().to(torch.float64))
    return torch.stack(rows).contiguous()


def lr_mode(lr, tasks: int, numel: int | None = None) -> str:
    """``scalar`` (a number or () tensor), ``task`` ([T]) or ``element`` ([N] or [T, N])."""
    if not isinstance(lr, torch.Tensor) or lr.dim() == 0:
        return "scalar"
    if lr.dim() == 1 and lr.shape[0] == tasks and tasks > 1 and (numel is None or numel != tasks):
        return "task"
    return "element"


def reduce_hyper_grad(grad_rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per-task gradient sums ``[T]`` (float64, from a kernel) to the hyperparameter's shape."""
    out = grad_rows if value.dim() == 1 else grad_rows.sum()
    return out.to(value.dtype)


# Kernel option bits; must match csrc/kernels.h: enum StepFlag.
FLAG_MAXIMIZE = 1
FLAG_NESTEROV = 2
FLAG_FIRST_STEP = 4
FLAG_DECOUPLED = 8
FLAG_CENTERED = 16
FLAG_MOMENTUM = 32
FLAG_EPS_ROOT = 64
FLAG_WEIGHT_DECAY = 128


class StepRule:
    """One out-of-place update rule, as the shared machinery below sees it. Each
    ``fastmeta/ops/<op>.py`` defines one instance.

    Attributes:
        name: the file stem: ``_C.<name>_forward/_backward`` and ``kernels/<name>.py`` hold its
            kernels.
        state_names: the state slots, in kernel order.
        hyper_names: the hyperparameters, in kernel order (``lr`` first).
    """

    name: str
    state_names: tuple[str, ...]
    hyper_names: tuple[str, ...]

    def out_states(self, cfg: StepConfig) -> tuple[str, ...]:
        """The states this configuration returns, in ``state_names`` order."""
        raise NotImplementedError

    def flags(self, cfg: StepConfig) -> int:
        """The kernel option bits (``FLAG_*``) of this configuration."""
        raise NotImplementedError

    def needs_param(self, hyper: dict, flags: dict) -> bool:
        """Whether the backward or the state recurrence reads the param (weight decay)."""
        return not is_zero(hyper.get("weight_decay", 0.0))

    def reference(self, cfg: StepConfig, param, grad, states: dict, hyper: dict):
        """``(new_param, {state: new_state})`` from the op's ``*_step_reference``."""
        raise NotImplementedError


def _output_count(rule: StepRule, cfg: StepConfig) -> int:
    return 1 + len(rule.out_states(cfg))


def step_forward(rule: StepRule, cfg: StepConfig, param, grad, states, hypers, *,
                 impl=None, want_param: bool = True):
    """Runs the fused forward (no autograd): ``(new_param, *new_states)``. ``param`` may be
    None when ``not cfg.needs_param`` and ``not want_param`` (state recomputation)."""
    impl = cfg.impl if impl is None else impl
    out_names = rule.out_states(cfg)
    if impl is Impl.REFERENCE:
        p = param if param is not None else torch.zeros_like(grad)
        ref_states = {n: s for n, s in zip(rule.state_names, states) if s is not None}
        ref_hyper = {n: broadcastable(n, cfg.hyper(n, hypers), grad) for n in rule.hyper_names}
        new_p, new_states = rule.reference(cfg, p, grad, ref_states, ref_hyper)
        outs = (new_p, *(new_states[n] for n in out_names))
        # A Function may not return an input as it is (a first momentum buffer can be the grad).
        inputs = (param, grad, *states)
        return tuple(o.clone() if any(o is x for x in inputs) else o for o in outs)
    outs = StepKernels(rule, cfg, hypers, grad, impl=impl).forward(cfg, param, grad, states,
                                                                    want_param=want_param)
    return (outs[0] if want_param else None, *outs[1:])


class StepKernels:
    """The fused kernels of one step rule (native or Triton) bound to fixed hyperparameters:
    the float64 table of per-task values, the per-element lr and its stride are made once.

    :func:`step_forward` and :func:`kernel_vjp` make one per call; a caller that runs many
    steps with the same hyperparameters (an unrolled training loop) makes one for all of
    them, and can sum the hyperparameter gradients of every step in one place
    (:meth:`backward`'s ``d_lr`` is added to; each step gets its own ``d_table`` row).

    Args:
        rule, cfg, hypers: the step, as :func:`step_forward` takes them (``cfg`` gives the
            hyperparameter values; its flags may differ per call, e.g. the first step).
        like: a ``[N]`` or ``[T, N]`` tensor of the steps' shape, dtype and device.
        impl: the implementation (default ``cfg.impl``); not the reference.
    """

    def __init__(self, rule: StepRule, cfg: StepConfig, hypers, like: torch.Tensor, *,
                 impl=None) -> None:
        self.rule = rule
        self.impl = cfg.impl if impl is None else impl
        self.tasks, self.numel = (1, like.shape[0]) if like.dim() == 1 else tuple(like.shape)
        self.dtype = like.dtype
        self.table = hyper_table(cfg, rule.hyper_names, hypers, self.tasks, self.numel,
                                 like.device)
        lr = cfg.hyper("lr", hypers)
        self.lr_elem = (lr.detach().contiguous()
                        if lr_mode(lr, self.tasks, self.numel) == "element" else None)
        self.lr_stride = _lr_stride(self.lr_elem, self.numel)

    def new_lr_grad(self) -> torch.Tensor | None:
        """A zeroed accumulator for the per-element lr's gradient (None for another lr)."""
        return torch.zeros_like(self.lr_elem) if self.lr_elem is not None else None

    def new_table_grads(self, steps: int = 1) -> torch.Tensor:
        """``[steps, H, T]`` float64 zeros: one hyperparameter-gradient table per step."""
        return self.table.new_zeros((steps, *self.table.shape))

    def forward(self, cfg: StepConfig, param, grad, states, *,
                want_param: bool = True) -> tuple[torch.Tensor, ...]:
        """``(new_param, *new_states)`` of one step, no autograd. Without ``want_param`` the
        new param may be left unwritten, and ``param`` may be None when
        ``not cfg.needs_param``."""
        rule = self.rule
        out_names = rule.out_states(cfg)
        param_c = param.contiguous() if param is not None else None
        grad_c = grad.contiguous()
        states_c = [s.contiguous() if s is not None else None for s in states]
        new_p = torch.empty_like(grad_c)  # the kernels always write it
        new_states = {n: torch.empty_like(grad_c) for n in out_names}
        step = float(cfg.flags.get("step", 0))
        if grad.numel() == 0:
            pass  # nothing to compute; an empty tensor's address may be 0
        elif self.impl is Impl.NATIVE:
            getattr(native(), f"{rule.name}_forward")(
                _ptr(param_c), grad_c.data_ptr(), [_ptr(s) for s in states_c], _ptr(new_p),
                [_ptr(new_states.get(n)) for n in rule.state_names], self.tasks, self.numel,
                DTYPE_CODES[self.dtype], self.table.data_ptr(), _ptr(self.lr_elem),
                self.lr_stride, step, rule.flags(cfg),
            )
        else:
            triton_kernels(rule.name).step_forward(
                rule, param_c, grad_c, states_c, new_p if want_param else None,
                [new_states.get(n) for n in rule.state_names], self.table, self.lr_elem,
                step=step, flags=rule.flags(cfg),
            )
        return (new_p, *(new_states[n] for n in out_names))

    def backward(self, cfg: StepConfig, param, grad, states, grad_outputs, needs,
                 d_lr: torch.Tensor | None, d_table: torch.Tensor) -> list:
        """The VJP of one step for ``(param, grad, *states)`` (None where ``needs`` is False);
        the hyperparameters' gradients go to ``d_lr`` (added to, see :meth:`new_lr_grad`) and
        ``d_table`` (an ``[H, T]`` row of :meth:`new_table_grads`, overwritten).

        ``grad_outputs`` are the cotangents of ``(new_param, *new_states)`` (None reads as
        zero); ``needs`` covers ``(param, grad, *states)`` at least."""
        rule = self.rule
        contiguous = [t.contiguous() if t is not None else None for t in grad_outputs]
        go_states = {n: t for n, t in zip(rule.out_states(cfg), contiguous[1:])}
        param_c = param.contiguous() if param is not None else None
        grad_c = grad.contiguous()
        states_c = [s.contiguous() if s is not None else None for s in states]
        # Only the wanted input gradients are allocated and written: on large buffers each
        # fresh output costs its page faults as well as its bytes. Without weight decay (the
        # number 0) every rule has ∂θ'/∂θ = I, so θ̄ is the incoming θ̄' itself and the kernel
        # skips it.
        identity_param_vjp = not cfg.needs_param
        d_param = None
        if needs[0] and not identity_param_vjp:
            d_param = torch.empty_like(grad_c)
        d_grad = torch.empty_like(grad_c) if needs[1] else None
        d_states = [torch.empty_like(grad_c) if s is not None else None for s in states]
        step = float(cfg.flags.get("step", 0))
        if grad.numel() == 0:
            pass  # nothing to compute; an empty tensor's address may be 0
        elif self.impl is Impl.NATIVE:
            getattr(native(), f"{rule.name}_backward")(
                _ptr(param_c), grad_c.data_ptr(), [_ptr(s) for s in states_c],
                _ptr(contiguous[0]), [_ptr(go_states.get(n)) for n in rule.state_names],
                _ptr(d_param), _ptr(d_grad), [_ptr(d) for d in d_states], _ptr(d_lr),
                d_table.data_ptr(), self.tasks, self.numel, DTYPE_CODES[self.dtype],
                self.table.data_ptr(), _ptr(self.lr_elem), self.lr_stride, step,
                rule.flags(cfg),
            )
        else:
            # The Triton kernels write the lr gradient (the native ones add to it).
            step_d_lr = torch.empty_like(d_lr) if d_lr is not None else None
            triton_kernels(rule.name).step_backward(
                rule, param_c, grad_c, states_c, contiguous[0],
                [go_states.get(n) for n in rule.state_names], d_param, d_grad, d_states,
                step_d_lr, d_table, self.table, self.lr_elem, step=step, flags=rule.flags(cfg),
            )
            if d_lr is not None:
                d_lr.add_(step_d_lr)
        if identity_param_vjp and needs[0]:
            d_param = grad_outputs[0]  # None (no θ̄') reads as zero to autograd
        results = [d_param, d_grad, *d_states]
        return [r if need else None for r, need in zip(results, needs)]

    def hyper_grads(self, cfg: StepConfig, hypers, d_lr: torch.Tensor | None,
                    d_table: torch.Tensor) -> list[torch.Tensor]:
        """The gradients of the tensor hyperparameters ``hypers`` (in ``cfg.tensor_names``
        order) from :meth:`backward`'s accumulators (``d_table``: ``[H, T]``, summed over the
        steps)."""
        out = []
        for name, value in zip(cfg.tensor_names, hypers):
            if name == "lr" and self.lr_elem is not None:
                out.append(d_lr)
            else:
                out.append(reduce_hyper_grad(d_table[self.rule.hyper_names.index(name)], value))
        return out


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _lr_stride(lr_elem: torch.Tensor | None, numel: int) -> int:
    """Elements between two tasks' rows of a per-element lr: 0 for a shared [N] lr."""
    return numel if lr_elem is not None and lr_elem.dim() == 2 else 0


def split_inputs(rule: StepRule, rest):
    """Splits a step Function's inputs after ``(cfg, param, grad)`` into states and tensor
    hyperparameters."""
    ns = len(rule.state_names)
    return list(rest[:ns]), list(rest[ns:])


def step_setup_context(rule: StepRule, ctx, inputs, output) -> None:
    """Saves the gradient (and the param when it is read), and the input state only where it
    cannot be recomputed from an earlier step (see the section comment above)."""
    cfg, param, grad, *rest = inputs
    states, hypers = split_inputs(rule, rest)
    producer = _producer(rule, ctx, cfg, states)
    saved_states = [None] * len(states) if producer is not None else states
    ctx.save_for_backward(grad, param if cfg.needs_param else None, *saved_states, *hypers)
    ctx.cfg = cfg
    ctx.producer = producer
    ctx.state_cache = None
    ctx.param_shape = param.shape
    ctx.set_materialize_grads(False)


def _producer(rule: StepRule, ctx, cfg: StepConfig, states):
    """The step of the same rule whose outputs are exactly this step's input states, if any."""
    present = [(n, s) for n, s in zip(rule.state_names, states) if s is not None]
    if not present:
        return None
    fn = present[0][1].grad_fn
    if fn is None or type(fn) is not type(ctx) or getattr(fn, "cfg", None) is None:
        return None
    outs = rule.out_states(fn.cfg)
    for name, s in present:
        if s.grad_fn is not fn or s._version != 0 or name not in outs \
                or s.output_nr != 1 + outs.index(name):
            return None
    if tuple(n for n, _ in present) != tuple(n for n in outs):
        return None
    return fn


def _saved(rule: StepRule, ctx):
    grad, param, *rest = ctx.saved_tensors
    states, hypers = split_inputs(rule, rest)
    return param, grad, states, hypers


def _input_states(rule: StepRule, ctx, differentiable: bool):
    """This step's input states: saved (a chain root), cached by a later step's backward, or
    recomputed by re-running the forward of every step since the root. Recomputation runs the
    same deterministic kernel as the forward did, so the values are the same bits."""
    if ctx.producer is None:
        return _saved(rule, ctx)[2]
    if not differentiable and ctx.state_cache is not None:
        states, ctx.state_cache = ctx.state_cache, None
        return states
    path = [ctx]
    while path[-1].producer is not None:
        path.append(path[-1].producer)
    path.reverse()  # root first, this step last
    states = _saved(rule, path[0])[2]
    for node, nxt in zip(path[:-1], path[1:]):
        param, grad, _, hypers = _saved(rule, node)
        impl = Impl.REFERENCE if differentiable else node.cfg.impl
        outs = step_forward(rule, node.cfg, param, grad, states, hypers, impl=impl,
                            want_param=False)
        by_name = dict(zip(rule.out_states(node.cfg), outs[1:]))
        states = [by_name.get(n) for n in rule.state_names]
        if not differentiable and nxt is not ctx:
            nxt.state_cache = states
    return states


def step_backward(rule: StepRule, ctx, grad_outputs):
    """The VJP of one step. With ``create_graph`` it runs differentiable torch ops (autograd of
    the reference), so it can itself be differentiated; otherwise the fused backward kernel of
    the step's implementation."""
    cfg = ctx.cfg
    param, grad, _, hypers = _saved(rule, ctx)
    grad_outputs = list(grad_outputs)
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*ctx.saved_tensors, *grad_outputs)
    )
    states = _input_states(rule, ctx, differentiable)
    needs = ctx.needs_input_grad[1:]  # param, grad, *states, *hypers
    if differentiable or cfg.impl is Impl.REFERENCE:
        grads = reference_vjp(rule, cfg, param, grad, states, hypers, grad_outputs, needs,
                               ctx.param_shape)
    else:
        grads = kernel_vjp(rule, cfg, param, grad, states, hypers, grad_outputs, needs)
    return (None, *grads)


def reference_vjp(rule, cfg, param, grad, states, hypers, grad_outputs, needs, param_shape):
    """The VJP by ``torch.func.vjp`` of the reference: plain differentiable torch ops, so the
    result can be differentiated again (create_graph, gradgradcheck) and it composes with the
    torch.func transforms."""
    inputs = [param, grad, *states, *hypers]
    if param is None:  # not saved: the VJP does not depend on its value
        inputs[0] = torch.zeros(param_shape, dtype=grad.dtype, device=grad.device)
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs[i]]
    result = [None] * len(inputs)
    if not wanted:
        return result

    def forward(*primals):
        args = list(inputs)
        for i, t in zip(wanted, primals):
            args[i] = t
        p, g, *rest = args
        st, hy = split_inputs(rule, rest)
        return tuple(step_forward(rule, cfg, p, g, st, hy, impl=Impl.REFERENCE))

    outs, vjp_fn = torch.func.vjp(forward, *(inputs[i] for i in wanted))
    cotangents = tuple(go if go is not None else torch.zeros_like(o)
                       for o, go in zip(outs, grad_outputs))
    for i, gi in zip(wanted, vjp_fn(cotangents)):
        result[i] = gi
    return result


def kernel_vjp(rule, cfg, param, grad, states, hypers, grad_outputs, needs):
    """The VJP of one step by the fused backward kernel of ``cfg.impl`` (native or Triton; the
    reference implementation's VJP is :func:`reference_vjp`). Not differentiable.

    Args:
        rule, cfg: the step, as :func:`step_forward` takes them.
        param, grad, states, hypers: the step's inputs (``param`` may be None when
            ``not cfg.needs_param``; a missing state is None).
        grad_outputs: the cotangents of ``(new_param, *new_states)``; None reads as zero.
        needs: which of ``(param, grad, *states, *hypers)`` need a gradient.

    Returns:
        The gradients of ``[param, grad, *states, *hypers]``, None where not needed.
    """
    kernels = StepKernels(rule, cfg, hypers, grad)
    d_lr, d_table = kernels.new_lr_grad(), kernels.new_table_grads()[0]
    ns = len(rule.state_names)
    results = kernels.backward(cfg, param, grad, states, grad_outputs, needs[:2 + ns], d_lr,
                               d_table)
    d_hypers = kernels.hyper_grads(cfg, hypers, d_lr, d_table)
    return results + [d if need else None for d, need in zip(d_hypers, needs[2 + ns:])]


def step_vmap(function, rule: StepRule, info, in_dims, cfg: StepConfig, *args):
    """torch.func.vmap for a step Function: the vmapped dimension becomes (part of) the task
    dimension, so one kernel call still covers every sample. Per-task and per-element
    hyperparameters are expanded to the flattened task dimension."""
    batch = info.batch_size
    param, grad, *rest = args
    dims = in_dims[1:]
    logical = param.dim() - (dims[0] is not None)
    tasks = 1 if logical == 1 else (param.shape[1] if dims[0] is not None else param.shape[0])

    def front(t, d):
        if t is None:
            return None
        return t.movedim(d, 0) if d is not None else t.expand(batch, *t.shape)

    def as_rows(t, d):  # a param-shaped tensor -> [batch * tasks, N]
        if t is None:
            return None
        t = front(t, d)
        return t.reshape(batch * tasks, t.shape[-1])

    states, hypers = split_inputs(rule, rest)
    new_param, new_grad = as_rows(param, dims[0]), as_rows(grad, dims[1])
    new_states = [as_rows(s, d) for s, d in zip(states, dims[2:2 + len(states)])]
    new_hypers = []
    for name, h, d in zip(cfg.tensor_names, hypers, dims[2 + len(states):]):
        h = front(h, d)  # [B], [B, T], [B, N] or [B, T, N]
        numel = param.shape[-1]
        if name == "lr" and h.dim() >= 2 and h.shape[-1] == numel and not (
                logical == 2 and h.dim() == 2 and h.shape[-1] == tasks and numel != tasks):
            h = h.reshape(batch, -1, numel).expand(batch, tasks, numel).reshape(-1, numel)
        else:
            h = h.reshape(batch, -1).expand(batch, tasks).reshape(-1)
        new_hypers.append(h)
    outs = function.apply(cfg, new_param, new_grad, *new_states, *new_hypers)
    shape = (batch, tasks, param.shape[-1]) if logical == 2 else (batch, param.shape[-1])
    outs = tuple(o.reshape(shape) for o in outs)
    return outs, tuple(0 for _ in outs)


def prepare_step(rule: StepRule, op: str, impl, param: torch.Tensor, grad: torch.Tensor,
                 states: dict, hypers: dict, flags: dict) -> tuple[StepConfig, list]:
    """Validates one out-of-place step, brings its hyperparameters to canonical form (see
    :func:`batched_hyper`) and resolves its implementation (recorded for
    :func:`fastmeta.backends.trace` under ``op``).

    Returns:
        ``(cfg, tensor_hypers)``: the step's :class:`StepConfig` and its tensor hyperparameters
        in ``cfg.tensor_names`` order, as :func:`step_forward` and :func:`kernel_vjp` take them.
    """
    check_batched_param(op, param)
    check_batched_like(op, "grads", grad, param)
    for name, s in states.items():
        if s is not None:
            check_batched_like(op, name, s, param)
    canonical = {n: batched_hyper(op, n, hypers[n], param, per_element=n == "lr")
                 for n in rule.hyper_names}
    floats = {n: v for n, v in canonical.items() if not isinstance(v, torch.Tensor)}
    tensor_names = tuple(n for n in rule.hyper_names if isinstance(canonical[n], torch.Tensor))
    which = resolve(impl, param.device, op=op)
    present = tuple(states.get(n) is not None for n in rule.state_names)
    cfg = StepConfig(op, which, floats, tensor_names, flags, present,
                     rule.needs_param(canonical, flags))
    return cfg, [canonical[n] for n in tensor_names]


def run_step(function, rule: StepRule, op: str, impl, param: torch.Tensor, grad: torch.Tensor,
             states: dict, hypers: dict, flags: dict):
    """Validates one out-of-place step, resolves its implementation and applies ``function``.

    Returns ``(new_param, {state: new_state})``.
    """
    cfg, tensor_hypers = prepare_step(rule, op, impl, param, grad, states, hypers, flags)
    outs = function.apply(cfg, param, grad, *(states.get(n) for n in rule.state_names),
                          *tensor_hypers)
    return outs[0], dict(zip(rule.out_states(cfg), outs[1:]))
