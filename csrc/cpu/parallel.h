// Splitting element ranges over the pool (thread_pool.h) in fixed tasks of `grain` elements
// (a multiple of 32): every task owns whole bitmap words, so no two threads write the same
// word, and the split does not depend on the thread count, so neither does any result
// (a reduction combines its per-task partials in task order).
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/thread_pool.h"

namespace fedmpq::cpu {

// Calls fn(begin, end) on disjoint element ranges covering [0, n); begin % 32 == 0.
// Element-wise work only: on one thread it is one call fn(0, n).
template <class F>
void parallel_for_words(int64_t n, int nthreads, const F& fn, int64_t grain = kGrain) {
  if (n <= 0) return;
  if (nthreads <= 1 || n <= grain) {
    fn(0, n);
    return;
  }
  auto task = [&](int64_t i) {
    const int64_t b = i * grain, e = b + grain < n ? b + grain : n;
    fn(b, e);
  };
  run_tasks((n + grain - 1) / grain, nthreads, task);
}

// Like parallel_for_words, but each call returns a partial. Partials are per task (not per
// thread) and combined in task order: a float sum is the same on 1 thread or 8.
template <class T, class F, class C>
T parallel_reduce_words(int64_t n, int nthreads, T init, const F& fn, const C& combine, int64_t grain = kGrain) {
  if (n <= 0) return init;
  if (n <= grain) return combine(init, fn(0, n));
  const int64_t tasks = (n + grain - 1) / grain;
  T r = init;
  if (nthreads <= 1) {
    for (int64_t b = 0; b < n; b += grain) r = combine(r, fn(b, b + grain < n ? b + grain : n));
    return r;
  }
  std::vector<T> part(static_cast<size_t>(tasks), init);
  auto task = [&](int64_t i) {
    const int64_t b = i * grain, e = b + grain < n ? b + grain : n;
    part[static_cast<size_t>(i)] = fn(b, e);
  };
  run_tasks(tasks, nthreads, task);
  for (const T& p : part) r = combine(r, p);
  return r;
}

}  // namespace fedmpq::cpu
