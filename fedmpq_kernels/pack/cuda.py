"""Packing, CUDA backend: adapters to the CUDA kernels in csrc/cuda/pack.cu, through
``fedmpq_kernels._C.cuda``. Contracts: :mod:`fedmpq_kernels.pack.reference`.

Outputs are allocated on the tensors' device; launches run inside
:func:`fedmpq_kernels._device.on_device` (the native launchers never switch devices) on
torch's current stream there. Codes of any strides are made contiguous; plane and sign
buffers are made contiguous and 4-byte aligned (the kernels read uint32 words) as the CPU
adapter does. A contiguous codes or acc tensor at an odd offset (a slice) is used in place:
the kernels take their scalar path for it.

pack_codes is the one op that synchronizes: it reads back, with ``.item()``, the OR of all
codes that the kernel accumulates on the device, to reject a code >= 2**bits. That costs one
device round trip per call, acceptable here because the packed planes go to the host next
anyway (they are the upload).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._buffers import words
from .._checks import bitmap_nbytes
from .._device import on_device
from .._native import native
from ._common import check_seen

Tensor = torch.Tensor


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    dev = codes.device
    c = codes.contiguous()
    n = c.numel()
    planes = torch.empty(bits * bitmap_nbytes(n), dtype=torch.uint8, device=dev)
    if n == 0:
        return planes
    seen = torch.zeros(1, dtype=torch.int32, device=dev)  # the kernel ORs into it
    with on_device(dev):
        native.cuda.pack_codes(c.data_ptr(), n, bits, planes.data_ptr(), planes.numel(), seen.data_ptr(),
                               dev.index, _stream(dev))
    check_seen(int(seen.item()), bits)  # the one synchronization (see the module docstring)
    return planes


def unpack_codes(planes: Tensor, bits: int, n: int) -> Tensor:
    dev = planes.device
    p = words(planes, bits * bitmap_nbytes(n))
    codes = torch.empty(n, dtype=torch.uint8, device=dev)
    if n == 0:
        return codes
    with on_device(dev):
        native.cuda.unpack_codes(p.data_ptr(), p.numel(), n, bits, codes.data_ptr(), n, dev.index, _stream(dev))
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
                                       bits, coef, dev.index, _stream(dev))

