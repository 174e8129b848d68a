// The memory roofline probe: a single pass that reads R float32 streams and writes W of them
// back in place, doing no more arithmetic than needed to keep every byte live, exactly as a
// fused optimizer step moves its bytes. In place matters: a write to a fresh array costs a
// read-for-ownership too, which measured here made a 4R/3W probe 1.8x slower than Adam itself. An optimizer step that moves the same bytes cannot beat this on the same
// machine, so benchmarks report kernels as a percentage of it.
#include "elem.h"

namespace fastmeta {
namespace FASTMETA_ISA {
namespace {

template <int R, int W>
void stream_fixed(float* const* arrays, int64_t begin, int64_t n) {
  // Each element is read before it is written and no element depends on another, so omp simd
  // may vectorize although the write pointers alias the read ones (as p, m, v do in Adam).
  const float* r0 = arrays[0] + begin;
  const float* r1 = arrays[R > 1 ? 1 : 0] + begin;
  const float* r2 = arrays[R > 2 ? 2 : 0] + begin;
  const float* r3 = arrays[R > 3 ? 3 : 0] + begin;
  const float* r4 = arrays[R > 4 ? 4 : 0] + begin;
  float* __restrict w0 = arrays[0] + begin;
  float* __restrict w1 = arrays[W > 1 ? 1 : 0] + begin;
  float* __restrict w2 = arrays[W > 2 ? 2 : 0] + begin;
  float* __restrict w3 = arrays[W > 3 ? 3 : 0] + begin;
  constexpr float kScale = 1.0f / static_cast<float>(R + W);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float s = r0[i];
    if (R > 1) s += r1[i];
    if (R > 2) s += r2[i];
    if (R > 3) s += r3[i];
    if (R > 4) s += r4[i];
    s *= kScale;  // keeps repeated runs finite
    w0[i] = s;
    if (W > 1) w1[i] = s + 1.0f;
    if (W > 2) w2[i] = s + 2.0f;
    if (W > 3) w3[i] = s + 3.0f;
  }
}

}  // namespace

// Supports 1..5 reads and 1..4 writes, W <= R (the widest optimizer, amsgrad Adam, is 5R/4W).
bool stream_chunk(float* const* arrays, int num_reads, int num_writes, int64_t begin,
                  int64_t n) {
#define FASTMETA_STREAM_CASE(R, W) \
  if (num_reads == R && num_writes == W) return stream_fixed<R, W>(arrays, begin, n), true;
#define FASTMETA_STREAM_ROW(R) \
  FASTMETA_STREAM_CASE(R, 1) FASTMETA_STREAM_CASE(R, 2) FASTMETA_STREAM_CASE(R, 3) \
  FASTMETA_STREAM_CASE(R, 4)
  FASTMETA_STREAM_ROW(1) FASTMETA_STREAM_ROW(2) FASTMETA_STREAM_ROW(3) FASTMETA_STREAM_ROW(4)
  FASTMETA_STREAM_ROW(5)
#undef FASTMETA_STREAM_ROW
#undef FASTMETA_STREAM_CASE
  return false;
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
