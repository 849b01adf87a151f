"""Packing, CPU backend: adapters to the C++ kernels in csrc/cpu/pack* (their own thread pool + AVX2).
Contracts: :mod:`fedmpq_kernels.pack.reference`. Inputs of any strides are made contiguous
(and 4-byte aligned where the kernels read uint32 words) here."""
from __future__ import annotations

from typing import Optional

import torch

from .._buffers import words
from .._checks import bitmap_nbytes
from .._native import native
from ._common import check_seen

Tensor = torch.Tensor


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    c = codes.contiguous()
    n = c.numel()
    planes = torch.empty(bits * bitmap_nbytes(n), dtype=torch.uint8)
    seen = native.cpu.pack_codes(c.data_ptr(), n, bits, planes.data_ptr(), planes.numel(), torch.get_num_threads())
    check_seen(seen, bits)
    return planes


def unpack_codes(planes: Tensor, bits: int, n: int) -> Tensor:
    p = words(planes, bits * bitmap_nbytes(n))
    codes = torch.empty(n, dtype=torch.uint8)
    native.cpu.unpack_codes(p.data_ptr(), p.numel(), n, bits, codes.data_ptr(), n, torch.get_num_threads())
    return codes


def dequant_accumulate(acc: Tensor, planes: Tensor, signs: Optional[Tensor], bits: int, coef: float) -> None:
    n = acc.numel()
    p = words(planes, bits * bitmap_nbytes(n))
    s = words(signs, bitmap_nbytes(n)) if signs is not None else None
    native.cpu.dequant_accumulate(acc.data_ptr(), n, p.data_ptr(), p.numel(),
                                  s.data_ptr() if s is not None else 0, s.numel() if s is not None else 0,
                                  bits, coef, torch.get_num_threads())


def dequant_accumulate_layers(acc: Tensor, payload: Tensor, table: Tensor, coefs: Tensor) -> None:
    native.cpu.dequant_accumulate_layers(acc.data_ptr(), acc.numel(), payload.data_ptr(), payload.numel(),
                                         table.data_ptr(), table.shape[0], table.numel() * 8,
                                         coefs.data_ptr(), coefs.numel(), torch.get_num_threads())
