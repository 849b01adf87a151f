// AVX2 variants of the packing chunk kernels (compiled with -mavx2 -mfma in this
// translation unit only; chosen at run time). 32 codes at a time: one 32-byte load, and per
// plane one shift + movemask to pack, or a byte shuffle + compare to unpack. At the end, the
// GFNI variants (namespace gfni: functions compiled for AVX2 + GFNI by a target attribute).
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
// acc[0..32) += (sign ? -1 : 1) * (c * q): the 32 codes in q, the signs as expand32 gives them.
inline void accumulate32(float* acc, __m256i q, __m256i s, __m256 c) {
  const __m256i signbit = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m128i qh[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
  const __m128i sh[2] = {_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)};
  for (int g = 0; g < 4; ++g) {
    const __m128i qb = g & 1 ? _mm_srli_si128(qh[g >> 1], 8) : qh[g >> 1];
    const __m128i sb = g & 1 ? _mm_srli_si128(sh[g >> 1], 8) : sh[g >> 1];
    const __m256 v = _mm256_mul_ps(c, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(qb)));
    // -v where the sign bit is set: flip the float's sign bit (exactly the negation).
    const __m256 sv = _mm256_xor_ps(v, _mm256_castsi256_ps(_mm256_and_si256(_mm256_cvtepi8_epi32(sb), signbit)));
    float* a = acc + g * 8;
    _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), sv));
  }
}

template <int B>
void dequant_words(float* acc, int64_t full, const uint32_t* planes, int64_t words, const uint32_t* signs,
                   float coef) {
  const __m256 c = _mm256_set1_ps(coef);
  for (int64_t w = 0; w < full; ++w)
    accumulate32(acc + w * 32, codes32<B>(planes, words, w), signs ? expand32(signs[w]) : _mm256_setzero_si256(), c);
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

// ---- AVX2 + GFNI: 128 codes at a time -------------------------------------------------------
// gf2p8affineqb(x, A) sets bit i of each byte x_j to parity(byte 7-i of A's qword & x_j).
// With the data as A and a one-bit selector as x, byte j becomes "bit m of each of the
// qword's 8 bytes": an 8x8 bit transpose. Packing: 8 codes -> 8 plane bytes per qword;
// unpacking: 8 plane bytes -> 8 codes. Between qwords and the planes' 16-byte runs (128
// codes of a plane) sits an 8x8 transpose of 16-bit elements. Per 128 codes at 8 bits that
// is ~45 instructions against ~100 (packing) or ~160 (unpacking) for the AVX2 loop.
#define FEDMPQ_GFNI __attribute__((target("gfni")))
namespace fedmpq::cpu::gfni {

namespace {
// The 8x8 matrix of 16-bit elements whose rows 2k and 2k+1 are the two lanes of r[k],
// transposed into the same layout. A transpose, so it is its own inverse.
FEDMPQ_GFNI inline void transpose8x8_u16(__m256i r[4]) {
  const __m256i a = _mm256_unpacklo_epi16(r[0], r[1]), b = _mm256_unpackhi_epi16(r[0], r[1]);
  const __m256i c = _mm256_unpacklo_epi16(r[2], r[3]), d = _mm256_unpackhi_epi16(r[2], r[3]);
  // After the two unpack rounds, a lane holds one column's even rows then its odd rows (per
  // qword); the qword permute puts a column's two halves in one lane, the shuffle interleaves.
  const __m256i mix = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,  //
                                       0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
  const __m256i e[4] = {_mm256_unpacklo_epi32(a, c), _mm256_unpackhi_epi32(a, c), _mm256_unpacklo_epi32(b, d),
                        _mm256_unpackhi_epi32(b, d)};
  for (int k = 0; k < 4; ++k) r[k] = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(e[k], 0xD8), mix);
}

// For codes128: each lane's 16-bit pairs (low 8 codes' plane byte, high 8 codes') into two
// qwords of 8 codes, plane p at byte 8-B+p (zeros below), so that byte 7-i holds plane B-1-i:
// the plane of bit i. The affine then takes bit j of each byte for code j.
template <int B>
FEDMPQ_GFNI inline __m256i ungroup_for() {
  alignas(32) int8_t idx[32];
  for (int h = 0; h < 2; ++h)
    for (int d = 0; d < 8; ++d) {
      const int p = d - (8 - B);
      idx[h * 8 + d] = idx[16 + h * 8 + d] = static_cast<int8_t>(p >= 0 ? 2 * p + h : -128);
    }
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(idx));
}

// The 128 codes of words w..w+3 as four registers of 32 bytes (plane 0 the top bit);
// ungroup = ungroup_for<B>().
template <int B>
FEDMPQ_GFNI inline void codes128(const uint32_t* planes, int64_t words, int64_t w, __m256i ungroup, __m256i q[4]) {
  __m256i r[4];
  for (int k = 0; k < 4; ++k) {  // lanes: planes 2k and 2k+1 (zeros past B), 16 bytes each
    const __m128i lo = 2 * k < B ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(planes + 2 * k * words + w))
                                 : _mm_setzero_si128();
    const __m128i hi = 2 * k + 1 < B
                           ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(planes + (2 * k + 1) * words + w))
                           : _mm_setzero_si128();
    r[k] = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
  }
  transpose8x8_u16(r);  // lane j of r[k]: 16 codes' byte pairs of planes 0..7
  const __m256i diag = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
  for (int k = 0; k < 4; ++k) q[k] = _mm256_gf2p8affine_epi64_epi8(diag, _mm256_shuffle_epi8(r[k], ungroup), 0);
}

template <int B>
FEDMPQ_GFNI __m256i pack_blocks(const uint8_t* codes, int64_t blocks, uint32_t* planes, int64_t words) {
  // Reverse each qword's bytes, so that the affine's bit i is code i (it reads byte 7-i).
  const __m256i rev = _mm256_setr_epi8(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8,  //
                                       7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8);
  // Byte p of the selector picks bit B-1-p (plane p's); none past B.
  uint64_t s = 0;
  for (int p = 0; p < B; ++p) s |= uint64_t(1) << (B - 1 - p) << (8 * p);
  const __m256i sel = _mm256_set1_epi64x(static_cast<long long>(s));
  // Each lane's two qwords' plane bytes as 16-bit pairs: (qword 0's byte p, qword 1's).
  const __m256i group = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,  //
                                         0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  // At 8 bits a block's planes go to a stack buffer first, and from it kGroup blocks at a
  // time. A plane's stride is often a multiple of 4 KiB (any n a multiple of 2^17), and then
  // 8 planes' stores plus the codes' loads are 9 streams in one L1 set (8-way on Zen 4): 8-bit
  // packing of 2^20 codes took 74 us straight, 55 staged. Below 8 bits staging costs more
  // (7 bits: 43 against 49 us).
  constexpr bool kStage = B == 8;
  constexpr int64_t kGroup = kStage ? 8 : 1;
  alignas(32) uint8_t stage[kStage ? B : 1][kGroup * 16];
  __m256i seen = _mm256_setzero_si256();
  for (int64_t g0 = 0; g0 < blocks; g0 += kGroup) {
    const int64_t gn = blocks - g0 < kGroup ? blocks - g0 : kGroup;
    for (int64_t j = 0; j < gn; ++j) {
      const uint8_t* src = codes + (g0 + j) * 128;
      __m256i r[4];
      for (int k = 0; k < 4; ++k) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k * 32));
        seen = _mm256_or_si256(seen, c);
        r[k] = _mm256_shuffle_epi8(_mm256_gf2p8affine_epi64_epi8(sel, _mm256_shuffle_epi8(c, rev), 0), group);
      }
      transpose8x8_u16(r);  // lane p%2 of r[p/2]: plane p's 16 bytes
      for (int p = 0; p < B; ++p) {
        const __m128i v = p & 1 ? _mm256_extracti128_si256(r[p >> 1], 1) : _mm256_castsi256_si128(r[p >> 1]);
        __m128i* dst;
        if constexpr (kStage)
          dst = reinterpret_cast<__m128i*>(stage[p] + j * 16);
        else
          dst = reinterpret_cast<__m128i*>(planes + p * words + (g0 + j) * 4);
        _mm_storeu_si128(dst, v);
      }
    }
    if constexpr (kStage) {
      for (int p = 0; p < B; ++p) {
        uint8_t* dst = reinterpret_cast<uint8_t*>(planes + p * words + g0 * 4);
        if (gn == kGroup) {
          for (int k = 0; k < kGroup / 2; ++k)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k * 32),
                                _mm256_load_si256(reinterpret_cast<const __m256i*>(stage[p] + k * 32)));
        } else {
          for (int64_t j = 0; j < gn; ++j)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j * 16),
                             _mm_load_si128(reinterpret_cast<const __m128i*>(stage[p] + j * 16)));
        }
      }
    }
  }
  return seen;
}

template <int B>
FEDMPQ_GFNI void unpack_blocks(const uint32_t* planes, int64_t words, int64_t blocks, uint8_t* codes) {
  const __m256i ungroup = ungroup_for<B>();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m256i q[4];
    codes128<B>(planes, words, blk * 4, ungroup, q);
    for (int k = 0; k < 4; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + blk * 128 + k * 32), q[k]);
  }
}

template <int B>
FEDMPQ_GFNI void dequant_blocks(float* acc, int64_t blocks, const uint32_t* planes, int64_t words,
                                const uint32_t* signs, float coef) {
  const __m256 c = _mm256_set1_ps(coef);
  const __m256i ungroup = ungroup_for<B>();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m256i q[4];
    codes128<B>(planes, words, blk * 4, ungroup, q);
    for (int k = 0; k < 4; ++k) {
      const int64_t w = blk * 4 + k;
      avx2::accumulate32(acc + w * 32, q[k], signs ? avx2::expand32(signs[w]) : _mm256_setzero_si256(), c);
    }
  }
}
}  // namespace

uint32_t pack_codes(const uint8_t* codes, int64_t n, int bits, uint32_t* planes, int64_t words) {
  const int64_t blocks = n / 128, done = blocks * 128;
  const __m256i seen =
      avx2::with_bits(bits, [&](auto b) { return pack_blocks<decltype(b)::value>(codes, blocks, planes, words); });
  uint32_t r = avx2::or_bytes(seen);
  if (done < n) r |= avx2::pack_codes(codes + done, n - done, bits, planes + done / 32, words);
  return r;
}

void unpack_codes(const uint32_t* planes, int64_t words, int64_t n, int bits, uint8_t* codes) {
  const int64_t blocks = n / 128, done = blocks * 128;
  avx2::with_bits(bits, [&](auto b) {
    unpack_blocks<decltype(b)::value>(planes, words, blocks, codes);
    return 0;
  });
  if (done < n) avx2::unpack_codes(planes + done / 32, words, n - done, bits, codes + done);
}

void dequant_accumulate(float* acc, int64_t n, const uint32_t* planes, int64_t words, const uint32_t* signs,
                        int bits, float coef) {
  const int64_t blocks = n / 128, done = blocks * 128;
  avx2::with_bits(bits, [&](auto b) {
    dequant_blocks<decltype(b)::value>(acc, blocks, planes, words, signs, coef);
    return 0;
  });
  if (done < n)
    avx2::dequant_accumulate(acc + done, n - done, planes + done / 32, words, signs ? signs + done / 32 : nullptr,
                             bits, coef);
}

}  // namespace fedmpq::cpu::gfni
