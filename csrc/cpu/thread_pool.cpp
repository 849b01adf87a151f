#include "cpu/thread_pool.h"

#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <system_error>
#include <thread>

namespace fedmpq::cpu {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until done() or `us` microseconds have passed; true when done() came true.
template <class Done>
bool spin_for(int us, const Done& done) {
  if (us <= 0) return done();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  for (;;) {
    for (int k = 0; k < 64; ++k) {
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= deadline) return done();
  }
}

// The caller's bounded spin while workers finish their last tasks (not an idle spin: the
// caller needs those results now).
constexpr int kCallerSpinUs = 50;

// An idle worker's spin before it sleeps (FEDMPQ_POOL_SPIN_US, default 0: idle workers
// sleep at once, so none competes with torch's threads).
int spin_us_from_env() {
  const char* s = std::getenv("FEDMPQ_POOL_SPIN_US");
  if (!s || !*s) return 0;
  const long v = std::strtol(s, nullptr, 10);
  return static_cast<int>(std::clamp(v, 0L, 1000L));  // bounded: never an open-ended spin
}

struct Job {
  void (*fn)(void*, int64_t);
  void* ctx;
  int64_t ntasks;
  std::atomic<int64_t> next{0};

  // Claims and runs tasks until none is left (any number of threads at once).
  void drain() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < ntasks;) fn(ctx, i);
  }
};

struct Pool {
  std::mutex m;
  std::condition_variable wake;      // workers: a job was posted
  std::condition_variable left;      // the caller: the last worker left its job
  Job* job = nullptr;                // the open job, guarded by m
  int slots = 0;                     // workers the open job still takes, guarded by m
  std::atomic<int> inside{0};        // workers inside a job; changed under m
  std::atomic<uint64_t> posted{0};   // jobs posted (what a spinning worker watches)
  std::atomic<bool> busy{false};     // a caller owns the pool
  std::atomic<int> workers{0};       // threads started; changed only by the owner
  bool spawn_failed = false;         // thread creation failed once: use what we have
  const int spin_us = spin_us_from_env();
  std::atomic<int64_t> jobs{0}, busy_serial{0};

  static void worker_main(Pool* p) {
    uint64_t seen = p->posted.load(std::memory_order_relaxed);
    std::unique_lock<std::mutex> lk(p->m, std::defer_lock);
    for (;;) {
      // Back-to-back kernels (a step's two passes) may catch a spinning worker; otherwise
      // it sleeps in the futex until the next job.
      spin_for(p->spin_us, [&] { return p->posted.load(std::memory_order_relaxed) != seen; });
      lk.lock();
      p->wake.wait(lk, [p] { return p->job != nullptr && p->slots > 0; });
      seen = p->posted.load(std::memory_order_relaxed);
      --p->slots;
      Job* j = p->job;
      p->inside.fetch_add(1, std::memory_order_relaxed);
      lk.unlock();
      j->drain();
      lk.lock();
      // Release: the caller's acquire load of 0 sees every output this worker wrote.
      if (p->inside.fetch_sub(1, std::memory_order_acq_rel) == 1) p->left.notify_one();
      lk.unlock();
    }
  }

  // Starts workers up to `want` (owner only); returns how many can help.
  int ensure_workers(int want) {
    while (workers.load(std::memory_order_relaxed) < want && !spawn_failed) {
      // Workers take no asynchronous signals (SIGINT and the like stay with Python's
      // threads); the synchronous ones must stay deliverable (a fault still reports).
      sigset_t block, old;
      sigfillset(&block);
      for (int s : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS}) sigdelset(&block, s);
      pthread_sigmask(SIG_BLOCK, &block, &old);
      try {
        // Detached and never joined: see the header (shutdown, fork).
        std::thread(worker_main, this).detach();
        workers.fetch_add(1, std::memory_order_relaxed);
      } catch (const std::system_error&) {
        spawn_failed = true;  // e.g. a thread limit: run with fewer threads, never abort
      }
      pthread_sigmask(SIG_SETMASK, &old, nullptr);
    }
    return std::min(workers.load(std::memory_order_relaxed), want);
  }
};

std::atomic<Pool*> g_pool{nullptr};

Pool* pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return p;
  Pool* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return fresh;
  delete fresh;  // another thread won; no worker was started on ours
  return p;
}

// In a forked child only the forking thread exists: the parent's workers, and perhaps a
// parent thread holding the pool, are gone. Abandon (leak) that pool; the next parallel
// call creates a new one. Only an atomic store here (async-signal-safe).
void forget_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }
[[maybe_unused]] const int g_atfork_registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child);

}  // namespace

void run_tasks(int64_t ntasks, int nthreads, void (*fn)(void*, int64_t), void* ctx) {
  if (ntasks <= 0) return;
  Job j{fn, ctx, ntasks};
  if (nthreads > ntasks) nthreads = static_cast<int>(ntasks);
  if (nthreads <= 1) return j.drain();
  Pool* p = pool();
  if (p->busy.exchange(true, std::memory_order_acquire)) {
    // Another thread's job is running: this one runs here, on one thread (same result).
    p->busy_serial.fetch_add(1, std::memory_order_relaxed);
    return j.drain();
  }
  const int helpers = p->ensure_workers(nthreads - 1);
  if (helpers > 0) {
    {
      std::lock_guard<std::mutex> lk(p->m);
      p->job = &j;
      p->slots = helpers;
      p->posted.fetch_add(1, std::memory_order_relaxed);
    }
    if (helpers >= p->workers)
      p->wake.notify_all();
    else
      for (int h = 0; h < helpers; ++h) p->wake.notify_one();
    p->jobs.fetch_add(1, std::memory_order_relaxed);
  }
  j.drain();  // the caller works too, and alone if no worker is scheduled in time
  if (helpers > 0) {
    std::unique_lock<std::mutex> lk(p->m);
    p->job = nullptr;  // no late joiner: j lives on this stack
    p->slots = 0;
    if (p->inside.load(std::memory_order_acquire) != 0) {
      // Every task is claimed: wait only for the ones workers are still running, at most one
      // task each (~10-30 us), so spin briefly first: sleeping here and being woken cost
      // more than that (measured: 1.5x the OpenMP time on a 1M-element fake_quant).
      lk.unlock();
      const bool out = spin_for(kCallerSpinUs, [p] { return p->inside.load(std::memory_order_acquire) == 0; });
      lk.lock();
      if (!out) p->left.wait(lk, [p] { return p->inside.load(std::memory_order_acquire) == 0; });
    }
  }
  p->busy.store(false, std::memory_order_release);
}

PoolStats pool_stats() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (!p) return PoolStats{0, spin_us_from_env(), 0, 0};
  return PoolStats{p->workers.load(std::memory_order_relaxed), p->spin_us, p->jobs.load(std::memory_order_relaxed),
                   p->busy_serial.load(std::memory_order_relaxed)};
}

}  // namespace fedmpq::cpu
