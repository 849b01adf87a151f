// The counter-based generator of bit-plane training's stochastic rounding
// (fedmpq_kernels/bitplane/reference.py: mix32, uniform), for the CPU and the CUDA kernels
// alike: the same key and element give the same draw on every backend.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FEDMPQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FEDMPQ_HOST_DEVICE inline
#endif

namespace fedmpq {

// The 32-bit integer hash (reference.mix32_int).
FEDMPQ_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

// The 24 random bits of element j's draw under `key`: u_j = uniform_bits(key, j) * 2^-24.
FEDMPQ_HOST_DEVICE uint32_t uniform_bits(uint32_t key, uint32_t j) { return mix32(key ^ mix32(j ^ 0x85EBCA6Bu)) >> 8; }

}  // namespace fedmpq
