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
  const C bc2_sqrt = static_cast<C>(t.bias_correction2_sqrt);
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
    const C denom = fm_sqrt(vhat) / bc2_sqrt + eps;
    E::store(p + i, pi - step_size * (mi / denom));
  }
}

}  // namespace

void adam_chunk(const AdamTensor& t, DType dtype, int64_t begin, int64_t n, const AdamArgs& a) {
  if (a.amsgrad) {
    FASTMETA_DISPATCH_DTYPE(dtype, adam_typed<T, true>(t, begin, n, a));
  } else {
    FASTMETA_DISPATCH_DTYPE(dtype, adam_typed<T, false>(t, begin, n, a));
  }
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
