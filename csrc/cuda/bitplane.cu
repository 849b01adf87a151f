// Bit-plane training, CUDA kernels: binarize, dequantize, its scale gradient, plane popcounts
// and the fused optimizer step. Bit for bit as cpu/bitplane.cpp and the Triton backend
// (fedmpq_kernels/bitplane/reference.py states the math and the float32 order of every
// operation): every product and sum is rounded on its own (__fmul_rn, __fadd_rn, and the
// module is built with --fmad=false), divisions are IEEE (__fdiv_rn), rounding is half to
// even (rintf). The scale gradient sums in float64 in its own order, as the CPU and Triton
// kernels: within n * 2^-53 of sum |sigma q G| of the reference's (1e-6 relative where the
// terms do not cancel; under cancellation, 2^60 - 2^60 + small terms, the orders differ).
//
// Why these exist beside the Triton kernels: a launch through Triton's Python launcher
// costs tens of microseconds of host time, a native launch a few, and a client step makes
// about four of these per layer (docs/BENCHMARKS.md, the H200 profile of the client step).
// binarize (once per layer and round) is here too, so that CUDA training needs no Triton.
//
// Layout of the work. The elementwise kernels give each thread one element in a grid-stride
// loop (a warp reads 32 consecutive codes, writes 128 consecutive bytes of floats). binarize
// and the step's update write the sign words, so they give each warp whole 32-element words: lane l
// handles element 32w + l, and the word is one __ballot_sync stored by lane 0 (no atomics;
// bits past n vote 0). All indexing is int64. Reductions (the scale gradient, the popcounts,
// max |d|) finish in the last block to arrive (reduce.cuh): one launch each, deterministic.
// A model's step and popcounts go in launches over tables of layers (bitplane_step_layers,
// plane_popcounts_layers; "many layers per launch" below): 3 launches for ResNet-20, not 60;
// so do its weights (dequantize_layers, dequantize_backward_layers): 2 launches, not 40.
//
// Verified: compiled for sm_80 and sm_90 (ptxas -v: no spills but 4 bytes in the 8-bit
// single-layer update on sm_90, which the refactor into step_update_part brought: its SASS
// stores one register before the loop and loads it once per 32-element trip, an L1 hit
// beside the trip's 8 momentum-code loads and stores; the table kernels: none, 26-48
// registers); tested on the host in CI under tests/cuda_emu
// (bitplane/test_cuda_emulated.py and test_cuda_emulated_layers.py: every width, tails,
// several grid-stride trips, shuffled block orders, stale workspace slots, skipped and zero
// steps, device keys, mixed widths and split groups in the table launches); NOT yet run on a
// GPU: tools/gpu_check.sh runs their tests (backend case cuda).
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/generator.h"
#include "cuda/bitplane.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/fake_quant.h"  // absmax, for binarize
#include "cuda/reduce.cuh"

namespace fedmpq::cuda {

namespace {

constexpr int kBlock = 256;  // threads per block
constexpr int kBlocksPerSm = 8;  // the grid cap (grids depend on n and the device only)
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxBits = 8;

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
}
__device__ __forceinline__ int64_t total_threads() { return static_cast<int64_t>(gridDim.x) * kBlock; }

// Bit j % 32 of word j / 32 of a bitmap (1 = negative), read through the read-only cache.
__device__ __forceinline__ uint32_t sign_bit(const uint32_t* __restrict__ sign, int64_t j) {
  return (__ldg(sign + (j >> 5)) >> (j & 31)) & 1u;
}

// x with its sign bit flipped when neg is 1: exactly torch's -x, -0.0 included.
__device__ __forceinline__ float negate_if(float x, uint32_t neg) {
  return __uint_as_float(__float_as_uint(x) ^ (neg << 31));
}

// ---- binarize -------------------------------------------------------------------------

// codes and sign words of w, with s = *scale (max|w|, written by the absmax launch before).
__global__ void __launch_bounds__(kBlock) binarize_kernel(const float* __restrict__ w, int64_t n, float levels,
                                                          const float* __restrict__ scale,
                                                          uint8_t* __restrict__ codes, uint32_t* __restrict__ sign) {
  const float s = __ldg(scale);
  const float inv = s > 0.0f ? __fdiv_rn(levels, s) : 0.0f;
  const int lane = threadIdx.x & 31;
  const int64_t words = (n + 31) / 32;
  // Warps own whole sign words (the trip count depends on the warp only: every lane reaches
  // the ballot); lanes past n vote 0.
  for (int64_t wd = global_thread() >> 5; wd < words; wd += total_threads() >> 5) {
    const int64_t j = wd * 32 + lane;
    bool neg = false;
    if (j < n) {
      const float x = __ldg(w + j);
      // min(q, L) -> uint8, a NaN to 0 as torch casts it: 0 * inf when L / s overflows (s below
      // about L / FLT_MAX) is a NaN, and fminf(NaN, L) would be L (the CPU's form)
      const float q = rintf(__fmul_rn(fabsf(x), inv));
      codes[j] = q < levels ? static_cast<uint8_t>(q) : (q >= levels ? static_cast<uint8_t>(levels) : 0);
      neg = !(x > 0.0f);
    }
    const uint32_t word = __ballot_sync(kFullMask, neg);
    if (lane == 0) sign[wd] = word;
  }
}

// ---- dequantize and its backward ----------------------------------------------------

// This thread's elements first, first + stride, ... of the weight.
__device__ __forceinline__ void dequantize_part(const uint8_t* __restrict__ codes, const uint32_t* __restrict__ sign,
                                                const float* __restrict__ scale, float levels, int64_t n,
                                                float* __restrict__ out, int64_t first, int64_t stride) {
  const float k = __fdiv_rn(__ldg(scale), levels);  // s / L, as torch divides
  for (int64_t j = first; j < n; j += stride)
    out[j] = negate_if(__fmul_rn(static_cast<float>(__ldg(codes + j)), k), sign_bit(sign, j));
}

__global__ void __launch_bounds__(kBlock) dequantize_kernel(const uint8_t* __restrict__ codes,
                                                            const uint32_t* __restrict__ sign,
                                                            const float* __restrict__ scale, float levels, int64_t n,
                                                            float* __restrict__ out) {
  dequantize_part(codes, sign, scale, levels, n, out, global_thread(), total_threads());
}

// This thread's share (elements first, first + stride, ...) of sum sigma_j q_j grad_j, in float64.
__device__ __forceinline__ double dq_backward_part(const float* __restrict__ grad, const uint8_t* __restrict__ codes,
                                                   const uint32_t* __restrict__ sign, int64_t n, int64_t first,
                                                   int64_t stride) {
  double acc = 0.0;
  for (int64_t j = first; j < n; j += stride) {
    const double v = static_cast<double>(__ldg(grad + j)) * static_cast<double>(__ldg(codes + j));  // exact
    acc += sign_bit(sign, j) ? -v : v;
  }
  return acc;
}

__global__ void __launch_bounds__(kBlock) dq_backward_kernel(const float* __restrict__ grad,
                                                             const uint8_t* __restrict__ codes,
                                                             const uint32_t* __restrict__ sign, int64_t n,
                                                             double levels, unsigned* __restrict__ ws,
                                                             float* __restrict__ out) {
  double acc = dq_backward_part(grad, codes, sign, n, global_thread(), total_threads());
  acc = detail::block_reduce<kBlock>(acc, 0.0, detail::SumOp{});
  double* partials = detail::slots<double>(ws);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
  if (!detail::last_block(ws)) return;
  const double sum = detail::combine_slots<kBlock>(partials, 1, 0.0, detail::SumOp{});
  if (threadIdx.x == 0) *out = static_cast<float>(sum / levels);  // IEEE division, then rounded to float32
  detail::release_ticket(ws);
}

// ---- popcounts ----------------------------------------------------------------------

// This thread's elements first, first + stride, ... of codes[0..n): the block's count of
// each plane into slot[0..BITS) (thread 0 stores). Every thread of the block must call it.
template <int BITS>
__device__ __forceinline__ void popcount_block(const uint8_t* __restrict__ codes, int64_t n, int64_t first,
                                               int64_t stride, unsigned long long* slot) {
  unsigned long long cnt[BITS];
#pragma unroll
  for (int i = 0; i < BITS; ++i) cnt[i] = 0;
  for (int64_t j = first; j < n; j += stride) {
    const unsigned c = __ldg(codes + j);
#pragma unroll
    for (int i = 0; i < BITS; ++i) cnt[i] += (c >> (BITS - 1 - i)) & 1u;
  }
#pragma unroll
  for (int i = 0; i < BITS; ++i) {
    const unsigned long long c = detail::block_reduce<kBlock>(cnt[i], 0ull, detail::SumOp{});
    if (threadIdx.x == 0) slot[i] = c;
    __syncthreads();  // block_reduce's shared slots are reused by the next plane
  }
}

// The slots: BITS uint64 per block (block b's count of plane i at b * BITS + i).
template <int BITS>
__global__ void __launch_bounds__(kBlock) popcount_kernel(const uint8_t* __restrict__ codes, int64_t n,
                                                          unsigned* __restrict__ ws, int64_t* __restrict__ out) {
  unsigned long long* partials = detail::slots<unsigned long long>(ws);
  popcount_block<BITS>(codes, n, global_thread(), total_threads(), partials + static_cast<int64_t>(blockIdx.x) * BITS);
  if (!detail::last_block(ws)) return;
#pragma unroll
  for (int i = 0; i < BITS; ++i) {
    const unsigned long long c = detail::combine_slots<kBlock>(partials + i, BITS, 0ull, detail::SumOp{});
    if (threadIdx.x == 0) out[i] = static_cast<int64_t>(c);
    __syncthreads();
  }
  detail::release_ticket(ws);
}

// ---- the optimizer step -------------------------------------------------------------

// The step's inputs and constants (kernel arguments: one copy per launch).
struct StepArgs {
  const float* grad;
  uint8_t* codes;
  uint32_t* sign;
  uint8_t* mom;       // N * n, plane-major
  const float* coef;  // N
  const float* scale;
  int64_t n;
  float levels, lr, mu;
};

// One element's inputs: q, its sign bit and a = sigma * (G * k).
struct Elem {
  int q;
  uint32_t neg;
  float a;
};

// codes, sign and mom are written by the update kernel, so they are read with plain loads
// there (the read-only cache is for data no thread of the kernel writes).
template <bool kReadOnly, class T>
__device__ __forceinline__ T load(const T* p) {
  if constexpr (kReadOnly) {
    return __ldg(p);
  } else {
    return *p;
  }
}

template <bool kReadOnly>
__device__ __forceinline__ Elem load_elem(const StepArgs& s, int64_t j, float k, uint32_t sign_word) {
  Elem e;
  e.q = load<kReadOnly>(s.codes + j);
  e.neg = (sign_word >> (j & 31)) & 1u;
  e.a = negate_if(__fmul_rn(__ldg(s.grad + j), k), e.neg);  // the reference's where(neg, -a, a)
  return e;
}

// r of a momentum code (reference.decode_r): bit 7 the sign, bits 3..6 c (2^(c-1)), bits 0..1
// the stochastic +-1.
__device__ __forceinline__ int decode_r(unsigned code) {
  const unsigned c = (code >> 3) & 15u;
  const int mag = c > 0 ? 1 << (c - 1) : 0;
  const int det = (code >> 7) & 1u ? -mag : mag;
  const unsigned st = code & 3u;
  return det + (st == 1 ? 1 : (st == 2 ? -1 : 0));
}

// d of plane I (step 1): (mu * (f32(r_prev) * gs_prev)) + (a * 2^(N-1-I) [+ c_I]).
template <int N, int I, bool kReadOnly>
__device__ __forceinline__ float plane_d(const StepArgs& s, const Elem& e, int64_t j, float gsp, float coef_i) {
  constexpr int kShift = N - 1 - I;
  const float m = __fmul_rn(static_cast<float>(decode_r(load<kReadOnly>(s.mom + I * s.n + j))), gsp);
  float g = __fmul_rn(e.a, static_cast<float>(1 << kShift));
  if ((e.q >> kShift) & 1) g = __fadd_rn(g, coef_i);
  return __fadd_rn(__fmul_rn(s.mu, m), g);
}

template <int N>
__device__ __forceinline__ void load_coef(const float* __restrict__ coef, float (&c)[kMaxBits]) {
#pragma unroll
  for (int i = 0; i < N; ++i) c[i] = __ldg(coef + i);
}

// Calls f(std::integral_constant<int, I>{}) for I = 0 .. N-1 in order (the planes, unrolled).
template <int N, int I = 0, class F>
__device__ __forceinline__ void for_planes(F&& f) {
  if constexpr (I < N) {
    f(std::integral_constant<int, I>{});
    for_planes<N, I + 1>(f);
  }
}

// Pass 1: max over the planes and elements of the |d| bit patterns (non-negative floats order
// as integers, and NaN patterns sort above +inf, so a NaN or inf d makes it non-finite), of
// this thread's elements first, first + stride, ...; gsp is the previous gs.
template <int N>
__device__ __forceinline__ uint32_t step_max_part(const StepArgs& s, float gsp, int64_t first, int64_t stride) {
  const float k = __fdiv_rn(__ldg(s.scale), s.levels);
  float coef[kMaxBits];
  load_coef<N>(s.coef, coef);
  uint32_t m = 0;
  for (int64_t j = first; j < s.n; j += stride) {
    const Elem e = load_elem<true>(s, j, k, __ldg(s.sign + (j >> 5)));
    for_planes<N>([&](auto I) {
      const float d = plane_d<N, decltype(I)::value, true>(s, e, j, gsp, coef[decltype(I)::value]);
      const uint32_t b = __float_as_uint(d) & 0x7fffffffu;
      m = b > m ? b : m;
    });
  }
  return m;
}

// The end of pass 1 (one thread, in the last block): the max's bits `acc` -> g_s = max / L
// (out[0]; +inf when lr * g_s overflows float32); keeps the previous gs for pass 2 (out[1])
// and stores the new one in *gs (a NaN or inf g_s keeps gs). Every block read gs before it
// took its ticket, so the last one may overwrite it.
__device__ __forceinline__ void step_max_finish(const StepArgs& s, uint32_t acc, float* gs, float* out) {
  const float gsp = *gs;
  float g_s = __fdiv_rn(__uint_as_float(acc), s.levels);
  if (__fmul_rn(g_s, s.lr) == INFINITY) g_s = INFINITY;  // lr * g_s overflows: skipped
  out[0] = g_s;
  out[1] = gsp;
  *gs = g_s < INFINITY ? g_s : gsp;  // g_s >= 0 or NaN: NaN and inf keep gs
}

template <int N>
__global__ void __launch_bounds__(kBlock) step_max_kernel(StepArgs s, float* gs, unsigned* __restrict__ ws,
                                                          float* __restrict__ out) {
  const float gsp = *gs;  // a plain load: the last block writes gs
  uint32_t m = step_max_part<N>(s, gsp, global_thread(), total_threads());
  m = detail::block_reduce<kBlock>(m, 0u, detail::MaxOp{});
  uint32_t* partials = detail::slots<uint32_t>(ws);
  if (threadIdx.x == 0) partials[blockIdx.x] = m;
  if (!detail::last_block(ws)) return;
  const uint32_t acc = detail::combine_slots<kBlock>(partials, 1, 0u, detail::MaxOp{});
  if (threadIdx.x == 0) step_max_finish(s, acc, gs, out);
  detail::release_ticket(ws);
}

// Steps 3-7 for element j (valid: j < n), returning its new sign bit; writes its code and
// its N momentum codes.
template <int N>
__device__ __forceinline__ uint32_t update_elem(const StepArgs& s, int64_t j, uint32_t sign_word, float k, float gsp,
                                                float g_s, float step, uint32_t key, const float (&coef)[kMaxBits]) {
  const Elem e = load_elem<false>(s, j, k, sign_word);
  float p = 0.0f;
  int R = 0;
  bool pos0 = false;
  for_planes<N>([&](auto Ic) {
    constexpr int I = decltype(Ic)::value;
    constexpr int kShift = N - 1 - I;
    const float d = plane_d<N, I, false>(s, e, j, gsp, coef[I]);
    // step 3: x = (|d| / g_s) * lr; e = round(log2 x) + (N-1-I) from the float's bits
    const float x = __fmul_rn(__fdiv_rn(fabsf(d), g_s), s.lr);
    const bool valid = x >= 0x1p-100f;
    const uint32_t xb = __float_as_uint(x);
    const int ex = static_cast<int>((xb >> 23) & 0xffu) - 127 + ((xb & 0x7fffffu) >= 0x3504f4u ? 1 : 0) + kShift;
    const bool pos = d > 0.0f;
    if (I == 0) pos0 = pos;  // the MSB plane's sign decides the stochastic LSB
    const bool det_on = valid && ex >= 0 && ex <= N;
    const int ec = ex < 0 ? 0 : (ex > 8 ? 8 : ex);
    if (det_on) R += (pos ? 1 : -1) * (1 << (ec + kShift));
    // 2^e for -100 <= e < 0 from its bit pattern; p summed in plane order
    if (valid && ex < 0) p = __fadd_rn(p, __uint_as_float(static_cast<uint32_t>((ex < -126 ? -126 : ex) + 127) << 23));
    unsigned code = det_on ? ((pos ? 0u : 1u) << 7) | (static_cast<unsigned>(ec + 1) << 3) : 0u;
    if (I == N - 1) {
      // step 4: the stochastic LSB, u_j from the counter-based generator
      p = p < 1.0f ? p : 1.0f;
      const float u = __fmul_rn(static_cast<float>(uniform_bits(key, static_cast<uint32_t>(j))), 0x1p-24f);
      if (u < p) {
        R += pos0 ? 1 : -1;
        code |= pos0 ? 1u : 2u;
      }
    }
    s.mom[I * s.n + j] = static_cast<uint8_t>(code);
  });
  // steps 5-6: v = f32(q) - f32(R) * (lr * g_s), rounded half to even, sign fold, saturate
  const float qn = rintf(__fsub_rn(static_cast<float>(e.q), __fmul_rn(static_cast<float>(R), step)));
  const float qa = fminf(fabsf(qn), s.levels);
  s.codes[j] = static_cast<uint8_t>(static_cast<int>(qa));
  return e.neg ^ (qn < 0.0f ? 1u : 0u);
}

// Pass 2 over this thread's share (thread `first` of `threads`, a multiple of 32): reads g_s
// (out[0]) and the previous gs (out[1]) from pass 1. g_s not finite: does nothing (skipped);
// 0: zero momentum codes only; else steps 3-7 per element. Warps own whole sign words (the
// loop's trip count depends on the warp only, so every lane reaches the ballot).
template <int N>
__device__ __forceinline__ void step_update_part(const StepArgs& s, const float* __restrict__ out, uint32_t key,
                                                 const int64_t* __restrict__ key_ptr, int64_t first, int64_t threads) {
  const float g_s = __ldg(out);
  if (g_s == 0.0f) {  // every d is 0: momentum codes 0, codes and signs unchanged
    for (int64_t j = first; j < s.n * N; j += threads) s.mom[j] = 0;
    return;
  }
  if (!(g_s > 0.0f && g_s < INFINITY)) return;  // NaN or inf: the step is skipped
  const float k = __fdiv_rn(__ldg(s.scale), s.levels);
  const float gsp = __ldg(out + 1);
  const float step = __fmul_rn(s.lr, g_s);
  if (key_ptr != nullptr) key = static_cast<uint32_t>(static_cast<uint64_t>(__ldg(key_ptr)) & 0xffffffffu);
  float coef[kMaxBits];
  load_coef<N>(s.coef, coef);
  const int lane = threadIdx.x & 31;
  const int64_t words = (s.n + 31) / 32;
  for (int64_t w = first >> 5; w < words; w += threads >> 5) {
    const uint32_t sw = s.sign[w];  // read by every lane before lane 0 rewrites it (after the ballot)
    const int64_t j = w * 32 + lane;
    const uint32_t neg = j < s.n ? update_elem<N>(s, j, sw, k, gsp, g_s, step, key, coef) : 0u;
    const uint32_t word = __ballot_sync(kFullMask, neg != 0u);
    if (lane == 0) s.sign[w] = word;
  }
}

template <int N>
__global__ void __launch_bounds__(kBlock) step_update_kernel(StepArgs s, const float* __restrict__ out,
                                                             uint32_t key, const int64_t* __restrict__ key_ptr) {
  step_update_part<N>(s, out, key, key_ptr, global_thread(), total_threads());
}

// ---- many layers per launch ----------------------------------------------------------

// A launch over a table of layers (a model's optimizer step): block b works for the layer i
// with first[i] <= b < first[i + 1], as block b - first[i] of a grid of first[i + 1] -
// first[i] blocks, the grid that layer's own launch would have (every layer has at least
// one block). One ticket serves the whole grid; the last block concludes every layer's
// reduction from that layer's slots, a warp per layer (or per layer and plane). The table
// is a kernel argument (__grid_constant__: indexed in place, not copied per thread), so a
// launch needs no host-to-device copy and a CUDA graph can capture it.
constexpr int kTableLayers = 32;
constexpr int kWarps = kBlock / 32;

struct StepEntry {
  StepArgs s;
  float* gs;
  float* out;  // (g_s, previous gs)
  const int64_t* key_ptr;
  uint32_t key;
  int bits;
};
struct PopEntry {
  const uint8_t* codes;
  int64_t n;
  int64_t* out;
  int bits;
};
template <class Entry>
struct Table {
  Entry layer[kTableLayers];
  unsigned first[kTableLayers + 1];  // first[count]: the grid
  int count;
};
using StepTable = Table<StepEntry>;
using PopTable = Table<PopEntry>;
using DqTable = Table<DequantLayer>;  // the launchers' own layer structs (cuda/bitplane.h)
using DqGradTable = Table<DequantGradLayer>;
// Kernel arguments are limited to 4 KB before CUDA 12.1 and Volta.
static_assert(sizeof(StepTable) + sizeof(void*) <= 4096 && sizeof(PopTable) + sizeof(void*) <= 4096 &&
                  sizeof(DqTable) <= 4096 && sizeof(DqGradTable) + sizeof(void*) <= 4096,
              "a layer table must fit the kernel argument space");

// This block's place in a table launch: its layer l (the last with first[l] <= blockIdx.x;
// first is strictly increasing), this thread's index in that layer's grid and the grid's
// thread count.
struct Place {
  int l;
  int64_t first, threads;
};
template <class Table>
__device__ __forceinline__ Place place_of(const Table& t) {
  int lo = 0, hi = t.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (t.first[mid] <= blockIdx.x) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const unsigned b0 = t.first[lo];
  return Place{lo, static_cast<int64_t>(blockIdx.x - b0) * kBlock + threadIdx.x,
               static_cast<int64_t>(t.first[lo + 1] - b0) * kBlock};
}

// slot[b * stride] for b < count, combined by one warp (every lane of it must call it; the
// result in every lane). For exact operations only (max, integer sums): the order is the
// warp's own, not combine_slots'.
template <class T, class Op>
__device__ __forceinline__ T warp_combine(const T* slot, unsigned count, int64_t stride, T identity, Op op) {
  T acc = identity;
  for (unsigned b = threadIdx.x & 31; b < count; b += 32) acc = op(acc, __ldcg(slot + b * stride));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc = op(acc, __shfl_xor_sync(kFullMask, acc, off));
  return acc;
}

__global__ void __launch_bounds__(kBlock) step_max_layers_kernel(const __grid_constant__ StepTable t,
                                                                 unsigned* __restrict__ ws) {
  const Place p = place_of(t);
  const StepEntry& e = t.layer[p.l];
  const float gsp = *e.gs;  // a plain load: the last block writes gs
  uint32_t m = 0;
  detail::dispatch_bits(e.bits, [&](auto b) { m = step_max_part<decltype(b)::value>(e.s, gsp, p.first, p.threads); });
  m = detail::block_reduce<kBlock>(m, 0u, detail::MaxOp{});
  uint32_t* partials = detail::slots<uint32_t>(ws);
  if (threadIdx.x == 0) partials[blockIdx.x] = m;
  if (!detail::last_block(ws)) return;
  for (int i = threadIdx.x >> 5; i < t.count; i += kWarps) {  // a warp per layer
    const uint32_t acc = warp_combine(partials + t.first[i], t.first[i + 1] - t.first[i], 1, 0u, detail::MaxOp{});
    if ((threadIdx.x & 31) == 0) step_max_finish(t.layer[i].s, acc, t.layer[i].gs, t.layer[i].out);
  }
  detail::release_ticket(ws);
}

__global__ void __launch_bounds__(kBlock) step_update_layers_kernel(const __grid_constant__ StepTable t) {
  const Place p = place_of(t);
  const StepEntry& e = t.layer[p.l];
  detail::dispatch_bits(
      e.bits, [&](auto b) { step_update_part<decltype(b)::value>(e.s, e.out, e.key, e.key_ptr, p.first, p.threads); });
}

// The slots: kMaxBits uint64 per block (block b's count of plane i at b * kMaxBits + i).
__global__ void __launch_bounds__(kBlock) popcount_layers_kernel(const __grid_constant__ PopTable t,
                                                                 unsigned* __restrict__ ws) {
  const Place p = place_of(t);
  const PopEntry& e = t.layer[p.l];
  unsigned long long* partials = detail::slots<unsigned long long>(ws);
  unsigned long long* slot = partials + static_cast<int64_t>(blockIdx.x) * kMaxBits;
  detail::dispatch_bits(e.bits, [&](auto b) { popcount_block<decltype(b)::value>(e.codes, e.n, p.first, p.threads, slot); });
  if (!detail::last_block(ws)) return;
  for (int q = threadIdx.x >> 5; q < t.count * kMaxBits; q += kWarps) {  // a warp per layer and plane
    const int i = q / kMaxBits, plane = q % kMaxBits;
    if (plane >= t.layer[i].bits) continue;  // the same for the whole warp
    const unsigned long long c = warp_combine(partials + static_cast<int64_t>(t.first[i]) * kMaxBits + plane,
                                              t.first[i + 1] - t.first[i], kMaxBits, 0ull, detail::SumOp{});
    if ((threadIdx.x & 31) == 0) t.layer[i].out[plane] = static_cast<int64_t>(c);
  }
  detail::release_ticket(ws);
}

__global__ void __launch_bounds__(kBlock) dequantize_layers_kernel(const __grid_constant__ DqTable t) {
  const Place p = place_of(t);
  const DequantLayer& e = t.layer[p.l];
  dequantize_part(e.codes, e.sign, e.scale, static_cast<float>((1u << e.bits) - 1u), e.n, e.out, p.first, p.threads);
}

// The slots: one double per block. The last block adds each layer's slots as that layer's
// own launch would (combine_slots over its blocks, in order), so a layer's dL/ds is the
// single-layer kernel's bit for bit.
__global__ void __launch_bounds__(kBlock) dq_backward_layers_kernel(const __grid_constant__ DqGradTable t,
                                                                    unsigned* __restrict__ ws) {
  const Place p = place_of(t);
  const DequantGradLayer& e = t.layer[p.l];
  double acc = dq_backward_part(e.grad, e.codes, e.sign, e.n, p.first, p.threads);
  acc = detail::block_reduce<kBlock>(acc, 0.0, detail::SumOp{});
  double* partials = detail::slots<double>(ws);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
  if (!detail::last_block(ws)) return;
  for (int i = 0; i < t.count; ++i) {
    __syncthreads();  // block_reduce's shared slots, reused layer after layer
    const double sum =
        detail::combine_slots<kBlock>(partials + t.first[i], t.first[i + 1] - t.first[i], 1, 0.0, detail::SumOp{});
    if (threadIdx.x == 0) *t.layer[i].out = static_cast<float>(sum / static_cast<double>((1u << t.layer[i].bits) - 1u));
  }
  detail::release_ticket(ws);
}

// ---- host side ----------------------------------------------------------------------

using detail::ceil_div;
constexpr auto grid_blocks = detail::grid_blocks<kBlock, kBlocksPerSm>;

float levels_of(int bits) {
  if (bits < 1 || bits > kMaxBits) throw std::invalid_argument("bits must be in 1..8, got " + std::to_string(bits));
  return static_cast<float>((1u << bits) - 1u);
}

// Fills layer tables in order, each up to kTableLayers layers and `slots` blocks (the
// workspace's room for their slots), and calls launch(table, blocks) for each full one and,
// at finish(), the last.
template <class Entry, class Launch>
class TableGroups {
 public:
  TableGroups(int64_t slots, Launch launch) : slots_(slots), launch_(launch) { t_.count = 0; }
  void add(const Entry& e, unsigned blocks) {
    if (t_.count == kTableLayers || blocks_ + blocks > slots_) finish();
    t_.layer[t_.count] = e;
    t_.first[t_.count++] = blocks_;
    blocks_ += blocks;
  }
  void finish() {
    if (t_.count == 0) return;
    t_.first[t_.count] = blocks_;
    launch_(t_, blocks_);
    t_.count = 0;
    blocks_ = 0;
  }

 private:
  Table<Entry> t_;
  int64_t slots_;
  unsigned blocks_ = 0;
  Launch launch_;
};

// The byte ranges the layers of a table launch touch: whether any layer writes memory that
// another layer reads or writes. When none does, the layers' work commutes and may run
// grouped. Sorting the ranges keeps this O(R log R) for R ranges (a model's layers touch
// disjoint buffers, so the inner loop rarely runs).
class Ranges {
 public:
  explicit Ranges(int64_t reserve) { r_.reserve(static_cast<size_t>(reserve)); }
  void add(const void* p, int64_t bytes, int64_t layer, bool write) {
    if (p != nullptr && bytes > 0) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(p);
      r_.push_back(Range{a, a + static_cast<uintptr_t>(bytes), layer, write});
    }
  }
  bool independent() {
    std::sort(r_.begin(), r_.end(), [](const Range& a, const Range& b) { return a.lo < b.lo; });
    for (size_t i = 0; i < r_.size(); ++i)
      for (size_t j = i + 1; j < r_.size() && r_[j].lo < r_[i].hi; ++j)
        if (r_[i].layer != r_[j].layer && (r_[i].write || r_[j].write)) return false;
    return true;
  }

 private:
  struct Range {
    uintptr_t lo, hi;
    int64_t layer;
    bool write;
  };
  std::vector<Range> r_;
};

// Checks every layer's width (std::invalid_argument, before anything is launched); whether
// any layer has work.
template <class Layer>
bool check_widths(const Layer* layers, int64_t count) {
  bool any = false;
  for (int64_t l = 0; l < count; ++l) {
    levels_of(layers[l].bits);
    any = any || layers[l].n > 0;
  }
  return any;
}

bool layers_independent(const StepLayer* layers, int64_t count) {
  Ranges r(count * 8);
  for (int64_t l = 0; l < count; ++l) {
    const StepLayer& y = layers[l];
    if (y.n <= 0) continue;  // launches nothing, touches nothing
    r.add(y.codes, y.n, l, true);
    r.add(y.sign, 4 * ceil_div(y.n, 32), l, true);
    r.add(y.mom, y.bits * y.n, l, true);
    r.add(y.gs, 4, l, true);
    r.add(y.grad, 4 * y.n, l, false);
    r.add(y.coef, 4 * int64_t(y.bits), l, false);
    r.add(y.scale, 4, l, false);
    r.add(y.key_ptr, 8, l, false);
  }
  return r.independent();
}

// dequantize's blocks write a layer's weight while other blocks read the others' codes, signs
// and scales: grouped only when no weight overlaps another layer's buffers.
bool layers_independent(const DequantLayer* layers, int64_t count) {
  Ranges r(count * 4);
  for (int64_t l = 0; l < count; ++l) {
    const DequantLayer& y = layers[l];
    if (y.n <= 0) continue;
    r.add(y.out, 4 * y.n, l, true);
    r.add(y.codes, y.n, l, false);
    r.add(y.sign, 4 * ceil_div(y.n, 32), l, false);
    r.add(y.scale, 4, l, false);
  }
  return r.independent();
}

// dequantize_backward's last block writes every layer's dL/ds after all blocks have read
// their inputs, so grouped, a later layer reads an input as it was before an earlier layer's
// dL/ds landed in it, where calls in order read it after: grouped only when no dL/ds
// overlaps another layer's inputs.
bool layers_independent(const DequantGradLayer* layers, int64_t count) {
  Ranges r(count * 4);
  for (int64_t l = 0; l < count; ++l) {
    const DequantGradLayer& y = layers[l];
    if (y.n <= 0) continue;
    r.add(y.out, 4, l, true);
    r.add(y.grad, 4 * y.n, l, false);
    r.add(y.codes, y.n, l, false);
    r.add(y.sign, 4 * ceil_div(y.n, 32), l, false);
  }
  return r.independent();
}

}  // namespace

int64_t bitplane_workspace_words(int device) {
  // The ticket and its pad (8-byte slots), then kMaxBits 8-byte slots per block of the largest
  // grid: more than absmax's 1 + one 4-byte slot per block (binarize), whose grid is capped
  // the same way.
  return 2 + 2 * static_cast<int64_t>(kMaxBits) * detail::sm_count(device) * kBlocksPerSm;
}

void binarize(const float* w, int64_t n, int bits, uint8_t* codes, uint32_t* sign, float* scale, unsigned* workspace,
              int device, uintptr_t stream) {
  const float levels = levels_of(bits);
  if (n <= 0) return;
  detail::require_current_device(device);
  // max|w| as float32 bits into *scale (absmax's last block; its workspace is a prefix of
  // this one), then the quantizer reads it there: same stream, no host synchronization.
  absmax(w, kFloat32, n, reinterpret_cast<uint32_t*>(scale), workspace, device, stream);
  binarize_kernel<<<grid_blocks(32 * ceil_div(n, 32), device), kBlock, 0, detail::as_stream(stream)>>>(
      w, n, levels, scale, codes, sign);
  FEDMPQ_CUDA_CHECK_LAUNCH();
}

void dequantize(const uint8_t* codes, const uint32_t* sign, int64_t n, int bits, const float* scale, float* out,
                int device, uintptr_t stream) {
  const float levels = levels_of(bits);
  if (n <= 0) return;
  detail::require_current_device(device);
  dequantize_kernel<<<grid_blocks(n, device), kBlock, 0, detail::as_stream(stream)>>>(codes, sign, scale, levels, n,
                                                                                       out);
  FEDMPQ_CUDA_CHECK_LAUNCH();
}

void dequantize_backward(const float* grad, const uint8_t* codes, const uint32_t* sign, int64_t n, int bits,
                         float* out, unsigned* workspace, int device, uintptr_t stream) {
  const float levels = levels_of(bits);
  if (n <= 0) return;
  detail::require_current_device(device);
  // 4 elements per thread before the cap: the sum's order depends on n and the device only
  dq_backward_kernel<<<grid_blocks(ceil_div(n, 4), device), kBlock, 0, detail::as_stream(stream)>>>(
      grad, codes, sign, n, static_cast<double>(levels), workspace, out);
  FEDMPQ_CUDA_CHECK_LAUNCH();
}

void plane_popcounts(const uint8_t* codes, int64_t n, int bits, int64_t* out, unsigned* workspace, int device,
                     uintptr_t stream) {
  detail::with_bits(bits, [&](auto b) {
    if (n <= 0) return;
    detail::require_current_device(device);
    popcount_kernel<decltype(b)::value>
        <<<grid_blocks(ceil_div(n, 4), device), kBlock, 0, detail::as_stream(stream)>>>(codes, n, workspace, out);
    FEDMPQ_CUDA_CHECK_LAUNCH();
  });
}

void bitplane_step(uint8_t* codes, uint32_t* sign, uint8_t* mom, float* gs, const float* grad, const float* coef,
                   const float* scale, int64_t n, int bits, float lr, float momentum, uint32_t key,
                   const int64_t* key_ptr, float* out, unsigned* workspace, int device, uintptr_t stream) {
  const float levels = levels_of(bits);
  if (n <= 0) return;
  if (n >= (int64_t(1) << 32)) throw std::invalid_argument("a layer of 2^32 weights or more is not supported");
  detail::require_current_device(device);
  const cudaStream_t st = detail::as_stream(stream);
  const StepArgs s{grad, codes, sign, mom, coef, scale, n, levels, lr, momentum};
  // One warp per sign word for the update, and the same grid for the max (its order does not
  // matter: a max is exact).
  const unsigned blocks = grid_blocks(32 * ceil_div(n, 32), device);
  detail::with_bits(bits, [&](auto b) {
    constexpr int N = decltype(b)::value;
    step_max_kernel<N><<<blocks, kBlock, 0, st>>>(s, gs, workspace, out);
    FEDMPQ_CUDA_CHECK_LAUNCH();
    step_update_kernel<N><<<blocks, kBlock, 0, st>>>(s, out, key, key_ptr);
    FEDMPQ_CUDA_CHECK_LAUNCH();
  });
}

void bitplane_step_layers(const StepLayer* layers, int64_t count, float lr, float momentum, float* out,
                          unsigned* workspace, int device, uintptr_t stream) {
  bool any = false;
  for (int64_t l = 0; l < count; ++l) {  // every layer checked before anything launches
    const StepLayer& y = layers[l];
    levels_of(y.bits);
    if (y.n >= (int64_t(1) << 32)) throw std::invalid_argument("a layer of 2^32 weights or more is not supported");
    any = any || y.n > 0;
  }
  if (!any) return;
  detail::require_current_device(device);
  if (!layers_independent(layers, count)) {  // the layers' steps do not commute: in order
    for (int64_t l = 0; l < count; ++l) {
      const StepLayer& y = layers[l];
      bitplane_step(y.codes, y.sign, y.mom, y.gs, y.grad, y.coef, y.scale, y.n, y.bits, lr, momentum, y.key,
                    y.key_ptr, out + 2 * l, workspace, device, stream);
    }
    return;
  }
  const cudaStream_t st = detail::as_stream(stream);
  // 4-byte slots after the ticket: at least 16 full-size grids
  auto launch = [&](const StepTable& t, unsigned blocks) {
    step_max_layers_kernel<<<blocks, kBlock, 0, st>>>(t, workspace);
    FEDMPQ_CUDA_CHECK_LAUNCH();
    step_update_layers_kernel<<<blocks, kBlock, 0, st>>>(t);
    FEDMPQ_CUDA_CHECK_LAUNCH();
  };
  TableGroups<StepEntry, decltype(launch)> groups(bitplane_workspace_words(device) - 1, launch);
  for (int64_t l = 0; l < count; ++l) {
    const StepLayer& y = layers[l];
    if (y.n <= 0) continue;
    const StepArgs s{y.grad, y.codes, y.sign, y.mom, y.coef, y.scale, y.n, levels_of(y.bits), lr, momentum};
    // each layer gets the grid its own launch would have
    groups.add(StepEntry{s, y.gs, out + 2 * l, y.key_ptr, y.key, y.bits}, grid_blocks(32 * ceil_div(y.n, 32), device));
  }
  groups.finish();
}

void plane_popcounts_layers(const PopcountLayer* layers, int64_t count, int64_t* out, unsigned* workspace, int device,
                            uintptr_t stream) {
  if (!check_widths(layers, count)) return;
  detail::require_current_device(device);
  const cudaStream_t st = detail::as_stream(stream);
  // kMaxBits 8-byte slots per block after the ticket: room for one full-size grid at least
  auto launch = [&](const PopTable& t, unsigned blocks) {
    popcount_layers_kernel<<<blocks, kBlock, 0, st>>>(t, workspace);
    FEDMPQ_CUDA_CHECK_LAUNCH();
  };
  TableGroups<PopEntry, decltype(launch)> groups((bitplane_workspace_words(device) - 2) / (2 * kMaxBits), launch);
  int64_t* o = out;
  for (int64_t l = 0; l < count; ++l) {
    const PopcountLayer& y = layers[l];
    if (y.n > 0) groups.add(PopEntry{y.codes, y.n, o, y.bits}, grid_blocks(ceil_div(y.n, 4), device));  // as plane_popcounts
    o += y.bits;
  }
  groups.finish();
}

void dequantize_layers(const DequantLayer* layers, int64_t count, int device, uintptr_t stream) {
  if (!check_widths(layers, count)) return;
  detail::require_current_device(device);
  if (!layers_independent(layers, count)) {  // a weight overlaps another layer's buffers: in order
    for (int64_t l = 0; l < count; ++l) {
      const DequantLayer& y = layers[l];
      dequantize(y.codes, y.sign, y.n, y.bits, y.scale, y.out, device, stream);
    }
    return;
  }
  const cudaStream_t st = detail::as_stream(stream);
  auto launch = [&](const DqTable& t, unsigned blocks) {
    dequantize_layers_kernel<<<blocks, kBlock, 0, st>>>(t);
    FEDMPQ_CUDA_CHECK_LAUNCH();
  };
  // no slots: only the table's size closes a group (the grid stays far below 2^32 blocks)
  TableGroups<DequantLayer, decltype(launch)> groups(std::numeric_limits<int64_t>::max(), launch);
  for (int64_t l = 0; l < count; ++l) {
    const DequantLayer& y = layers[l];
    if (y.n > 0) groups.add(y, grid_blocks(y.n, device));  // as dequantize
  }
  groups.finish();
}

void dequantize_backward_layers(const DequantGradLayer* layers, int64_t count, unsigned* workspace, int device,
                                uintptr_t stream) {
  if (!check_widths(layers, count)) return;
  detail::require_current_device(device);
  if (!layers_independent(layers, count)) {  // a dL/ds lands in another layer's input: in order
    for (int64_t l = 0; l < count; ++l) {
      const DequantGradLayer& y = layers[l];
      dequantize_backward(y.grad, y.codes, y.sign, y.n, y.bits, y.out, workspace, device, stream);
    }
    return;
  }
  const cudaStream_t st = detail::as_stream(stream);
  // Every block reads its inputs before it takes its ticket and only the last block writes
  // the outputs, so with no dL/ds among the inputs, no order between the layers shows.
  auto launch = [&](const DqGradTable& t, unsigned blocks) {
    dq_backward_layers_kernel<<<blocks, kBlock, 0, st>>>(t, workspace);
    FEDMPQ_CUDA_CHECK_LAUNCH();
  };
  // 8-byte slots after the ticket and its pad: at least 16 full-size grids
  TableGroups<DequantGradLayer, decltype(launch)> groups((bitplane_workspace_words(device) - 2) / 2, launch);
  for (int64_t l = 0; l < count; ++l) {
    const DequantGradLayer& y = layers[l];
    if (y.n > 0) groups.add(y, grid_blocks(ceil_div(y.n, 4), device));  // the grid of dequantize_backward
  }
  groups.finish();
}

}  // namespace fedmpq::cuda
