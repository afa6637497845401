// Ragged paged attention for the CPU: a flat batch of query tokens (decode tokens and prompt pieces of any
// number of sequences), each attending to its own sequence's positions [0, position] through that
// sequence's page table, in place. Every token's new key and value is written into its page first, so the
// tokens of a prompt piece attend to each other's entries.
//
// Layouts (row-major; the pages float32, float16 or bfloat16 kept as its bits, widened as they are read),
// matching jaxserver.model.llama.PagedKVCache:
//   q            [N, kv_heads, group, head_dim]
//   k_new, v_new [N, kv_heads, head_dim] float32: the tokens' own keys and values
//   k_pages      [layers, pages, kv_heads, head_dim, 16]: every layer's pages; a page's keys per kv head,
//                head_dim rows of its 16 positions (the positions along the fast axis, as a query
//                multiplies them)
//   v_pages      [layers, pages, kv_heads, 16, head_dim]
//   layer        [1] int32: the layer whose pages are read and written (the model scans over its layers
//                with all their pages in one buffer, updated in place)
//   page_table   [seqs, max_pages] int32: sequence s's position p lives in page page_table[s, p / 16]
//   token_seqs, positions [N] int32: token n belongs to sequence token_seqs[n], at position positions[n]
//   out          [N, kv_heads, group, head_dim], and the pages with the new entries (the same buffers: the
//                caller aliases them)
// A token whose sequence, position or pages lie outside these arrays (padding of the flat batch) gets
// zeros, reads nothing and writes nothing.
//
// Scores and sums run over positions in ascending order from 0 whatever the pages' order in memory, so a
// token's result depends only on its own sequence's entries: the same alone or in any batch.

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

constexpr int64_t kPageTokens = kKeyBlock;
// group x kScorePages score accumulators and group x kDimVecs value sums stay in registers.
constexpr int64_t kScorePages = 4;
constexpr int64_t kDimVecs = 4;
constexpr int64_t kMaxGroup = 16;
constexpr int64_t kMaxHeadDim = 256;

struct Shapes {
  int64_t tokens, kv_heads, group, head_dim, layers, pages, seqs, max_pages;
};

// Raw scores q . k * scale of NP pages (keys[j]: page j's keys of this kv head) for the G query heads,
// into rows[g * stride + j * 16 + lane].
template <int G, int NP, typename T>
void ScorePages(const float* q, const T* const* keys, int64_t D, float scale, float* rows, int64_t stride) {
  Vec acc[G][NP] = {};
  for (int64_t d = 0; d < D; ++d) {
    Vec k[NP];
    for (int j = 0; j < NP; ++j) k[j] = LoadAs(keys[j] + d * kPageTokens);
    for (int g = 0; g < G; ++g) {
      const Vec qd = Splat(q[g * D + d]);
      for (int j = 0; j < NP; ++j) acc[g][j] += qd * k[j];
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < NP; ++j) Store(rows + g * stride + j * kLanes, acc[g][j] * scale);
  }
}

// out[g, :V vectors] = sum over positions t < n of rows[g * stride + t] * (value of t)[:V vectors], times
// inverse_total[g]; values[j] is page j's values of this kv head, offset to the dimensions summed.
template <int G, int V, typename T>
void SumPageValues(const float* rows, int64_t stride, int64_t n, const T* const* values, int64_t D,
                   const float* inverse_total, float* out) {
  Vec acc[G][V] = {};
  for (int64_t t = 0; t < n; ++t) {
    const T* value = values[t / kPageTokens] + (t % kPageTokens) * D;
    Vec v[V];
    for (int j = 0; j < V; ++j) v[j] = LoadAs(value + j * kLanes);
    for (int g = 0; g < G; ++g) {
      const Vec p = Splat(rows[g * stride + t]);
      for (int j = 0; j < V; ++j) acc[g][j] += p * v[j];
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < V; ++j) Store(out + g * D + j * kLanes, acc[g][j] * inverse_total[g]);
  }
}

// Scratch space of one thread: score rows and the pages' addresses.
template <typename T>
struct Scratch {
  std::vector<float> scores;
  std::vector<const T*> keys, values;
};

// One (token, kv head): softmax(q k^T * scale) v over positions [0, position] for G query heads. `k_head`
// and `v_head` point at page 0's entries of this kv head; a page's are `page_stride` entries further on.
template <int G, typename T>
void AttendOne(const Shapes& s, const float* q, const T* k_head, const T* v_head, int64_t page_stride,
               const int32_t* table, int32_t position, float scale, float* out, Scratch<T>& scratch) {
  const int64_t D = s.head_dim, n = position + 1, pages = position / kPageTokens + 1;
  const int64_t stride = pages * kPageTokens;  // whole pages: n rounded up to vectors
  scratch.scores.resize(G * stride);
  scratch.keys.resize(pages);
  scratch.values.resize(pages);
  for (int64_t j = 0; j < pages; ++j) scratch.keys[j] = k_head + table[j] * page_stride;
  float* rows = scratch.scores.data();
  for (int64_t j = 0; j < pages; j += kScorePages) {
    const T* const* from = scratch.keys.data() + j;
    float* to = rows + j * kPageTokens;
    switch (std::min(kScorePages, pages - j)) {
      case 4: ScorePages<G, 4, T>(q, from, D, scale, to, stride); break;
      case 3: ScorePages<G, 3, T>(q, from, D, scale, to, stride); break;
      case 2: ScorePages<G, 2, T>(q, from, D, scale, to, stride); break;
      default: ScorePages<G, 1, T>(q, from, D, scale, to, stride); break;
    }
  }
  float inverse_total[G];
  SoftmaxNumerators<G>(rows, stride, n, stride, inverse_total);
  for (int64_t d0 = 0; d0 < D; d0 += kDimVecs * kLanes) {
    for (int64_t j = 0; j < pages; ++j) scratch.values[j] = v_head + table[j] * page_stride + d0;
    const T* const* from = scratch.values.data();
    switch (std::min(kDimVecs, (D - d0) / kLanes)) {
      case 4: SumPageValues<G, 4, T>(rows, stride, n, from, D, inverse_total, out + d0); break;
      case 3: SumPageValues<G, 3, T>(rows, stride, n, from, D, inverse_total, out + d0); break;
      case 2: SumPageValues<G, 2, T>(rows, stride, n, from, D, inverse_total, out + d0); break;
      default: SumPageValues<G, 1, T>(rows, stride, n, from, D, inverse_total, out + d0); break;
    }
  }
}

template <typename T>
using AttendFn = void (*)(const Shapes&, const float*, const T*, const T*, int64_t, const int32_t*, int32_t,
                          float, float*, Scratch<T>&);

// AttendOne<group>, chosen once per call, so the group is a compile-time constant inside.
template <typename T, int... Gs>
AttendFn<T> PickAttend(int64_t group, std::integer_sequence<int, Gs...>) {
  AttendFn<T> fn = nullptr;
  ((fn = (group == Gs + 1) ? &AttendOne<Gs + 1, T> : fn), ...);
  return fn;
}

// The page-table row of token n if it is a real token whose pages all lie in the pool, else nullptr.
const int32_t* TableOf(const Shapes& s, const int32_t* table, const int32_t* seqs, const int32_t* positions,
                       int64_t n) {
  const int32_t seq = seqs[n], position = positions[n];
  if (seq < 0 || seq >= s.seqs || position < 0 || position >= s.max_pages * kPageTokens) return nullptr;
  const int32_t* row = table + seq * s.max_pages;
  for (int64_t j = 0; j <= position / kPageTokens; ++j) {
    if (row[j] < 0 || row[j] >= s.pages) return nullptr;
  }
  return row;
}

ffi::Error CheckShapes(const Shapes& s, ffi::Span<const int64_t> kd, ffi::Span<const int64_t> vd,
                       int64_t new_entries, int64_t seq_entries, int64_t position_entries) {
  if (kd.size() != 5 || vd.size() != 5 || vd[0] != s.layers || vd[1] != s.pages || kd[2] != s.kv_heads ||
      vd[2] != s.kv_heads || kd[3] != s.head_dim || kd[4] != kPageTokens || vd[3] != kPageTokens ||
      vd[4] != s.head_dim) {
    return ffi::Error::InvalidArgument(
        "paged_attention: pages must be keys [layers, pages, kv_heads, head_dim, 16] and values [layers, "
        "pages, kv_heads, 16, head_dim] for the queries' heads");
  }
  if (s.group < 1 || s.group > kMaxGroup || s.head_dim > kMaxHeadDim || s.head_dim % kLanes != 0) {
    return ffi::Error::InvalidArgument(
        "paged_attention: at most 16 query heads per kv head, and head_dim a multiple of 16 up to 256");
  }
  if (new_entries != s.tokens * s.kv_heads * s.head_dim || seq_entries != s.tokens ||
      position_entries != s.tokens) {
    return ffi::Error::InvalidArgument(
        "paged_attention: k_new and v_new must be [N, kv_heads, head_dim], token_seqs and positions [N]");
  }
  return ffi::Error::Success();
}

template <typename T, ffi::DataType Cache>
ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                          ffi::Buffer<ffi::F32> v_new, ffi::Buffer<Cache> k_pages, ffi::Buffer<Cache> v_pages,
                          ffi::Buffer<ffi::S32> layer_index, ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> token_seqs,
                          ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out,
                          ffi::ResultBuffer<Cache> k_pages_out, ffi::ResultBuffer<Cache> v_pages_out) {
  auto qd = q.dimensions(), td = page_table.dimensions();
  if (qd.size() != 4 || td.size() != 2) {
    return ffi::Error::InvalidArgument("paged_attention: q must be rank 4 and page_table rank 2");
  }
  auto kd = k_pages.dimensions();
  if (kd.size() != 5) return ffi::Error::InvalidArgument("paged_attention: k_pages must be rank 5");
  const Shapes s{qd[0], qd[1], qd[2], qd[3], kd[0], kd[1], td[0], td[1]};
  ffi::Error checked = CheckShapes(s, k_pages.dimensions(), v_pages.dimensions(), k_new.element_count(),
                                   token_seqs.element_count(), positions.element_count());
  if (checked.failure() || v_new.element_count() != k_new.element_count()) {
    return checked.failure() ? checked
                             : ffi::Error::InvalidArgument("paged_attention: v_new must be shaped as k_new");
  }
  const int32_t layer = layer_index.element_count() == 1 ? layer_index.typed_data()[0] : -1;
  if (layer < 0 || layer >= s.layers) {
    return ffi::Error::InvalidArgument("paged_attention: layer must be one index within the pages' layers");
  }
  auto* all_keys = reinterpret_cast<T*>(k_pages_out->untyped_data());
  auto* all_values = reinterpret_cast<T*>(v_pages_out->untyped_data());
  // The caller aliases the pages with their outputs; were they distinct buffers, start from a copy.
  if (all_keys != k_pages.untyped_data()) std::memcpy(all_keys, k_pages.untyped_data(), k_pages.size_bytes());
  if (all_values != v_pages.untyped_data()) {
    std::memcpy(all_values, v_pages.untyped_data(), v_pages.size_bytes());
  }
  const int32_t *table = page_table.typed_data(), *seqs = token_seqs.typed_data(),
                *where = positions.typed_data();
  const float *new_keys = k_new.typed_data(), *new_values = v_new.typed_data();
  const int64_t D = s.head_dim, page_stride = s.kv_heads * D * kPageTokens;
  T* const keys = all_keys + layer * s.pages * page_stride;
  T* const values = all_values + layer * s.pages * page_stride;
  // Token n's new key and value for kv head h, at its position in its page (nothing for padding).
  auto write_entry = [=](int64_t n, int64_t h) {
    const int32_t* row = TableOf(s, table, seqs, where, n);
    if (row == nullptr) return;
    const int64_t page = row[where[n] / kPageTokens], lane = where[n] % kPageTokens;
    const float* key = new_keys + (n * s.kv_heads + h) * D;
    const float* value = new_values + (n * s.kv_heads + h) * D;
    T* key_entries = keys + page * page_stride + h * D * kPageTokens + lane;
    T* value_entries = values + page * page_stride + (h * kPageTokens + lane) * D;
    for (int64_t d = 0; d < D; ++d) {
      FromFloat(key[d], key_entries + d * kPageTokens);
      FromFloat(value[d], value_entries + d);
    }
  };
  // Tokens of distinct sequences (a decode step) write their entries in their own work items; tokens
  // that share a sequence (a prompt piece) attend to each other's entries, so those are all written first.
  std::vector<bool> seen(s.seqs, false);
  bool distinct = true;
  for (int64_t n = 0; n < s.tokens && distinct; ++n) {
    if (seqs[n] < 0 || seqs[n] >= s.seqs) continue;
    distinct = !seen[seqs[n]];
    seen[seqs[n]] = true;
  }
  if (!distinct) {
    ParallelFor(pool, s.tokens * s.kv_heads, [=](int64_t i) { write_entry(i / s.kv_heads, i % s.kv_heads); });
  }
  const float* queries = q.typed_data();
  float* result = out->typed_data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const AttendFn<T> attend = PickAttend<T>(s.group, std::make_integer_sequence<int, kMaxGroup>{});
  ParallelFor(pool, s.tokens * s.kv_heads, [=](int64_t i) {
    thread_local Scratch<T> scratch;
    const int64_t n = i / s.kv_heads, h = i % s.kv_heads;
    if (distinct) write_entry(n, h);
    const int64_t head_offset = (n * s.kv_heads + h) * s.group * D;
    const int32_t* row = TableOf(s, table, seqs, where, n);
    if (row == nullptr) {
      std::fill(result + head_offset, result + head_offset + s.group * D, 0.0f);
      return;
    }
    attend(s, queries + head_offset, keys + h * D * kPageTokens, values + h * kPageTokens * D, page_stride,
           row, where[n], scale, result + head_offset, scratch);
  });
  return ffi::Error::Success();
}

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
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<Cache>>()
      .template Ret<ffi::Buffer<Cache>>();
}

}  // namespace

// One cache dtype's handler per build (cpu_kernels.BUILD_UNITS): its instantiations for every group size take
// most of the build, so the three are compiled side by side.
#if !defined(JAXSERVER_PAGED_CACHE)
#error "define JAXSERVER_PAGED_CACHE: 1 (float32), 2 (bfloat16 bits) or 3 (float16)"
#elif JAXSERVER_PAGED_CACHE == 1
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserverPagedAttention, (PagedAttention<float, ffi::F32>), Signature<ffi::F32>());
#elif JAXSERVER_PAGED_CACHE == 2
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserverPagedAttentionBf16, (PagedAttention<uint16_t, ffi::U16>),
                              Signature<ffi::U16>());
#elif JAXSERVER_PAGED_CACHE == 3
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserverPagedAttentionF16, (PagedAttention<_Float16, ffi::F16>),
                              Signature<ffi::F16>());
#endif
