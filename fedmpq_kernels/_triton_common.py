"""Triton pieces every family's Triton backend shares (imported only by those backends).

* Tiles: a kernel works on a ``[ROWS, 32]`` tile of a flattened tensor, row r of program p
  being elements ``p * BLOCK + 32 * r + (0..31)``: exactly one word of a bitmap (the layout
  of :mod:`fedmpq_kernels.pack.reference`). :func:`load_bits` unpacks the tile's words with
  ``(word >> col) & 1``; :func:`store_words` packs 0/1 with a per-row int32 sum of
  ``bit << col`` (distinct powers of two: the sum is the OR; bit 31 wraps to the right
  pattern). ``MASKED`` is the last, partial block's path (``word < nwords``).
* :func:`absmax_partial_kernel`: one partial max per program of the float32 bit patterns of
  |x| as int32 (for non-negative floats integer order is float order, and NaN patterns sort
  above +inf, so a NaN propagates); :func:`absmax` reduces them on the device, with no host
  synchronization.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# The Triton interpreter (CPU tensors, the CI path) has no bfloat16.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def load_bits(ptr, word, col, nwords, MASKED: tl.constexpr):
    """[ROWS, 32] int32 0/1: bit ``col`` of bitmap word ``word`` (0 past ``nwords`` when MASKED)."""
    if MASKED:
        w = tl.load(ptr + word, mask=word < nwords, other=0)
    else:
        w = tl.load(ptr + word)
    return (w[:, None] >> col[None, :]) & 1


@triton.jit
def store_words(ptr, word, bits, col, nwords, MASKED: tl.constexpr):
    """Pack [ROWS, 32] 0/1 int32 (0 past n) into one int32 bitmap word per row."""
    w = tl.sum(bits << col[None, :], axis=1)  # distinct powers of two: the sum is the OR
    if MASKED:
        tl.store(ptr + word, w, mask=word < nwords)
    else:
        tl.store(ptr + word, w)


@triton.jit
def relu6(x):
    """relu6_fake_quant's ``a``: min(x, 6) where x > 0, x where x is NaN, else +0."""
    return tl.where(x > 0.0, tl.where(x < 6.0, x, 6.0), tl.where(x != x, x, 0.0))


@triton.jit
def absmax_partial_kernel(x_ptr, part_ptr, n, BLOCK: tl.constexpr, RELU6: tl.constexpr = False):
    """part[pid] = the int32 bit pattern of max |x| over the program's block (of relu6(x)
    with ``RELU6``)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:  # full block: unmasked, vectorizable loads
        x = tl.load(x_ptr + offs).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    if RELU6:  # max of a = relu6(x) (>= +0, or NaN)
        x = relu6(x)
    ab = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # |x| bits; NaN sorts above +inf
    tl.store(part_ptr + pid, tl.max(ab, axis=0))


def absmax(x: Tensor, n: int, block: int, num_warps: int, relu6: bool = False) -> Tensor:
    """max |x| (of relu6(x) with ``relu6``) of a contiguous tensor of n > 0 elements, as a
    float32 0-dim tensor on x's device, computed there. Call it under
    :func:`fedmpq_kernels._device.on_device`."""
    grid = (triton.cdiv(n, block),)
    part = torch.empty(grid[0], dtype=torch.int32, device=x.device)
    absmax_partial_kernel[grid](x, part, n, BLOCK=block, RELU6=relu6, num_warps=num_warps, enable_fp_fusion=False)
    return part.max().view(torch.float32)
