// RMSprop, matching torch.optim.RMSprop (Hinton 2012; Graves 2013 for the centered form):
//   g = ±g + wd·p
//   s = α·s + (1 − α)·g²
//   a = a + (1 − α)(g − a);  d = √(s − a²) + ε     (centered)
//   d = √s + ε                                     (otherwise)
//   b = μ·b + g/d;  p = p − lr·b                   (momentum > 0)
//   p = p − lr·g/d                                 (otherwise)
#include "elem.h"

namespace fastmeta {
namespace FASTMETA_ISA {
namespace {

template <typename T>
void rmsprop_typed(const RmspropTensor& t, int64_t begin, int64_t n, const RmspropArgs& a) {
  using E = Elem<T>;
  using C = typename E::C;
  T* __restrict p = offset<T>(t.param, begin);
  const T* __restrict g = offset<T>(t.grad, begin);
  T* __restrict s = offset<T>(t.square_avg, begin);
  T* __restrict buf = offset<T>(t.momentum_buffer, begin);
  T* __restrict gavg = offset<T>(t.grad_avg, begin);
  const C sign = a.maximize ? C(-1) : C(1);
  const C wd = static_cast<C>(a.weight_decay);
  const bool has_wd = a.weight_decay != 0.0;
  const C alpha = static_cast<C>(a.alpha);
  const C one_minus_alpha = static_cast<C>(1.0 - a.alpha);
  const C eps = static_cast<C>(a.eps);
  const C lr = static_cast<C>(a.lr);
  const C mu = static_cast<C>(a.momentum);
  for (int64_t i = 0; i < n; ++i) {
    const C pi = E::load(p + i);
    C gi = sign * E::load(g + i);
    if (has_wd) gi = gi + wd * pi;
    const C si = alpha * E::load(s + i) + one_minus_alpha * (gi * gi);
    E::store(s + i, si);
    C var = si;
    if (gavg != nullptr) {
      C ai = E::load(gavg + i);
      ai = ai + one_minus_alpha * (gi - ai);
      E::store(gavg + i, ai);
      var = si - ai * ai;
    }
    const C denom = fm_sqrt(var) + eps;
    if (buf != nullptr) {
      const C bi = mu * E::load(buf + i) + gi / denom;
      E::store(buf + i, bi);
      E::store(p + i, pi - lr * bi);
    } else {
      E::store(p + i, pi - lr * (gi / denom));
    }
  }
}

// Out-of-place, task-batched step (fastmeta/ops/rmsprop.py: RmspropFunction). State slots:
// 0 = square average v, 1 = momentum buffer b, 2 = gradient average a (centered). Every array
// is a __restrict parameter of the row functions (see adam.cpp).
template <typename C>
struct RmspropRow {
  C sign, lr, alpha, alpha_c, eps, wd, mu;
};

template <typename C>
static inline RmspropRow<C> rmsprop_row(const BatchedStep& s, int64_t t) {
  const double* h = s.hyper;
  RmspropRow<C> r;
  r.sign = (s.flags & kFlagMaximize) ? C(-1) : C(1);
  r.lr = static_cast<C>(h[kRmspropLr * s.tasks + t]);
  r.alpha = static_cast<C>(h[kRmspropAlpha * s.tasks + t]);
  r.alpha_c = static_cast<C>(1.0 - h[kRmspropAlpha * s.tasks + t]);
  r.eps = static_cast<C>(h[kRmspropEps * s.tasks + t]);
  r.wd = static_cast<C>(h[kRmspropWeightDecay * s.tasks + t]);
  r.mu = static_cast<C>(h[kRmspropMomentum * s.tasks + t]);
  return r;
}

template <typename T, bool kHasLr, bool kMomentum, bool kCentered>
static void rmsprop_forward_row(const RmspropRow<typename Elem<T>::C> r, int64_t n,
                                const T* __restrict p, const T* __restrict g,
                                const T* __restrict v, const T* __restrict b,
                                const T* __restrict a, const T* __restrict lre,
                                T* __restrict po, T* __restrict vo, T* __restrict bo,
                                T* __restrict ao) {
  using E = Elem<T>;
  using C = typename E::C;
  for (int64_t i = 0; i < n; ++i) {
    const C pi = E::load(p + i);
    const C gh = r.sign * E::load(g + i) + r.wd * pi;
    const C vn = r.alpha * E::load(v + i) + r.alpha_c * (gh * gh);
    E::store(vo + i, vn);
    C w = vn;
    if constexpr (kCentered) {
      const C ai = E::load(a + i);
      const C an = ai + r.alpha_c * (gh - ai);
      E::store(ao + i, an);
      w = vn - an * an;
    }
    C u = gh / (fm_sqrt(w) + r.eps);
    if constexpr (kMomentum) {
      u = r.mu * E::load(b + i) + u;
      E::store(bo + i, u);
    }
    C lri = r.lr;
    if constexpr (kHasLr) lri = E::load(lre + i);
    E::store(po + i, pi - lri * u);
  }
}

template <typename T, bool kHasLr, bool kMomentum, bool kCentered>
void rmsprop_forward_typed(const BatchedStep& s, int64_t begin, int64_t n) {
  using C = typename Elem<T>::C;
  for (int64_t t = 0; t < s.tasks; ++t) {
    const int64_t o = t * s.numel + begin;
    rmsprop_forward_row<T, kHasLr, kMomentum, kCentered>(
        rmsprop_row<C>(s, t), n, row_or_zeros<T>(s.param, o, s),
        static_cast<const T*>(s.grad) + o, static_cast<const T*>(s.state[0]) + o,
        row_or_zeros<T>(s.state[1], o, s), row_or_zeros<T>(s.state[2], o, s),
        kHasLr ? static_cast<const T*>(s.lr) + t * s.lr_task_stride + begin : nullptr,
        static_cast<T*>(s.param_out) + o, static_cast<T*>(s.state_out[0]) + o,
        kMomentum ? static_cast<T*>(s.state_out[1]) + o : nullptr,
        kCentered ? static_cast<T*>(s.state_out[2]) + o : nullptr);
  }
}

template <typename T, bool kHasLr, bool kMomentum, bool kCentered>
static void rmsprop_backward_row(const RmspropRow<typename Elem<T>::C> r, int64_t n,
                                 const T* __restrict p, const T* __restrict g,
                                 const T* __restrict v, const T* __restrict b,
                                 const T* __restrict a, const T* __restrict lre,
                                 const T* __restrict gpo, const T* __restrict gvo,
                                 const T* __restrict gbo, const T* __restrict gao,
                                 T* __restrict dp, T* __restrict dg, T* __restrict dv,
                                 T* __restrict db, T* __restrict da, T* __restrict dlr,
                                 double* __restrict sums) {
  // Notation of RmspropFunction.backward (fastmeta/ops/rmsprop.py).
  using E = Elem<T>;
  using C = typename E::C;
  C t_lr[kReduceBlock], t_alpha[kReduceBlock], t_eps[kReduceBlock], t_wd[kReduceBlock],
      t_mu[kReduceBlock];
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
      const C vi = E::load(v + i);
      const C vn = r.alpha * vi + r.alpha_c * (gh * gh);
      C ai = 0, an = 0, w = vn;
      if constexpr (kCentered) {
        ai = E::load(a + i);
        an = ai + r.alpha_c * (gh - ai);
        w = vn - an * an;
      }
      const C root = fm_sqrt(w);
      const C den = root + r.eps;
      const C u = gh / den;
      const C gp = E::load(gpo + i);
      C ubar, lr_bar, mu_bar = 0;
      if constexpr (kMomentum) {
        const C bi = E::load(b + i);
        const C bbar = E::load(gbo + i) - lri * gp;
        lr_bar = -gp * (r.mu * bi + u);
        ubar = bbar;
        E::store(db + i, r.mu * bbar);
        mu_bar = bbar * bi;
      } else {
        ubar = -lri * gp;
        lr_bar = -gp * u;
      }
      const C denbar = -ubar * gh / (den * den);
      // Where ĝ = 0 on a zero state θ' does not depend on w: no 0/0 (computed, then selected).
      const C ratio = denbar / (C(2) * root);
      const C wbar = denbar == C(0) ? C(0) : ratio;
      const C vbar = E::load(gvo + i) + wbar;
      C ghbar = ubar / den + C(2) * r.alpha_c * gh * vbar;
      C alpha_bar = vbar * (vi - gh * gh);
      if constexpr (kCentered) {
        const C abar = E::load(gao + i) - C(2) * an * wbar;
        ghbar = ghbar + r.alpha_c * abar;
        alpha_bar = alpha_bar + abar * (ai - gh);
        E::store(da + i, r.alpha * abar);
      }
      E::store(dv + i, r.alpha * vbar);
      if (dg != nullptr) E::store(dg + i, r.sign * ghbar);  // loop-invariant: unswitched
      if (dp != nullptr) E::store(dp + i, gp + r.wd * ghbar);
      if constexpr (kHasLr) E::store(dlr + i, E::load(dlr + i) + lr_bar);
      else t_lr[k] = lr_bar;
      t_alpha[k] = alpha_bar;
      t_eps[k] = denbar;
      t_wd[k] = ghbar * pi;
      t_mu[k] = mu_bar;
    }
    if constexpr (!kHasLr) sums[kRmspropLr] += lane_sum(t_lr, len);
    sums[kRmspropAlpha] += lane_sum(t_alpha, len);
    sums[kRmspropEps] += lane_sum(t_eps, len);
    sums[kRmspropWeightDecay] += lane_sum(t_wd, len);
    if constexpr (kMomentum) sums[kRmspropMomentum] += lane_sum(t_mu, len);
  }
}

template <typename T, bool kHasLr, bool kMomentum, bool kCentered>
void rmsprop_backward_typed(const BatchedStep& s, const BatchedGrad& gr, int64_t begin,
                            int64_t n) {
  using C = typename Elem<T>::C;
  for (int64_t t = 0; t < s.tasks; ++t) {
    const int64_t o = t * s.numel + begin;
    double sums[kRmspropHypers] = {};
    rmsprop_backward_row<T, kHasLr, kMomentum, kCentered>(
        rmsprop_row<C>(s, t), n, row_or_zeros<T>(s.param, o, s),
        static_cast<const T*>(s.grad) + o, static_cast<const T*>(s.state[0]) + o,
        row_or_zeros<T>(s.state[1], o, s), row_or_zeros<T>(s.state[2], o, s),
        kHasLr ? static_cast<const T*>(s.lr) + t * s.lr_task_stride + begin : nullptr,
        row_or_zeros<T>(gr.grad_param_out, o, s), row_or_zeros<T>(gr.grad_state_out[0], o, s),
        row_or_zeros<T>(gr.grad_state_out[1], o, s), row_or_zeros<T>(gr.grad_state_out[2], o, s),
        optional_row<T>(gr.grad_param, o), optional_row<T>(gr.grad_grad, o),
        static_cast<T*>(gr.grad_state[0]) + o,
        kMomentum ? static_cast<T*>(gr.grad_state[1]) + o : nullptr,
        kCentered ? static_cast<T*>(gr.grad_state[2]) + o : nullptr,
        kHasLr ? static_cast<T*>(gr.grad_lr) + t * s.lr_task_stride + begin : nullptr, sums);
    for (int h = 0; h < kRmspropHypers; ++h) gr.hyper_grad[h * s.tasks + t] += sums[h];
  }
}

}  // namespace

void rmsprop_forward_chunk(const BatchedStep& s, DType dtype, int64_t begin, int64_t n) {
  FASTMETA_BOOL(s.lr != nullptr, kLr, FASTMETA_BOOL(s.flags & kFlagMomentum, kMom,
      FASTMETA_BOOL(s.flags & kFlagCentered, kCen,
          FASTMETA_DISPATCH_FLOAT(dtype, (rmsprop_forward_typed<T, kLr, kMom, kCen>(s, begin, n))))));
}

void rmsprop_backward_chunk(const BatchedStep& s, const BatchedGrad& g, DType dtype,
                            int64_t begin, int64_t n) {
  FASTMETA_BOOL(s.lr != nullptr, kLr, FASTMETA_BOOL(s.flags & kFlagMomentum, kMom,
      FASTMETA_BOOL(s.flags & kFlagCentered, kCen,
          FASTMETA_DISPATCH_FLOAT(dtype,
              (rmsprop_backward_typed<T, kLr, kMom, kCen>(s, g, begin, n))))));
}

void rmsprop_chunk(const RmspropTensor& t, DType dtype, int64_t begin, int64_t n,
                   const RmspropArgs& a) {
  FASTMETA_DISPATCH_DTYPE(dtype, rmsprop_typed<T>(t, begin, n, a));
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
