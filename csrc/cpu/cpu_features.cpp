#include "cpu/cpu_features.h"

#include <sched.h>
#if defined(FEDMPQ_HAVE_X86) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <thread>

#include "cpu/thread_pool.h"  // kGrain

namespace fedmpq::cpu {

bool avx2_available() {
#if defined(FEDMPQ_HAVE_X86) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

namespace {
// GFNI from CPUID itself (leaf 7, ECX bit 8): __builtin_cpu_supports knows "gfni" only from
// GCC 11 on. Its VEX forms also need the OS to save YMM state, which avx2_available checks.
bool cpu_has_gfni() {
#if defined(FEDMPQ_HAVE_X86) && (defined(__GNUC__) || defined(__clang__))
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((c >> 8) & 1u);
#else
  return false;
#endif
}
}  // namespace

bool gfni_available() {
  static const bool ok = avx2_available() && cpu_has_gfni();
  return ok;
}

namespace {
Isa best_isa() {
  // FEDMPQ_CPU_ISA=portable or avx2 caps the kernels at that level (e.g. to compare them).
  const char* env = std::getenv("FEDMPQ_CPU_ISA");
  const std::string cap = env ? env : "";
  if (cap == "portable") return Isa::Portable;
  if (gfni_available() && cap != "avx2") return Isa::Gfni;
  return avx2_available() ? Isa::Avx2 : Isa::Portable;
}
std::atomic<int> g_isa{static_cast<int>(best_isa())};
}  // namespace

Isa active_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

void set_isa(const std::string& name) {
  if (name == "portable") {
    g_isa = static_cast<int>(Isa::Portable);
  } else if (name == "avx2") {
    if (!avx2_available()) throw std::invalid_argument("set_cpu_isa: AVX2/FMA is not available on this CPU or build");
    g_isa = static_cast<int>(Isa::Avx2);
  } else if (name == "gfni") {
    if (!gfni_available()) throw std::invalid_argument("set_cpu_isa: AVX2/FMA with GFNI is not available on this CPU or build");
    g_isa = static_cast<int>(Isa::Gfni);
  } else {
    throw std::invalid_argument("set_cpu_isa: unknown ISA '" + name + "' (expected 'portable', 'avx2' or 'gfni')");
  }
}

const char* isa_name(Isa isa) { return isa == Isa::Gfni ? "gfni" : isa == Isa::Avx2 ? "avx2" : "portable"; }

std::string cpu_features() {
  std::string s;
#if defined(FEDMPQ_HAVE_X86) && (defined(__GNUC__) || defined(__clang__))
  const char* names[] = {"sse4.2", "avx", "avx2", "fma", "f16c", "gfni", "avx512f", "avx512bw"};
  bool have[] = {(bool)__builtin_cpu_supports("sse4.2"), (bool)__builtin_cpu_supports("avx"),
                 (bool)__builtin_cpu_supports("avx2"),   (bool)__builtin_cpu_supports("fma"),
                 (bool)__builtin_cpu_supports("f16c"),   cpu_has_gfni(),
                 (bool)__builtin_cpu_supports("avx512f"), (bool)__builtin_cpu_supports("avx512bw")};
  for (int i = 0; i < 8; ++i)
    if (have[i]) s += (s.empty() ? "" : ",") + std::string(names[i]);
#endif
  return s.empty() ? "none detected" : s;
}

int max_threads() {
  // The cores this process may use (its affinity mask, as taskset or a container's cpuset
  // set it): more threads than that only take turns.
  static const int cores = [] {
#ifdef __linux__
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    const unsigned h = std::thread::hardware_concurrency();  // > 1024 CPUs, or not Linux
    return h > 0 ? static_cast<int>(h) : 1;
  }();
  return cores;
}

int threads_for(int requested, int64_t work) {
  constexpr int64_t kMinPerThread = kGrain;  // ~32K floats: below this a wake-up and join dominate
  if (requested < 1) requested = 1;
  if (requested > max_threads()) requested = max_threads();
  int64_t useful = work / kMinPerThread;
  if (useful < 1) useful = 1;
  return static_cast<int>(useful < requested ? useful : requested);
}

}  // namespace fedmpq::cpu
