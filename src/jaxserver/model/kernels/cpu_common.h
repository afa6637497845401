// What the CPU kernels share: 16-float vector types, and a parallel loop over XLA's intra-op thread pool.
#ifndef JAXSERVER_KERNELS_CPU_COMMON_H_
#define JAXSERVER_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jaxserver_kernels {

// Sixteen floats: one AVX-512 register, two AVX2 ones. GCC and Clang lower these vector types to whatever
// the target has, so the same source runs on both kinds of machine.
constexpr int64_t kLanes = 16;
using Vec = float __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof v); }
inline Vec Splat(float x) { return Vec{} + x; }

// body(i) for i in [0, items), spread over the calling thread and the pool's: items are claimed from an
// atomic counter, and the call returns once all have run. The state is reference-counted because a
// helper may start only after the call has returned (every item already claimed); it then finds nothing
// to do and touches nothing else.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, Body body) {
  struct State {
    explicit State(int64_t items, Body body) : items(items), body(std::move(body)) {}
    const int64_t items;
    Body body;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void Run() {
      for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) {
        body(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(items, std::move(body));
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->Run(); });
  state->Run();
  // Every item is claimed by now; wait for those still running on helpers.
  while (state->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

}  // namespace jaxserver_kernels

#endif  // JAXSERVER_KERNELS_CPU_COMMON_H_
