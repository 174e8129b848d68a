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

}  // namespace

void adagrad_chunk(const AdagradTensor& t, DType dtype, int64_t begin, int64_t n,
                   const AdagradArgs& a) {
  FASTMETA_DISPATCH_DTYPE(dtype, adagrad_typed<T>(t, begin, n, a));
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
