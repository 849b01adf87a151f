"""Fake-quant's CPU backend: adapters from tensors to the C++ kernels in
csrc/cpu/fake_quant* (their own thread pool + AVX2), through ``fedmpq_kernels._C.cpu``.

The kernels work on contiguous, 4-byte-aligned float32; other float dtypes are converted
here and the result converted back, and the rare misaligned float32 tensor (one made by
``torch.frombuffer`` at an odd offset) is copied first. Thread count follows
``torch.get_num_threads()`` (capped by the native side at the cores available); a call small
enough to run on one thread anyway does not ask (:data:`_SERIAL`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._buffers import f32_scalar
from .._checks import bitmap_arg, bitmap_nbytes
from .._native import native

Tensor = torch.Tensor
_CPU = torch.device("cpu")


_F32, _U8 = torch.float32, torch.uint8
# mode 0's bitmaps: one shared zero-size tensor (nothing is ever written to it), so the
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


def _f32_ptr(t: Tensor) -> Tuple[Tensor, int]:
    """(t as :func:`_f32` gives it, its data pointer): the common input (contiguous,
    4-byte-aligned float32) in the fewest tensor calls (each is ~0.1 µs of a 1-element call),
    its data pointer read once, its dtype once."""
    if t.dtype is _F32 and t.is_contiguous() and not (p := t.data_ptr()) & 3:
        return t, p
    t = _f32(t)
    return t, t.data_ptr()


def fake_quant(x: Tensor, bits: int, scale: Optional[Tensor], mode: int) -> Tuple[Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.fake_quant`. x: CPU float tensor,
    any strides; scale: None or 0-dim CPU tensor (already checked finite and > 0).
    Mode 0's bitmaps are :data:`NO_BITMAP` (shared, empty); mode 2's two are one allocation."""
    xc, px = _f32_ptr(x)
    n = xc.numel()
    y = torch.empty_like(xc)  # contiguous float32 of x's shape (empty_like: the cheapest allocation call)
    if mode:
        nb = bitmap_nbytes(n)
        b = torch.empty(nb * mode, dtype=_U8)  # pass, then (mode 2) hi
        p = b.data_ptr()
    else:
        nb, b, p = 0, NO_BITMAP, 0
    _fake_quant(
        px, n, y.data_ptr(), n, bits,
        0.0 if scale is None else scale.item(), scale is None,
        p, nb, p + nb if mode == 2 else 0, nb if mode == 2 else 0,
        torch.get_num_threads() if n > _SERIAL else 1,
    )
    if xc is not x and x.dtype is not _F32:
        y = y.to(x.dtype)
    return y, b


def fake_quant_backward(grad: Tensor, bitmaps: Tensor, scale_grad: bool) -> Tuple[Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.fake_quant_backward`. grad: CPU
    float tensor; the bitmaps as :func:`fedmpq_kernels._checks.bitmap_arg` takes them."""
    g, pg = _f32_ptr(grad)
    n = g.numel()
    gx = torch.empty_like(g)
    nb = bitmap_nbytes(n)
    # The forward's own bitmaps pass this test inline; anything else gets bitmap_arg's full
    # checks (and a copy if strided or misaligned) with its errors.
    b = bitmaps
    if not (type(b) is Tensor and b.dtype is _U8 and b.is_cpu and b.numel() >= (nb + nb if scale_grad else nb)
            and b.is_contiguous() and not (p := b.data_ptr()) & 3):
        b = bitmap_arg(bitmaps, n, _CPU, "bitmaps", 2 if scale_grad else 1)
        p = b.data_ptr()
    if not n:
        p = 0
    gs = _fake_quant_backward(
        pg, n, gx.data_ptr(), n, p, nb,
        p + nb if scale_grad and n else 0, nb if scale_grad else 0,
        torch.get_num_threads() if n > _SERIAL else 1,
    )
    if g is not grad and grad.dtype is not _F32:
        gx = gx.to(grad.dtype)
    # The kernel's dL/dS, reduced in float64 and rounded once to float32 by the binding.
    return gx, f32_scalar(gs)


def relu6_fake_quant(x: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.relu6_fake_quant`. x: CPU float tensor,
    any strides: y (x's shape and dtype, contiguous) and the mask bitmap (0 < x < 6)."""
    xc = _f32(x)
    n = xc.numel()
    y = torch.empty_like(xc)
    mask = torch.empty(bitmap_nbytes(n), dtype=_U8)
    native.cpu.relu6_fake_quant(xc.data_ptr(), n, y.data_ptr(), n, bits, mask.data_ptr(), mask.numel(),
                                torch.get_num_threads() if n > _SERIAL else 1)
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y, mask


# ---- the kept forms, for the eager autograd path only (ops.py, _eager_function) ----
# The bitmaps a forward makes for its own backward stay inside the autograd node, so their
# container is this backend's choice: a bytearray made by the binding, kept on the node's
# ctx, not a uint8 tensor saved for backward (its allocation, saving and freeing cost ~2.3 µs
# of a 1-element forward+backward; a bytearray's ~0.1). Kept until the graph is freed, not
# released at backward as a saved tensor is: one bit per element (two with a scale
# gradient), 1/32 of the output's bytes.

def fake_quant_kept(x: Tensor, bits: int, scale: Tensor, mode: int) -> Tuple[Tensor, bytearray]:
    """:func:`fake_quant` with a given scale in mode 1 or 2: y, and the bitmaps (pass, then
    hi in mode 2; ``bitmap_nbytes(n)`` bytes each) in a new bytearray."""
    xc, px = _f32_ptr(x)
    n = xc.numel()
    y = torch.empty_like(xc)
    kept = _fake_quant_kept(px, n, y.data_ptr(), n, bits, scale.item(), mode,
                            torch.get_num_threads() if n > _SERIAL else 1)
    if xc is not x and x.dtype is not _F32:
        y = y.to(x.dtype)
    return y, kept


def relu6_fake_quant_kept(x: Tensor, bits: int) -> Tuple[Tensor, bytearray]:
    """:func:`relu6_fake_quant`, the mask in a new bytearray."""
    xc = _f32(x)
    n = xc.numel()
    y = torch.empty_like(xc)
    kept = _relu6_fake_quant_kept(xc.data_ptr(), n, y.data_ptr(), n, bits,
                                  torch.get_num_threads() if n > _SERIAL else 1)
    if x.dtype is not _F32:
        y = y.to(x.dtype)
    return y, kept


def relu6_fake_quant_values(x: Tensor, bits: int) -> Tensor:
    """:func:`relu6_fake_quant`'s y alone, no mask made or written (a forward without
    gradient: evaluation, inference)."""
    xc = _f32(x)
    n = xc.numel()
    y = torch.empty_like(xc)
    _relu6_fake_quant(xc.data_ptr(), n, y.data_ptr(), n, bits, 0, 0, torch.get_num_threads() if n > _SERIAL else 1)
    return y if x.dtype is _F32 else y.to(x.dtype)


def fake_quant_backward_kept(grad: Tensor, kept: bytearray, scale_grad: bool) -> Tuple[Tensor, Tensor]:
    """:func:`fake_quant_backward` reading a kept forward's bytearray (the binding checks its
    length against grad's elements)."""
    g, pg = _f32_ptr(grad)
    n = g.numel()
    gx = torch.empty_like(g)
    gs = _fake_quant_backward_kept(pg, n, gx.data_ptr(), n, kept, scale_grad,
                                   torch.get_num_threads() if n > _SERIAL else 1)
    if g is not grad and grad.dtype is not _F32:
        gx = gx.to(grad.dtype)
    return gx, f32_scalar(gs)


def kept_tensor(kept: bytearray) -> Tensor:
    """A kept bytearray's bytes as a uint8 tensor sharing its memory (the bitmaps argument of
    the other backends' ``fake_quant_backward``)."""
    return torch.frombuffer(kept, dtype=_U8) if len(kept) else torch.empty(0, dtype=_U8)


# Up to this many elements the kernels run on the calling thread whatever count they are
# given (csrc/cpu/parallel.h: one task of kGrain elements), so a small call does not ask
# torch for its count (~0.1 µs of a 1-element call).
_SERIAL = native.threading()["grain"] if native is not None else 0
# The bound native functions, looked up once (attribute lookups on every call add up).
_fake_quant = native.cpu.fake_quant if native is not None else None
_fake_quant_backward = native.cpu.fake_quant_backward if native is not None else None
_relu6_fake_quant = native.cpu.relu6_fake_quant if native is not None else None
_fake_quant_kept = native.cpu.fake_quant_kept if native is not None else None
_relu6_fake_quant_kept = native.cpu.relu6_fake_quant_kept if native is not None else None
_fake_quant_backward_kept = native.cpu.fake_quant_backward_kept if native is not None else None
