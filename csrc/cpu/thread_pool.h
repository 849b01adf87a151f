// The CPU kernels' own thread pool (no OpenMP). Why not OpenMP: torch runs its own OpenMP
// pool, whose threads spin between regions; a second runtime (or a second team) next to it
// makes the two spin against each other on the same cores, and libgomp is neither
// fork-safe nor willing to run when it cannot create its threads.
//
// - Idle workers block on a condition variable (an optional bounded spin first:
//   FEDMPQ_POOL_SPIN_US, default 0): no thread burns a core while the caller runs torch.
//   Only the caller spins, briefly (<= 50 us), while a worker finishes its last task.
// - Work is a list of tasks claimed from one atomic counter; the calling thread claims them
//   too, so a worker that the OS has not scheduled yet (a loaded machine) holds up nothing:
//   the caller then simply does every task itself.
// - One parallel job at a time: a caller that finds the pool busy (another Python thread in
//   a kernel) runs its tasks on its own thread. Results never depend on which thread ran a
//   task (callers split the work into fixed tasks, see parallel.h).
// - After fork() the child gets a fresh, empty pool (pthread_atfork): the parent's workers do
//   not exist there. The pool is never destroyed: its workers block until the process exits,
//   so interpreter shutdown cannot race a worker or a kernel running on a daemon thread.
#pragma once
#include <cstdint>

namespace fedmpq::cpu {

// Elements per task (a multiple of 32: tasks own whole bitmap words), and the least work
// per thread (threads_for): below this a wake-up costs more than it saves.
constexpr int64_t kGrain = int64_t(1) << 15;

// Runs fn(ctx, i) once for each i in [0, ntasks), on up to nthreads threads: the calling
// thread and nthreads - 1 pool workers. fn must not throw.
void run_tasks(int64_t ntasks, int nthreads, void (*fn)(void*, int64_t), void* ctx);

template <class F>
void run_tasks(int64_t ntasks, int nthreads, F& body) {
  run_tasks(ntasks, nthreads, [](void* c, int64_t i) { (*static_cast<F*>(c))(i); }, &body);
}

struct PoolStats {
  int workers;            // worker threads started in this process (after a fork: in the child)
  int spin_us;            // an idle worker's bounded spin before it sleeps (FEDMPQ_POOL_SPIN_US)
  int64_t jobs;           // parallel jobs run on the pool
  int64_t busy_serial;    // calls that found the pool busy and ran on their own thread
};
PoolStats pool_stats();

}  // namespace fedmpq::cpu
