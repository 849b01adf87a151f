// Bit-plane training's bindings: _C.cpu.{binarize, dequantize, dequantize_backward,
// plane_popcounts, plane_popcounts_layers, bitplane_step, bitplane_step_layers} and, when built
// with CUDA, the same in _C.cuda plus bitplane_workspace_words, dequantize_layers and
// dequantize_backward_layers. The *_layers entries are the
// op over a list of layers in one call (a model's optimizer step): every layer is checked
// before any kernel runs, then the layers' kernels run in order. Each re-checks every size and pointer it is given
// (bindings/common.h) before a kernel runs; the CPU ones release the GIL around the kernel
// (the CUDA ones only queue launches).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/common.h"
#include "cpu/bitplane.h"
#ifdef FEDMPQ_WITH_CUDA
#include "cuda/bitplane.h"
#endif

namespace py = pybind11;

namespace fedmpq::bindings {

namespace {
void check_code_bits(int bits) {
  FEDMPQ_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got " + std::to_string(bits));
}

// A sign bitmap of n elements: required (when n > 0), 4-byte aligned, long enough.
void check_sign(uintptr_t sign, int64_t nbytes, int64_t n) { check_bitmap("sign", sign, nbytes, n, n > 0); }

// The step's scalar arguments, as both backends take them: checked as the kernels use them,
// in float32 (an lr at or below 2^-150 would be 0, a momentum at or above 1 - 2^-25 exactly 1).
void check_step_scalars(double lr, double momentum) {
  // An lr beyond float32 is the reference's float32 +inf: the kernel skips the step
  FEDMPQ_CHECK(std::isfinite(lr) && lr > 0x1p-150, "lr must be finite and > 0 (above 2^-150: float32 rounds less to 0)");
  FEDMPQ_CHECK(momentum >= 0.0 && momentum < 1.0 - 0x1p-25,
               "momentum must be in [0, 1) (below 1 - 2^-25: float32 rounds more to 1)");
}

// A buffer the step reads (coef; on CUDA also the scale and the key, read by every block of
// both launches) apart from the four it writes.
void check_written_apart(const char* name, uintptr_t p, int64_t bytes, uintptr_t codes, int64_t n, uintptr_t sign,
                         uintptr_t mom, int bits, uintptr_t gs) {
  check_disjoint(name, p, bytes, "codes", codes, n);
  check_disjoint(name, p, bytes, "sign", sign, 4 * bitmap_words(n));
  check_disjoint(name, p, bytes, "mom", mom, int64_t(bits) * n);
  check_disjoint(name, p, bytes, "gs", gs, 4);
}

// Two inputs of one layer hold the same number of elements: the second buffer's own length,
// not the first's count taken on trust.
void check_same_count(const char* a, int64_t a_len, const char* b, int64_t b_len) {
  FEDMPQ_CHECK(a_len == b_len, std::string(a) + " has " + std::to_string(a_len) + " elements, " + b + " " +
                              std::to_string(b_len));
}

// The step's buffers (codes n, sign, mom bits * n, gs one float32, grad n float32 (grad_len,
// checked), coef bits float32), checked as the CPU kernel needs them: everything written
// (codes, sign, mom, gs) is disjoint from everything else it reads (grad, coef) and from each
// other.
void check_step_buffers(uintptr_t codes, int64_t n, uintptr_t sign, int64_t sign_nbytes, uintptr_t mom,
                        int64_t mom_len, uintptr_t gs, uintptr_t grad, int64_t grad_len, uintptr_t coef,
                        int64_t coef_len, int bits) {
  check_elems("codes", codes, n, n, 1);
  FEDMPQ_CHECK(n < (int64_t(1) << 32), "a layer of 2^32 weights or more is not supported");
  check_code_bits(bits);
  check_sign(sign, sign_nbytes, n);
  check_elems("mom", mom, int64_t(bits) * n, mom_len, 1);  // n < 2^32: no overflow
  check_elems("gs", gs, 1, 1, 4);
  check_same_count("grad", grad_len, "codes", n);
  check_elems("grad", grad, n, grad_len, 4);
  check_elems("coef", coef, bits, coef_len, 4);
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
  check_written_apart("coef", coef, 4 * int64_t(bits), codes, n, sign, mom, bits, gs);
}
// The step's status output (out, out_bytes): written by the kernels, so apart from every
// buffer of the layer, its scale and key included (0: none, the CPU's by-value scale).
void check_out_apart(uintptr_t out, int64_t out_bytes, uintptr_t codes, int64_t n, uintptr_t sign, uintptr_t mom,
                     int bits, uintptr_t gs, uintptr_t grad, uintptr_t coef, uintptr_t scale, uintptr_t key_ptr) {
  check_disjoint("out", out, out_bytes, "codes", codes, n);
  check_disjoint("out", out, out_bytes, "sign", sign, 4 * bitmap_words(n));
  check_disjoint("out", out, out_bytes, "mom", mom, int64_t(bits) * n);
  check_disjoint("out", out, out_bytes, "gs", gs, 4);
  check_disjoint("out", out, out_bytes, "grad", grad, 4 * n);
  check_disjoint("out", out, out_bytes, "coef", coef, 4 * int64_t(bits));
  if (scale != 0) check_disjoint("out", out, out_bytes, "scale", scale, 4);
  if (key_ptr != 0) check_disjoint("out", out, out_bytes, "key", key_ptr, 8);
}

// Runs check(), naming layer l in what it throws.
template <class F>
void in_layer(size_t l, F&& check) {
  try {
    check();
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument("layer " + std::to_string(l) + ": " + e.what());
  }
}

// One layer of plane_popcounts_layers: codes, n, bits; its counts go to out[offset..offset+bits),
// offset the bits of the layers before it. Returns the total (out's length needed).
using PopcountLayer = std::tuple<uintptr_t, int64_t, int>;
int64_t check_popcount_layers(const std::vector<PopcountLayer>& layers, uintptr_t out, int64_t out_len) {
  int64_t total = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& [codes, n, bits] = layers[l];
    in_layer(l, [&] {
      check_elems("codes", codes, n, n, 1);
      check_code_bits(bits);
    });
    total += bits;
  }
  check_elems("out", out, total, out_len, 8);
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& [codes, n, bits] = layers[l];
    in_layer(l, [&] { check_disjoint("out", out, 8 * total, "codes", codes, n); });
  }
  return total;
}

// One layer of bitplane_step_layers: codes, n, sign, sign_nbytes, mom, mom_len, gs, grad, grad_len,
// coef, coef_len, scale (the CPU: its value; CUDA: a device pointer), bits, key (and on CUDA
// key_ptr), as bitplane_step takes them.
using CpuStepLayer = std::tuple<uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, uintptr_t,
                                int64_t, uintptr_t, int64_t, double, int, int64_t>;
#ifdef FEDMPQ_WITH_CUDA
// One layer of dequantize_layers: codes, n, sign, sign_nbytes, scale, bits, out, out_cap; of
// dequantize_backward_layers: grad, n, codes, codes_len, sign, sign_nbytes, bits, out.
using CudaDequantLayer = std::tuple<uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int, uintptr_t, int64_t>;
using CudaDequantGradLayer = std::tuple<uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t, int, uintptr_t>;
using CudaStepLayer = std::tuple<uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, uintptr_t,
                                 int64_t, uintptr_t, int64_t, uintptr_t, int, int64_t, uintptr_t>;
#endif
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
      [](uintptr_t grad, int64_t n, uintptr_t codes, int64_t codes_len, uintptr_t sign, int64_t sign_nbytes, int bits,
         int nthreads) {
        check_elems("grad", grad, n, n, 4);
        check_same_count("grad", n, "codes", codes_len);
        check_elems("codes", codes, n, codes_len, 1);
        check_sign(sign, sign_nbytes, n);
        check_code_bits(bits);
        NoGil nogil;
        return fedmpq::cpu::dequantize_backward(ptr<const float>(grad), ptr<const uint8_t>(codes),
                                                ptr<const uint32_t>(sign), n, bits, nthreads);
      },
      py::arg("grad"), py::arg("n"), py::arg("codes"), py::arg("codes_len"), py::arg("sign"), py::arg("sign_nbytes"),
      py::arg("bits"), py::arg("nthreads"),
      "The scale gradient: (sum sigma_j q_j grad_j in float64) / (2^bits - 1), as float32.");

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
      "plane_popcounts_layers",
      [](const std::vector<PopcountLayer>& layers, uintptr_t out, int64_t out_len, int nthreads) {
        check_popcount_layers(layers, out, out_len);
        NoGil nogil;
        int64_t* o = ptr<int64_t>(out);
        for (const auto& [codes, n, bits] : layers) {
          fedmpq::cpu::plane_popcounts(ptr<const uint8_t>(codes), n, bits, o, nthreads);
          o += bits;
        }
      },
      py::arg("layers"), py::arg("out"), py::arg("out_len"), py::arg("nthreads"),
      "plane_popcounts of each layer (codes, n, bits), one call: the layers' counts back to back in out (int64).");

  cpu.def(
      "bitplane_step",
      [](uintptr_t codes, int64_t n, uintptr_t sign, int64_t sign_nbytes, uintptr_t mom, int64_t mom_len, uintptr_t gs,
         uintptr_t grad, int64_t grad_len, uintptr_t coef, int64_t coef_len, double scale, int bits, double lr,
         double momentum, int64_t key, int nthreads) {
        check_step_buffers(codes, n, sign, sign_nbytes, mom, mom_len, gs, grad, grad_len, coef, coef_len, bits);
        check_step_scalars(lr, momentum);
        FEDMPQ_CHECK(key >= 0 && key <= int64_t(0xFFFFFFFF), "key must be a uint32");
        const float s = static_cast<float>(scale);
        const float lr32 = f32_round(lr), mu32 = static_cast<float>(momentum);
        NoGil nogil;
        return fedmpq::cpu::bitplane_step(ptr<uint8_t>(codes), ptr<uint32_t>(sign), ptr<uint8_t>(mom), ptr<float>(gs),
                                          ptr<const float>(grad), ptr<const float>(coef), s, n, bits, lr32, mu32,
                                          static_cast<uint32_t>(key), nthreads);
      },
      py::arg("codes"), py::arg("n"), py::arg("sign"), py::arg("sign_nbytes"), py::arg("mom"), py::arg("mom_len"),
      py::arg("gs"), py::arg("grad"), py::arg("grad_len"), py::arg("coef"), py::arg("coef_len"), py::arg("scale"),
      py::arg("bits"), py::arg("lr"), py::arg("momentum"), py::arg("key"), py::arg("nthreads"),
      "The fused bit-plane step, in place on codes, sign, mom (bits*n, plane-major) and gs (one float32); "
      "returns g_s (not finite: the step was skipped and nothing written).");

  cpu.def(
      "bitplane_step_layers",
      [](const std::vector<CpuStepLayer>& layers, double lr, double momentum, uintptr_t out, int64_t out_len,
         int nthreads, bool check_only) {
        check_step_scalars(lr, momentum);
        const int64_t L = static_cast<int64_t>(layers.size());
        check_elems("out", out, L, out_len, 4);
        for (size_t l = 0; l < layers.size(); ++l) {
          const auto& [codes, n, sign, sign_nbytes, mom, mom_len, gs, grad, grad_len, coef, coef_len, scale, bits,
                       key] = layers[l];
          in_layer(l, [&] {
            check_step_buffers(codes, n, sign, sign_nbytes, mom, mom_len, gs, grad, grad_len, coef, coef_len, bits);
            FEDMPQ_CHECK(key >= 0 && key <= int64_t(0xFFFFFFFF), "key must be a uint32");
            // out is written after each layer: it must not be any layer's state or input
            check_out_apart(out, 4 * L, codes, n, sign, mom, bits, gs, grad, coef, 0, 0);
          });
        }
        if (check_only) return;
        const float lr32 = f32_round(lr), mu32 = static_cast<float>(momentum);
        NoGil nogil;
        float* o = ptr<float>(out);
        for (size_t l = 0; l < layers.size(); ++l) {
          const auto& [codes, n, sign, sign_nbytes, mom, mom_len, gs, grad, grad_len, coef, coef_len, scale, bits,
                       key] = layers[l];
          o[l] = fedmpq::cpu::bitplane_step(ptr<uint8_t>(codes), ptr<uint32_t>(sign), ptr<uint8_t>(mom), ptr<float>(gs),
                                            ptr<const float>(grad), ptr<const float>(coef), static_cast<float>(scale),
                                            n, bits, lr32, mu32, static_cast<uint32_t>(key), nthreads);
        }
      },
      py::arg("layers"), py::arg("lr"), py::arg("momentum"), py::arg("out"), py::arg("out_len"), py::arg("nthreads"),
      py::arg("check_only") = false,
      "bitplane_step on each layer in order, one call: layers are tuples (codes, n, sign, sign_nbytes, mom, mom_len, "
      "gs, grad, grad_len, coef, coef_len, scale, bits, key); out[l] (float32) = layer l's g_s. Every layer is checked "
      "before any is stepped; check_only: the checks alone (for a caller that then steps layer by layer).");

#ifdef FEDMPQ_WITH_CUDA
  // ---- CUDA: device pointers, launched on `stream` of `device` (which must be current) ----
  py::module_ cuda = m.def_submodule("cuda");
  // A reduction workspace (cuda/bitplane.h): at least bitplane_workspace_words(device) 4-byte
  // words on the device, 8-byte aligned (8-byte slots).
  auto check_workspace = [](uintptr_t ws, int64_t ws_words, int device) {
    FEDMPQ_CHECK(ws != 0 && ws % 8 == 0, "reduction workspace pointer is null or not 8-byte aligned");
    FEDMPQ_CHECK(ws_words >= fedmpq::cuda::bitplane_workspace_words(device), "reduction workspace is too small");
  };
  // One float32 on the device that a kernel reads or writes.
  auto check_scalar = [](const char* name, uintptr_t p) {
    FEDMPQ_CHECK(p != 0 && p % 4 == 0, std::string(name) + " pointer is null or not 4-byte aligned");
  };
  cuda.def(
      "bitplane_workspace_words", [](int device) { return fedmpq::cuda::bitplane_workspace_words(device); },
      py::arg("device"), "4-byte words of a reduction workspace for the bit-plane kernels on `device`.");
  cuda.def(
      "binarize",
      [=](uintptr_t w, int64_t n, int bits, uintptr_t codes, int64_t codes_cap, uintptr_t sign, int64_t sign_nbytes,
          uintptr_t scale, uintptr_t ws, int64_t ws_words, int device, uintptr_t stream) {
        check_elems("w", w, n, n, 4);
        check_elems("codes", codes, n, codes_cap, 1);
        check_code_bits(bits);
        check_sign(sign, sign_nbytes, n);
        check_scalar("scale", scale);
        check_disjoint("w", w, 4 * n, "codes", codes, n);
        check_disjoint("w", w, 4 * n, "sign", sign, 4 * bitmap_words(n));
        check_disjoint("codes", codes, n, "sign", sign, 4 * bitmap_words(n));
        // *scale is written (max|w|) and then read by every block of the second launch
        check_disjoint("scale", scale, 4, "w", w, 4 * n);
        check_disjoint("scale", scale, 4, "codes", codes, n);
        check_disjoint("scale", scale, 4, "sign", sign, 4 * bitmap_words(n));
        if (n > 0) check_workspace(ws, ws_words, device);
        fedmpq::cuda::binarize(ptr<const float>(w), n, bits, ptr<uint8_t>(codes), ptr<uint32_t>(sign),
                               ptr<float>(scale), ptr<unsigned>(ws), device, stream);
      },
      py::arg("w"), py::arg("n"), py::arg("bits"), py::arg("codes"), py::arg("codes_cap"), py::arg("sign"),
      py::arg("sign_nbytes"), py::arg("scale"), py::arg("workspace"), py::arg("workspace_words"), py::arg("device"),
      py::arg("stream"),
      "n contiguous float32 -> codes (n bytes), the sign bitmap and *scale = max|w| (one float32 on the device): "
      "two launches, no host synchronization.");
  // dequantize's and its backward's arguments, as the single-layer and the many-layer entries take them.
  auto check_dequantize = [=](uintptr_t codes, int64_t n, uintptr_t sign, int64_t sign_nbytes, uintptr_t scale,
                              int bits, uintptr_t out, int64_t out_cap) {
    check_elems("codes", codes, n, n, 1);
    check_sign(sign, sign_nbytes, n);
    check_code_bits(bits);
    check_scalar("scale", scale);
    check_elems("out", out, n, out_cap, 4);
    check_disjoint("codes", codes, n, "out", out, 4 * n);
    check_disjoint("sign", sign, 4 * bitmap_words(n), "out", out, 4 * n);
    check_disjoint("scale", scale, 4, "out", out, 4 * n);
  };
  auto check_dequantize_backward = [=](uintptr_t grad, int64_t n, uintptr_t codes, int64_t codes_len, uintptr_t sign,
                                       int64_t sign_nbytes, int bits, uintptr_t out) {
    check_elems("grad", grad, n, n, 4);
    check_same_count("grad", n, "codes", codes_len);
    check_elems("codes", codes, n, codes_len, 1);
    check_sign(sign, sign_nbytes, n);
    check_code_bits(bits);
    check_scalar("out", out);
  };
  cuda.def(
      "dequantize",
      [=](uintptr_t codes, int64_t n, uintptr_t sign, int64_t sign_nbytes, uintptr_t scale, int bits, uintptr_t out,
          int64_t out_cap, int device, uintptr_t stream) {
        check_dequantize(codes, n, sign, sign_nbytes, scale, bits, out, out_cap);
        fedmpq::cuda::dequantize(ptr<const uint8_t>(codes), ptr<const uint32_t>(sign), n, bits, ptr<const float>(scale),
                                 ptr<float>(out), device, stream);
      },
      py::arg("codes"), py::arg("n"), py::arg("sign"), py::arg("sign_nbytes"), py::arg("scale"), py::arg("bits"),
      py::arg("out"), py::arg("out_cap"), py::arg("device"), py::arg("stream"),
      "out[j] = sigma_j * (q_j * (*scale / (2^bits - 1))), float32; *scale is read on the device.");
  cuda.def(
      "dequantize_backward",
      [=](uintptr_t grad, int64_t n, uintptr_t codes, int64_t codes_len, uintptr_t sign, int64_t sign_nbytes, int bits,
          uintptr_t out, uintptr_t ws, int64_t ws_words, int device, uintptr_t stream) {
        check_dequantize_backward(grad, n, codes, codes_len, sign, sign_nbytes, bits, out);
        if (n > 0) check_workspace(ws, ws_words, device);
        fedmpq::cuda::dequantize_backward(ptr<const float>(grad), ptr<const uint8_t>(codes), ptr<const uint32_t>(sign),
                                          n, bits, ptr<float>(out), ptr<unsigned>(ws), device, stream);
      },
      py::arg("grad"), py::arg("n"), py::arg("codes"), py::arg("codes_len"), py::arg("sign"), py::arg("sign_nbytes"),
      py::arg("bits"), py::arg("out"), py::arg("workspace"), py::arg("workspace_words"), py::arg("device"),
      py::arg("stream"),
      "*out = (sum sigma_j q_j grad_j in float64) / (2^bits - 1) as float32, in one launch.");
  cuda.def(
      "dequantize_layers",
      [=](const std::vector<CudaDequantLayer>& layers, int device, uintptr_t stream) {
        std::vector<fedmpq::cuda::DequantLayer> table;
        table.reserve(layers.size());
        for (size_t l = 0; l < layers.size(); ++l) {
          const auto& [codes, n, sign, sign_nbytes, scale, bits, out, out_cap] = layers[l];
          in_layer(l, [&] { check_dequantize(codes, n, sign, sign_nbytes, scale, bits, out, out_cap); });
          table.push_back({ptr<const uint8_t>(codes), ptr<const uint32_t>(sign), ptr<const float>(scale),
                           ptr<float>(out), n, bits});
        }
        fedmpq::cuda::dequantize_layers(table.data(), static_cast<int64_t>(table.size()), device, stream);
      },
      py::arg("layers"), py::arg("device"), py::arg("stream"),
      "dequantize of each layer, tuples (codes, n, sign, sign_nbytes, scale, bits, out, out_cap), one launch per "
      "group of up to 32 layers (layer by layer when an out overlaps another layer's buffers). Every layer is "
      "checked before anything is launched.");
  cuda.def(
      "dequantize_backward_layers",
      [=](const std::vector<CudaDequantGradLayer>& layers, uintptr_t ws, int64_t ws_words, int device,
          uintptr_t stream) {
        std::vector<fedmpq::cuda::DequantGradLayer> table;
        table.reserve(layers.size());
        bool any = false;
        for (size_t l = 0; l < layers.size(); ++l) {
          const auto& [grad, n, codes, codes_len, sign, sign_nbytes, bits, out] = layers[l];
          in_layer(l, [&] { check_dequantize_backward(grad, n, codes, codes_len, sign, sign_nbytes, bits, out); });
          table.push_back({ptr<const float>(grad), ptr<const uint8_t>(codes), ptr<const uint32_t>(sign),
                           ptr<float>(out), n, bits});
          any = any || n > 0;
        }
        if (any) check_workspace(ws, ws_words, device);
        fedmpq::cuda::dequantize_backward_layers(table.data(), static_cast<int64_t>(table.size()), ptr<unsigned>(ws),
                                                 device, stream);
      },
      py::arg("layers"), py::arg("workspace"), py::arg("workspace_words"), py::arg("device"), py::arg("stream"),
      "dequantize_backward of each layer, tuples (grad, n, codes, codes_len, sign, sign_nbytes, bits, out), one "
      "launch per group of up to 32 layers (layer by layer when an out overlaps another layer's inputs); every *out "
      "is the single-layer result bit for bit (an empty layer's is not written).");
  cuda.def(
      "plane_popcounts",
      [=](uintptr_t codes, int64_t n, int bits, uintptr_t out, int64_t out_len, uintptr_t ws, int64_t ws_words,
          int device, uintptr_t stream) {
        check_elems("codes", codes, n, n, 1);
        check_code_bits(bits);
        check_elems("out", out, bits, out_len, 8);
        if (n > 0) check_workspace(ws, ws_words, device);
        fedmpq::cuda::plane_popcounts(ptr<const uint8_t>(codes), n, bits, ptr<int64_t>(out), ptr<unsigned>(ws), device,
                                      stream);
      },
      py::arg("codes"), py::arg("n"), py::arg("bits"), py::arg("out"), py::arg("out_len"), py::arg("workspace"),
      py::arg("workspace_words"), py::arg("device"), py::arg("stream"),
      "out[i] (int64) = number of codes with bit bits-1-i set, in one launch (n == 0: nothing is written).");
  cuda.def(
      "plane_popcounts_layers",
      [=](const std::vector<PopcountLayer>& layers, uintptr_t out, int64_t out_len, uintptr_t ws, int64_t ws_words,
          int device, uintptr_t stream) {
        check_popcount_layers(layers, out, out_len);
        bool any = false;
        for (const auto& [codes, n, bits] : layers) any = any || n > 0;
        if (any) check_workspace(ws, ws_words, device);
        std::vector<fedmpq::cuda::PopcountLayer> table;
        table.reserve(layers.size());
        for (const auto& [codes, n, bits] : layers) table.push_back({ptr<const uint8_t>(codes), n, bits});
        fedmpq::cuda::plane_popcounts_layers(table.data(), static_cast<int64_t>(table.size()), ptr<int64_t>(out),
                                             ptr<unsigned>(ws), device, stream);
      },
      py::arg("layers"), py::arg("out"), py::arg("out_len"), py::arg("workspace"), py::arg("workspace_words"),
      py::arg("device"), py::arg("stream"),
      "plane_popcounts of each layer (codes, n, bits), one launch per group of up to 32 layers: the layers' counts "
      "back to back in out (int64; an empty layer's are not written).");
  cuda.def(
      "bitplane_step",
      [=](uintptr_t codes, int64_t n, uintptr_t sign, int64_t sign_nbytes, uintptr_t mom, int64_t mom_len,
          uintptr_t gs, uintptr_t grad, int64_t grad_len, uintptr_t coef, int64_t coef_len, uintptr_t scale, int bits,
          double lr, double momentum, int64_t key, uintptr_t key_ptr, uintptr_t out, uintptr_t ws, int64_t ws_words,
          int device, uintptr_t stream) {
        check_step_buffers(codes, n, sign, sign_nbytes, mom, mom_len, gs, grad, grad_len, coef, coef_len, bits);
        check_step_scalars(lr, momentum);
        FEDMPQ_CHECK(key >= 0 && key <= int64_t(0xFFFFFFFF), "key must be a uint32");
        check_scalar("scale", scale);
        FEDMPQ_CHECK(key_ptr % 8 == 0, "key pointer is not 8-byte aligned");  // null: the int key
        FEDMPQ_CHECK(out != 0 && out % 4 == 0, "out pointer (two float32) is null or not 4-byte aligned");
        check_out_apart(out, 8, codes, n, sign, mom, bits, gs, grad, coef, scale, key_ptr);
        check_written_apart("scale", scale, 4, codes, n, sign, mom, bits, gs);
        if (key_ptr != 0) check_written_apart("key", key_ptr, 8, codes, n, sign, mom, bits, gs);
        if (n > 0) check_workspace(ws, ws_words, device);
        fedmpq::cuda::bitplane_step(ptr<uint8_t>(codes), ptr<uint32_t>(sign), ptr<uint8_t>(mom), ptr<float>(gs),
                                    ptr<const float>(grad), ptr<const float>(coef), ptr<const float>(scale), n, bits,
                                    f32_round(lr), static_cast<float>(momentum), static_cast<uint32_t>(key),
                                    ptr<const int64_t>(key_ptr), ptr<float>(out), ptr<unsigned>(ws), device, stream);
      },
      py::arg("codes"), py::arg("n"), py::arg("sign"), py::arg("sign_nbytes"), py::arg("mom"), py::arg("mom_len"),
      py::arg("gs"), py::arg("grad"), py::arg("grad_len"), py::arg("coef"), py::arg("coef_len"), py::arg("scale"),
      py::arg("bits"), py::arg("lr"), py::arg("momentum"), py::arg("key"), py::arg("key_ptr"), py::arg("out"),
      py::arg("workspace"), py::arg("workspace_words"), py::arg("device"), py::arg("stream"),
      "The fused bit-plane step in place on codes, sign, mom and gs, two launches, no host synchronization: "
      "out[0] = g_s (not finite: skipped), out[1] = the previous gs. key_ptr (an int64 on the device, its low 32 "
      "bits) replaces key when not 0.");
  cuda.def(
      "bitplane_step_layers",
      [=](const std::vector<CudaStepLayer>& layers, double lr, double momentum, uintptr_t out, int64_t out_len,
          uintptr_t ws, int64_t ws_words, int device, uintptr_t stream, bool check_only) {
        check_step_scalars(lr, momentum);
        const int64_t L = static_cast<int64_t>(layers.size());
        check_elems("out", out, 2 * L, out_len, 4);
        bool any = false;
        for (size_t l = 0; l < layers.size(); ++l) {
          const auto& [codes, n, sign, sign_nbytes, mom, mom_len, gs, grad, grad_len, coef, coef_len, scale, bits, key,
                       key_ptr] = layers[l];
          in_layer(l, [&] {
            check_step_buffers(codes, n, sign, sign_nbytes, mom, mom_len, gs, grad, grad_len, coef, coef_len, bits);
            FEDMPQ_CHECK(key >= 0 && key <= int64_t(0xFFFFFFFF), "key must be a uint32");
            check_scalar("scale", scale);
            FEDMPQ_CHECK(key_ptr % 8 == 0, "key pointer is not 8-byte aligned");
            check_out_apart(out, 8 * L, codes, n, sign, mom, bits, gs, grad, coef, scale, key_ptr);
            check_written_apart("scale", scale, 4, codes, n, sign, mom, bits, gs);
            if (key_ptr != 0) check_written_apart("key", key_ptr, 8, codes, n, sign, mom, bits, gs);
          });
          any = any || n > 0;
        }
        if (any) check_workspace(ws, ws_words, device);
        if (check_only) return;
        std::vector<fedmpq::cuda::StepLayer> table;
        table.reserve(layers.size());
        for (const auto& [codes, n, sign, sign_nbytes, mom, mom_len, gs, grad, grad_len, coef, coef_len, scale, bits,
                          key, key_ptr] : layers)
          table.push_back({ptr<uint8_t>(codes), ptr<uint32_t>(sign), ptr<uint8_t>(mom), ptr<float>(gs),
                           ptr<const float>(grad), ptr<const float>(coef), ptr<const float>(scale), n, bits,
                           static_cast<uint32_t>(key), ptr<const int64_t>(key_ptr)});
        fedmpq::cuda::bitplane_step_layers(table.data(), L, f32_round(lr), static_cast<float>(momentum), ptr<float>(out),
                                           ptr<unsigned>(ws), device, stream);
      },
      py::arg("layers"), py::arg("lr"), py::arg("momentum"), py::arg("out"), py::arg("out_len"), py::arg("workspace"),
      py::arg("workspace_words"), py::arg("device"), py::arg("stream"), py::arg("check_only") = false,
      "bitplane_step on each layer in order, one call: layers are tuples (codes, n, sign, sign_nbytes, mom, mom_len, "
      "gs, grad, grad_len, coef, coef_len, scale, bits, key, key_ptr); out[2l], out[2l+1] = layer l's g_s and "
      "previous gs. Every layer is checked before anything is launched; layers that share no memory go two launches "
      "per group of up to 32. check_only: the checks alone, nothing launched (for a caller that then steps layer by "
      "layer).");
#endif
}

}  // namespace fedmpq::bindings
