// Matmul for CPUs with AVX512-BF16: x [M, K] float32 times w [K, N] bfloat16 -> [M, N] float32, with x
// rounded to bfloat16 (as XLA's bf16 dot rounds it) and float32 sums. jaxserver multiplies by its bf16
// weights through it at any number of rows, in decode steps and prompt pieces alike.
//
// The instruction that makes bf16 pay is VDPBF16PS: each of its 16 float32 lanes adds the products of two
// bf16 pairs, twice the multiplies of a float32 FMA. It wants the two factors of a lane side by side: for
// x, the pair (x[m, k], x[m, k+1]), which row-major bf16 already is, broadcast to every lane; for w, rows k
// and k+1 of a column interleaved. The weights therefore come packed once, when the model is loaded
// (`cpu_kernels.pack_bf16_weight`): [N / 64, K / 2, 64, 2], tiles of 64 columns, each tile's (k, k+1)
// row pairs one after the other, every pair 64 columns of interleaved values. A tile is then one
// contiguous stream read in order. (Interleaving the row-major weights on every call instead cost a
// second pass over them, slower than packing once; docs/performance.md.)
//
// Two regimes. With many rows the work is compute-bound: blocks of up to 6 rows keep their 6 x 4 vectors
// of sums in registers across all of K, while the 64-column tile they read stays in the core's L2. With
// up to 6 rows it is bound by reading the weights once: several consecutive tiles are read side by side,
// as many as about 24 registers of sums allow (four for one row).
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

constexpr int64_t kTileColumns = 64;  // four vectors of 16 sums per row
constexpr int kBlockRows = 6;         // 6 x 4 sums + 1 weight vector + 1 broadcast: 26 of 32 registers
// Rows one work item multiplies by its tile: 16 blocks. Fewer re-read the tile from memory more often
// (docs/performance.md).
constexpr int64_t kItemRows = 16 * kBlockRows;
constexpr int64_t kFewTiles = 32;  // see ManyRows

// x [M, K] to bf16 pairs, rounding to nearest even. K is even.
void RoundRows(const float* x, int64_t M, int64_t K, uint16_t* out) {
  for (int64_t i = 0, end = M * K; i < end; i += 32) {
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

// Rows [m0, m0 + R) of x (as bf16 pairs) times V / 4 consecutive packed tiles starting at `tiles` (each
// `pairs` x 64 pairs of bf16), the columns from n0 on.
template <int R, int V>
void Block(const uint32_t* x_pairs, int64_t pairs, const uint16_t* tiles, int64_t m0, int64_t N, int64_t n0,
           float* out) {
  static_assert(V % 4 == 0, "whole tiles");
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < V; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  const uint32_t* rows = x_pairs + m0 * pairs;
  const int64_t tile_size = 2 * kTileColumns * pairs;
  for (int64_t p = 0; p < pairs; ++p) {
    for (int j = 0; j < V; ++j) {
      // 16 pairs: columns 16 (j % 4) .. +15 of the row pair p of tile j / 4.
      const __m512i w = _mm512_loadu_si512(tiles + (j / 4) * tile_size + 2 * (p * kTileColumns + (j % 4) * 16));
      for (int r = 0; r < R; ++r) {
        const __m512i broadcast = _mm512_set1_epi32(static_cast<int>(rows[r * pairs + p]));
        acc[r][j] = _mm512_dpbf16_ps(acc[r][j], reinterpret_cast<const __m512bh&>(broadcast),
                                     reinterpret_cast<const __m512bh&>(w));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < V; ++j) _mm512_storeu_ps(out + (m0 + r) * N + n0 + 16 * j, acc[r][j]);
  }
}

using BlockFn = void (*)(const uint32_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*);
// One tile, by rows in the block.
constexpr BlockFn kNarrow[kBlockRows + 1] = {nullptr,      &Block<1, 4>, &Block<2, 4>, &Block<3, 4>,
                                             &Block<4, 4>, &Block<5, 4>, &Block<6, 4>};
// Tiles read side by side for M rows in all: as many as about 24 registers of sums allow.
constexpr BlockFn kWide[kBlockRows + 1] = {nullptr,      &Block<1, 16>, &Block<2, 12>, &Block<3, 8>,
                                           &Block<4, 4>, &Block<5, 4>,  &Block<6, 4>};
constexpr int64_t kWideTiles[kBlockRows + 1] = {0, 4, 3, 2, 1, 1, 1};

// Up to kBlockRows rows: wide items of several tiles, then single tiles for what is left.
void FewRows(ffi::ThreadPool& pool, const uint32_t* x_pairs, int64_t M, int64_t pairs, const uint16_t* w,
             int64_t tiles, float* out) {
  const int64_t width = kWideTiles[M], wide_items = tiles / width, wide_end = wide_items * width;
  const int64_t N = tiles * kTileColumns, tile_size = 2 * kTileColumns * pairs;
  jaxserver_kernels::ParallelFor(pool, wide_items + tiles - wide_end, [=](int64_t i) {
    const bool wide = i < wide_items;
    const int64_t tile = wide ? i * width : wide_end + i - wide_items;
    (wide ? kWide : kNarrow)[M](x_pairs, pairs, w + tile * tile_size, 0, N, tile * kTileColumns, out);
  });
}

// More rows: items are (tile, group of up to kItemRows rows), numbered tile by tile so that the groups of
// a tile tend to run close together while it is in the caches.
void ManyRows(ffi::ThreadPool& pool, const uint32_t* x_pairs, int64_t M, int64_t pairs, const uint16_t* w,
              int64_t tiles, float* out) {
  // A product of few tiles (576 or 960 columns: 9 or 15) ends with one thread idle for most of an item;
  // halving its rows halves that tail, for a second read of each tile that mostly hits the shared cache
  // (docs/performance.md).
  const int64_t half = (M / 2 + kBlockRows - 1) / kBlockRows * kBlockRows;  // whole blocks
  const int64_t item_rows = tiles < kFewTiles && M <= kItemRows ? half : kItemRows;
  const int64_t groups = (M + item_rows - 1) / item_rows;
  const int64_t N = tiles * kTileColumns, tile_size = 2 * kTileColumns * pairs;
  jaxserver_kernels::ParallelFor(pool, tiles * groups, [=](int64_t item) {
    const int64_t tile = item / groups, first = (item % groups) * item_rows;
    const int64_t last = std::min(M, first + item_rows);
    for (int64_t m0 = first; m0 < last; m0 += kBlockRows) {
      kNarrow[std::min<int64_t>(kBlockRows, last - m0)](x_pairs, pairs, w + tile * tile_size, m0, N,
                                                         tile * kTileColumns, out);
    }
  });
}

ffi::Error Bf16Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[2] != kTileColumns || wd[3] != 2 || xd[1] != 2 * wd[1]) {
    return ffi::Error::InvalidArgument(
        "bf16_gemm: x must be [M, K] and w packed as [N / 64, K / 2, 64, 2] (cpu_kernels.pack_bf16_weight)");
  }
  const int64_t M = xd[0], pairs = wd[1], tiles = wd[0];
  if (M == 0) return ffi::Error::Success();
  const float* x_data = x.typed_data();
  const auto* weights = reinterpret_cast<const uint16_t*>(w.typed_data());
  // Rounded rows, read as (k, k+1) pairs of bf16: held as the pairs' type, and written by RoundRows only
  // through vector stores and memcpy, which may alias any type.
  std::vector<uint32_t> x_pairs(M * pairs);
  auto* rounded = reinterpret_cast<uint16_t*>(x_pairs.data());
  // On the calling thread: waking a pool thread for it cost more than the rounding itself
  // (docs/performance.md).
  RoundRows(x_data, M, 2 * pairs, rounded);
  (M <= kBlockRows ? FewRows : ManyRows)(pool, x_pairs.data(), M, pairs, weights, tiles, out->typed_data());
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
