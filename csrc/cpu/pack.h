// Bit-plane packing, CPU kernels. The layout (fedmpq_kernels/pack/reference.py states it in
// full): a bitmap of n elements is ceil(n/32) little-endian uint32 words, bit i%32 of word
// i/32 is element i, bits past n are zero. b-bit codes (b = 1..8) are stored as b such
// bitmaps one after the other, most significant bit first: plane p holds bit b-1-p of every
// code. A sign map is the 1-bit case (bit set = negative).
#pragma once
#include <cstdint>

namespace fedmpq::cpu {

// codes[0..n) (one byte each, each < 2^bits) -> planes[bits * words], words = ceil(n/32).
// Returns the OR of all codes, so the caller can reject a code that does not fit in `bits`
// without a second pass (the planes are then meaningless).
uint32_t pack_codes(const uint8_t* codes, int64_t n, int bits, uint32_t* planes, int nthreads);

// planes[bits * words] -> codes[0..n).
void unpack_codes(const uint32_t* planes, int64_t n, int bits, uint8_t* codes, int nthreads);

// acc[j] += (signs bit j ? -1 : 1) * (coef * q_j), q_j the code in `planes`, float32,
// every product rounded on its own (the reference's order). signs may be null (all
// positive). coef = weight * scale / (2^bits - 1), computed by the caller in float32.
void dequant_accumulate(float* acc, int64_t n, const uint32_t* planes, const uint32_t* signs, int bits,
                        float coef, int nthreads);

// One row of a layer table for dequant_accumulate_layers: layer r adds into
// acc[acc_off, acc_off + n), from planes at byte data_off of the payload (its sign map right
// after them, bits * 4 * words(n) bytes on), with coefs[r].
struct LayerRow {
  int64_t acc_off, n, bits, data_off;
};
static_assert(sizeof(LayerRow) == 32, "rows are an int64 (nrows, 4) tensor");

// dequant_accumulate for many layers of one payload in one call (the server's aggregation
// of an upload): rows checked by the caller (disjoint, ascending acc ranges; planes in the
// payload; 4-byte-aligned offsets). Work is split over threads across layers.
void dequant_accumulate_layers(float* acc, const uint8_t* payload, const LayerRow* rows, int64_t nrows,
                               const float* coefs, int nthreads);

// ---- serial chunk kernels, per ISA (a chunk starts at a multiple of 32 elements;
// `words` is the plane stride in words, planes/signs already point at the chunk's first word) ----
// The three chunk kernels, declared once per ISA namespace below (the same signatures in each).
#define FEDMPQ_PACK_CHUNK_KERNELS                                                                  \
  uint32_t pack_codes(const uint8_t* codes, int64_t n, int bits, uint32_t* planes, int64_t words); \
  void unpack_codes(const uint32_t* planes, int64_t words, int64_t n, int bits, uint8_t* codes);   \
  void dequant_accumulate(float* acc, int64_t n, const uint32_t* planes, int64_t words, const uint32_t* signs, int bits, \
                          float coef);
namespace portable {
FEDMPQ_PACK_CHUNK_KERNELS
}  // namespace portable
namespace avx2 {
#if defined(FEDMPQ_HAVE_X86)
FEDMPQ_PACK_CHUNK_KERNELS
#else
// Without an x86 build (aarch64, say) use_avx2() is false, but the dispatch sites still name
// these: they forward to the portable code instead of leaving undefined symbols that stop
// the module from loading.
using portable::dequant_accumulate;
using portable::pack_codes;
using portable::unpack_codes;
#endif
}  // namespace avx2
// AVX2 + GFNI: 128 codes at a time through the 8x8 bit-matrix transpose of
// gf2p8affineqb (pack_avx2.cpp, functions compiled for that target); the rest of a chunk
// goes to avx2::. Used for widths of kGfniMinBits and up, where it beats one movemask per
// plane per 32 codes (2^20 codes, one thread, 2 bits: packing 41 -> 28 us, unpacking 36 ->
// 30; at 1 bit, the sign maps, it does not: unpacking 28 -> 30).
namespace gfni {
constexpr int kGfniMinBits = 2;
#if defined(FEDMPQ_HAVE_X86)
FEDMPQ_PACK_CHUNK_KERNELS
#else
using avx2::dequant_accumulate;  // (the portable code, as above)
using avx2::pack_codes;
using avx2::unpack_codes;
#endif
}  // namespace gfni
#undef FEDMPQ_PACK_CHUNK_KERNELS

}  // namespace fedmpq::cpu
