// Parallel loops that stay balanced when one thread runs slower than the other, with
// results that do not depend on which thread ran what.
//
// With a static split each thread takes a fixed half of the work and the faster one waits
// at the end. On the shared 2-core machines this project runs on, the two threads of one
// loop finish apart by 4-8 % of the loop's time in a typical call and by up to 15 ms in
// the worst (a page fault, another process on the core): over 11 training steps of x1.0
// at 224 px (AMD EPYC, AVX2), 0.82-1.06 s of waiting in the 9.1 s of the three main loops
// (the 1x1 op's blocks, the depthwise conv's forward and backward). Taking work in chunks,
// thread t first its own static share from the front, then from the back of the share
// with the most left, cut that to 0.13 s with a chunk an item. Steps with the chunks here
// against the static split (alternated in one process, median of 40-50 rounds): x1.0 224 px
// 1.045 (1.03-1.08 over five such runs), x0.5 224 px 1.036; at 32 px level (0.97-1.05).
//
// Sums across items (weight gradients, batch norm statistics) are kept per chunk and
// reduced in chunk order (ChunkSums), and a chunk's items run in order on one thread, so
// the results are the same whichever thread took which chunk, as with the static split
// (tests/test_ops_balance.py). OpenMP's own dynamic schedules are no way round this here:
// under the Intel OpenMP runtime that Paddle ships and the ops link, loops GCC 12 compiles
// with `schedule(dynamic)` or `schedule(runtime)` ran every item on each thread (64-bit
// loop counters; 32-bit ones crashed), and `schedule(monotonic:dynamic)`, which shares the
// items out correctly, deals them one at a time from the front, the two threads taking
// alternate items, with sums that would depend on the timing.
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace mbv2 {

// Work items [0, items) in `count` contiguous chunks, chunk k = [begin(k), end(k)), shared
// by the threads of one parallel region: Next(t) gives thread t its next chunk.
class WorkChunks {
 public:
  WorkChunks(int64_t items, int64_t count, int threads = omp_get_max_threads())
      : items_(std::max<int64_t>(items, 0)),
        count_(items_ > 0 ? std::clamp<int64_t>(count, 1, items_) : 0),
        threads_(std::max(threads, 1)),
        shares_(new Share[threads_]) {
    for (int t = 0; t < threads_; ++t) {
      const uint64_t lo = count_ * t / threads_, hi = count_ * (t + 1) / threads_;
      shares_[t].range.store((lo << 32) | hi, std::memory_order_relaxed);
    }
  }

  int64_t count() const { return count_; }
  int64_t begin(int64_t k) const { return items_ * k / count_; }
  int64_t end(int64_t k) const { return items_ * (k + 1) / count_; }

  // Thread t's next chunk: the front of its own share, else the back of the share with
  // the most chunks left; -1 when every chunk has been taken.
  int64_t Next(int t) {
    if (t < threads_) {
      auto& own = shares_[t].range;
      uint64_t v = own.load(std::memory_order_relaxed);
      while (Front(v) < Back(v))
        if (own.compare_exchange_weak(v, v + (uint64_t{1} << 32))) return Front(v);
    }
    for (;;) {
      int fullest = -1;
      int64_t most = 0;
      for (int o = 0; o < threads_; ++o) {
        const uint64_t v = shares_[o].range.load(std::memory_order_relaxed);
        if (Front(v) < Back(v) && Back(v) - Front(v) > most) {
          most = Back(v) - Front(v);
          fullest = o;
        }
      }
      if (fullest < 0) return -1;
      auto& other = shares_[fullest].range;
      uint64_t v = other.load(std::memory_order_relaxed);
      while (Front(v) < Back(v))
        if (other.compare_exchange_weak(v, v - 1)) return Back(v) - 1;
    }
  }

 private:
  // a share: its next chunk from the front (high half) and its end (low half)
  struct alignas(64) Share {
    std::atomic<uint64_t> range;
  };
  static int64_t Front(uint64_t v) { return static_cast<int64_t>(v >> 32); }
  static int64_t Back(uint64_t v) { return static_cast<int64_t>(v & 0xffffffffu); }

  int64_t items_, count_;
  int threads_;
  std::unique_ptr<Share[]> shares_;
};

// Inside a parallel region: fn(chunk, first item, end item) for each chunk this thread takes.
template <class Fn>
void ForEachChunk(WorkChunks& chunks, Fn fn) {
  const int t = omp_get_thread_num();
  for (int64_t k; (k = chunks.Next(t)) >= 0;) fn(k, chunks.begin(k), chunks.end(k));
}

// How many chunks for `items` items whose chunks each keep `row_bytes` of partial sums:
// up to kChunksPerThread a thread (finer chunks balance better), fewer where the rows
// would pass kPartialBytes (their zeroing and reduction are a pass over them), a multiple
// of the thread count (so the static shares are equal), never more than the items.
constexpr int64_t kChunksPerThread = 16;
constexpr int64_t kPartialBytes = int64_t{1} << 20;

inline int64_t ChunkCount(int64_t items, int64_t row_bytes, int threads = omp_get_max_threads()) {
  const int64_t t = std::max(threads, 1);
  const int64_t per_thread =
      std::clamp<int64_t>(kPartialBytes / std::max<int64_t>(row_bytes * t, 1), 1, kChunksPerThread);
  return std::max<int64_t>(1, std::min(items, t * per_thread));
}

// fn(first, end) for chunks of items [0, items) in a parallel region of its own, balanced
// as above: for loops with no sums across items (any chunk may run anywhere).
template <class Fn>
void ForItems(int64_t items, Fn fn) {
  WorkChunks work(items, ChunkCount(items, 0));
#pragma omp parallel
  ForEachChunk(work, [&](int64_t, int64_t first, int64_t end) { fn(first, end); });
}

// Rows of `size` double partial sums, one per chunk (a loop's chunk k adds into part(k)),
// reduced in chunk order afterwards: the same sums whichever thread ran which chunk.
class ChunkSums {
 public:
  ChunkSums(int64_t size, int64_t chunks)
      : size_(size), part_(static_cast<size_t>(std::max<int64_t>(chunks, 0)) * size, 0.0) {}
  double* part(int64_t k) { return part_.data() + static_cast<size_t>(k) * size_; }
  // out[i] = the sum over chunks k of part(k)[i], in chunk order
  void ReduceInto(double* out) const {
    for (int64_t i = 0; i < size_; ++i) out[i] = 0.0;
    for (size_t o = 0; o < part_.size(); o += static_cast<size_t>(size_))
      for (int64_t i = 0; i < size_; ++i) out[i] += part_[o + i];
  }

 private:
  int64_t size_;
  std::vector<double> part_;
};

}  // namespace mbv2
