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

void fq_fwd(const float* x, float* y, int64_t n, FqConsts c, uint32_t* pass, uint32_t* hi) {
  for (int64_t w = 0; w * 32 < n; ++w) {
    const int64_t i0 = w * 32;
    const int64_t cnt = n - i0 < 32 ? n - i0 : 32;
    uint32_t pw = 0, hw = 0;
    for (int64_t k = 0; k < cnt; ++k) {
      const float v = x[i0 + k];
      float a = std::fabs(v);
      a = std::isnan(a) ? a : (a < c.scale ? a : c.scale);  // NaN propagates, like torch.minimum
      const float t = a * c.inv;
      const float q = std::nearbyint(t);  // default rounding mode: half to even
      y[i0 + k] = std::copysign(q * c.step, v);
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

}  // namespace portable


float absmax(const float* x, int64_t n, int nthreads) {
  const bool v = use_avx2();
  uint32_t m = parallel_reduce_words<uint32_t>(
      n, threads_for(nthreads, n), 0u,
      [&](int64_t b, int64_t e) {
        return v ? avx2::absmax_bits(x + b, e - b) : portable::absmax_bits(x + b, e - b);
      },
      [](uint32_t a, uint32_t b) { return a > b ? a : b; });
  float s;
  std::memcpy(&s, &m, 4);
  return s;
}

void fake_quant(const float* x, float* y, int64_t n, int bits, float scale, uint32_t* pass, uint32_t* hi,
                int nthreads) {
  const float L = static_cast<float>((1u << bits) - 1u);
  FqConsts c{scale, scale > 0.0f ? L / scale : 0.0f, scale / L};
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
