// Fake-quant CUDA kernels: absmax, forward (values + pass/hi bitmaps) and clipped-STE
// backward; relu6_fake_quant is absmax and the forward again, instantiated with kRelu6
// (the quantizer sees relu6(x); the pass bitmap is ReLU6's mask), as the Triton backend's
// RELU6 flag. The kRelu6 kernels are compiled for sm_80 and sm_90 (ptxas -v: at most 32
// registers, no spills; the kRelu6 = false kernels' SASS unchanged by the flag) and pass
// their tests on the host, in CI, under tests/cuda_emu (test_cuda_emulated.py: every dtype,
// bit-width, offset and path against reference.py), but have NOT yet run on a GPU:
// tools/gpu_check.sh runs their tests (test_relu6_fake_quant.py, backend case cuda).
// The math mirrors cpu/fake_quant.cpp and fedmpq_kernels/fake_quant/reference.py
// bit for bit in float32: every product is rounded on its own (__fmul_rn, and the module is
// built with --fmad=false), divisions are IEEE (__fdiv_rn), rounding is half to even
// (rintf), and 16-bit inputs are widened to float32 exactly and narrowed with
// round-to-nearest-even.
//
// Layout of the work. A "tile" is 32 * V consecutive elements (V = elements per 16-byte
// vector: 4 for float32, 8 for float16/bfloat16): lane l of a warp owns elements
// [V*l, V*l + V) of the tile, so one warp-wide load is 512 contiguous bytes. The tile
// covers V bitmap words; word w is built from the V-bit masks of lanes
// [w*32/V, (w+1)*32/V), each shifted to its position and OR-ed together with shuffles.
// Warps stride over tiles (grid-stride loop); the elements after the last whole tile
// (fewer than 32 * V) go through a scalar path in which lane j handles element 32*w + j of
// word w and the word is one __ballot_sync. All indexing is int64.
//
// Misaligned inputs. The outputs are always fresh (16-byte aligned), but an input may be a
// contiguous slice such as x[1:], which starts `shift` elements (0 < shift < V) past a
// 16-byte boundary. Path::kShifted keeps the vector path for it: each lane loads the
// aligned vector below its elements and takes the last `shift` elements from the next
// lane's vector with shuffles (lane 31 loads the vector after the tile itself), so a slice
// moves the same bytes as an aligned tensor. Every aligned 16-byte vector it loads holds at
// least one element of the tensor, so it lies inside the tensor's allocation. Pointers
// that are not even element-aligned (never the case for torch tensors) take the scalar
// path for everything.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/cuda_utils.cuh"
#include "cuda/fake_quant.h"
#include "cuda/reduce.cuh"

namespace fedmpq::cuda {

namespace {

constexpr int kBlock = 256;  // threads per block
// 8 blocks of 256 threads = 2048 resident threads per SM on sm_80/sm_90 (the maximum):
// at one 16-byte load in flight per thread that is 32 KiB per SM, enough to cover the
// memory latency at full bandwidth. __launch_bounds__ holds the kernels to 32 registers
// so that the whole grid is resident at once (no second, partial wave); the 16-bit
// vector kernels then spill a few loop-invariant bytes, stored before and reloaded after
// the vector loop only (checked in the SASS for sm_80 and sm_90). The kRelu6 forward, with
// no hi bitmap, spills nothing.
constexpr int kBlocksPerSm = 8;
// The backward grid: kBwdElemsPerThread elements per thread before the grid is capped at
// kBlocksPerSm blocks per SM (workspace_words: no grid is larger). It depends on n and the
// device only, never on the dtype, so dL/dS sums in the same order for every dtype.
constexpr int64_t kBwdElemsPerThread = 8;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- element types ------------------------------------------------------------------
// Raw is the storage type; kernels move raw bits and convert only for the math.
struct F32 {
  using Raw = uint32_t;
  static __device__ __forceinline__ float to_float(Raw r) { return __uint_as_float(r); }
  static __device__ __forceinline__ Raw from_float(float f) { return __float_as_uint(f); }
};
struct F16 {
  using Raw = uint16_t;
  static __device__ __forceinline__ float to_float(Raw r) { return __half2float(__ushort_as_half(r)); }
  static __device__ __forceinline__ Raw from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
struct BF16 {
  using Raw = uint16_t;
  static __device__ __forceinline__ float to_float(Raw r) { return __bfloat162float(__ushort_as_bfloat16(r)); }
  static __device__ __forceinline__ Raw from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

// One 16-byte vector of raw elements.
template <class E>
union Vec16 {
  static constexpr int kN = 16 / sizeof(typename E::Raw);
  uint4 u;
  typename E::Raw r[kN];
};

template <class E>
__device__ __forceinline__ Vec16<E> load16(const typename E::Raw* p) {
  Vec16<E> v;
  v.u = __ldg(reinterpret_cast<const uint4*>(p));
  return v;
}

template <class E>
__device__ __forceinline__ void store16(typename E::Raw* p, const Vec16<E>& v) {
  *reinterpret_cast<uint4*>(p) = v.u;
}

// How a kernel reads its input: kVector (16-byte aligned), kShifted (element-aligned, a
// runtime `shift` of elements past a 16-byte boundary), kScalar (one element per lane).
enum class Path { kScalar, kVector, kShifted };

// Word j (0..7) of the 8 words a.x..a.w, b.x..b.w. j is the same for the whole kernel, so
// this compiles to selects on registers (a runtime index into a register array would put
// the array in local memory).
__device__ __forceinline__ uint32_t word_at(const uint4& a, const uint4& b, int j) {
  switch (j) {
    case 0: return a.x;
    case 1: return a.y;
    case 2: return a.z;
    case 3: return a.w;
    case 4: return b.x;
    case 5: return b.y;
    case 6: return b.z;
    default: return b.w;
  }
}

// Elements [e, e + V) of the input, e = this lane's first element of a whole tile (e is a
// multiple of V; the tile ends at or before n). kVector: one aligned load. kShifted: `xa`
// is the input pointer moved back by `shift` elements to a 16-byte boundary, so
// x[e .. e+V) = xa[e+shift .. e+shift+V): the tail of the aligned vector xa[e .. e+V) and
// the head of xa[e+V .. e+2V), which is the next lane's vector (lane 31: the first vector
// of the next tile, holding x[e+V-shift] with e+V-shift < n). Every lane of the warp calls
// this (shuffles).
template <class E, Path kPath>
__device__ __forceinline__ Vec16<E> load_elems(const typename E::Raw* xa, int64_t e, int lane, int shift_bytes) {
  Vec16<E> own = load16<E>(xa + e);
  if constexpr (kPath == Path::kVector) {
    return own;
  } else {
    uint4 nxt;
    nxt.x = __shfl_down_sync(kFullMask, own.u.x, 1);
    nxt.y = __shfl_down_sync(kFullMask, own.u.y, 1);
    nxt.z = __shfl_down_sync(kFullMask, own.u.z, 1);
    nxt.w = __shfl_down_sync(kFullMask, own.u.w, 1);
    if (lane == 31) nxt = load16<E>(xa + e + Vec16<E>::kN).u;
    // Byte shift 0 < shift_bytes < 16, a multiple of the element size: whole words, then
    // a 16-bit funnel shift for half-word element types.
    const int ws = shift_bytes >> 2, bs = (shift_bytes & 3) * 8;
    Vec16<E> out;
    out.u.x = __funnelshift_r(word_at(own.u, nxt, ws), word_at(own.u, nxt, ws + 1), bs);
    out.u.y = __funnelshift_r(word_at(own.u, nxt, ws + 1), word_at(own.u, nxt, ws + 2), bs);
    out.u.z = __funnelshift_r(word_at(own.u, nxt, ws + 2), word_at(own.u, nxt, ws + 3), bs);
    out.u.w = __funnelshift_r(word_at(own.u, nxt, ws + 3), word_at(own.u, nxt, ws + 4), bs);
    return out;
  }
}

// ---- the math -----------------------------------------------------------------------
struct FqParams {
  float s, inv, step, up, down;  // up, down: 2^100, 2^-100 when S < 2^-100, else 1 (cpu/fake_quant.h)
};

// S from the device (never read on the host: that would synchronize). A given scale that
// is not finite and > 0 becomes NaN, so every output is NaN. In dynamic mode S is max|x|
// as is (the reference does not validate it either).
__device__ __forceinline__ FqParams load_params(const float* scale, bool scale_given, float levels) {
  float s = __ldg(scale);
  if (scale_given && !(s > 0.0f && s <= FLT_MAX)) s = __int_as_float(0x7fc00000);
  FqParams c;
  c.s = s;
  const bool tiny = s < 0x1p-100f;  // L / S would overflow: the grid is taken on S * 2^100
  c.up = tiny ? 0x1p100f : 1.0f;
  c.down = tiny ? 0x1p-100f : 1.0f;
  const float su = __fmul_rn(s, c.up);  // exact
  c.inv = su > 0.0f ? __fdiv_rn(levels, su) : 0.0f;
  c.step = __fdiv_rn(su, levels);
  return c;
}

__device__ __forceinline__ float fq_value(float v, const FqParams& c) {
  float a = fabsf(v);
  a = isnan(a) ? a : (a < c.s ? a : c.s);  // torch.minimum: a NaN on either side propagates
  const float q = rintf(__fmul_rn(__fmul_rn(a, c.up), c.inv));  // round half to even
  return copysignf(__fmul_rn(__fmul_rn(q, c.step), c.down), v);
}

// pass = !(v > S) && !(v < -S), written as !(|v| > S): the same for every v and S
// (negation is exact, and every comparison with a NaN is false, so NaN passes like the
// identity STE), with one comparison and no -S register.
__device__ __forceinline__ bool fq_pass(float v, const FqParams& c) { return !(fabsf(v) > c.s); }
__device__ __forceinline__ bool fq_hi(float v, const FqParams& c) { return v > c.s; }

// relu6_fake_quant (kRelu6 instantiations of absmax_kernel and fq_fwd_kernel): the quantizer
// sees a = relu6(v) = min(v, 6) where v > 0, v where v is NaN, else +0 (so -0 gives +0), as
// reference.relu6_fake_quant and cpu/fake_quant.cpp's r6_fwd. a >= +0 or NaN, so max |a| is
// S and fq_value's clamp and copysign change nothing. The mask is ReLU6's derivative,
// 0 < v < 6 (false for NaN), written as the pass bitmap.
__device__ __forceinline__ float relu6(float v) { return v > 0.0f ? (v < 6.0f ? v : 6.0f) : (isnan(v) ? v : 0.0f); }
__device__ __forceinline__ bool relu6_mask(float v) { return v > 0.0f && v < 6.0f; }

// ORs `bits` over the aligned group of kLanes lanes (xor offsets below kLanes stay inside
// the group). Every lane of the warp must call it.
template <int kLanes>
__device__ __forceinline__ uint32_t or_over_lanes(uint32_t bits) {
#pragma unroll
  for (int off = 1; off < kLanes; off <<= 1) bits |= __shfl_xor_sync(kFullMask, bits, off);
  return bits;
}

__device__ __forceinline__ uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }

// |v| as bits: for non-negative floats integer order is float order and every NaN
// pattern sorts above +inf, so an integer max propagates NaN.
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
}
__device__ __forceinline__ int64_t total_threads() { return static_cast<int64_t>(gridDim.x) * kBlock; }

// ---- kernels ------------------------------------------------------------------------

// max over |x| bit patterns (kRelu6: over relu6(x)) into *out (finish_in_last_block; ws:
// the workspace; *out needs no initial value).
// kShifted: x lies `shift` elements past the 16-byte boundary xa = x - shift; the aligned
// vectors of xa are read whole and the `shift` elements before x are left out.
template <class E, Path kPath, bool kRelu6>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    absmax_kernel(const typename E::Raw* __restrict__ x, int64_t n, int shift, unsigned* __restrict__ ws,
                  uint32_t* __restrict__ out) {
  constexpr int V = Vec16<E>::kN;
  const int64_t t0 = global_thread(), nt = total_threads();
  // |v| (kRelu6: |relu6(v)|) as bits.
  const auto key = [](float v) { return abs_bits(kRelu6 ? relu6(v) : v); };
  uint32_t m = 0;
  int64_t tail = 0;
  if constexpr (kPath != Path::kScalar) {
    const typename E::Raw* xa = x - shift;  // shift == 0 for kVector
    const int64_t nvec = (n + shift) / V;
    for (int64_t i = t0; i < nvec; i += nt) {
      const Vec16<E> v = load16<E>(xa + i * V);
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (kPath == Path::kVector || i > 0 || k >= shift) m = umax(m, key(E::to_float(v.r[k])));
    }
    tail = nvec > 0 ? nvec * V - shift : 0;
  }
  for (int64_t i = tail + t0; i < n; i += nt) m = umax(m, key(E::to_float(x[i])));

  m = detail::block_reduce<kBlock>(m, 0u, detail::MaxOp{});
  detail::finish_in_last_block<kBlock>(m, 0u, detail::MaxOp{}, ws, out);
}

// y = fake-quant(x); pass/hi bitmaps when non-null (warp-uniform branches).
// kRelu6: y = fake-quant(relu6(x)) and `pass` gets ReLU6's mask 0 < x < 6 (see relu6); `hi`
// is not written (its code is not compiled in).
// y must be 16-byte aligned unless kPath is kScalar; x as load_elems takes it. y and x are
// disjoint (x is read through __ldg: see fake_quant.h).
template <class E, Path kPath, bool kRelu6>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    fq_fwd_kernel(const typename E::Raw* x, typename E::Raw* y, int64_t n,
                  float levels, const float* __restrict__ scale, bool scale_given, uint32_t* __restrict__ pass,
                  uint32_t* __restrict__ hi, int shift) {
  const FqParams c = load_params(scale, scale_given, levels);
  const int lane = threadIdx.x & 31;
  // Loops below run per warp (the trip count depends on the warp only), so the whole warp
  // reaches every shuffle and ballot.
  const int64_t warp = global_thread() >> 5, nwarps = total_threads() >> 5;
  int64_t word0 = 0;
  if constexpr (kPath != Path::kScalar) {
    constexpr int V = Vec16<E>::kN;      // elements per lane per tile = words per tile
    constexpr int kLanesPerWord = 32 / V;
    constexpr int64_t kTile = 32 * V;
    const int64_t ntiles = n / kTile;
    const int bitpos = V * (lane % kLanesPerWord);  // this lane's bit position in its word
    const typename E::Raw* xa = x - shift;
    const int shift_bytes = shift * static_cast<int>(sizeof(typename E::Raw));
    for (int64_t t = warp; t < ntiles; t += nwarps) {
      const int64_t e0 = t * kTile + static_cast<int64_t>(lane) * V;
      const Vec16<E> in = load_elems<E, kPath>(xa, e0, lane, shift_bytes);
      Vec16<E> out;
      uint32_t pm = 0, hm = 0;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float v = E::to_float(in.r[k]);
        out.r[k] = E::from_float(fq_value(kRelu6 ? relu6(v) : v, c));
        pm |= static_cast<uint32_t>(kRelu6 ? relu6_mask(v) : fq_pass(v, c)) << k;
        if constexpr (!kRelu6) hm |= static_cast<uint32_t>(fq_hi(v, c)) << k;
      }
      store16<E>(y + e0, out);
      const int64_t word = t * V + lane / kLanesPerWord;
      if (pass != nullptr) {
        const uint32_t w = or_over_lanes<kLanesPerWord>(pm << bitpos);
        if (bitpos == 0) pass[word] = w;
      }
      if (!kRelu6 && hi != nullptr) {
        const uint32_t w = or_over_lanes<kLanesPerWord>(hm << bitpos);
        if (bitpos == 0) hi[word] = w;
      }
    }
    word0 = ntiles * V;
  }
  // Scalar path: one 32-element word per warp step; lanes past n load nothing and vote 0,
  // which keeps the bits past n zero.
  const int64_t nwords = (n + 31) / 32;
  for (int64_t w = word0 + warp; w < nwords; w += nwarps) {
    const int64_t i = w * 32 + lane;
    const bool in_range = i < n;
    bool p = false, h = false;
    if (in_range) {
      const float v = E::to_float(x[i]);
      y[i] = E::from_float(fq_value(kRelu6 ? relu6(v) : v, c));
      p = kRelu6 ? relu6_mask(v) : fq_pass(v, c);
      h = !kRelu6 && fq_hi(v, c);
    }
    const uint32_t pw = __ballot_sync(kFullMask, p), hw = kRelu6 ? 0u : __ballot_sync(kFullMask, h);
    if (lane == 0) {
      if (pass != nullptr) pass[w] = pw;
      if (!kRelu6 && hi != nullptr) hi[w] = hw;
    }
  }
}

// gx = pass ? g : 0 (raw bits, so g is copied exactly). When hi is non-null, *grad_scale =
// the sum over clipped elements of (hi ? g : -g), in float32: each block sums its elements
// (in a fixed order), and finish_in_last_block adds the blocks' sums (ws: the workspace) in
// the same launch. Without hi, a non-null grad_scale gets 0 from block 0.
// gx must be 16-byte aligned unless kPath is kScalar; g as load_elems takes it. gx and g
// are disjoint (g is read through __ldg: see fake_quant.h).
template <class E, Path kPath>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    fq_bwd_kernel(const typename E::Raw* g, typename E::Raw* gx, int64_t n, const uint32_t* __restrict__ pass,
                  const uint32_t* __restrict__ hi, unsigned* __restrict__ ws, float* __restrict__ grad_scale,
                  int shift) {
  using Raw = typename E::Raw;
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
  int64_t tail = 0;
  if constexpr (kPath != Path::kScalar) {
    constexpr int V = Vec16<E>::kN;
    constexpr int kLanesPerWord = 32 / V;
    constexpr int64_t kTile = 32 * V;
    const int64_t warp = global_thread() >> 5, nwarps = total_threads() >> 5;
    const int64_t ntiles = n / kTile;
    const int bitpos = V * (lane % kLanesPerWord);
    const Raw* ga = g - shift;
    const int shift_bytes = shift * static_cast<int>(sizeof(Raw));
    for (int64_t t = warp; t < ntiles; t += nwarps) {
      const int64_t e0 = t * kTile + static_cast<int64_t>(lane) * V;
      const int64_t word = t * V + lane / kLanesPerWord;  // lanes of one word read the same address
      const uint32_t pb = __ldg(pass + word) >> bitpos;
      const Vec16<E> in = load_elems<E, kPath>(ga, e0, lane, shift_bytes);
      Vec16<E> out;
#pragma unroll
      for (int k = 0; k < V; ++k) out.r[k] = ((pb >> k) & 1u) ? in.r[k] : Raw(0);
      store16<E>(gx + e0, out);
      if (hi != nullptr) {
        const uint32_t hb = __ldg(hi + word) >> bitpos;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          if (!((pb >> k) & 1u)) {
            const float v = E::to_float(in.r[k]);
            acc += ((hb >> k) & 1u) ? v : -v;
          }
        }
      }
    }
    tail = ntiles * kTile;
  }
  // Scalar path: element i is bit i % 32 of word i / 32; only i < n is visited, so the
  // zero bits past n are never counted as clipped.
  const int64_t nt = total_threads();
  for (int64_t i = tail + global_thread(); i < n; i += nt) {
    const Raw r = g[i];
    const uint32_t bit = static_cast<uint32_t>(i & 31);
    const bool p = (__ldg(pass + (i >> 5)) >> bit) & 1u;
    gx[i] = p ? r : Raw(0);
    if (hi != nullptr && !p) {
      const float v = E::to_float(r);
      acc += ((__ldg(hi + (i >> 5)) >> bit) & 1u) ? v : -v;
    }
  }

  if (hi != nullptr) {  // uniform over the grid, so the barriers inside are safe
    acc = detail::block_reduce<kBlock>(acc, 0.0f, detail::SumOp{});
    // every block writes its slot, even 0
    detail::finish_in_last_block<kBlock>(acc, 0.0f, detail::SumOp{}, ws, grad_scale);
  } else if (grad_scale != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    *grad_scale = 0.0f;  // no scale gradient: its 0 written here, not by a zero-fill launch
  }
}

// ---- host side ----------------------------------------------------------------------

using detail::ceil_div;

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Grid for `threads` threads of work, capped so the whole grid is resident at once.
constexpr auto grid_blocks = detail::grid_blocks<kBlock, kBlocksPerSm>;

// The read path for input `in`, and its shift (elements past a 16-byte boundary; 0 unless
// kShifted). out_aligned: whether the output, written with 16-byte stores on the vector
// paths, is 16-byte aligned (true when there is no element output).
template <class E>
Path choose_path(const void* in, bool out_aligned, int* shift) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(in);
  *shift = 0;
  if (!out_aligned) return Path::kScalar;
  if ((a & 15u) == 0) return Path::kVector;
  if (a % sizeof(typename E::Raw) != 0) return Path::kScalar;
  *shift = static_cast<int>((a & 15u) / sizeof(typename E::Raw));
  return Path::kShifted;
}

// Calls f(std::integral_constant<Path, p>{}) so that a kernel can be instantiated per path.
template <class F>
void with_path(Path p, F&& f) {
  switch (p) {
    case Path::kVector: f(std::integral_constant<Path, Path::kVector>{}); break;
    case Path::kShifted: f(std::integral_constant<Path, Path::kShifted>{}); break;
    default: f(std::integral_constant<Path, Path::kScalar>{});
  }
}

[[noreturn]] void bad_dtype(int dtype) {
  throw std::invalid_argument("unknown dtype code " + std::to_string(dtype) +
                              " (0 float32, 1 float16, 2 bfloat16)");
}

void check_dtype(int dtype) {
  if (dtype < kFloat32 || dtype > kBFloat16) bad_dtype(dtype);
}

// L = 2^bits - 1 as float32 (exact: at most 65535), after checking bits.
float levels_of(int bits) {
  if (!((bits >= 1 && bits <= 8) || bits == 16))
    throw std::invalid_argument("bits must be in 1..8 or 16, got " + std::to_string(bits));
  return static_cast<float>((1u << bits) - 1u);
}

// Calls f(E{}) with the element type of a dtype code.
template <class F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(F32{}); break;
    case kFloat16: f(F16{}); break;
    case kBFloat16: f(BF16{}); break;
    default: bad_dtype(dtype);
  }
}

// The launches behind absmax / fake_quant (kRelu6 false) and relu6_fake_quant (true), for
// n > 0 elements on the current device (checked by the caller).
template <bool kRelu6>
void launch_absmax(const void* x, int dtype, int64_t n, uint32_t* out_bits, unsigned* workspace, int device,
                   cudaStream_t st) {
  dispatch(dtype, [&](auto e) {
    using E = decltype(e);
    const auto* xp = static_cast<const typename E::Raw*>(x);
    const unsigned blocks = grid_blocks(ceil_div(n, Vec16<E>::kN), device);
    int shift = 0;
    with_path(choose_path<E>(x, true, &shift), [&](auto p) {
      absmax_kernel<E, decltype(p)::value, kRelu6><<<blocks, kBlock, 0, st>>>(xp, n, shift, workspace, out_bits);
    });
    FEDMPQ_CUDA_CHECK_LAUNCH();
  });
}

template <bool kRelu6>
void launch_fwd(const void* x, void* y, int dtype, int64_t n, float levels, const float* scale, bool scale_given,
                uint32_t* pass, uint32_t* hi, int device, cudaStream_t st) {
  dispatch(dtype, [&](auto e) {
    using E = decltype(e);
    using Raw = typename E::Raw;
    const Raw* xp = static_cast<const Raw*>(x);
    Raw* yp = static_cast<Raw*>(y);
    const unsigned blocks = grid_blocks(ceil_div(n, Vec16<E>::kN), device);
    int shift = 0;
    with_path(choose_path<E>(x, aligned16(y), &shift), [&](auto p) {
      fq_fwd_kernel<E, decltype(p)::value, kRelu6>
          <<<blocks, kBlock, 0, st>>>(xp, yp, n, levels, scale, scale_given, pass, hi, shift);
    });
    FEDMPQ_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

int64_t workspace_words(int device) { return 1 + static_cast<int64_t>(detail::sm_count(device)) * kBlocksPerSm; }

void absmax(const void* x, int dtype, int64_t n, uint32_t* out_bits, unsigned* workspace, int device,
            uintptr_t stream) {
  check_dtype(dtype);
  if (n <= 0) return;
  detail::require_current_device(device);
  launch_absmax<false>(x, dtype, n, out_bits, workspace, device, detail::as_stream(stream));
}

void fake_quant(const void* x, void* y, int dtype, int64_t n, int bits, const float* scale, bool scale_given,
                uint32_t* pass, uint32_t* hi, int device, uintptr_t stream) {
  check_dtype(dtype);
  const float levels = levels_of(bits);
  if (n <= 0) return;
  detail::require_current_device(device);
  launch_fwd<false>(x, y, dtype, n, levels, scale, scale_given, pass, hi, device, detail::as_stream(stream));
}

void relu6_fake_quant(const void* x, void* y, int dtype, int64_t n, int bits, float* scale, uint32_t* mask,
                      unsigned* workspace, int device, uintptr_t stream) {
  check_dtype(dtype);
  const float levels = levels_of(bits);
  if (n <= 0) return;
  detail::require_current_device(device);
  const cudaStream_t st = detail::as_stream(stream);
  // S = max relu6(x) as float32 bits into *scale, then the quantizer reads it there (same
  // stream: ordered, no host synchronization).
  launch_absmax<true>(x, dtype, n, reinterpret_cast<uint32_t*>(scale), workspace, device, st);
  launch_fwd<true>(x, y, dtype, n, levels, scale, false, mask, nullptr, device, st);
}

void fake_quant_backward(const void* g, void* gx, int dtype, int64_t n, const uint32_t* pass, const uint32_t* hi,
                         unsigned* workspace, float* grad_scale, int device, uintptr_t stream) {
  check_dtype(dtype);
  if (n <= 0) return;
  detail::require_current_device(device);
  const cudaStream_t st = detail::as_stream(stream);
  const unsigned blocks = grid_blocks(ceil_div(n, kBwdElemsPerThread), device);
  dispatch(dtype, [&](auto e) {
    using E = decltype(e);
    using Raw = typename E::Raw;
    const Raw* gp = static_cast<const Raw*>(g);
    Raw* gxp = static_cast<Raw*>(gx);
    int shift = 0;
    with_path(choose_path<E>(g, aligned16(gx), &shift), [&](auto p) {
      fq_bwd_kernel<E, decltype(p)::value>
          <<<blocks, kBlock, 0, st>>>(gp, gxp, n, pass, hi, workspace, grad_scale, shift);
    });
    FEDMPQ_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace fedmpq::cuda
