#include "cpu/bitplane.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/cpu_features.h"
#include "cpu/fake_quant.h"  // absmax
#include "cpu/parallel.h"

namespace fedmpq::cpu {

namespace {

inline uint32_t f2u(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}
inline float u2f(uint32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

inline float levels_f(int bits) { return static_cast<float>((1u << bits) - 1u); }

inline int64_t chunk_len(int64_t i0, int64_t n) { return n - i0 < 32 ? n - i0 : 32; }

// decode_r of every code byte, as float32 (exact: |r| <= 2^14 + 1).
struct DecodeTable {
  float v[256];
  DecodeTable() {
    for (int code = 0; code < 256; ++code) {
      const int c = (code >> 3) & 0xF;
      const int mag = c > 0 ? 1 << (c - 1) : 0;
      const int det = (code >> 7) & 1 ? -mag : mag;
      const int st = code & 3;
      v[code] = static_cast<float>(det + (st == 1 ? 1 : (st == 2 ? -1 : 0)));
    }
  }
};
const DecodeTable kDecode;

constexpr float kTiny = 0x1p-100f;        // reference.TINY
constexpr uint32_t kMantSqrt2 = 0x3504F4u;  // reference.MANT_SQRT2

using Step = BitplaneStep;

// a_j = sigma_j * (G_j * k) and q_j of the chunk [i0, i0 + cnt); sw its sign word.
inline void load_chunk(const Step& c, const float* grad, const uint8_t* codes, uint32_t sw, int64_t i0, int64_t cnt,
                       float* a, int* q) {
  for (int64_t t = 0; t < cnt; ++t) {
    const float v = grad[i0 + t] * c.k;
    a[t] = ((sw >> t) & 1u) ? -v : v;
    q[t] = codes[i0 + t];
  }
}

// d_ij = (mu * (f32(r_ij) * gs_prev)) + g_ij for plane i of the chunk.
inline void plane_d(const Step& c, int i, const float* a, const int* q, const uint8_t* mom_row, int64_t cnt,
                    float* d) {
  const int sh = c.N - 1 - i;
  const float pw = static_cast<float>(1 << sh);
  const float ci = c.coef[i];
  for (int64_t t = 0; t < cnt; ++t) {
    float gi = a[t] * pw;
    gi = ((q[t] >> sh) & 1) ? gi + ci : gi;
    const float m = kDecode.v[mom_row[t]] * c.gs_prev;
    d[t] = c.mu * m + gi;
  }
}

}  // namespace

namespace portable {

void binarize(const float* w, float inv, float L, uint8_t* codes, uint32_t* sign, int64_t b, int64_t e) {
  for (int64_t i0 = b; i0 < e; i0 += 32) {
    const int64_t cnt = chunk_len(i0, e);
    uint32_t sw = 0;
    for (int64_t t = 0; t < cnt; ++t) {
      const float v = w[i0 + t];
      const float qf = std::nearbyint(std::fabs(v) * inv);
      // min(q, L) -> uint8; a NaN (w not finite: the public function refuses it) gives 0, as torch casts it
      codes[i0 + t] = qf < L ? static_cast<uint8_t>(qf) : (qf >= L ? static_cast<uint8_t>(L) : 0);
      sw |= static_cast<uint32_t>(!(v > 0.0f)) << t;
    }
    sign[i0 / 32] = sw;
  }
}

void dequantize(const uint8_t* codes, const uint32_t* sign, float k, float* out, int64_t b, int64_t e) {
  for (int64_t i0 = b; i0 < e; i0 += 32) {
    const int64_t cnt = chunk_len(i0, e);
    const uint32_t sw = sign[i0 / 32];
    for (int64_t t = 0; t < cnt; ++t) {
      const float w = static_cast<float>(codes[i0 + t]) * k;
      out[i0 + t] = ((sw >> t) & 1u) ? -w : w;
    }
  }
}

double dequantize_backward(const float* grad, const uint8_t* codes, const uint32_t* sign, int64_t b, int64_t e) {
  double acc = 0.0;
  for (int64_t i0 = b; i0 < e; i0 += 32) {
    const int64_t cnt = chunk_len(i0, e);
    const uint32_t sw = sign[i0 / 32];
    for (int64_t t = 0; t < cnt; ++t) {
      const double g = static_cast<double>(grad[i0 + t]) * static_cast<double>(codes[i0 + t]);  // exact
      acc += ((sw >> t) & 1u) ? -g : g;
    }
  }
  return acc;
}

// Pass 1: the max over the planes and elements of [b, e) of the |d| bit patterns (integer
// order is float order for non-negative floats, and NaN patterns sort above +inf, so a NaN
// anywhere gives a NaN pattern and an inf an inf pattern: the non-finite flag, exactly).
uint32_t step_max_bits(const Step& c, const float* grad, const uint8_t* codes, const uint32_t* sign,
                       const uint8_t* mom, int64_t b, int64_t e) {
  float a[32], d[32];
  int q[32];
  uint32_t m = 0;
  for (int64_t i0 = b; i0 < e; i0 += 32) {
    const int64_t cnt = chunk_len(i0, e);
    load_chunk(c, grad, codes, sign[i0 / 32], i0, cnt, a, q);
    for (int i = 0; i < c.N; ++i) {
      plane_d(c, i, a, q, mom + i * c.n + i0, cnt, d);
      for (int64_t t = 0; t < cnt; ++t) {
        const uint32_t ab = f2u(d[t]) & 0x7fffffffu;
        m = ab > m ? ab : m;
      }
    }
  }
  return m;
}

// Pass 2: steps 3-7 on the elements of [b, e) (b a multiple of 32: whole sign words).
void step_update(const Step& c, const float* grad, uint8_t* codes, uint32_t* sign, uint8_t* mom, int64_t b,
                 int64_t e) {
  float a[32], d[32], d0[32], p[32];
  int q[32], R[32];
  uint8_t last[32];  // the LSB plane's codes, before the stochastic part
  const int N = c.N;
  for (int64_t i0 = b; i0 < e; i0 += 32) {
    const int64_t cnt = chunk_len(i0, e);
    const uint32_t sw = sign[i0 / 32];
    load_chunk(c, grad, codes, sw, i0, cnt, a, q);
    for (int64_t t = 0; t < cnt; ++t) {
      p[t] = 0.0f;
      R[t] = 0;
    }
    for (int i = 0; i < N; ++i) {
      const int sh = N - 1 - i;
      uint8_t* row = mom + i * c.n + i0;
      plane_d(c, i, a, q, row, cnt, d);  // reads this plane's old codes before they are overwritten below
      if (i == 0)
        for (int64_t t = 0; t < cnt; ++t) d0[t] = d[t];
      for (int64_t t = 0; t < cnt; ++t) {
        const float x = (std::fabs(d[t]) / c.g_s) * c.lr;
        int det = 0;
        uint8_t code = 0;
        if (x >= kTiny) {  // false for NaN
          const uint32_t xb = f2u(x);
          const int E = static_cast<int>((xb >> 23) & 0xFFu) - 127;
          const int ex = E + ((xb & 0x7FFFFFu) >= kMantSqrt2 ? 1 : 0) + sh;
          if (ex < 0) {
            p[t] = p[t] + u2f(static_cast<uint32_t>(ex + 127) << 23);  // 2^ex, ex >= -100: normal
          } else if (ex <= N) {
            const bool neg = !(d[t] > 0.0f);
            det = neg ? -(1 << ex) : (1 << ex);
            code = static_cast<uint8_t>((neg ? 0x80u : 0u) | (static_cast<uint32_t>(ex + 1) << 3));
          }
        }
        R[t] += det * (1 << sh);
        if (i == N - 1)
          last[t] = code;
        else
          row[t] = code;
      }
    }
    uint32_t nw = 0;
    uint8_t* last_row = mom + (N - 1) * c.n + i0;
    for (int64_t t = 0; t < cnt; ++t) {
      const float pt = p[t] < 1.0f ? p[t] : 1.0f;
      const uint32_t j = static_cast<uint32_t>(i0 + t);
      const float u = static_cast<float>(uniform_bits(c.key, j)) * 0x1p-24f;
      int st = 0;
      uint8_t stc = 0;
      if (u < pt) {
        st = d0[t] > 0.0f ? 1 : -1;
        stc = st > 0 ? 1 : 2;
      }
      last_row[t] = static_cast<uint8_t>(last[t] | stc);
      const int Rt = R[t] + st;  // the LSB plane's weight is 1
      const float v = static_cast<float>(q[t]) - static_cast<float>(Rt) * c.step;
      const float qn = std::nearbyint(v);  // default rounding mode: half to even
      const bool flip = qn < 0.0f;
      const float aq = std::fabs(qn);
      // min(|q|, L) -> uint8 (v is finite: step, q and R are; a NaN would give 0, as torch casts it)
      const uint8_t out = aq < c.L ? static_cast<uint8_t>(aq) : (aq >= c.L ? static_cast<uint8_t>(c.L) : 0);
      codes[i0 + t] = out;
      nw |= static_cast<uint32_t>(((sw >> t) & 1u) ^ (flip ? 1u : 0u)) << t;
    }
    sign[i0 / 32] = nw;  // bits past n are zero, as the reference's packed bitmap
  }
}

}  // namespace portable

float binarize(const float* w, int64_t n, int bits, uint8_t* codes, uint32_t* sign, int nthreads) {
  const float s = absmax(w, n, nthreads);
  const float L = levels_f(bits);
  const float inv = s > 0.0f ? L / s : 0.0f;
  const bool v = use_avx2();
  parallel_for_words(n, threads_for(nthreads, n), [&](int64_t b, int64_t e) {
    if (v)
      avx2::binarize(w, inv, L, codes, sign, b, e);
    else
      portable::binarize(w, inv, L, codes, sign, b, e);
  });
  return s;
}

void dequantize(const uint8_t* codes, const uint32_t* sign, int64_t n, int bits, float scale, float* out,
                int nthreads) {
  const float k = scale / levels_f(bits);
  const bool v = use_avx2();
  parallel_for_words(n, threads_for(nthreads, n), [&](int64_t b, int64_t e) {
    if (v)
      avx2::dequantize(codes, sign, k, out, b, e);
    else
      portable::dequantize(codes, sign, k, out, b, e);
  });
}

float dequantize_backward(const float* grad, const uint8_t* codes, const uint32_t* sign, int64_t n, int bits,
                          int nthreads) {
  const bool v = use_avx2();
  const double sum = parallel_reduce_words<double>(
      n, threads_for(nthreads, n), 0.0,
      [&](int64_t b, int64_t e) {
        return v ? avx2::dequantize_backward(grad, codes, sign, b, e)
                 : portable::dequantize_backward(grad, codes, sign, b, e);
      },
      [](double x, double y) { return x + y; });
  return static_cast<float>(sum / static_cast<double>((1u << bits) - 1u));
}

namespace {

using Counts = std::array<int64_t, 8>;

// Set bits k < bits of codes[b, e), in c[k]. Eight codes a 64-bit word: bit k of every code
// is added into its own byte lane of lane[k] (3 ops per plane per 8 codes, against 8 shifts,
// masks and adds per code), and a lane, which holds at most 255, is folded into the totals
// every 255 words.
Counts count_bits(const uint8_t* codes, int64_t b, int64_t e, int bits) {
  constexpr uint64_t kOnes = 0x0101010101010101ull;
  constexpr uint64_t kEvenBytes = 0x00FF00FF00FF00FFull;
  Counts c{};
  int64_t j = b;
  while (e - j >= 8) {
    uint64_t lane[8] = {};
    const int64_t words = std::min<int64_t>((e - j) / 8, 255);
    for (int64_t w = 0; w < words; ++w, j += 8) {
      uint64_t v;
      std::memcpy(&v, codes + j, 8);
      for (int k = 0; k < bits; ++k) lane[k] += (v >> k) & kOnes;
    }
    for (int k = 0; k < bits; ++k) {
      // bytes to four 16-bit sums (<= 510 each), then their total (<= 2040) in the top 16 bits
      const uint64_t pairs = (lane[k] & kEvenBytes) + ((lane[k] >> 8) & kEvenBytes);
      c[k] += static_cast<int64_t>((pairs * 0x0001000100010001ull) >> 48);
    }
  }
  for (; j < e; ++j)
    for (int k = 0; k < bits; ++k) c[k] += (codes[j] >> k) & 1u;
  return c;
}

}  // namespace

void plane_popcounts(const uint8_t* codes, int64_t n, int bits, int64_t* out, int nthreads) {
  Counts zero{};
  const Counts total = parallel_reduce_words<Counts>(
      n, threads_for(nthreads, n), zero, [&](int64_t b, int64_t e) { return count_bits(codes, b, e, bits); },
      [](Counts x, const Counts& y) {
        for (int k = 0; k < 8; ++k) x[k] += y[k];
        return x;
      });
  for (int i = 0; i < bits; ++i) out[i] = total[bits - 1 - i];  // out[0]: the MSB plane, bit bits-1
}

float bitplane_step(uint8_t* codes, uint32_t* sign, uint8_t* mom, float* gs, const float* grad, const float* coef,
                    float scale, int64_t n, int bits, float lr, float momentum, uint32_t key, int nthreads) {
  Step c{};
  c.N = bits;
  c.n = n;
  c.L = levels_f(bits);
  c.k = scale / c.L;
  c.mu = momentum;
  c.gs_prev = *gs;
  c.lr = lr;
  c.key = key;
  for (int i = 0; i < bits; ++i) c.coef[i] = coef[i];
  const int nt = threads_for(nthreads, n * bits);
  // Work grows with bits: tasks of ~kGrain element-planes (whole words; the result does not
  // depend on the split: a max and element-wise updates).
  const int64_t grain = std::max<int64_t>(32, (kGrain / bits) & ~int64_t(31));
  const bool v = use_avx2();

  // Pass 1: g_s = max |d| / L.
  const uint32_t mb = parallel_reduce_words<uint32_t>(
      n, nt, 0u,
      [&](int64_t b, int64_t e) {
        return v ? avx2::step_max_bits(c, grad, codes, sign, mom, b, e)
                 : portable::step_max_bits(c, grad, codes, sign, mom, b, e);
      },
      [](uint32_t x, uint32_t y) { return x > y ? x : y; }, grain);
  const float g_s = u2f(mb) / c.L;
  if (!std::isfinite(g_s)) return g_s;  // skipped: nothing written
  if (!(g_s > 0.0f)) {                    // g_s == 0: codes and sign unchanged, mom <- 0, gs <- 0
    if (n > 0) std::memset(mom, 0, static_cast<size_t>(n) * static_cast<size_t>(bits));
    *gs = 0.0f;
    return g_s;
  }
  c.g_s = g_s;
  c.step = c.lr * g_s;
  // lr * g_s overflowing float32 (a huge lr): skipped as well, status +inf
  if (!std::isfinite(c.step)) return std::numeric_limits<float>::infinity();

  // Pass 2: per element, whole sign words per thread.
  parallel_for_words(n, nt, [&](int64_t b, int64_t e) {
    if (v)
      avx2::step_update(c, grad, codes, sign, mom, b, e);
    else
      portable::step_update(c, grad, codes, sign, mom, b, e);
  }, grain);
  *gs = g_s;
  return g_s;
}

}  // namespace fedmpq::cpu
