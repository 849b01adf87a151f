// Fake-quant CUDA kernels: the same math, bitmaps and NaN rules as cpu/fake_quant.h.
// Every pointer is a device pointer owned by the caller (the Python adapter allocates
// with torch); `stream` is a cudaStream_t passed as an integer. Launchers are
// asynchronous and never synchronize the device. `device` must be the current device
// (the adapter launches under torch.cuda.device(...)): a launcher never switches devices,
// which would change torch's current device too, and throws std::invalid_argument when
// it is not. Inputs may start at any element offset (a slice x[k:]); outputs y/gx are
// fastest 16-byte aligned (fresh torch allocations are). An output may be its input (in
// place) but must not overlap it otherwise.
#pragma once
#include <cstdint>

namespace fedmpq::cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Writes the bit pattern of max|x| (NaN-propagating) into *out_bits with atomicMax.
// *out_bits must be zero on entry. n == 0 launches nothing.
void absmax(const void* x, int dtype, int64_t n, uint32_t* out_bits, int device, uintptr_t stream);

// y = fake-quant(x); scale points at one float32 on the device (a given scale, or the
// absmax result reinterpreted). When scale_given and the value is not finite and > 0,
// every output is NaN (the value is never read on the host, which would synchronize).
// pass/hi may be null; when set they hold (n + 31) / 32 words.
void fake_quant(const void* x, void* y, int dtype, int64_t n, int bits, const float* scale, bool scale_given,
                uint32_t* pass, uint32_t* hi, int device, uintptr_t stream);

// Number of float partials fake_quant_backward writes for n elements (its grid size).
int64_t fake_quant_backward_partials(int64_t n, int device);

// gx = pass ? g : 0. When hi is non-null, partials[0 .. fake_quant_backward_partials(n))
// receive per-block sums of (hi ? g : -g) over clipped elements (summed by the caller).
void fake_quant_backward(const void* g, void* gx, int dtype, int64_t n, const uint32_t* pass,
                         const uint32_t* hi, float* partials, int device, uintptr_t stream);

// Runtime facts for fedmpq_kernels.info.
int device_count();
const char* compiled_archs();

}  // namespace fedmpq::cuda
