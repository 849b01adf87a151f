// Runtime facts (device count, compiled architectures) and the per-device helpers
// declared in cuda_utils.cuh.
#include <atomic>
#include <stdexcept>
#include <string>

#include "cuda/cuda_utils.cuh"
#include "cuda/fake_quant.h"

#ifndef FEDMPQ_CUDA_ARCHS_STR
#define FEDMPQ_CUDA_ARCHS_STR "unknown"
#endif

namespace fedmpq::cuda {

namespace detail {

void require_current_device(int device) {
  int cur = -1;
  FEDMPQ_CUDA_CHECK(cudaGetDevice(&cur));
  if (cur != device)
    throw std::invalid_argument("the current CUDA device is " + std::to_string(cur) + " but the tensors are on cuda:" +
                                std::to_string(device) + "; launch under torch.cuda.device(" +
                                std::to_string(device) + ")");
}

namespace {
constexpr int kMaxCachedDevices = 64;
// 0 = not queried yet. Racing first queries store the same value, so relaxed is enough.
std::atomic<int> g_sm_count[kMaxCachedDevices];
}  // namespace

int sm_count(int device) {
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int c = g_sm_count[device].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int c = 0;
  FEDMPQ_CUDA_CHECK(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device));
  if (c <= 0) c = 1;
  if (cacheable) g_sm_count[device].store(c, std::memory_order_relaxed);
  return c;
}

}  // namespace detail

int device_count() {
  int n = 0;
  // No device, no driver, or a driver older than this (static) runtime: 0, not an
  // exception, so that fedmpq_kernels.info can always print it; the Python adapter
  // turns 0 into its "unavailable" reason.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it so that it does not surface at a later check
    return 0;
  }
  return n;
}

const char* compiled_archs() { return FEDMPQ_CUDA_ARCHS_STR; }

}  // namespace fedmpq::cuda
