// Packing's bindings: _C.cpu.{pack_codes, unpack_codes, dequant_accumulate} and, when built
// with CUDA, _C.cuda.{pack_codes, unpack_codes, dequant_accumulate}. Each re-checks every
// size and pointer it is given (bindings/common.h, and the per-op checks below, the same for
// both devices) before a kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "cpu/pack.h"
#ifdef FEDMPQ_WITH_CUDA
#include "cuda/pack.h"
#endif

namespace py = pybind11;

namespace fedmpq::bindings {

namespace {
void check_code_bits(int bits) {
  FEDMPQ_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got " + std::to_string(bits));
}

// `bits` bit planes of n elements: 4-byte aligned, nbytes >= bits * 4 * words(n). Returns
// that byte count (the planes' extent, for the overlap checks).
int64_t check_planes(const char* what, uintptr_t p, int64_t nbytes, int64_t n, int bits) {
  const int64_t need = int64_t(bits) * 4 * bitmap_words(n);  // n <= kMaxElems: no overflow
  FEDMPQ_CHECK(nbytes >= need, std::string(what) + " have " + std::to_string(nbytes) + " bytes, need " +
                              std::to_string(need) + " for " + std::to_string(n) + " codes of " +
                              std::to_string(bits) + " bits");
  FEDMPQ_CHECK(n == 0 || p != 0, std::string(what) + ": null data pointer");
  FEDMPQ_CHECK(p % 4 == 0, std::string(what) + " must be 4-byte aligned");
  return need;
}

// The arguments of each op, checked in this order on every device.
// The output apart from the inputs: the kernels would read what they already wrote.
void check_pack(uintptr_t codes, int64_t n, int bits, uintptr_t planes, int64_t planes_nbytes) {
  check_elems("codes", codes, n, n, 1);
  check_code_bits(bits);
  check_disjoint("codes", codes, n, "planes", planes, check_planes("planes", planes, planes_nbytes, n, bits));
}

void check_unpack(uintptr_t planes, int64_t planes_nbytes, int64_t n, int bits, uintptr_t codes, int64_t codes_cap) {
  check_elems("codes", codes, n, codes_cap, 1);
  check_code_bits(bits);
  check_disjoint("codes", codes, n, "planes", planes, check_planes("planes", planes, planes_nbytes, n, bits));
}

void check_dequant(uintptr_t acc, int64_t n, uintptr_t planes, int64_t planes_nbytes, uintptr_t signs,
                   int64_t signs_nbytes, int bits, double coef) {
  check_elems("acc", acc, n, n, 4);
  check_code_bits(bits);
  const int64_t planes_extent = check_planes("planes", planes, planes_nbytes, n, bits);
  check_bitmap("signs", signs, signs_nbytes, n, false);
  check_disjoint("acc", acc, 4 * n, "planes", planes, planes_extent);
  if (signs != 0) check_disjoint("acc", acc, 4 * n, "signs", signs, 4 * bitmap_words(n));
  FEDMPQ_CHECK(coef == coef && coef >= -3.4028234663852886e38 && coef <= 3.4028234663852886e38,  // ±FLT_MAX are finite
          "coef must be a finite float32 value");
}
}  // namespace

void bind_pack(py::module_& m) {
  py::module_ cpu = m.def_submodule("cpu");
  cpu.def(
      "pack_codes",
      [](uintptr_t codes, int64_t n, int bits, uintptr_t planes, int64_t planes_nbytes, int nthreads) {
        check_pack(codes, n, bits, planes, planes_nbytes);
        uint32_t seen;
        {
          NoGil nogil;
          seen = fedmpq::cpu::pack_codes(ptr<const uint8_t>(codes), n, bits, ptr<uint32_t>(planes), nthreads);
        }
        return seen;
      },
      py::arg("codes"), py::arg("n"), py::arg("bits"), py::arg("planes"), py::arg("planes_nbytes"),
      py::arg("nthreads"),
      "Packs n uint8 codes into `bits` bit planes; returns the OR of all codes (the caller rejects "
      "codes >= 2^bits).");
  cpu.def(
      "unpack_codes",
      [](uintptr_t planes, int64_t planes_nbytes, int64_t n, int bits, uintptr_t codes, int64_t codes_cap,
         int nthreads) {
        check_unpack(planes, planes_nbytes, n, bits, codes, codes_cap);
        NoGil nogil;
        fedmpq::cpu::unpack_codes(ptr<const uint32_t>(planes), n, bits, ptr<uint8_t>(codes), nthreads);
      },
      py::arg("planes"), py::arg("planes_nbytes"), py::arg("n"), py::arg("bits"), py::arg("codes"),
      py::arg("codes_cap"), py::arg("nthreads"));
  cpu.def(
      "dequant_accumulate",
      [](uintptr_t acc, int64_t n, uintptr_t planes, int64_t planes_nbytes, uintptr_t signs, int64_t signs_nbytes,
         int bits, double coef, int nthreads) {
        check_dequant(acc, n, planes, planes_nbytes, signs, signs_nbytes, bits, coef);
        NoGil nogil;
        fedmpq::cpu::dequant_accumulate(ptr<float>(acc), n, ptr<const uint32_t>(planes), ptr<const uint32_t>(signs),
                                        bits, static_cast<float>(coef), nthreads);
      },
      py::arg("acc"), py::arg("n"), py::arg("planes"), py::arg("planes_nbytes"), py::arg("signs"),
      py::arg("signs_nbytes"), py::arg("bits"), py::arg("coef"), py::arg("nthreads"),
      "acc[j] += (sign bit j ? -1 : 1) * (coef * q_j) on n contiguous float32, in place.");

  cpu.def(
      "dequant_accumulate_layers",
      [](uintptr_t acc, int64_t acc_n, uintptr_t payload, int64_t payload_nbytes, uintptr_t table, int64_t nrows,
         int64_t table_nbytes, uintptr_t coefs, int64_t coefs_len, int nthreads) {
        check_elems("acc", acc, acc_n, acc_n, 4);
        check_count("payload", payload_nbytes);
        FEDMPQ_CHECK(payload_nbytes == 0 || payload != 0, "payload: null data pointer");
        FEDMPQ_CHECK(payload % 4 == 0, "payload must be 4-byte aligned");
        check_count("rows", nrows);
        FEDMPQ_CHECK(nrows == 0 || (table != 0 && table % 8 == 0), "table: null or not 8-byte aligned");
        FEDMPQ_CHECK(table_nbytes >= 0 && table_nbytes / int64_t(sizeof(fedmpq::cpu::LayerRow)) >= nrows,
                "table holds " + std::to_string(table_nbytes) + " bytes, fewer than " + std::to_string(nrows) + " rows");
        FEDMPQ_CHECK(nrows == 0 || (coefs != 0 && coefs % 4 == 0), "coefs: null or not 4-byte aligned");
        FEDMPQ_CHECK(coefs_len >= nrows, "coefs holds " + std::to_string(coefs_len) + " values, fewer than the rows");
        // acc is written while the kernel reads the payload
        check_disjoint("acc", acc, 4 * acc_n, "payload", payload, payload_nbytes);
        check_disjoint("acc", acc, 4 * acc_n, "table", table, int64_t(sizeof(fedmpq::cpu::LayerRow)) * nrows);
        check_disjoint("acc", acc, 4 * acc_n, "coefs", coefs, 4 * nrows);
        // The rows and coefs are copied, then checked, and the kernel is handed the checked
        // copies: it runs without the GIL, so another thread could rewrite the caller's table
        // between a check of it and a second read (a row's offsets, written through: SIGSEGV).
        const auto* table_rows = ptr<const fedmpq::cpu::LayerRow>(table);
        const std::vector<fedmpq::cpu::LayerRow> rows(table_rows, table_rows + nrows);
        const std::vector<float> cf(ptr<const float>(coefs), ptr<const float>(coefs) + nrows);
        int64_t prev_end = 0;
        for (int64_t r = 0; r < nrows; ++r) {  // every row, before any kernel runs
          const auto& L = rows[r];
          // The row's name, built only for a message (a loop over every layer of an upload).
          auto at = [r] { return "row " + std::to_string(r) + ": "; };
          if (L.n < 0 || L.n > fedmpq::kMaxElems) check_count((at() + "n").c_str(), L.n);
          FEDMPQ_CHECK(L.bits >= 1 && L.bits <= 8, at() + "bits must be in 1..8, got " + std::to_string(L.bits));
          FEDMPQ_CHECK(L.acc_off >= prev_end && L.acc_off <= acc_n && L.n <= acc_n - L.acc_off,
                  at() + "accumulator range out of bounds, overlapping or not ascending");
          prev_end = L.acc_off + L.n;
          const int64_t need = (L.bits + 1) * 4 * bitmap_words(L.n);  // n <= kMaxElems: no overflow
          FEDMPQ_CHECK(L.data_off >= 0 && L.data_off % 4 == 0 && L.data_off <= payload_nbytes &&
                      need <= payload_nbytes - L.data_off,
                  at() + "planes and sign map out of the payload or misaligned");
          FEDMPQ_CHECK(cf[r] == cf[r] && cf[r] - cf[r] == 0.0f, at() + "coef must be finite");
        }
        NoGil nogil;
        fedmpq::cpu::dequant_accumulate_layers(ptr<float>(acc), ptr<const uint8_t>(payload), rows.data(), nrows,
                                               cf.data(), nthreads);
      },
      py::arg("acc"), py::arg("acc_n"), py::arg("payload"), py::arg("payload_nbytes"), py::arg("table"),
      py::arg("nrows"), py::arg("table_nbytes"), py::arg("coefs"), py::arg("coefs_len"), py::arg("nthreads"),
      "dequant_accumulate for many layers of one payload: table is int64 (nrows, 4) rows "
      "(acc_off, n, bits, data_off), coefs float32 (nrows,).");

#ifdef FEDMPQ_WITH_CUDA
  // ---- CUDA: launched on `stream` of `device`, which must be current; never synchronizes ----
  py::module_ cuda = m.def_submodule("cuda");
  cuda.def(
      "pack_codes",
      [](uintptr_t codes, int64_t n, int bits, uintptr_t planes, int64_t planes_nbytes, uintptr_t seen, int device,
         uintptr_t stream) {
        check_pack(codes, n, bits, planes, planes_nbytes);
        FEDMPQ_CHECK(seen != 0 && seen % 4 == 0, "seen pointer is null or not 4-byte aligned");
        fedmpq::cuda::pack_codes(ptr<const uint8_t>(codes), n, bits, ptr<uint32_t>(planes), ptr<uint32_t>(seen),
                                 device, stream);
      },
      py::arg("codes"), py::arg("n"), py::arg("bits"), py::arg("planes"), py::arg("planes_nbytes"),
      py::arg("seen"), py::arg("device"), py::arg("stream"),
      "Packs n uint8 codes into `bits` bit planes and ORs every code into the uint32 at `seen` "
      "(zeroed by the caller, read after the kernel to reject codes >= 2^bits).");
  cuda.def(
      "unpack_codes",
      [](uintptr_t planes, int64_t planes_nbytes, int64_t n, int bits, uintptr_t codes, int64_t codes_cap, int device,
         uintptr_t stream) {
        check_unpack(planes, planes_nbytes, n, bits, codes, codes_cap);
        fedmpq::cuda::unpack_codes(ptr<const uint32_t>(planes), n, bits, ptr<uint8_t>(codes), device, stream);
      },
      py::arg("planes"), py::arg("planes_nbytes"), py::arg("n"), py::arg("bits"), py::arg("codes"),
      py::arg("codes_cap"), py::arg("device"), py::arg("stream"));
  cuda.def(
      "dequant_accumulate",
      [](uintptr_t acc, int64_t n, uintptr_t planes, int64_t planes_nbytes, uintptr_t signs, int64_t signs_nbytes,
         int bits, double coef, int device, uintptr_t stream) {
        check_dequant(acc, n, planes, planes_nbytes, signs, signs_nbytes, bits, coef);
        fedmpq::cuda::dequant_accumulate(ptr<float>(acc), n, ptr<const uint32_t>(planes), ptr<const uint32_t>(signs),
                                         bits, static_cast<float>(coef), device, stream);
      },
      py::arg("acc"), py::arg("n"), py::arg("planes"), py::arg("planes_nbytes"), py::arg("signs"),
      py::arg("signs_nbytes"), py::arg("bits"), py::arg("coef"), py::arg("device"), py::arg("stream"),
      "acc[j] += (sign bit j ? -1 : 1) * (coef * q_j) on n contiguous float32, in place.");
#endif
}

}  // namespace fedmpq::bindings
