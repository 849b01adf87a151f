// AVX2 variants of the packing chunk kernels (compiled with -mavx2 -mfma in this
// translation unit only; chosen at run time). 32 codes at a time: one 32-byte load, and per
// plane one shift + movemask to pack, or a byte shuffle + compare to unpack.
#include <immintrin.h>

#include <type_traits>

#include "cpu/pack.h"

namespace fedmpq::cpu::avx2 {

namespace {
// The 32 bits of `word` as 32 bytes: 0xFF where the bit is set, else 0. (Constants live in
// the function, not at namespace scope: a static initializer here would run AVX2 code when
// the module loads, also on CPUs without it.)
inline __m256i expand32(uint32_t word) {
  // Byte k gets byte k/8 of `word` (the shuffle indexes within each 128-bit lane, and
  // set1_epi32 repeats the word's 4 bytes in both), then keeps its own bit k%8.
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit_of_byte = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
  const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(word)), spread),
                                     bit_of_byte);
  return _mm256_cmpeq_epi8(b, bit_of_byte);
}

// The 32 codes of word w, one byte each (plane 0 is the most significant bit). B is a
// template argument so the plane loop unrolls (each kernel below is instantiated per B).
template <int B>
inline __m256i codes32(const uint32_t* planes, int64_t words, int64_t w) {
  __m256i r = _mm256_setzero_si256();
#pragma GCC unroll 8
  for (int p = 0; p < B; ++p)  // r = 2r + bit (a set bit is -1 in the mask)
    r = _mm256_sub_epi8(_mm256_add_epi8(r, r), expand32(planes[p * words + w]));
  return r;
}

// Calls f(std::integral_constant<int, bits>{}) for bits in 1..8.
template <class F>
inline auto with_bits(int bits, F&& f) {
  switch (bits) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

inline uint32_t or_bytes(__m256i v) {
  __m128i x = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  x = _mm_or_si128(x, _mm_srli_si128(x, 8));
  x = _mm_or_si128(x, _mm_srli_si128(x, 4));
  const uint32_t r = static_cast<uint32_t>(_mm_cvtsi128_si32(x));
  return (r | r >> 8 | r >> 16 | r >> 24) & 0xffu;
}
}  // namespace

namespace {
template <int B>
__m256i pack_words(const uint8_t* codes, int64_t full, uint32_t* planes, int64_t words) {
  __m256i seen = _mm256_setzero_si256();
  for (int64_t w = 0; w < full; ++w) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + w * 32));
    seen = _mm256_or_si256(seen, c);
#pragma GCC unroll 8
    for (int p = 0; p < B; ++p) {
      // Bit (B-1-p) of every byte to the byte's top bit: a 16-bit shift by at most 7 puts
      // bit 7-s of each byte at its bit 7, whatever moves in from the low byte.
      const __m256i t = _mm256_slli_epi16(c, 7 - (B - 1 - p));
      planes[p * words + w] = static_cast<uint32_t>(_mm256_movemask_epi8(t));
    }
  }
  return seen;
}
}  // namespace

uint32_t pack_codes(const uint8_t* codes, int64_t n, int bits, uint32_t* planes, int64_t words) {
  const int64_t full = n / 32;
  const __m256i seen = with_bits(bits, [&](auto b) { return pack_words<decltype(b)::value>(codes, full, planes, words); });
  uint32_t r = or_bytes(seen);
  if (full * 32 < n) r |= portable::pack_codes(codes + full * 32, n - full * 32, bits, planes + full, words);
  return r;
}

void unpack_codes(const uint32_t* planes, int64_t words, int64_t n, int bits, uint8_t* codes) {
  const int64_t full = n / 32;
  with_bits(bits, [&](auto b) {
    for (int64_t w = 0; w < full; ++w)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + w * 32), codes32<decltype(b)::value>(planes, words, w));
    return 0;
  });
  if (full * 32 < n) portable::unpack_codes(planes + full, words, n - full * 32, bits, codes + full * 32);
}

namespace {
template <int B>
void dequant_words(float* acc, int64_t full, const uint32_t* planes, int64_t words, const uint32_t* signs,
                   float coef) {
  const __m256 c = _mm256_set1_ps(coef);
  const __m256i signbit = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t w = 0; w < full; ++w) {
    const __m256i q = codes32<B>(planes, words, w);
    const __m256i s = signs ? expand32(signs[w]) : _mm256_setzero_si256();
    const __m128i qh[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
    const __m128i sh[2] = {_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)};
    for (int g = 0; g < 4; ++g) {
      const __m128i qb = g & 1 ? _mm_srli_si128(qh[g >> 1], 8) : qh[g >> 1];
      const __m128i sb = g & 1 ? _mm_srli_si128(sh[g >> 1], 8) : sh[g >> 1];
      const __m256 v = _mm256_mul_ps(c, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(qb)));
      // -v where the sign bit is set: flip the float's sign bit (exactly the negation).
      const __m256 sv = _mm256_xor_ps(v, _mm256_castsi256_ps(_mm256_and_si256(_mm256_cvtepi8_epi32(sb), signbit)));
      float* a = acc + w * 32 + g * 8;
      _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), sv));
    }
  }
}
}  // namespace

void dequant_accumulate(float* acc, int64_t n, const uint32_t* planes, int64_t words, const uint32_t* signs,
                        int bits, float coef) {
  const int64_t full = n / 32;
  with_bits(bits, [&](auto b) {
    dequant_words<decltype(b)::value>(acc, full, planes, words, signs, coef);
    return 0;
  });
  if (full * 32 < n)
    portable::dequant_accumulate(acc + full * 32, n - full * 32, planes + full, words, signs ? signs + full : nullptr,
                                 bits, coef);
}

}  // namespace fedmpq::cpu::avx2
