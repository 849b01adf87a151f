// AVX2/FMA variants of the fake-quant chunk kernels. Compiled with -mavx2 -mfma in this
// translation unit only and called only when the CPU reports both (cpu_features.cpp).
// No FMA is used on the value path: the sequence of roundings must match the reference.
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "cpu/fake_quant.h"

namespace fedmpq::cpu::avx2 {

uint32_t absmax_bits(const float* x, int64_t n) {
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i)), absmask));
    m1 = _mm256_max_epu32(m1, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i + 8)), absmask));
    m2 = _mm256_max_epu32(m2, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i + 16)), absmask));
    m3 = _mm256_max_epu32(m3, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i + 24)), absmask));
  }
  m0 = _mm256_max_epu32(_mm256_max_epu32(m0, m1), _mm256_max_epu32(m2, m3));
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256((__m256i*)lanes, m0);
  uint32_t m = 0;
  for (uint32_t v : lanes) m = v > m ? v : m;
  for (; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, 4);
    b &= 0x7fffffffu;
    m = b > m ? b : m;
  }
  return m;
}

namespace {
struct Vec {
  __m256 scale, nscale, inv, step, up, down, absmask, signmask;
  explicit Vec(const FqConsts& c)
      : scale(_mm256_set1_ps(c.scale)),
        nscale(_mm256_set1_ps(-c.scale)),
        inv(_mm256_set1_ps(c.inv)),
        step(_mm256_set1_ps(c.step)),
        up(_mm256_set1_ps(c.up)),
        down(_mm256_set1_ps(c.down)),
        absmask(_mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))),
        signmask(_mm256_set1_ps(-0.0f)) {}
};

// Non-temporal stores (no read-for-ownership of the destination) for outputs too large
// to stay in cache anyway: a third less memory traffic. y must then be 32-byte aligned.
template <bool kStream>
inline void store8(float* p, __m256 v) {
  if constexpr (kStream)
    _mm256_stream_ps(p, v);
  else
    _mm256_storeu_ps(p, v);
}

// kTiny: S < 2^-100, the grid taken on S * 2^100 (fake_quant.h). Otherwise up and down are 1,
// and the loops leave out the two multiplications (13-19 % of the time at 2^16 elements).
template <bool kTiny>
inline __m256 quant8(const Vec& k, __m256 v) {
  __m256 a = _mm256_and_ps(v, k.absmask);
  a = _mm256_min_ps(k.scale, a);  // min_ps returns its 2nd operand when either is NaN: NaN |x| propagates
  if constexpr (kTiny) a = _mm256_mul_ps(a, k.up);
  const __m256 q = _mm256_round_ps(_mm256_mul_ps(a, k.inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 m = _mm256_mul_ps(q, k.step);
  if constexpr (kTiny) m = _mm256_mul_ps(m, k.down);
  return _mm256_or_ps(m, _mm256_and_ps(v, k.signmask));
}

// f(kStream, kTiny) with both as compile-time constants (std::bool_constant).
template <class F>
inline void with_flags(bool stream, bool tiny, F&& f) {
  if (stream)
    tiny ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  else
    tiny ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
}

// 8 elements: stores y, returns (pass byte) | (hi byte << 8).
template <bool kStream, bool kTiny>
inline uint32_t fwd8(const Vec& k, const float* x, float* y) {
  const __m256 v = _mm256_loadu_ps(x);
  store8<kStream>(y, quant8<kTiny>(k, v));
  const __m256 h = _mm256_cmp_ps(v, k.scale, _CMP_GT_OQ);
  const __m256 l = _mm256_cmp_ps(v, k.nscale, _CMP_LT_OQ);
  const uint32_t clipped = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_or_ps(h, l)));
  const uint32_t hb = static_cast<uint32_t>(_mm256_movemask_ps(h));
  return ((~clipped) & 0xffu) | (hb << 8);
}
}  // namespace

namespace {
template <bool kStream, bool kTiny>
void fq_fwd_words(const Vec& k, const float* x, float* y, int64_t full, uint32_t* pass, uint32_t* hi) {
  if (pass || hi) {
    for (int64_t w = 0; w < full; ++w) {
      const float* xs = x + w * 32;
      float* ys = y + w * 32;
      const uint32_t r0 = fwd8<kStream, kTiny>(k, xs, ys), r1 = fwd8<kStream, kTiny>(k, xs + 8, ys + 8);
      const uint32_t r2 = fwd8<kStream, kTiny>(k, xs + 16, ys + 16), r3 = fwd8<kStream, kTiny>(k, xs + 24, ys + 24);
      if (pass) pass[w] = (r0 & 0xff) | (r1 & 0xff) << 8 | (r2 & 0xff) << 16 | (r3 & 0xff) << 24;
      if (hi) hi[w] = (r0 >> 8) | (r1 >> 8) << 8 | (r2 >> 8) << 16 | (r3 >> 8) << 24;
    }
  } else {
    // Identity STE keeps no bitmap: the plain value loop.
    for (int64_t i = 0; i < full * 32; i += 8) store8<kStream>(y + i, quant8<kTiny>(k, _mm256_loadu_ps(x + i)));
  }
  if (kStream) _mm_sfence();  // order the streamed stores before the caller's next use
}
}  // namespace

void fq_fwd(const float* x, float* y, int64_t n, FqConsts c, uint32_t* pass, uint32_t* hi, bool stream) {
  const Vec k(c);
  const int64_t full = n / 32;
  with_flags(stream && reinterpret_cast<uintptr_t>(y) % 32 == 0, c.up != 1.0f, [&](auto st, auto tiny) {
    fq_fwd_words<decltype(st)::value, decltype(tiny)::value>(k, x, y, full, pass, hi);
  });
  if (full * 32 < n)
    portable::fq_fwd(x + full * 32, y + full * 32, n - full * 32, c, pass ? pass + full : nullptr,
                     hi ? hi + full : nullptr);
}

// ---- ReLU6 fused with the dynamic-scale quantizer ----
namespace {
// |a| bit patterns of ReLU6's a (see portable::relu6_max_bits) for 8 elements.
inline __m256i relu6_bits8(__m256i b) {
  const __m256i ab = _mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff));
  const __m256i nan = _mm256_cmpgt_epi32(ab, _mm256_set1_epi32(0x7f800000));  // signed: ab <= 0x7fffffff
  const __m256i pos = _mm256_cmpgt_epi32(b, _mm256_set1_epi32(-1));           // sign bit clear
  const __m256i r = _mm256_and_si256(_mm256_min_epu32(b, _mm256_set1_epi32(0x40C00000)), pos);
  return _mm256_blendv_epi8(r, ab, nan);
}
}  // namespace

uint32_t relu6_max_bits(const float* x, int64_t n) {
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_epu32(m0, relu6_bits8(_mm256_loadu_si256((const __m256i*)(x + i))));
    m1 = _mm256_max_epu32(m1, relu6_bits8(_mm256_loadu_si256((const __m256i*)(x + i + 8))));
    m2 = _mm256_max_epu32(m2, relu6_bits8(_mm256_loadu_si256((const __m256i*)(x + i + 16))));
    m3 = _mm256_max_epu32(m3, relu6_bits8(_mm256_loadu_si256((const __m256i*)(x + i + 24))));
  }
  m0 = _mm256_max_epu32(_mm256_max_epu32(m0, m1), _mm256_max_epu32(m2, m3));
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256((__m256i*)lanes, m0);
  uint32_t m = 0;
  for (uint32_t v : lanes) m = v > m ? v : m;
  const uint32_t t = portable::relu6_max_bits(x + i, n - i);
  return t > m ? t : m;
}

namespace {
// 8 elements: stores y, returns the mask byte (0 < x < 6).
template <bool kStream, bool kTiny>
inline uint32_t r6_fwd8(const Vec& k, const float* x, float* y) {
  const __m256 v = _mm256_loadu_ps(x);
  const __m256 six = _mm256_set1_ps(6.0f);
  const __m256 gt0 = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ);
  __m256 r = _mm256_and_ps(_mm256_min_ps(v, six), gt0);              // x > 0 ? min(x, 6) : +0
  r = _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));    // NaN stays NaN
  store8<kStream>(y, quant8<kTiny>(k, r));
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_and_ps(gt0, _mm256_cmp_ps(v, six, _CMP_LT_OQ))));
}

template <bool kStream, bool kTiny>
void r6_fwd_words(const Vec& k, const float* x, float* y, int64_t full, uint32_t* mask) {
  for (int64_t w = 0; w < full; ++w) {
    const float* xs = x + w * 32;
    float* ys = y + w * 32;
    const uint32_t r0 = r6_fwd8<kStream, kTiny>(k, xs, ys), r1 = r6_fwd8<kStream, kTiny>(k, xs + 8, ys + 8);
    const uint32_t r2 = r6_fwd8<kStream, kTiny>(k, xs + 16, ys + 16);
    const uint32_t r3 = r6_fwd8<kStream, kTiny>(k, xs + 24, ys + 24);
    if (mask) mask[w] = r0 | r1 << 8 | r2 << 16 | r3 << 24;
  }
  if (kStream) _mm_sfence();
}
}  // namespace

void r6_fwd(const float* x, float* y, int64_t n, FqConsts c, uint32_t* mask, bool stream) {
  const Vec k(c);
  const int64_t full = n / 32;
  with_flags(stream && reinterpret_cast<uintptr_t>(y) % 32 == 0, c.up != 1.0f, [&](auto st, auto tiny) {
    r6_fwd_words<decltype(st)::value, decltype(tiny)::value>(k, x, y, full, mask);
  });
  if (full * 32 < n) portable::r6_fwd(x + full * 32, y + full * 32, n - full * 32, c, mask ? mask + full : nullptr);
}

namespace {
template <bool kStream>
double fq_bwd_impl(const float* g, float* gx, int64_t n, const uint32_t* pass, const uint32_t* hi) {
  // Lane j of a byte-broadcast selects bit j.
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 signmask = _mm256_set1_ps(-0.0f);
  const int64_t full = n / 32;
  double acc = 0.0;
  __m256 facc = _mm256_setzero_ps();  // flushed to double every 32 words to bound the error
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t pw = pass[w];
    const uint32_t cw = hi ? ~pw : 0u;
    const uint32_t hw = hi ? hi[w] : 0u;
    for (int j = 0; j < 4; ++j) {
      const float* gs = g + w * 32 + j * 8;
      const __m256 gv = _mm256_loadu_ps(gs);
      const __m256i pm = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((pw >> (8 * j)) & 0xff), sel), sel);
      store8<kStream>(gx + w * 32 + j * 8, _mm256_and_ps(gv, _mm256_castsi256_ps(pm)));
      if (cw) {
        const __m256i cm = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((cw >> (8 * j)) & 0xff), sel), sel);
        const __m256i hm = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((hw >> (8 * j)) & 0xff), sel), sel);
        // +g where hi, -g where lo: flip the sign bit of the lanes that are not hi.
        const __m256 signed_g = _mm256_xor_ps(gv, _mm256_andnot_ps(_mm256_castsi256_ps(hm), signmask));
        facc = _mm256_add_ps(facc, _mm256_and_ps(signed_g, _mm256_castsi256_ps(cm)));
      }
    }
    if (hi && (w & 31) == 31) {
      alignas(32) float l[8];
      _mm256_store_ps(l, facc);
      for (float v : l) acc += v;
      facc = _mm256_setzero_ps();
    }
  }
  if (hi) {
    alignas(32) float l[8];
    _mm256_store_ps(l, facc);
    for (float v : l) acc += v;
  }
  if (kStream) _mm_sfence();
  if (full * 32 < n)
    acc += portable::fq_bwd(g + full * 32, gx + full * 32, n - full * 32, pass + full, hi ? hi + full : nullptr);
  return acc;
}
}  // namespace

double fq_bwd(const float* g, float* gx, int64_t n, const uint32_t* pass, const uint32_t* hi, bool stream) {
  if (stream && reinterpret_cast<uintptr_t>(gx) % 32 == 0) return fq_bwd_impl<true>(g, gx, n, pass, hi);
  return fq_bwd_impl<false>(g, gx, n, pass, hi);
}

}  // namespace fedmpq::cpu::avx2
