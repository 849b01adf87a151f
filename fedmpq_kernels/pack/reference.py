"""Bit-plane packing in pure torch: the oracle the kernels are tested against, and the
fallback backend. This docstring is the one full statement of the layout.

Layout
------
* A **bitmap** of n elements is ``ceil(n / 32)`` little-endian uint32 words, handled as
  ``4 * ceil(n / 32)`` uint8 bytes: element i is bit ``i % 32`` of word ``i // 32``, which
  is the same as bit ``i % 8`` of byte ``i // 8`` (``numpy.packbits(..., bitorder="little")``
  padded with zero bytes to a multiple of 4). Bits past n are zero. This is also the layout of
  fake-quant's clipping masks and bit-plane training's sign maps (:func:`pack_bitmap`,
  :func:`unpack_bitmap`).
* **b-bit codes** (b = 1..8, one uint8 per element, each < 2**b) are stored as b bitmaps one
  after the other, **most significant bit first**: plane p (p = 0 .. b-1) holds bit
  ``b - 1 - p`` of every code, so ``q = sum_p plane_p * 2**(b-1-p)`` exactly as FedMPQ's bit
  planes B^(0) (MSB) .. B^(N-1) (LSB). ``b * 4 * ceil(n / 32)`` bytes in all.
* A **sign map** is the 1-bit case: bit set = negative (sigma = -1).

Dequantize-and-accumulate (the server's aggregation step)::

    coef   = float32(weight) * (float32(scale) / float32(2**b - 1))    (computed once)
    v_j    = coef * float32(q_j)                                       (float32, rounded)
    acc_j  = acc_j + (-v_j if sign bit j else v_j)                     (float32, rounded)

so ``acc += weight * W`` with ``W = scale * sigma * q / (2**b - 1)`` the de-quantized layer,
in exactly this order in every backend (bit-for-bit agreement).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import bitmap_nbytes

Tensor = torch.Tensor


_BYTE_WEIGHTS = {}


def _byte_weights(device) -> Tensor:
    """uint8 [1, 2, 4, ..., 128] on ``device`` (cached: the bitmaps of every step use it)."""
    w = _BYTE_WEIGHTS.get(device)
    if w is None:
        w = _BYTE_WEIGHTS[device] = (2 ** torch.arange(8, device=device, dtype=torch.int32)).to(torch.uint8)
    return w


def _pack_bits(bits01: Tensor, n: int) -> Tensor:
    """(k, n) tensor of 0/1 (or bool) -> (k, bitmap_nbytes(n)) uint8, the bitmap layout per row."""
    k = bits01.shape[0]
    nb = bitmap_nbytes(n)
    padded = torch.zeros(k, nb * 8, dtype=torch.uint8, device=bits01.device)
    padded[:, :n] = bits01
    return (padded.view(k, nb, 8) * _byte_weights(bits01.device)).sum(dim=2, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, n: int) -> Tensor:
    """(k, >= bitmap_nbytes(n)) uint8 -> (k, n) bool."""
    k = packed.shape[0]
    b = packed[:, : (n + 7) // 8]
    return ((b.unsqueeze(2) & _byte_weights(packed.device)) != 0).reshape(k, -1)[:, :n]


def pack_bitmap(mask: Tensor) -> Tensor:
    """Pack a bool tensor (flattened in C order) into one bitmap (the layout above):
    uint8 of ``bitmap_nbytes(mask.numel())`` bytes on mask's device. Fake-quant's clipping
    masks and bit-plane training's sign maps are made with it."""
    flat = mask.reshape(-1)
    return _pack_bits(flat.unsqueeze(0), flat.numel())[0]


def unpack_bitmap(bits: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bitmap`: uint8 bitmap (at least ``bitmap_nbytes(n)`` bytes)
    -> bool tensor of n elements. Raises ValueError when it is shorter."""
    if bits.numel() < bitmap_nbytes(n):
        raise ValueError(f"bitmap has {bits.numel()} bytes, {bitmap_nbytes(n)} needed for {n} elements")
    return _unpack_bits(bits.reshape(-1).unsqueeze(0), n)[0]


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (any shape, C order, each < 2**bits) -> uint8 planes of
    ``bits * bitmap_nbytes(n)`` bytes (plane 0 = most significant bit). A code >= 2**bits
    raises ValueError (reading the maximum synchronizes a GPU: fine for an oracle)."""
    flat = codes.reshape(-1)
    n = flat.numel()
    if n and int(flat.max()) >> bits:
        raise ValueError(f"a code does not fit in {bits} bits (codes must be < {1 << bits})")
    shifts = torch.arange(bits - 1, -1, -1, device=flat.device, dtype=torch.uint8)  # MSB first
    planes01 = (flat.unsqueeze(0) >> shifts.unsqueeze(1)) & 1  # (bits, n)
    return _pack_bits(planes01, n).reshape(-1)


def unpack_codes(planes: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 planes -> uint8 codes of shape (n,)."""
    nb = bitmap_nbytes(n)
    planes01 = _unpack_bits(planes.reshape(-1)[: bits * nb].view(bits, nb), n).to(torch.int32)
    weights = 2 ** torch.arange(bits - 1, -1, -1, device=planes.device, dtype=torch.int32)
    return (planes01 * weights.unsqueeze(1)).sum(dim=0).to(torch.uint8)


def dequant_accumulate(acc: Tensor, planes: Tensor, signs: Optional[Tensor], bits: int, coef: float) -> None:
    """``acc += sign * (coef * q)`` in place (float32, the order in the module docstring).

    acc: contiguous float32 of n elements; planes: as :func:`pack_codes` makes them; signs:
    a bitmap of n elements (bit set = negative) or None; coef: a float32 value.
    """
    n = acc.numel()
    q = unpack_codes(planes, bits, n).to(torch.float32)
    v = torch.tensor(coef, dtype=torch.float32, device=acc.device) * q
    if signs is not None:
        neg = unpack_bitmap(signs, n)
        v = torch.where(neg, -v, v)
    acc.view(-1).add_(v)


def dequant_accumulate_layers(acc: Tensor, payload: Tensor, table: Tensor, coefs: Tensor) -> None:
    """:func:`dequant_accumulate` for each row (acc_off, n, bits, data_off) of ``table``:
    planes at byte data_off of ``payload``, the sign map right after them."""
    from .ops import check_layer_table  # the op's rules (ops imports nothing from here)

    check_layer_table(table.numpy(), coefs.numpy(), acc.numel(), payload.numel())
    flat = acc.view(-1)
    for (acc_off, n, bits, data_off), coef in zip(table.tolist(), coefs.tolist()):
        nb = bitmap_nbytes(n)
        planes = payload[data_off:data_off + bits * nb]
        signs = payload[data_off + bits * nb:data_off + (bits + 1) * nb]
        dequant_accumulate(flat[acc_off:acc_off + n], planes, signs, bits, coef)
