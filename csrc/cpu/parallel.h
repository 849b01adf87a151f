// Splitting element ranges over OpenMP threads in whole 32-element words, so that every
// thread owns whole bitmap words and no two threads write the same word.
#pragma once
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fedmpq::cpu {

// Calls fn(begin, end) on disjoint element ranges covering [0, n); begin % 32 == 0.
template <class F>
void parallel_for_words(int64_t n, int nthreads, const F& fn) {
  if (n <= 0) return;
  const int64_t words = (n + 31) / 32;
  if (nthreads <= 1) {
    fn(0, n);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t per = (words + nt - 1) / nt;
    const int64_t b = per * t * 32, e0 = per * (t + 1) * 32, e = e0 < n ? e0 : n;
    if (b < e) fn(b, e);
  }
#else
  fn(0, n);
#endif
}

// Like parallel_for_words, but each call returns a partial, combined in thread order
// (so the result does not depend on scheduling).
template <class T, class F, class C>
T parallel_reduce_words(int64_t n, int nthreads, T init, const F& fn, const C& combine) {
  if (n <= 0) return init;
  if (nthreads <= 1) return combine(init, fn(0, n));
#ifdef _OPENMP
  const int64_t words = (n + 31) / 32;
  std::vector<T> part(nthreads, init);
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t per = (words + nt - 1) / nt;
    const int64_t b = per * t * 32, e0 = per * (t + 1) * 32, e = e0 < n ? e0 : n;
    if (b < e) part[t] = fn(b, e);
  }
  T r = init;
  for (const T& p : part) r = combine(r, p);
  return r;
#else
  return combine(init, fn(0, n));
#endif
}

}  // namespace fedmpq::cpu
