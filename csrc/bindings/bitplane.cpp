// Bit-plane training's bindings: _C.cpu.{binarize, dequantize, dequantize_backward,
// plane_popcounts, bitplane_step}. Each re-checks every size and pointer it is given
// (bindings/common.h) before a kernel runs, and releases the GIL around the kernel.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "bindings/common.h"
#include "cpu/bitplane.h"

namespace py = pybind11;

namespace fedmpq::bindings {

namespace {
void check_code_bits(int bits) {
  require(bits >= 1 && bits <= 8, "bits must be in 1..8, got " + std::to_string(bits));
}

// A sign bitmap of n elements: required (when n > 0), 4-byte aligned, long enough.
void check_sign(uintptr_t sign, int64_t nbytes, int64_t n) { check_bitmap("sign", sign, nbytes, n, n > 0); }

// Two buffers written or read by one kernel call: disjoint (empty ones never clash).
void check_disjoint(const char* a_name, uintptr_t a, int64_t a_bytes, const char* b_name, uintptr_t b,
                    int64_t b_bytes) {
  if (a_bytes <= 0 || b_bytes <= 0) return;
  const uintptr_t ab = static_cast<uintptr_t>(a_bytes), bb = static_cast<uintptr_t>(b_bytes);  // < 2^60
  require(a + ab <= b || b + bb <= a, std::string(a_name) + " and " + std::string(b_name) + " overlap");
}
}  // namespace

void bind_bitplane(py::module_& m) {
  py::module_ cpu = m.def_submodule("cpu");  // the submodule bindings.cpp made

  cpu.def(
      "binarize",
      [](uintptr_t w, int64_t n, int bits, uintptr_t codes, int64_t codes_cap, uintptr_t sign, int64_t sign_nbytes,
         int nthreads) {
        check_elems("w", w, n, n, 4);
        check_elems("codes", codes, n, codes_cap, 1);
        check_code_bits(bits);
        check_sign(sign, sign_nbytes, n);
        check_disjoint("w", w, 4 * n, "codes", codes, n);
        check_disjoint("w", w, 4 * n, "sign", sign, 4 * bitmap_words(n));
        check_disjoint("codes", codes, n, "sign", sign, 4 * bitmap_words(n));
        NoGil nogil;
        return fedmpq::cpu::binarize(ptr<const float>(w), n, bits, ptr<uint8_t>(codes), ptr<uint32_t>(sign), nthreads);
      },
      py::arg("w"), py::arg("n"), py::arg("bits"), py::arg("codes"), py::arg("codes_cap"), py::arg("sign"),
      py::arg("sign_nbytes"), py::arg("nthreads"),
      "n contiguous float32 -> codes (n bytes) and the sign bitmap; returns the scale max|w|.");

  cpu.def(
      "dequantize",
      [](uintptr_t codes, int64_t n, uintptr_t sign, int64_t sign_nbytes, double scale, int bits, uintptr_t out,
         int64_t out_cap, int nthreads) {
        check_elems("codes", codes, n, n, 1);
        check_sign(sign, sign_nbytes, n);
        check_code_bits(bits);
        check_elems("out", out, n, out_cap, 4);
        check_disjoint("codes", codes, n, "out", out, 4 * n);
        check_disjoint("sign", sign, 4 * bitmap_words(n), "out", out, 4 * n);
        const float s = static_cast<float>(scale);  // a float32 value handed over as a double: exact
        NoGil nogil;
        fedmpq::cpu::dequantize(ptr<const uint8_t>(codes), ptr<const uint32_t>(sign), n, bits, s, ptr<float>(out),
                                nthreads);
      },
      py::arg("codes"), py::arg("n"), py::arg("sign"), py::arg("sign_nbytes"), py::arg("scale"), py::arg("bits"),
      py::arg("out"), py::arg("out_cap"), py::arg("nthreads"),
      "out[j] = sigma_j * (q_j * (scale / (2^bits - 1))), float32.");

  cpu.def(
      "dequantize_backward",
      [](uintptr_t grad, int64_t n, uintptr_t codes, uintptr_t sign, int64_t sign_nbytes, int bits, int nthreads) {
        check_elems("grad", grad, n, n, 4);
        check_elems("codes", codes, n, n, 1);
        check_sign(sign, sign_nbytes, n);
        check_code_bits(bits);
        NoGil nogil;
        return fedmpq::cpu::dequantize_backward(ptr<const float>(grad), ptr<const uint8_t>(codes),
                                                ptr<const uint32_t>(sign), n, bits, nthreads);
      },
      py::arg("grad"), py::arg("n"), py::arg("codes"), py::arg("sign"), py::arg("sign_nbytes"), py::arg("bits"),
      py::arg("nthreads"), "The scale gradient: (sum sigma_j q_j grad_j in float64) / (2^bits - 1), as float32.");

  cpu.def(
      "plane_popcounts",
      [](uintptr_t codes, int64_t n, int bits, uintptr_t out, int64_t out_len, int nthreads) {
        check_elems("codes", codes, n, n, 1);
        check_code_bits(bits);
        check_elems("out", out, bits, out_len, 8);
        NoGil nogil;
        fedmpq::cpu::plane_popcounts(ptr<const uint8_t>(codes), n, bits, ptr<int64_t>(out), nthreads);
      },
      py::arg("codes"), py::arg("n"), py::arg("bits"), py::arg("out"), py::arg("out_len"), py::arg("nthreads"),
      "out[i] (int64) = number of codes with bit bits-1-i set.");

  cpu.def(
      "bitplane_step",
      [](uintptr_t codes, int64_t n, uintptr_t sign, int64_t sign_nbytes, uintptr_t mom, int64_t mom_len, uintptr_t gs,
         uintptr_t grad, uintptr_t coef, int64_t coef_len, double scale, int bits, double lr, double momentum,
         int64_t key, int nthreads) {
        check_elems("codes", codes, n, n, 1);
        require(n < (int64_t(1) << 32), "a layer of 2^32 weights or more is not supported");
        check_code_bits(bits);
        check_sign(sign, sign_nbytes, n);
        check_elems("mom", mom, int64_t(bits) * n, mom_len, 1);  // n < 2^32: no overflow
        check_elems("gs", gs, 1, 1, 4);
        check_elems("grad", grad, n, n, 4);
        check_elems("coef", coef, bits, coef_len, 4);
        // An lr beyond float32 is the reference's float32 +inf: the kernel skips the step
        require(std::isfinite(lr) && lr > 0.0, "lr must be finite and > 0");
        require(momentum >= 0.0 && momentum < 1.0, "momentum must be in [0, 1)");
        require(key >= 0 && key <= int64_t(0xFFFFFFFF), "key must be a uint32");
        // Everything written (codes, sign, mom, gs) is disjoint from everything else it reads
        // element by element (grad) and from each other; scale, gs and coef are read first.
        const int64_t sb = 4 * bitmap_words(n), mb = int64_t(bits) * n;
        check_disjoint("codes", codes, n, "sign", sign, sb);
        check_disjoint("codes", codes, n, "mom", mom, mb);
        check_disjoint("codes", codes, n, "gs", gs, 4);
        check_disjoint("codes", codes, n, "grad", grad, 4 * n);
        check_disjoint("sign", sign, sb, "mom", mom, mb);
        check_disjoint("sign", sign, sb, "gs", gs, 4);
        check_disjoint("sign", sign, sb, "grad", grad, 4 * n);
        check_disjoint("mom", mom, mb, "gs", gs, 4);
        check_disjoint("mom", mom, mb, "grad", grad, 4 * n);
        check_disjoint("gs", gs, 4, "grad", grad, 4 * n);
        const float s = static_cast<float>(scale);
        // The reference's float32 roundings; a double at or beyond float32's largest value plus
        // half an ulp rounds to +inf (spelled out: that conversion is undefined in C++)
        const float lr32 = lr >= 0x1.ffffffp127 ? std::numeric_limits<float>::infinity() : static_cast<float>(lr);
        const float mu32 = static_cast<float>(momentum);
        NoGil nogil;
        return fedmpq::cpu::bitplane_step(ptr<uint8_t>(codes), ptr<uint32_t>(sign), ptr<uint8_t>(mom), ptr<float>(gs),
                                          ptr<const float>(grad), ptr<const float>(coef), s, n, bits, lr32, mu32,
                                          static_cast<uint32_t>(key), nthreads);
      },
      py::arg("codes"), py::arg("n"), py::arg("sign"), py::arg("sign_nbytes"), py::arg("mom"), py::arg("mom_len"),
      py::arg("gs"), py::arg("grad"), py::arg("coef"), py::arg("coef_len"), py::arg("scale"), py::arg("bits"),
      py::arg("lr"), py::arg("momentum"), py::arg("key"), py::arg("nthreads"),
      "The fused bit-plane step, in place on codes, sign, mom (bits*n, plane-major) and gs (one float32); "
      "returns g_s (not finite: the step was skipped and nothing written).");
}

}  // namespace fedmpq::bindings
