// The interface between bindings.cpp (generic flags, OpenMP, pybind11) and the kernel files,
// each of which is compiled once per ISA into its own namespace (see setup.py).
// Kernel files include no STL: inline STL functions compiled with AVX-512 flags could be
// merged by the linker into the generic path and crash older CPUs.
#pragma once
#include <cstdint>

namespace fastmeta {

// Must match fastmeta/ops/tensor_lists.py: DTYPE_CODES.
enum DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ---- SGD (with momentum, dampening, Nesterov) ---------------------------------------------
struct SgdArgs {
  double lr, weight_decay, momentum, dampening;
  bool nesterov, maximize, first_step;
};
struct SgdTensor {
  void* param;
  const void* grad;
  void* momentum_buffer;  // nullptr when momentum == 0
  void* direction;        // SGD-HD: u_t, the step's lr-free direction, written; else nullptr
};

// ---- Adam / AdamW --------------------------------------------------------------------------
struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled_weight_decay;
};
struct AdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr unless amsgrad
  double step_size;              // lr / (1 - beta1^t)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^t)
};

// ---- Adagrad -------------------------------------------------------------------------------
struct AdagradArgs {
  double weight_decay, eps;
  bool maximize;
};
struct AdagradTensor {
  void* param;
  const void* grad;
  void* state_sum;
  double clr;  // lr / (1 + (t - 1) * lr_decay)
};

// ---- RMSprop -------------------------------------------------------------------------------
struct RmspropArgs {
  double lr, alpha, eps, weight_decay, momentum;
  bool centered, maximize;
};
struct RmspropTensor {
  void* param;
  const void* grad;
  void* square_avg;
  void* momentum_buffer;  // nullptr when momentum == 0
  void* grad_avg;         // nullptr unless centered
};

// ---- Hypergradient descent: SGD-HD and Adam-HD (csrc/hypergrad.cpp) ------------------------
// Two phases per call: hd_dot_chunk returns a chunk's Σ d·u_{t−1} in double (d = ±g + wd·θ),
// then the update runs with the new lr and stores the step's lr-free direction u_t: SGD-HD
// through sgd_chunk (SgdTensor::direction), Adam-HD through adam_hd_chunk.
struct HdAdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool maximize;
};
struct HdAdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* direction;               // u_{t−1} in, u_t = m̂/(√v̂ + ε) out
  double bias_correction1;       // 1 − β1^t
  double bias_correction2_sqrt;  // √(1 − β2^t)
};

// ---- Out-of-place, task-batched, differentiable steps (fastmeta/ops/tensor_lists.py) --------
// Tensors are [T, N] row-major (T = 1 for [N]). A chunk covers columns [begin, begin + n) of
// every task row, so a per-element lr shared by the tasks ([N]) gets its gradient summed over
// the tasks inside one chunk, without races.

// Option bits; must match fastmeta/ops/tensor_lists.py: FLAG_*.
enum StepFlag : int32_t {
  kFlagMaximize = 1,
  kFlagNesterov = 2,
  kFlagFirstStep = 4,
  kFlagDecoupled = 8,
  kFlagCentered = 16,
  kFlagMomentum = 32,
  kFlagEpsRoot = 64,
  kFlagWeightDecay = 128,
};
constexpr int kMaxStates = 3;
constexpr int kMaxHypers = 6;

struct BatchedStep {
  int64_t tasks, numel;
  const void* param;                // nullptr: not needed (then read as 0)
  const void* grad;
  const void* state[kMaxStates];    // inputs, nullptr when absent
  void* param_out;                  // nullptr: only the states are wanted
  void* state_out[kMaxStates];      // nullptr when not an output
  const double* hyper;              // [H][tasks]: per-task hyperparameter values
  const void* lr;                   // per-element lr (param dtype) or nullptr
  int64_t lr_task_stride;           // 0 for an [N] lr shared by the tasks, numel for [T, N]
  double step;                      // for bias corrections: 1 on the first step
  int32_t flags;                    // StepFlag bits
  const void* zeros;                // zero buffer of >= a chunk's columns x 8 bytes: absent inputs
};
struct BatchedGrad {
  const void* grad_param_out;           // incoming ∂L/∂θ', nullptr = 0
  const void* grad_state_out[kMaxStates];  // incoming ∂L/∂state', nullptr = 0
  void* grad_param;                     // outgoing, all [T, N]; nullptr = not wanted
  void* grad_grad;                      // outgoing [T, N]; nullptr = not wanted
  void* grad_state[kMaxStates];         // nullptr when the input state is absent
  void* grad_lr;                        // per-element ∂L/∂lr (shape of lr, zeroed: added to)
  double* hyper_grad;                   // [H][tasks] partial sums of this chunk (zeroed)
};

// Hyperparameter rows of each rule in BatchedStep::hyper; must match the rules' hyper_names.
enum SgdHyper { kSgdLr, kSgdWeightDecay, kSgdMomentum, kSgdDampening, kSgdHypers };
enum AdamHyper { kAdamLr, kAdamBeta1, kAdamBeta2, kAdamEps, kAdamWeightDecay, kAdamEpsRoot, kAdamHypers };
enum AdagradHyper { kAdagradLr, kAdagradLrDecay, kAdagradWeightDecay, kAdagradEps, kAdagradHypers };
enum RmspropHyper { kRmspropLr, kRmspropAlpha, kRmspropEps, kRmspropWeightDecay, kRmspropMomentum, kRmspropHypers };

// ---- The learned LSTM rule (csrc/lstm_rule.cpp, fastmeta/ops/lstm_rule.py) -----------------
// n coordinates, hidden size H. States are [n, H] row-major; everything is one dtype (float32
// or float64) except `skipped` (bool bytes). The weights, in LstmWeight order, are those of two
// nn.LSTMCell (the two biases of a cell added: b = b_ih + b_hh) and of the head nn.Linear(H, 1).
enum LstmWeight {
  kLstmWIh1,   // [4H, 2]
  kLstmWHh1,   // [4H, H]
  kLstmB1,     // [4H]
  kLstmWIh2,   // [4H, H]
  kLstmWHh2,   // [4H, H]
  kLstmB2,     // [4H]
  kLstmWHead,  // [H]
  kLstmBHead,  // [1]
  kLstmWeights
};
struct LstmRule {
  int64_t hidden;
  const void* grad;               // [n] gradients g
  const void* state[4];           // h1, c1, h2, c2; nullptr reads as zeros (the first step)
  const void* weight[kLstmWeights];
  double p, output_scale;         // preprocessing constant, factor on the head's output
  void* update;                   // [n] out: u (0 where g is not finite)
  void* state_out[4];             // [n, H] out, nullptr = not wanted
  uint8_t* skipped;               // [n] out: g was not finite; nullptr = not wanted
};
struct LstmRuleGrad {
  const void* grad_update;        // [n] ∂L/∂u, nullptr = 0
  const void* grad_state_out[4];  // [n, H] ∂L/∂state', nullptr = 0
  void* grad_grad;                // [n] out ∂L/∂g, nullptr = not wanted
  void* grad_state[4];            // [n, H] out ∂L/∂state, nullptr = not wanted
  // This chunk's float64 partial sums of the weight gradients (zeroed, added to), the weights
  // concatenated flat in LstmWeight order; nullptr = not wanted.
  double* weight_grad;
};

// ---- Max-pooling over non-overlapping windows (csrc/max_pool.cpp) --------------------------
// A [planes, height, width] contiguous input; window = stride = kernel_h x kernel_w, floor mode.
struct MaxPool {
  int64_t height, width, kernel_h, kernel_w, out_height, out_width;
};

#define FASTMETA_DECLARE_BATCHED(ISA, OP)                                                        \
  void OP##_forward_chunk(const BatchedStep& s, DType dtype, int64_t begin, int64_t n);        \
  void OP##_backward_chunk(const BatchedStep& s, const BatchedGrad& g, DType dtype, int64_t begin, \
                           int64_t n);

#define FASTMETA_DECLARE_KERNELS(ISA)                                                          \
  namespace ISA {                                                                              \
  void sgd_chunk(const SgdTensor& t, DType dtype, int64_t begin, int64_t n, const SgdArgs& a); \
  void adam_chunk(const AdamTensor& t, DType dtype, int64_t begin, int64_t n,                  \
                  const AdamArgs& a);                                                          \
  void adagrad_chunk(const AdagradTensor& t, DType dtype, int64_t begin, int64_t n,            \
                     const AdagradArgs& a);                                                    \
  void rmsprop_chunk(const RmspropTensor& t, DType dtype, int64_t begin, int64_t n,            \
                     const RmspropArgs& a);                                                    \
  bool stream_chunk(float* const* arrays, int num_reads, int num_writes, int64_t begin,        \
                    int64_t n);                                                                \
  FASTMETA_DECLARE_BATCHED(ISA, sgd)                                                           \
  FASTMETA_DECLARE_BATCHED(ISA, adam)                                                          \
  FASTMETA_DECLARE_BATCHED(ISA, adagrad)                                                       \
  FASTMETA_DECLARE_BATCHED(ISA, rmsprop)                                                       \
  double hd_dot_chunk(const void* param, const void* grad, const void* direction, DType dtype,  \
                      int64_t begin, int64_t n, double weight_decay, bool maximize);           \
  void adam_hd_chunk(const HdAdamTensor& t, DType dtype, int64_t begin, int64_t n,             \
                     const HdAdamArgs& a);                                                     \
  bool lstm_rule_forward_chunk(const LstmRule& a, DType dtype, int64_t begin, int64_t n);      \
  bool lstm_rule_backward_chunk(const LstmRule& a, const LstmRuleGrad& g, DType dtype,         \
                                int64_t begin, int64_t n);                                     \
  void max_pool_forward_planes(const MaxPool& a, DType dtype, const void* input, void* output,  \
                               uint8_t* argmax, int64_t begin, int64_t n);                     \
  void max_pool_scatter_planes(const MaxPool& a, DType dtype, const void* grad_output,         \
                               const uint8_t* argmax, void* grad_input, int64_t begin,         \
                               int64_t n);                                                     \
  void max_pool_gather_planes(const MaxPool& a, DType dtype, const void* grad_input_grad,      \
                              const uint8_t* argmax, void* out, int64_t begin, int64_t n);     \
  }

FASTMETA_DECLARE_KERNELS(avx512)
FASTMETA_DECLARE_KERNELS(avx2)
FASTMETA_DECLARE_KERNELS(generic)

}  // namespace fastmeta
