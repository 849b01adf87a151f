// Checks shared by every family's bindings (csrc/bindings/<family>.cpp). Tensors cross the
// boundary as data pointers, element counts and buffer sizes; these re-check them before
// any kernel runs and throw std::invalid_argument (ValueError in Python).
#pragma once
#include <Python.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/bitmap.h"

namespace fedmpq::bindings {

using fedmpq::bitmap_words;

// Releases the GIL around a kernel call, like py::gil_scoped_release but with a destructor
// that may throw. At interpreter exit CPython ends a daemon thread that asks for the GIL back
// with pthread_exit(); its forced unwind through pybind11's noexcept destructor called
// std::terminate (the process aborted, exit status 134). Here the unwind passes on, and
// pybind11's dispatcher rethrows it, so the thread just ends.
class NoGil {
 public:
  NoGil() : state_(PyEval_SaveThread()) {}
  ~NoGil() noexcept(false) { PyEval_RestoreThread(state_); }
  NoGil(const NoGil&) = delete;
  NoGil& operator=(const NoGil&) = delete;

 private:
  PyThreadState* state_;
};

// Throws std::invalid_argument(msg) unless cond holds. A macro, as TORCH_CHECK is, so that the
// message is built only on failure: these checks run on every kernel call, and building their
// strings eagerly (std::to_string, concatenation, a heap allocation each) cost more than a
// whole call into a small kernel (0.6 of fake_quant's 0.85 us binding on a 1-element tensor).
#define FEDMPQ_CHECK(cond, msg)                                  \
  do {                                                            \
    if (!(cond)) throw std::invalid_argument(std::string(msg));  \
  } while (0)

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// An element count: bounded once here, so that no size computed from it can overflow.
inline void check_count(const char* what, int64_t n) {
  FEDMPQ_CHECK(n >= 0, std::string(what) + ": negative element count");
  FEDMPQ_CHECK(n <= fedmpq::kMaxElems, std::string(what) + ": " + std::to_string(n) + " elements is more than the " +
                                           std::to_string(fedmpq::kMaxElems) + " any kernel accepts");
}

// A bitmap argument: null (0) with 0 bytes, or a 4-byte-aligned buffer holding all words
// of n elements (n already checked by check_count).
inline void check_bitmap(const char* name, uintptr_t p, int64_t nbytes, int64_t n, bool required) {
  if (p == 0) {
    FEDMPQ_CHECK(!required, std::string(name) + " bitmap is required");
    return;
  }
  FEDMPQ_CHECK(nbytes >= 4 * bitmap_words(n), std::string(name) + " bitmap has " + std::to_string(nbytes) +
                                             " bytes, needs " + std::to_string(4 * bitmap_words(n)));
  FEDMPQ_CHECK(p % 4 == 0, std::string(name) + " bitmap must be 4-byte aligned");
}

// A buffer of `cap` elements of `elem_size` bytes that must hold n: not null when n > 0,
// and aligned to its element size (a misaligned float load is undefined behaviour).
inline void check_elems(const char* what, uintptr_t p, int64_t n, int64_t cap, int64_t elem_size) {
  check_count(what, n);
  FEDMPQ_CHECK(cap >= n, std::string(what) + ": buffer holds " + std::to_string(cap) + " elements, needs " + std::to_string(n));
  FEDMPQ_CHECK(n == 0 || p != 0, std::string(what) + ": null data pointer");
  FEDMPQ_CHECK(p % static_cast<uintptr_t>(elem_size) == 0,
          std::string(what) + ": data pointer is not " + std::to_string(elem_size) + "-byte aligned");
}

// An input and an output of n elements each: the same buffer (in place) or disjoint. A
// partial overlap would let the kernel read what it already wrote.
inline void check_no_partial_overlap(const char* in, uintptr_t a, const char* out, uintptr_t b, int64_t n,
                                     int64_t elem_size) {
  if (n == 0 || a == b) return;
  const uintptr_t bytes = static_cast<uintptr_t>(n) * static_cast<uintptr_t>(elem_size);  // n <= kMaxElems
  FEDMPQ_CHECK(a + bytes <= b || b + bytes <= a,
          std::string(in) + " and " + std::string(out) + " overlap without being the same buffer");
}

// Two buffers written or read by one kernel call: disjoint (empty ones never clash).
inline void check_disjoint(const char* a_name, uintptr_t a, int64_t a_bytes, const char* b_name, uintptr_t b,
                           int64_t b_bytes) {
  if (a_bytes <= 0 || b_bytes <= 0) return;
  const uintptr_t ab = static_cast<uintptr_t>(a_bytes), bb = static_cast<uintptr_t>(b_bytes);  // < 2^60
  FEDMPQ_CHECK(a + ab <= b || b + bb <= a, std::string(a_name) + " and " + std::string(b_name) + " overlap");
}

// A double rounded to float32 as torch rounds it: to nearest, and at or beyond float32's
// largest value plus half an ulp to +-inf (spelled out: that conversion is undefined in C++).
inline float f32_round(double v) {
  if (v >= 0x1.ffffffp127) return std::numeric_limits<float>::infinity();
  if (v <= -0x1.ffffffp127) return -std::numeric_limits<float>::infinity();
  return static_cast<float>(v);
}

// Bytes per element of a CUDA dtype code (0 float32, 1 float16, 2 bfloat16).
inline int64_t dtype_size(int dtype) {
  FEDMPQ_CHECK(dtype >= 0 && dtype <= 2, "unknown dtype code " + std::to_string(dtype));
  return dtype == 0 ? 4 : 2;
}

}  // namespace fedmpq::bindings
