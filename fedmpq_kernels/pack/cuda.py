"""Packing, CUDA backend: adapters to the CUDA kernels in csrc/cuda/pack.cu, through
``fedmpq_kernels._C.cuda``. Contracts: :mod:`fedmpq_kernels.pack.reference`.

Outputs are allocated on the tensors' device; launches run inside
:func:`fedmpq_kernels._device.on_device` (the native launchers never switch devices) on
torch's current stream there. Codes of any strides are made contiguous; plane and sign
buffers are made contiguous and 4-byte aligned (the kernels read uint32 words) as the CPU
adapter does. A contiguous codes or acc tensor at an odd offset (a slice) is used in place:
the kernels take their scalar path for it.

No op synchronizes. pack_codes' range check (a code >= 2**bits) rides along in the kernel,
which ORs the codes into the device's status word for that bit-width
(:func:`fedmpq_kernels.pack._common.status_words`); :func:`fedmpq_kernels.check_packed` (or
``pack_codes(..., validate=True)``) reads it at a sync point the caller chooses.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._buffers import words
from .._checks import bitmap_nbytes
from .._device import on_device, raw_stream
from .._native import native
from ._common import dequant_accumulate_rows, status_word_ptr

Tensor = torch.Tensor


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    dev = codes.device
    c = codes.contiguous()
    n = c.numel()
    planes = torch.empty(bits * bitmap_nbytes(n), dtype=torch.uint8, device=dev)
    if n == 0:
        return planes
    with on_device(dev):
        # The kernel ORs the codes into the status word (no zero fill, no read-back here).
        native.cuda.pack_codes(c.data_ptr(), n, bits, planes.data_ptr(), planes.numel(), status_word_ptr(dev, bits),
                               dev.index, raw_stream(dev))
    return planes


def unpack_codes(planes: Tensor, bits: int, n: int) -> Tensor:
    dev = planes.device
    p = words(planes, bits * bitmap_nbytes(n))
    codes = torch.empty(n, dtype=torch.uint8, device=dev)
    if n == 0:
        return codes
    with on_device(dev):
        native.cuda.unpack_codes(p.data_ptr(), p.numel(), n, bits, codes.data_ptr(), n, dev.index, raw_stream(dev))
    return codes


def dequant_accumulate(acc: Tensor, planes: Tensor, signs: Optional[Tensor], bits: int, coef: float) -> None:
    dev = acc.device
    n = acc.numel()
    if n == 0:
        return
    p = words(planes, bits * bitmap_nbytes(n))
    s = words(signs, bitmap_nbytes(n)) if signs is not None else None
    with on_device(dev):
        native.cuda.dequant_accumulate(acc.data_ptr(), n, p.data_ptr(), p.numel(),
                                       s.data_ptr() if s is not None else 0, s.numel() if s is not None else 0,
                                       bits, coef, dev.index, raw_stream(dev))


def dequant_accumulate_layers(acc: Tensor, payload: Tensor, table: Tensor, coefs: Tensor) -> None:
    """One dequant_accumulate per table row (no table kernel here; no device read)."""
    dequant_accumulate_rows(dequant_accumulate, acc, payload, table, coefs)
