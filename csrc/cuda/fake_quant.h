// Fake-quant CUDA kernels: the same math, bitmaps and NaN rules as cpu/fake_quant.h.
// Every pointer is a device pointer owned by the caller (the Python adapter allocates
// with torch); `stream` is a cudaStream_t passed as an integer. Launchers are
// asynchronous and never synchronize the device. `device` must be the current device
// (the adapter launches under torch.cuda.device(...)): a launcher never switches devices,
// which would change torch's current device too, and throws std::invalid_argument when
// it is not. Inputs may start at any element offset (a slice x[k:]); outputs y/gx are
// fastest 16-byte aligned (fresh torch allocations are). An output must not overlap its
// input, not even as the same buffer: the kernels read inputs through the read-only data
// cache (__ldg), which PTX allows only for memory no thread writes during the kernel (the
// bindings refuse it; the CPU kernels do run in place).
#pragma once
#include <cstdint>

namespace fedmpq::cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The 4-byte words of a reduction workspace on `device`: one ticket (word 0) and a slot per
// block of the largest grid of any kernel below (8 blocks per SM). Zero before its first
// launch; every launch leaves the ticket zero again (the last block to finish reduces the
// blocks' partial results and resets the ticket, so a reduction costs no second launch). The
// slots keep the last launch's partials: each block writes its slot before it takes a ticket,
// so no launch reads a value it did not write. Launches sharing a workspace must be ordered
// (one stream).
int64_t workspace_words(int device);

// Writes the bit pattern of max|x| (NaN-propagating) into *out_bits (no initial value
// needed). n == 0 launches nothing.
void absmax(const void* x, int dtype, int64_t n, uint32_t* out_bits, unsigned* workspace, int device,
            uintptr_t stream);

// y = fake-quant(x); scale points at one float32 on the device (a given scale, or the
// absmax result reinterpreted). When scale_given and the value is not finite and > 0,
// every output is NaN (the value is never read on the host, which would synchronize).
// pass/hi may be null; when set they hold (n + 31) / 32 words.
void fake_quant(const void* x, void* y, int dtype, int64_t n, int bits, const float* scale, bool scale_given,
                uint32_t* pass, uint32_t* hi, int device, uintptr_t stream);

// ReLU6 fused with the dynamic-scale quantizer (reference.relu6_fake_quant, as
// cpu/fake_quant.h's relu6_fake_quant): a = x > 0 ? min(x, 6) : (x is NaN ? x : +0),
// S = max a, y = fake-quant(a) with S, mask bit = 0 < x < 6 (pass-bitmap layout; mask may
// be null, else (n + 31) / 32 words). Two launches on `stream`: the max of a, reduced in
// the kernel's last block (workspace: see workspace_words) into *scale (one float32 on the
// device, no initial value needed; it holds S afterwards), then the quantizer reading S
// there; no host synchronization. n == 0 launches nothing.
// Compiled for sm_80/sm_90 and tested on the host under tests/cuda_emu, but NOT yet run on
// a GPU (tools/gpu_check.sh runs its tests).
void relu6_fake_quant(const void* x, void* y, int dtype, int64_t n, int bits, float* scale, uint32_t* mask,
                      unsigned* workspace, int device, uintptr_t stream);

// gx = pass ? g : 0. When hi is non-null, *grad_scale = the sum of (hi ? g : -g) over the
// clipped elements, float32, in an order fixed by n and the device (deterministic), reduced
// in the same launch (workspace: see workspace_words); without hi, a non-null grad_scale
// gets 0 in the same launch. n == 0 launches nothing (the caller writes 0).
void fake_quant_backward(const void* g, void* gx, int dtype, int64_t n, const uint32_t* pass,
                         const uint32_t* hi, unsigned* workspace, float* grad_scale, int device, uintptr_t stream);

// Runtime facts for fedmpq_kernels.info.
int device_count();
const char* compiled_archs();

}  // namespace fedmpq::cuda
