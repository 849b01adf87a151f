// The part of CUDA that csrc/cuda/*.cu uses, for the host: the kernels compile as C++ and
// run with one fiber per CUDA thread (emu.cpp), a block at a time, so CI checks their
// logic against the reference without a GPU (tests/cuda_emu/__init__.py builds it).
//
// What it models: thread/block indices; warp shuffles and ballots as warp-wide meeting
// points (all 32 lanes must arrive, as the full mask promises: a lane that exited or waits
// elsewhere is reported, not hung); __syncthreads; a block's warps in lockstep or one at a
// time in a shuffled order, each as far as it can go (emu_set_warp_order: a missing
// __syncthreads shows); __shared__ as one copy per block (blocks run one after another);
// atomics; IEEE float32 math without contraction (built with -ffp-contract=off, as the
// module is with --fmad=false); float16/bfloat16 conversions rounding to nearest even.
// Loads through __ldg/__ldcg are checked against the buffers the caller registered
// (emu_add_range): inside the 16-byte-aligned span of one buffer and touching it, and
// aligned for their width. Every other access, stores included, is checked for alignment by
// UBSan (tests/cuda_emu/__init__.py builds with -fsanitize=alignment: a float4 at an 8-byte
// boundary faults on a GPU). What it cannot model: memory ordering between blocks (they
// never run at the same time), timing, and stores' bounds (the tests check canaries around
// every output instead).
#pragma once
// Every standard header the kernels include, before the CUDA keywords become macros.
#include <math.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// The running fiber's indices (the scheduler sets them before it switches to a fiber).
extern uint3 threadIdx, blockIdx, gridDim, blockDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static  // one copy per block: blocks run one at a time

typedef struct emu_stream* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);
const char* cudaGetErrorName(cudaError_t err);

namespace emu {
void warp_sync();   // the calling lane waits until all 32 lanes of its warp are here
void block_sync();  // __syncthreads
uint64_t* warp_slots();  // 32 exchange slots of the calling warp
void check_load(const void* p, size_t bytes, size_t align);
void check_mask(unsigned mask, const char* op);
// Runs body once per thread of a grid of `grid` blocks of `block` threads.
void run(unsigned grid, int block, const std::function<void()>& body);

template <class T>
T shfl(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "one 8-byte slot per lane");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  uint64_t* s = warp_slots();
  s[threadIdx.x & 31] = bits;
  warp_sync();
  bits = s[src_lane & 31];
  warp_sync();  // nobody writes its slot again before every lane has read
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// kernel<<<grid, block, shmem, stream>>>(args...) (build.py rewrites the launches to this).
template <class... P, class... A>
void launch(void (*kernel)(P...), unsigned grid, int block, int /*shmem*/, cudaStream_t /*stream*/, A... args) {
  const std::function<void()> body = [=]() { kernel(args...); };
  run(grid, block, body);
}
}  // namespace emu

template <class T>
inline T __ldg(const T* p) {
  emu::check_load(p, sizeof(T), alignof(T));
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  emu::check_load(p, sizeof(T), alignof(T));
  return *p;
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int off) {
  emu::check_mask(mask, "__shfl_xor_sync");
  return emu::shfl(v, (threadIdx.x & 31) ^ static_cast<unsigned>(off));
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
  emu::check_mask(mask, "__shfl_sync");
  return emu::shfl(v, static_cast<unsigned>(src_lane));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  emu::check_mask(mask, "__shfl_down_sync");
  const unsigned lane = threadIdx.x & 31, src = lane + delta;
  return emu::shfl(v, src < 32 ? src : lane);  // past the warp: the lane's own value
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  emu::check_mask(mask, "__ballot_sync");
  uint64_t* s = emu::warp_slots();
  s[threadIdx.x & 31] = pred != 0;
  emu::warp_sync();
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= static_cast<unsigned>(s[l] != 0) << l;
  emu::warp_sync();
  return r;
}
inline void __syncthreads() { emu::block_sync(); }
inline void __threadfence() {}  // blocks never overlap here

inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old | v;
  return old;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return static_cast<unsigned>(((static_cast<uint64_t>(hi) << 32) | lo) >> (shift & 31));
}

// 16-bit floats, converted as the GPU's cvt instructions do: round to nearest even, NaN to
// the canonical NaN (0x7fff). In plain integer and float32 code, so that any C++17 compiler
// builds it (tests/fedmpq_kernels/test_cuda_emu.py checks it against torch).
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float __half2float(__half h) {
  const unsigned sign = static_cast<unsigned>(h.x & 0x8000u) << 16, e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));  // inf, NaN
  return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}
inline __half __float2half_rn(float v) {
  const unsigned x = __float_as_uint(v), ax = x & 0x7fffffffu;
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  if (ax > 0x7f800000u) return __half{0x7fff};
  if (ax >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal (or zero, or 2^-14 itself after rounding)
    const float q = rintf(std::fabs(v) * 16777216.0f);  // |v| * 2^24 is exact; rintf: to even
    return __half{static_cast<uint16_t>(sign | static_cast<unsigned>(q))};
  }
  unsigned r = ax - 0x38000000u;  // the exponent rebased from 127 to 15
  r = (r + 0x0fffu + ((r >> 13) & 1u)) >> 13;  // to even; a carry moves the exponent up
  return __half{static_cast<uint16_t>(sign | r)};
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<unsigned>(b.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  unsigned u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
