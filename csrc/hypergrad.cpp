// Hypergradient descent (Baydin et al., ICLR 2018): SGD-HD (with heavy-ball or Nesterov
// momentum) and Adam-HD. Each step first reduces the hypergradient over the whole param group,
// then updates with the new learning rate (fastmeta/ops/hypergrad.py has the maths):
//
//   d_t   = ±g_t + wd·θ_{t−1}                        the gradient as the step sees it
//   h_t   = −d_t · u_{t−1}                            ∂f(θ_{t−1})/∂α_{t−1}, a reduction
//   α_t   = α_{t−1} − β·h_t
//   u_t   = the step's lr-free direction               SGD: d, buf, or d + μ·buf (Nesterov)
//                                                      Adam: m̂_t / (√v̂_t + ε)
//   θ_t   = θ_{t−1} − α_t·u_t,   and u_t is stored for the next step's h.
//
// Phase 1 (hd_dot_chunk) returns a chunk's Σ d·u_{t−1} in double; bindings.cpp adds the chunks
// in a fixed order, so h does not depend on the thread count. Phase 2 is the update: for
// SGD-HD the SGD kernel itself (csrc/sgd.cpp, storing u_t), for Adam-HD adam_hd_chunk below.
// Both phases run inside one native call per group.
#include "elem.h"

namespace fastmeta {
namespace FASTMETA_ISA {
namespace {

// Σ d·u in double over one chunk, with kSumLanes independent accumulators so that the loop
// vectorizes without reassociating the adds (the same order on every run).
template <typename T>
double hd_dot(const void* param_base, const void* grad_base, const void* direction_base,
              int64_t begin, int64_t n, double weight_decay, bool maximize) {
  using E = Elem<T>;
  const T* __restrict p = offset<T>(param_base, begin);
  const T* __restrict g = offset<T>(grad_base, begin);
  const T* __restrict u = offset<T>(direction_base, begin);
  const double sign = maximize ? -1.0 : 1.0;
  double acc[kSumLanes] = {};
  int64_t i = 0;
  if (weight_decay != 0.0) {
    for (; i + kSumLanes <= n; i += kSumLanes)
      for (int l = 0; l < kSumLanes; ++l) {
        const double d = sign * static_cast<double>(E::load(g + i + l)) +
                         weight_decay * static_cast<double>(E::load(p + i + l));
        acc[l] += d * static_cast<double>(E::load(u + i + l));
      }
  } else {
    for (; i + kSumLanes <= n; i += kSumLanes)
      for (int l = 0; l < kSumLanes; ++l)
        acc[l] += sign * static_cast<double>(E::load(g + i + l)) *
                  static_cast<double>(E::load(u + i + l));
  }
  double total = 0.0;
  for (; i < n; ++i) {
    double d = sign * static_cast<double>(E::load(g + i));
    if (weight_decay != 0.0) d += weight_decay * static_cast<double>(E::load(p + i));
    total += d * static_cast<double>(E::load(u + i));
  }
  for (int l = 0; l < kSumLanes; ++l) total += acc[l];
  return total;
}

template <typename T>
void adam_hd_typed(const HdAdamTensor& t, int64_t begin, int64_t n, const HdAdamArgs& a) {
  using E = Elem<T>;
  using C = typename E::C;
  T* __restrict p = offset<T>(t.param, begin);
  const T* __restrict g = offset<T>(t.grad, begin);
  T* __restrict m = offset<T>(t.exp_avg, begin);
  T* __restrict v = offset<T>(t.exp_avg_sq, begin);
  T* __restrict u = offset<T>(t.direction, begin);
  const C lr = static_cast<C>(a.lr);
  const C wd = static_cast<C>(a.weight_decay);
  const C sign = a.maximize ? C(-1) : C(1);
  const C one_minus_beta1 = static_cast<C>(1.0 - a.beta1);
  const C beta2 = static_cast<C>(a.beta2);
  const C one_minus_beta2 = static_cast<C>(1.0 - a.beta2);
  const C eps = static_cast<C>(a.eps);
  const C inv_bc1 = static_cast<C>(1.0 / t.bias_correction1);
  const C inv_bc2_sqrt = static_cast<C>(1.0 / t.bias_correction2_sqrt);
  for (int64_t i = 0; i < n; ++i) {
    const C pi = E::load(p + i);
    const C gi = sign * E::load(g + i) + wd * pi;
    C mi = E::load(m + i);
    mi = mi + one_minus_beta1 * (gi - mi);
    const C vi = beta2 * E::load(v + i) + one_minus_beta2 * (gi * gi);
    E::store(m + i, mi);
    E::store(v + i, vi);
    const C direction = (mi * inv_bc1) / (fm_sqrt(vi) * inv_bc2_sqrt + eps);
    E::store(u + i, direction);
    E::store(p + i, pi - lr * direction);
  }
}

}  // namespace

double hd_dot_chunk(const void* param, const void* grad, const void* direction, DType dtype,
                    int64_t begin, int64_t n, double weight_decay, bool maximize) {
  double sum = 0.0;
  FASTMETA_DISPATCH_DTYPE(dtype, sum = hd_dot<T>(param, grad, direction, begin, n,
                                                 weight_decay, maximize));
  return sum;
}

void adam_hd_chunk(const HdAdamTensor& t, DType dtype, int64_t begin, int64_t n,
                   const HdAdamArgs& a) {
  FASTMETA_DISPATCH_DTYPE(dtype, adam_hd_typed<T>(t, begin, n, a));
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
