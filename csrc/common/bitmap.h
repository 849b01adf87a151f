// Sizes shared by every op family, host code only. A bitmap of n elements is ceil(n/32)
// little-endian uint32 words, bit i%32 of word i/32 = element i (fedmpq_kernels'
// fakequant/reference.py and pack/reference.py state it in full).
#pragma once
#include <cstdint>

namespace fedmpq {

// Number of uint32 words in a bitmap of n >= 0 elements (no n + 31: it cannot overflow).
inline int64_t bitmap_words(int64_t n) { return n / 32 + (n % 32 != 0); }

// The most elements any kernel accepts (the bindings check it once): byte counts of
// buffers and bitmaps, and every index computed from n, then stay far from int64 overflow.
constexpr int64_t kMaxElems = int64_t(1) << 56;

}  // namespace fedmpq
