// Element access for the kernel files: every storage dtype is loaded into a compute type
// (float for fp32/fp16/bf16, double for fp64) and stored back with round-to-nearest-even.
// Only compiler builtins here, no STL (see kernels.h).
#pragma once
#include <cstdint>

#include "kernels.h"

#ifndef FASTMETA_ISA
#error "kernel files are compiled by setup.py with -DFASTMETA_ISA=<avx512|avx2|generic>"
#endif
#ifndef __FLT16_MAX__
#error "fastmeta needs a compiler with _Float16 (GCC >= 12 or Clang >= 15)"
#endif

// Asserts that the next loop has no loop-carried memory dependences (it vectorizes without
// run-time alias checks). Clang has its own spelling.
#if defined(__clang__)
#define FASTMETA_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#else
#define FASTMETA_IVDEP _Pragma("GCC ivdep")
#endif

namespace fastmeta {

struct bfloat16 {
  uint16_t bits;
};

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using C = float;
  static inline C load(const float* p) { return *p; }
  static inline void store(float* p, C v) { *p = v; }
};

template <>
struct Elem<double> {
  using C = double;
  static inline C load(const double* p) { return *p; }
  static inline void store(double* p, C v) { *p = v; }
};

template <>
struct Elem<_Float16> {
  using C = float;
  static inline C load(const _Float16* p) { return static_cast<float>(*p); }
  static inline void store(_Float16* p, C v) { *p = static_cast<_Float16>(v); }
};

template <>
struct Elem<bfloat16> {
  using C = float;
  static inline C load(const bfloat16* p) {
    uint32_t u = static_cast<uint32_t>(p->bits) << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
  }
  static inline void store(bfloat16* p, C v) {
    uint32_t u;
    __builtin_memcpy(&u, &v, sizeof u);
    // NaN stays a quiet NaN; everything else rounds to nearest even, as torch does.
    uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
    p->bits = (v != v) ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(rounded >> 16);
  }
};

static inline float fm_sqrt(float x) { return __builtin_sqrtf(x); }
static inline double fm_sqrt(double x) { return __builtin_sqrt(x); }

template <typename T>
static inline T* offset(void* base, int64_t begin) {
  return base ? static_cast<T*>(base) + begin : nullptr;
}
template <typename T>
static inline const T* offset(const void* base, int64_t begin) {
  return base ? static_cast<const T*>(base) + begin : nullptr;
}

// ---- Helpers of the task-batched kernels (BatchedStep) -----------------------------------------
// Their inner loops must vectorize: every option is a template parameter, an absent input
// reads a buffer of zeros instead of being tested per element, and hyperparameter gradients
// are reduced through short stack arrays with independent accumulators.

// x^y for the bias corrections, without the STL (see kernels.h).
static inline double fm_pow(double x, double y) { return __builtin_pow(x, y); }

// Row segment of an optional input at element offset o, or the zero buffer when it is absent.
template <typename T>
static inline const T* row_or_zeros(const void* base, int64_t o, const BatchedStep& s) {
  return base ? static_cast<const T*>(base) + o : static_cast<const T*>(s.zeros);
}

// Row segment of an optional output at element offset o, or nullptr when it is not wanted.
template <typename T>
static inline T* optional_row(void* base, int64_t o) {
  return base ? static_cast<T*>(base) + o : nullptr;
}

// Columns per reduction block: the per-element hyperparameter-gradient terms of one block sit
// in stack arrays (6 of them x 256 x 8 B = 12 KiB at most, inside L1).
constexpr int64_t kReduceBlock = 256;
// Independent accumulators of lane_sum: one AVX-512 vector of doubles.
constexpr int kSumLanes = 8;

// Sum of x[0, n) in double, in a fixed order (deterministic) with kSumLanes accumulators, so
// that the compiler can vectorize it without reassociating floating-point adds.
template <typename C>
static inline double lane_sum(const C* x, int64_t n) {
  double acc[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) acc[l] += static_cast<double>(x[i + l]);
  double total = 0.0;
  for (; i < n; ++i) total += static_cast<double>(x[i]);
  for (int l = 0; l < kSumLanes; ++l) total += acc[l];
  return total;
}

// Runs BODY with NAME bound to the compile-time value of the run-time condition.
#define FASTMETA_BOOL(cond, NAME, ...) \
  do {                                \
    if (cond) {                       \
      constexpr bool NAME = true;     \
      __VA_ARGS__;                    \
    } else {                          \
      constexpr bool NAME = false;    \
      __VA_ARGS__;                    \
    }                                 \
  } while (0)

// Calls BODY with T bound to the storage type of `dtype`.
#define FASTMETA_DISPATCH_DTYPE(dtype, ...)         \
  switch (dtype) {                                  \
    case ::fastmeta::kFloat32: {                    \
      using T = float;                              \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
    case ::fastmeta::kFloat64: {                    \
      using T = double;                             \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
    case ::fastmeta::kFloat16: {                    \
      using T = _Float16;                           \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
    case ::fastmeta::kBFloat16: {                   \
      using T = ::fastmeta::bfloat16;               \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
  }

// Like FASTMETA_DISPATCH_DTYPE for the task-batched kernels, which support float32 and float64
// only (fastmeta/ops/tensor_lists.py: check_batched_param refuses the others): half the
// instantiations, half the build time.
#define FASTMETA_DISPATCH_FLOAT(dtype, ...) \
  switch (dtype) {                          \
    case ::fastmeta::kFloat32: {            \
      using T = float;                      \
      __VA_ARGS__;                          \
      break;                                \
    }                                       \
    case ::fastmeta::kFloat64: {            \
      using T = double;                     \
      __VA_ARGS__;                          \
      break;                                \
    }                                       \
    default:                                \
      break;                                \
  }

}  // namespace fastmeta
