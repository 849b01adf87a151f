#include "cpu/pack.h"

#include <vector>

#include "common/bitmap.h"

#include "cpu/cpu_features.h"
#include "cpu/parallel.h"

namespace fedmpq::cpu {

namespace portable {

uint32_t pack_codes(const uint8_t* codes, int64_t n, int bits, uint32_t* planes, int64_t words) {
  uint32_t seen = 0;
  for (int64_t w = 0; w * 32 < n; ++w) {
    const int64_t i0 = w * 32, cnt = n - i0 < 32 ? n - i0 : 32;
    for (int p = 0; p < bits; ++p) {
      const int bit = bits - 1 - p;
      uint32_t word = 0;
      for (int64_t k = 0; k < cnt; ++k) word |= static_cast<uint32_t>((codes[i0 + k] >> bit) & 1u) << k;
      planes[p * words + w] = word;
    }
    for (int64_t k = 0; k < cnt; ++k) seen |= codes[i0 + k];
  }
  return seen;
}

void unpack_codes(const uint32_t* planes, int64_t words, int64_t n, int bits, uint8_t* codes) {
  for (int64_t w = 0; w * 32 < n; ++w) {
    const int64_t i0 = w * 32, cnt = n - i0 < 32 ? n - i0 : 32;
    for (int64_t k = 0; k < cnt; ++k) {
      uint32_t q = 0;
      for (int p = 0; p < bits; ++p) q = (q << 1) | ((planes[p * words + w] >> k) & 1u);
      codes[i0 + k] = static_cast<uint8_t>(q);
    }
  }
}

void dequant_accumulate(float* acc, int64_t n, const uint32_t* planes, int64_t words, const uint32_t* signs,
                        int bits, float coef) {
  for (int64_t w = 0; w * 32 < n; ++w) {
    const int64_t i0 = w * 32, cnt = n - i0 < 32 ? n - i0 : 32;
    const uint32_t sw = signs ? signs[w] : 0u;
    for (int64_t k = 0; k < cnt; ++k) {
      uint32_t q = 0;
      for (int p = 0; p < bits; ++p) q = (q << 1) | ((planes[p * words + w] >> k) & 1u);
      const float v = coef * static_cast<float>(q);
      acc[i0 + k] += ((sw >> k) & 1u) ? -v : v;
    }
  }
}

}  // namespace portable


namespace {
// The chunk kernels' instruction set for `bits`, read once per call (before any thread starts).
enum class Path { Portable, Avx2, Gfni };
Path path_for(int bits, bool gfni, bool avx2) {
  return gfni && bits >= gfni::kGfniMinBits ? Path::Gfni : avx2 ? Path::Avx2 : Path::Portable;
}
Path path_for(int bits) { return path_for(bits, use_gfni(), use_avx2()); }

uint32_t pack_chunk(Path v, const uint8_t* codes, int64_t n, int bits, uint32_t* planes, int64_t words) {
  switch (v) {
    case Path::Gfni: return gfni::pack_codes(codes, n, bits, planes, words);
    case Path::Avx2: return avx2::pack_codes(codes, n, bits, planes, words);
    default: return portable::pack_codes(codes, n, bits, planes, words);
  }
}

void unpack_chunk(Path v, const uint32_t* planes, int64_t words, int64_t n, int bits, uint8_t* codes) {
  switch (v) {
    case Path::Gfni: return gfni::unpack_codes(planes, words, n, bits, codes);
    case Path::Avx2: return avx2::unpack_codes(planes, words, n, bits, codes);
    default: return portable::unpack_codes(planes, words, n, bits, codes);
  }
}

void dequant_chunk(Path v, float* acc, int64_t n, const uint32_t* planes, int64_t words, const uint32_t* signs,
                   int bits, float coef) {
  switch (v) {
    case Path::Gfni: return gfni::dequant_accumulate(acc, n, planes, words, signs, bits, coef);
    case Path::Avx2: return avx2::dequant_accumulate(acc, n, planes, words, signs, bits, coef);
    default: return portable::dequant_accumulate(acc, n, planes, words, signs, bits, coef);
  }
}
}  // namespace

uint32_t pack_codes(const uint8_t* codes, int64_t n, int bits, uint32_t* planes, int nthreads) {
  const Path v = path_for(bits);
  const int64_t words = bitmap_words(n);
  return parallel_reduce_words<uint32_t>(
      n, threads_for(nthreads, n), 0u,
      [&](int64_t b, int64_t e) { return pack_chunk(v, codes + b, e - b, bits, planes + b / 32, words); },
      [](uint32_t a, uint32_t b) { return a | b; });
}

void unpack_codes(const uint32_t* planes, int64_t n, int bits, uint8_t* codes, int nthreads) {
  const Path v = path_for(bits);
  const int64_t words = bitmap_words(n);
  parallel_for_words(n, threads_for(nthreads, n),
                     [&](int64_t b, int64_t e) { unpack_chunk(v, planes + b / 32, words, e - b, bits, codes + b); });
}

void dequant_accumulate(float* acc, int64_t n, const uint32_t* planes, const uint32_t* signs, int bits,
                        float coef, int nthreads) {
  const Path v = path_for(bits);
  const int64_t words = bitmap_words(n);
  parallel_for_words(n, threads_for(nthreads, n), [&](int64_t b, int64_t e) {
    dequant_chunk(v, acc + b, e - b, planes + b / 32, words, signs ? signs + b / 32 : nullptr, bits, coef);
  });
}

void dequant_accumulate_layers(float* acc, const uint8_t* payload, const LayerRow* rows, int64_t nrows,
                               const float* coefs, int nthreads) {
  // Chunks of whole words, so threads never share a word, and large enough (64K elements)
  // that scheduling costs nothing; one list over all layers balances big and small ones.
  constexpr int64_t kChunk = int64_t(1) << 16;
  struct Chunk {
    int64_t row, begin, end;
  };
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t r = 0; r < nrows; ++r) {
    for (int64_t b = 0; b < rows[r].n; b += kChunk) chunks.push_back({r, b, b + kChunk < rows[r].n ? b + kChunk : rows[r].n});
    total += rows[r].n;
  }
  const bool gfni = use_gfni(), avx2 = use_avx2();  // once: the path of each row follows from its width
  auto run = [&](const Chunk& c) {
    const LayerRow& L = rows[c.row];
    const int64_t words = bitmap_words(L.n);
    const uint32_t* planes = reinterpret_cast<const uint32_t*>(payload + L.data_off);
    const uint32_t* signs = planes + L.bits * words;
    float* a = acc + L.acc_off + c.begin;
    const int64_t w0 = c.begin / 32, cnt = c.end - c.begin;
    const int bits = static_cast<int>(L.bits);
    dequant_chunk(path_for(bits, gfni, avx2), a, cnt, planes + w0, words, signs + w0, bits, coefs[c.row]);
  };
  auto task = [&](int64_t i) { run(chunks[static_cast<size_t>(i)]); };
  run_tasks(static_cast<int64_t>(chunks.size()), threads_for(nthreads, total), task);
}

}  // namespace fedmpq::cpu
