// The coordinatewise LSTM rule of Andrychowicz et al. (2016), fused: preprocessing, both LSTM
// cells, the head and the scaled update in one pass over the coordinates, and its VJP.
// fastmeta/ops/lstm_rule.py holds the reference (nn.LSTMCell) and the op.
//
// Per coordinate, with gradient g (read as 0 where it is not finite), state (h1, c1, h2, c2):
//   x       = (log|g| / p, sign g)  if |g| >= e^-p,  else (-1, e^p g)
//   z1      = W_ih1 x + W_hh1 h1 + b1               (4H rows, gate order i, f, ĝ, o as torch)
//   i,f,ĝ,o = σ, σ, tanh, σ of the four H-row slices of z1
//   c1'     = f c1 + i ĝ,   h1' = o tanh c1'
//   (h2', c2') = the same cell with input h1' and weights W_ih2, W_hh2, b2
//   u       = s (w·h2' + b)
// A coordinate whose g is NaN/±inf gets u = 0 and keeps its old state.
//
// Layout of the work. Coordinates are processed in blocks of B = kNV vectors of lanes, the block
// transposed to [feature][B] so that every 4H x K mat-vec product becomes B-wide vector FMAs with
// the weights broadcast (coordinate index innermost). The weights are repacked per chunk so that
// the four gates of hidden unit j are adjacent ([j][k][gate]): one pass over the inputs k
// computes the four gate pre-activations of unit j in 4 x kNV registers; the activations and
// cell updates then run in a second pass over the units (see cell_forward). A block's working
// set (a few KiB) and the packed weights stay in L1/L2.
//
// The backward recomputes a block's forward (the gates are never stored between the passes),
// then runs the VJP of the head, cell 2, cell 1 and the preprocessing. Weight gradients are
// sums over coordinates: each chunk accumulates them in lane-wise vector accumulators, reduces
// the lanes in a fixed order into its own float64 partial sums, and bindings.cpp adds the
// chunks' partial sums in chunk order, so the result does not depend on the thread count.
#include "elem.h"

// Vector width of this ISA build (setup.py compiles the file once per ISA).
#if defined(__AVX512F__)
#define FASTMETA_VEC_BYTES 64
#elif defined(__AVX__)
#define FASTMETA_VEC_BYTES 32
#else
#define FASTMETA_VEC_BYTES 16
#endif

namespace fastmeta {
namespace FASTMETA_ISA {
namespace {

// GCC vector extensions: portable across the three ISA builds and the compiler's own types, so
// the kernel needs no intrinsics headers (which are not allowed to leak STL, see kernels.h).
// may_alias: block buffers are written lane by lane through C* and read as vectors.
template <typename C>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(FASTMETA_VEC_BYTES), __may_alias__));
  typedef int32_t I __attribute__((vector_size(FASTMETA_VEC_BYTES), __may_alias__));
  static constexpr int kLanes = FASTMETA_VEC_BYTES / 4;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(FASTMETA_VEC_BYTES), __may_alias__));
  typedef int64_t I __attribute__((vector_size(FASTMETA_VEC_BYTES), __may_alias__));
  static constexpr int kLanes = FASTMETA_VEC_BYTES / 8;
};

// Vectors per block: 4 gates x 2 vectors = 8 independent accumulators hide the FMA latency and,
// with the 2 input vectors and a broadcast, fit the 16 registers of AVX2.
constexpr int kNV = 2;
// Alignment of every scratch region (a cache line; also an AVX-512 vector).
constexpr int64_t kAlign = 64;

// Broadcast. -0.0 + c is c for every c (+0.0 + c is not, for c = -0.0), so the compiler folds
// the add away and broadcasts straight from memory (vbroadcastss m32), off the FMA ports.
template <typename V, typename C>
static inline V splat(C c) {
  return -V{} + c;
}

// e^x = 2^n (1 + q), vectorized (libm's exp does not vectorize without -ffast-math): returns 2^n
// and q. Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and q = e^r − 1 by its Taylor
// polynomial (float: to r^7, truncation error 5e-9 relative; double: to r^13, 4e-18), and 2^n
// built in the exponent bits. Keeping q apart gives e^x − 1 without cancellation near 0, which
// tanh needs for small arguments. x is clamped to where 2^n is a normal number: e^x saturates
// at ~1e38 (float) / ~1e308 (double), which only ever feeds σ and tanh, exact there.
static inline void vexp_parts(Simd<float>::V x, Simd<float>::V& scale, Simd<float>::V& q) {
  using V = Simd<float>::V;
  using I = Simd<float>::I;
  const V lo = splat<V>(-87.0f), hi = splat<V>(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // Adding 1.5·2^23 rounds x/ln2 to an integer n held in the low mantissa bits of t.
  const V shifter = splat<V>(12582912.0f);
  const V t = x * 1.44269504088896341f + shifter;
  const V n = t - shifter;
  V r = x - n * 0.693359375f;  // ln2 = 0.693359375 − 2.12194440e-4 (Cephes): n·hi is exact
  r = r + n * 2.12194440e-4f;
  V e = splat<V>(1.0f / 5040.0f);
  e = e * r + 1.0f / 720.0f;
  e = e * r + 1.0f / 120.0f;
  e = e * r + 1.0f / 24.0f;
  e = e * r + 1.0f / 6.0f;
  e = e * r + 0.5f;
  e = e * r + 1.0f;
  q = e * r;
  scale = (V)(((I)t - (I)shifter + 127) << 23);
}

static inline void vexp_parts(Simd<double>::V x, Simd<double>::V& scale, Simd<double>::V& q) {
  using V = Simd<double>::V;
  using I = Simd<double>::I;
  const V lo = splat<V>(-708.0), hi = splat<V>(709.0);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V shifter = splat<V>(6755399441055744.0);  // 1.5·2^52
  const V t = x * 1.4426950408889634074 + shifter;
  const V n = t - shifter;
  V r = x - n * 6.93145751953125e-1;  // ln2 hi/lo (Cephes): n·hi is exact
  r = r - n * 1.42860682030941723212e-6;
  // Horner on 1/k!, k = 13 .. 1.
  V e = splat<V>(1.0 / 6227020800.0);
  e = e * r + 1.0 / 479001600.0;
  e = e * r + 1.0 / 39916800.0;
  e = e * r + 1.0 / 3628800.0;
  e = e * r + 1.0 / 362880.0;
  e = e * r + 1.0 / 40320.0;
  e = e * r + 1.0 / 5040.0;
  e = e * r + 1.0 / 720.0;
  e = e * r + 1.0 / 120.0;
  e = e * r + 1.0 / 24.0;
  e = e * r + 1.0 / 6.0;
  e = e * r + 0.5;
  e = e * r + 1.0;
  q = e * r;
  scale = (V)(((I)t - (I)shifter + 1023) << 52);
}

template <typename V>
static inline V vsigmoid(V z) {
  V scale, q;
  vexp_parts(-z, scale, q);
  return 1 / (1 + (scale + scale * q));
}

// tanh z = −m / (m + 2) with m = e^{−2z} − 1: accurate to a few ulp relative, small z included
// (2σ(2z) − 1 would lose the low bits of small results to cancellation).
template <typename V>
static inline V vtanh(V z) {
  V scale, q;
  vexp_parts(-2 * z, scale, q);
  const V m = scale * q + (scale - 1);
  return -m / (m + 2);
}

static inline float fm_log(float x) { return __builtin_logf(x); }
static inline double fm_log(double x) { return __builtin_log(x); }
static inline double fm_exp(double x) { return __builtin_exp(x); }

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Carves 64-byte-aligned regions out of one allocation; with cursor 0 it only counts bytes.
struct Carver {
  uintptr_t cursor;
  template <typename X>
  X* take(int64_t count) {
    X* p = reinterpret_cast<X*>(cursor);
    cursor += static_cast<uintptr_t>(round_up(count * static_cast<int64_t>(sizeof(X)), kAlign));
    return p;
  }
};

// One cell's weights repacked as P[(j·K + k)·4 + q] = [W_ih | W_hh][q·H + j][k] (K = kin + H
// inputs) and pb[j·4 + q] = b[q·H + j]: the four gates of unit j are adjacent.
template <typename C>
static void pack_cell(const C* w_ih, const C* w_hh, const C* b, int64_t H, int64_t kin, C* P,
                      C* pb) {
  const int64_t K = kin + H;
  for (int64_t j = 0; j < H; ++j) {
    for (int64_t k = 0; k < K; ++k)
      for (int q = 0; q < 4; ++q) {
        const int64_t row = q * H + j;
        P[(j * K + k) * 4 + q] = k < kin ? w_ih[row * kin + k] : w_hh[row * H + (k - kin)];
      }
    for (int q = 0; q < 4; ++q) pb[j * 4 + q] = b[q * H + j];
  }
}

// The sum of a vector's lanes in float64, in a fixed order: halves added as vectors until two
// lanes are left. A chunk reduces ~5,000 accumulator vectors (H = 20) this way; one dependent
// scalar add per lane made that reduction ~30% of a 128-coordinate chunk's backward (perf).
typedef double F64x2 __attribute__((vector_size(16), __may_alias__));
typedef double F64x4 __attribute__((vector_size(32), __may_alias__));
typedef double F64x8 __attribute__((vector_size(64), __may_alias__));
static inline double halving_sum(F64x2 d) { return d[0] + d[1]; }
static inline double halving_sum(F64x4 d) {
  const F64x2* h = reinterpret_cast<const F64x2*>(&d);
  return halving_sum(h[0] + h[1]);
}
static inline double halving_sum(F64x8 d) {
  const F64x4* h = reinterpret_cast<const F64x4*>(&d);
  return halving_sum(h[0] + h[1]);
}

static inline double lane_sum(Simd<double>::V v) { return halving_sum(v); }

// float lanes: each half widened to float64 first, so no sum is rounded to float.
static inline double lane_sum(Simd<float>::V v) {
  typedef float Half __attribute__((vector_size(FASTMETA_VEC_BYTES / 2), __may_alias__));
  typedef double Wide __attribute__((vector_size(FASTMETA_VEC_BYTES), __may_alias__));
  const Half* h = reinterpret_cast<const Half*>(&v);
  return halving_sum(__builtin_convertvector(h[0], Wide) + __builtin_convertvector(h[1], Wide));
}

// The inverse map for the gradients: lane sums of acc (same layout as P) into the float64
// [4H, kin] and [4H, H] row-major gradients of W_ih and W_hh, and of the bias.
template <typename C>
static void unpack_cell_grad(const typename Simd<C>::V* acc, const typename Simd<C>::V* accb,
                             int64_t H, int64_t kin, double* d_ih, double* d_hh, double* d_b) {
  const int64_t K = kin + H;
  for (int64_t j = 0; j < H; ++j) {
    for (int64_t k = 0; k < K; ++k)
      for (int q = 0; q < 4; ++q) {
        const int64_t row = q * H + j;
        const double s = lane_sum(acc[(j * K + k) * 4 + q]);
        if (k < kin) d_ih[row * kin + k] += s;
        else d_hh[row * H + (k - kin)] += s;
      }
    for (int q = 0; q < 4; ++q) d_b[q * H + j] += lane_sum(accb[j * 4 + q]);
  }
}

// [n, H] rows i0 .. i0+nb of src -> dst[k·B + b]; lanes past nb (and an absent src) read 0.
template <typename C>
static inline void load_rows(const C* src, int64_t i0, int64_t nb, int64_t H, int64_t B, C* dst) {
  if (src == nullptr) {
    for (int64_t e = 0; e < H * B; ++e) dst[e] = C(0);
    return;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const C* row = src + (i0 + b) * H;
    for (int64_t k = 0; k < H; ++k) dst[k * B + b] = row[k];
  }
  for (int64_t b = nb; b < B; ++b)
    for (int64_t k = 0; k < H; ++k) dst[k * B + b] = C(0);
}

template <typename C>
static inline void store_rows(const C* srcT, int64_t i0, int64_t nb, int64_t H, int64_t B,
                              C* dst) {
  for (int64_t b = 0; b < nb; ++b) {
    C* row = dst + (i0 + b) * H;
    for (int64_t k = 0; k < H; ++k) row[k] = srcT[k * B + b];
  }
}

// Row i of an optional [n, H] tensor into dst (zeros when absent): the value a skipped
// coordinate passes through unchanged.
template <typename C>
static inline void copy_row(const C* src, int64_t i, int64_t H, C* dst) {
  for (int64_t k = 0; k < H; ++k) dst[k] = src ? src[i * H + k] : C(0);
}

// One LSTM cell on a block: in [K][kNV], c_old [H][kNV] -> c_new, h_new [H][kNV]. gates
// [H][4][kNV] receives the gate pre-activations and, with kSave, ends up holding the activated
// gates (with tanh c_new in tanh_c [H][kNV]) for the backward.
//
// Two passes. The mat-vecs first, unit by unit, each unit's four gates accumulated in
// registers. Then the activations: each σ/tanh is a chain of ~15 dependent operations (the exp
// polynomial, then a division), so computing them right after each unit's mat-vec left the core
// waiting on one unit's chains at a time (perf: ~65% of the cell's samples, mostly on the
// instructions after the divisions); in a pass of their own, the units' chains are independent
// and overlap. The arithmetic of every element is unchanged.
template <typename C, bool kSave>
static inline void cell_forward(const C* __restrict P, const C* __restrict pb, int64_t H,
                                int64_t K, const typename Simd<C>::V* __restrict in,
                                const typename Simd<C>::V* __restrict c_old,
                                typename Simd<C>::V* __restrict gates,
                                typename Simd<C>::V* __restrict tanh_c,
                                typename Simd<C>::V* __restrict c_new,
                                typename Simd<C>::V* __restrict h_new) {
  using V = typename Simd<C>::V;
  for (int64_t j = 0; j < H; ++j) {
    const C* w = P + j * K * 4;
    V a[4][kNV];
    for (int q = 0; q < 4; ++q)
      for (int v = 0; v < kNV; ++v) a[q][v] = splat<V>(pb[j * 4 + q]);
    for (int64_t k = 0; k < K; ++k) {
      V x[kNV];
      for (int v = 0; v < kNV; ++v) x[v] = in[k * kNV + v];
      for (int q = 0; q < 4; ++q) {
        const V wq = splat<V>(w[k * 4 + q]);
        for (int v = 0; v < kNV; ++v) a[q][v] += wq * x[v];
      }
    }
    for (int q = 0; q < 4; ++q)
      for (int v = 0; v < kNV; ++v) gates[(j * 4 + q) * kNV + v] = a[q][v];
  }
  for (int64_t j = 0; j < H; ++j) {
    for (int v = 0; v < kNV; ++v) {
      V* z = gates + j * 4 * kNV + v;
      const V i = vsigmoid(z[0]), f = vsigmoid(z[kNV]), g = vtanh(z[2 * kNV]),
              o = vsigmoid(z[3 * kNV]);
      const V c = f * c_old[j * kNV + v] + i * g;
      const V t = vtanh(c);
      c_new[j * kNV + v] = c;
      h_new[j * kNV + v] = o * t;
      if constexpr (kSave) {
        z[0] = i;
        z[kNV] = f;
        z[2 * kNV] = g;
        z[3 * kNV] = o;
        tanh_c[j * kNV + v] = t;
      }
    }
  }
}

// VJP of the cell's elementwise part: from dh' = ∂L/∂h' and dc'_in = ∂L/∂c' (from above) to
//   dc = dc'_in + dh'·o·(1 − tanh²c'),  ∂L/∂c_old = dc·f,
//   dz = (dc·ĝ·i(1−i), dc·c_old·f(1−f), dc·i·(1−ĝ²), dh'·tanh c'·o(1−o))   [H][4][kNV].
template <typename C>
static inline void cell_backward(int64_t H, const typename Simd<C>::V* __restrict gates,
                                 const typename Simd<C>::V* __restrict tanh_c,
                                 const typename Simd<C>::V* __restrict c_old,
                                 const typename Simd<C>::V* __restrict dh,
                                 const typename Simd<C>::V* __restrict dc_in,
                                 typename Simd<C>::V* __restrict dz,
                                 typename Simd<C>::V* __restrict dc_old) {
  using V = typename Simd<C>::V;
  for (int64_t j = 0; j < H; ++j)
    for (int v = 0; v < kNV; ++v) {
      const V i = gates[(j * 4 + 0) * kNV + v], f = gates[(j * 4 + 1) * kNV + v],
              g = gates[(j * 4 + 2) * kNV + v], o = gates[(j * 4 + 3) * kNV + v];
      const V t = tanh_c[j * kNV + v], h = dh[j * kNV + v];
      const V dc = dc_in[j * kNV + v] + h * o * (1 - t * t);
      dc_old[j * kNV + v] = dc * f;
      dz[(j * 4 + 0) * kNV + v] = dc * g * (i * (1 - i));
      dz[(j * 4 + 1) * kNV + v] = dc * c_old[j * kNV + v] * (f * (1 - f));
      dz[(j * 4 + 2) * kNV + v] = dc * i * (1 - g * g);
      dz[(j * 4 + 3) * kNV + v] = h * t * (o * (1 - o));
    }
}

// The input side of a cell's VJP, in one pass over the packed weights:
//   d_in[k] = Σ_{j,q} P[j][k][q] · dz[j][q]                   (∂L/∂inputs, [K][kNV])
//   acc[j][k][q] += dz[j][q] ⊙ in[k],  accb[j][q] += dz[j][q]  (lane-wise weight gradients)
template <typename C, bool kWeights>
static inline void cell_input_backward(const C* __restrict P, int64_t H, int64_t K,
                                       const typename Simd<C>::V* __restrict dz,
                                       const typename Simd<C>::V* __restrict in,
                                       typename Simd<C>::V* __restrict d_in,
                                       typename Simd<C>::V* __restrict acc,
                                       typename Simd<C>::V* __restrict accb) {
  using V = typename Simd<C>::V;
  for (int64_t e = 0; e < K * kNV; ++e) d_in[e] = V{};
  for (int64_t j = 0; j < H; ++j) {
    V d[4][kNV];
    for (int q = 0; q < 4; ++q)
      for (int v = 0; v < kNV; ++v) d[q][v] = dz[(j * 4 + q) * kNV + v];
    if constexpr (kWeights) {
      for (int q = 0; q < 4; ++q) {
        V s = accb[j * 4 + q];
        for (int v = 0; v < kNV; ++v) s += d[q][v];
        accb[j * 4 + q] = s;
      }
    }
    const C* w = P + j * K * 4;
    V* aj = acc + j * K * 4;
    for (int64_t k = 0; k < K; ++k) {
      V x[kNV], y[kNV];
      for (int v = 0; v < kNV; ++v) {
        x[v] = in[k * kNV + v];
        y[v] = d_in[k * kNV + v];
      }
      for (int q = 0; q < 4; ++q) {
        const V wq = splat<V>(w[k * 4 + q]);
        for (int v = 0; v < kNV; ++v) y[v] += wq * d[q][v];
      }
      for (int v = 0; v < kNV; ++v) d_in[k * kNV + v] = y[v];
      if constexpr (kWeights) {
        for (int q = 0; q < 4; ++q) {
          V s = aj[k * 4 + q];
          for (int v = 0; v < kNV; ++v) s += d[q][v] * x[v];
          aj[k * 4 + q] = s;
        }
      }
    }
  }
}

// Everything one chunk works in, carved from one allocation.
template <typename C>
struct Work {
  using V = typename Simd<C>::V;
  C *P1, *pb1, *P2, *pb2;
  // Block buffers, [feature][kNV] vectors. in1 = (x0, x1, h1); in2 = (h1', h2). g1, g2: the
  // cells' gates [H][4][kNV] (pre-activations in the forward, activated for the backward).
  V *in1, *c1o, *c1n, *in2, *c2o, *c2n, *h2n, *g1, *g2;
  // Backward only.
  V *t1, *t2, *dh1u, *dc1u, *dh2u, *dc2u, *dz1, *dz2, *dc1o, *dc2o, *din1, *din2,
      *dh2;
  V *acc1, *accb1, *acc2, *accb2, *acch;
  void* block;

  // Sizes in bytes of the forward's (backward = false) or the backward's regions.
  static int64_t carve(Carver& m, Work* w, int64_t H, bool backward) {
    const int64_t K1 = H + 2, K2 = 2 * H;
    const uintptr_t start = m.cursor;
    auto c = [&](C*& p, int64_t count) { p = m.template take<C>(count); };
    auto v = [&](V*& p, int64_t count) { p = m.template take<V>(count); };
    Work dummy;
    Work& x = w ? *w : dummy;
    c(x.P1, H * K1 * 4);
    c(x.pb1, 4 * H);
    c(x.P2, H * K2 * 4);
    c(x.pb2, 4 * H);
    v(x.in1, K1 * kNV);
    v(x.c1o, H * kNV);
    v(x.c1n, H * kNV);
    v(x.in2, K2 * kNV);
    v(x.c2o, H * kNV);
    v(x.c2n, H * kNV);
    v(x.h2n, H * kNV);
    v(x.g1, 4 * H * kNV);  // the forward's gate pre-activations (cell_forward)
    v(x.g2, 4 * H * kNV);
    if (backward) {
      v(x.t1, H * kNV);
      v(x.t2, H * kNV);
      v(x.dh1u, H * kNV);
      v(x.dc1u, H * kNV);
      v(x.dh2u, H * kNV);
      v(x.dc2u, H * kNV);
      v(x.dz1, 4 * H * kNV);
      v(x.dz2, 4 * H * kNV);
      v(x.dc1o, H * kNV);
      v(x.dc2o, H * kNV);
      v(x.din1, K1 * kNV);
      v(x.din2, K2 * kNV);
      v(x.dh2, H * kNV);
      v(x.acc1, H * K1 * 4);
      v(x.accb1, 4 * H);
      v(x.acc2, H * K2 * 4);
      v(x.accb2, 4 * H);
      v(x.acch, H + 1);  // head weight, then head bias
    }
    return static_cast<int64_t>(m.cursor - start);
  }

  bool allocate(int64_t H, bool backward) {
    Carver probe{0};
    const int64_t bytes = carve(probe, nullptr, H, backward);
    block = __builtin_malloc(static_cast<__SIZE_TYPE__>(bytes + kAlign));
    if (block == nullptr) return false;
    const uintptr_t base = (reinterpret_cast<uintptr_t>(block) + kAlign - 1) &
                           ~static_cast<uintptr_t>(kAlign - 1);
    Carver m{base};
    carve(m, this, H, backward);
    return true;
  }
  ~Work() {
    if (block) __builtin_free(block);
  }
  Work() : block(nullptr) {}
};

// The constants of the preprocessing, in the compute type as the reference has them (the
// threshold, p and e^p are Python floats, rounded to the tensor's dtype by torch).
template <typename C>
struct Pre {
  C threshold, p, exp_p, scale;
};

template <typename C>
static inline Pre<C> make_pre(const LstmRule& a) {
  return Pre<C>{static_cast<C>(fm_exp(-a.p)), static_cast<C>(a.p), static_cast<C>(fm_exp(a.p)),
                static_cast<C>(a.output_scale)};
}

// Preprocesses the gradients of one block into in1's first two rows (x0, x1), and records which
// coordinates are skipped (non-finite g), which take the log branch, and the cleaned g.
template <typename C>
static inline void preprocess_block(const C* grad, int64_t i0, int64_t nb, int64_t B,
                                    const Pre<C>& pre, C* in1s, bool* skip, bool* large,
                                    C* clean) {
  for (int64_t b = 0; b < B; ++b) {
    C g = b < nb ? grad[i0 + b] : C(0);
    const bool finite = __builtin_isfinite(g);
    if (!finite) g = C(0);
    const C mag = g < 0 ? -g : g;
    const bool big = mag >= pre.threshold;
    in1s[b] = big ? fm_log(mag) / pre.p : C(-1);
    in1s[B + b] = big ? (g > 0 ? C(1) : (g < 0 ? C(-1) : C(0))) : g * pre.exp_p;
    skip[b] = !finite && b < nb;
    large[b] = big;
    clean[b] = g;
  }
}

// Block forward shared by both passes: loads the state, runs both cells, returns the update
// (before the skip mask) in u[kNV].
template <typename C, bool kSave>
static inline void block_forward(const LstmRule& a, Work<C>& w, int64_t H, int64_t i0,
                                 int64_t nb, const C* w_head, C b_head, C scale,
                                 typename Simd<C>::V* u) {
  using V = typename Simd<C>::V;
  constexpr int64_t B = Simd<C>::kLanes * kNV;
  const int64_t K1 = H + 2, K2 = 2 * H;
  load_rows(static_cast<const C*>(a.state[0]), i0, nb, H, B, reinterpret_cast<C*>(w.in1 + 2 * kNV));
  load_rows(static_cast<const C*>(a.state[1]), i0, nb, H, B, reinterpret_cast<C*>(w.c1o));
  load_rows(static_cast<const C*>(a.state[2]), i0, nb, H, B, reinterpret_cast<C*>(w.in2 + H * kNV));
  load_rows(static_cast<const C*>(a.state[3]), i0, nb, H, B, reinterpret_cast<C*>(w.c2o));
  // h1' goes straight into the first H rows of cell 2's input.
  cell_forward<C, kSave>(w.P1, w.pb1, H, K1, w.in1, w.c1o, w.g1, w.t1, w.c1n, w.in2);
  cell_forward<C, kSave>(w.P2, w.pb2, H, K2, w.in2, w.c2o, w.g2, w.t2, w.c2n, w.h2n);
  for (int v = 0; v < kNV; ++v) {
    V acc = splat<V>(b_head);
    for (int64_t j = 0; j < H; ++j) acc += splat<V>(w_head[j]) * w.h2n[j * kNV + v];
    u[v] = scale * acc;
  }
}

template <typename C>
static inline void pack_weights(const LstmRule& a, Work<C>& w, int64_t H) {
  const C* const* W = reinterpret_cast<const C* const*>(a.weight);
  pack_cell(W[kLstmWIh1], W[kLstmWHh1], W[kLstmB1], H, 2, w.P1, w.pb1);
  pack_cell(W[kLstmWIh2], W[kLstmWHh2], W[kLstmB2], H, H, w.P2, w.pb2);
}

template <typename C>
bool lstm_forward_typed(const LstmRule& a, int64_t begin, int64_t n) {
  using V = typename Simd<C>::V;
  constexpr int64_t B = Simd<C>::kLanes * kNV;
  const int64_t H = a.hidden;
  Work<C> w;
  if (!w.allocate(H, false)) return false;
  pack_weights(a, w, H);
  const Pre<C> pre = make_pre<C>(a);
  const C* grad = static_cast<const C*>(a.grad);
  const C* w_head = static_cast<const C*>(a.weight[kLstmWHead]);
  const C b_head = *static_cast<const C*>(a.weight[kLstmBHead]);
  C* update = static_cast<C*>(a.update);
  const C* old[4];
  C* out[4];
  for (int s = 0; s < 4; ++s) {
    old[s] = static_cast<const C*>(a.state[s]);
    out[s] = static_cast<C*>(a.state_out[s]);
  }
  const V* news[4] = {w.in2, w.c1n, w.h2n, w.c2n};
  bool skip[B], large[B];
  C clean[B];
  alignas(kAlign) V u[kNV];
  for (int64_t b0 = 0; b0 < n; b0 += B) {
    const int64_t i0 = begin + b0, nb = n - b0 < B ? n - b0 : B;
    preprocess_block(grad, i0, nb, B, pre, reinterpret_cast<C*>(w.in1), skip, large, clean);
    block_forward<C, false>(a, w, H, i0, nb, w_head, b_head, pre.scale, u);
    const C* us = reinterpret_cast<const C*>(u);
    for (int64_t b = 0; b < nb; ++b) update[i0 + b] = skip[b] ? C(0) : us[b];
    if (a.skipped)
      for (int64_t b = 0; b < nb; ++b) a.skipped[i0 + b] = skip[b];
    for (int s = 0; s < 4; ++s) {
      if (!out[s]) continue;
      store_rows(reinterpret_cast<const C*>(news[s]), i0, nb, H, B, out[s]);
      for (int64_t b = 0; b < nb; ++b)
        if (skip[b]) copy_row(old[s], i0 + b, H, out[s] + (i0 + b) * H);
    }
  }
  return true;
}

template <typename C, bool kWeights>
bool lstm_backward_typed(const LstmRule& a, const LstmRuleGrad& gr, int64_t begin, int64_t n) {
  using V = typename Simd<C>::V;
  constexpr int64_t B = Simd<C>::kLanes * kNV;
  const int64_t H = a.hidden, K1 = H + 2, K2 = 2 * H;
  Work<C> w;
  if (!w.allocate(H, true)) return false;
  pack_weights(a, w, H);
  if constexpr (kWeights) {
    for (int64_t e = 0; e < H * K1 * 4; ++e) w.acc1[e] = V{};
    for (int64_t e = 0; e < H * K2 * 4; ++e) w.acc2[e] = V{};
    for (int64_t e = 0; e < 4 * H; ++e) w.accb1[e] = w.accb2[e] = V{};
    for (int64_t e = 0; e < H + 1; ++e) w.acch[e] = V{};
  }
  const Pre<C> pre = make_pre<C>(a);
  const C* grad = static_cast<const C*>(a.grad);
  const C* w_head = static_cast<const C*>(a.weight[kLstmWHead]);
  const C b_head = *static_cast<const C*>(a.weight[kLstmBHead]);
  const C* gu = static_cast<const C*>(gr.grad_update);
  const C* gso[4];
  C* gs[4];
  for (int s = 0; s < 4; ++s) {
    gso[s] = static_cast<const C*>(gr.grad_state_out[s]);
    gs[s] = static_cast<C*>(gr.grad_state[s]);
  }
  C* gg = static_cast<C*>(gr.grad_grad);
  V* ups[4] = {w.dh1u, w.dc1u, w.dh2u, w.dc2u};
  // ∂L/∂(h1, c1, h2, c2) of the inputs: h1 and h2 are rows of din1 / din2.
  const V* downs[4] = {w.din1 + 2 * kNV, w.dc1o, w.din2 + H * kNV, w.dc2o};
  bool skip[B], large[B];
  C clean[B];
  alignas(kAlign) V u[kNV], su[kNV];
  for (int64_t b0 = 0; b0 < n; b0 += B) {
    const int64_t i0 = begin + b0, nb = n - b0 < B ? n - b0 : B;
    preprocess_block(grad, i0, nb, B, pre, reinterpret_cast<C*>(w.in1), skip, large, clean);
    block_forward<C, true>(a, w, H, i0, nb, w_head, b_head, pre.scale, u);
    // Incoming gradients; a skipped coordinate's outputs are its inputs, so nothing flows
    // into the cells from it (its lanes are zeroed) and its state gradients pass through.
    C* sus = reinterpret_cast<C*>(su);
    for (int64_t b = 0; b < B; ++b)
      sus[b] = (b < nb && gu && !skip[b]) ? pre.scale * gu[i0 + b] : C(0);
    for (int s = 0; s < 4; ++s) {
      C* up = reinterpret_cast<C*>(ups[s]);
      load_rows(gso[s], i0, nb, H, B, up);
      for (int64_t b = 0; b < nb; ++b)
        if (skip[b])
          for (int64_t k = 0; k < H; ++k) up[k * B + b] = C(0);
    }
    // Head: u = s(w·h2' + b)  ->  ∂L/∂h2' = dh2'_in + s·ū·w,  w̄ += s·ū·h2',  b̄ += s·ū.
    for (int64_t j = 0; j < H; ++j) {
      const V wj = splat<V>(w_head[j]);
      for (int v = 0; v < kNV; ++v) w.dh2[j * kNV + v] = w.dh2u[j * kNV + v] + wj * su[v];
    }
    if constexpr (kWeights) {
      for (int64_t j = 0; j < H; ++j) {
        V s = w.acch[j];
        for (int v = 0; v < kNV; ++v) s += su[v] * w.h2n[j * kNV + v];
        w.acch[j] = s;
      }
      V s = w.acch[H];
      for (int v = 0; v < kNV; ++v) s += su[v];
      w.acch[H] = s;
    }
    // Cell 2, then its inputs (h1', h2).
    cell_backward<C>(H, w.g2, w.t2, w.c2o, w.dh2, w.dc2u, w.dz2, w.dc2o);
    cell_input_backward<C, kWeights>(w.P2, H, K2, w.dz2, w.in2, w.din2, w.acc2, w.accb2);
    // Cell 1: ∂L/∂h1' = dh1'_in + (the first H rows of din2).
    for (int64_t e = 0; e < H * kNV; ++e) w.dh1u[e] += w.din2[e];
    cell_backward<C>(H, w.g1, w.t1, w.c1o, w.dh1u, w.dc1u, w.dz1, w.dc1o);
    cell_input_backward<C, kWeights>(w.P1, H, K1, w.dz1, w.in1, w.din1, w.acc1, w.accb1);
    // Preprocessing: ∂x0/∂g = 1/(p g) on the log branch (the sign's derivative is 0), and
    // ∂x1/∂g = e^p on the other; a skipped g gets 0 (the reference reads it as a constant 0).
    if (gg) {
      const C* dx = reinterpret_cast<const C*>(w.din1);
      for (int64_t b = 0; b < nb; ++b) {
        C d = large[b] ? dx[b] / pre.p / clean[b] : dx[B + b] * pre.exp_p;
        gg[i0 + b] = skip[b] ? C(0) : d;
      }
    }
    for (int s = 0; s < 4; ++s) {
      if (!gs[s]) continue;
      store_rows(reinterpret_cast<const C*>(downs[s]), i0, nb, H, B, gs[s]);
      for (int64_t b = 0; b < nb; ++b)
        if (skip[b]) copy_row(gso[s], i0 + b, H, gs[s] + (i0 + b) * H);
    }
  }
  if constexpr (kWeights) {
    // Partial sums of this chunk, in the order of LstmWeight (see kernels.h).
    double* out = gr.weight_grad;
    double* d_ih1 = out;
    double* d_hh1 = d_ih1 + 4 * H * 2;
    double* d_b1 = d_hh1 + 4 * H * H;
    double* d_ih2 = d_b1 + 4 * H;
    double* d_hh2 = d_ih2 + 4 * H * H;
    double* d_b2 = d_hh2 + 4 * H * H;
    double* d_wh = d_b2 + 4 * H;
    unpack_cell_grad<C>(w.acc1, w.accb1, H, 2, d_ih1, d_hh1, d_b1);
    unpack_cell_grad<C>(w.acc2, w.accb2, H, H, d_ih2, d_hh2, d_b2);
    for (int64_t j = 0; j <= H; ++j) d_wh[j] += lane_sum(w.acch[j]);  // d_wh[H]: head bias
  }
  return true;
}

}  // namespace

bool lstm_rule_forward_chunk(const LstmRule& a, DType dtype, int64_t begin, int64_t n) {
  if (dtype == kFloat32) return lstm_forward_typed<float>(a, begin, n);
  if (dtype == kFloat64) return lstm_forward_typed<double>(a, begin, n);
  return false;
}

bool lstm_rule_backward_chunk(const LstmRule& a, const LstmRuleGrad& g, DType dtype,
                              int64_t begin, int64_t n) {
  bool ok = false;
  FASTMETA_BOOL(g.weight_grad != nullptr, kW, {
    if (dtype == kFloat32) ok = lstm_backward_typed<float, kW>(a, g, begin, n);
    else if (dtype == kFloat64) ok = lstm_backward_typed<double, kW>(a, g, begin, n);
  });
  return ok;
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
