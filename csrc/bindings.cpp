// The pybind11 module fedmpq_kernels._C. No libtorch: tensors cross as data pointers,
// element counts and buffer sizes, which are checked again before any kernel runs (the
// Python adapters check first and raise the user-facing errors). This file holds the
// module and the build / CPU facts; each op family binds its functions into the
// submodules _C.cpu and _C.cuda from csrc/bindings/<family>.cpp, under the op's name.
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/cpu_features.h"
#include "cpu/thread_pool.h"
#ifdef FEDMPQ_WITH_CUDA
#include "cuda/fake_quant.h"  // compiled_archs, device_count
#endif

namespace py = pybind11;

namespace fedmpq::bindings {
void bind_fake_quant(py::module_& m);
void bind_pack(py::module_& m);
void bind_bitplane(py::module_& m);
}  // namespace fedmpq::bindings

PYBIND11_MODULE(_C, m) {
  m.doc() = "fedmpq native kernels (CPU; CUDA when built with it). Called by fedmpq_kernels' adapters.";

  // ---- build / CPU facts ----
  m.def("cpu_isa", [] { return std::string(fedmpq::cpu::isa_name(fedmpq::cpu::active_isa())); });
  m.def("set_cpu_isa", &fedmpq::cpu::set_isa, py::arg("name"));
  m.def("avx2_available", &fedmpq::cpu::avx2_available);
  m.def("gfni_available", &fedmpq::cpu::gfni_available);
  m.def("cpu_features", &fedmpq::cpu::cpu_features);
  // How the CPU kernels run in parallel (fedmpq_kernels.info prints it): the module's own
  // blocking pool, no OpenMP (csrc/cpu/thread_pool.h says why).
  m.def("threading", [] {
    const fedmpq::cpu::PoolStats s = fedmpq::cpu::pool_stats();
    py::dict d;
    d["kind"] = "own pool";
    d["wait"] = s.spin_us > 0 ? "blocking after a " + std::to_string(s.spin_us) + " us spin" : std::string("blocking");
    d["max_threads"] = fedmpq::cpu::max_threads();
    d["grain"] = fedmpq::cpu::kGrain;
    d["workers"] = s.workers;
    d["jobs"] = s.jobs;
    d["busy_serial"] = s.busy_serial;
    return d;
  });

  // Family binders add to these (def_submodule returns the existing submodule).
  m.def_submodule("cpu", "CPU kernels: contiguous float32, own thread pool, AVX2 or portable.");
#ifdef FEDMPQ_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_archs", [] { return std::string(fedmpq::cuda::compiled_archs()); });
  m.def("cuda_device_count", &fedmpq::cuda::device_count);
  m.def_submodule("cuda", "CUDA kernels: launched on the given device (which must be current) and stream.");
#else
  m.attr("with_cuda") = false;
#endif

  fedmpq::bindings::bind_fake_quant(m);
  fedmpq::bindings::bind_pack(m);
  fedmpq::bindings::bind_bitplane(m);
}
