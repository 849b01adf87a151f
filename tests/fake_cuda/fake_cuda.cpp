// A CUDA device for a CPU-only torch, for tracing only (tests/fake_cuda/__init__.py): c10's
// FakeGuardImpl as CUDA's device guard, and CUDA hooks that say CUDA is there. With both,
// FakeTensorMode's CUDA tensors (which hold no memory) go through autograd: the engine asks
// the guard for streams and the hooks for the accelerator. Nothing can run on a device.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace at {
struct FakeCUDAHooks final : CUDAHooksInterface {
  explicit FakeCUDAHooks(CUDAHooksArgs) {}
  void init() const override {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return false; }
};
// Under the key torch looks up ("CUDAHooks"), once, on its first question about CUDA: so
// this library is loaded before torch is imported.
C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, FakeCUDAHooks);
}  // namespace at

static c10::impl::DeviceGuardImplRegistrar fake_cuda_guard(
    c10::DeviceType::CUDA, new c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>());
