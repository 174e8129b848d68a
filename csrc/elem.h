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

}  // namespace fastmeta
