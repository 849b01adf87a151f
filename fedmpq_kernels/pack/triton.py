"""Packing, Triton backend: pack_codes, unpack_codes, dequant_accumulate (and its many-layer
form, dequant_accumulate_layers), bit for bit as
:mod:`fedmpq_kernels.pack.reference` (the layout and the float32 order are stated there).

Design (the tricks of :mod:`fedmpq_kernels.fake_quant.triton`)
-------------------------------------------------------------
* Every kernel works on a ``[BLOCK // 32, 32]`` tile of the flattened codes / acc: row r of
  program p is elements ``p * BLOCK + 32 * r + (0..31)``, exactly one bitmap word, so the
  word of plane q sits at ``q * nwords + row`` for every plane. The words are packed and
  unpacked with :mod:`fedmpq_kernels._triton_common`'s ``store_words`` and ``load_bits``,
  MSB plane first: ``q = 2 q + bit``.
* Offsets are int64. Programs whose block lies wholly inside the tensor take an unmasked
  path (vectorizable); only the last block is masked (codes past n load as 0, so the bits
  past n stay zero).
* pack_codes checks the range without a second pass and without reading anything back:
  each program ORs its codes (``tl.reduce`` with ``|``) into the device's status word for
  the bit-width with one ``atomic_or`` (:func:`fedmpq_kernels.pack._common.status_words`),
  read at a sync point the caller chooses (:func:`fedmpq_kernels.check_packed`).
* dequant_accumulate: ``v = coef * float(q)``, then ``acc + (neg ? -v : v)``, launched with
  ``_triton_common.LAUNCH`` (``enable_fp_fusion=False``: the add is not fused with the
  multiply into an FMA).
* Launches run under :func:`fedmpq_kernels._device.on_device` (Triton launches on the
  current device and its current stream). Fixed block size, no autotune (it needs a GPU
  at the first call; these are memory-bound streaming kernels). ``n`` and ``nwords`` are
  not specialized (the full/masked split does not need their divisibility): one compile
  per bit-width, not one per size class.

Verified in the Triton interpreter (``TRITON_INTERPRET=1``, the test suite) and on an H200
(2026-11-28 and 2026-12-04: the reference's bytes; docs/BENCHMARKS.md). The changes since
(2026-12-06: dequant_accumulate's sign on the bit pattern, dequant_accumulate_layers) have not
yet run on a GPU (``tools/gpu_check.sh`` runs them).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._buffers import words
from .._checks import bitmap_nbytes
from .._device import on_device
from .._triton_common import LAUNCH, load_bits, store_words
from ._common import dequant_accumulate_rows, status_words

Tensor = torch.Tensor

BLOCK = 4096  # elements per program (multiple of 32)
NUM_WARPS = 8


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _pack_tile(codes_ptr, planes_ptr, status_ptr, word, col, n, nwords, BITS: tl.constexpr,
               MASKED: tl.constexpr):
    offs = word[:, None] * 32 + col[None, :]
    if MASKED:
        c = tl.load(codes_ptr + offs, mask=offs < n, other=0).to(tl.int32)
    else:
        c = tl.load(codes_ptr + offs).to(tl.int32)
    for p in tl.static_range(BITS):
        bit = (c >> (BITS - 1 - p)) & 1
        store_words(planes_ptr + p * nwords.to(tl.int64), word, bit, col, nwords, MASKED=MASKED)
    seen = tl.reduce(tl.reduce(c, 1, _bit_or), 0, _bit_or)
    tl.atomic_or(status_ptr + (BITS - 1), seen, mask=seen != 0)  # valid codes only: harmless


@triton.jit(do_not_specialize=["n", "nwords"])
def _pack_kernel(codes_ptr, planes_ptr, status_ptr, n, nwords, BITS: tl.constexpr, BLOCK: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0)
    word = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, 32)
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        _pack_tile(codes_ptr, planes_ptr, status_ptr, word, col, n, nwords, BITS=BITS, MASKED=False)
    else:
        _pack_tile(codes_ptr, planes_ptr, status_ptr, word, col, n, nwords, BITS=BITS, MASKED=True)


@triton.jit
def _codes_tile(planes_ptr, word, col, nwords, BITS: tl.constexpr, ROWS: tl.constexpr, MASKED: tl.constexpr):
    """The [ROWS, 32] int32 codes of the tile's words, MSB plane first."""
    q = tl.zeros((ROWS, 32), dtype=tl.int32)
    for p in tl.static_range(BITS):
        q = q * 2 + load_bits(planes_ptr + p * nwords.to(tl.int64), word, col, nwords, MASKED=MASKED)
    return q


@triton.jit(do_not_specialize=["n", "nwords"])
def _unpack_kernel(planes_ptr, codes_ptr, n, nwords, BITS: tl.constexpr, BLOCK: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0)
    word = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, 32)
    offs = word[:, None] * 32 + col[None, :]
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        q = _codes_tile(planes_ptr, word, col, nwords, BITS=BITS, ROWS=ROWS, MASKED=False)
        tl.store(codes_ptr + offs, q.to(tl.uint8))
    else:
        q = _codes_tile(planes_ptr, word, col, nwords, BITS=BITS, ROWS=ROWS, MASKED=True)
        tl.store(codes_ptr + offs, q.to(tl.uint8), mask=offs < n)


@triton.jit
def _dequant_tile(acc_ptr, planes_ptr, signs_ptr, word, col, n, nwords, coef, BITS: tl.constexpr,
                  HAS_SIGNS: tl.constexpr, ROWS: tl.constexpr, MASKED: tl.constexpr):
    offs = word[:, None] * 32 + col[None, :]
    v = coef * _codes_tile(planes_ptr, word, col, nwords, BITS=BITS, ROWS=ROWS, MASKED=MASKED).to(tl.float32)
    if HAS_SIGNS:
        # negate on the bit pattern: exactly -v, -0.0 included, which a select of -v and v
        # need not keep once the compiler rewrites it (bitplane's dequantize met that on a GPU)
        sb = load_bits(signs_ptr, word, col, nwords, MASKED=MASKED)
        v = (v.to(tl.int32, bitcast=True) ^ (sb << 31)).to(tl.float32, bitcast=True)
    if MASKED:
        mask = offs < n
        tl.store(acc_ptr + offs, tl.load(acc_ptr + offs, mask=mask, other=0.0) + v, mask=mask)
    else:
        tl.store(acc_ptr + offs, tl.load(acc_ptr + offs) + v)


@triton.jit(do_not_specialize=["n", "nwords"])
def _dequant_kernel(acc_ptr, planes_ptr, signs_ptr, n, nwords, coef, BITS: tl.constexpr, HAS_SIGNS: tl.constexpr,
                    BLOCK: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0)
    word = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, 32)
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        _dequant_tile(acc_ptr, planes_ptr, signs_ptr, word, col, n, nwords, coef, BITS=BITS, HAS_SIGNS=HAS_SIGNS,
                      ROWS=ROWS, MASKED=False)
    else:
        _dequant_tile(acc_ptr, planes_ptr, signs_ptr, word, col, n, nwords, coef, BITS=BITS, HAS_SIGNS=HAS_SIGNS,
                      ROWS=ROWS, MASKED=True)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    c = codes.contiguous()
    n = c.numel()
    dev = codes.device
    nbytes = bitmap_nbytes(n)
    planes = torch.empty(bits * nbytes, dtype=torch.uint8, device=dev)
    if n == 0:
        return planes
    grid = (triton.cdiv(n, BLOCK),)
    with on_device(dev):
        _pack_kernel[grid](c, planes.view(torch.int32), status_words(dev), n, nbytes // 4, BITS=bits, BLOCK=BLOCK,
                           num_warps=NUM_WARPS, **LAUNCH)
    return planes


def unpack_codes(planes: Tensor, bits: int, n: int) -> Tensor:
    dev = planes.device
    nbytes = bitmap_nbytes(n)
    codes = torch.empty(n, dtype=torch.uint8, device=dev)
    if n == 0:
        return codes
    p = words(planes, bits * nbytes).view(torch.int32)
    with on_device(dev):
        _unpack_kernel[(triton.cdiv(n, BLOCK),)](p, codes, n, nbytes // 4, BITS=bits, BLOCK=BLOCK,
                                                 num_warps=NUM_WARPS, **LAUNCH)
    return codes


def dequant_accumulate(acc: Tensor, planes: Tensor, signs: Optional[Tensor], bits: int, coef: float) -> None:
    n = acc.numel()
    if n == 0:
        return
    dev = acc.device
    nbytes = bitmap_nbytes(n)
    p = words(planes, bits * nbytes).view(torch.int32)
    s = words(signs, nbytes).view(torch.int32) if signs is not None else p
    with on_device(dev):
        _dequant_kernel[(triton.cdiv(n, BLOCK),)](acc, p, s, n, nbytes // 4, coef, BITS=bits,
                                                  HAS_SIGNS=signs is not None, BLOCK=BLOCK,
                                                  num_warps=NUM_WARPS, **LAUNCH)


def dequant_accumulate_layers(acc: Tensor, payload: Tensor, table: Tensor, coefs: Tensor) -> None:
    """One dequant_accumulate per table row (no table kernel here; no device read)."""
    dequant_accumulate_rows(dequant_accumulate, acc, payload, table, coefs)
