// Bit-plane training, CPU kernels: binarize, dequantize (+ its scale gradient), plane
// popcounts and the fused optimizer step with re-quantization. fedmpq_kernels/bitplane/
// reference.py states the math, the storage and the float32 order of every operation in
// full; these kernels follow it operation for operation (every product rounded on its own).
//
// Storage of a layer of n weights at N = bits (1..8) bits: codes uint8[n] (the magnitudes),
// sign a bitmap of ceil(n/32) little-endian uint32 words (bit set = negative), mom
// uint8[N * n] plane-major (the code of each r_ij of the last step), gs float (that step's g_s).
#pragma once
#include <cstdint>

#include "common/bitmap.h"
#include "common/generator.h"

namespace fedmpq::cpu {

// w[0..n) float32 -> codes, sign words; returns the scale max|w| (NaN-propagating; 0 for n = 0).
// q = min(round_half_even(|w| * (L / s)), L) (s = 0: q = 0), negative = !(w > 0).
float binarize(const float* w, int64_t n, int bits, uint8_t* codes, uint32_t* sign, int nthreads);

// out[j] = sigma_j * (q_j * (scale / L)), float32.
void dequantize(const uint8_t* codes, const uint32_t* sign, int64_t n, int bits, float scale, float* out,
                int nthreads);

// dL/ds = (sum_j sigma_j * q_j * G_j, accumulated in float64) / L, rounded to float32.
float dequantize_backward(const float* grad, const uint8_t* codes, const uint32_t* sign, int64_t n, int bits,
                          int nthreads);

// out[i] = number of codes with bit (bits - 1 - i) set, i = 0..bits-1.
void plane_popcounts(const uint8_t* codes, int64_t n, int bits, int64_t* out, int nthreads);

// The fused step (reference.bitplane_step), in place on codes, sign, mom and *gs. grad[n],
// coef[bits]; lr, momentum as the reference rounds them (to float32); key the generator's
// uint32 key; n < 2^32. Returns g_s: not finite -> nothing was written (+inf also when g_s is
// finite but lr * g_s overflows float32).
float bitplane_step(uint8_t* codes, uint32_t* sign, uint8_t* mom, float* gs, const float* grad, const float* coef,
                    float scale, int64_t n, int bits, float lr, float momentum, uint32_t key, int nthreads);

// ---- the step's serial chunk kernels, one per ISA ----
// Its constants, each a float32 as the reference rounds it.
struct BitplaneStep {
  int N;          // bits
  int64_t n;      // the layer's size: the plane stride of mom
  float k;        // scale / L
  float mu;       // float32(momentum)
  float gs_prev;  // the last step's g_s
  float g_s;      // this step's g_s (pass 2 only)
  float lr;       // float32(lr)
  float step;     // lr * g_s (pass 2 only)
  float L;        // 2^N - 1
  float coef[8];
  uint32_t key;
};
// On the elements [b, e) of the layer (b a multiple of 32, so whole sign words; the
// pointers are the layer's, not the chunk's). Pass 1: the max of the |d_ij| bit patterns
// (NaN patterns sort above inf: a NaN anywhere gives a NaN pattern). Pass 2: steps 3-7.
// binarize (inv = L / max|w|), dequantize and its backward on the elements [b, e) (b a
// multiple of 32; the layer's pointers).
namespace portable {
void binarize(const float* w, float inv, float L, uint8_t* codes, uint32_t* sign, int64_t b, int64_t e);
void dequantize(const uint8_t* codes, const uint32_t* sign, float k, float* out, int64_t b, int64_t e);
double dequantize_backward(const float* grad, const uint8_t* codes, const uint32_t* sign, int64_t b, int64_t e);
uint32_t step_max_bits(const BitplaneStep& c, const float* grad, const uint8_t* codes, const uint32_t* sign,
                       const uint8_t* mom, int64_t b, int64_t e);
void step_update(const BitplaneStep& c, const float* grad, uint8_t* codes, uint32_t* sign, uint8_t* mom, int64_t b,
                 int64_t e);
}  // namespace portable
namespace avx2 {
#if defined(FEDMPQ_HAVE_X86)
void binarize(const float* w, float inv, float L, uint8_t* codes, uint32_t* sign, int64_t b, int64_t e);
void dequantize(const uint8_t* codes, const uint32_t* sign, float k, float* out, int64_t b, int64_t e);
double dequantize_backward(const float* grad, const uint8_t* codes, const uint32_t* sign, int64_t b, int64_t e);
uint32_t step_max_bits(const BitplaneStep& c, const float* grad, const uint8_t* codes, const uint32_t* sign,
                       const uint8_t* mom, int64_t b, int64_t e);
void step_update(const BitplaneStep& c, const float* grad, uint8_t* codes, uint32_t* sign, uint8_t* mom, int64_t b,
                 int64_t e);
#else
// Without an x86 build (aarch64, say) use_avx2() is false, but the dispatch sites still name
// these: they forward to the portable code instead of leaving undefined symbols that stop
// the module from loading.
inline void binarize(const float* w, float inv, float L, uint8_t* codes, uint32_t* sign, int64_t b, int64_t e) {
  portable::binarize(w, inv, L, codes, sign, b, e);
}
inline void dequantize(const uint8_t* codes, const uint32_t* sign, float k, float* out, int64_t b, int64_t e) {
  portable::dequantize(codes, sign, k, out, b, e);
}
inline double dequantize_backward(const float* grad, const uint8_t* codes, const uint32_t* sign, int64_t b, int64_t e) {
  return portable::dequantize_backward(grad, codes, sign, b, e);
}
inline uint32_t step_max_bits(const BitplaneStep& c, const float* grad, const uint8_t* codes, const uint32_t* sign,
                              const uint8_t* mom, int64_t b, int64_t e) {
  return portable::step_max_bits(c, grad, codes, sign, mom, b, e);
}
inline void step_update(const BitplaneStep& c, const float* grad, uint8_t* codes, uint32_t* sign, uint8_t* mom,
                        int64_t b, int64_t e) {
  portable::step_update(c, grad, codes, sign, mom, b, e);
}
#endif
}  // namespace avx2

}  // namespace fedmpq::cpu
