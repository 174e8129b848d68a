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
  }

FASTMETA_DECLARE_KERNELS(avx512)
FASTMETA_DECLARE_KERNELS(avx2)
FASTMETA_DECLARE_KERNELS(generic)

}  // namespace fastmeta
