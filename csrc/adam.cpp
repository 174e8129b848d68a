// Adam and AdamW, matching torch.optim.Adam / AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019):
//   g = ±g (+ wd·p for Adam)          p = p·(1 − lr·wd) first, for AdamW
//   m = m + (1 − β1)(g − m)
//   v = β2·v + (1 − β2)·g²
//   v̂ = max(v̂, v) with amsgrad, else v̂ = v
//   p = p − step_size · m / (√v̂ / √(1 − β2^t) + ε),   step_size = lr / (1 − β1^t)
#include "elem.h"

namespace fastmeta {
namespace FASTMETA_ISA {
namespace {

template <typename T, bool kAmsgrad>
void adam_typed(const AdamTensor& t, int64_t begin, int64_t n, const AdamArgs& a) {
  using E = Elem<T>;
  using C = typename E::C;
  T* __restrict p = offset<T>(t.param, begin);
  const T* __restrict g = offset<T>(t.grad, begin);
  T* __restrict m = offset<T>(t.exp_avg, begin);
  T* __restrict v = offset<T>(t.exp_avg_sq, begin);
  T* __restrict vmax = offset<T>(t.max_exp_avg_sq, begin);
  const C sign = a.maximize ? C(-1) : C(1);
  const C one_minus_beta1 = static_cast<C>(1.0 - a.beta1);
  const C beta2 = static_cast<C>(a.beta2);
  const C one_minus_beta2 = static_cast<C>(1.0 - a.beta2);
  const C eps = static_cast<C>(a.eps);
  const C step_size = static_cast<C>(t.step_size);
  // One division per element instead of two: on this AVX2 EPYC, vdivps and vsqrtps bound the
  // step for cache-resident models, so √v / √bc2 becomes √v · (1 / √bc2) (≤ 1 ulp apart).
  const C inv_bc2_sqrt = static_cast<C>(1.0 / t.bias_correction2_sqrt);
  const bool coupled_wd = a.weight_decay != 0.0 && !a.decoupled_weight_decay;
  const C wd = static_cast<C>(a.weight_decay);
  const C decay = static_cast<C>(a.decoupled_weight_decay ? 1.0 - a.lr * a.weight_decay : 1.0);
  for (int64_t i = 0; i < n; ++i) {
    C pi = E::load(p + i) * decay;
    C gi = sign * E::load(g + i);
    if (coupled_wd) gi = gi + wd * pi;
    C mi = E::load(m + i);
    mi = mi + one_minus_beta1 * (gi - mi);
    const C vi = beta2 * E::load(v + i) + one_minus_beta2 * (gi * gi);
    E::store(m + i, mi);
    E::store(v + i, vi);
    C vhat = vi;
    if (kAmsgrad) {
      const C prev = E::load(vmax + i);
      vhat = prev > vi ? prev : vi;
      E::store(vmax + i, vhat);
    }
    const C denom = fm_sqrt(vhat) * inv_bc2_sqrt + eps;
    E::store(p + i, pi - step_size * (mi / denom));
  }
}

// Out-of-place, task-batched step (fastmeta/ops/adam.py: AdamFunction). State slots: 0 = m,
// 1 = v. With kEpsRoot the denominator is √(v/bc2 + ε_root) + ε, else √v/√bc2 + ε. The row
// functions take every array as a __restrict parameter: GCC ignores restrict on locals, and
// without it the alias checks between ~14 arrays exceed its limit and the loops stay scalar.
template <typename C>
struct AdamRow {
  C sign, lr, b1, b1c, b2, b2c, eps, wd, er, bc1, bc2, sqrt_bc2, dbc1, dbc2;
};

template <typename C>
static inline AdamRow<C> adam_row(const BatchedStep& s, int64_t t) {
  const double* h = s.hyper;
  const double beta1 = h[kAdamBeta1 * s.tasks + t], beta2 = h[kAdamBeta2 * s.tasks + t];
  const double bc2 = 1.0 - fm_pow(beta2, s.step);
  AdamRow<C> r;
  r.sign = (s.flags & kFlagMaximize) ? C(-1) : C(1);
  r.lr = static_cast<C>(h[kAdamLr * s.tasks + t]);
  r.b1 = static_cast<C>(beta1);
  r.b1c = static_cast<C>(1.0 - beta1);
  r.b2 = static_cast<C>(beta2);
  r.b2c = static_cast<C>(1.0 - beta2);
  r.eps = static_cast<C>(h[kAdamEps * s.tasks + t]);
  r.wd = static_cast<C>(h[kAdamWeightDecay * s.tasks + t]);
  r.er = static_cast<C>(h[kAdamEpsRoot * s.tasks + t]);
  r.bc1 = static_cast<C>(1.0 - fm_pow(beta1, s.step));
  r.bc2 = static_cast<C>(bc2);
  r.sqrt_bc2 = static_cast<C>(fm_sqrt(bc2));
  // d(bc)/dβ = −t β^(t−1)
  r.dbc1 = static_cast<C>(-s.step * fm_pow(beta1, s.step - 1.0));
  r.dbc2 = static_cast<C>(-s.step * fm_pow(beta2, s.step - 1.0));
  return r;
}

template <typename T, bool kHasLr, bool kDecoupled, bool kEpsRoot>
static void adam_forward_row(const AdamRow<typename Elem<T>::C> r, int64_t n,
                             const T* __restrict p, const T* __restrict g,
                             const T* __restrict m, const T* __restrict v,
                             const T* __restrict lre, T* __restrict po, T* __restrict mo,
                             T* __restrict vo) {
  using E = Elem<T>;
  using C = typename E::C;
  for (int64_t i = 0; i < n; ++i) {
    const C pi = E::load(p + i);
    C lri = r.lr;
    if constexpr (kHasLr) lri = E::load(lre + i);
    C gh = r.sign * E::load(g + i);
    if constexpr (!kDecoupled) gh = gh + r.wd * pi;
    const C mi = E::load(m + i);
    const C mn = mi + r.b1c * (gh - mi);
    const C vn = r.b2 * E::load(v + i) + r.b2c * (gh * gh);
    E::store(mo + i, mn);
    E::store(vo + i, vn);
    C den;
    if constexpr (kEpsRoot) den = fm_sqrt(vn / r.bc2 + r.er) + r.eps;
    else den = fm_sqrt(vn) / r.sqrt_bc2 + r.eps;
    C pt = pi;
    if constexpr (kDecoupled) pt = pi * (C(1) - lri * r.wd);
    E::store(po + i, pt - (lri / r.bc1) * (mn / den));
  }
}

template <typename T, bool kHasLr, bool kDecoupled, bool kEpsRoot>
void adam_forward_typed(const BatchedStep& s, int64_t begin, int64_t n) {
  using C = typename Elem<T>::C;
  for (int64_t t = 0; t < s.tasks; ++t) {
    const int64_t o = t * s.numel + begin;
    adam_forward_row<T, kHasLr, kDecoupled, kEpsRoot>(
        adam_row<C>(s, t), n, row_or_zeros<T>(s.param, o, s),
        // An absent state (the first step of a chain) reads as zeros: nothing to allocate.
        static_cast<const T*>(s.grad) + o, row_or_zeros<T>(s.state[0], o, s),
        row_or_zeros<T>(s.state[1], o, s),
        kHasLr ? static_cast<const T*>(s.lr) + t * s.lr_task_stride + begin : nullptr,
        static_cast<T*>(s.param_out) + o, static_cast<T*>(s.state_out[0]) + o,
        static_cast<T*>(s.state_out[1]) + o);
  }
}

template <typename T, bool kHasLr, bool kDecoupled, bool kEpsRoot>
static void adam_backward_row(const AdamRow<typename Elem<T>::C> r, int64_t n,
                              const T* __restrict p, const T* __restrict g,
                              const T* __restrict m, const T* __restrict v,
                              const T* __restrict lre, const T* __restrict gpo,
                              const T* __restrict gmo, const T* __restrict gvo,
                              T* __restrict dp, T* __restrict dg, T* __restrict dm,
                              T* __restrict dv, T* __restrict dlr, double* __restrict sums) {
  // Notation of AdamFunction.backward (fastmeta/ops/adam.py).
  using E = Elem<T>;
  using C = typename E::C;
  C t_lr[kReduceBlock], t_b1[kReduceBlock], t_b2[kReduceBlock], t_eps[kReduceBlock],
      t_wd[kReduceBlock], t_er[kReduceBlock];
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
      C gh = r.sign * E::load(g + i);
      if constexpr (!kDecoupled) gh = gh + r.wd * pi;
      const C mi = E::load(m + i), vi = E::load(v + i);
      const C mn = mi + r.b1c * (gh - mi);
      const C vn = r.b2 * vi + r.b2c * (gh * gh);
      C root;
      if constexpr (kEpsRoot) root = fm_sqrt(vn / r.bc2 + r.er);
      else root = fm_sqrt(vn / r.bc2);
      const C den = root + r.eps;
      const C gp = E::load(gpo + i);
      const C a = lri / r.bc1;
      const C abar = -gp * (mn / den);
      const C bc1bar = -abar * lri / (r.bc1 * r.bc1);
      const C mbar = E::load(gmo + i) - gp * a / den;
      const C denbar = gp * a * mn / (den * den);
      // Where m' = 0 (zero gradient on zero state) θ' does not depend on v': x̄ = 0, not 0/0.
      // (The division runs unconditionally so that the select vectorizes.)
      const C ratio = denbar / (C(2) * root);
      const C xbar = denbar == C(0) ? C(0) : ratio;
      const C vbar = E::load(gvo + i) + xbar / r.bc2;
      const C bc2bar = -xbar * vn / (r.bc2 * r.bc2);
      const C ghbar = r.b1c * mbar + C(2) * r.b2c * gh * vbar;
      if (dm != nullptr) E::store(dm + i, r.b1 * mbar);  // loop-invariant: unswitched
      if (dv != nullptr) E::store(dv + i, r.b2 * vbar);
      if (dg != nullptr) E::store(dg + i, r.sign * ghbar);
      C lr_bar = abar / r.bc1;
      if constexpr (kDecoupled) {
        if (dp != nullptr) E::store(dp + i, gp * (C(1) - lri * r.wd));
        lr_bar = lr_bar - r.wd * pi * gp;
        t_wd[k] = -lri * pi * gp;
      } else {
        if (dp != nullptr) E::store(dp + i, gp + r.wd * ghbar);
        t_wd[k] = ghbar * pi;
      }
      if constexpr (kHasLr) E::store(dlr + i, E::load(dlr + i) + lr_bar);
      else t_lr[k] = lr_bar;
      t_b1[k] = mbar * (mi - gh) + bc1bar * r.dbc1;
      t_b2[k] = vbar * (vi - gh * gh) + bc2bar * r.dbc2;
      t_eps[k] = denbar;
      t_er[k] = xbar;
    }
    if constexpr (!kHasLr) sums[kAdamLr] += lane_sum(t_lr, len);
    sums[kAdamBeta1] += lane_sum(t_b1, len);
    sums[kAdamBeta2] += lane_sum(t_b2, len);
    sums[kAdamEps] += lane_sum(t_eps, len);
    sums[kAdamWeightDecay] += lane_sum(t_wd, len);
    sums[kAdamEpsRoot] += lane_sum(t_er, len);
  }
}

template <typename T, bool kHasLr, bool kDecoupled, bool kEpsRoot>
void adam_backward_typed(const BatchedStep& s, const BatchedGrad& gr, int64_t begin, int64_t n) {
  using C = typename Elem<T>::C;
  for (int64_t t = 0; t < s.tasks; ++t) {
    const int64_t o = t * s.numel + begin;
    double sums[kAdamHypers] = {};
    adam_backward_row<T, kHasLr, kDecoupled, kEpsRoot>(
        adam_row<C>(s, t), n, row_or_zeros<T>(s.param, o, s),
        static_cast<const T*>(s.grad) + o, row_or_zeros<T>(s.state[0], o, s),
        row_or_zeros<T>(s.state[1], o, s),
        kHasLr ? static_cast<const T*>(s.lr) + t * s.lr_task_stride + begin : nullptr,
        row_or_zeros<T>(gr.grad_param_out, o, s), row_or_zeros<T>(gr.grad_state_out[0], o, s),
        row_or_zeros<T>(gr.grad_state_out[1], o, s), optional_row<T>(gr.grad_param, o),
        optional_row<T>(gr.grad_grad, o),
        // No gradient is wanted for an absent state: its slot is null and is not written.
        gr.grad_state[0] ? static_cast<T*>(gr.grad_state[0]) + o : nullptr,
        gr.grad_state[1] ? static_cast<T*>(gr.grad_state[1]) + o : nullptr,
        kHasLr ? static_cast<T*>(gr.grad_lr) + t * s.lr_task_stride + begin : nullptr, sums);
    for (int h = 0; h < kAdamHypers; ++h) gr.hyper_grad[h * s.tasks + t] += sums[h];
  }
}

}  // namespace

void adam_forward_chunk(const BatchedStep& s, DType dtype, int64_t begin, int64_t n) {
  FASTMETA_BOOL(s.lr != nullptr, kLr, FASTMETA_BOOL(s.flags & kFlagDecoupled, kDec,
      FASTMETA_BOOL(s.flags & kFlagEpsRoot, kRoot,
          FASTMETA_DISPATCH_FLOAT(dtype, (adam_forward_typed<T, kLr, kDec, kRoot>(s, begin, n))))));
}

void adam_backward_chunk(const BatchedStep& s, const BatchedGrad& g, DType dtype, int64_t begin,
                         int64_t n) {
  FASTMETA_BOOL(s.lr != nullptr, kLr, FASTMETA_BOOL(s.flags & kFlagDecoupled, kDec,
      FASTMETA_BOOL(s.flags & kFlagEpsRoot, kRoot,
          FASTMETA_DISPATCH_FLOAT(dtype, (adam_backward_typed<T, kLr, kDec, kRoot>(s, g, begin, n))))));
}

void adam_chunk(const AdamTensor& t, DType dtype, int64_t begin, int64_t n, const AdamArgs& a) {
  if (a.amsgrad) {
    FASTMETA_DISPATCH_DTYPE(dtype, adam_typed<T, true>(t, begin, n, a));
  } else {
    FASTMETA_DISPATCH_DTYPE(dtype, adam_typed<T, false>(t, begin, n, a));
  }
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
