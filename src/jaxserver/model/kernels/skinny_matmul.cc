// Few-row matmul for the CPU: x [M, K] float32 times w [K, N] bfloat16 -> [M, N] float32, M <= 8, the
// shape of a decode step's weight products with a handful of streams.
//
// There XLA:CPU's bf16 x bf16 -> f32 dot reads the weights at about half the memory bandwidth (a lone row
// takes a path ten times slower still, so jaxserver pads it to two), while the step for so few rows is
// bound by reading the weights once. This kernel streams them once: each work item owns a tile of output
// columns, keeps the M x tile sums in registers, and walks down the K weight rows of that tile, widening
// bf16 to float32 as it loads (a shift of the 16 bits into a float's top half: exact).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxserver_kernels::kLanes;
using jaxserver_kernels::Store;
using jaxserver_kernels::Vec;
using HalfBits = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));
using Bits = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));

constexpr int64_t kMaxRows = 8;

inline Vec LoadBf16(const uint16_t* p) {
  HalfBits half;
  __builtin_memcpy(&half, p, sizeof half);
  const Bits bits = __builtin_convertvector(half, Bits) << 16;
  Vec v;
  __builtin_memcpy(&v, &bits, sizeof v);
  return v;
}

inline float Bf16ToFloat(uint16_t half) {
  const uint32_t bits = static_cast<uint32_t>(half) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// Output columns [n0, n0 + T * kLanes) of all M rows.
template <int M, int T>
void Tile(const float* x, const uint16_t* w, int64_t K, int64_t N, int64_t n0, float* out) {
  Vec acc[M][T] = {};
  for (int64_t k = 0; k < K; ++k) {
    Vec wk[T];
    for (int j = 0; j < T; ++j) wk[j] = LoadBf16(w + k * N + n0 + j * kLanes);
    for (int m = 0; m < M; ++m) {
      const Vec xm = Vec{} + x[m * K + k];
      for (int j = 0; j < T; ++j) acc[m][j] += xm * wk[j];
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int j = 0; j < T; ++j) Store(out + m * N + n0 + j * kLanes, acc[m][j]);
  }
}

// Columns [n0, N) one at a time: what is left of N after whole vectors.
void ColumnsOneByOne(int64_t M, const float* x, const uint16_t* w, int64_t K, int64_t N, int64_t n0,
                     float* out) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < N; ++n) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += x[m * K + k] * Bf16ToFloat(w[k * N + n]);
      out[m * N + n] = sum;
    }
  }
}

using TileFn = void (*)(const float*, const uint16_t*, int64_t, int64_t, int64_t, float*);

// Vectors per tile for M rows: M x T sums and T weight vectors within the 32 AVX-512 registers.
constexpr int TileVectors(int rows) { return rows <= 2 ? 12 : rows <= 3 ? 8 : rows <= 4 ? 6 : 3; }

struct Plan {
  TileFn wide = nullptr;    // T vectors of columns
  TileFn narrow = nullptr;  // one vector of columns, for the rest
  int64_t wide_columns = 0;
};

template <int... Ms>
Plan PlanFor(int64_t rows, std::integer_sequence<int, Ms...>) {
  Plan plan;
  ((rows == Ms + 1 ? (plan = Plan{&Tile<Ms + 1, TileVectors(Ms + 1)>, &Tile<Ms + 1, 1>,
                                  TileVectors(Ms + 1) * kLanes},
                      0)
                   : 0),
   ...);
  return plan;
}

ffi::Error SkinnyMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                        ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("skinny_matmul: x must be [M, K] and w [K, N]");
  }
  const int64_t M = xd[0];
  if (M < 1 || M > kMaxRows) return ffi::Error::InvalidArgument("skinny_matmul: 1 to 8 rows of x");
  const float* rows = x.typed_data();
  const auto* weights = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* result = out->typed_data();
  const int64_t K = wd[0], N = wd[1];
  const Plan plan = PlanFor(M, std::make_integer_sequence<int, kMaxRows>{});
  // Items are tiles of output columns: the wide ones, then one-vector ones for what is left.
  const int64_t wide_tiles = N / plan.wide_columns;
  const int64_t wide_end = wide_tiles * plan.wide_columns;
  const int64_t narrow_tiles = (N - wide_end) / kLanes;
  jaxserver_kernels::ParallelFor(pool, wide_tiles + narrow_tiles, [=](int64_t i) {
    if (i < wide_tiles) {
      plan.wide(rows, weights, K, N, i * plan.wide_columns, result);
    } else {
      plan.narrow(rows, weights, K, N, wide_end + (i - wide_tiles) * kLanes, result);
    }
  });
  ColumnsOneByOne(M, rows, weights, K, N, wide_end + narrow_tiles * kLanes, result);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserverSkinnyMatmul, SkinnyMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
