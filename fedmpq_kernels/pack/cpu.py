"""Packing, CPU backend: adapters to the C++ kernels in csrc/cpu/pack* (OpenMP + AVX2).
Contracts: :mod:`fedmpq_kernels.pack.reference`. Inputs of any strides are made contiguous
(and 4-byte aligned where the kernels read uint32 words) here."""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import bitmap_nbytes
from .._native import native

Tensor = torch.Tensor


def _words(t: Tensor, nbytes: int) -> Tensor:
    """The first nbytes of a uint8 tensor, contiguous and 4-byte aligned (copied if not)."""
    t = t.reshape(-1)[:nbytes]
    if not t.is_contiguous() or t.data_ptr() % 4:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    c = codes.contiguous()
    n = c.numel()
    planes = torch.empty(bits * bitmap_nbytes(n), dtype=torch.uint8)
    seen = native.cpu.pack_codes(c.data_ptr(), n, bits, planes.data_ptr(), planes.numel(), torch.get_num_threads())
    if seen >> bits:
        raise ValueError(f"a code does not fit in {bits} bits (codes must be < {1 << bits}; "
                         f"the bits of all codes OR-ed together are {seen:#x})")
    return planes


def unpack_codes(planes: Tensor, bits: int, n: int) -> Tensor:
    p = _words(planes, bits * bitmap_nbytes(n))
    codes = torch.empty(n, dtype=torch.uint8)
    native.cpu.unpack_codes(p.data_ptr(), p.numel(), n, bits, codes.data_ptr(), n, torch.get_num_threads())
    return codes


def dequant_accumulate(acc: Tensor, planes: Tensor, signs: Optional[Tensor], bits: int, coef: float) -> None:
    n = acc.numel()
    p = _words(planes, bits * bitmap_nbytes(n))
    s = _words(signs, bitmap_nbytes(n)) if signs is not None else None
    native.cpu.dequant_accumulate(acc.data_ptr(), n, p.data_ptr(), p.numel(),
                                  s.data_ptr() if s is not None else 0, s.numel() if s is not None else 0,
                                  bits, coef, torch.get_num_threads())


def dequant_accumulate_layers(acc: Tensor, payload: Tensor, table: Tensor, coefs: Tensor) -> None:
    native.cpu.dequant_accumulate_layers(acc.data_ptr(), acc.numel(), payload.data_ptr(), payload.numel(),
                                         table.data_ptr(), table.shape[0], table.numel() * 8,
                                         coefs.data_ptr(), coefs.numel(), torch.get_num_threads())
