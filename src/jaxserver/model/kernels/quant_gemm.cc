// Matmul over quantized weights for CPUs with AVX2, FMA and F16C: x [M, K] float32 times a weight kept as
// 4-bit or 8-bit codes with float16 scales (model/quant.py) -> [M, N] float32. The codes are read as they
// are stored and widened in registers: a step reads a 4-bit weight's 0.625 bytes per value from memory
// instead of a bf16 copy's 2.
//
// The products are integer. Each row of x is quantized per block of 32 inputs to int16 codes (scale
// max |x| / 32767, an error near 1e-5 of the block's largest value, far below a bf16 weight's rounding);
// VPMADDWD multiplies pairs of them by pairs of weight codes and adds each pair, 16 products per
// instruction where a float32 FMA makes 8, and the widening of a code is two integer operations instead of
// a conversion and an FMA. A block's int32 sum is exact; it enters the float32 result as
//   out += float(sum) * (weight scale * x scale) + weight min * (x scale * sum of x codes),
// block after block in order (the second term for q4 only). This machine's cores make too few float
// operations per second for a float32 kernel to keep up with the memory (docs/performance.md).
//
// Layout (`quant.tiled`, once at load): columns in tiles of 16, each tile one contiguous stream of its
// blocks of 32 inputs, and each block laid out as the instructions read it: 8 columns x 2 inputs per 16
// bytes, the two inputs of a pair side by side. q4 codes [N / 16, K / 32, 256] uint8: for inputs quad q
// (4q .. 4q+3) and columns half h, the 16 bytes at 32q + 16h hold, at byte 2c + p, input 4q + p of column
// 8h + c in the low nibble and input 4q + 2 + p in the high one. q8 codes [N / 16, K / 32, 512] int8: for
// input pair p, byte 32p + 16h + 2c + e is input 2p + e of column 8h + c. Scales (and q4's mins)
// [N / 16, K / group, 16] float16.
//
// Every output takes the same operations in the same order whatever the work item, the block of rows or
// the number of rows, so a row's result does not depend on the rows beside it: a request decodes the same
// tokens alone or in a batch.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#include <immintrin.h>

namespace {

constexpr int64_t kTile = 16;      // columns per tile: two vectors of 8
constexpr int64_t kBlock = 32;     // inputs per block
constexpr int kMaxRows = 4;        // rows per block of work: 4 x 2 int32 sums in registers
constexpr int64_t kItemRows = 64;  // rows per work item
constexpr int64_t kItemsPerThread = 8;

struct Weight {
  const uint8_t* codes;
  const uint16_t* scales;
  const uint16_t* mins;  // null for q8
  int64_t blocks, groups, group_blocks, block_bytes;
};

// x quantized per row and block: int16 codes [M, K] (read as int32 pairs), and per block its scale and the
// scale times the sum of its codes.
struct Activations {
  std::vector<int16_t> codes;
  std::vector<float> scale, offset;  // [M, K / 32]
  const int32_t* Pairs(int64_t row, int64_t K) const {
    return reinterpret_cast<const int32_t*>(codes.data() + row * K);
  }
};

int32_t HorizontalSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

float HorizontalMax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

Activations QuantizeRows(const float* x, int64_t M, int64_t K) {
  Activations a{std::vector<int16_t>(M * K), std::vector<float>(M * K / kBlock),
                std::vector<float>(M * K / kBlock)};
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t block = 0; block < M * K / kBlock; ++block) {
    const float* in = x + block * kBlock;
    __m256 v[4], largest = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(in + 8 * i);
      largest = _mm256_max_ps(largest, _mm256_and_ps(v[i], magnitude));
    }
    const float top = HorizontalMax(largest);
    const __m256 inverse = _mm256_set1_ps(top > 0 ? 32767.0f / top : 0.0f);
    __m256i q[4], total = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));  // to nearest
      total = _mm256_add_epi32(total, q[i]);
    }
    // packs works within 128-bit lanes; the permute puts the 16 codes of each pair of vectors in order.
    for (int i = 0; i < 4; i += 2) {
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[i], q[i + 1]), 0xd8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.codes.data() + block * kBlock + 8 * i), packed);
    }
    a.scale[block] = top / 32767.0f;
    a.offset[block] = a.scale[block] * static_cast<float>(HorizontalSum(total));
  }
  return a;
}

inline __m256 HalfToFloat(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256i Broadcast(const int32_t* p) { return _mm256_set1_epi32(*p); }

// One block of inputs of tile `tile` times rows m0 .. m0+R: the int32 sums of both halves of the tile.
template <int Bits, int R>
void BlockSums(const Activations& a, int64_t K, int64_t m0, const Weight& w, int64_t tile, int64_t b,
               __m256i (&sums)[R][2]) {
  const uint8_t* codes = w.codes + (tile * w.blocks + b) * w.block_bytes;
  for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
  if constexpr (Bits == 4) {
    const __m256i low = _mm256_set1_epi16(15);
    for (int q = 0; q < 8; ++q) {
      for (int h = 0; h < 2; ++h) {
        const __m256i bytes =
            _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * q + 16 * h)));
        const __m256i first = _mm256_and_si256(bytes, low), second = _mm256_srli_epi16(bytes, 4);
        for (int r = 0; r < R; ++r) {
          const int32_t* pairs = a.Pairs(m0 + r, K) + b * 16 + 2 * q;
          const __m256i products = _mm256_add_epi32(_mm256_madd_epi16(first, Broadcast(pairs)),
                                                    _mm256_madd_epi16(second, Broadcast(pairs + 1)));
          sums[r][h] = _mm256_add_epi32(sums[r][h], products);
        }
      }
    }
  } else {
    for (int p = 0; p < 16; ++p) {
      for (int h = 0; h < 2; ++h) {
        const __m256i weights =
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * p + 16 * h)));
        for (int r = 0; r < R; ++r) {
          const int32_t* pairs = a.Pairs(m0 + r, K) + b * 16 + p;
          sums[r][h] = _mm256_add_epi32(sums[r][h], _mm256_madd_epi16(weights, Broadcast(pairs)));
        }
      }
    }
  }
}

// out[m0 .. m0+R, the tile's 16 columns] = x's rows times the tile, block after block.
template <int Bits, int R>
void TileRows(const Activations& a, int64_t K, int64_t m0, const Weight& w, int64_t tile, float* out,
              int64_t N) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b) {
    __m256i sums[R][2];
    BlockSums<Bits, R>(a, K, m0, w, tile, b, sums);
    const int64_t g = (tile * w.groups + b / w.group_blocks) * kTile;
    for (int h = 0; h < 2; ++h) {
      const __m256 d = HalfToFloat(w.scales + g + 8 * h);
      for (int r = 0; r < R; ++r) {
        const int64_t at = (m0 + r) * (K / kBlock) + b;
        const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(a.scale[at]));
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][h]), scale, acc[r][h]);
        if constexpr (Bits == 4) {
          acc[r][h] = _mm256_fmadd_ps(HalfToFloat(w.mins + g + 8 * h), _mm256_set1_ps(a.offset[at]), acc[r][h]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + (m0 + r) * N + tile * kTile + 8 * h, acc[r][h]);
  }
}

template <int Bits>
void Multiply(ffi::ThreadPool& pool, const Activations& a, int64_t M, int64_t K, const Weight& w, int64_t tiles,
              float* out) {
  using Rows = void (*)(const Activations&, int64_t, int64_t, const Weight&, int64_t, float*, int64_t);
  static constexpr Rows kRows[kMaxRows + 1] = {nullptr, &TileRows<Bits, 1>, &TileRows<Bits, 2>,
                                               &TileRows<Bits, 3>, &TileRows<Bits, 4>};
  // Items of consecutive tiles, a few per thread: each claim of an item costs an atomic operation.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t span = std::max<int64_t>(1, tiles / (threads * kItemsPerThread));
  const int64_t spans = (tiles + span - 1) / span, groups = (M + kItemRows - 1) / kItemRows;
  const int64_t N = tiles * kTile;
  jaxserver_kernels::ParallelFor(pool, spans * groups, [&, span, groups](int64_t item) {
    const int64_t first_tile = (item / groups) * span, last_tile = std::min(tiles, first_tile + span);
    const int64_t first = (item % groups) * kItemRows, last = std::min(M, first + kItemRows);
    for (int64_t tile = first_tile; tile < last_tile; ++tile) {
      for (int64_t m0 = first; m0 < last; m0 += kMaxRows) {
        kRows[std::min<int64_t>(kMaxRows, last - m0)](a, K, m0, w, tile, out, N);
      }
    }
  });
}

template <int Bits>
ffi::Error QuantGemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes,
                     ffi::Buffer<ffi::F16> scales, ffi::Buffer<ffi::F16> mins, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scales.dimensions();
  const int64_t block_bytes = Bits == 4 ? kBlock * kTile / 2 : kBlock * kTile;
  const bool shapes = xd.size() == 2 && cd.size() == 3 && sd.size() == 3 && cd[2] == block_bytes &&
                      sd[0] == cd[0] && sd[2] == kTile && xd[1] == cd[1] * kBlock && sd[1] > 0 &&
                      cd[1] % sd[1] == 0 && codes.element_type() == (Bits == 4 ? ffi::U8 : ffi::S8);
  if (!shapes || (Bits == 4 && mins.element_count() != scales.element_count())) {
    return ffi::Error::InvalidArgument(
        "quant_gemm: x must be [M, K] and the weight tiled as quant.tiled makes it (codes [N / 16, K / 32, "
        "256 or 512], scales [N / 16, K / group, 16])");
  }
  const int64_t M = xd[0], K = xd[1];
  if (M == 0) return ffi::Error::Success();
  const Weight w{static_cast<const uint8_t*>(codes.untyped_data()),
                 reinterpret_cast<const uint16_t*>(scales.typed_data()),
                 Bits == 4 ? reinterpret_cast<const uint16_t*>(mins.typed_data()) : nullptr,
                 cd[1], sd[1], cd[1] / sd[1], block_bytes};
  // On the calling thread: a few microseconds, less than waking the pool for it.
  const Activations a = QuantizeRows(x.typed_data(), M, K);
  Multiply<Bits>(pool, a, M, K, w, cd[0], out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

extern "C" int JaxserverHasQuantGemm() { return 1; }

#else  // no AVX2: the handlers refuse, and Python asks first

namespace {

template <int Bits>
ffi::Error QuantGemm(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::AnyBuffer, ffi::Buffer<ffi::F16>,
                     ffi::Buffer<ffi::F16>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "quant_gemm: this CPU has no AVX2, FMA and F16C");
}

}  // namespace

extern "C" int JaxserverHasQuantGemm() { return 0; }

#endif

// q8 takes its scales again where q4 takes its mins (never read).
#define JAXSERVER_QUANT_GEMM(symbol, bits)                                \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, QuantGemm<bits>,                 \
                                ffi::Ffi::Bind()                         \
                                    .Ctx<ffi::ThreadPool>()              \
                                    .Arg<ffi::Buffer<ffi::F32>>()        \
                                    .Arg<ffi::AnyBuffer>()               \
                                    .Arg<ffi::Buffer<ffi::F16>>()        \
                                    .Arg<ffi::Buffer<ffi::F16>>()        \
                                    .Ret<ffi::Buffer<ffi::F32>>());
JAXSERVER_QUANT_GEMM(JaxserverQuantGemmQ4, 4)
JAXSERVER_QUANT_GEMM(JaxserverQuantGemmQ8, 8)
