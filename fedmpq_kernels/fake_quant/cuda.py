"""Fake-quant's CUDA backend: adapters from tensors to the CUDA kernels in
csrc/cuda/fake_quant.cu, through ``fedmpq_kernels._C.cuda``.

The kernels read float32, float16 and bfloat16 directly (the math is float32, see
:mod:`fedmpq_kernels.fake_quant.reference`), run on the tensor's device and on torch's
current stream there, and never synchronize: a dynamic scale (max|x|) and a given device
scale stay on the device. Reductions (max|x|, dL/dS) finish in the kernel's last block, in a
per-stream workspace (:func:`fedmpq_kernels._device.workspace`): one launch each, no zero
fill, no separate sum. Inputs of any strides are made contiguous here first; a
contiguous input at any element offset (a slice such as ``x[1:]``) is read in place.
Launches run inside :func:`fedmpq_kernels._device.on_device` (the native launchers never
switch devices), so an op on ``cuda:1`` never changes what ``device="cuda"`` means.

Ops: ``fake_quant``, ``fake_quant_backward`` and ``relu6_fake_quant`` (the same absmax and
forward kernels instantiated with ReLU6, as the Triton backend's ``RELU6`` flag; one native
call, two launches), and ``relu6_fake_quant_values`` (its y alone, no mask: the public
function's form without gradient). ``relu6_fake_quant``'s kernels are compiled for sm_80/sm_90 and pass
their tests on the host under tests/cuda_emu (CI), but have NOT yet run on a GPU:
``tools/gpu_check.sh`` runs their tests
(tests/fedmpq_kernels/fake_quant/test_relu6_fake_quant.py, backend case ``cuda``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .._checks import bitmap_arg, bitmap_nbytes
from .._device import on_device, raw_stream, workspace
from .._native import native

Tensor = torch.Tensor

# Dtype codes of csrc/cuda/fake_quant.h (enum DType).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_F32, _U8 = torch.float32, torch.uint8
_WS_WORDS: Dict[int, int] = {}  # device index -> workspace_words (the SM count does not change)


def _dtype_code(t: Tensor, name: str) -> int:
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return code


def _require_cuda(t: Tensor, name: str) -> None:
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor for the cuda backend, got one on {t.device}")


_NO_BITMAPS: Dict[torch.device, Tensor] = {}


def _no_bitmap(dev: torch.device) -> Tensor:
    """A bitmap not asked for: one shared zero-size tensor per device (nothing is ever
    written to it; the registered op hands out fresh ones, see ops.py), so the inference
    path allocates only y."""
    t = _NO_BITMAPS.get(dev)
    if t is None:
        t = _NO_BITMAPS[dev] = torch.empty(0, dtype=_U8, device=dev)
    return t


def _workspace(dev: torch.device, stream: int) -> Tuple[Tensor, int]:
    """(tensor, words) of the reduction workspace for ``stream`` (csrc/cuda/fake_quant.h).
    The caller holds the tensor until its launch is queued: another thread on this stream
    may replace it with a larger one, and the allocator would hand a freed one to work
    queued before this launch."""
    words = _WS_WORDS.get(dev.index)
    if words is None:
        words = _WS_WORDS[dev.index] = native.cuda.workspace_words(dev.index)
    return workspace(dev, stream, words), words


def _elementwise(t: Tensor, name: str) -> Tuple[int, torch.device, Tensor, int, Tensor, int]:
    """The common start of every op: t checked (float32/float16/bfloat16, on a CUDA device);
    returns its dtype code, its device, t made contiguous, its element count n, a fresh
    contiguous output of t's shape and dtype, and the bytes of one bitmap of n elements."""
    code = _dtype_code(t, name)
    _require_cuda(t, name)
    tc = t.contiguous()
    n = tc.numel()
    return code, t.device, tc, n, torch.empty_like(tc), bitmap_nbytes(n)


def fake_quant(x: Tensor, bits: int, scale: Optional[Tensor], mode: int) -> Tuple[Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.fake_quant`.

    Args:
        x: float32/float16/bfloat16 CUDA tensor, any shape and strides.
        bits: 1..8 or 16 (already validated).
        scale: None (dynamic: S = max|x|, computed on the device) or a one-element
            floating tensor (made 0-dim float32 on x's device; a value that is not finite
            and > 0 makes every output NaN, it is never read on the host).
        mode: 0 no bitmaps, 1 pass bitmap, 2 pass and hi bitmaps.

    Returns:
        (y, bitmaps): y of x's shape and dtype, contiguous; the bitmaps uint8 on x's
        device, ``mode`` * 4 * ceil(numel / 32) bytes (the pass bitmap, then the hi
        bitmap: one allocation), or empty (0 bytes, shared) for mode 0.
        One launch for a given scale, two for a dynamic one (absmax writing S on the device,
        then the quantizer reading it there); no host synchronization.
    """
    code, dev, xc, n, y, nb = _elementwise(x, "x")
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0, 1 or 2, got {mode}")
    bitmaps = torch.empty(nb * mode, dtype=_U8, device=dev) if mode else _no_bitmap(dev)
    if n == 0:
        return y, bitmaps
    with on_device(dev):
        stream = raw_stream(dev)
        if scale is None:
            # max|x| as float32 bits, written by absmax's last block (no zero fill needed)
            # and read by the quantizer on the same stream. A tensor of its own, not a word
            # of the shared workspace: another thread's absmax on this stream could land
            # between the two launches.
            s = torch.empty((), dtype=_F32, device=dev)
            s_ptr = s.data_ptr()
            ws, words = _workspace(dev, stream)
            native.cuda.absmax(xc.data_ptr(), code, n, s_ptr, ws.data_ptr(), words, dev.index, stream)
            scale_given = False
        else:
            s = scale
            if s.dtype is not _F32 or s.dim() != 0 or not s.is_cuda or s.get_device() != dev.index:
                if s.numel() != 1:
                    raise ValueError(f"scale must hold one value, got shape {tuple(s.shape)}")
                s = s.detach().reshape(()).to(device=dev, dtype=_F32)
            s_ptr = s.data_ptr()
            scale_given = True
        native.cuda.fake_quant(
            xc.data_ptr(), y.data_ptr(), code, n, n, bits, s_ptr, scale_given,
            bitmaps.data_ptr() if mode else 0, nb if mode else 0,
            bitmaps.data_ptr() + nb if mode == 2 else 0, nb if mode == 2 else 0,
            dev.index, stream,
        )
    # The temporaries (xc, a converted s) may be freed now: the caching allocator only
    # reuses their memory for work queued after these kernels on the same stream.
    return y, bitmaps


def fake_quant_backward(grad: Tensor, bitmaps: Tensor, scale_grad: bool) -> Tuple[Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.fake_quant_backward`.

    Args:
        grad: float32/float16/bfloat16 CUDA tensor, any shape and strides.
        bitmaps: the forward's uint8 bitmaps on grad's device: the pass bitmap (4 *
            ceil(numel / 32) bytes), then the hi bitmap, read only when scale_grad (copied
            first if not contiguous and 4-byte aligned; see
            :func:`fedmpq_kernels._checks.bitmap_arg` for the errors).
        scale_grad: whether to compute the scale gradient.

    Returns:
        (grad_x, grad_scale): grad_x of grad's shape and dtype, contiguous (grad where the
        pass bit is set, else 0); grad_scale a 0-dim float32 tensor on grad's device: the
        sum over clipped elements of (+grad where hi, -grad otherwise), or 0 when not
        scale_grad. One launch: the kernel's last block adds the blocks' sums (in a fixed
        order: deterministic) straight into grad_scale; without scale_grad block 0 writes
        its 0.
    """
    code, dev, g, n, gx, nb = _elementwise(grad, "grad")
    b = bitmap_arg(bitmaps, n, dev, "bitmaps", 2 if scale_grad else 1)
    if n == 0:
        return gx, torch.zeros((), dtype=_F32, device=dev)
    # Written by the kernel: the last block's sum, or block 0's 0 without scale_grad (no zero
    # fill launched for a ReLU6 or given-scale backward, whose dL/dS nobody reads).
    gs = torch.empty((), dtype=_F32, device=dev)
    with on_device(dev):
        stream = raw_stream(dev)
        ws, words = _workspace(dev, stream) if scale_grad else (None, 0)
        p = b.data_ptr()
        native.cuda.fake_quant_backward(
            g.data_ptr(), gx.data_ptr(), code, n, n, p, nb,
            p + nb if scale_grad else 0, nb if scale_grad else 0,
            ws.data_ptr() if scale_grad else 0, words, gs.data_ptr(), dev.index, stream,
        )
    return gx, gs


def relu6_fake_quant(x: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """See :func:`fedmpq_kernels.fake_quant.reference.relu6_fake_quant`.

    Args:
        x: float32/float16/bfloat16 CUDA tensor, any shape and strides.
        bits: 1..8 or 16 (already validated).

    Returns:
        (y, mask): y of x's shape and dtype, contiguous; the mask ``0 < x < 6``, uint8 on
        x's device, 4 * ceil(numel / 32) bytes (the pass-bitmap layout, so the backward is
        :func:`fake_quant_backward` with ``scale_grad=False``). One native call, two launches
        (the max of relu6(x) writing S on the device, then the quantizer reading it there);
        no host synchronization.
    """
    return _relu6(x, bits, True)


def relu6_fake_quant_values(x: Tensor, bits: int) -> Tensor:
    """:func:`relu6_fake_quant`'s y alone, no mask made or written (a forward without
    gradient: evaluation, inference)."""
    return _relu6(x, bits, False)[0]


def _relu6(x: Tensor, bits: int, with_mask: bool) -> Tuple[Tensor, Optional[Tensor]]:
    code, dev, xc, n, y, nb = _elementwise(x, "x")
    mask = torch.empty(nb, dtype=_U8, device=dev) if with_mask else None
    if n == 0:
        return y, mask
    with on_device(dev):
        stream = raw_stream(dev)
        s = torch.empty((), dtype=_F32, device=dev)  # S, its own tensor (see fake_quant)
        ws, words = _workspace(dev, stream)
        native.cuda.relu6_fake_quant(xc.data_ptr(), y.data_ptr(), code, n, n, bits, s.data_ptr(),
                                     mask.data_ptr() if with_mask else 0, nb if with_mask else 0,
                                     ws.data_ptr(), words, dev.index, stream)
    return y, mask
