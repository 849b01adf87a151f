"""Fake-quant's CPU backend: adapters from tensors to the C++ kernels in
csrc/cpu/fake_quant* (their own thread pool + AVX2), through ``fedmpq_kernels._C.cpu``.

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


_F32, _U8 = torch.float32, torch.uint8
# mode 0's two bitmaps: one shared zero-size tensor (nothing is ever written to it), so the
# inference path allocates only y; the registered op hands out fresh ones (ops.py).
NO_BITMAP = torch.empty(0, dtype=_U8)


def _f32(t: Tensor) -> Tensor:
    """t as contiguous, 4-byte-aligned float32 (no copy when it already is)."""
    if t.dtype is _F32 and t.is_contiguous() and not t.data_ptr() & 3:
        return t  # the common case, in the fewest calls
    t = t.contiguous()
    if t.dtype != torch.float32:
        return t.float()
    if t.data_ptr() % 4 != 0:
        return t.clone()  # fresh storage is aligned
    return t


def fake_quant(x: Tensor, bits: int, scale: Optional[Tensor], mode: int) -> Tuple[Tensor, Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.fake_quant`. x: CPU float tensor,
    any strides; scale: None or 0-dim CPU tensor (already checked finite and > 0).
    Mode 0's bitmaps are :data:`NO_BITMAP` (shared, empty)."""
    xc = _f32(x)
    n = xc.numel()
    y = torch.empty_like(xc)  # contiguous float32 of x's shape (empty_like: the cheapest allocation call)
    p = h = NO_BITMAP
    nb = 0
    if mode:
        nb = bitmap_nbytes(n)
        p = torch.empty(nb, dtype=_U8)
        if mode == 2:
            h = torch.empty(nb, dtype=_U8)
    _fake_quant(
        xc.data_ptr(), n, y.data_ptr(), n, bits,
        0.0 if scale is None else scale.item(), scale is None,
        p.data_ptr() if mode else 0, nb,
        h.data_ptr() if mode == 2 else 0, nb if mode == 2 else 0,
        torch.get_num_threads(),
    )
    if x.dtype is not _F32:
        y = y.to(x.dtype)
    return y, p, h


def fake_quant_backward(grad: Tensor, pass_bits: Tensor, hi_bits: Tensor, scale_grad: bool) -> Tuple[Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.fake_quant_backward`. grad: CPU
    float tensor; the bitmaps as :func:`fedmpq_kernels._checks.bitmap_arg` takes them."""
    g = _f32(grad)
    n = g.numel()
    gx = torch.empty_like(g)
    nb = bitmap_nbytes(n)
    # The forward's own bitmaps pass this test inline; anything else gets bitmap_arg's full
    # checks (and a copy if strided or misaligned) with its errors.
    pb = pass_bits
    if not (type(pb) is Tensor and pb.dtype is _U8 and pb.is_cpu and pb.numel() >= nb and pb.is_contiguous()
            and not pb.data_ptr() & 3):
        pb = bitmap_arg(pass_bits, n, _CPU, "pass_bits")
    hb = hi_bits if scale_grad else None
    if scale_grad and not (type(hb) is Tensor and hb.dtype is _U8 and hb.is_cpu and hb.numel() >= nb
                           and hb.is_contiguous() and not hb.data_ptr() & 3):
        hb = bitmap_arg(hi_bits, n, _CPU, "hi_bits")
    gs = _fake_quant_backward(
        g.data_ptr(), n, gx.data_ptr(), n,
        pb.data_ptr() if n else 0, pb.numel(),
        hb.data_ptr() if hb is not None and n else 0, hb.numel() if hb is not None else 0,
        torch.get_num_threads(),
    )
    if grad.dtype is not _F32:
        gx = gx.to(grad.dtype)
    # The kernel's dL/dS, already reduced (in float64: one rounding to float32 here).
    return gx, torch.scalar_tensor(gs, dtype=_F32)


def relu6_fake_quant(x: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.relu6_fake_quant`. x: CPU float tensor,
    any strides: y (x's shape and dtype, contiguous) and the mask bitmap (0 < x < 6)."""
    xc = _f32(x)
    n = xc.numel()
    y = torch.empty_like(xc)
    mask = torch.empty(bitmap_nbytes(n), dtype=_U8)
    native.cpu.relu6_fake_quant(xc.data_ptr(), n, y.data_ptr(), n, bits, mask.data_ptr(), mask.numel(),
                                torch.get_num_threads())
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y, mask


# The bound native functions, looked up once (attribute lookups on every call add up).
_fake_quant = native.cpu.fake_quant if native is not None else None
_fake_quant_backward = native.cpu.fake_quant_backward if native is not None else None
