// The scheduler of emu.h (one ucontext fiber per CUDA thread, a block at a time) and the C
// entry points the tests call through ctypes: the launchers of csrc/cuda/fake_quant.h and
// pack.h, on host memory, with device 0 current and a settable SM count (it sizes the grids:
// with few SMs the grid-stride loops make several trips on small inputs).
#include <ucontext.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda/bitplane.h"
#include "cuda/fake_quant.h"
#include "cuda/pack.h"
#include "emu.h"

uint3 threadIdx, blockIdx, gridDim, blockDim;

namespace {

enum State { kRun, kWarp, kBlock, kDone };
struct Fiber {
  ucontext_t ctx;
  State state;
};
constexpr size_t kStackBytes = 128 * 1024;

ucontext_t g_sched;
std::vector<Fiber> g_fibers;
std::vector<std::unique_ptr<char[]>> g_stacks;  // kept between blocks and launches
std::vector<uint64_t> g_slots;
unsigned g_cur = 0;
const std::function<void()>* g_body = nullptr;
std::string g_fiber_error;  // set by a fiber that failed; the scheduler throws it
cudaError_t g_last_error = cudaSuccess;
int g_sm_count = 1;
unsigned g_block_seed = 0;  // 0: blocks in index order; else a shuffled order
long long g_launches = 0;    // kernel launches run so far (what grouping saves shows here)
unsigned g_warp_seed = 0;   // 0: a block's warps in lockstep; else one at a time, shuffled
struct Range {
  uintptr_t lo, hi;
};
std::vector<Range> g_ranges;
std::string g_message;  // the last C entry's error

void yield_as(State s) {
  Fiber& f = g_fibers[g_cur];
  f.state = s;
  swapcontext(&f.ctx, &g_sched);
}

[[noreturn]] void fiber_fail(const std::string& what) { throw std::runtime_error(what); }

void trampoline() {
  try {
    (*g_body)();
  } catch (const std::exception& e) {
    g_fiber_error = std::string("thread ") + std::to_string(threadIdx.x) + " of block " +
                    std::to_string(blockIdx.x) + ": " + e.what();
  }
  g_fibers[g_cur].state = kDone;  // returning switches to uc_link, the scheduler
}

void run_block(unsigned nthreads) {
  g_fibers.assign(nthreads, Fiber{});
  while (g_stacks.size() < nthreads) g_stacks.emplace_back(new char[kStackBytes]);
  g_slots.assign(((nthreads + 31) / 32) * 32, 0);
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = g_fibers[t];
    f.state = kRun;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = g_stacks[t].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, trampoline, 0);
  }
  const unsigned nwarps = (nthreads + 31) / 32;
  // A warp meeting point that lanes lo..hi-1 have reached: all of them (release it) or an
  // error (some exited or wait at __syncthreads: the full mask would hang on a GPU).
  const auto release_warp = [&](unsigned w) {
    const unsigned lo = w * 32, hi = std::min(nthreads, lo + 32);
    unsigned at = 0;
    for (unsigned t = lo; t < hi; ++t) at += g_fibers[t].state == kWarp;
    if (at == 0) return false;
    if (at != hi - lo)
      throw std::runtime_error("block " + std::to_string(blockIdx.x) + ", warp " + std::to_string(w) +
                               ": a full-mask shuffle or ballot reached by " + std::to_string(at) + " of its " +
                               std::to_string(hi - lo) + " lanes (the others exited or wait at __syncthreads)");
    for (unsigned t = lo; t < hi; ++t) g_fibers[t].state = kRun;
    return true;
  };
  const auto run_fiber = [&](unsigned t) {
    g_cur = t;
    threadIdx = uint3{t, 0, 0};
    swapcontext(&g_sched, &g_fibers[t].ctx);
    if (!g_fiber_error.empty()) throw std::runtime_error(g_fiber_error);
  };
  // Warps one at a time (g_warp_seed != 0): each runs as far as it can (to a __syncthreads
  // or its end) before the next, in an order shuffled per block and per barrier phase, so a
  // warp that overtakes the others shows a missing barrier (e.g. shared memory reused
  // before another warp has read it).
  std::vector<unsigned> worder(nwarps);
  std::iota(worder.begin(), worder.end(), 0u);
  std::mt19937 wrng(g_warp_seed ^ (blockIdx.x * 0x9E3779B9u));
  for (;;) {
    bool released = false;
    if (g_warp_seed != 0) {
      std::shuffle(worder.begin(), worder.end(), wrng);
      for (unsigned w : worder) {
        const unsigned lo = w * 32, hi = std::min(nthreads, lo + 32);
        do {
          for (unsigned t = lo; t < hi; ++t)
            if (g_fibers[t].state == kRun) run_fiber(t);
        } while (release_warp(w));
      }
    } else {
      // Lockstep: every runnable thread in index order, then every warp meeting point that
      // all its lanes reached.
      for (unsigned t = 0; t < nthreads; ++t)
        if (g_fibers[t].state == kRun) run_fiber(t);
      for (unsigned w = 0; w < nwarps; ++w) released = release_warp(w) || released;
    }
    if (released) continue;
    unsigned at_block = 0, done = 0;
    for (const Fiber& f : g_fibers) {
      at_block += f.state == kBlock;
      done += f.state == kDone;
    }
    if (done == nthreads) return;
    if (at_block + done != nthreads) throw std::runtime_error("emulator: no thread can run");
    for (Fiber& f : g_fibers)
      if (f.state == kBlock) f.state = kRun;
  }
}

template <class F>
int guard(F&& f) {
  g_fiber_error.clear();
  g_message.clear();
  try {
    f();
    return 0;
  } catch (const std::invalid_argument& e) {
    g_message = e.what();
    return 1;
  } catch (const std::exception& e) {
    g_message = e.what();
    return 2;
  }
}

}  // namespace

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : err == cudaErrorInvalidConfiguration ? "invalid configuration argument"
                                                                               : "invalid argument";
}
const char* cudaGetErrorName(cudaError_t err) {
  return err == cudaSuccess ? "cudaSuccess" : err == cudaErrorInvalidConfiguration ? "cudaErrorInvalidConfiguration"
                                                                                  : "cudaErrorInvalidValue";
}

namespace emu {

void warp_sync() { yield_as(kWarp); }
void block_sync() { yield_as(kBlock); }
uint64_t* warp_slots() { return g_slots.data() + (g_cur / 32) * 32; }

void check_mask(unsigned mask, const char* op) {
  if (mask != 0xffffffffu) fiber_fail(std::string(op) + " with a partial mask (the emulator models full warps only)");
}

void check_load(const void* p, size_t bytes, size_t align) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), b = a + bytes;
  if (a % align != 0) fiber_fail("misaligned load of " + std::to_string(bytes) + " bytes");
  if (g_ranges.empty()) return;
  for (const Range& r : g_ranges) {
    const uintptr_t lo16 = r.lo & ~uintptr_t{15}, hi16 = (r.hi + 15) & ~uintptr_t{15};
    if (a >= lo16 && b <= hi16 && a < r.hi && b > r.lo) return;
  }
  fiber_fail("load of " + std::to_string(bytes) + " bytes outside every buffer (or outside the 16-byte span of one)");
}

void run(unsigned grid, int block, const std::function<void()>& body) {
  if (grid < 1 || block < 1 || block > 1024) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  ++g_launches;
  g_body = &body;
  gridDim = uint3{grid, 1, 1};
  blockDim = uint3{static_cast<unsigned>(block), 1, 1};
  // Blocks one after another, in index order or shuffled: a grid-wide reduction must not
  // depend on which block arrives last.
  std::vector<unsigned> order(grid);
  std::iota(order.begin(), order.end(), 0u);
  if (g_block_seed != 0) std::shuffle(order.begin(), order.end(), std::mt19937(g_block_seed));
  for (unsigned b : order) {
    blockIdx = uint3{b, 0, 0};
    run_block(static_cast<unsigned>(block));
  }
}

}  // namespace emu

namespace fedmpq::cuda::detail {
void require_current_device(int device) {
  if (device != 0)
    throw std::invalid_argument("the current CUDA device is 0 but the tensors are on cuda:" + std::to_string(device) +
                                "; launch under torch.cuda.device(" + std::to_string(device) + ")");
}
int sm_count(int) { return g_sm_count; }
}  // namespace fedmpq::cuda::detail

namespace fc = fedmpq::cuda;

extern "C" {

const char* emu_message() { return g_message.c_str(); }
void emu_set_sm_count(int n) { g_sm_count = n > 0 ? n : 1; }
void emu_set_block_order(unsigned seed) { g_block_seed = seed; }
long long emu_launches() { return g_launches; }
void emu_set_warp_order(unsigned seed) { g_warp_seed = seed; }
void emu_clear_ranges() { g_ranges.clear(); }
void emu_add_range(const void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  g_ranges.push_back(Range{a, a + bytes});
}
long long emu_workspace_words(int device) { return fc::workspace_words(device); }

// The 16-bit conversions of emu.h, for their test.
void emu_to_half(const float* x, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __half_as_ushort(__float2half_rn(x[i]));
}
void emu_from_half(const uint16_t* x, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __half2float(__ushort_as_half(x[i]));
}
void emu_to_bfloat16(const float* x, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
}

int emu_absmax(const void* x, int dtype, long long n, uint32_t* out_bits, unsigned* ws, int device) {
  return guard([&] { fc::absmax(x, dtype, n, out_bits, ws, device, 0); });
}
int emu_fake_quant(const void* x, void* y, int dtype, long long n, int bits, const float* scale, int scale_given,
                   uint32_t* pass, uint32_t* hi, int device) {
  return guard([&] { fc::fake_quant(x, y, dtype, n, bits, scale, scale_given != 0, pass, hi, device, 0); });
}
int emu_relu6_fake_quant(const void* x, void* y, int dtype, long long n, int bits, float* scale, uint32_t* mask,
                         unsigned* ws, int device) {
  return guard([&] { fc::relu6_fake_quant(x, y, dtype, n, bits, scale, mask, ws, device, 0); });
}
int emu_fake_quant_backward(const void* g, void* gx, int dtype, long long n, const uint32_t* pass,
                            const uint32_t* hi, unsigned* ws, float* grad_scale, int device) {
  return guard([&] { fc::fake_quant_backward(g, gx, dtype, n, pass, hi, ws, grad_scale, device, 0); });
}
int emu_pack_codes(const uint8_t* codes, long long n, int bits, uint32_t* planes, uint32_t* seen, int device) {
  return guard([&] { fc::pack_codes(codes, n, bits, planes, seen, device, 0); });
}
int emu_unpack_codes(const uint32_t* planes, long long n, int bits, uint8_t* codes, int device) {
  return guard([&] { fc::unpack_codes(planes, n, bits, codes, device, 0); });
}
int emu_dequant_accumulate(float* acc, long long n, const uint32_t* planes, const uint32_t* signs, int bits,
                           float coef, int device) {
  return guard([&] { fc::dequant_accumulate(acc, n, planes, signs, bits, coef, device, 0); });
}
long long emu_bitplane_workspace_words(int device) { return fc::bitplane_workspace_words(device); }
int emu_binarize(const float* w, long long n, int bits, uint8_t* codes, uint32_t* sign, float* scale, unsigned* ws,
                 int device) {
  return guard([&] { fc::binarize(w, n, bits, codes, sign, scale, ws, device, 0); });
}
int emu_dequantize(const uint8_t* codes, const uint32_t* sign, long long n, int bits, const float* scale, float* out,
                   int device) {
  return guard([&] { fc::dequantize(codes, sign, n, bits, scale, out, device, 0); });
}
int emu_dequantize_backward(const float* grad, const uint8_t* codes, const uint32_t* sign, long long n, int bits,
                            float* out, unsigned* ws, int device) {
  return guard([&] { fc::dequantize_backward(grad, codes, sign, n, bits, out, ws, device, 0); });
}
int emu_plane_popcounts(const uint8_t* codes, long long n, int bits, int64_t* out, unsigned* ws, int device) {
  return guard([&] { fc::plane_popcounts(codes, n, bits, out, ws, device, 0); });
}
int emu_bitplane_step(uint8_t* codes, uint32_t* sign, uint8_t* mom, float* gs, const float* grad, const float* coef,
                      const float* scale, long long n, int bits, float lr, float momentum, unsigned key,
                      const int64_t* key_ptr, float* out, unsigned* ws, int device) {
  return guard([&] {
    fc::bitplane_step(codes, sign, mom, gs, grad, coef, scale, n, bits, lr, momentum, key, key_ptr, out, ws, device,
                      0);
  });
}

// The many-layer launchers take their layer tables as arrays of the structs of bitplane.h
// (tests/cuda_emu/__init__.py mirrors them in ctypes and checks the sizes).
size_t emu_step_layer_size() { return sizeof(fc::StepLayer); }
size_t emu_popcount_layer_size() { return sizeof(fc::PopcountLayer); }
int emu_bitplane_step_layers(const fc::StepLayer* layers, long long count, float lr, float momentum, float* out,
                             unsigned* ws, int device) {
  return guard([&] { fc::bitplane_step_layers(layers, count, lr, momentum, out, ws, device, 0); });
}
int emu_plane_popcounts_layers(const fc::PopcountLayer* layers, long long count, int64_t* out, unsigned* ws,
                               int device) {
  return guard([&] { fc::plane_popcounts_layers(layers, count, out, ws, device, 0); });
}
size_t emu_dequant_layer_size() { return sizeof(fc::DequantLayer); }
size_t emu_dequant_grad_layer_size() { return sizeof(fc::DequantGradLayer); }
int emu_dequantize_layers(const fc::DequantLayer* layers, long long count, int device) {
  return guard([&] { fc::dequantize_layers(layers, count, device, 0); });
}
int emu_dequantize_backward_layers(const fc::DequantGradLayer* layers, long long count, unsigned* ws, int device) {
  return guard([&] { fc::dequantize_backward_layers(layers, count, ws, device, 0); });
}

}  // extern "C"
