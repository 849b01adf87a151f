// Bit-plane training, CUDA kernels: binarize, dequantize, its scale gradient, plane popcounts
// and the fused optimizer step, with the storage and the float32 order of every operation of
// cpu/bitplane.h (fedmpq_kernels/bitplane/reference.py states them in full). Every pointer is
// a device pointer owned by the caller (the Python adapter allocates with torch); `stream` is
// a cudaStream_t passed as an integer. Launchers are asynchronous and never synchronize the
// device: scalars (the scale, g_s, the generator key) stay on the device. `device` must be
// the current device (the adapter launches under torch.cuda.device(...)): a launcher never
// switches devices and throws std::invalid_argument when it is not. codes, mom and the
// float buffers may start anywhere their element type allows; sign words are 4-byte
// aligned. n == 0 launches nothing.
//
// Reductions finish in the kernel's last block, in a workspace of bitplane_workspace_words
// 4-byte words, 8-byte aligned (a ticket, then the blocks' slots; see workspace_words in
// fake_quant.h: the same contract, and the same workspace may serve both families).
#pragma once
#include <cstdint>

namespace fedmpq::cuda {

// The 4-byte words a workspace for every launcher below needs on `device`.
int64_t bitplane_workspace_words(int device);

// w[0..n) float32 -> codes[n], sign words, *scale = max|w| (float32, NaN-propagating; the
// caller refuses a non-finite w first): q = min(round_half_even(|w| * (L / s)), L) (s = 0:
// q = 0), negative = !(w > 0). Two launches: fake_quant.h's absmax into *scale, then the
// quantizer reading it there.
void binarize(const float* w, int64_t n, int bits, uint8_t* codes, uint32_t* sign, float* scale, unsigned* workspace,
              int device, uintptr_t stream);

// out[j] = sigma_j * (q_j * (*scale / L)), float32, L = 2^bits - 1.
void dequantize(const uint8_t* codes, const uint32_t* sign, int64_t n, int bits, const float* scale, float* out,
                int device, uintptr_t stream);

// *out = (sum_j sigma_j q_j grad_j, in float64) / L, rounded to float32: each block sums its
// elements, the last block adds the blocks' sums in a fixed order (deterministic for a given
// n and device).
void dequantize_backward(const float* grad, const uint8_t* codes, const uint32_t* sign, int64_t n, int bits,
                         float* out, unsigned* workspace, int device, uintptr_t stream);

// out[i] (int64) = the codes with bit bits-1-i set, i = 0..bits-1; one launch.
void plane_popcounts(const uint8_t* codes, int64_t n, int bits, int64_t* out, unsigned* workspace, int device,
                     uintptr_t stream);

// The fused step (reference.bitplane_step), in place on codes, sign, mom (bits * n,
// plane-major) and *gs; grad[n] and coef[bits] float32, *scale float32. lr and momentum are
// float32 as the reference rounds them. The generator key is *key_ptr's low 32 bits when
// key_ptr is not null (an int64 on the device), else `key`. n < 2^32. Two launches: the max
// of |d| finished in the last block, which writes out[0] = g_s (not finite: the step is
// skipped; +inf also when lr * g_s overflows) and out[1] = the previous gs, and sets *gs;
// then the update, which reads them there.
void bitplane_step(uint8_t* codes, uint32_t* sign, uint8_t* mom, float* gs, const float* grad, const float* coef,
                   const float* scale, int64_t n, int bits, float lr, float momentum, uint32_t key,
                   const int64_t* key_ptr, float* out, unsigned* workspace, int device, uintptr_t stream);

// One layer of the many-layer launchers below: bitplane_step's arguments for that layer.
struct StepLayer {
  uint8_t* codes;
  uint32_t* sign;
  uint8_t* mom;
  float* gs;
  const float* grad;
  const float* coef;
  const float* scale;
  int64_t n;
  int bits;
  uint32_t key;
  const int64_t* key_ptr;
};

// bitplane_step on layers[0..count) in order, layer l's (g_s, previous gs) in out[2l],
// out[2l + 1]; empty layers launch nothing. When no layer writes memory another layer reads
// or writes (a model's layers), the layers go in groups of up to 32 in two launches per
// group (the max of every layer's |d|, then every layer's update): the same bits as layer
// by layer, since each layer's steps touch its own buffers only. Otherwise layer by layer.
void bitplane_step_layers(const StepLayer* layers, int64_t count, float lr, float momentum, float* out,
                          unsigned* workspace, int device, uintptr_t stream);

// One layer of plane_popcounts_layers: its codes, their count and width.
struct PopcountLayer {
  const uint8_t* codes;
  int64_t n;
  int bits;
};

// plane_popcounts of layers[0..count), the counts back to back in out (layer l's at the sum
// of the widths before it; an empty layer's are not written): one launch per group of up to
// 32 layers whose blocks' slots fit the workspace.
void plane_popcounts_layers(const PopcountLayer* layers, int64_t count, int64_t* out, unsigned* workspace, int device,
                            uintptr_t stream);

// One layer of dequantize_layers: dequantize's arguments for that layer.
struct DequantLayer {
  const uint8_t* codes;
  const uint32_t* sign;
  const float* scale;
  float* out;
  int64_t n;
  int bits;
};

// dequantize of layers[0..count) (a model's weights): one launch per group of up to 32
// layers, each layer's blocks as its own launch would have them, so the same bits. When a
// layer's out overlaps another layer's buffers, layer by layer in order instead. Empty
// layers launch nothing; every width is checked before anything launches.
void dequantize_layers(const DequantLayer* layers, int64_t count, int device, uintptr_t stream);

// One layer of dequantize_backward_layers: dequantize_backward's arguments for that layer.
struct DequantGradLayer {
  const float* grad;
  const uint8_t* codes;
  const uint32_t* sign;
  float* out;
  int64_t n;
  int bits;
};

// dequantize_backward of layers[0..count): one launch per group of up to 32 layers whose
// blocks' 8-byte slots fit the workspace. Each layer's blocks and the order its last block
// adds their sums are its own launch's, so every *out is the single-layer result bit for bit.
// When a layer's *out overlaps another layer's grad, codes or sign, layer by layer in order
// instead. An empty layer's *out is not written.
void dequantize_backward_layers(const DequantGradLayer* layers, int64_t count, unsigned* workspace, int device,
                                uintptr_t stream);

}  // namespace fedmpq::cuda
