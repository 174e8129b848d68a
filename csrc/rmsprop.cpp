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

}  // namespace

void rmsprop_chunk(const RmspropTensor& t, DType dtype, int64_t begin, int64_t n,
                   const RmspropArgs& a) {
  FASTMETA_DISPATCH_DTYPE(dtype, rmsprop_typed<T>(t, begin, n, a));
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
