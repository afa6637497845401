// Many-row matmul for CPUs with AVX512-BF16: x [M, K] float32 times w [K, N] bfloat16 -> [M, N] float32,
// with x rounded to bfloat16 (as XLA's bf16 dot rounds it) and float32 sums.
//
// The shape of prefill and of decode steps with many streams, where the work is compute-bound. The
// instruction that makes bf16 pay is VDPBF16PS: each of its 16 float32 lanes adds the products of two bf16
// pairs, twice the multiplies of a float32 FMA. It wants the two factors of a lane side by side: for x,
// the pair (x[m, k], x[m, k+1]), which row-major bf16 already is, broadcast to every lane; for w, rows k
// and k+1 of a column interleaved, which the kernel builds for one tile of columns at a time (UNPACKLO/HI
// of the two rows) and then reuses for every row of x. Those unpacks interleave within 128-bit lanes, so
// the sums come out with columns permuted; the store puts them back in order.
//
// Work items are tiles of kTileColumns output columns; within one, blocks of up to kBlockRows rows of x
// keep their kBlockRows x 4 sums in registers across all of K.

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)

namespace {

constexpr int64_t kTileColumns = 64;  // four vectors of sums per row
constexpr int kBlockRows = 6;         // 6 x 4 sums + 4 weight vectors + 1 broadcast: 29 of 32 registers

// x rows [first, first + count) to bf16 pairs, rounding to nearest even. K is even.
void RoundRows(const float* x, int64_t K, int64_t first, int64_t count, uint16_t* out) {
  for (int64_t i = first * K, end = (first + count) * K; i < end; i += 32) {
    if (i + 32 <= end) {
      const __m512bh halves = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
      _mm512_storeu_si512(out + i, reinterpret_cast<const __m512i&>(halves));
    } else {
      for (int64_t j = i; j < end; ++j) {
        const __m128bh one = _mm_cvtneps_pbh(_mm_set1_ps(x[j]));
        std::memcpy(out + j, &one, sizeof(uint16_t));
      }
    }
  }
}

// Columns [n0, n0 + 64) of w, rows k and k+1 interleaved: per row pair, four vectors of 16 bf16 pairs.
void PackTile(const uint16_t* w, int64_t K, int64_t N, int64_t n0, __m512i* packed) {
  for (int64_t pair = 0; pair < K / 2; ++pair) {
    const uint16_t* upper = w + 2 * pair * N + n0;
    const uint16_t* lower = upper + N;
    for (int half = 0; half < 2; ++half) {
      const __m512i a = _mm512_loadu_si512(upper + 32 * half);
      const __m512i b = _mm512_loadu_si512(lower + 32 * half);
      packed[4 * pair + 2 * half] = _mm512_unpacklo_epi16(a, b);
      packed[4 * pair + 2 * half + 1] = _mm512_unpackhi_epi16(a, b);
    }
  }
}

// Sums from UNPACKLO (`lo`) and UNPACKHI (`hi`) products hold, per 128-bit lane j, columns 8j..8j+3 and
// 8j+4..8j+7 of 32; store them as those 32 columns in order.
inline void StoreInOrder(float* out, __m512 lo, __m512 hi) {
  const __m512 first = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(1, 0, 1, 0));   // lo0 lo1 hi0 hi1
  const __m512 second = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(3, 2, 3, 2));  // lo2 lo3 hi2 hi3
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(first, first, _MM_SHUFFLE(3, 1, 2, 0)));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(second, second, _MM_SHUFFLE(3, 1, 2, 0)));
}

// Rows [m0, m0 + R) of x (as bf16 pairs) times one packed tile -> out columns [n0, n0 + 64).
template <int R>
void Block(const uint32_t* x_pairs, int64_t pairs, const __m512i* packed, int64_t m0, int64_t N,
           int64_t n0, float* out) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  const uint32_t* rows = x_pairs + m0 * pairs;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh w[4];
    for (int j = 0; j < 4; ++j) w[j] = reinterpret_cast<const __m512bh&>(packed[4 * p + j]);
    for (int r = 0; r < R; ++r) {
      const __m512i broadcast = _mm512_set1_epi32(static_cast<int>(rows[r * pairs + p]));
      const __m512bh x = reinterpret_cast<const __m512bh&>(broadcast);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, w[j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* row_out = out + (m0 + r) * N + n0;
    StoreInOrder(row_out, acc[r][0], acc[r][1]);
    StoreInOrder(row_out + 32, acc[r][2], acc[r][3]);
  }
}

using BlockFn = void (*)(const uint32_t*, int64_t, const __m512i*, int64_t, int64_t, int64_t, float*);
constexpr BlockFn kBlocks[kBlockRows + 1] = {nullptr,   &Block<1>, &Block<2>, &Block<3>,
                                             &Block<4>, &Block<5>, &Block<6>};

ffi::Error Bf16Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("bf16_gemm: x must be [M, K] and w [K, N]");
  }
  const int64_t M = xd[0], K = wd[0], N = wd[1];
  if (K % 2 != 0 || N % kTileColumns != 0) {
    return ffi::Error::InvalidArgument("bf16_gemm: K must be even and N a multiple of 64");
  }
  const float* x_data = x.typed_data();
  const auto* weights = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* result = out->typed_data();
  std::vector<uint16_t> rounded(M * K);
  constexpr int64_t kRowsPerItem = 16;
  jaxserver_kernels::ParallelFor(pool, (M + kRowsPerItem - 1) / kRowsPerItem, [&](int64_t i) {
    const int64_t first = i * kRowsPerItem;
    RoundRows(x_data, K, first, std::min(kRowsPerItem, M - first), rounded.data());
  });
  const auto* x_pairs = reinterpret_cast<const uint32_t*>(rounded.data());
  const int64_t pairs = K / 2;
  jaxserver_kernels::ParallelFor(pool, N / kTileColumns, [=](int64_t tile) {
    thread_local std::vector<__m512i> packed;
    packed.resize(4 * pairs);
    const int64_t n0 = tile * kTileColumns;
    PackTile(weights, K, N, n0, packed.data());
    for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
      const int64_t rows = std::min<int64_t>(kBlockRows, M - m0);
      kBlocks[rows](x_pairs, pairs, packed.data(), m0, N, n0, result);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int JaxserverHasBf16Gemm() { return 1; }

#else  // no AVX512-BF16: the handler refuses, and Python asks first

namespace {

ffi::Error Bf16Gemm(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::BF16>,
                    ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error::Unimplemented("bf16_gemm: this CPU has no AVX512-BF16");
}

}  // namespace

extern "C" int JaxserverHasBf16Gemm() { return 0; }

#endif

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserverBf16Gemm, Bf16Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
