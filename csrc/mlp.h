// A ReLU MLP's training-loss gradient and its Hessian-vector product, for one task, in a few
// BLAS products and plain loops. Two native ops use it: the HPO unroll (K momentum-SGD steps and
// their reverse pass, fastmeta/ops/mlp_unroll.py) and the task-batched gradients of MAML's inner
// loop and query (one gradient per task of a [T, N] buffer, fastmeta/ops/mlp_task_grads.py).
// The Python twins, which the tests compare them with, are fastmeta/fused_mlp.py's MLPSpec.
//
// The maths is fastmeta/fused_mlp.py's, layer by layer (l = 1..L, h_0 = x, W_l is [d_l, d_{l-1}],
// B rows, C outputs):
//
//   forward     a_l = h_{l-1} W_l^T + b_l,   h_l = relu(a_l),   z = a_L
//   loss        cross-entropy: Q = softmax(z) / B,   δ_L = Q - onehot(y) / B
//               mean squared error (over rows and outputs): δ_L = s (z - y),   s = 2 / (B C)
//   gradient    ∇W_l = δ_l^T h_{l-1},   ∇b_l = Σ_rows δ_l,   δ_{l-1} = (δ_l W_l) ⊙ [h_{l-1} > 0]
//   H v         (Pearlmutter's R-operator, v = (V_l, c_l)):
//               Ra_l = h_{l-1} V_l^T + c_l + Rh_{l-1} W_l^T,   Rh_l = Ra_l ⊙ [h_l > 0]
//               Rδ_L = Q ⊙ Ra_L - B Q ⊙ Σ_cols(Q ⊙ Ra_L)   (cross-entropy)
//               Rδ_L = s Ra_L                               (mean squared error)
//               (Hv)_{W_l} = Rδ_l^T h_{l-1} + δ_l^T Rh_{l-1},   (Hv)_{b_l} = Σ_rows Rδ_l,
//               Rδ_{l-1} = (Rδ_l W_l + δ_l V_l) ⊙ [h_{l-1} > 0]
//
// Why native: in Python each of the ~70 torch calls of a step (forward, gradient, step kernel,
// its VJP, H v) costs 2-4 µs of dispatch, as much as the arithmetic of a small MLP's products.
// The products here go to the BLAS that torch itself uses (sgemm_/dgemm_, whose addresses
// Python finds in torch's library and passes in), so the extension still links against no
// torch or BLAS library. Everything else is a plain loop.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fastmeta {
namespace mlp {

// Fortran BLAS ?gemm_, column-major. Its integers are 32-bit (LP64, as torch's MKL) or 64-bit
// (ILP64); they are passed by address, so each is stored as int64_t: on a little-endian CPU an
// LP64 BLAS reads its low half, which is the same number (dimensions are < 2^31). On a
// big-endian CPU the entry points refuse to run (kLittleEndian) and Python never calls them.
template <typename T>
using GemmFn = void (*)(const char*, const char*, const int64_t*, const int64_t*,
                        const int64_t*, const T*, const T*, const int64_t*, const T*,
                        const int64_t*, const T*, T*, const int64_t*);
constexpr bool kLittleEndian = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;

// Row-major C[m, n] = op(A) op(B) + beta C, op(A) [m, k] being A ([m, k], row stride lda) or,
// with ta, the transpose of A ([k, m]); the same for B. A row-major matrix is its transpose in
// column-major, so this is the column-major C^T = op(B)^T op(A)^T with the operands swapped.
template <typename T>
struct Blas {
  GemmFn<T> gemm;
  void operator()(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
                  const T* b, int64_t ldb, T beta, T* c, int64_t ldc) const {
    const char op_a = ta ? 'T' : 'N', op_b = tb ? 'T' : 'N';
    const T one = 1;
    gemm(&op_b, &op_a, &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
  }
};

// Layer l of the flat parameter buffer: W_l at weight (d_out x d_in, row-major), b_l at bias
// (-1: no bias).
struct Layer {
  int64_t weight, bias, d_in, d_out;
};

// The loss of loss_grad: the mean cross-entropy of int64 class labels, or the mean squared
// error of targets shaped like the output (F.mse_loss: the mean over rows and outputs).
enum class Loss : int { kCrossEntropy = 0, kMse = 1 };

// What the loss compares the output with: labels ([B], cross-entropy) or values ([B, C], mean
// squared error); the other is null.
template <typename T>
struct Targets {
  Loss loss;
  const int64_t* labels;
  const T* values;
};

// Where one step's tape lives (all row-major, batch-major): the input batch x ([B, d_0]),
// h[l] for l = 1..L-1 ([B, d_l]), delta[l] for l = 1..L ([B, d_l]), q ([B, C]; cross-entropy
// only, null for the mean squared error, whose Rδ_L needs no tape).
template <typename T>
struct Tape {
  Loss loss;
  const T* x;
  std::vector<T*> h;         // size L: h[l] = h_l, h[0] unused
  std::vector<T*> delta;     // size L + 1: delta[l], delta[0] unused
  T* q;
  const T* input(int64_t l) const { return l == 0 ? x : h[l]; }  // h_l with h_0 = x
};

// s = 2 / (B C): δ_L = s (z - y) for the mean squared error.
template <typename T>
inline T mse_scale(int64_t batch, int64_t classes) {
  return T(2) / static_cast<T>(batch * classes);
}

// rows x cols row-major: out[j] (+)= Σ_i m[i, j].
template <typename T>
inline void column_sums(const T* m, int64_t rows, int64_t cols, T* out) {
  for (int64_t j = 0; j < cols; ++j) out[j] = T(0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j] += m[i * cols + j];
}

// a ⊙ [h > 0] in place, as torch's threshold_backward(a, h, 0): 0 where h <= 0, so a is kept
// where h is NaN.
template <typename T>
inline void relu_mask(T* a, const T* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = h[i] <= T(0) ? T(0) : a[i];
}

// Rows of out = bias (or 0): the C of a product that adds the bias with beta = 1.
template <typename T>
inline T fill_bias(T* out, const T* bias, int64_t rows, int64_t cols) {
  if (bias == nullptr) return T(0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = bias[j];
  return T(1);
}

// The gradient of the mean loss at theta on (x, targets): writes grad ([N]), the tape, the
// output z ([B, C]) and, where loss is not null, the loss value.
template <typename T>
void loss_grad(const Blas<T>& blas, const std::vector<Layer>& layers, const T* theta,
               const Targets<T>& targets, int64_t batch, const Tape<T>& tape, T* outputs,
               T* grad, T* loss = nullptr) {
  const int64_t L = static_cast<int64_t>(layers.size());
  for (int64_t l = 1; l <= L; ++l) {
    const Layer& ly = layers[l - 1];
    T* out = l < L ? tape.h[l] : outputs;
    const T beta = fill_bias(out, ly.bias >= 0 ? theta + ly.bias : nullptr, batch, ly.d_out);
    blas(false, true, batch, ly.d_out, ly.d_in, tape.input(l - 1), ly.d_in, theta + ly.weight,
         ly.d_in, beta, out, ly.d_out);
    if (l < L)  // relu; NaN stays NaN, as torch.relu
      for (int64_t i = 0; i < batch * ly.d_out; ++i) out[i] = out[i] < T(0) ? T(0) : out[i];
  }
  const int64_t classes = layers.back().d_out;
  T* delta = tape.delta[L];
  if (targets.loss == Loss::kMse) {
    const T scale = mse_scale<T>(batch, classes);
    double total = 0;  // in double: float32 loses ~1e-5 relative over 10^5 terms
    for (int64_t i = 0; i < batch * classes; ++i) {
      const T error = outputs[i] - targets.values[i];
      total += static_cast<double>(error) * error;
      delta[i] = error * scale;
    }
    if (loss != nullptr) *loss = static_cast<T>(total / static_cast<double>(batch * classes));
  } else {
    const T inv_batch = T(1) / static_cast<T>(batch);
    double nll = 0;  // Σ_rows -log P[y], in double as the squared errors above
    for (int64_t i = 0; i < batch; ++i) {
      const T* a = outputs + i * classes;
      T* q = tape.q + i * classes;
      T peak = a[0];
      for (int64_t j = 1; j < classes; ++j) peak = a[j] > peak ? a[j] : peak;
      T total = 0;
      for (int64_t j = 0; j < classes; ++j) {
        q[j] = std::exp(a[j] - peak);
        total += q[j];
      }
      for (int64_t j = 0; j < classes; ++j) {
        q[j] = q[j] / total * inv_batch;
        delta[i * classes + j] = q[j];
      }
      const int64_t label = targets.labels[i];
      if (label < 0 || label >= classes)  // the torch ops raise too (scatter_add)
        throw std::out_of_range("class index " + std::to_string(label) + " is outside [0, " +
                                std::to_string(classes) + ")");
      delta[i * classes + label] -= inv_batch;
      nll += static_cast<double>(peak + std::log(total) - a[label]);
    }
    if (loss != nullptr) *loss = static_cast<T>(nll / static_cast<double>(batch));
  }
  for (int64_t l = L; l >= 1; --l) {
    const Layer& ly = layers[l - 1];
    blas(true, false, ly.d_out, ly.d_in, batch, tape.delta[l], ly.d_out, tape.input(l - 1),
         ly.d_in, T(0), grad + ly.weight, ly.d_in);
    if (ly.bias >= 0) column_sums(tape.delta[l], batch, ly.d_out, grad + ly.bias);
    if (l > 1) {
      blas(false, false, batch, ly.d_in, ly.d_out, tape.delta[l], ly.d_out, theta + ly.weight,
           ly.d_in, T(0), tape.delta[l - 1], ly.d_in);
      relu_mask(tape.delta[l - 1], tape.input(l - 1), batch * ly.d_in);
    }
  }
}

// Scratch of hvp: Ra_l ([B, d_l], l = 1..L), Rh_l ([B, d_l], l = 1..L-1: the output layer has
// no activation), and Rδ of this layer and the next (r_delta, r_delta_next: [B, max d]).
template <typename T>
struct HvpScratch {
  std::vector<std::vector<T>> ra, rh;
  std::vector<T> r_delta, r_delta_next;
  HvpScratch(const std::vector<Layer>& layers, int64_t batch) {
    int64_t widest = 0;
    ra.resize(layers.size() + 1);
    rh.resize(layers.size());
    for (size_t l = 1; l <= layers.size(); ++l) {
      const int64_t d = layers[l - 1].d_out;
      ra[l].resize(static_cast<size_t>(batch * d));
      if (l < layers.size()) rh[l].resize(static_cast<size_t>(batch * d));
      widest = std::max<int64_t>(widest, std::max(d, layers[l - 1].d_in));
    }
    r_delta.resize(static_cast<size_t>(batch * widest));
    r_delta_next.resize(static_cast<size_t>(batch * widest));
  }
};

// hv = H(theta) v for the loss of loss_grad at the same theta and batch (whose tape it reads).
template <typename T>
void hvp(const Blas<T>& blas, const std::vector<Layer>& layers, const T* theta,
         int64_t batch, const Tape<T>& tape, const T* v, HvpScratch<T>& s, T* hv) {
  const int64_t L = static_cast<int64_t>(layers.size());
  for (int64_t l = 1; l <= L; ++l) {
    const Layer& ly = layers[l - 1];
    T* ra = s.ra[l].data();
    const T beta = fill_bias(ra, ly.bias >= 0 ? v + ly.bias : nullptr, batch, ly.d_out);
    blas(false, true, batch, ly.d_out, ly.d_in, tape.input(l - 1), ly.d_in, v + ly.weight,
         ly.d_in, beta, ra, ly.d_out);
    if (l > 1)
      blas(false, true, batch, ly.d_out, ly.d_in, s.rh[l - 1].data(), ly.d_in,
           theta + ly.weight, ly.d_in, T(1), ra, ly.d_out);
    if (l < L) {
      T* rh = s.rh[l].data();
      for (int64_t i = 0; i < batch * ly.d_out; ++i) rh[i] = ra[i];
      relu_mask(rh, tape.h[l], batch * ly.d_out);
    }
  }
  const int64_t classes = layers.back().d_out;
  T* r_delta = s.r_delta.data();
  const T* ra_last = s.ra[L].data();
  if (tape.loss == Loss::kMse) {
    const T scale = mse_scale<T>(batch, classes);
    for (int64_t i = 0; i < batch * classes; ++i) r_delta[i] = scale * ra_last[i];
  }
  for (int64_t i = 0; tape.loss == Loss::kCrossEntropy && i < batch; ++i) {
    const T* q = tape.q + i * classes;
    T sum = 0;
    for (int64_t j = 0; j < classes; ++j) sum += q[j] * ra_last[i * classes + j];
    for (int64_t j = 0; j < classes; ++j)
      r_delta[i * classes + j] = q[j] * ra_last[i * classes + j] -
                                 static_cast<T>(batch) * q[j] * sum;
  }
  for (int64_t l = L; l >= 1; --l) {
    const Layer& ly = layers[l - 1];
    blas(true, false, ly.d_out, ly.d_in, batch, r_delta, ly.d_out, tape.input(l - 1), ly.d_in,
         T(0), hv + ly.weight, ly.d_in);
    if (l > 1)
      blas(true, false, ly.d_out, ly.d_in, batch, tape.delta[l], ly.d_out, s.rh[l - 1].data(),
           ly.d_in, T(1), hv + ly.weight, ly.d_in);
    if (ly.bias >= 0) column_sums(r_delta, batch, ly.d_out, hv + ly.bias);
    if (l > 1) {
      T* next = s.r_delta_next.data();
      blas(false, false, batch, ly.d_in, ly.d_out, r_delta, ly.d_out, theta + ly.weight,
           ly.d_in, T(0), next, ly.d_in);
      blas(false, false, batch, ly.d_in, ly.d_out, tape.delta[l], ly.d_out, v + ly.weight,
           ly.d_in, T(1), next, ly.d_in);
      relu_mask(next, tape.input(l - 1), batch * ly.d_in);
      std::swap(s.r_delta, s.r_delta_next);
      r_delta = s.r_delta.data();
    }
  }
}

}  // namespace mlp
}  // namespace fastmeta
