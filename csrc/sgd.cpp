// SGD with momentum, dampening and Nesterov, matching torch.optim.SGD:
//   d = ±g + wd·p
//   b = d                         (first step)
//   b = μ·b + (1 − τ)·d           (later steps)
//   d = d + μ·b  (Nesterov)  or  d = b
//   p = p − lr·d
#include "elem.h"

namespace fastmeta {
namespace FASTMETA_ISA {
namespace {

// kDirection: also store the step's lr-free direction (SGD-HD, csrc/hypergrad.cpp).
template <typename T, bool kDirection>
void sgd_typed(const SgdTensor& t, int64_t begin, int64_t n, const SgdArgs& a) {
  using E = Elem<T>;
  using C = typename E::C;
  T* __restrict p = offset<T>(t.param, begin);
  const T* __restrict g = offset<T>(t.grad, begin);
  T* __restrict buf = offset<T>(t.momentum_buffer, begin);
  T* __restrict u = offset<T>(t.direction, begin);
  const C lr = static_cast<C>(a.lr);
  const C wd = static_cast<C>(a.weight_decay);
  const C sign = a.maximize ? C(-1) : C(1);
  const bool has_wd = a.weight_decay != 0.0;
  if (buf == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const C pi = E::load(p + i);
      C d = sign * E::load(g + i);
      if (has_wd) d = d + wd * pi;
      if (kDirection) E::store(u + i, d);
      E::store(p + i, pi - lr * d);
    }
    return;
  }
  const C mu = static_cast<C>(a.momentum);
  const C keep = static_cast<C>(1.0 - a.dampening);
  // Flags as locals: read through `a` inside the loop, GCC cannot prove the stores leave them
  // unchanged, and the loop neither unswitches nor vectorizes (measured: 1.5x slower than
  // torch's fused SGD on the conv-4 list).
  const bool first_step = a.first_step, nesterov = a.nesterov;
  for (int64_t i = 0; i < n; ++i) {
    const C pi = E::load(p + i);
    C d = sign * E::load(g + i);
    if (has_wd) d = d + wd * pi;
    // On the first step the buffer is d itself (no dampening), as in torch.
    const C b = first_step ? d : mu * E::load(buf + i) + keep * d;
    E::store(buf + i, b);
    const C step = nesterov ? d + mu * b : b;
    if (kDirection) E::store(u + i, step);
    E::store(p + i, pi - lr * step);
  }
}

// Out-of-place, task-batched step (fastmeta/ops/sgd.py: SgdFunction). State slot 0 is the
// momentum buffer. Every array is a __restrict parameter of the row functions (see adam.cpp).
template <typename C>
struct SgdRow {
  C sign, lr, wd, mu, keep;
};

template <typename C>
static inline SgdRow<C> sgd_row(const BatchedStep& s, int64_t t) {
  const double* h = s.hyper;
  SgdRow<C> r;
  r.sign = (s.flags & kFlagMaximize) ? C(-1) : C(1);
  r.lr = static_cast<C>(h[kSgdLr * s.tasks + t]);
  r.wd = static_cast<C>(h[kSgdWeightDecay * s.tasks + t]);
  r.mu = static_cast<C>(h[kSgdMomentum * s.tasks + t]);
  r.keep = static_cast<C>(1.0 - h[kSgdDampening * s.tasks + t]);
  return r;
}

template <typename T, bool kHasLr, bool kMomentum, bool kFirst, bool kNesterov>
static void sgd_forward_row(const SgdRow<typename Elem<T>::C> r, int64_t n,
                            const T* __restrict p, const T* __restrict g,
                            const T* __restrict b, const T* __restrict lre, T* __restrict po,
                            T* __restrict bo) {
  using E = Elem<T>;
  using C = typename E::C;
  for (int64_t i = 0; i < n; ++i) {
    const C pi = E::load(p + i);
    const C d = r.sign * E::load(g + i) + r.wd * pi;
    C u = d;
    if constexpr (kMomentum) {
      C bn = d;
      if constexpr (!kFirst) bn = r.mu * E::load(b + i) + r.keep * d;
      E::store(bo + i, bn);
      u = kNesterov ? d + r.mu * bn : bn;
    }
    C lri = r.lr;
    if constexpr (kHasLr) lri = E::load(lre + i);
    E::store(po + i, pi - lri * u);
  }
}

template <typename T, bool kHasLr, bool kMomentum, bool kFirst, bool kNesterov>
void sgd_forward_typed(const BatchedStep& s, int64_t begin, int64_t n) {
  using C = typename Elem<T>::C;
  for (int64_t t = 0; t < s.tasks; ++t) {
    const int64_t o = t * s.numel + begin;
    sgd_forward_row<T, kHasLr, kMomentum, kFirst, kNesterov>(
        sgd_row<C>(s, t), n, row_or_zeros<T>(s.param, o, s), static_cast<const T*>(s.grad) + o,
        row_or_zeros<T>(s.state[0], o, s),
        kHasLr ? static_cast<const T*>(s.lr) + t * s.lr_task_stride + begin : nullptr,
        static_cast<T*>(s.param_out) + o,
        kMomentum ? static_cast<T*>(s.state_out[0]) + o : nullptr);
  }
}

template <typename T, bool kHasLr, bool kMomentum, bool kFirst, bool kNesterov>
static void sgd_backward_row(const SgdRow<typename Elem<T>::C> r, int64_t n,
                             const T* __restrict p, const T* __restrict g,
                             const T* __restrict b, const T* __restrict lre,
                             const T* __restrict gpo, const T* __restrict gbo,
                             T* __restrict dp, T* __restrict dg, T* __restrict db,
                             T* __restrict dlr, double* __restrict sums) {
  // Notation of SgdFunction.backward (fastmeta/ops/sgd.py).
  using E = Elem<T>;
  using C = typename E::C;
  C t_lr[kReduceBlock], t_wd[kReduceBlock], t_mu[kReduceBlock], t_damp[kReduceBlock];
  for (int64_t j = 0; j < n; j += kReduceBlock) {
    const int64_t len = n - j < kReduceBlock ? n - j : kReduceBlock;
    // The arrays are distinct (__restrict), but once this row is inlined GCC wants more
    // run-time alias checks than it allows and leaves the loop scalar (8x slower).
    FASTMETA_IVDEP
    for (int64_t k = 0; k < len; ++k) {
      const int64_t i = j + k;
      const C pi = E::load(p + i);
      const C d = r.sign * E::load(g + i) + r.wd * pi;
      C lri = r.lr;
      if constexpr (kHasLr) lri = E::load(lre + i);
      const C gp = E::load(gpo + i);
      const C ubar = -lri * gp;
      C u = d, dbar = ubar, mu_bar = 0, damp_bar = 0;
      if constexpr (kMomentum) {
        C bi = 0, bn = d;
        if constexpr (!kFirst) {
          bi = E::load(b + i);
          bn = r.mu * bi + r.keep * d;
        }
        u = kNesterov ? d + r.mu * bn : bn;
        const C bbar = E::load(gbo + i) + (kNesterov ? r.mu * ubar : ubar);
        dbar = (kNesterov ? ubar : C(0)) + (kFirst ? bbar : r.keep * bbar);
        if constexpr (!kFirst) {
          E::store(db + i, r.mu * bbar);
          mu_bar = bbar * bi;
          damp_bar = -bbar * d;
        }
        if constexpr (kNesterov) mu_bar = mu_bar + ubar * bn;
      }
      if (dp != nullptr) E::store(dp + i, gp + r.wd * dbar);  // loop-invariant: unswitched
      if (dg != nullptr) E::store(dg + i, r.sign * dbar);
      const C lr_bar = -gp * u;
      if constexpr (kHasLr) E::store(dlr + i, E::load(dlr + i) + lr_bar);
      else t_lr[k] = lr_bar;
      t_wd[k] = dbar * pi;
      t_mu[k] = mu_bar;
      t_damp[k] = damp_bar;
    }
    if constexpr (!kHasLr) sums[kSgdLr] += lane_sum(t_lr, len);
    sums[kSgdWeightDecay] += lane_sum(t_wd, len);
    if constexpr (kMomentum) {
      sums[kSgdMomentum] += lane_sum(t_mu, len);
      sums[kSgdDampening] += lane_sum(t_damp, len);
    }
  }
}

template <typename T, bool kHasLr, bool kMomentum, bool kFirst, bool kNesterov>
void sgd_backward_typed(const BatchedStep& s, const BatchedGrad& gr, int64_t begin, int64_t n) {
  using C = typename Elem<T>::C;
  for (int64_t t = 0; t < s.tasks; ++t) {
    const int64_t o = t * s.numel + begin;
    double sums[kSgdHypers] = {};
    sgd_backward_row<T, kHasLr, kMomentum, kFirst, kNesterov>(
        sgd_row<C>(s, t), n, row_or_zeros<T>(s.param, o, s), static_cast<const T*>(s.grad) + o,
        row_or_zeros<T>(s.state[0], o, s),
        kHasLr ? static_cast<const T*>(s.lr) + t * s.lr_task_stride + begin : nullptr,
        row_or_zeros<T>(gr.grad_param_out, o, s), row_or_zeros<T>(gr.grad_state_out[0], o, s),
        optional_row<T>(gr.grad_param, o), optional_row<T>(gr.grad_grad, o),
        gr.grad_state[0] ? static_cast<T*>(gr.grad_state[0]) + o : nullptr,
        kHasLr ? static_cast<T*>(gr.grad_lr) + t * s.lr_task_stride + begin : nullptr, sums);
    for (int h = 0; h < kSgdHypers; ++h) gr.hyper_grad[h * s.tasks + t] += sums[h];
  }
}

}  // namespace

// Momentum options only matter with momentum: 2 (lr) x (1 + 4) instantiations per dtype.
#define FASTMETA_SGD_DISPATCH(FN, ...)                                                         \
  FASTMETA_BOOL(s.lr != nullptr, kLr,                                                          \
    if (!(s.flags & kFlagMomentum)) {                                                          \
      FASTMETA_DISPATCH_FLOAT(dtype, (FN<T, kLr, false, false, false>(__VA_ARGS__)));          \
    } else {                                                                                   \
      FASTMETA_BOOL(s.flags & kFlagFirstStep, kFirst, FASTMETA_BOOL(s.flags & kFlagNesterov,   \
        kNesterov, FASTMETA_DISPATCH_FLOAT(dtype,                                              \
          (FN<T, kLr, true, kFirst, kNesterov>(__VA_ARGS__)))));                               \
    })

void sgd_forward_chunk(const BatchedStep& s, DType dtype, int64_t begin, int64_t n) {
  FASTMETA_SGD_DISPATCH(sgd_forward_typed, s, begin, n);
}

void sgd_backward_chunk(const BatchedStep& s, const BatchedGrad& g, DType dtype, int64_t begin,
                        int64_t n) {
  FASTMETA_SGD_DISPATCH(sgd_backward_typed, s, g, begin, n);
}

void sgd_chunk(const SgdTensor& t, DType dtype, int64_t begin, int64_t n, const SgdArgs& a) {
  if (t.direction != nullptr) {
    FASTMETA_DISPATCH_DTYPE(dtype, (sgd_typed<T, true>(t, begin, n, a)));
  } else {
    FASTMETA_DISPATCH_DTYPE(dtype, (sgd_typed<T, false>(t, begin, n, a)));
  }
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
