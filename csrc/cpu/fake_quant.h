// Fake-quant (FedMPQ's sign-magnitude symmetric quantizer), CPU kernels.
//
//   y = copysign(round(min(|x|, S) * u * inv) * step * d, x),  inv = S*u > 0 ? L / (S*u) : 0,
//   step = S*u / L,  L = 2^bits - 1, rounding half to even, every product rounded to float32
//   on its own, left to right. u = 2^100 and d = 2^-100 when S < 2^-100 (else both 1, exact
//   no-ops): below that L / S overflows float32 (S < L / FLT_MAX) and S / L goes subnormal,
//   so the grid is computed on S * 2^100 and scaled back (reference.py states it in full).
//
// Bitmaps are little-endian uint32 words, bit i of word w = element 32*w + i; bits past
// n are zero. pass = !(x > S) && !(x < -S) (so NaN passes); hi = x > S.
#pragma once
#include <cstdint>

#include "common/bitmap.h"

namespace fedmpq::cpu {

using fedmpq::bitmap_words;

// Max of |x| over n floats, NaN-propagating (a NaN anywhere gives NaN). n may be 0 (gives 0).
float absmax(const float* x, int64_t n, int nthreads);

// Forward on n contiguous floats. pass/hi may be null (not produced).
void fake_quant(const float* x, float* y, int64_t n, int bits, float scale, uint32_t* pass, uint32_t* hi,
                int nthreads);

// Clipped-STE backward: gx = pass ? g : 0. If hi is non-null, returns
// sum over clipped elements of (hi ? g : -g) (the scale gradient); else returns 0.
// gx may be g itself (each element is read before it is written); partial overlap is not
// allowed (the bindings reject it). The same holds for x and y in the forward.
double fake_quant_backward(const float* g, float* gx, int64_t n, const uint32_t* pass,
                           const uint32_t* hi, int nthreads);

// ReLU6 fused with the dynamic-scale quantizer (fakequant/reference.py relu6_fake_quant):
// a = x > 0 ? min(x, 6) : (x is NaN ? x : +0), S = max a, y = copysign(round(min(|a|, S) * inv)
// * step, a) with inv and step as fake_quant, mask bit = 0 < x < 6 (pass-bitmap layout).
// relu6_max: S over n floats, NaN-propagating (0 for n = 0). mask may be null. y may be x.
float relu6_max(const float* x, int64_t n, int nthreads);
void relu6_fake_quant(const float* x, float* y, int64_t n, int bits, float scale, uint32_t* mask, int nthreads);

// Outputs at least this large are written with non-temporal stores: they cannot stay in
// the last-level cache with their input, so bypassing it saves the read-for-ownership.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// ---- serial chunk kernels, one per ISA (chunk starts at a multiple of 32 elements) ----
struct FqConsts {
  float scale, inv, step, up, down;  // up, down: u and d above (1 unless S < 2^-100)
};
namespace portable {
uint32_t absmax_bits(const float* x, int64_t n);
void fq_fwd(const float* x, float* y, int64_t n, FqConsts c, uint32_t* pass, uint32_t* hi);
double fq_bwd(const float* g, float* gx, int64_t n, const uint32_t* pass, const uint32_t* hi);
uint32_t relu6_max_bits(const float* x, int64_t n);
void r6_fwd(const float* x, float* y, int64_t n, FqConsts c, uint32_t* mask);
}  // namespace portable
namespace avx2 {
#if defined(FEDMPQ_HAVE_X86)
// stream: use non-temporal stores for the float output (when it is 32-byte aligned).
uint32_t absmax_bits(const float* x, int64_t n);
void fq_fwd(const float* x, float* y, int64_t n, FqConsts c, uint32_t* pass, uint32_t* hi, bool stream);
double fq_bwd(const float* g, float* gx, int64_t n, const uint32_t* pass, const uint32_t* hi, bool stream);
uint32_t relu6_max_bits(const float* x, int64_t n);
void r6_fwd(const float* x, float* y, int64_t n, FqConsts c, uint32_t* mask, bool stream);
#else
// Without an x86 build (aarch64, say) use_avx2() is false, but the dispatch sites still name
// these: they forward to the portable code instead of leaving undefined symbols that stop
// the module from loading.
inline uint32_t absmax_bits(const float* x, int64_t n) {
  return portable::absmax_bits(x, n);
}
inline void fq_fwd(const float* x, float* y, int64_t n, FqConsts c, uint32_t* pass, uint32_t* hi, bool /*stream*/) {
  portable::fq_fwd(x, y, n, c, pass, hi);
}
inline double fq_bwd(const float* g, float* gx, int64_t n, const uint32_t* pass, const uint32_t* hi, bool /*stream*/) {
  return portable::fq_bwd(g, gx, n, pass, hi);
}
inline uint32_t relu6_max_bits(const float* x, int64_t n) {
  return portable::relu6_max_bits(x, n);
}
inline void r6_fwd(const float* x, float* y, int64_t n, FqConsts c, uint32_t* mask, bool /*stream*/) {
  portable::r6_fwd(x, y, n, c, mask);
}
#endif
}  // namespace avx2

}  // namespace fedmpq::cpu
