// Run-time CPU feature detection and the instruction-set choice for the CPU kernels.
// The build never targets the build machine's CPU (no native-arch flag): AVX2 code lives
// in its own translation units and is selected here, so one binary runs on any CPU.
#pragma once
#include <cstdint>
#include <string>

namespace fedmpq::cpu {

// Ordered: each level runs everything the one below it does. Gfni is AVX2 + GFNI (only the
// packing kernels have GFNI paths; every other kernel takes its AVX2 path there).
enum class Isa : int { Portable = 0, Avx2 = 1, Gfni = 2 };

// What this CPU and this build can run.
bool avx2_available();
bool gfni_available();  // AVX2 + FMA + GFNI
// The ISA the kernels use now (the best available unless overridden).
Isa active_isa();
// Whether the kernels take their AVX2 path now (false on builds without x86 kernels).
inline bool use_avx2() {
#if defined(FEDMPQ_HAVE_X86)
  return active_isa() >= Isa::Avx2;
#else
  return false;
#endif
}
// Whether the packing kernels take their GFNI path now.
inline bool use_gfni() {
#if defined(FEDMPQ_HAVE_X86)
  return active_isa() == Isa::Gfni;
#else
  return false;
#endif
}
// Override (tests use it to run every path). Throws std::invalid_argument for an ISA
// this CPU or build cannot run.
void set_isa(const std::string& name);
const char* isa_name(Isa isa);
// Comma-separated list of detected features relevant to the kernels.
std::string cpu_features();

// The most threads any kernel uses: the cores available to this process.
int max_threads();

// Threads to use for `work` elements when the caller allows `requested`: small tensors
// stay on one thread, where a parallel region costs more than it saves; never more than
// max_threads(). Every CPU kernel takes its thread count from here (the one cap).
int threads_for(int requested, int64_t work);

}  // namespace fedmpq::cpu
