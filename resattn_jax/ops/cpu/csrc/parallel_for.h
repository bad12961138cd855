// ParallelFor over XLA's intra-op thread pool, shared by the custom calls of resattn_jax/csrc.

#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace {

namespace ffi = xla::ffi;

// Runs `tasks` independent pieces of work on the calling thread and on up to `threads - 1` pool
// workers. Pieces are claimed from a shared counter, so the caller never waits for a worker that
// has not started (a busy pool only means the caller does more pieces itself).
template <typename Piece>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, Piece piece) {
  struct State {
    explicit State(Piece p, int64_t n) : piece(std::move(p)), tasks(n) {}
    Piece piece;
    int64_t tasks;
    std::atomic<int64_t> next{0}, done{0};
    void Run() {
      for (int64_t i; (i = next.fetch_add(1)) < tasks;) {
        piece(i);
        done.fetch_add(1);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(piece), tasks);
  int64_t workers = pool.num_threads();
  for (int64_t t = 1; t < workers && t < tasks; ++t) pool.Schedule([state] { state->Run(); });
  state->Run();
  while (state->done.load() < tasks) std::this_thread::yield();
}

int64_t Threads(ffi::ThreadPool& pool) { return pool.num_threads() > 0 ? pool.num_threads() : 1; }

}  // namespace
