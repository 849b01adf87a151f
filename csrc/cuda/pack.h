// Bit-plane packing, CUDA kernels: the layout and arithmetic of cpu/pack.h
// (fedmpq_kernels/pack/reference.py states them in full). Every pointer is a device pointer
// owned by the caller (the Python adapter allocates with torch); `stream` is a cudaStream_t
// passed as an integer. Launchers are asynchronous and never synchronize the device.
// `device` must be the current device (the adapter launches under torch.cuda.device(...)):
// a launcher never switches devices and throws std::invalid_argument when it is not.
// planes and signs are 4-byte aligned (uint32 words); codes and acc may start anywhere their
// element type allows (a 16-byte-aligned one takes the vector path, any other the scalar
// one). n == 0 launches nothing.
#pragma once
#include <cstdint>

namespace fedmpq::cuda {

// codes[0..n) (one byte each) -> planes[bits * words], words = ceil(n/32). ORs every code
// into *seen with atomicOr (only nonzero ORs are written), so the caller can reject a code
// >= 2^bits after the kernel (the planes are then meaningless) without a second pass. *seen
// may hold earlier calls' ORs (the adapter keeps one word per bit-width and device and
// clears it when it reads it: fedmpq_kernels.check_packed).
void pack_codes(const uint8_t* codes, int64_t n, int bits, uint32_t* planes, uint32_t* seen, int device,
                uintptr_t stream);

// planes[bits * words] -> codes[0..n).
void unpack_codes(const uint32_t* planes, int64_t n, int bits, uint8_t* codes, int device, uintptr_t stream);

// acc[j] += (signs bit j ? -1 : 1) * (coef * q_j), q_j the code in `planes`, float32 with
// every product and sum rounded on its own (--fmad=false, __fmul_rn, __fadd_rn: the
// reference's order). signs may be null (all positive).
void dequant_accumulate(float* acc, int64_t n, const uint32_t* planes, const uint32_t* signs, int bits, float coef,
                        int device, uintptr_t stream);

}  // namespace fedmpq::cuda
