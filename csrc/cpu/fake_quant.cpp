#include "cpu/fake_quant.h"

#include <cmath>
#include <cstring>

#include "cpu/cpu_features.h"
#include "cpu/parallel.h"

namespace fedmpq::cpu {

namespace portable {

static inline uint32_t abs_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b & 0x7fffffffu;
}

// max over |x| bit patterns: for non-negative floats integer order is float order, and
// every NaN pattern sorts above +inf, so NaN propagates without a branch.
uint32_t absmax_bits(const float* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b = abs_bits(x[i]);
    m = b > m ? b : m;
  }
  return m;
}

// The quantized value of a = min(|x|, S) >= 0 (NaN kept), without its sign. kTiny: S < 2^-100,
// the grid taken on S * 2^100 (fake_quant.h); otherwise up and down are 1 and left out.
template <bool kTiny>
static inline float quant1(float a, const FqConsts& c) {
  if constexpr (kTiny) a *= c.up;
  const float q = std::nearbyint(a * c.inv);  // default rounding mode: half to even
  return kTiny ? q * c.step * c.down : q * c.step;
}

template <bool kTiny>
static void fq_fwd_impl(const float* x, float* y, int64_t n, const FqConsts& c, uint32_t* pass, uint32_t* hi) {
  for (int64_t w = 0; w * 32 < n; ++w) {
    const int64_t i0 = w * 32;
    const int64_t cnt = n - i0 < 32 ? n - i0 : 32;
    uint32_t pw = 0, hw = 0;
    for (int64_t k = 0; k < cnt; ++k) {
      const float v = x[i0 + k];
      float a = std::fabs(v);
      a = std::isnan(a) ? a : (a < c.scale ? a : c.scale);  // NaN propagates, like torch.minimum
      y[i0 + k] = std::copysign(quant1<kTiny>(a, c), v);
      const bool h = v > c.scale, l = v < -c.scale;
      pw |= static_cast<uint32_t>(!(h || l)) << k;
      hw |= static_cast<uint32_t>(h) << k;
    }
    if (pass) pass[w] = pw;
    if (hi) hi[w] = hw;
  }
}

double fq_bwd(const float* g, float* gx, int64_t n, const uint32_t* pass, const uint32_t* hi) {
  double acc = 0.0;
  for (int64_t w = 0; w * 32 < n; ++w) {
    const int64_t i0 = w * 32;
    const int64_t cnt = n - i0 < 32 ? n - i0 : 32;
    const uint32_t pw = pass[w];
    const uint32_t hw = hi ? hi[w] : 0u;
    for (int64_t k = 0; k < cnt; ++k) {
      const float v = g[i0 + k];  // read once, before gx is written: gx may be g
      const bool p = (pw >> k) & 1u;
      if (hi && !p) acc += ((hw >> k) & 1u) ? static_cast<double>(v) : -static_cast<double>(v);
      gx[i0 + k] = p ? v : 0.0f;
    }
  }
  return acc;
}

// ReLU6's a = x > 0 ? min(x, 6) : (x is NaN ? x : +0), as the bit pattern of |a|: the max
// of these over a tensor is S (NaN-propagating as absmax_bits).
static constexpr uint32_t kSixBits = 0x40C00000u;  // 6.0f

static inline uint32_t relu6_abs_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  const uint32_t ab = b & 0x7fffffffu;
  if (ab > 0x7f800000u) return ab;  // NaN
  if (b >> 31) return 0u;           // x <= -0: a = +0
  return b < kSixBits ? b : kSixBits;
}

uint32_t relu6_max_bits(const float* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = relu6_abs_bits(x[i]);
    m = b > m ? b : m;
  }
  return m;
}

template <bool kTiny>
static void r6_fwd_impl(const float* x, float* y, int64_t n, const FqConsts& c, uint32_t* mask) {
  for (int64_t w = 0; w * 32 < n; ++w) {
    const int64_t i0 = w * 32;
    const int64_t cnt = n - i0 < 32 ? n - i0 : 32;
    uint32_t mw = 0;
    for (int64_t k = 0; k < cnt; ++k) {
      const float v = x[i0 + k];
      const float r = v > 0.0f ? (v < 6.0f ? v : 6.0f) : (std::isnan(v) ? v : 0.0f);
      float a = std::fabs(r);
      a = std::isnan(a) ? a : (a < c.scale ? a : c.scale);  // NaN propagates, like torch.minimum
      y[i0 + k] = std::copysign(quant1<kTiny>(a, c), r);
      mw |= static_cast<uint32_t>(v > 0.0f && v < 6.0f) << k;
    }
    if (mask) mask[w] = mw;
  }
}

void fq_fwd(const float* x, float* y, int64_t n, FqConsts c, uint32_t* pass, uint32_t* hi) {
  c.up != 1.0f ? fq_fwd_impl<true>(x, y, n, c, pass, hi) : fq_fwd_impl<false>(x, y, n, c, pass, hi);
}

void r6_fwd(const float* x, float* y, int64_t n, FqConsts c, uint32_t* mask) {
  c.up != 1.0f ? r6_fwd_impl<true>(x, y, n, c, mask) : r6_fwd_impl<false>(x, y, n, c, mask);
}

}  // namespace portable


namespace {
// The max of a per-chunk bit-pattern reduction (patterns of non-negative floats order as the
// floats do, NaN above inf), on the ISA picked at run time.
template <class Avx2, class Portable>
float max_of_bits(const float* x, int64_t n, int nthreads, Avx2 avx2_fn, Portable portable_fn) {
  const bool v = use_avx2();
  uint32_t m = parallel_reduce_words<uint32_t>(
      n, threads_for(nthreads, n), 0u,
      [&](int64_t b, int64_t e) { return v ? avx2_fn(x + b, e - b) : portable_fn(x + b, e - b); },
      [](uint32_t a, uint32_t b) { return a > b ? a : b; });
  float s;
  std::memcpy(&s, &m, 4);
  return s;
}

// inv = L / Su (0 when Su = 0) and step = Su / L, each a float32 division (the reference's
// order), on Su = S * 2^100 when S < 2^-100 (fake_quant.h: L / S would overflow).
FqConsts fq_consts(int bits, float scale) {
  const float L = static_cast<float>((1u << bits) - 1u);
  const bool tiny = scale < 0x1p-100f;  // false for NaN
  const float up = tiny ? 0x1p100f : 1.0f, down = tiny ? 0x1p-100f : 1.0f;
  const float su = scale * up;  // exact: a power of two, and S * 2^100 < 1
  return FqConsts{scale, su > 0.0f ? L / su : 0.0f, su / L, up, down};
}
}  // namespace

float absmax(const float* x, int64_t n, int nthreads) {
  return max_of_bits(x, n, nthreads, avx2::absmax_bits, portable::absmax_bits);
}

void fake_quant(const float* x, float* y, int64_t n, int bits, float scale, uint32_t* pass, uint32_t* hi,
                int nthreads) {
  const FqConsts c = fq_consts(bits, scale);
  const bool v = use_avx2();
  const bool stream = n >= kStreamBytes / int64_t(sizeof(float));
  parallel_for_words(n, threads_for(nthreads, n), [&](int64_t b, int64_t e) {
    uint32_t* p = pass ? pass + b / 32 : nullptr;
    uint32_t* h = hi ? hi + b / 32 : nullptr;
    if (v)
      avx2::fq_fwd(x + b, y + b, e - b, c, p, h, stream);
    else
      portable::fq_fwd(x + b, y + b, e - b, c, p, h);
  });
}

float relu6_max(const float* x, int64_t n, int nthreads) {
  return max_of_bits(x, n, nthreads, avx2::relu6_max_bits, portable::relu6_max_bits);
}

void relu6_fake_quant(const float* x, float* y, int64_t n, int bits, float scale, uint32_t* mask, int nthreads) {
  const FqConsts c = fq_consts(bits, scale);
  const bool v = use_avx2();
  const bool stream = n >= kStreamBytes / int64_t(sizeof(float));
  parallel_for_words(n, threads_for(nthreads, n), [&](int64_t b, int64_t e) {
    uint32_t* mk = mask ? mask + b / 32 : nullptr;
    if (v)
      avx2::r6_fwd(x + b, y + b, e - b, c, mk, stream);
    else
      portable::r6_fwd(x + b, y + b, e - b, c, mk);
  });
}

double fake_quant_backward(const float* g, float* gx, int64_t n, const uint32_t* pass,
                           const uint32_t* hi, int nthreads) {
  const bool v = use_avx2();
  const bool stream = n >= kStreamBytes / int64_t(sizeof(float));
  return parallel_reduce_words<double>(
      n, threads_for(nthreads, n), 0.0,
      [&](int64_t b, int64_t e) {
        const uint32_t* p = pass + b / 32;
        const uint32_t* h = hi ? hi + b / 32 : nullptr;
        return v ? avx2::fq_bwd(g + b, gx + b, e - b, p, h, stream) : portable::fq_bwd(g + b, gx + b, e - b, p, h);
      },
      [](double a, double b) { return a + b; });
}

}  // namespace fedmpq::cpu
