// Work split over XLA's intra-op thread pool, shared by the CPU kernels (cpu_attention.cc, cpu_gemm.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace vit_jax {

// Runs work(i, state) for i in [0, n) on the calling thread and on XLA's intra-op thread pool, each thread with its
// own default-constructed State (scratch space). The caller works too and returns once every claimed item is done;
// a pool task that starts late finds nothing left and exits, so a busy pool never blocks the call.
template <typename State, typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, F work) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int> active{0};
  };
  auto shared = std::make_shared<Shared>();
  auto run = [shared, n, &work]() {
    shared->active.fetch_add(1);
    State state;
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) work(i, state);
    shared->active.fetch_sub(1);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  // A helper that starts after the caller has returned must not touch the caller's `work`: it checks `next` first.
  for (int64_t t = 0; t < helpers; ++t)
    pool.Schedule([shared, n, run]() {
      if (shared->next.load() < n) run();
    });
  run();
  while (shared->active.load() != 0) std::this_thread::yield();
}

}  // namespace vit_jax
