// AVX2 variants of the bit-plane step's chunk kernels (8 elements a vector, 32 a sign
// word). Compiled with -mavx2 -mfma in this translation unit only and called only when the
// CPU reports both (cpu_features.cpp). No FMA on the value path: every multiply and add is
// its own intrinsic and the build forbids contraction, so the roundings are the reference's.
// The partial last word of a range goes to the portable kernel.
#include <immintrin.h>

#include <cstring>

#include "cpu/bitplane.h"

namespace fedmpq::cpu::avx2 {

namespace {

// Lane t = all ones where bit t of `byte` is set.
inline __m256i lanes_of_byte(uint32_t byte) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), sel), sel);
}

inline __m256i load_u8x8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// The low byte of each of the 8 lanes -> 8 bytes at p.
inline void store_u8x8(uint8_t* p, __m256i v) {
  const __m256i shuf = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i b = _mm256_shuffle_epi8(v, shuf);
  const uint64_t w = static_cast<uint32_t>(_mm256_cvtsi256_si32(b)) |
                     (static_cast<uint64_t>(static_cast<uint32_t>(_mm256_extract_epi32(b, 4))) << 32);
  std::memcpy(p, &w, 8);
}

// reference.decode_r of 8 code bytes (int32 lanes), as float32 (exact).
inline __m256 decode_r8(__m256i code) {
  const __m256i c = _mm256_and_si256(_mm256_srli_epi32(code, 3), _mm256_set1_epi32(0xF));
  // c = 0: a shift count of 2^32 - 1, which sllv turns into 0
  const __m256i mag = _mm256_sllv_epi32(_mm256_set1_epi32(1), _mm256_sub_epi32(c, _mm256_set1_epi32(1)));
  const __m256i neg = _mm256_srai_epi32(_mm256_slli_epi32(code, 24), 31);  // bit 7
  const __m256i det = _mm256_sub_epi32(_mm256_xor_si256(mag, neg), neg);
  const __m256i st = _mm256_and_si256(code, _mm256_set1_epi32(3));
  // st 1 -> +1, 2 -> -1 (cmpeq gives -1 for true)
  const __m256i stv = _mm256_sub_epi32(_mm256_cmpeq_epi32(st, _mm256_set1_epi32(2)),
                                       _mm256_cmpeq_epi32(st, _mm256_set1_epi32(1)));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(det, stv));
}

inline __m256i mix32x8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x21F0AAAD));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x735A2D97));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
}

struct Consts {
  __m256 k, mu, gs_prev, g_s, lr, step, L, absmask, signmask;
  explicit Consts(const BitplaneStep& c)
      : k(_mm256_set1_ps(c.k)),
        mu(_mm256_set1_ps(c.mu)),
        gs_prev(_mm256_set1_ps(c.gs_prev)),
        g_s(_mm256_set1_ps(c.g_s)),
        lr(_mm256_set1_ps(c.lr)),
        step(_mm256_set1_ps(c.step)),
        L(_mm256_set1_ps(c.L)),
        absmask(_mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))),
        signmask(_mm256_set1_ps(-0.0f)) {}
};

// a = sigma * (G * k) of 8 elements; neg their sign lanes.
inline __m256 load_a(const Consts& k, const float* grad, __m256i neg) {
  const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(grad), k.k);
  return _mm256_xor_ps(v, _mm256_and_ps(_mm256_castsi256_ps(neg), k.signmask));
}

// d = (mu * (f32(r) * gs_prev)) + g of plane i (shift sh = N-1-i) for 8 elements.
inline __m256 plane_d8(const Consts& k, __m256 a, __m256i q, int sh, float ci, const uint8_t* mom) {
  __m256 gi = _mm256_mul_ps(a, _mm256_set1_ps(static_cast<float>(1 << sh)));
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i bit = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srl_epi32(q, _mm_cvtsi32_si128(sh)), one), one);
  gi = _mm256_blendv_ps(gi, _mm256_add_ps(gi, _mm256_set1_ps(ci)), _mm256_castsi256_ps(bit));
  const __m256 m = _mm256_mul_ps(decode_r8(load_u8x8(mom)), k.gs_prev);
  return _mm256_add_ps(_mm256_mul_ps(k.mu, m), gi);
}

}  // namespace

void binarize(const float* w, float inv, float L, uint8_t* codes, uint32_t* sign, int64_t b, int64_t e) {
  const __m256 iv = _mm256_set1_ps(inv), Lv = _mm256_set1_ps(L), zero = _mm256_setzero_ps();
  const __m256 signmask = _mm256_set1_ps(-0.0f);
  const int64_t full_end = b + (e - b) / 32 * 32;
  for (int64_t i0 = b; i0 < full_end; i0 += 32) {
    uint32_t sw = 0;
    for (int g = 0; g < 4; ++g) {
      const int64_t j = i0 + 8 * g;
      const __m256 v = _mm256_loadu_ps(w + j);
      const __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_andnot_ps(signmask, v), iv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      // min(L, q): q where q <= L, and q where q is NaN (minps returns its second operand
      // then), which the conversion turns into 0x80000000, a 0 code as the portable kernel's
      store_u8x8(codes + j, _mm256_cvttps_epi32(_mm256_min_ps(Lv, q)));
      const uint32_t pos = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ)));
      sw |= (~pos & 0xFFu) << (8 * g);  // set where !(v > 0), as the portable kernel
    }
    sign[i0 / 32] = sw;
  }
  if (full_end < e) portable::binarize(w, inv, L, codes, sign, full_end, e);
}

void dequantize(const uint8_t* codes, const uint32_t* sign, float k, float* out, int64_t b, int64_t e) {
  const __m256 kv = _mm256_set1_ps(k);
  const __m256 signmask = _mm256_set1_ps(-0.0f);
  const int64_t full_end = b + (e - b) / 32 * 32;
  for (int64_t i0 = b; i0 < full_end; i0 += 32) {
    const uint32_t sw = sign[i0 / 32];
    for (int g = 0; g < 4; ++g) {
      const int64_t j = i0 + 8 * g;
      const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(load_u8x8(codes + j)), kv);
      const __m256 neg = _mm256_castsi256_ps(lanes_of_byte((sw >> (8 * g)) & 0xFFu));
      _mm256_storeu_ps(out + j, _mm256_xor_ps(w, _mm256_and_ps(neg, signmask)));  // -w where negative
    }
  }
  if (full_end < e) portable::dequantize(codes, sign, k, out, full_end, e);
}

double dequantize_backward(const float* grad, const uint8_t* codes, const uint32_t* sign, int64_t b, int64_t e) {
  const __m256d signmask = _mm256_set1_pd(-0.0);
  const int64_t full_end = b + (e - b) / 32 * 32;
  __m256d acc0 = _mm256_setzero_pd(), acc1 = acc0;
  for (int64_t i0 = b; i0 < full_end; i0 += 32) {
    const uint32_t sw = sign[i0 / 32];
    for (int g = 0; g < 4; ++g) {
      const int64_t j = i0 + 8 * g;
      const __m256 gv = _mm256_loadu_ps(grad + j);
      const __m256i q = load_u8x8(codes + j);
      const __m256i neg = lanes_of_byte((sw >> (8 * g)) & 0xFFu);
      // float32 * an 8-bit integer is exact in float64
      __m256d lo = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(gv)),
                                 _mm256_cvtepi32_pd(_mm256_castsi256_si128(q)));
      __m256d hi = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(gv, 1)),
                                 _mm256_cvtepi32_pd(_mm256_extracti128_si256(q, 1)));
      const __m256d nlo = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(neg)));
      const __m256d nhi = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(neg, 1)));
      lo = _mm256_xor_pd(lo, _mm256_and_pd(nlo, signmask));
      hi = _mm256_xor_pd(hi, _mm256_and_pd(nhi, signmask));
      acc0 = _mm256_add_pd(acc0, lo);
      acc1 = _mm256_add_pd(acc1, hi);
    }
  }
  alignas(32) double l[8];
  _mm256_store_pd(l, acc0);
  _mm256_store_pd(l + 4, acc1);
  double acc = 0.0;
  for (double x : l) acc += x;
  if (full_end < e) acc += portable::dequantize_backward(grad, codes, sign, full_end, e);
  return acc;
}

uint32_t step_max_bits(const BitplaneStep& c, const float* grad, const uint8_t* codes, const uint32_t* sign,
                       const uint8_t* mom, int64_t b, int64_t e) {
  const Consts k(c);
  const int64_t full_end = b + (e - b) / 32 * 32;
  __m256i m = _mm256_setzero_si256();
  const __m256i absi = _mm256_set1_epi32(0x7fffffff);
  for (int64_t i0 = b; i0 < full_end; i0 += 32) {
    const uint32_t sw = sign[i0 / 32];
    for (int g = 0; g < 4; ++g) {
      const int64_t j = i0 + 8 * g;
      const __m256 a = load_a(k, grad + j, lanes_of_byte((sw >> (8 * g)) & 0xFFu));
      const __m256i q = load_u8x8(codes + j);
      for (int i = 0; i < c.N; ++i) {
        const __m256 d = plane_d8(k, a, q, c.N - 1 - i, c.coef[i], mom + i * c.n + j);
        m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(d), absi));
      }
    }
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), m);
  uint32_t r = 0;
  for (uint32_t v : lanes) r = v > r ? v : r;
  if (full_end < e) {
    const uint32_t t = portable::step_max_bits(c, grad, codes, sign, mom, full_end, e);
    r = t > r ? t : r;
  }
  return r;
}

void step_update(const BitplaneStep& c, const float* grad, uint8_t* codes, uint32_t* sign, uint8_t* mom, int64_t b,
                 int64_t e) {
  const Consts k(c);
  const int N = c.N;
  const int64_t full_end = b + (e - b) / 32 * 32;
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i all = _mm256_set1_epi32(-1);
  const __m256 tiny = _mm256_set1_ps(0x1p-100f);
  const __m256 onef = _mm256_set1_ps(1.0f);
  const __m256 zerof = _mm256_setzero_ps();
  const __m256i keyv = _mm256_set1_epi32(static_cast<int>(c.key));
  for (int64_t i0 = b; i0 < full_end; i0 += 32) {
    const uint32_t sw = sign[i0 / 32];
    uint32_t nw = 0;
    for (int g = 0; g < 4; ++g) {
      const int64_t j = i0 + 8 * g;
      const uint32_t sbyte = (sw >> (8 * g)) & 0xFFu;
      const __m256 a = load_a(k, grad + j, lanes_of_byte(sbyte));
      const __m256i q = load_u8x8(codes + j);
      __m256 p = zerof;
      __m256 d0 = zerof;
      __m256i R = zero, last = zero;
      for (int i = 0; i < N; ++i) {
        const int sh = N - 1 - i;
        uint8_t* row = mom + i * c.n + j;
        const __m256 d = plane_d8(k, a, q, sh, c.coef[i], row);  // reads the old codes first
        if (i == 0) d0 = d;
        const __m256 x = _mm256_mul_ps(_mm256_div_ps(_mm256_and_ps(d, k.absmask), k.g_s), k.lr);
        const __m256i valid = _mm256_castps_si256(_mm256_cmp_ps(x, tiny, _CMP_GE_OQ));  // false for NaN
        const __m256i xb = _mm256_castps_si256(x);
        const __m256i E = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(xb, 23), _mm256_set1_epi32(0xFF)),
                                           _mm256_set1_epi32(127));
        const __m256i up = _mm256_cmpgt_epi32(_mm256_and_si256(xb, _mm256_set1_epi32(0x7FFFFF)),
                                              _mm256_set1_epi32(0x3504F3));  // -1 where mantissa >= 0x3504F4
        const __m256i ex = _mm256_add_epi32(_mm256_sub_epi32(E, up), _mm256_set1_epi32(sh));
        // e < 0: p += 2^e (ex >= -100 where valid: a normal float); + 0 elsewhere, as the reference
        const __m256i small = _mm256_and_si256(valid, _mm256_cmpgt_epi32(zero, ex));
        const __m256i p2 = _mm256_slli_epi32(_mm256_add_epi32(ex, _mm256_set1_epi32(127)), 23);
        p = _mm256_add_ps(p, _mm256_castsi256_ps(_mm256_and_si256(p2, small)));
        // 0 <= e <= N: r = +-2^e
        const __m256i on = _mm256_and_si256(
            valid, _mm256_and_si256(_mm256_cmpgt_epi32(ex, all), _mm256_cmpgt_epi32(_mm256_set1_epi32(N + 1), ex)));
        const __m256i neg = _mm256_xor_si256(_mm256_castps_si256(_mm256_cmp_ps(d, zerof, _CMP_GT_OQ)), all);
        const __m256i mag = _mm256_and_si256(on, _mm256_sllv_epi32(one, ex));
        const __m256i det = _mm256_sub_epi32(_mm256_xor_si256(mag, neg), neg);
        const __m256i code = _mm256_and_si256(
            on, _mm256_or_si256(_mm256_and_si256(neg, _mm256_set1_epi32(0x80)),
                                _mm256_slli_epi32(_mm256_add_epi32(ex, one), 3)));
        R = _mm256_add_epi32(R, _mm256_sll_epi32(det, _mm_cvtsi32_si128(sh)));
        if (i == N - 1)
          last = code;
        else
          store_u8x8(row, code);
      }
      // the stochastic LSB part
      const __m256 pt = _mm256_min_ps(p, onef);
      const __m256i jv = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(j))), iota);
      const __m256i h = mix32x8(_mm256_xor_si256(keyv, mix32x8(_mm256_xor_si256(jv, _mm256_set1_epi32(0x85EBCA6B)))));
      const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(0x1p-24f));
      const __m256i hit = _mm256_castps_si256(_mm256_cmp_ps(u, pt, _CMP_LT_OQ));
      const __m256 pos0 = _mm256_cmp_ps(d0, zerof, _CMP_GT_OQ);
      const __m256i stv = _mm256_and_si256(
          hit, _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(all), _mm256_castsi256_ps(one), pos0)));
      const __m256i stc = _mm256_and_si256(
          hit, _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(_mm256_set1_epi32(2)),
                                                    _mm256_castsi256_ps(one), pos0)));
      store_u8x8(mom + (N - 1) * c.n + j, _mm256_or_si256(last, stc));
      R = _mm256_add_epi32(R, stv);
      // requantize: v = f32(q) - f32(R) * step, half to even, sign fold, saturate
      const __m256 v = _mm256_sub_ps(_mm256_cvtepi32_ps(q), _mm256_mul_ps(_mm256_cvtepi32_ps(R), k.step));
      const __m256 qn = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 flip = _mm256_cmp_ps(qn, zerof, _CMP_LT_OQ);
      const __m256 aq = _mm256_and_ps(qn, k.absmask);
      // min(|q|, L); a NaN gives 0, as torch casts it (min_ps returns L for a NaN: masked)
      const __m256 out = _mm256_and_ps(_mm256_min_ps(aq, k.L), _mm256_cmp_ps(aq, aq, _CMP_ORD_Q));
      store_u8x8(codes + j, _mm256_cvttps_epi32(out));
      nw |= (sbyte ^ static_cast<uint32_t>(_mm256_movemask_ps(flip))) << (8 * g);
    }
    sign[i0 / 32] = nw;
  }
  if (full_end < e) portable::step_update(c, grad, codes, sign, mom, full_end, e);
}

}  // namespace fedmpq::cpu::avx2
