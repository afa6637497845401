// Decode attention for the CPU: one new query token per batch row against that row's own cache slot,
// reading only the cache positions the row attends to ([start, end]), in place.
//
// XLA:CPU cannot express this without copies: it gathers each row's cache slice into a padded block and
// writes out the query-times-key products before reducing them (README, Performance). This kernel reads
// every cached key and value once, from where it lies, and keeps the scores in L1.
//
// Layouts (float32, row-major), matching jaxserver.model.llama.KVCache:
//   q        [B, kv_heads, group, head_dim]
//   k_cache  [slots, kv_heads, head_dim, length]   (keys transposed: positions along the fast axis)
//   v_cache  [slots, kv_heads, length, head_dim]
//   slot_ids, starts, ends [B] int32: row b attends to cache positions starts[b]..ends[b] of slot slot_ids[b]
//   out      [B, kv_heads, group, head_dim]
// A row whose range is empty, or whose end lies past the cache (an idle row padding the batch: its token
// is written nowhere), gets zeros and reads nothing.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Scores are computed for this many positions at a time: group x kBlock floats stay in registers / L1
// while the head_dim rows of keys stream past.
constexpr int64_t kBlock = 64;
// Limits of the stack accumulators; DecodeAttention rejects larger shapes.
constexpr int64_t kMaxGroup = 16;
constexpr int64_t kMaxHeadDim = 256;

struct Shapes {
  int64_t batch, kv_heads, group, head_dim, slots, length;
};

// One (row, kv head): softmax(q k^T * scale) v over positions [start, end] for `group` query heads.
void AttendOne(const Shapes& s, const float* q, const float* k_cache, const float* v_cache, int32_t slot,
               int32_t start, int32_t end, float scale, float* out, std::vector<float>& scores) {
  const int64_t G = s.group, D = s.head_dim, L = s.length;
  start = std::max<int32_t>(start, 0);
  if (slot < 0 || slot >= s.slots || end >= L || end < start) {
    std::fill(out, out + G * D, 0.0f);
    return;
  }
  const int64_t n = end - start + 1;
  scores.resize(G * n);
  const float* keys = k_cache + slot * s.kv_heads * D * L;  // this slot; the caller offsets the head
  const float* values = v_cache + slot * s.kv_heads * L * D;

  // Scores, a block of positions at a time for all query heads of the group, so each key row is read
  // once: q . k over head_dim, keys contiguous along positions.
  float* __restrict score_rows = scores.data();
  for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
    const int64_t width = std::min(kBlock, n - t0);
    float acc[kMaxGroup][kBlock];
    std::fill(&acc[0][0], &acc[0][0] + G * kBlock, 0.0f);  // only the group's rows, not all kMaxGroup
    for (int64_t d = 0; d < D; ++d) {
      const float* __restrict krow = keys + d * L + start + t0;
      // A full block's constant trip count lets the compiler unroll it into whole vector registers.
      if (width == kBlock) {
        for (int64_t g = 0; g < G; ++g) {
          const float qd = q[g * D + d];
          for (int64_t t = 0; t < kBlock; ++t) acc[g][t] += qd * krow[t];
        }
      } else {
        for (int64_t g = 0; g < G; ++g) {
          const float qd = q[g * D + d];
          for (int64_t t = 0; t < width; ++t) acc[g][t] += qd * krow[t];
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t t = 0; t < width; ++t) score_rows[g * n + t0 + t] = acc[g][t] * scale;
    }
  }

  for (int64_t g = 0; g < G; ++g) {
    float* row = score_rows + g * n;
    float top = row[0];
    for (int64_t t = 1; t < n; ++t) top = std::max(top, row[t]);
    float total = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      row[t] = std::exp(row[t] - top);
      total += row[t];
    }
    const float inverse = 1.0f / total;
    for (int64_t t = 0; t < n; ++t) row[t] *= inverse;
  }

  // Weighted values, accumulated in a local block the compiler keeps in registers for small heads.
  float acc[kMaxGroup * kMaxHeadDim];
  std::fill(acc, acc + G * D, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    const float* __restrict vrow = values + (start + t) * D;
    for (int64_t g = 0; g < G; ++g) {
      const float p = score_rows[g * n + t];
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += p * vrow[d];
    }
  }
  std::copy(acc, acc + G * D, out);
}

// Work shared between the calling thread and the pool's: items are (row, kv head) pairs, claimed from
// an atomic counter. The state is reference-counted because a helper may start only after the call has
// returned (every item already claimed); it then finds nothing to do and touches nothing else.
struct Work {
  Shapes shapes;
  const float *q, *k_cache, *v_cache;
  const int32_t *slot_ids, *starts, *ends;
  float* out;
  float scale;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    std::vector<float> scores;
    const Shapes& s = shapes;
    for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) {
      const int64_t b = i / s.kv_heads, h = i % s.kv_heads;
      const int64_t head_offset = (b * s.kv_heads + h) * s.group * s.head_dim;
      AttendOne(s, q + head_offset, k_cache + h * s.head_dim * s.length, v_cache + h * s.length * s.head_dim,
                slot_ids[b], starts[b], ends[b], scale, out + head_offset, scores);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_cache,
                           ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::S32> slot_ids,
                           ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::S32> ends,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k_cache.dimensions(), vd = v_cache.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) {
    return ffi::Error::InvalidArgument("decode_attention: q, k_cache and v_cache must be rank 4");
  }
  Shapes s{qd[0], qd[1], qd[2], qd[3], kd[0], kd[3]};
  if (kd[1] != s.kv_heads || kd[2] != s.head_dim || vd[0] != s.slots || vd[1] != s.kv_heads ||
      vd[2] != s.length || vd[3] != s.head_dim) {
    return ffi::Error::InvalidArgument("decode_attention: cache shapes do not match the queries");
  }
  if (s.group > kMaxGroup || s.head_dim > kMaxHeadDim) {
    return ffi::Error::InvalidArgument("decode_attention: at most 16 query heads per kv head and head_dim 256");
  }
  if (slot_ids.element_count() != s.batch || starts.element_count() != s.batch ||
      ends.element_count() != s.batch) {
    return ffi::Error::InvalidArgument("decode_attention: slot_ids, starts and ends need one entry per row");
  }
  auto work = std::make_shared<Work>();
  work->shapes = s;
  work->q = q.typed_data();
  work->k_cache = k_cache.typed_data();
  work->v_cache = v_cache.typed_data();
  work->slot_ids = slot_ids.typed_data();
  work->starts = starts.typed_data();
  work->ends = ends.typed_data();
  work->out = out->typed_data();
  work->scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  work->items = s.batch * s.kv_heads;

  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  // Every item is claimed by now; wait for those still running on helpers.
  while (work->done.load(std::memory_order_acquire) < work->items) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserverDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
