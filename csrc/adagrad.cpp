// Adagrad, matching torch.optim.Adagrad (Duchi et al. 2011):
//   g = ±g + wd·p
//   s = s + g²
//   p = p − clr · g / (√s + ε),   clr = lr / (1 + (t − 1)·lr_decay)
#include "elem.h"

namespace fastmeta {
namespace FASTMETA_ISA {
namespace {

template <typename T>
void adagrad_typed(const AdagradTensor& t, int64_t begin, int64_t n, const AdagradArgs& a) {
  using E = Elem<T>;
  using C = typename E::C;
  T* __restrict p = offset<T>(t.param, begin);
  const T* __restrict g = offset<T>(t.grad, begin);
  T* __restrict s = offset<T>(t.state_sum, begin);
  const C sign = a.maximize ? C(-1) : C(1);
  const C wd = static_cast<C>(a.weight_decay);
  const bool has_wd = a.weight_decay != 0.0;
  const C eps = static_cast<C>(a.eps);
  const C clr = static_cast<C>(t.clr);
  for (int64_t i = 0; i < n; ++i) {
    const C pi = E::load(p + i);
    C gi = sign * E::load(g + i);
    if (has_wd) gi = gi + wd * pi;
    const C si = E::load(s + i) + gi * gi;
    E::store(s + i, si);
    E::store(p + i, pi - clr * (gi / (fm_sqrt(si) + eps)));
  }
}

// Out-of-place, task-batched step (fastmeta/ops/adagrad.py: AdagradFunction). State slot 0 is
// the sum of squares; k = 1 + (t − 1)·η, clr = lr / k. Every array is a __restrict parameter of
// the row functions (see adam.cpp).
template <typename C>
struct AdagradRow {
  C sign, lr, k, steps_before, wd, eps;
};

template <typename C>
static inline AdagradRow<C> adagrad_row(const BatchedStep& s, int64_t t) {
  const double* h = s.hyper;
  AdagradRow<C> r;
  r.sign = (s.flags & kFlagMaximize) ? C(-1) : C(1);
  r.lr = static_cast<C>(h[kAdagradLr * s.tasks + t]);
  r.k = static_cast<C>(1.0 + (s.step - 1.0) * h[kAdagradLrDecay * s.tasks + t]);
  r.steps_before = static_cast<C>(s.step - 1.0);
  r.wd = static_cast<C>(h[kAdagradWeightDecay * s.tasks + t]);
  r.eps = static_cast<C>(h[kAdagradEps * s.tasks + t]);
  return r;
}

template <typename T, bool kHasLr>
static void adagrad_forward_row(const AdagradRow<typename Elem<T>::C> r, int64_t n,
                                const T* __restrict p, const T* __restrict g,
                                const T* __restrict sum, const T* __restrict lre,
                                T* __restrict po, T* __restrict so) {
  using E = Elem<T>;
  using C = typename E::C;
  for (int64_t i = 0; i < n; ++i) {
    const C pi = E::load(p + i);
    const C gh = r.sign * E::load(g + i) + r.wd * pi;
    const C sn = E::load(sum + i) + gh * gh;
    E::store(so + i, sn);
    C lri = r.lr;
    if constexpr (kHasLr) lri = E::load(lre + i);
    E::store(po + i, pi - (lri / r.k) * (gh / (fm_sqrt(sn) + r.eps)));
  }
}

template <typename T, bool kHasLr>
void adagrad_forward_typed(const BatchedStep& s, int64_t begin, int64_t n) {
  using C = typename Elem<T>::C;
  for (int64_t t = 0; t < s.tasks; ++t) {
    const int64_t o = t * s.numel + begin;
    adagrad_forward_row<T, kHasLr>(
        adagrad_row<C>(s, t), n, row_or_zeros<T>(s.param, o, s),
        static_cast<const T*>(s.grad) + o, static_cast<const T*>(s.state[0]) + o,
        kHasLr ? static_cast<const T*>(s.lr) + t * s.lr_task_stride + begin : nullptr,
        static_cast<T*>(s.param_out) + o, static_cast<T*>(s.state_out[0]) + o);
  }
}

template <typename T, bool kHasLr>
static void adagrad_backward_row(const AdagradRow<typename Elem<T>::C> r, int64_t n,
                                 const T* __restrict p, const T* __restrict g,
                                 const T* __restrict sum, const T* __restrict lre,
                                 const T* __restrict gpo, const T* __restrict gso,
                                 T* __restrict dp, T* __restrict dg, T* __restrict ds,
                                 T* __restrict dlr, double* __restrict sums) {
  // Notation of AdagradFunction.backward (fastmeta/ops/adagrad.py).
  using E = Elem<T>;
  using C = typename E::C;
  C t_lr[kReduceBlock], t_decay[kReduceBlock], t_wd[kReduceBlock], t_eps[kReduceBlock];
  for (int64_t j = 0; j < n; j += kReduceBlock) {
    const int64_t len = n - j < kReduceBlock ? n - j : kReduceBlock;
    // The arrays are distinct (__restrict), but once this row is inlined GCC wants more
    // run-time alias checks than it allows and leaves the loop scalar (8x slower).
    FASTMETA_IVDEP
    for (int64_t k = 0; k < len; ++k) {
      const int64_t i = j + k;
      const C pi = E::load(p + i);
      C lri = r.lr;
      if constexpr (kHasLr) lri = E::load(lre + i);
      const C gh = r.sign * E::load(g + i) + r.wd * pi;
      const C sn = E::load(sum + i) + gh * gh;
      const C root = fm_sqrt(sn);
      const C den = root + r.eps;
      const C clr = lri / r.k;
      const C gp = E::load(gpo + i);
      const C clr_bar = -gp * (gh / den);
      const C denbar = clr * gp * gh / (den * den);
      // Where ĝ = 0 on a zero sum θ' does not depend on s': no 0/0 (computed, then selected).
      const C ratio = denbar / (C(2) * root);
      const C sbar = E::load(gso + i) + (denbar == C(0) ? C(0) : ratio);
      const C ghbar = -clr * gp / den + C(2) * gh * sbar;
      E::store(ds + i, sbar);
      if (dg != nullptr) E::store(dg + i, r.sign * ghbar);  // loop-invariant: unswitched
      if (dp != nullptr) E::store(dp + i, gp + r.wd * ghbar);
      if constexpr (kHasLr) E::store(dlr + i, E::load(dlr + i) + clr_bar / r.k);
      else t_lr[k] = clr_bar / r.k;
      t_decay[k] = clr_bar * (-lri * r.steps_before / (r.k * r.k));
      t_wd[k] = ghbar * pi;
      t_eps[k] = denbar;
    }
    if constexpr (!kHasLr) sums[kAdagradLr] += lane_sum(t_lr, len);
    sums[kAdagradLrDecay] += lane_sum(t_decay, len);
    sums[kAdagradWeightDecay] += lane_sum(t_wd, len);
    sums[kAdagradEps] += lane_sum(t_eps, len);
  }
}

template <typename T, bool kHasLr>
void adagrad_backward_typed(const BatchedStep& s, const BatchedGrad& gr, int64_t begin,
                            int64_t n) {
  using C = typename Elem<T>::C;
  for (int64_t t = 0; t < s.tasks; ++t) {
    const int64_t o = t * s.numel + begin;
    double sums[kAdagradHypers] = {};
    adagrad_backward_row<T, kHasLr>(
        adagrad_row<C>(s, t), n, row_or_zeros<T>(s.param, o, s),
        static_cast<const T*>(s.grad) + o, static_cast<const T*>(s.state[0]) + o,
        kHasLr ? static_cast<const T*>(s.lr) + t * s.lr_task_stride + begin : nullptr,
        row_or_zeros<T>(gr.grad_param_out, o, s), row_or_zeros<T>(gr.grad_state_out[0], o, s),
        optional_row<T>(gr.grad_param, o), optional_row<T>(gr.grad_grad, o),
        static_cast<T*>(gr.grad_state[0]) + o,
        kHasLr ? static_cast<T*>(gr.grad_lr) + t * s.lr_task_stride + begin : nullptr, sums);
    for (int h = 0; h < kAdagradHypers; ++h) gr.hyper_grad[h * s.tasks + t] += sums[h];
  }
}

}  // namespace

void adagrad_forward_chunk(const BatchedStep& s, DType dtype, int64_t begin, int64_t n) {
  FASTMETA_BOOL(s.lr != nullptr, kLr,
                FASTMETA_DISPATCH_FLOAT(dtype, (adagrad_forward_typed<T, kLr>(s, begin, n))));
}

void adagrad_backward_chunk(const BatchedStep& s, const BatchedGrad& g, DType dtype,
                            int64_t begin, int64_t n) {
  FASTMETA_BOOL(s.lr != nullptr, kLr,
                FASTMETA_DISPATCH_FLOAT(dtype, (adagrad_backward_typed<T, kLr>(s, g, begin, n))));
}

void adagrad_chunk(const AdagradTensor& t, DType dtype, int64_t begin, int64_t n,
                   const AdagradArgs& a) {
  FASTMETA_DISPATCH_DTYPE(dtype, adagrad_typed<T>(t, begin, n, a));
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
