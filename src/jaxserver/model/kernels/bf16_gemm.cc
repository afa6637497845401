// Matmul for CPUs with AVX512-BF16: x [M, K] float32 times w [K, N] bfloat16 -> [M, N] float32, with x
// rounded to bfloat16 (as XLA's bf16 dot rounds it) and float32 sums. jaxserver's decode steps run their
// weight products through it at any number of rows.
//
// The instruction that makes bf16 pay is VDPBF16PS: each of its 16 float32 lanes adds the products of two
// bf16 pairs, twice the multiplies of a float32 FMA. It wants the two factors of a lane side by side: for
// x, the pair (x[m, k], x[m, k+1]), which row-major bf16 already is, broadcast to every lane; for w, rows k
// and k+1 of a column interleaved (UNPACKLO/HI of the two rows). Those unpacks interleave within 128-bit
// lanes, so the sums come out with columns permuted; the store puts them back in order.
//
// Two regimes. With many rows the work is compute-bound: a tile of 64 columns is interleaved once into a
// buffer, and blocks of up to 6 rows keep their 6 x 4 vectors of sums in registers across all of K. With
// up to 6 rows it is bound by reading the weights once: tiles are as wide as the registers allow (256
// columns for one row) and interleaved as they stream by.
//
// Every output is the same sequence of VDPBF16PS over k pairs into one float32 sum, whatever the tile,
// the regime or the number of rows: a row's result does not depend on the rows beside it, so a request
// decodes the same tokens alone or in a batch.

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)

#include <immintrin.h>

namespace {

constexpr int64_t kTileColumns = 64;  // the narrowest tile: four vectors of 16 sums per row
constexpr int kBlockRows = 6;         // 6 x 4 sums + 4 weight vectors + 1 broadcast: 29 of 32 registers
constexpr int64_t kItemRows = 8 * kBlockRows;

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

// Rows 2p and 2p+1 of w, columns [c, c + 32), interleaved into two vectors of 16 bf16 pairs.
inline void InterleavePair(const uint16_t* w, int64_t N, int64_t c, int64_t p, __m512i* lo, __m512i* hi) {
  const __m512i a = _mm512_loadu_si512(w + 2 * p * N + c);
  const __m512i b = _mm512_loadu_si512(w + (2 * p + 1) * N + c);
  *lo = _mm512_unpacklo_epi16(a, b);
  *hi = _mm512_unpackhi_epi16(a, b);
}

// Sums from UNPACKLO (`lo`) and UNPACKHI (`hi`) products hold, per 128-bit lane j, columns 8j..8j+3 and
// 8j+4..8j+7 of 32; store them as those 32 columns in order.
inline void StoreInOrder(float* out, __m512 lo, __m512 hi) {
  const __m512 first = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(1, 0, 1, 0));   // lo0 lo1 hi0 hi1
  const __m512 second = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(3, 2, 3, 2));  // lo2 lo3 hi2 hi3
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(first, first, _MM_SHUFFLE(3, 1, 2, 0)));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(second, second, _MM_SHUFFLE(3, 1, 2, 0)));
}

// Rows [m0, m0 + R) of x (as bf16 pairs) times columns [n0, n0 + 16 V) of w. The tile comes interleaved
// in `packed` (V vectors per row pair), or, when `packed` is null, is interleaved as it is read.
template <int R, int V>
void Block(const uint32_t* x_pairs, int64_t pairs, const uint16_t* w, const __m512i* packed, int64_t m0,
           int64_t N, int64_t n0, float* out) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < V; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  const uint32_t* rows = x_pairs + m0 * pairs;
  for (int64_t p = 0; p < pairs; ++p) {
    // Two vectors of the tile at a time, so that few registers hold weights beside the R x V sums.
    for (int j = 0; j < V; j += 2) {
      __m512i lo, hi;
      if (packed != nullptr) {
        lo = packed[V * p + j], hi = packed[V * p + j + 1];
      } else {
        InterleavePair(w, N, n0 + 16 * j, p, &lo, &hi);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i broadcast = _mm512_set1_epi32(static_cast<int>(rows[r * pairs + p]));
        const __m512bh x = reinterpret_cast<const __m512bh&>(broadcast);
        acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, reinterpret_cast<const __m512bh&>(lo));
        acc[r][j + 1] = _mm512_dpbf16_ps(acc[r][j + 1], x, reinterpret_cast<const __m512bh&>(hi));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* row_out = out + (m0 + r) * N + n0;
    for (int j = 0; j < V; j += 2) StoreInOrder(row_out + 16 * j, acc[r][j], acc[r][j + 1]);
  }
}

using BlockFn = void (*)(const uint32_t*, int64_t, const uint16_t*, const __m512i*, int64_t, int64_t, int64_t,
                        float*);
// Narrow tiles by rows in the block.
constexpr BlockFn kNarrow[kBlockRows + 1] = {nullptr,      &Block<1, 4>, &Block<2, 4>, &Block<3, 4>,
                                             &Block<4, 4>, &Block<5, 4>, &Block<6, 4>};
// Streamed tiles for M rows in all: as wide as about 24 registers of sums allow.
constexpr BlockFn kWide[kBlockRows + 1] = {nullptr,      &Block<1, 16>, &Block<2, 12>, &Block<3, 8>,
                                           &Block<4, 4>, &Block<5, 4>,  &Block<6, 4>};
constexpr int64_t kWideColumns[kBlockRows + 1] = {0, 256, 192, 128, 64, 64, 64};

// Up to kBlockRows rows: wide tiles streamed once, then 64-column ones for what is left of N.
void FewRows(ffi::ThreadPool& pool, const uint32_t* x_pairs, int64_t M, int64_t pairs,
             const uint16_t* w, int64_t N, float* out) {
  const int64_t wide_tiles = N / kWideColumns[M], wide_end = wide_tiles * kWideColumns[M];
  const int64_t narrow_tiles = (N - wide_end) / kTileColumns;
  jaxserver_kernels::ParallelFor(pool, wide_tiles + narrow_tiles, [=](int64_t i) {
    if (i < wide_tiles) {
      kWide[M](x_pairs, pairs, w, nullptr, 0, N, i * kWideColumns[M], out);
    } else {
      kNarrow[M](x_pairs, pairs, w, nullptr, 0, N, wide_end + (i - wide_tiles) * kTileColumns, out);
    }
  });
}

// More rows: items are (64-column tile, group of kItemRows rows), the group's tile interleaved once.
void ManyRows(ffi::ThreadPool& pool, const uint32_t* x_pairs, int64_t M, int64_t pairs,
              const uint16_t* w, int64_t N, float* out) {
  const int64_t tiles = N / kTileColumns, groups = (M + kItemRows - 1) / kItemRows;
  jaxserver_kernels::ParallelFor(pool, tiles * groups, [=](int64_t item) {
    const int64_t n0 = (item % tiles) * kTileColumns, first = (item / tiles) * kItemRows;
    const int64_t last = std::min(M, first + kItemRows);
    thread_local std::vector<__m512i> packed;
    packed.resize(4 * pairs);
    for (int64_t p = 0; p < pairs; ++p) {
      InterleavePair(w, N, n0, p, &packed[4 * p], &packed[4 * p + 1]);
      InterleavePair(w, N, n0 + 32, p, &packed[4 * p + 2], &packed[4 * p + 3]);
    }
    for (int64_t m0 = first; m0 < last; m0 += kBlockRows) {
      kNarrow[std::min<int64_t>(kBlockRows, last - m0)](x_pairs, pairs, w, packed.data(), m0, N, n0, out);
    }
  });
}

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
  if (M == 0) return ffi::Error::Success();
  const float* x_data = x.typed_data();
  const auto* weights = reinterpret_cast<const uint16_t*>(w.typed_data());
  // Rounded rows, read as (k, k+1) pairs of bf16: held as the pairs' type, and written by RoundRows only
  // through vector stores and memcpy, which may alias any type.
  std::vector<uint32_t> x_pairs(M * K / 2);
  auto* rounded = reinterpret_cast<uint16_t*>(x_pairs.data());
  constexpr int64_t kRoundRows = 16;
  jaxserver_kernels::ParallelFor(pool, (M + kRoundRows - 1) / kRoundRows, [&](int64_t i) {
    const int64_t first = i * kRoundRows;
    RoundRows(x_data, K, first, std::min(kRoundRows, M - first), rounded);
  });
  (M <= kBlockRows ? FewRows : ManyRows)(pool, x_pairs.data(), M, K / 2, weights, N, out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

extern "C" int JaxserverHasBf16Gemm() { return 1; }

#else  // no AVX512-BF16: the handler refuses, and Python asks first

namespace {

ffi::Error Bf16Gemm(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::BF16>,
                    ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "bf16_gemm: this CPU has no AVX512-BF16");
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
