"""Fake-quant's CPU backend: adapters from tensors to the C++ kernels in
csrc/cpu/fake_quant* (OpenMP + AVX2), through ``fedmpq_kernels._C.cpu``.

The kernels work on contiguous, 4-byte-aligned float32; other float dtypes are converted
here and the result converted back, and the rare misaligned float32 tensor (one made by
``torch.frombuffer`` at an odd offset) is copied first. Thread count follows
``torch.get_num_threads()`` (capped by the native side at the cores available).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import bitmap_arg, bitmap_nbytes
from .._native import native

Tensor = torch.Tensor
_CPU = torch.device("cpu")


def _bitmap(n: int, wanted: bool) -> Tensor:
    return torch.empty(bitmap_nbytes(n) if wanted else 0, dtype=torch.uint8)


def _f32(t: Tensor) -> Tensor:
    """t as contiguous, 4-byte-aligned float32 (no copy when it already is)."""
    t = t.contiguous()
    if t.dtype != torch.float32:
        return t.float()
    if t.data_ptr() % 4 != 0:
        return t.clone()  # fresh storage is aligned
    return t


def fake_quant(x: Tensor, bits: int, scale: Optional[Tensor], mode: int) -> Tuple[Tensor, Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.fake_quant`. x: CPU float tensor,
    any strides; scale: None or 0-dim CPU tensor (already checked finite and > 0)."""
    xc = _f32(x)
    n = xc.numel()
    y = torch.empty(x.shape, dtype=torch.float32)
    p = _bitmap(n, mode >= 1)
    h = _bitmap(n, mode == 2)
    native.cpu.fake_quant(
        xc.data_ptr(), n, y.data_ptr(), y.numel(), bits,
        0.0 if scale is None else float(scale), scale is None,
        p.data_ptr() if mode >= 1 else 0, p.numel(),
        h.data_ptr() if mode == 2 else 0, h.numel(),
        torch.get_num_threads(),
    )
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y, p, h


def fake_quant_backward(grad: Tensor, pass_bits: Tensor, hi_bits: Tensor, scale_grad: bool) -> Tuple[Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.fake_quant_backward`. grad: CPU
    float tensor; the bitmaps as :func:`fedmpq_kernels._checks.bitmap_arg` takes them."""
    g = _f32(grad)
    n = g.numel()
    gx = torch.empty(grad.shape, dtype=torch.float32)
    pb = bitmap_arg(pass_bits, n, _CPU, "pass_bits")
    hb = bitmap_arg(hi_bits, n, _CPU, "hi_bits") if scale_grad else None
    gs = native.cpu.fake_quant_backward(
        g.data_ptr(), n, gx.data_ptr(), gx.numel(),
        pb.data_ptr() if n else 0, pb.numel(),
        hb.data_ptr() if hb is not None and n else 0, hb.numel() if hb is not None else 0,
        torch.get_num_threads(),
    )
    if grad.dtype != torch.float32:
        gx = gx.to(grad.dtype)
    return gx, torch.tensor(gs, dtype=torch.float32)


def relu6_fake_quant(x: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.relu6_fake_quant`. x: CPU float tensor,
    any strides: y (x's shape and dtype, contiguous) and the mask bitmap (0 < x < 6)."""
    xc = _f32(x)
    n = xc.numel()
    y = torch.empty(x.shape, dtype=torch.float32)
    mask = _bitmap(n, True)
    native.cpu.relu6_fake_quant(xc.data_ptr(), n, y.data_ptr(), y.numel(), bits, mask.data_ptr(), mask.numel(),
                                torch.get_num_threads())
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y, mask
