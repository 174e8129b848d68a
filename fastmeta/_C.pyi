# Typed stub of the native extension (csrc/bindings.cpp). Every list argument holds one entry
# per tensor: data addresses (int), element counts, or dtype codes from
# fastmeta.ops.tensor_lists.DTYPE_CODES. An empty address list means "this state is unused".

CHUNK_ELEMENTS: int

def isa() -> str: ...
def num_threads() -> int: ...
def has_openmp() -> bool: ...
def sgd_step(
    params: list[int],
    grads: list[int],
    momentum_buffers: list[int],
    numels: list[int],
    dtypes: list[int],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> None: ...
def adam_step(
    params: list[int],
    grads: list[int],
    exp_avgs: list[int],
    exp_avg_sqs: list[int],
    max_exp_avg_sqs: list[int],
    steps: list[int],
    step_dtype: int,
    numels: list[int],
    dtypes: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> None: ...
def adagrad_step(
    params: list[int],
    grads: list[int],
    state_sums: list[int],
    steps: list[int],
    step_dtype: int,
    numels: list[int],
    dtypes: list[int],
    *,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None: ...
def rmsprop_step(
    params: list[int],
    grads: list[int],
    square_avgs: list[int],
    momentum_buffers: list[int],
    grad_avgs: list[int],
    steps: list[int],
    step_dtype: int,
    numels: list[int],
    dtypes: list[int],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None: ...
class PreparedGroup:
    """A param group prepared for the optimizers' per-step fast path: each method reads every
    param's ``.grad`` and runs that optimizer's step, or returns False having done nothing when
    the group is not as prepared (see csrc/bindings.cpp)."""

    def __init__(
        self,
        op: str,
        params: list,
        param_ptrs: list[int],
        states: list[list[int]],
        steps: list[int],
        step_dtype: int,
        numels: list[int],
        dtypes: list[int],
    ) -> None: ...
    def sgd(self, params: list, lr: float, weight_decay: float, momentum: float,
            dampening: float, nesterov: bool, maximize: bool) -> bool: ...
    def adam(self, params: list, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float, amsgrad: bool, maximize: bool,
             decoupled_weight_decay: bool) -> bool: ...
    def adagrad(self, params: list, lr: float, lr_decay: float, weight_decay: float,
                eps: float, maximize: bool) -> bool: ...
    def rmsprop(self, params: list, lr: float, alpha: float, eps: float, weight_decay: float,
                momentum: float, centered: bool, maximize: bool) -> bool: ...
    def sgd_hd(self, params: list, lr: float, hypergrad_lr: float, weight_decay: float,
               momentum: float, dampening: float, nesterov: bool,
               maximize: bool) -> tuple[float, float] | None: ...
    def adam_hd(self, params: list, lr: float, hypergrad_lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, maximize: bool) -> tuple[float, float] | None: ...

def sgd_hd_step(
    params: list[int],
    grads: list[int],
    momentum_buffers: list[int],
    directions: list[int],
    numels: list[int],
    dtypes: list[int],
    *,
    lr: float,
    hypergrad_lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> tuple[float, float]: ...
def adam_hd_step(
    params: list[int],
    grads: list[int],
    exp_avgs: list[int],
    exp_avg_sqs: list[int],
    directions: list[int],
    steps: list[int],
    step_dtype: int,
    numels: list[int],
    dtypes: list[int],
    *,
    lr: float,
    hypergrad_lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> tuple[float, float]: ...

def stream(streams: list[list[int]], num_writes: int, numels: list[int]) -> None: ...

# Max-pooling over non-overlapping windows (fastmeta/ops/max_pool.py): pass_ 0 forward (writes
# argmax, uint8), 1 scatter (the backward), 2 gather (the scatter's adjoint), on contiguous
# [planes, height, width] planes.
def max_pool(pass_: int, source: int, target: int, argmax: int, dtype: int, planes: int,
             height: int, width: int, kernel_h: int, kernel_w: int) -> None: ...

# Out-of-place, task-batched, differentiable steps (fastmeta/ops/tensor_lists.py). Every tensor
# is a [T, N] contiguous buffer of one dtype (code `dtype`); an address of 0 means "absent".
# `states`/`states_out` hold one address per state slot of the rule (sgd: momentum buffer;
# adam: m, v; adagrad: sum; rmsprop: square_avg, momentum buffer, grad_avg). `hyper` is the
# address of a float64 [H, T] table of per-task hyperparameters, `lr` of a per-element lr ([N]
# with lr_task_stride 0, or [T, N] with stride N), `flags` the StepFlag bits of csrc/kernels.h.
def sgd_forward(param: int, grad: int, states: list[int], param_out: int, states_out: list[int],
                tasks: int, numel: int, dtype: int, hyper: int, lr: int, lr_task_stride: int,
                step: float, flags: int) -> None: ...
def sgd_backward(param: int, grad: int, states: list[int], grad_param_out: int,
                 grad_states_out: list[int], grad_param: int, grad_grad: int,
                 grad_states: list[int], grad_lr: int, hyper_grad: int, tasks: int, numel: int,
                 dtype: int, hyper: int, lr: int, lr_task_stride: int, step: float,
                 flags: int) -> None: ...
def adam_forward(param: int, grad: int, states: list[int], param_out: int, states_out: list[int],
                 tasks: int, numel: int, dtype: int, hyper: int, lr: int, lr_task_stride: int,
                 step: float, flags: int) -> None: ...
def adam_backward(param: int, grad: int, states: list[int], grad_param_out: int,
                  grad_states_out: list[int], grad_param: int, grad_grad: int,
                  grad_states: list[int], grad_lr: int, hyper_grad: int, tasks: int, numel: int,
                  dtype: int, hyper: int, lr: int, lr_task_stride: int, step: float,
                  flags: int) -> None: ...
def adagrad_forward(param: int, grad: int, states: list[int], param_out: int,
                    states_out: list[int], tasks: int, numel: int, dtype: int, hyper: int,
                    lr: int, lr_task_stride: int, step: float, flags: int) -> None: ...
def adagrad_backward(param: int, grad: int, states: list[int], grad_param_out: int,
                     grad_states_out: list[int], grad_param: int, grad_grad: int,
                     grad_states: list[int], grad_lr: int, hyper_grad: int, tasks: int,
                     numel: int, dtype: int, hyper: int, lr: int, lr_task_stride: int,
                     step: float, flags: int) -> None: ...
def rmsprop_forward(param: int, grad: int, states: list[int], param_out: int,
                    states_out: list[int], tasks: int, numel: int, dtype: int, hyper: int,
                    lr: int, lr_task_stride: int, step: float, flags: int) -> None: ...
def rmsprop_backward(param: int, grad: int, states: list[int], grad_param_out: int,
                     grad_states_out: list[int], grad_param: int, grad_grad: int,
                     grad_states: list[int], grad_lr: int, hyper_grad: int, tasks: int,
                     numel: int, dtype: int, hyper: int, lr: int, lr_task_stride: int,
                     step: float, flags: int) -> None: ...

# The learned LSTM rule (csrc/lstm_rule.cpp; fastmeta/ops/lstm_rule.py). n coordinates, hidden
# size `hidden`, one dtype (code `dtype`: float32 or float64). `state` holds the addresses of
# h1, c1, h2, c2 ([n, hidden] each), or is empty for zeros; `weights` the 8 tensors of
# fastmeta.ops.lstm_rule.LSTMRuleWeights in order. An address of 0 means "absent" (an input
# read as zeros) or "not wanted" (an output). `skipped` is a bool [n] output.
def lstm_rule_forward(grad: int, state: list[int], weights: list[int], update: int,
                      state_out: list[int], skipped: int, n: int, hidden: int, dtype: int,
                      p: float, output_scale: float) -> None: ...
def lstm_rule_backward(grad: int, state: list[int], weights: list[int], grad_update: int,
                       grad_state_out: list[int], grad_grad: int, grad_state: list[int],
                       weight_grads: list[int], n: int, hidden: int, dtype: int, p: float,
                       output_scale: float) -> None: ...

class MlpUnroll:
    """K momentum-SGD steps of a ReLU MLP (csrc/mlp_unroll.h; fastmeta/ops/mlp_unroll.py).
    ``gemm`` is the address of the BLAS ``sgemm_``/``dgemm_`` of ``dtype``; ``layers`` holds
    (weight offset, bias offset or -1, d_in, d_out) per layer."""

    def __init__(self, gemm: int, layers: list[int], theta0: int, buffer0: int, x: int, y: int,
                 steps: int, batch: int, thetas: int, buffers: int, grads: int,
                 hs: list[int], deltas: list[int], q: int, numel: int, dtype: int, hyper: int,
                 lr: int, lr_stride: int, step: float, flags_first: int,
                 flags_later: int) -> None: ...
    def forward(self) -> None: ...
    def backward(self, needs_param: bool, theta_bar: int, buffer_bar: int, d_lr: int,
                 d_tables: int, num_hypers: int, theta_bar0: int, buffer_bar0: int) -> None: ...
