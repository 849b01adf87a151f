// Fake-quant's bindings: _C.cpu.{absmax, fake_quant, relu6_fake_quant, fake_quant_backward}, their kept-bitmap
// forms _C.cpu.{fake_quant_kept, relu6_fake_quant_kept, fake_quant_backward_kept}, and, when built with CUDA,
// _C.cuda.{workspace_words, absmax, fake_quant, relu6_fake_quant, fake_quant_backward}.
// Each re-checks every size and pointer it is given (bindings/common.h).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/common.h"
#include "cpu/fake_quant.h"
#ifdef FEDMPQ_WITH_CUDA
#include "cuda/fake_quant.h"
#endif

namespace py = pybind11;

namespace fedmpq::bindings {

namespace {
void check_bits(int bits) {
  FEDMPQ_CHECK((bits >= 1 && bits <= 8) || bits == 16, "bits must be in 1..8 or 16, got " + std::to_string(bits));
}

// A CPU call's float32 input and output of n elements (the output holding cap): each checked,
// and the same buffer (in place) or disjoint.
void check_f32_io(const char* in_name, uintptr_t in, const char* out_name, uintptr_t out, int64_t n, int64_t cap) {
  check_elems(in_name, in, n, n, 4);
  check_elems(out_name, out, n, cap, 4);
  check_no_partial_overlap(in_name, in, out_name, out, n, 4);
}

// A given scale, as the kernels' float32 will hold it: FLT_MAX is finite; a double below half
// the least float32 is 0 there.
void check_given_scale(double scale) {
  FEDMPQ_CHECK(scale > 0.0 && scale <= 3.4028234663852886e38 && static_cast<float>(scale) > 0.0f,
               "scale must be finite and > 0");
}

// A bitmap of n elements (null: none) apart from a buffer of n elements of es bytes, one of
// the two written by the kernel while it reads or writes the other.
void check_bitmap_apart(const char* name, uintptr_t p, int64_t n, const char* buf_name, uintptr_t buf, int64_t es) {
  if (p != 0) check_disjoint(name, p, 4 * bitmap_words(n), buf_name, buf, n * es);  // n <= kMaxElems
}

// The forward's bitmaps, written with y: apart from x, y and each other.
void check_forward_bitmaps(uintptr_t x, uintptr_t y, int64_t n, int64_t es, uintptr_t pass, uintptr_t hi) {
  check_bitmap_apart("pass", pass, n, "x", x, es);
  check_bitmap_apart("pass", pass, n, "y", y, es);
  check_bitmap_apart("hi", hi, n, "x", x, es);
  check_bitmap_apart("hi", hi, n, "y", y, es);
  if (pass != 0 && hi != 0) check_disjoint("pass", pass, 4 * bitmap_words(n), "hi", hi, 4 * bitmap_words(n));
}

// The kept forms' bitmaps: a bytearray the eager autograd path keeps on its node
// (fedmpq_kernels/fake_quant/cpu.py), made here uninitialized (the kernels write every word,
// the bits past n as zeros): `maps` bitmaps of n elements back to back, pass then hi.
// A uint8 tensor made, saved and freed for them cost ~2.3 us of a 1-element forward+backward.
py::bytearray new_kept(int64_t n, int maps, uint32_t** pass, uint32_t** hi) {
  const int64_t nb = 4 * bitmap_words(n);  // n checked by check_elems
  // MemoryError, as Python raises it, where pybind11's constructor would throw a RuntimeError
  // with the MemoryError still pending
  PyObject* made = PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(nb * maps));
  if (made == nullptr) throw py::error_already_set();
  auto kept = py::reinterpret_steal<py::bytearray>(made);
  auto* p = reinterpret_cast<uint32_t*>(PyByteArray_AS_STRING(kept.ptr()));
  // never fails: CPython's allocators give 16-byte alignment. An empty bytearray has no
  // allocation (its pointer is a static empty string, at any address on Python 3.13) and no
  // word is read from it.
  FEDMPQ_CHECK(nb == 0 || reinterpret_cast<uintptr_t>(p) % 4 == 0, "bitmap bytearray is not 4-byte aligned");
  *pass = n > 0 ? p : nullptr;
  *hi = n > 0 && maps == 2 ? p + nb / 4 : nullptr;
  return kept;
}

// A kept bytearray handed back for a backward: exported for the call (a resize from another
// thread while the kernel reads it without the GIL raises BufferError there instead), its
// length and alignment checked against n and the bitmaps asked for. Made and destroyed
// holding the GIL.
class KeptView {
 public:
  KeptView(const py::object& kept, int64_t n, int maps) {
    if (!PyByteArray_CheckExact(kept.ptr()))
      throw py::type_error(std::string("kept bitmaps must be a bytearray, got ") + Py_TYPE(kept.ptr())->tp_name);
    if (PyObject_GetBuffer(kept.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
    const int64_t nb = 4 * bitmap_words(n), len = view_.len;
    // no words are read for no elements: an empty bytearray's pointer may be unaligned (Python 3.13)
    const bool aligned = nb == 0 || reinterpret_cast<uintptr_t>(view_.buf) % 4 == 0;
    if (len < nb * maps || !aligned) {
      PyBuffer_Release(&view_);
      FEDMPQ_CHECK(false, "kept bitmaps hold " + std::to_string(len) + " bytes" +
                              (aligned ? "" : ", not 4-byte aligned") + ", need " + std::to_string(nb * maps) +
                              " for " + std::to_string(n) + " elements");
    }
    auto* p = static_cast<const uint32_t*>(view_.buf);
    pass_ = n > 0 ? p : nullptr;
    hi_ = n > 0 && maps == 2 ? p + nb / 4 : nullptr;
    bytes_ = n > 0 ? nb * maps : 0;
  }
  ~KeptView() { PyBuffer_Release(&view_); }
  KeptView(const KeptView&) = delete;
  KeptView& operator=(const KeptView&) = delete;
  const uint32_t* pass() const { return pass_; }
  const uint32_t* hi() const { return hi_; }
  uintptr_t addr() const { return reinterpret_cast<uintptr_t>(pass_); }
  int64_t bytes() const { return bytes_; }  // the bytes the kernel reads

 private:
  Py_buffer view_{};
  const uint32_t* pass_ = nullptr;
  const uint32_t* hi_ = nullptr;
  int64_t bytes_ = 0;
};
}  // namespace

void bind_fake_quant(py::module_& m) {
  // ---- CPU, float32 ----
  py::module_ cpu = m.def_submodule("cpu");  // the submodule bindings.cpp made
  cpu.def(
      "absmax",
      [](uintptr_t x, int64_t n, int nthreads) {
        check_elems("x", x, n, n, 4);
        NoGil nogil;
        return fedmpq::cpu::absmax(ptr<const float>(x), n, nthreads);
      },
      py::arg("x"), py::arg("n"), py::arg("nthreads"));

  cpu.def(
      "fake_quant",
      [](uintptr_t x, int64_t n, uintptr_t y, int64_t y_cap, int bits, double scale, bool dynamic,
         uintptr_t pass, int64_t pass_nbytes, uintptr_t hi, int64_t hi_nbytes, int nthreads) {
        check_f32_io("x", x, "y", y, n, y_cap);
        check_bits(bits);
        check_bitmap("pass", pass, pass_nbytes, n, false);
        check_bitmap("hi", hi, hi_nbytes, n, false);
        check_forward_bitmaps(x, y, n, 4, pass, hi);
        if (!dynamic) check_given_scale(scale);
        float s = static_cast<float>(scale);
        {
          NoGil nogil;
          if (dynamic) s = fedmpq::cpu::absmax(ptr<const float>(x), n, nthreads);
          fedmpq::cpu::fake_quant(ptr<const float>(x), ptr<float>(y), n, bits, s, ptr<uint32_t>(pass),
                                  ptr<uint32_t>(hi), nthreads);
        }
        return s;
      },
      py::arg("x"), py::arg("n"), py::arg("y"), py::arg("y_cap"), py::arg("bits"), py::arg("scale"),
      py::arg("dynamic"), py::arg("pass_bits"), py::arg("pass_nbytes"), py::arg("hi_bits"), py::arg("hi_nbytes"),
      py::arg("nthreads"),
      "Fake-quant forward on n contiguous float32; returns the scale used (max|x| when dynamic).");

  cpu.def(
      "relu6_fake_quant",
      [](uintptr_t x, int64_t n, uintptr_t y, int64_t y_cap, int bits, uintptr_t mask, int64_t mask_nbytes,
         int nthreads) {
        check_f32_io("x", x, "y", y, n, y_cap);
        check_bits(bits);
        check_bitmap("mask", mask, mask_nbytes, n, false);
        check_bitmap_apart("mask", mask, n, "x", x, 4);
        check_bitmap_apart("mask", mask, n, "y", y, 4);
        float s;
        {
          NoGil nogil;
          s = fedmpq::cpu::relu6_max(ptr<const float>(x), n, nthreads);
          fedmpq::cpu::relu6_fake_quant(ptr<const float>(x), ptr<float>(y), n, bits, s, ptr<uint32_t>(mask),
                                        nthreads);
        }
        return s;
      },
      py::arg("x"), py::arg("n"), py::arg("y"), py::arg("y_cap"), py::arg("bits"), py::arg("mask"),
      py::arg("mask_nbytes"), py::arg("nthreads"),
      "ReLU6 fused with the dynamic-scale fake-quant on n contiguous float32, mask bit = 0 < x < 6; "
      "returns the scale used (max of min(relu(x), 6)).");

  cpu.def(
      "fake_quant_backward",
      [](uintptr_t g, int64_t n, uintptr_t gx, int64_t gx_cap, uintptr_t pass, int64_t pass_nbytes, uintptr_t hi,
         int64_t hi_nbytes, int nthreads) {
        check_f32_io("grad", g, "grad_x", gx, n, gx_cap);
        check_bitmap("pass", pass, pass_nbytes, n, n > 0);
        check_bitmap("hi", hi, hi_nbytes, n, false);
        check_bitmap_apart("pass", pass, n, "grad_x", gx, 4);
        check_bitmap_apart("hi", hi, n, "grad_x", gx, 4);
        NoGil nogil;
        // The float64 sum rounded once to float32 here (a sum past float32's range is +-inf,
        // as on every other backend, not an error in the caller's conversion).
        return static_cast<double>(f32_round(fedmpq::cpu::fake_quant_backward(
            ptr<const float>(g), ptr<float>(gx), n, ptr<const uint32_t>(pass), ptr<const uint32_t>(hi), nthreads)));
      },
      py::arg("grad"), py::arg("n"), py::arg("grad_x"), py::arg("gx_cap"), py::arg("pass_bits"),
      py::arg("pass_nbytes"), py::arg("hi_bits"), py::arg("hi_nbytes"), py::arg("nthreads"),
      "Clipped-STE backward; returns the scale gradient, a float32 value (0 when hi_bits is null).");

  // ---- the kept forms: the same kernels, the bitmaps in a bytearray (new_kept) ----
  cpu.def(
      "fake_quant_kept",
      [](uintptr_t x, int64_t n, uintptr_t y, int64_t y_cap, int bits, double scale, int maps, int nthreads) {
        check_f32_io("x", x, "y", y, n, y_cap);
        check_bits(bits);
        FEDMPQ_CHECK(maps == 1 || maps == 2, "maps must be 1 (pass) or 2 (pass and hi), got " + std::to_string(maps));
        check_given_scale(scale);
        uint32_t *pass, *hi;
        py::bytearray kept = new_kept(n, maps, &pass, &hi);  // fresh: apart from x and y
        {
          NoGil nogil;
          fedmpq::cpu::fake_quant(ptr<const float>(x), ptr<float>(y), n, bits, static_cast<float>(scale), pass, hi,
                                  nthreads);
        }
        return kept;
      },
      py::arg("x"), py::arg("n"), py::arg("y"), py::arg("y_cap"), py::arg("bits"), py::arg("scale"),
      py::arg("maps"), py::arg("nthreads"),
      "Fake-quant forward with a given scale on n contiguous float32; returns the pass (and, maps = 2, hi) "
      "bitmaps in a new bytearray.");

  cpu.def(
      "relu6_fake_quant_kept",
      [](uintptr_t x, int64_t n, uintptr_t y, int64_t y_cap, int bits, int nthreads) {
        check_f32_io("x", x, "y", y, n, y_cap);
        check_bits(bits);
        uint32_t *mask, *unused;
        py::bytearray kept = new_kept(n, 1, &mask, &unused);
        {
          NoGil nogil;
          const float s = fedmpq::cpu::relu6_max(ptr<const float>(x), n, nthreads);
          fedmpq::cpu::relu6_fake_quant(ptr<const float>(x), ptr<float>(y), n, bits, s, mask, nthreads);
        }
        return kept;
      },
      py::arg("x"), py::arg("n"), py::arg("y"), py::arg("y_cap"), py::arg("bits"), py::arg("nthreads"),
      "relu6_fake_quant on n contiguous float32; returns the mask bitmap (0 < x < 6) in a new bytearray.");

  cpu.def(
      "fake_quant_backward_kept",
      [](uintptr_t g, int64_t n, uintptr_t gx, int64_t gx_cap, const py::object& kept, bool scale_grad,
         int nthreads) {
        check_f32_io("grad", g, "grad_x", gx, n, gx_cap);
        KeptView maps(kept, n, scale_grad ? 2 : 1);  // before nogil: its release needs the GIL back
        // torch.frombuffer can make a tensor of a bytearray's memory
        check_disjoint("kept bitmaps", maps.addr(), maps.bytes(), "grad_x", gx, n * 4);
        NoGil nogil;
        return static_cast<double>(f32_round(fedmpq::cpu::fake_quant_backward(
            ptr<const float>(g), ptr<float>(gx), n, maps.pass(), maps.hi(), nthreads)));
      },
      py::arg("grad"), py::arg("n"), py::arg("grad_x"), py::arg("gx_cap"), py::arg("kept"), py::arg("scale_grad"),
      py::arg("nthreads"),
      "Clipped-STE backward reading a kept forward's bytearray (pass, then hi when scale_grad); returns the scale "
      "gradient, a float32 value (0 without scale_grad).");

#ifdef FEDMPQ_WITH_CUDA
  // ---- CUDA: float32, float16, bfloat16 (dtype codes of cuda/fake_quant.h) ----
  py::module_ cuda = m.def_submodule("cuda");
  // A reduction workspace (cuda/fake_quant.h): at least workspace_words(device) 4-byte words
  // on the device, checked for null, alignment and length.
  auto check_workspace = [](uintptr_t ws, int64_t ws_words, int device) {
    FEDMPQ_CHECK(ws != 0 && ws % 4 == 0, "reduction workspace pointer is null or not 4-byte aligned");
    FEDMPQ_CHECK(ws_words >= fedmpq::cuda::workspace_words(device), "reduction workspace is too small");
  };
  // A forward's input x and output y (n elements of the dtype each, y_cap for y: disjoint),
  // its bits and its scale pointer (4-byte aligned, not null). Not in place, unlike on the
  // CPU: the kernels read x through the read-only data cache (__ldg, ld.global.nc), which
  // PTX allows only for memory no thread writes during the kernel.
  auto check_forward = [](uintptr_t x, uintptr_t y, int dtype, int64_t n, int64_t y_cap, int bits, uintptr_t scale) {
    const int64_t es = dtype_size(dtype);
    check_elems("x", x, n, n, es);
    check_elems("y", y, n, y_cap, es);
    check_disjoint("x", x, n * es, "y", y, n * es);
    check_bits(bits);
    FEDMPQ_CHECK(scale != 0 && scale % 4 == 0, "scale pointer is null or not 4-byte aligned");
  };
  cuda.def(
      "workspace_words",
      [](int device) { return fedmpq::cuda::workspace_words(device); }, py::arg("device"),
      "4-byte words of a reduction workspace on `device` (zero-filled once; every kernel leaves its ticket, word 0, zero).");
  cuda.def(
      "absmax",
      [=](uintptr_t x, int dtype, int64_t n, uintptr_t out_bits, uintptr_t ws, int64_t ws_words, int device,
          uintptr_t stream) {
        check_elems("x", x, n, n, dtype_size(dtype));
        FEDMPQ_CHECK(out_bits != 0 && out_bits % 4 == 0, "absmax output is null or not 4-byte aligned");
        if (n > 0) check_workspace(ws, ws_words, device);
        fedmpq::cuda::absmax(ptr<const void>(x), dtype, n, ptr<uint32_t>(out_bits), ptr<unsigned>(ws), device, stream);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("out_bits"), py::arg("workspace"), py::arg("workspace_words"),
      py::arg("device"), py::arg("stream"));
  cuda.def(
      "fake_quant",
      [=](uintptr_t x, uintptr_t y, int dtype, int64_t n, int64_t y_cap, int bits, uintptr_t scale, bool scale_given,
          uintptr_t pass, int64_t pass_nbytes, uintptr_t hi, int64_t hi_nbytes, int device, uintptr_t stream) {
        check_forward(x, y, dtype, n, y_cap, bits, scale);
        check_bitmap("pass", pass, pass_nbytes, n, false);
        check_bitmap("hi", hi, hi_nbytes, n, false);
        check_forward_bitmaps(x, y, n, dtype_size(dtype), pass, hi);
        fedmpq::cuda::fake_quant(ptr<const void>(x), ptr<void>(y), dtype, n, bits, ptr<const float>(scale),
                                 scale_given, ptr<uint32_t>(pass), ptr<uint32_t>(hi), device, stream);
      },
      py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("n"), py::arg("y_cap"), py::arg("bits"),
      py::arg("scale"), py::arg("scale_given"), py::arg("pass_bits"), py::arg("pass_nbytes"), py::arg("hi_bits"),
      py::arg("hi_nbytes"), py::arg("device"), py::arg("stream"));
  // relu6_fake_quant: x, y, bits and the mask as fake_quant checks them; `scale` receives S
  // (one float32 on the device, written by the first launch and read by the second).
  cuda.def(
      "relu6_fake_quant",
      [=](uintptr_t x, uintptr_t y, int dtype, int64_t n, int64_t y_cap, int bits, uintptr_t scale, uintptr_t mask,
          int64_t mask_nbytes, uintptr_t ws, int64_t ws_words, int device, uintptr_t stream) {
        check_forward(x, y, dtype, n, y_cap, bits, scale);
        check_bitmap("mask", mask, mask_nbytes, n, false);
        check_bitmap_apart("mask", mask, n, "x", x, dtype_size(dtype));
        check_bitmap_apart("mask", mask, n, "y", y, dtype_size(dtype));
        if (n > 0) check_workspace(ws, ws_words, device);
        fedmpq::cuda::relu6_fake_quant(ptr<const void>(x), ptr<void>(y), dtype, n, bits, ptr<float>(scale),
                                       ptr<uint32_t>(mask), ptr<unsigned>(ws), device, stream);
      },
      py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("n"), py::arg("y_cap"), py::arg("bits"),
      py::arg("scale"), py::arg("mask"), py::arg("mask_nbytes"), py::arg("workspace"), py::arg("workspace_words"),
      py::arg("device"), py::arg("stream"),
      "ReLU6 fused with the dynamic-scale fake-quant, mask bit = 0 < x < 6: two launches (S = max relu6(x) into "
      "*scale, then the quantizer reading it), no host synchronization.");
  cuda.def(
      "fake_quant_backward",
      [=](uintptr_t g, uintptr_t gx, int dtype, int64_t n, int64_t gx_cap, uintptr_t pass, int64_t pass_nbytes,
          uintptr_t hi, int64_t hi_nbytes, uintptr_t ws, int64_t ws_words, uintptr_t grad_scale, int device,
          uintptr_t stream) {
        const int64_t es = dtype_size(dtype);
        check_elems("grad", g, n, n, es);
        check_elems("grad_x", gx, n, gx_cap, es);
        check_disjoint("grad", g, n * es, "grad_x", gx, n * es);  // not in place: as check_forward
        check_bitmap("pass", pass, pass_nbytes, n, n > 0);
        check_bitmap("hi", hi, hi_nbytes, n, false);
        check_bitmap_apart("pass", pass, n, "grad_x", gx, es);
        check_bitmap_apart("hi", hi, n, "grad_x", gx, es);
        if (hi != 0 && n > 0) {
          check_workspace(ws, ws_words, device);
          FEDMPQ_CHECK(grad_scale != 0, "grad_scale pointer is null");
        }
        FEDMPQ_CHECK(grad_scale % 4 == 0, "grad_scale pointer is not 4-byte aligned");  // written (0) even without hi
        fedmpq::cuda::fake_quant_backward(ptr<const void>(g), ptr<void>(gx), dtype, n, ptr<const uint32_t>(pass),
                                          ptr<const uint32_t>(hi), ptr<unsigned>(ws), ptr<float>(grad_scale), device,
                                          stream);
      },
      py::arg("grad"), py::arg("grad_x"), py::arg("dtype"), py::arg("n"), py::arg("gx_cap"), py::arg("pass_bits"),
      py::arg("pass_nbytes"), py::arg("hi_bits"), py::arg("hi_nbytes"), py::arg("workspace"),
      py::arg("workspace_words"), py::arg("grad_scale"), py::arg("device"), py::arg("stream"),
      "Clipped-STE backward; with hi_bits, writes the scale gradient to *grad_scale (one float32 on the device), "
      "without them 0 there when grad_scale is not null.");
#endif
}

}  // namespace fedmpq::bindings
