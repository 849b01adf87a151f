// A stand-in CUDA device for a CPU-only torch (tests/fake_cuda/__init__.py says what it is for).
//
// - c10's FakeGuardImpl as CUDA's device guard, and CUDA hooks that say CUDA is there: with
//   them FakeTensorMode's CUDA tensors go through autograd (the engine asks the guard for
//   streams and the hooks for the accelerator).
// - Host CUDA: tensors labelled cuda:0 whose memory is host memory, every aten op run by the
//   CPU's kernel on a CPU alias of the same memory (a boxed fallback for the CUDA dispatch
//   key). Views and in-place ops keep their aliasing; outputs come back labelled cuda:0.
//   A CPU tensor beside a CUDA one is refused as a GPU refuses it (but in a copy, as an index,
//   or as a 0-dim scalar that is only read), so device mix-ups still fail here.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

namespace at {
struct FakeCUDAHooks final : CUDAHooksInterface {
  explicit FakeCUDAHooks(CUDAHooksArgs) {}
  void init() const override {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  const Generator& getDefaultGenerator(DeviceIndex) const override {
    return at::detail::getDefaultCPUGenerator();  // host memory: the CPU's generator draws
  }
  Device getDeviceFromPtr(void*) const override { return Device(DeviceType::CUDA, 0); }
};
// Under the key torch looks up ("CUDAHooks"), once, on its first question about CUDA: so
// this library is loaded before torch is imported.
C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, FakeCUDAHooks);
}  // namespace at

static c10::impl::DeviceGuardImplRegistrar fake_cuda_guard(
    c10::DeviceType::CUDA, new c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>());

namespace {

const c10::Device kCuda(c10::DeviceType::CUDA, 0);

struct HostCudaAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = n ? c10::alloc_cpu(n) : nullptr;
    return {p, p, &c10::free_cpu, kCuda};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &c10::free_cpu; }
  void copy_data(void* dst, const void* src, std::size_t n) const override { std::memcpy(dst, src, n); }
};
HostCudaAllocator host_cuda_allocator;

// A storage's memory as a CPU storage (not owning: the CUDA storage outlives the call).
// Resizable, as out= kernels resize their outputs: what a kernel allocates then goes to the
// CUDA storage after the call (Call::settle).
c10::Storage cpu_alias(const c10::Storage& s) {
  return c10::Storage(c10::Storage::use_byte_size_t(), s.nbytes(),
                      c10::DataPtr(const_cast<void*>(s.data()), c10::Device(c10::kCPU)), c10::GetCPUAllocator(), true);
}

at::Tensor with_storage(c10::Storage st, c10::DispatchKey key, const at::Tensor& like) {
  TORCH_CHECK(!like._is_zerotensor(), "host CUDA has no zero tensors (they hold no storage)");
  auto impl = c10::make_intrusive<c10::TensorImpl>(std::move(st), c10::DispatchKeySet(key), like.dtype());
  impl->set_sizes_and_strides(like.sizes(), like.strides(), like.storage_offset());
  impl->_set_conj(like.is_conj());  // lazily conjugated or negated views stay so
  impl->_set_neg(like.is_neg());
  return at::Tensor(std::move(impl));
}

struct Keep {  // a CPU storage kept alive by the CUDA storage that labels its memory
  c10::Storage s;
};

// One call's aliases: CPU StorageImpl -> the CUDA storage it stands for (inputs, and the fresh
// CPU storages of outputs, labelled once: outputs sharing a storage share its label), and
// CUDA StorageImpl -> its CPU alias (one per storage: views of it map back to it).
struct Call {
  std::unordered_map<c10::StorageImpl*, c10::Storage> to_cuda;
  std::unordered_map<c10::StorageImpl*, c10::Storage> to_cpu;

  c10::Storage alias_of(const c10::Storage& s) {
    auto it = to_cpu.find(s.unsafeGetStorageImpl());
    if (it != to_cpu.end()) return it->second;
    c10::Storage alias = cpu_alias(s);
    to_cpu.emplace(s.unsafeGetStorageImpl(), alias);
    to_cuda.emplace(alias.unsafeGetStorageImpl(), s);
    return alias;
  }

  // tensor arguments and their aliases, whose metadata a kernel may change (out=, set_)
  std::vector<std::pair<at::Tensor, at::Tensor>> args;
  std::vector<c10::TensorImpl*> cpu_args;  // CPU tensor arguments (returned as themselves)

  at::Tensor in(const at::Tensor& t) {
    if (!t.defined()) return t;
    if (t.device().type() != c10::DeviceType::CUDA) {
      cpu_args.push_back(t.unsafeGetTensorImpl());
      return t;
    }
    at::Tensor a = with_storage(alias_of(t.storage()), c10::DispatchKey::CPU, t);
    args.emplace_back(t, a);
    return a;
  }

  // After the kernel: memory a kernel allocated for an alias (a resize) moves to its CUDA
  // storage, and each argument takes its alias's sizes, strides, offset and storage.
  void settle() {
    for (auto& kv : to_cpu) {
      c10::StorageImpl* cuda = kv.first;
      c10::StorageImpl* cpu = kv.second.unsafeGetStorageImpl();
      if (cpu->data() != cuda->data()) {  // the kernel allocated: its memory goes to the CUDA storage
        c10::DataPtr dp = cpu->set_data_ptr(c10::DataPtr(nullptr, c10::Device(c10::kCPU)));
        dp.unsafe_set_device(kCuda);
        cuda->set_data_ptr_noswap(std::move(dp));
        cpu->set_data_ptr_noswap(c10::DataPtr(const_cast<void*>(cuda->data()), c10::Device(c10::kCPU)));
      }
      if (cpu->nbytes() != cuda->nbytes()) cuda->set_nbytes(cpu->nbytes());
    }
    for (auto& [t, a] : args) {
      auto* impl = t.unsafeGetTensorImpl();
      if (a.storage().unsafeGetStorageImpl() != to_cpu.at(t.storage().unsafeGetStorageImpl()).unsafeGetStorageImpl())
        impl->set_storage_keep_dtype(label(a.storage()));
      if (a.sizes() != t.sizes() || a.strides() != t.strides() || a.storage_offset() != t.storage_offset())
        impl->set_sizes_and_strides(a.sizes(), a.strides(), a.storage_offset());
    }
  }

  // The CUDA storage of a CPU storage: the one it aliases, or a new label of fresh memory.
  c10::Storage label(const c10::Storage& cpu) {
    c10::StorageImpl* key = cpu.unsafeGetStorageImpl();
    auto it = to_cuda.find(key);
    if (it == to_cuda.end()) {
      void* data = const_cast<void*>(cpu.data());
      std::size_t n = cpu.nbytes();
      c10::DataPtr dp(data, new Keep{cpu}, [](void* ctx) { delete static_cast<Keep*>(ctx); }, kCuda);
      it = to_cuda.emplace(key, c10::Storage(c10::Storage::use_byte_size_t(), n, std::move(dp),
                                             &host_cuda_allocator, true)).first;
    }
    return it->second;
  }

  at::Tensor out(const at::Tensor& t) {
    if (!t.defined() || t.device().type() != c10::DeviceType::CPU) return t;
    for (auto& [cuda, alias] : args)  // an argument returned (in-place, out=): itself
      if (alias.unsafeGetTensorImpl() == t.unsafeGetTensorImpl()) return cuda;
    for (c10::TensorImpl* a : cpu_args)  // a CPU argument returned (copy_ into the host): itself
      if (a == t.unsafeGetTensorImpl()) return t;
    return with_storage(label(t.storage()), c10::DispatchKey::CUDA, t);
  }
};

// Which CPU tensor arguments a GPU takes beside CUDA ones: any in a copy; an index tensor
// (indexing and index_put_ move them); else only a 0-dim one that is read (a CPU scalar), not
// written (in place or out=).
bool cpu_arg_allowed(const std::string& op, std::size_t arg, bool written, const at::Tensor& t) {
  if (op == "aten::copy_" || op == "aten::_copy_from" || op == "aten::_copy_from_and_resize") return true;
  if ((op == "aten::index" || op == "aten::index_put_" || op == "aten::index_put" ||
       op == "aten::_index_put_impl_") && arg == 1)
    return true;
  return !written && t.dim() == 0;
}

struct Seen {  // a tensor argument: its position in the schema and whether the op writes it
  at::Tensor t;
  std::size_t arg;
  bool written;
};

void check_devices(const c10::OperatorHandle& op, const std::vector<Seen>& seen, bool cpu_storage) {
  const std::string& name = op.schema().name();
  bool cuda = false;
  for (const auto& s : seen)
    if (s.t.defined() && s.t.device().type() == c10::DeviceType::CUDA) cuda = true;
  if (!cuda) return;
  bool mixed = cpu_storage;
  for (const auto& s : seen)
    if (s.t.defined() && s.t.device().type() == c10::DeviceType::CPU && !cpu_arg_allowed(name, s.arg, s.written, s.t))
      mixed = true;
  TORCH_CHECK(!mixed, "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
              "(host CUDA, in ", name, ")");
}

void host_cuda_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const std::size_t nargs = schema.arguments().size();
  std::vector<Seen> seen;
  bool cpu_storage = false;
  Call call;
  for (std::size_t i = 0; i < nargs; ++i) {
    c10::IValue& v = (*stack)[stack->size() - nargs + i];
    const c10::AliasInfo* info = schema.arguments()[i].alias_info();
    const bool written = info != nullptr && info->isWrite();
    if (v.isTensor()) {
      seen.push_back({v.toTensor(), i, written});
      v = call.in(v.toTensor());
    } else if (v.isTensorList()) {
      auto list = v.toTensorList();
      c10::List<at::Tensor> mapped;
      for (const at::Tensor& t : list) {
        seen.push_back({t, i, written});
        mapped.push_back(call.in(t));
      }
      v = mapped;
    } else if (v.isOptionalTensorList()) {
      auto list = v.toOptionalTensorList();
      c10::List<std::optional<at::Tensor>> mapped;
      for (std::optional<at::Tensor> t : list) {
        if (t.has_value()) seen.push_back({*t, i, written});
        mapped.push_back(t.has_value() ? std::optional<at::Tensor>(call.in(*t)) : std::nullopt);
      }
      v = mapped;
    } else if (v.isDevice() && v.toDevice().type() == c10::DeviceType::CUDA) {
      TORCH_CHECK(v.toDevice().index() <= 0, "host CUDA has one device (cuda:0), asked for ", v.toDevice());
      v = c10::IValue(c10::Device(c10::kCPU));
    } else if (v.isStorage()) {
      if (v.toStorage().device_type() == c10::DeviceType::CUDA)
        v = c10::IValue(call.alias_of(v.toStorage()));
      else
        cpu_storage = true;  // host memory given to a CUDA tensor (set_): a GPU refuses it
    }
  }
  check_devices(op, seen, cpu_storage);
  try {
    op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);
  } catch (c10::Error& e) {
    e.add_context("host CUDA ran " + schema.operator_name().name + (schema.overload_name().empty() ? "" : "." + schema.overload_name()) + " on the CPU");
    throw;
  }
  call.settle();
  const std::size_t nret = schema.returns().size();
  for (std::size_t i = stack->size() - nret; i < stack->size(); ++i) {
    c10::IValue& v = (*stack)[i];
    if (v.isTensor()) {
      v = call.out(v.toTensor());
    } else if (v.isTensorList()) {
      c10::List<at::Tensor> mapped;
      for (const at::Tensor& t : v.toTensorList()) mapped.push_back(call.out(t));
      v = mapped;
    }
  }
}

// resize_ as torch's (resize_impl_cpu_): the same sizes keep the strides; otherwise contiguous,
// the storage grown through its own allocator (the CPU alias cannot own CUDA memory).
const at::Tensor& host_cuda_resize_(const at::Tensor& self, c10::SymIntArrayRef size,
                                    std::optional<c10::MemoryFormat> fmt) {
  std::vector<int64_t> sizes;
  for (const auto& s : size) {
    sizes.push_back(s.expect_int());
    TORCH_CHECK(sizes.back() >= 0, "Trying to create tensor with negative dimension ", sizes.back());
  }
  auto* impl = self.unsafeGetTensorImpl();
  if (self.sizes() != c10::IntArrayRef(sizes)) {
    impl->set_sizes_contiguous(sizes);
    const int64_t need = impl->numel() == 0 ? 0 : (self.storage_offset() + impl->numel()) * self.itemsize();
    c10::StorageImpl* st = self.storage().unsafeGetStorageImpl();
    if (need > static_cast<int64_t>(st->nbytes())) {
      TORCH_CHECK(st->resizable(), "Trying to resize storage that is not resizable");
      c10::DataPtr fresh = host_cuda_allocator.allocate(need);
      if (st->nbytes()) std::memcpy(fresh.get(), st->data(), st->nbytes());
      st->set_data_ptr_noswap(std::move(fresh));
      st->set_nbytes(need);
    }
  }
  if (fmt.has_value()) {
    TORCH_CHECK(*fmt != c10::MemoryFormat::Preserve, "Unsupported memory format", *fmt);
    impl->empty_tensor_restride(*fmt);
  }
  return self;
}

}  // namespace

REGISTER_ALLOCATOR(c10::DeviceType::CUDA, &host_cuda_allocator);

TORCH_LIBRARY_IMPL(_, CUDA, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&host_cuda_fallback>());
}

TORCH_LIBRARY_IMPL(aten, CUDA, m) {
  m.impl("resize_", TORCH_FN(host_cuda_resize_));
  // Composite kernels that pick a device's stub (missing for CUDA in this build): taken by the
  // fallback instead, so the CPU's runs on the aliases.
  for (const char* op : {"copy_"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&host_cuda_fallback>());
}
