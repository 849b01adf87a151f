// The pybind11 module fedmpq_kernels._C. No libtorch: tensors cross as data pointers,
// element counts and buffer sizes, which are checked here again before any kernel runs
// (the Python adapters check first and raise the user-facing errors).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/cpu_features.h"
#include "cpu/fake_quant.h"
#ifdef FEDMPQ_WITH_CUDA
#include "cuda/fake_quant.h"
#endif

namespace py = pybind11;
using fedmpq::cpu::bitmap_words;

namespace {

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

void check_bits(int bits) {
  require((bits >= 1 && bits <= 8) || bits == 16, "bits must be in 1..8 or 16, got " + std::to_string(bits));
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// An element count: bounded once here, so that no size computed from it can overflow.
void check_count(const char* what, int64_t n) {
  require(n >= 0, std::string(what) + ": negative element count");
  require(n <= fedmpq::cpu::kMaxElems, std::string(what) + ": " + std::to_string(n) + " elements is more than the " +
                                           std::to_string(fedmpq::cpu::kMaxElems) + " any kernel accepts");
}

// A bitmap argument: null (0) with 0 bytes, or a 4-byte-aligned buffer holding all words
// of n elements (n already checked by check_count).
void check_bitmap(const char* name, uintptr_t p, int64_t nbytes, int64_t n, bool required) {
  if (p == 0) {
    require(!required, std::string(name) + " bitmap is required");
    return;
  }
  require(nbytes >= 4 * bitmap_words(n), std::string(name) + " bitmap has " + std::to_string(nbytes) +
                                             " bytes, needs " + std::to_string(4 * bitmap_words(n)));
  require(p % 4 == 0, std::string(name) + " bitmap must be 4-byte aligned");
}

// A buffer of `cap` elements of `elem_size` bytes that must hold n: not null when n > 0,
// and aligned to its element size (a misaligned float load is undefined behaviour).
void check_elems(const char* what, uintptr_t p, int64_t n, int64_t cap, int64_t elem_size) {
  check_count(what, n);
  require(cap >= n, std::string(what) + ": buffer holds " + std::to_string(cap) + " elements, needs " + std::to_string(n));
  require(n == 0 || p != 0, std::string(what) + ": null data pointer");
  require(p % static_cast<uintptr_t>(elem_size) == 0,
          std::string(what) + ": data pointer is not " + std::to_string(elem_size) + "-byte aligned");
}

// An input and an output of n elements each: the same buffer (in place) or disjoint. A
// partial overlap would let the kernel read what it already wrote.
void check_no_partial_overlap(const char* in, uintptr_t a, const char* out, uintptr_t b, int64_t n,
                              int64_t elem_size) {
  if (n == 0 || a == b) return;
  const uintptr_t bytes = static_cast<uintptr_t>(n) * static_cast<uintptr_t>(elem_size);  // n <= kMaxElems
  require(a + bytes <= b || b + bytes <= a,
          std::string(in) + " and " + std::string(out) + " overlap without being the same buffer");
}

// Bytes per element of a CUDA dtype code (0 float32, 1 float16, 2 bfloat16).
int64_t dtype_size(int dtype) {
  require(dtype >= 0 && dtype <= 2, "unknown dtype code " + std::to_string(dtype));
  return dtype == 0 ? 4 : 2;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fedmpq native kernels (CPU; CUDA when built with it). Called by fedmpq_kernels' adapters.";

  // ---- build / CPU facts ----
  m.def("cpu_isa", [] { return std::string(fedmpq::cpu::isa_name(fedmpq::cpu::active_isa())); });
  m.def("set_cpu_isa", &fedmpq::cpu::set_isa, py::arg("name"));
  m.def("avx2_available", &fedmpq::cpu::avx2_available);
  m.def("cpu_features", &fedmpq::cpu::cpu_features);
  m.def("has_openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });

  // ---- fake-quant, CPU, float32 ----
  m.def(
      "absmax_f32",
      [](uintptr_t x, int64_t n, int nthreads) {
        check_elems("x", x, n, n, 4);
        py::gil_scoped_release nogil;
        return fedmpq::cpu::absmax_f32(ptr<const float>(x), n, nthreads);
      },
      py::arg("x"), py::arg("n"), py::arg("nthreads"));

  m.def(
      "fake_quant_fwd_f32",
      [](uintptr_t x, int64_t n, uintptr_t y, int64_t y_cap, int bits, double scale, bool dynamic,
         uintptr_t pass, int64_t pass_nbytes, uintptr_t hi, int64_t hi_nbytes, int nthreads) {
        check_elems("x", x, n, n, 4);
        check_elems("y", y, n, y_cap, 4);
        check_no_partial_overlap("x", x, "y", y, n, 4);
        check_bits(bits);
        check_bitmap("pass", pass, pass_nbytes, n, false);
        check_bitmap("hi", hi, hi_nbytes, n, false);
        if (!dynamic) require(scale > 0.0 && scale < 3.4028234663852886e38, "scale must be finite and > 0");
        float s = static_cast<float>(scale);
        {
          py::gil_scoped_release nogil;
          if (dynamic) s = fedmpq::cpu::absmax_f32(ptr<const float>(x), n, nthreads);
          fedmpq::cpu::fake_quant_fwd_f32(ptr<const float>(x), ptr<float>(y), n, bits, s, ptr<uint32_t>(pass),
                                          ptr<uint32_t>(hi), nthreads);
        }
        return s;
      },
      py::arg("x"), py::arg("n"), py::arg("y"), py::arg("y_cap"), py::arg("bits"), py::arg("scale"),
      py::arg("dynamic"), py::arg("pass_bits"), py::arg("pass_nbytes"), py::arg("hi_bits"), py::arg("hi_nbytes"),
      py::arg("nthreads"),
      "Fake-quant forward on n contiguous float32; returns the scale used (max|x| when dynamic).");

  m.def(
      "fake_quant_bwd_f32",
      [](uintptr_t g, int64_t n, uintptr_t gx, int64_t gx_cap, uintptr_t pass, int64_t pass_nbytes, uintptr_t hi,
         int64_t hi_nbytes, int nthreads) {
        check_elems("grad", g, n, n, 4);
        check_elems("grad_x", gx, n, gx_cap, 4);
        check_no_partial_overlap("grad", g, "grad_x", gx, n, 4);
        check_bitmap("pass", pass, pass_nbytes, n, n > 0);
        check_bitmap("hi", hi, hi_nbytes, n, false);
        py::gil_scoped_release nogil;
        return fedmpq::cpu::fake_quant_bwd_f32(ptr<const float>(g), ptr<float>(gx), n, ptr<const uint32_t>(pass),
                                               ptr<const uint32_t>(hi), nthreads);
      },
      py::arg("grad"), py::arg("n"), py::arg("grad_x"), py::arg("gx_cap"), py::arg("pass_bits"),
      py::arg("pass_nbytes"), py::arg("hi_bits"), py::arg("hi_nbytes"), py::arg("nthreads"),
      "Clipped-STE backward; returns the scale gradient (0 when hi_bits is null).");

  // ---- CUDA ----
#ifdef FEDMPQ_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_archs", [] { return std::string(fedmpq::cuda::compiled_archs()); });
  m.def("cuda_device_count", &fedmpq::cuda::device_count);
  m.def(
      "cuda_absmax",
      [](uintptr_t x, int dtype, int64_t n, uintptr_t out_bits, int device, uintptr_t stream) {
        check_elems("x", x, n, n, dtype_size(dtype));
        require(out_bits != 0 && out_bits % 4 == 0, "absmax output is null or not 4-byte aligned");
        fedmpq::cuda::absmax(ptr<const void>(x), dtype, n, ptr<uint32_t>(out_bits), device, stream);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("out_bits"), py::arg("device"), py::arg("stream"));
  m.def(
      "cuda_fake_quant_fwd",
      [](uintptr_t x, uintptr_t y, int dtype, int64_t n, int64_t y_cap, int bits, uintptr_t scale, bool scale_given,
         uintptr_t pass, int64_t pass_nbytes, uintptr_t hi, int64_t hi_nbytes, int device, uintptr_t stream) {
        const int64_t es = dtype_size(dtype);
        check_elems("x", x, n, n, es);
        check_elems("y", y, n, y_cap, es);
        check_no_partial_overlap("x", x, "y", y, n, es);
        check_bits(bits);
        require(scale != 0 && scale % 4 == 0, "scale pointer is null or not 4-byte aligned");
        check_bitmap("pass", pass, pass_nbytes, n, false);
        check_bitmap("hi", hi, hi_nbytes, n, false);
        fedmpq::cuda::fake_quant_fwd(ptr<const void>(x), ptr<void>(y), dtype, n, bits, ptr<const float>(scale),
                                     scale_given, ptr<uint32_t>(pass), ptr<uint32_t>(hi), device, stream);
      },
      py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("n"), py::arg("y_cap"), py::arg("bits"),
      py::arg("scale"), py::arg("scale_given"), py::arg("pass_bits"), py::arg("pass_nbytes"), py::arg("hi_bits"),
      py::arg("hi_nbytes"), py::arg("device"), py::arg("stream"));
  m.def(
      "cuda_fake_quant_bwd_partials",
      [](int64_t n, int device) {
        check_count("n", n);
        return fedmpq::cuda::fake_quant_bwd_partials(n, device);
      },
      py::arg("n"), py::arg("device"));
  m.def(
      "cuda_fake_quant_bwd",
      [](uintptr_t g, uintptr_t gx, int dtype, int64_t n, int64_t gx_cap, uintptr_t pass, int64_t pass_nbytes,
         uintptr_t hi, int64_t hi_nbytes, uintptr_t partials, int64_t partials_len, int device, uintptr_t stream) {
        const int64_t es = dtype_size(dtype);
        check_elems("grad", g, n, n, es);
        check_elems("grad_x", gx, n, gx_cap, es);
        check_no_partial_overlap("grad", g, "grad_x", gx, n, es);
        check_bitmap("pass", pass, pass_nbytes, n, n > 0);
        check_bitmap("hi", hi, hi_nbytes, n, false);
        if (hi != 0 && n > 0)
          require(partials != 0 && partials % 4 == 0 &&
                      partials_len >= fedmpq::cuda::fake_quant_bwd_partials(n, device),
                  "partials buffer is null, not 4-byte aligned or too small");
        fedmpq::cuda::fake_quant_bwd(ptr<const void>(g), ptr<void>(gx), dtype, n, ptr<const uint32_t>(pass),
                                     ptr<const uint32_t>(hi), ptr<float>(partials), device, stream);
      },
      py::arg("grad"), py::arg("grad_x"), py::arg("dtype"), py::arg("n"), py::arg("gx_cap"), py::arg("pass_bits"),
      py::arg("pass_nbytes"), py::arg("hi_bits"), py::arg("hi_nbytes"), py::arg("partials"),
      py::arg("partials_len"), py::arg("device"), py::arg("stream"));
#else
  m.attr("with_cuda") = false;
#endif
}
