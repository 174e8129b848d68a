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

template <typename T>
void sgd_typed(const SgdTensor& t, int64_t begin, int64_t n, const SgdArgs& a) {
  using E = Elem<T>;
  using C = typename E::C;
  T* __restrict p = offset<T>(t.param, begin);
  const T* __restrict g = offset<T>(t.grad, begin);
  T* __restrict buf = offset<T>(t.momentum_buffer, begin);
  const C lr = static_cast<C>(a.lr);
  const C wd = static_cast<C>(a.weight_decay);
  const C sign = a.maximize ? C(-1) : C(1);
  const bool has_wd = a.weight_decay != 0.0;
  if (buf == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const C pi = E::load(p + i);
      C d = sign * E::load(g + i);
      if (has_wd) d = d + wd * pi;
      E::store(p + i, pi - lr * d);
    }
    return;
  }
  const C mu = static_cast<C>(a.momentum);
  const C keep = static_cast<C>(1.0 - a.dampening);
  for (int64_t i = 0; i < n; ++i) {
    const C pi = E::load(p + i);
    C d = sign * E::load(g + i);
    if (has_wd) d = d + wd * pi;
    // On the first step the buffer is d itself (no dampening), as in torch.
    const C b = a.first_step ? d : mu * E::load(buf + i) + keep * d;
    E::store(buf + i, b);
    const C step = a.nesterov ? d + mu * b : b;
    E::store(p + i, pi - lr * step);
  }
}

}  // namespace

void sgd_chunk(const SgdTensor& t, DType dtype, int64_t begin, int64_t n, const SgdArgs& a) {
  FASTMETA_DISPATCH_DTYPE(dtype, sgd_typed<T>(t, begin, n, a));
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
