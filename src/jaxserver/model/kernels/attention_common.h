// What the attention kernels share: reading and writing cache entries of each dtype as float32 vectors,
// e^x for the softmax, and the softmax's numerators computed in place.
#ifndef JAXSERVER_KERNELS_ATTENTION_COMMON_H_
#define JAXSERVER_KERNELS_ATTENTION_COMMON_H_

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cpu_common.h"

namespace jaxserver_kernels {

using IntVec = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));
using HalfBits = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));
using Bits = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));
using Halves = _Float16 __attribute__((vector_size(kLanes * sizeof(_Float16))));

// Cache entries as float32: bf16 (stored as its 16 bits) widens exactly, by a shift into a float's top half.
inline Vec LoadAs(const float* p) { return Load(p); }
inline Vec LoadAs(const uint16_t* p) {
  HalfBits half;
  __builtin_memcpy(&half, p, sizeof half);
  const Bits bits = __builtin_convertvector(half, Bits) << 16;
  Vec v;
  __builtin_memcpy(&v, &bits, sizeof v);
  return v;
}
// float16 widens exactly too: by F16C's conversion where the CPU has it (GCC 12 turned the generic
// vector conversion into one scalar conversion per element, slower than reading float32;
// docs/performance.md).
inline Vec LoadAs(const _Float16* p) {
  Vec v;
#if defined(__AVX512F__)
  const __m512 wide = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  __builtin_memcpy(&v, &wide, sizeof v);
#elif defined(__F16C__)
  const __m256 low = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 high = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kLanes / 2)));
  __builtin_memcpy(&v, &low, sizeof low);
  __builtin_memcpy(reinterpret_cast<char*>(&v) + sizeof low, &high, sizeof high);
#else
  Halves half;
  __builtin_memcpy(&half, p, sizeof half);
  v = __builtin_convertvector(half, Vec);
#endif
  return v;
}
// float32 to a cache entry, rounded to nearest even as XLA's conversions round: float16 by the compiler's
// conversion, bf16 (its 16 bits) by hand, NaN staying NaN.
inline void FromFloat(float x, float* entry) { *entry = x; }
inline void FromFloat(float x, _Float16* entry) { *entry = static_cast<_Float16>(x); }
inline void FromFloat(float x, uint16_t* entry) {
  uint32_t bits;
  __builtin_memcpy(&bits, &x, sizeof bits);
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;  // tested on the bits: -ffast-math drops isnan
  *entry = nan ? static_cast<uint16_t>((bits >> 16) | 0x40)
               : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// e^x for x <= 0 (softmax arguments after subtracting the maximum), to about 2e-7 relative: x = n ln2 + r
// with |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial, 2^n built in the exponent bits. The scalar
// libm call this replaces was a large share of the kernel's time (docs/performance.md).
inline Vec ExpNonPositive(Vec x) {
  x = x < Splat(-87.0f) ? Splat(-87.0f) : x;  // keeps 2^n a normal float
  const Vec n = __builtin_convertvector(
      __builtin_convertvector(x * 1.44269504f + Splat(-0.5f), IntVec), Vec);  // round half down; x <= 0
  const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec er = p * r * r + r + 1.0f;
  const IntVec bits = (__builtin_convertvector(n, IntVec) + 127) << 23;
  Vec scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return er * scale;
}

// Keys come in blocks of one vector of positions (k_cache's last axis).
constexpr int64_t kKeyBlock = kLanes;
// Softmax numerators of G score rows in place (row g at rows + g * stride, n scores, padded with room to
// `padded`, a whole number of vectors): the padding set to zero, each row's inverse sum in inverse_total.
// The division by the sum is left to the weighted values.
template <int G>
void SoftmaxNumerators(float* rows, int64_t stride, int64_t n, int64_t padded, float* inverse_total) {
  for (int g = 0; g < G; ++g) {
    float* row = rows + g * stride;
    std::fill(row + n, row + padded, -1e30f);
    Vec top = Load(row);
    for (int64_t t = kLanes; t < padded; t += kLanes) {
      const Vec v = Load(row + t);
      top = v > top ? v : top;
    }
    float peak = top[0];
    for (int64_t i = 1; i < kLanes; ++i) peak = std::max(peak, top[i]);
    Vec total{};
    for (int64_t t = 0; t < padded; t += kLanes) {
      const Vec e = ExpNonPositive(Load(row + t) - peak);
      Store(row + t, e);
      total += e;
    }
    float sum = 0.0f;  // the padding adds at most 15 * e^-87, nothing next to the peak's 1
    for (int64_t i = 0; i < kLanes; ++i) sum += total[i];
    inverse_total[g] = 1.0f / sum;
  }
}

}  // namespace jaxserver_kernels

#endif  // JAXSERVER_KERNELS_ATTENTION_COMMON_H_
