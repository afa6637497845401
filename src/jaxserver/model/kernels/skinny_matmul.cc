// Few-row matmul for the CPU: x [M, K] float32 times w [K, N] bfloat16 -> [M, N] float32, M <= 8, the
// shape of a decode step's weight products with a handful of streams.
//
// There XLA:CPU's bf16 x bf16 -> f32 dot reads the weights at about half the memory bandwidth (a lone row
// takes a path ten times slower still, so jaxserver pads it to two), while the step for so few rows is
// bound by reading the weights once. This kernel streams them once: each work item owns a tile of output
// columns, keeps the M x tile sums in registers, and walks down the K weight rows of that tile, widening
// bf16 to float32 as it loads (a shift of the 16 bits into a float's top half: exact).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
using Vec = float __attribute__((vector_size(kLanes * sizeof(float))));
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
    for (int j = 0; j < T; ++j) __builtin_memcpy(out + m * N + n0 + j * kLanes, &acc[m][j], sizeof(Vec));
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

// Tiles shared between the calling thread and the pool's through an atomic counter; reference-counted
// because a helper may start after the call returned (then it finds no tile left and touches nothing).
struct Work {
  const float* x;
  const uint16_t* w;
  float* out;
  int64_t K, N;
  Plan plan;
  int64_t wide_tiles, tiles;  // wide tiles first, then one-vector tiles
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (int64_t i = next.fetch_add(1); i < tiles; i = next.fetch_add(1)) {
      if (i < wide_tiles) {
        plan.wide(x, w, K, N, i * plan.wide_columns, out);
      } else {
        plan.narrow(x, w, K, N, wide_tiles * plan.wide_columns + (i - wide_tiles) * kLanes, out);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error SkinnyMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                        ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("skinny_matmul: x must be [M, K] and w [K, N]");
  }
  const int64_t M = xd[0];
  if (M < 1 || M > kMaxRows) return ffi::Error::InvalidArgument("skinny_matmul: 1 to 8 rows of x");
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = reinterpret_cast<const uint16_t*>(w.typed_data());
  work->out = out->typed_data();
  work->K = wd[0];
  work->N = wd[1];
  work->plan = PlanFor(M, std::make_integer_sequence<int, kMaxRows>{});
  work->wide_tiles = work->N / work->plan.wide_columns;
  const int64_t vectors_left = (work->N - work->wide_tiles * work->plan.wide_columns) / kLanes;
  work->tiles = work->wide_tiles + vectors_left;

  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->tiles) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->tiles) std::this_thread::yield();
  const int64_t covered = work->wide_tiles * work->plan.wide_columns + vectors_left * kLanes;
  ColumnsOneByOne(M, work->x, work->w, work->K, work->N, covered, work->out);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserverSkinnyMatmul, SkinnyMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
