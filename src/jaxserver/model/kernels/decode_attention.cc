// Decode attention for the CPU: one new query token per batch row against that row's own cache slot,
// reading only the cache positions the row attends to ([start, end]), in place. Each row's new key and
// value are written into the cache first, at its position `end`, so a prompt piece can run as one row per
// token (each attending to the rows before it). XLA's scatter for those writes was a visible share of a
// decode step and of a prompt; here they are a few thousand stores (docs/performance.md).
//
// XLA:CPU cannot express this without copies: it gathers each row's cache slice into a padded block and
// writes out the query-times-key products before reducing them (docs/architecture.md). This kernel reads
// every cached key and value once, from where it lies, and keeps the scores in L1.
//
// Layouts (row-major; the caches float32, float16 or bfloat16, widened to float32 as they are read), matching
// jaxserver.model.llama.KVCache:
//   q        [B, kv_heads, group, head_dim]
//   k_new, v_new [B, kv_heads, head_dim] float32: the rows' own keys and values
//   k_cache  [slots, kv_heads, blocks, head_dim, 16]: keys in blocks of 16 positions, each block's
//            head_dim rows of 16 consecutive positions (length <= blocks * 16)
//   v_cache  [slots, kv_heads, length, head_dim]
//   slot_ids, starts, ends [B] int32: row b attends to cache positions starts[b]..ends[b] of slot slot_ids[b]
//   out      [B, kv_heads, group, head_dim], and the caches with the new entries (the same buffers: the
//            caller aliases them)
// A row whose range is empty, or whose end lies past the cache (an idle row padding the batch, or padding
// past the end of a prompt piece), gets zeros, reads nothing and writes nothing.
//
// Why keys come in blocks: a query multiplies one key dimension by 16 positions per vector, so positions
// must lie along the fast axis; but with keys stored [head_dim, length], 64 dimensions of one position sat
// in 64 different pages, a new key took 64 scattered stores, and a short read touched 64 pages for a few
// lines each. In blocks, a run of positions is one contiguous stream and a new key lands in one page
// (docs/performance.md).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "attention_common.h"
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxserver_kernels;  // vectors, the cache readers and writers, ExpNonPositive, SoftmaxNumerators

// Scores are computed for up to this many key blocks at a time: group x kScoreBlocks accumulators stay in
// registers while the blocks' head_dim rows stream past.
constexpr int64_t kScoreBlocks = 4;
// Values are summed this many dimensions at a time, for the same reason.
constexpr int64_t kDimVecs = 4;
// Limits DecodeAttention checks: a group size the kernel is instantiated for, whole vectors of head_dim.
constexpr int64_t kMaxGroup = 16;
constexpr int64_t kMaxHeadDim = 256;

struct Shapes {
  int64_t batch, kv_heads, group, head_dim, slots, length, key_blocks;
};

// Raw scores q . k * scale of the NB key blocks from `keys` on (NB x 16 positions) for the G query heads,
// into rows[g * stride + t]. Each key row of a block is read once for all G heads.
template <int G, int NB, typename T>
void ScoreBlocks(const float* q, const T* keys, int64_t D, float scale, float* rows, int64_t stride) {
  Vec acc[G][NB] = {};
  for (int64_t d = 0; d < D; ++d) {
    Vec k[NB];
    for (int j = 0; j < NB; ++j) k[j] = LoadAs(keys + (j * D + d) * kKeyBlock);
    for (int g = 0; g < G; ++g) {
      const Vec qd = Splat(q[g * D + d]);
      for (int j = 0; j < NB; ++j) acc[g][j] += qd * k[j];
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < NB; ++j) Store(rows + g * stride + j * kLanes, acc[g][j] * scale);
  }
}

// out[g, :V vectors] = sum over t < n of rows[g * stride + t] * values[t * D, :V vectors], times
// inverse_total[g]. V is a template argument so that the G x V sums stay in registers.
template <int G, int V, typename T>
void SumValues(const float* rows, int64_t stride, int64_t n, const T* values, int64_t D,
               const float* inverse_total, float* out) {
  Vec acc[G][V] = {};
  for (int64_t t = 0; t < n; ++t) {
    Vec v[V];
    for (int j = 0; j < V; ++j) v[j] = LoadAs(values + t * D + j * kLanes);
    for (int g = 0; g < G; ++g) {
      const Vec p = Splat(rows[g * stride + t]);
      for (int j = 0; j < V; ++j) acc[g][j] += p * v[j];
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < V; ++j) Store(out + g * D + j * kLanes, acc[g][j] * inverse_total[g]);
  }
}

// One (row, kv head): softmax(q k^T * scale) v over positions [start, end] for G query heads.
template <int G, typename T>
void AttendOne(const Shapes& s, const float* q, const T* k_cache, const T* v_cache, int32_t slot,
               int32_t start, int32_t end, float scale, float* out, std::vector<float>& scores) {
  const int64_t D = s.head_dim, L = s.length;
  start = std::max<int32_t>(start, 0);
  if (slot < 0 || slot >= s.slots || end >= L || end < start) {
    std::fill(out, out + G * D, 0.0f);
    return;
  }
  const int64_t n = end - start + 1;
  // Scores are computed from the block holding `start` on, so the row of score buffer g begins `skip`
  // entries in; it holds whole vectors up to past `end` (padding masked below).
  const int64_t first_block = start / kKeyBlock, skip = start - first_block * kKeyBlock;
  const int64_t blocks = (end / kKeyBlock) - first_block + 1;
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;  // the row's length in whole vectors
  const int64_t stride = (blocks + 1) * kKeyBlock;             // >= skip + padded
  scores.resize(G * stride);
  const T* keys = k_cache + (slot * s.kv_heads * s.key_blocks + first_block) * D * kKeyBlock;  // the caller
  const T* values = v_cache + slot * s.kv_heads * L * D + start * D;                         // offsets the head

  // Blocks past `end` hold other positions of the same slot (finite numbers) or never-written zeros; their
  // scores land in the padding of each row and are masked below.
  for (int64_t j = 0; j < blocks; j += kScoreBlocks) {
    const T* from = keys + j * D * kKeyBlock;
    float* to = scores.data() + j * kKeyBlock;
    switch (std::min(kScoreBlocks, blocks - j)) {
      case 4: ScoreBlocks<G, 4, T>(q, from, D, scale, to, stride); break;
      case 3: ScoreBlocks<G, 3, T>(q, from, D, scale, to, stride); break;
      case 2: ScoreBlocks<G, 2, T>(q, from, D, scale, to, stride); break;
      default: ScoreBlocks<G, 1, T>(q, from, D, scale, to, stride); break;
    }
  }
  // Each row from `start` on: position start + t at index t, whatever the block alignment, so that the
  // sums below group the same positions into the same lanes for any start (a left-padded prompt gets the
  // numbers it would get unpadded).
  float* rows = scores.data() + skip;

  // Softmax numerators in place, padding set to zero; the division by their sum is left to the output.
  float inverse_total[G];
  SoftmaxNumerators<G>(rows, stride, n, padded, inverse_total);

  // Weighted values, kDimVecs vectors of head_dim at a time.
  for (int64_t d0 = 0; d0 < D; d0 += kDimVecs * kLanes) {
    switch (std::min(kDimVecs, (D - d0) / kLanes)) {
      case 4: SumValues<G, 4, T>(rows, stride, n, values + d0, D, inverse_total, out + d0); break;
      case 3: SumValues<G, 3, T>(rows, stride, n, values + d0, D, inverse_total, out + d0); break;
      case 2: SumValues<G, 2, T>(rows, stride, n, values + d0, D, inverse_total, out + d0); break;
      default: SumValues<G, 1, T>(rows, stride, n, values + d0, D, inverse_total, out + d0); break;
    }
  }
}

template <typename T>
using AttendFn = void (*)(const Shapes&, const float*, const T*, const T*, int32_t, int32_t, int32_t, float,
                          float*, std::vector<float>&);

// AttendOne<group>, chosen once per call: with the group a compile-time constant, the group x block sums
// above are fixed arrays of vectors the compiler keeps in registers.
template <typename T, int... Gs>
AttendFn<T> PickAttend(int64_t group, std::integer_sequence<int, Gs...>) {
  AttendFn<T> fn = nullptr;
  ((fn = (group == Gs + 1) ? &AttendOne<Gs + 1, T> : fn), ...);
  return fn;
}

// T is the caches' element type as the kernel reads it, Cache the FFI's name for it: float (F32), float16
// (F16), or bf16 kept as its 16 bits (U16: jaxserver stores a bf16 cache as integers, which XLA:CPU
// scatters in place where it copied a bf16 array whole).
template <typename T, ffi::DataType Cache>
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                           ffi::Buffer<ffi::F32> v_new, ffi::Buffer<Cache> k_cache, ffi::Buffer<Cache> v_cache,
                           ffi::Buffer<ffi::S32> slot_ids, ffi::Buffer<ffi::S32> starts,
                           ffi::Buffer<ffi::S32> ends, ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<Cache> k_cache_out, ffi::ResultBuffer<Cache> v_cache_out) {
  auto qd = q.dimensions(), kd = k_cache.dimensions(), vd = v_cache.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 4) {
    return ffi::Error::InvalidArgument("decode_attention: q and v_cache must be rank 4, k_cache rank 5");
  }
  Shapes s{qd[0], qd[1], qd[2], qd[3], vd[0], vd[2], kd[2]};
  if (vd[1] != s.kv_heads || vd[3] != s.head_dim || kd[0] != s.slots || kd[1] != s.kv_heads ||
      kd[3] != s.head_dim || kd[4] != kKeyBlock || kd[2] * kKeyBlock < s.length) {
    return ffi::Error::InvalidArgument(
        "decode_attention: cache shapes do not match the queries (keys [slots, kv_heads, blocks, head_dim, "
        "16] covering the values' [slots, kv_heads, length, head_dim])");
  }
  if (s.group < 1 || s.group > kMaxGroup || s.head_dim > kMaxHeadDim || s.head_dim % kLanes != 0) {
    return ffi::Error::InvalidArgument(
        "decode_attention: at most 16 query heads per kv head, and head_dim a multiple of 16 up to 256");
  }
  const int64_t row_entries = s.kv_heads * s.head_dim;
  if (k_new.element_count() != s.batch * row_entries || v_new.element_count() != s.batch * row_entries) {
    return ffi::Error::InvalidArgument("decode_attention: k_new and v_new must be [B, kv_heads, head_dim]");
  }
  if (slot_ids.element_count() != s.batch || starts.element_count() != s.batch ||
      ends.element_count() != s.batch) {
    return ffi::Error::InvalidArgument("decode_attention: slot_ids, starts and ends need one entry per row");
  }
  auto* keys = reinterpret_cast<T*>(k_cache_out->untyped_data());
  auto* values = reinterpret_cast<T*>(v_cache_out->untyped_data());
  // The caller aliases the caches with their outputs; were they distinct buffers, start from a copy.
  if (keys != k_cache.untyped_data()) std::memcpy(keys, k_cache.untyped_data(), k_cache.size_bytes());
  if (values != v_cache.untyped_data()) std::memcpy(values, v_cache.untyped_data(), v_cache.size_bytes());
  const int32_t *slots = slot_ids.typed_data(), *first = starts.typed_data(), *last = ends.typed_data();
  const float *new_keys = k_new.typed_data(), *new_values = v_new.typed_data();
  // Row b's new key and value for kv head h, at its position last[b] (nothing for an idle row).
  auto write_entry = [=](int64_t b, int64_t h) {
    if (slots[b] < 0 || slots[b] >= s.slots || last[b] < 0 || last[b] >= s.length) return;
    const int64_t head = slots[b] * s.kv_heads + h, block = last[b] / kKeyBlock, lane = last[b] % kKeyBlock;
    const float* key = new_keys + (b * s.kv_heads + h) * s.head_dim;
    const float* value = new_values + (b * s.kv_heads + h) * s.head_dim;
    T* key_entries = keys + (head * s.key_blocks + block) * s.head_dim * kKeyBlock + lane;
    T* value_entries = values + (head * s.length + last[b]) * s.head_dim;
    for (int64_t d = 0; d < s.head_dim; ++d) {
      FromFloat(key[d], key_entries + d * kKeyBlock);
      FromFloat(value[d], value_entries + d);
    }
  };
  // Rows in distinct slots (a decode step) write their entries in their own work items, side by side.
  // Rows that share a slot (a prompt piece's tokens) attend to each other's entries: those are all
  // written first. (Written one by one, a decode step's entries were a noticeable share of the kernel's
  // time; docs/performance.md.)
  std::vector<bool> taken(s.slots, false);
  bool distinct = true;
  for (int64_t b = 0; b < s.batch && distinct; ++b) {
    if (slots[b] < 0 || slots[b] >= s.slots) continue;
    distinct = !taken[slots[b]];
    taken[slots[b]] = true;
  }
  if (!distinct) {
    for (int64_t b = 0; b < s.batch; ++b) {
      for (int64_t h = 0; h < s.kv_heads; ++h) write_entry(b, h);
    }
  }
  const float* queries = q.typed_data();
  float* result = out->typed_data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const AttendFn<T> attend = PickAttend<T>(s.group, std::make_integer_sequence<int, kMaxGroup>{});
  const int64_t head_keys = s.key_blocks * s.head_dim * kKeyBlock, head_values = s.length * s.head_dim;
  // Items are (row, kv head) pairs.
  jaxserver_kernels::ParallelFor(pool, s.batch * s.kv_heads, [=](int64_t i) {
    thread_local std::vector<float> scores;
    const int64_t b = i / s.kv_heads, h = i % s.kv_heads;
    if (distinct) write_entry(b, h);
    const int64_t head_offset = (b * s.kv_heads + h) * s.group * s.head_dim;
    attend(s, queries + head_offset, keys + h * head_keys, values + h * head_values, slots[b], first[b],
           last[b], scale, result + head_offset, scores);
  });
  return ffi::Error::Success();
}

// The handler's signature for caches of type Cache.
template <ffi::DataType Cache>
auto Signature() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<Cache>>()
      .template Arg<ffi::Buffer<Cache>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<Cache>>()
      .template Ret<ffi::Buffer<Cache>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserverDecodeAttention, (DecodeAttention<float, ffi::F32>),
                              Signature<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserverDecodeAttentionBf16, (DecodeAttention<uint16_t, ffi::U16>),
                              Signature<ffi::U16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserverDecodeAttentionF16, (DecodeAttention<_Float16, ffi::F16>),
                              Signature<ffi::F16>());
