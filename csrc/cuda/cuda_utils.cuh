// Internal helpers shared by the CUDA translation units: error checks and device/stream
// plumbing. Not part of the public interface (fake_quant.h is).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace fedmpq::cuda::detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err) + " (" + cudaGetErrorName(err) +
                           ") in " + expr + " at " + file + ":" + std::to_string(line));
}

// Launchers never change the current device. The module links cudart statically, but the
// current device is the driver's per-thread current context, shared with torch's runtime:
// a cudaSetDevice here would silently move torch's current device too (after one op on a
// cuda:1 tensor, device="cuda" would mean cuda:1). The Python adapters launch inside
// torch.cuda.device(tensor.device), which selects and restores the device exactly as torch
// does; this check turns a caller that did not into a clear error instead of a launch on
// the wrong GPU.
void require_current_device(int device);

// A torch stream handle (an integer) as a runtime stream. Stream handles are driver
// CUstream values, so they are valid across the static and torch's shared cudart.
inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Number of SMs of `device`, cached per device (grid sizes must be a deterministic
// function of n and the device: the reductions' order, see workspace_words).
int sm_count(int device);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of kBlock threads for `threads` threads of work, capped at kBlocksPerSm per SM (so
// that a capped grid is resident at once) and at least 1. A function of the work and the
// device only: the grid-wide reductions' order depends on the grid size.
template <int kBlock, int kBlocksPerSm>
unsigned grid_blocks(int64_t threads, int device) {
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * kBlocksPerSm;
  const int64_t b = ceil_div(threads, kBlock);
  return static_cast<unsigned>(b < 1 ? 1 : (b > cap ? cap : b));
}

// Calls f(std::integral_constant<int, bits>{}) for bits in 1..7, and for 8 otherwise (the
// caller checked 1..8): on the host to pick a kernel per width, in a kernel to pick a
// layer's code path (the same for the whole block).
// (nv_exec_check_disable: each instantiation calls a host lambda from the host or a device
// one from a kernel, never across; Thrust and CUTLASS mark such templates the same way.)
#pragma nv_exec_check_disable
template <class F>
__host__ __device__ inline void dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// dispatch_bits, with std::invalid_argument for bits outside 1..8.
template <class F>
void with_bits(int bits, F&& f) {
  if (bits < 1 || bits > 8) throw std::invalid_argument("bits must be in 1..8, got " + std::to_string(bits));
  dispatch_bits(bits, f);
}

}  // namespace fedmpq::cuda::detail

// Throws std::runtime_error (a Python RuntimeError through pybind11) when expr fails.
#define FEDMPQ_CUDA_CHECK(expr)                                                        \
  do {                                                                                 \
    const cudaError_t fedmpq_err_ = (expr);                                            \
    if (fedmpq_err_ != cudaSuccess)                                                    \
      ::fedmpq::cuda::detail::throw_cuda_error(fedmpq_err_, #expr, __FILE__, __LINE__); \
  } while (0)

// After a <<<...>>> launch: reports bad configurations and missing kernel images now
// rather than at the next synchronizing call.
#define FEDMPQ_CUDA_CHECK_LAUNCH() FEDMPQ_CUDA_CHECK(cudaGetLastError())
