// Bit-plane packing, CUDA kernels: pack_codes, unpack_codes, dequant_accumulate. Layout and
// arithmetic as cpu/pack.cpp and fedmpq_kernels/pack/reference.py, bit for bit: plane p
// holds bit b = bits-1-p of every code (MSB first); dequantizing rounds the product and the
// sum on their own (__fmul_rn, __fadd_rn, and the module is built with --fmad=false).
//
// Layout of the work (as in fake_quant.cu). Warps stride over "tiles" (grid-stride loop,
// grid capped at kBlocksPerSm blocks per SM); in a tile each lane moves one 16-byte vector
// of the element array, so one warp-wide access is 512 contiguous bytes:
// - pack/unpack: 16 codes per lane, 512 codes = 16 words per tile; lanes 2j and 2j+1 share
//   word j. Lane bytes <-> bit planes with two 8x8 bit-matrix transposes (transpose8x8):
//   after it, byte b holds bit b of 8 consecutive codes, so a lane's 16-bit half of plane
//   p's word is two bytes. Pack stores two planes per full-warp store (lanes 0-15: plane
//   p's 16 words of the tile, lanes 16-31: plane p+1's), each word built from the halves of
//   its two lanes with shuffles; unpack loads each plane's word with 16 lanes at 16
//   consecutive addresses (each word read by its two lanes).
// - dequant_accumulate: 4 floats per lane (one float4 of acc), 128 elements = 4 words per
//   tile; the 8 lanes of a word load it together (a broadcast) and take their 4-bit nibble
//   of each plane; spread4 turns a nibble into one bit per byte, so the lane's 4 codes are
//   built in the 4 bytes of one register, one shift-or per plane.
// The words after the last whole tile (fewer than a tile), and every word when codes/acc
// is not 16-byte aligned (a slice such as codes[1:]), go through a scalar path: one warp
// per 32-element word, lane k handles element 32w+k; pack is one __ballot_sync per plane,
// unpack and dequant read the plane words (broadcast loads) and assemble each lane's code.
// All indexing is int64.
//
// pack_codes reports codes >= 2^bits through *seen: every thread ORs the codes it reads,
// each block reduces and does one atomicOr (only when nonzero); the host reads it when the
// caller asks (fedmpq_kernels.check_packed), never in the call.
//
// Verified: compiled for sm_80 and sm_90 (ptxas -v: at most 32 registers, no spills; no FFMA
// in the SASS); tested on the host in CI under tests/cuda_emu (pack/test_cuda_emulated.py:
// every width, tails, misaligned inputs, several grid-stride trips, a bad code anywhere);
// run on an H200 by tools/gpu_check.sh (docs/BENCHMARKS.md).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/cuda_utils.cuh"
#include "cuda/pack.h"

namespace fedmpq::cuda {

namespace {

constexpr int kBlock = 256;  // threads per block
constexpr int kWarps = kBlock / 32;
// 2048 resident threads per SM (the maximum on sm_80/sm_90); __launch_bounds__ holds the
// kernels to 32 registers so the whole capped grid is resident (see fake_quant.cu).
constexpr int kBlocksPerSm = 8;
constexpr unsigned kFullMask = 0xffffffffu;

constexpr int64_t kCodeTile = 32 * 16;  // pack/unpack: 16 codes per lane
constexpr int64_t kAccTile = 32 * 4;    // dequant: 4 floats per lane

// ---- bit helpers (host and device, so they can be checked on a CPU) ------------------

// The 8x8 bit matrix of 8 bytes, transposed: bit 8k+b <-> bit 8b+k, i.e. byte b of the
// result holds bit b of every input byte (bit k = byte k's). Its own inverse.
__host__ __device__ __forceinline__ uint64_t transpose8x8(uint64_t x) {
  uint64_t t = 0x0F0F0F0F00000000ull & (x ^ (x << 28));
  x ^= t ^ (t >> 28);
  t = 0x3333000033330000ull & (x ^ (x << 14));
  x ^= t ^ (t >> 14);
  t = 0x5500550055005500ull & (x ^ (x << 7));
  x ^= t ^ (t >> 7);
  return x;
}

// The lane's 16 bits of the plane holding bit b of each code: byte b of the transposed
// codes 0..7 (lo) and 8..15 (hi).
__host__ __device__ __forceinline__ uint32_t plane_half(uint64_t lo, uint64_t hi, int b) {
  return (static_cast<uint32_t>(lo >> (8 * b)) & 0xffu) | (static_cast<uint32_t>(hi >> (8 * b)) & 0xffu) << 8;
}

// Bit i of a nibble to bit 0 of byte i (the multiplier's terms land on distinct bits, so
// nothing carries).
__host__ __device__ __forceinline__ uint32_t spread4(uint32_t nibble) { return (nibble * 0x00204081u) & 0x01010101u; }

// acc + (neg ? -v : v), v = coef * q: each operation rounded on its own.
__device__ __forceinline__ float accumulate(float acc, float coef, uint32_t q, uint32_t neg) {
  const float v = __fmul_rn(coef, static_cast<float>(q));
  return __fadd_rn(acc, neg ? -v : v);
}

// A warp's share of the work on n elements: the whole tiles of kTile elements (only when the
// array is 16-byte aligned, `vec`), then the scalar words after them, each in a grid-stride
// loop: for (t = warp; t < ntiles; t += nwarps), for (w = scalar_word0; w < words; w += nwarps).
template <int64_t kTile>
struct WarpWork {
  int lane;
  int64_t warp, nwarps, words, ntiles, scalar_word0;
  __device__ __forceinline__ WarpWork(int64_t n, bool vec)
      : lane(static_cast<int>(threadIdx.x & 31)),
        warp((static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x) >> 5),
        nwarps(static_cast<int64_t>(gridDim.x) * kWarps),
        words(n / 32 + (n % 32 != 0)),
        ntiles(vec ? n / kTile : 0),
        scalar_word0(ntiles * (kTile / 32) + warp) {}
};

// Scalar path: the code of element 32w + lane, from bit `lane` of word w of each plane
// (every lane loads the same words: broadcast loads).
template <int BITS>
__device__ __forceinline__ uint32_t lane_code(const uint32_t* __restrict__ planes, int64_t words, int64_t w, int lane) {
  uint32_t q = 0;
#pragma unroll
  for (int p = 0; p < BITS; ++p) q = q << 1 | ((__ldg(planes + p * words + w) >> lane) & 1u);
  return q;
}

// ---- kernels ------------------------------------------------------------------------
// Loops run per warp (the trip count depends on the warp only), so every lane of a warp
// reaches each shuffle and ballot. `vec`: the element array is 16-byte aligned; otherwise
// every word takes the scalar path.

template <int BITS>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    pack_kernel(const uint8_t* __restrict__ codes, int64_t n, bool vec, uint32_t* __restrict__ planes,
                uint32_t* __restrict__ seen_out) {
  const WarpWork<kCodeTile> ww(n, vec);
  const int lane = ww.lane;
  const int64_t words = ww.words;
  uint32_t seen = 0;  // OR of the code bytes this thread read (4 bytes wide on the vector path)
  for (int64_t t = ww.warp; t < ww.ntiles; t += ww.nwarps) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(codes + t * kCodeTile) + lane);
    seen |= v.x | v.y | v.z | v.w;
    const uint64_t lo = transpose8x8(v.x | static_cast<uint64_t>(v.y) << 32);  // codes 0..7 of the lane
    const uint64_t hi = transpose8x8(v.z | static_cast<uint64_t>(v.w) << 32);  // codes 8..15
    // Two planes per step: lane d < 16 stores plane p's word d of the tile, lane d >= 16
    // plane p+1's word d - 16; both words are made of the halves of lanes 2j and 2j+1,
    // j = d % 16, which each lane offers for both planes in one register (plane p's half
    // low, p+1's high). One shuffle and one full-warp store per plane, no branch.
    uint32_t* const out = planes + t * (kCodeTile / 32) + (lane & 15);
    const int src = 2 * (lane & 15);
    const bool upper = lane >= 16;
#pragma unroll
    for (int p = 0; p < BITS; p += 2) {
      const uint32_t both =
          plane_half(lo, hi, BITS - 1 - p) | (p + 1 < BITS ? plane_half(lo, hi, BITS - 2 - p) << 16 : 0u);
      const uint32_t a = __shfl_sync(kFullMask, both, src);      // lane 2j: bits 0-15 of the word
      const uint32_t b = __shfl_sync(kFullMask, both, src + 1);  // lane 2j+1: bits 16-31
      const uint32_t w = upper ? (a >> 16 | (b & 0xffff0000u)) : ((a & 0xffffu) | b << 16);
      if (p + 1 < BITS || !upper) out[(p + (upper ? 1 : 0)) * words] = w;
    }
  }
  for (int64_t w = ww.scalar_word0; w < words; w += ww.nwarps) {
    const int64_t i = w * 32 + lane;
    const uint32_t c = i < n ? codes[i] : 0u;  // lanes past n vote 0: the bits past n stay zero
    seen |= c;
    uint32_t mine = 0;  // lane p stores plane p's word
#pragma unroll
    for (int p = 0; p < BITS; ++p) {
      const uint32_t word = __ballot_sync(kFullMask, (c >> (BITS - 1 - p)) & 1u);
      if (lane == p) mine = word;
    }
    if (lane < BITS) planes[lane * words + w] = mine;
  }

#pragma unroll
  for (int off = 16; off > 0; off >>= 1) seen |= __shfl_xor_sync(kFullMask, seen, off);
  __shared__ uint32_t warp_seen[kWarps];
  const int warp_in_block = threadIdx.x >> 5;
  if (lane == 0) warp_seen[warp_in_block] = seen;
  __syncthreads();
  if (warp_in_block == 0) {
    seen = lane < kWarps ? warp_seen[lane] : 0u;
#pragma unroll
    for (int off = kWarps / 2; off > 0; off >>= 1) seen |= __shfl_xor_sync(kFullMask, seen, off);
    seen = (seen | seen >> 8 | seen >> 16 | seen >> 24) & 0xffu;
    if (lane == 0 && seen != 0) atomicOr(seen_out, seen);
  }
}

template <int BITS>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    unpack_kernel(const uint32_t* __restrict__ planes, int64_t n, bool vec, uint8_t* __restrict__ codes) {
  const WarpWork<kCodeTile> ww(n, vec);
  const int lane = ww.lane;
  const int64_t words = ww.words;
  for (int64_t t = ww.warp; t < ww.ntiles; t += ww.nwarps) {
    const int64_t word = t * (kCodeTile / 32) + (lane >> 1);
    const int shift = 16 * (lane & 1);  // this lane's half of the word
    uint64_t lo = 0, hi = 0;            // byte b: bit b of codes 0..7 / 8..15 of the lane
#pragma unroll
    for (int p = 0; p < BITS; ++p) {
      const uint32_t half = __ldg(planes + p * words + word) >> shift;
      const int sh = 8 * (BITS - 1 - p);
      lo |= static_cast<uint64_t>(half & 0xffu) << sh;
      hi |= static_cast<uint64_t>((half >> 8) & 0xffu) << sh;
    }
    lo = transpose8x8(lo);
    hi = transpose8x8(hi);
    reinterpret_cast<uint4*>(codes + t * kCodeTile)[lane] =
        make_uint4(static_cast<uint32_t>(lo), static_cast<uint32_t>(lo >> 32), static_cast<uint32_t>(hi),
                   static_cast<uint32_t>(hi >> 32));
  }
  for (int64_t w = ww.scalar_word0; w < words; w += ww.nwarps) {
    const uint32_t q = lane_code<BITS>(planes, words, w, lane);
    const int64_t i = w * 32 + lane;
    if (i < n) codes[i] = static_cast<uint8_t>(q);
  }
}

// acc is updated in place: each element is read and written by the same thread.
template <int BITS>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    dequant_kernel(float* __restrict__ acc, int64_t n, bool vec, const uint32_t* __restrict__ planes,
                   const uint32_t* __restrict__ signs, float coef) {
  const WarpWork<kAccTile> ww(n, vec);
  const int lane = ww.lane;
  const int64_t words = ww.words;
  for (int64_t t = ww.warp; t < ww.ntiles; t += ww.nwarps) {
    const int64_t word = t * (kAccTile / 32) + (lane >> 3);
    const int shift = 4 * (lane & 7);  // this lane's nibble of the word
    uint32_t q4 = 0;                   // byte k: the code of element k of the lane (< 2^8: no carry)
#pragma unroll
    for (int p = 0; p < BITS; ++p) q4 = q4 << 1 | spread4((__ldg(planes + p * words + word) >> shift) & 0xfu);
    const uint32_t s4 = signs != nullptr ? (__ldg(signs + word) >> shift) & 0xfu : 0u;
    float4* a = reinterpret_cast<float4*>(acc + t * kAccTile) + lane;
    float4 v = *a;
    v.x = accumulate(v.x, coef, q4 & 0xffu, s4 & 1u);
    v.y = accumulate(v.y, coef, (q4 >> 8) & 0xffu, s4 & 2u);
    v.z = accumulate(v.z, coef, (q4 >> 16) & 0xffu, s4 & 4u);
    v.w = accumulate(v.w, coef, q4 >> 24, s4 & 8u);
    *a = v;
  }
  for (int64_t w = ww.scalar_word0; w < words; w += ww.nwarps) {
    const uint32_t q = lane_code<BITS>(planes, words, w, lane);
    const uint32_t neg = signs != nullptr ? (__ldg(signs + w) >> lane) & 1u : 0u;
    const int64_t i = w * 32 + lane;
    if (i < n) acc[i] = accumulate(acc[i], coef, q, neg);
  }
}

// ---- host side ----------------------------------------------------------------------

// Blocks for n elements in tiles of `tile` (one warp each, `vec`) plus the scalar words
// after them, one warp each; capped so the whole grid is resident at once.
unsigned grid_blocks(int64_t n, int64_t tile, bool vec, int device) {
  const int64_t words = n / 32 + (n % 32 != 0);
  const int64_t tiles = vec ? n / tile : 0;
  const int64_t warps = tiles + (words - tiles * (tile / 32));
  const int64_t cap = static_cast<int64_t>(detail::sm_count(device)) * kBlocksPerSm;
  const int64_t blocks = (warps + kWarps - 1) / kWarps;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

void pack_codes(const uint8_t* codes, int64_t n, int bits, uint32_t* planes, uint32_t* seen, int device,
                uintptr_t stream) {
  detail::with_bits(bits, [&](auto b) {
    if (n <= 0) return;
    detail::require_current_device(device);
    const bool vec = aligned16(codes);
    pack_kernel<decltype(b)::value><<<grid_blocks(n, kCodeTile, vec, device), kBlock, 0, detail::as_stream(stream)>>>(
        codes, n, vec, planes, seen);
    FEDMPQ_CUDA_CHECK_LAUNCH();
  });
}

void unpack_codes(const uint32_t* planes, int64_t n, int bits, uint8_t* codes, int device, uintptr_t stream) {
  detail::with_bits(bits, [&](auto b) {
    if (n <= 0) return;
    detail::require_current_device(device);
    const bool vec = aligned16(codes);
    unpack_kernel<decltype(b)::value>
        <<<grid_blocks(n, kCodeTile, vec, device), kBlock, 0, detail::as_stream(stream)>>>(planes, n, vec, codes);
    FEDMPQ_CUDA_CHECK_LAUNCH();
  });
}

void dequant_accumulate(float* acc, int64_t n, const uint32_t* planes, const uint32_t* signs, int bits, float coef,
                        int device, uintptr_t stream) {
  detail::with_bits(bits, [&](auto b) {
    if (n <= 0) return;
    detail::require_current_device(device);
    const bool vec = aligned16(acc);
    dequant_kernel<decltype(b)::value><<<grid_blocks(n, kAccTile, vec, device), kBlock, 0, detail::as_stream(stream)>>>(
        acc, n, vec, planes, signs, coef);
    FEDMPQ_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace fedmpq::cuda
