"""Fake-quant's CUDA backend: adapters from tensors to the CUDA kernels in
csrc/cuda/fake_quant.cu, through ``fedmpq_kernels._C.cuda``.

The kernels read float32, float16 and bfloat16 directly (the math is float32, see
:mod:`fedmpq_kernels.fake_quant.reference`), run on the tensor's device and on torch's
current stream there, and never synchronize: a dynamic scale (max|x|) and a given device
scale stay on the device. Inputs of any strides are made contiguous here first; a
contiguous input at any element offset (a slice such as ``x[1:]``) is read in place.
Launches run inside :func:`fedmpq_kernels._device.on_device` (the native launchers never
switch devices), so an op on ``cuda:1`` never changes what ``device="cuda"`` means.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import bitmap_arg, bitmap_nbytes
from .._device import on_device
from .._native import native

Tensor = torch.Tensor

# Dtype codes of csrc/cuda/fake_quant.h (enum DType).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dtype_code(t: Tensor, name: str) -> int:
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return code


def _require_cuda(t: Tensor, name: str) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for the cuda backend, got one on {t.device}")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _bitmap_out(n: int, wanted: bool, device: torch.device) -> Tensor:
    """A bitmap to fill: uint8 of 4 * ceil(n / 32) bytes, or an empty one."""
    return torch.empty(bitmap_nbytes(n) if wanted else 0, dtype=torch.uint8, device=device)


def fake_quant(x: Tensor, bits: int, scale: Optional[Tensor], mode: int) -> Tuple[Tensor, Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.fake_quant`.

    Args:
        x: float32/float16/bfloat16 CUDA tensor, any shape and strides.
        bits: 1..8 or 16 (already validated).
        scale: None (dynamic: S = max|x|, computed on the device) or a one-element
            floating tensor (made 0-dim float32 on x's device; a value that is not finite
            and > 0 makes every output NaN, it is never read on the host).
        mode: 0 no bitmaps, 1 pass bitmap, 2 pass and hi bitmaps.

    Returns:
        (y, pass_bits, hi_bits): y of x's shape and dtype, contiguous; the bitmaps uint8
        of 4 * ceil(numel / 32) bytes on x's device, or empty (0 bytes) when not asked for.
    """
    code = _dtype_code(x, "x")
    _require_cuda(x, "x")
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0, 1 or 2, got {mode}")
    dev = x.device
    xc = x.contiguous()
    n = xc.numel()
    y = torch.empty(x.shape, dtype=x.dtype, device=dev)
    pass_bits = _bitmap_out(n, mode >= 1, dev)
    hi_bits = _bitmap_out(n, mode == 2, dev)
    if n == 0:
        return y, pass_bits, hi_bits
    stream = _stream(dev)
    with on_device(dev):
        if scale is None:
            # max|x| as float32 bits, reduced with atomicMax: the buffer must start at 0.
            # The forward kernel reads it on the same stream, so no host round trip.
            s = torch.zeros(1, dtype=torch.int32, device=dev)
            native.cuda.absmax(xc.data_ptr(), code, n, s.data_ptr(), dev.index, stream)
            scale_given = False
        else:
            if scale.numel() != 1:
                raise ValueError(f"scale must hold one value, got shape {tuple(scale.shape)}")
            s = scale.detach().reshape(()).to(device=dev, dtype=torch.float32).contiguous()
            scale_given = True
        native.cuda.fake_quant(
            xc.data_ptr(), y.data_ptr(), code, n, y.numel(), bits, s.data_ptr(), scale_given,
            pass_bits.data_ptr() if mode >= 1 else 0, pass_bits.numel(),
            hi_bits.data_ptr() if mode == 2 else 0, hi_bits.numel(),
            dev.index, stream,
        )
    # The temporaries (xc, s) may be freed now: the caching allocator only reuses their
    # memory for work queued after these kernels on the same stream.
    return y, pass_bits, hi_bits


def fake_quant_backward(grad: Tensor, pass_bits: Tensor, hi_bits: Tensor, scale_grad: bool) -> Tuple[Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.fake_quant_backward`.

    Args:
        grad: float32/float16/bfloat16 CUDA tensor, any shape and strides.
        pass_bits: uint8 bitmap from the forward (4 * ceil(numel / 32) bytes), grad's device
            (copied first if it is not contiguous and 4-byte aligned; see
            :func:`fedmpq_kernels._checks.bitmap_arg` for the errors).
        hi_bits: the forward's hi bitmap; read only when scale_grad.
        scale_grad: whether to compute the scale gradient.

    Returns:
        (grad_x, grad_scale): grad_x of grad's shape and dtype, contiguous (grad where the
        pass bit is set, else 0); grad_scale a 0-dim float32 tensor on grad's device: the
        sum over clipped elements of (+grad where hi, -grad otherwise), or 0 when not
        scale_grad.
    """
    code = _dtype_code(grad, "grad")
    _require_cuda(grad, "grad")
    dev = grad.device
    g = grad.contiguous()
    n = g.numel()
    gx = torch.empty(grad.shape, dtype=grad.dtype, device=dev)
    pb = bitmap_arg(pass_bits, n, dev, "pass_bits")
    hb = bitmap_arg(hi_bits, n, dev, "hi_bits") if scale_grad else None
    if n == 0:
        return gx, torch.zeros((), dtype=torch.float32, device=dev)
    stream = _stream(dev)
    with on_device(dev):
        if not scale_grad:
            native.cuda.fake_quant_backward(
                g.data_ptr(), gx.data_ptr(), code, n, gx.numel(),
                pb.data_ptr(), pb.numel(), 0, 0, 0, 0, dev.index, stream,
            )
            return gx, torch.zeros((), dtype=torch.float32, device=dev)
        # One float per block of the kernel's grid, every slot written: summed here, on the
        # device, so nothing synchronizes.
        nparts = native.cuda.fake_quant_backward_partials(n, dev.index)
        partials = torch.empty(nparts, dtype=torch.float32, device=dev)
        native.cuda.fake_quant_backward(
            g.data_ptr(), gx.data_ptr(), code, n, gx.numel(),
            pb.data_ptr(), pb.numel(),
            hb.data_ptr(), hb.numel(),
            partials.data_ptr(), nparts, dev.index, stream,
        )
        return gx, partials.sum()
