// Max-pooling over non-overlapping windows (kernel size = stride, no padding, no dilation, floor
// mode), the pooling of conv-4 and of most few-shot networks, on [planes, H, W] contiguous
// input. fastmeta/ops/max_pool.py has the maths and the autograd wiring.
//
// Why it exists: torch's CPU max_pool2d on NCHW tensors walks each window through a generic
// (kernel, stride, padding, dilation) loop and writes an int64 index per output. On conv-4's
// first query layer ([75, 64, 28, 28] float32, 15 MB in) it took 11.5 ms on this project's 2-core
// VM, where a ReLU of the same tensor took 0.4 ms: max-pooling was a fifth of a MAML meta-step.
//
// Three passes, each touching every element once:
//   forward  y[o] = max over o's window of x,  a[o] = the winner's position in the window
//   scatter  x̄[i] = ȳ[o] + 0 if i is o's winner, else 0 (0 too in the rows/columns floor mode
//            drops); "+ 0" turns -0.0 into +0.0, as torch's backward (zeros, then add) does
//   gather   ȳ'[o] = x̄'[winner of o]             (the scatter's adjoint: its own backward)
// The winner is torch's: the first maximum in row-major window order, except that a NaN always
// wins over what came before it (so the last NaN of a window, as in torch's kernel). The window
// position fits a byte (kernel_h · kernel_w ≤ 255, checked in Python), a quarter of the traffic
// an int64 index would add to the largest output.
#include "elem.h"

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define FASTMETA_MAX_POOL_AVX512 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define FASTMETA_MAX_POOL_AVX2 1
#endif

namespace fastmeta {
namespace FASTMETA_ISA {
namespace {

// a replaces the running maximum m when it is larger or NaN (torch's rule). GCC still compiles
// the scalar loops that use it into branches, mispredicted on data such as ReLU outputs: the
// unrolled scalar 2x2 loop below runs [75, 64, 28, 28] in ~5.5 ms on one thread (the general
// loop 18 ms, which is why it stays), the SIMD rows in under 1 ms.
template <typename C>
static inline bool wins(C a, C m) {
  return (a > m) | (a != a);
}

#ifdef FASTMETA_MAX_POOL_AVX512
// The 2x2 float32 case with AVX-512, 8 outputs per iteration. Rows are short (conv-4's are 14,
// 7 and 3 outputs wide), too short for the auto-vectorized loop, which never left its scalar
// remainder; masked loads and stores cover a row's tail instead.
// Positions 0..3 of a window are (row 0, even col), (row 0, odd col), (row 1, even), (row 1, odd).
static inline __mmask8 wins8(__m256 a, __m256 m) {
  return _mm256_cmp_ps_mask(a, m, _CMP_GT_OQ) | _mm256_cmp_ps_mask(a, a, _CMP_UNORD_Q);
}

static void forward_row_2x2(const float* r0, const float* r1, float* y, uint8_t* arg,
                            int64_t out_width) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t ow = 0; ow < out_width; ow += 8) {
    const int64_t n = out_width - ow < 8 ? out_width - ow : 8;
    const __mmask16 in_mask = static_cast<__mmask16>((1u << (2 * n)) - 1u);
    const __mmask8 out_mask = static_cast<__mmask8>((1u << n) - 1u);
    const __m512 a = _mm512_maskz_loadu_ps(in_mask, r0 + 2 * ow);
    const __m512 b = _mm512_maskz_loadu_ps(in_mask, r1 + 2 * ow);
    const __m512 evens = _mm512_permutex2var_ps(a, even, b);  // [row 0 even | row 1 even]
    const __m512 odds = _mm512_permutex2var_ps(a, odd, b);    // [row 0 odd  | row 1 odd]
    const __m256 p[4] = {_mm512_castps512_ps256(evens), _mm512_castps512_ps256(odds),
                         _mm512_extractf32x8_ps(evens, 1), _mm512_extractf32x8_ps(odds, 1)};
    __m256 m = p[0];
    __m256i w = _mm256_setzero_si256();
    for (int k = 1; k < 4; ++k) {
      const __mmask8 better = wins8(p[k], m);
      m = _mm256_mask_blend_ps(better, m, p[k]);
      w = _mm256_mask_blend_epi32(better, w, _mm256_set1_epi32(k));
    }
    _mm256_mask_storeu_ps(y + ow, out_mask, m);
    _mm256_mask_cvtepi32_storeu_epi8(arg + ow, out_mask, w);
  }
}

// Writes columns [0, 2 * out_width) of both input rows: ȳ at the winner, 0 elsewhere.
static void scatter_row_2x2(const float* gy, const uint8_t* arg, float* g0, float* g1,
                            int64_t out_width) {
  const __m512i interleave =
      _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  for (int64_t ow = 0; ow < out_width; ow += 8) {
    const int64_t n = out_width - ow < 8 ? out_width - ow : 8;
    const __mmask16 in_mask = static_cast<__mmask16>((1u << (2 * n)) - 1u);
    const __mmask8 out_mask = static_cast<__mmask8>((1u << n) - 1u);
    // + 0: a -0.0 gradient lands as +0.0, as torch's zeros-plus-gradient backward gives.
    const __m256 g = _mm256_add_ps(_mm256_maskz_loadu_ps(out_mask, gy + ow), _mm256_setzero_ps());
    const __m256i w = _mm256_cvtepu8_epi32(_mm_maskz_loadu_epi8(out_mask, arg + ow));
    __m256 q[4];
    for (int k = 0; k < 4; ++k)
      q[k] = _mm256_maskz_mov_ps(_mm256_cmpeq_epi32_mask(w, _mm256_set1_epi32(k)), g);
    const __m512 row0 = _mm512_permutexvar_ps(
        interleave, _mm512_insertf32x8(_mm512_castps256_ps512(q[0]), q[1], 1));
    const __m512 row1 = _mm512_permutexvar_ps(
        interleave, _mm512_insertf32x8(_mm512_castps256_ps512(q[2]), q[3], 1));
    _mm512_mask_storeu_ps(g0 + 2 * ow, in_mask, row0);
    _mm512_mask_storeu_ps(g1 + 2 * ow, in_mask, row1);
  }
}
#endif

#ifdef FASTMETA_MAX_POOL_AVX2
// The same with AVX2, 4 outputs per iteration: vector masks for the loads and stores of a row's
// tail (maskload never touches the lanes it skips), blendv for the selects.
static inline __m256i first_lanes(int64_t n) {  // lanes [0, n) all ones, n <= 8
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
}

static void forward_row_2x2(const float* r0, const float* r1, float* y, uint8_t* arg,
                            int64_t out_width) {
  for (int64_t ow = 0; ow < out_width; ow += 4) {
    const int64_t n = out_width - ow < 4 ? out_width - ow : 4;
    // Whole groups use plain loads and stores: AMD CPUs run masked stores in microcode.
    const bool whole = n == 4;
    const __m256i in_mask = first_lanes(2 * n);
    const __m256 a = whole ? _mm256_loadu_ps(r0 + 2 * ow) : _mm256_maskload_ps(r0 + 2 * ow, in_mask);
    const __m256 b = whole ? _mm256_loadu_ps(r1 + 2 * ow) : _mm256_maskload_ps(r1 + 2 * ow, in_mask);
    // shuffle_ps works per 128-bit half: [a0 a2 b0 b2 | a4 a6 b4 b6]; the 64-bit permute
    // puts row 0's evens in the low half and row 1's in the high half.
    const __m256 evens = _mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), _MM_SHUFFLE(3, 1, 2, 0)));
    const __m256 odds = _mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), _MM_SHUFFLE(3, 1, 2, 0)));
    const __m128 p[4] = {_mm256_castps256_ps128(evens), _mm256_castps256_ps128(odds),
                         _mm256_extractf128_ps(evens, 1), _mm256_extractf128_ps(odds, 1)};
    __m128 m = p[0];
    __m128i w = _mm_setzero_si128();
    for (int k = 1; k < 4; ++k) {
      const __m128 better =
          _mm_or_ps(_mm_cmp_ps(p[k], m, _CMP_GT_OQ), _mm_cmp_ps(p[k], p[k], _CMP_UNORD_Q));
      m = _mm_blendv_ps(m, p[k], better);
      w = _mm_blendv_epi8(w, _mm_set1_epi32(k), _mm_castps_si128(better));
    }
    const __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(w, w), w);
    const uint32_t four = static_cast<uint32_t>(_mm_cvtsi128_si32(bytes));
    if (whole) {
      _mm_storeu_ps(y + ow, m);
      __builtin_memcpy(arg + ow, &four, 4);
    } else {
      _mm_maskstore_ps(y + ow, _mm256_castsi256_si128(first_lanes(n)), m);
      for (int64_t i = 0; i < n; ++i) arg[ow + i] = static_cast<uint8_t>(four >> (8 * i));
    }
  }
}

static void scatter_row_2x2(const float* gy, const uint8_t* arg, float* g0, float* g1,
                            int64_t out_width) {
  for (int64_t ow = 0; ow < out_width; ow += 4) {
    const int64_t n = out_width - ow < 4 ? out_width - ow : 4;
    const bool whole = n == 4;
    const __m256i in_mask = first_lanes(2 * n);
    const __m128 g = _mm_add_ps(  // + 0: -0.0 lands as +0.0, as in torch
        whole ? _mm_loadu_ps(gy + ow)
              : _mm_maskload_ps(gy + ow, _mm256_castsi256_si128(first_lanes(n))),
        _mm_setzero_ps());
    uint32_t four = 0;
    if (whole)
      __builtin_memcpy(&four, arg + ow, 4);
    else
      for (int64_t i = 0; i < n; ++i) four |= static_cast<uint32_t>(arg[ow + i]) << (8 * i);
    const __m128i w = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(static_cast<int>(four)));
    __m128 q[4];
    for (int k = 0; k < 4; ++k)
      q[k] = _mm_and_ps(g, _mm_castsi128_ps(_mm_cmpeq_epi32(w, _mm_set1_epi32(k))));
    const __m256 row0 = _mm256_set_m128(_mm_unpackhi_ps(q[0], q[1]), _mm_unpacklo_ps(q[0], q[1]));
    const __m256 row1 = _mm256_set_m128(_mm_unpackhi_ps(q[2], q[3]), _mm_unpacklo_ps(q[2], q[3]));
    if (whole) {
      _mm256_storeu_ps(g0 + 2 * ow, row0);
      _mm256_storeu_ps(g1 + 2 * ow, row1);
    } else {
      _mm256_maskstore_ps(g0 + 2 * ow, in_mask, row0);
      _mm256_maskstore_ps(g1 + 2 * ow, in_mask, row1);
    }
  }
}
#define FASTMETA_MAX_POOL_ROW_2X2 1
#endif
#ifdef FASTMETA_MAX_POOL_AVX512
#define FASTMETA_MAX_POOL_ROW_2X2 1
#endif

template <typename T>
void forward_planes(const MaxPool& a, const void* input, void* output, uint8_t* argmax,
                    int64_t begin, int64_t n) {
  using E = Elem<T>;
  using C = typename E::C;
  const int64_t kh = a.kernel_h, kw = a.kernel_w, oh_n = a.out_height, ow_n = a.out_width;
  for (int64_t p = begin; p < begin + n; ++p) {
    const T* x = static_cast<const T*>(input) + p * a.height * a.width;
    T* y = static_cast<T*>(output) + p * oh_n * ow_n;
    uint8_t* arg = argmax + p * oh_n * ow_n;
    for (int64_t oh = 0; oh < oh_n; ++oh) {
      const T* rows = x + oh * kh * a.width;
      T* y_row = y + oh * ow_n;
      uint8_t* arg_row = arg + oh * ow_n;
#ifdef FASTMETA_MAX_POOL_ROW_2X2
      if constexpr (__is_same(T, float)) {
        if (kh == 2 && kw == 2) {
          forward_row_2x2(reinterpret_cast<const float*>(rows),
                          reinterpret_cast<const float*>(rows + a.width),
                          reinterpret_cast<float*>(y_row), arg_row, ow_n);
          continue;
        }
      }
#endif
      if (kh == 2 && kw == 2) {  // conv-4's case in the other dtypes and the generic build
        const T* r0 = rows;
        const T* r1 = rows + a.width;
        for (int64_t ow = 0; ow < ow_n; ++ow) {
          const C v0 = E::load(r0 + 2 * ow), v1 = E::load(r0 + 2 * ow + 1);
          const C v2 = E::load(r1 + 2 * ow), v3 = E::load(r1 + 2 * ow + 1);
          C m = v0;
          uint8_t w = 0;
          const bool w1 = wins(v1, m);
          m = w1 ? v1 : m;
          w = w1 ? 1 : w;
          const bool w2 = wins(v2, m);
          m = w2 ? v2 : m;
          w = w2 ? 2 : w;
          const bool w3 = wins(v3, m);
          m = w3 ? v3 : m;
          w = w3 ? 3 : w;
          E::store(y_row + ow, m);
          arg_row[ow] = w;
        }
        continue;
      }
      for (int64_t ow = 0; ow < ow_n; ++ow) {
        C m = -__builtin_inf();
        uint8_t w = 0;
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j) {
            const C v = E::load(rows + i * a.width + ow * kw + j);
            if (wins(v, m)) {
              m = v;
              w = static_cast<uint8_t>(i * kw + j);
            }
          }
        E::store(y_row + ow, m);
        arg_row[ow] = w;
      }
    }
  }
}

template <typename T>
void scatter_planes(const MaxPool& a, const void* grad_output, const uint8_t* argmax,
                    void* grad_input, int64_t begin, int64_t n) {
  using E = Elem<T>;
  const int64_t kh = a.kernel_h, kw = a.kernel_w, oh_n = a.out_height, ow_n = a.out_width;
  const int64_t covered_w = ow_n * kw;
  for (int64_t p = begin; p < begin + n; ++p) {
    const T* gy = static_cast<const T*>(grad_output) + p * oh_n * ow_n;
    const uint8_t* arg = argmax + p * oh_n * ow_n;
    T* gx = static_cast<T*>(grad_input) + p * a.height * a.width;
    for (int64_t oh = 0; oh < oh_n; ++oh) {
      const T* gy_row = gy + oh * ow_n;
      const uint8_t* arg_row = arg + oh * ow_n;
      T* rows = gx + oh * kh * a.width;
      bool done = false;
#ifdef FASTMETA_MAX_POOL_ROW_2X2
      if constexpr (__is_same(T, float)) {
        if (kh == 2 && kw == 2) {
          scatter_row_2x2(gy_row, arg_row, rows, rows + a.width, ow_n);
          done = true;
        }
      }
#endif
      for (int64_t i = 0; i < kh && !done; ++i) {
        T* gx_row = rows + i * a.width;
        if (kw == 2) {
          const uint8_t first = static_cast<uint8_t>(i * 2);
          for (int64_t ow = 0; ow < ow_n; ++ow) {
            const auto g = E::load(gy_row + ow) + 0;  // -0.0 lands as +0.0, as in torch
            const uint8_t w = arg_row[ow];
            E::store(gx_row + 2 * ow, w == first ? g : 0);
            E::store(gx_row + 2 * ow + 1, w == first + 1 ? g : 0);
          }
        } else {
          for (int64_t iw = 0; iw < covered_w; ++iw) {
            const int64_t ow = iw / kw;
            const uint8_t here = static_cast<uint8_t>(i * kw + (iw - ow * kw));
            E::store(gx_row + iw, arg_row[ow] == here ? E::load(gy_row + ow) + 0 : 0);
          }
        }
      }
      for (int64_t i = 0; i < kh; ++i)  // the columns floor mode dropped
        for (int64_t iw = covered_w; iw < a.width; ++iw) E::store(rows + i * a.width + iw, 0);
    }
    for (int64_t ih = oh_n * kh; ih < a.height; ++ih)  // the rows floor mode dropped
      for (int64_t iw = 0; iw < a.width; ++iw) E::store(gx + ih * a.width + iw, 0);
  }
}

template <typename T>
void gather_planes(const MaxPool& a, const void* grad_input_grad, const uint8_t* argmax,
                   void* out, int64_t begin, int64_t n) {
  using E = Elem<T>;
  const int64_t kh = a.kernel_h, kw = a.kernel_w, oh_n = a.out_height, ow_n = a.out_width;
  for (int64_t p = begin; p < begin + n; ++p) {
    const T* g = static_cast<const T*>(grad_input_grad) + p * a.height * a.width;
    const uint8_t* arg = argmax + p * oh_n * ow_n;
    T* y = static_cast<T*>(out) + p * oh_n * ow_n;
    for (int64_t oh = 0; oh < oh_n; ++oh)
      for (int64_t ow = 0; ow < ow_n; ++ow) {
        const int64_t w = arg[oh * ow_n + ow], i = w / kw, j = w - i * kw;
        E::store(y + oh * ow_n + ow, E::load(g + (oh * kh + i) * a.width + ow * kw + j));
      }
  }
}

}  // namespace

void max_pool_forward_planes(const MaxPool& a, DType dtype, const void* input, void* output,
                             uint8_t* argmax, int64_t begin, int64_t n) {
  FASTMETA_DISPATCH_DTYPE(dtype, forward_planes<T>(a, input, output, argmax, begin, n));
}

void max_pool_scatter_planes(const MaxPool& a, DType dtype, const void* grad_output,
                             const uint8_t* argmax, void* grad_input, int64_t begin, int64_t n) {
  FASTMETA_DISPATCH_DTYPE(dtype, scatter_planes<T>(a, grad_output, argmax, grad_input, begin, n));
}

void max_pool_gather_planes(const MaxPool& a, DType dtype, const void* grad_input_grad,
                            const uint8_t* argmax, void* out, int64_t begin, int64_t n) {
  FASTMETA_DISPATCH_DTYPE(dtype, gather_planes<T>(a, grad_input_grad, argmax, out, begin, n));
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
