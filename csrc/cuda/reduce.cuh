// Block and grid reductions shared by the CUDA kernels (fake_quant.cu, bitplane.cu): a
// fixed-order block reduction, and a grid-wide reduction finished by the last block to
// arrive, so that a reduction costs no second launch and no host work. Not part of the
// public interface.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fedmpq::cuda::detail {

struct SumOp {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {
  __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const { return a > b ? a : b; }
};

// The block's reduction of one value per thread, in a fixed order (xor shuffles within each
// warp, then warp 0 over the warps' results): the result is valid in thread 0. Every thread
// of the block must call it; it ends with the shared slots free for reuse after a barrier.
template <int kBlock, class T, class Op>
__device__ __forceinline__ T block_reduce(T v, T identity, Op op) {
  constexpr int kWarps = kBlock / 32;
  __shared__ T warp_val[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (lane == 0) warp_val[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_val[lane] : identity;
#pragma unroll
    for (int off = kWarps / 2; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  }
  return v;
}

// The grid-wide reductions' workspace `ws` (csrc/cuda/fake_quant.h, workspace_words): a ticket
// in ws[0], zero on entry, then the blocks' slots. A block stores its slots, then calls
// last_block: thread 0 fences (the slots are visible device-wide before the ticket says so)
// and takes a ticket. It returns true in every thread of the block holding ticket
// gridDim.x - 1, which may then read every block's slots (combine_slots) and must call
// release_ticket when done. Every thread of the block must call it.
__device__ __forceinline__ bool last_block(unsigned* __restrict__ ws) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
    __threadfence();  // this block's slots are visible device-wide before its ticket
    last = atomicAdd(ws, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last) __threadfence();  // every other block's slots are visible now (they fenced before their ticket)
  return last;
}

// Sets the ticket back to 0 for the next launch on the stream (the workspace is reused).
__device__ __forceinline__ void release_ticket(unsigned* __restrict__ ws) {
  if (threadIdx.x == 0) *ws = 0u;
}

// The slots of a workspace for values of type T: after the ticket, aligned to sizeof(T)
// (4- and 8-byte values; the workspace itself is 8-byte aligned).
template <class T>
__device__ __forceinline__ T* slots(unsigned* ws) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "4- or 8-byte slots");
  return reinterpret_cast<T*>(ws + sizeof(T) / 4);
}

// In the last block (after last_block returned true): the combination of `count` blocks'
// slots, slot[b * stride] for b = 0 .. count - 1, in a fixed order (thread t takes t,
// t + kBlock, ... in turn, then block_reduce), valid in thread 0. Read with __ldcg (L2, not a
// stale L1). Every thread of the block must call it; a second call needs a barrier first
// (block_reduce's shared slots).
template <int kBlock, class T, class Op>
__device__ __forceinline__ T combine_slots(const T* slot, unsigned count, int64_t stride, T identity, Op op) {
  T acc = identity;
  for (unsigned b = threadIdx.x; b < count; b += kBlock) acc = op(acc, __ldcg(slot + b * stride));
  return block_reduce<kBlock>(acc, identity, op);
}

// combine_slots over every block of the grid.
template <int kBlock, class T, class Op>
__device__ __forceinline__ T combine_slots(const T* slot, int64_t stride, T identity, Op op) {
  return combine_slots<kBlock>(slot, gridDim.x, stride, identity, op);
}

// The grid's reduction of one value per block (`v`, valid in thread 0), finished by the last
// block: block b stores v in slot b; the last block combines the slots (combine_slots) into
// *out and releases the ticket. The result depends on the grid size only, never on which block
// arrived last: deterministic. A call rather than inlined code (it runs once per block,
// after the loops) keeps the fake-quant kernels within their 32 registers (ptxas -v, sm_80
// and sm_90). Every thread of the block must call it.
template <int kBlock, class T, class Op>
__device__ __noinline__ void finish_in_last_block(T v, T identity, Op op, unsigned* __restrict__ ws,
                                                     T* __restrict__ out) {
  T* partials = slots<T>(ws);
  if (threadIdx.x == 0) partials[blockIdx.x] = v;
  if (!last_block(ws)) return;
  const T acc = combine_slots<kBlock>(partials, 1, identity, op);
  if (threadIdx.x == 0) *out = acc;
  release_ticket(ws);
}

}  // namespace fedmpq::cuda::detail
