"""Triton pieces every family's Triton backend shares (imported only by those backends).

* Tiles: a kernel works on a ``[ROWS, 32]`` tile of a flattened tensor, row r of program p
  being elements ``p * BLOCK + 32 * r + (0..31)``: exactly one word of a bitmap (the layout
  of :mod:`fedmpq_kernels.pack.reference`). :func:`load_bits` unpacks the tile's words with
  ``(word >> col) & 1``; :func:`store_words` packs 0/1 with a per-row int32 sum of
  ``bit << col`` (distinct powers of two: the sum is the OR; bit 31 wraps to the right
  pattern). ``MASKED`` is the last, partial block's path (``word < nwords``).
* :func:`finish_in_last_program`: a grid-wide reduction finished in the same launch by the
  program that arrives last (a ticket taken with an atomic add), over one partial result per
  program kept in a workspace (:func:`fedmpq_kernels._device.workspace`), in a fixed order:
  deterministic, no second launch, no host work. A kernel whose last program does more than
  store the result (the bit-plane step's g_s, the popcounts' planes) uses its pieces:
  :func:`take_ticket`, :func:`is_last`, :func:`combine_slots`, :func:`release_workspace`.
* :func:`absmax_kernel`: the max of the float32 bit patterns of |x| as int32 (for
  non-negative floats integer order is float order, and NaN patterns sort above +inf, so a
  NaN propagates), one launch; :func:`absmax` calls it, with no host synchronization.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import raw_stream, workspace

Tensor = torch.Tensor

# The Triton interpreter (CPU tensors, the CI path) has no bfloat16.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# What every launch passes, so that the kernels compute what torch computes, bit for bit: no
# multiply-add contracted into an FMA. (Subnormals are kept without an option: the division
# the kernels use, ``div_rn``, compiles to ``div.rn.f32``, no ``.ftz``, with Triton 3.6 and
# 3.9, not with 3.4 and 3.5, which registry.MIN_TRITON refuses; tests/triton_compile.py fails
# on any ``.ftz`` instruction in a kernel's PTX.)
LAUNCH = {"enable_fp_fusion": False}


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


FINISH = 1024  # partial results the last program combines per step


# The KINDs below, as constexprs: jit code may read a global only when it is one (a plain int
# runs in the interpreter but does not compile for a GPU; tests/triton_compile.py checks).
SUM_F32, MAX_I32, SUM_F64_DIV, SUM_I64 = (tl.constexpr(k) for k in range(4))


@triton.jit
def take_ticket(ws_ptr):
    """This program's ticket, taken after it stored its slots: 0 .. nprog - 1 in the order
    the programs arrive. The one that gets ``nprog - 1`` (see :func:`is_last`) may read
    every program's slots (acq_rel: they are visible to it), then calls
    :func:`release_workspace`."""
    tl.debug_barrier()  # every thread's slot stores before the ticket
    return tl.atomic_add(ws_ptr, 1, sem="acq_rel")


@triton.jit
def is_last(ticket):
    return ticket == tl.num_programs(0) - 1


@triton.jit
def release_workspace(ws_ptr):
    """The last program, done with the slots: the ticket back to 0 for the next launch on
    the stream."""
    tl.atomic_xchg(ws_ptr, 0)


@triton.jit
def combine_slots(slot_ptr, nprog, stride, KIND: tl.constexpr, FINISH: tl.constexpr):
    """The last program's combination of the programs' slots ``slot_ptr + stride * p``, in a
    fixed order (lane j of a FINISH-wide vector takes programs j, j + FINISH, ... in turn,
    then one tree reduction), so the result depends on the grid size only, never on which
    program arrived last. KIND ``SUM_F32``: float32 sum of float32 bits; ``MAX_I32``: int32
    max; ``SUM_F64_DIV``: float64 sum of float64 bits (the division is the caller's);
    ``SUM_I64``: int64 sum of int32 values."""
    if KIND == 1:
        acc = tl.zeros((FINISH,), dtype=tl.int32)
    elif KIND == 0:
        acc = tl.zeros((FINISH,), dtype=tl.float32)
    elif KIND == 2:
        acc = tl.zeros((FINISH,), dtype=tl.float64)
    else:
        acc = tl.zeros((FINISH,), dtype=tl.int64)
    # A while, not range(0, nprog, FINISH): Triton 3.6's interpreter cannot take a program
    # count as a range bound (its num_programs is a 1-element array, not a scalar).
    start = 0
    while start < nprog:
        offs = start + tl.arange(0, FINISH)
        v = tl.load(slot_ptr + offs * stride, mask=offs < nprog, other=0, cache_modifier=".cg")  # L2, not L1
        if KIND == 1:
            acc = tl.maximum(acc, v)
        elif KIND == 0:
            acc += v.to(tl.float32, bitcast=True)
        elif KIND == 2:
            acc += v.to(tl.float64, bitcast=True)
        else:
            acc += v.to(tl.int64)
        start += FINISH
    if KIND == 1:
        return tl.max(acc, axis=0)
    else:
        return tl.sum(acc, axis=0)


@triton.jit
def finish_in_last_program(value, ws_ptr, slot_ptr, out_ptr, divisor, KIND: tl.constexpr, FINISH: tl.constexpr):
    """The grid-wide reduction of one ``value`` per program, stored at ``out_ptr`` by the
    program that arrives last. KIND ``SUM_F32``: float32 sum; ``MAX_I32``: int32 max;
    ``SUM_F64_DIV``: float64 sum, then ``/ divisor`` (float64 division), stored
    as float32.

    ``ws_ptr``: the int32 workspace, ``ws[0]`` a ticket (zero on entry, zero again on exit);
    ``slot_ptr``: the same memory as int32 (32-bit kinds) or int64 (``SUM_F64_DIV``), slot
    ``1 + p`` holding program p's value (its bits); combined by :func:`combine_slots`."""
    pid = tl.program_id(0)
    if KIND == 1:
        tl.store(slot_ptr + 1 + pid, value)
    elif KIND == 0:
        tl.store(slot_ptr + 1 + pid, value.to(tl.int32, bitcast=True))
    else:
        tl.store(slot_ptr + 1 + pid, value.to(tl.int64, bitcast=True))
    if is_last(take_ticket(ws_ptr)):
        total = combine_slots(slot_ptr + 1, tl.num_programs(0), 1, KIND=KIND, FINISH=FINISH)
        if KIND == 2:
            # float64 '/' is IEEE division on NVIDIA (div.rn.f64); div_rn is float32 only
            tl.store(out_ptr, (total / tl.cast(divisor, tl.float64)).to(tl.float32))
        else:
            tl.store(out_ptr, total)
        release_workspace(ws_ptr)


@triton.jit
def absmax_kernel(x_ptr, ws_ptr, out_ptr, n, BLOCK: tl.constexpr, FINISH: tl.constexpr,
                  RELU6: tl.constexpr = False):
    """*out = the int32 bit pattern of max |x| (of relu6(x) with ``RELU6``): each program
    reduces its block, :func:`finish_in_last_program` the programs' maxima."""
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
    finish_in_last_program(tl.max(ab, axis=0), ws_ptr, ws_ptr, out_ptr, 1.0, KIND=MAX_I32, FINISH=FINISH)


def reduction_workspace(device: torch.device, nprog: int, wide: bool = False) -> Tensor:
    """The int32 workspace of :func:`finish_in_last_program` for a grid of ``nprog``
    programs (``wide``: 8-byte slots, for ``SUM_F64_DIV``; pass ``ws.view(torch.int64)`` as
    its slots): the current stream's (its ticket back at zero after each launch) on a GPU; a fresh one in
    the interpreter (CPU tensors, tests only). Call it under
    :func:`fedmpq_kernels._device.on_device`."""
    words = 2 * (nprog + 1) if wide else nprog + 1
    if device.type != "cuda":
        return torch.zeros(words, dtype=torch.int32, device=device)
    return workspace(device, raw_stream(device), words)


def absmax(x: Tensor, n: int, block: int, num_warps: int, relu6: bool = False) -> Tensor:
    """max |x| (of relu6(x) with ``relu6``) of a contiguous tensor of n > 0 elements, as a
    float32 0-dim tensor on x's device, computed there in one launch. Call it under
    :func:`fedmpq_kernels._device.on_device`."""
    grid = (triton.cdiv(n, block),)
    out = torch.empty((), dtype=torch.int32, device=x.device)
    ws = reduction_workspace(x.device, grid[0])
    absmax_kernel[grid](x, ws, out, n, BLOCK=block, FINISH=FINISH, RELU6=relu6, num_warps=num_warps, **LAUNCH)
    return out.view(torch.float32)
