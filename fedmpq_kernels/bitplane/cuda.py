"""Bit-plane training, CUDA backend: adapters to the CUDA kernels in csrc/cuda/bitplane.cu,
through ``fedmpq_kernels._C.cuda``. Contracts: :mod:`fedmpq_kernels.bitplane.reference`
(same signatures, same results bit for bit; ``dequantize_backward`` sums in float64 in
another order: within n * 2^-53 of sum |sigma q G| of the reference's, 1e-6 relative where
the terms do not cancel).

Why beside the Triton backend: a native launch costs the host a few microseconds where
Triton's Python launcher costs tens, and a client step makes about four of these calls per
layer; with ``binarize`` here too, training on CUDA needs no Triton.

``dequantize_layers`` and ``dequantize_backward_layers`` (a model's weights, forward and
backward) and the ``*_layers`` ops of the optimizer hand every layer to one native call,
which launches over tables of up to 32 layers (csrc/cuda/bitplane.h).

Launches run inside :func:`fedmpq_kernels._device.on_device` on torch's current stream,
never synchronize, and never read a device value on the host: the scale, g_s and a device
key stay on the device, so a step can be captured in a CUDA graph. Reductions finish in the
kernel's last block in the per-stream workspace of :func:`fedmpq_kernels._device.workspace`.
Inputs of any strides or dtypes are made contiguous float32 first; a state tensor updated in
place that the kernel cannot use as it is gets a working copy, written back after it.

The kernels are compiled for sm_80/sm_90 and pass their tests on the host under
tests/cuda_emu (CI), but have NOT yet run on a GPU: ``tools/gpu_check.sh`` runs the
bit-plane tests with backend case ``cuda``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .._buffers import copies_among_shared, empty_f32, refuse_aliased_step_copies, words, write_back
from .._checks import bitmap_nbytes
from .._device import on_device, raw_stream, workspace
from .._native import native

Tensor = torch.Tensor
_F32 = torch.float32
_WS_WORDS: Dict[int, int] = {}  # device index -> bitplane_workspace_words (the SM count does not change)


def _workspace(dev: torch.device, stream: int):
    """(tensor, words) of the reduction workspace for ``stream`` (csrc/cuda/bitplane.h); the
    caller holds the tensor until its launch is queued (see fake_quant/cuda.py)."""
    n = _WS_WORDS.get(dev.index)
    if n is None:
        n = _WS_WORDS[dev.index] = native.cuda.bitplane_workspace_words(dev.index)
    return workspace(dev, stream, n), n


# The kernels take a pointer and an element count, so inputs keep their shapes: a reshape
# costs about 0.9 µs of host time each.
def _f32(t: Tensor) -> Tensor:
    """t as contiguous float32, any shape (no copy when it already is)."""
    if t.dtype is not _F32:
        t = t.float()
    return t.contiguous()


def _scale(t: Tensor, dev: torch.device) -> Tensor:
    """A one-element scale as a float32 on ``dev`` readable through its data pointer."""
    if t.dtype is _F32 and t.is_contiguous() and t.device == dev:
        return t
    return t.detach().reshape(1).to(device=dev, dtype=_F32).contiguous()


def binarize(w: Tensor, bits: int) -> Tuple[Tensor, Tensor, Tensor]:
    dev = w.device
    wf = _f32(w.detach())  # float16/bfloat16 widen exactly
    n = wf.numel()
    nbytes = bitmap_nbytes(n)
    codes = torch.empty(n, dtype=torch.uint8, device=dev)
    sign = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    if n == 0:
        return codes, sign, torch.zeros((), dtype=_F32, device=dev)
    scale = torch.empty((), dtype=_F32, device=dev)  # max|w|, written by the absmax launch
    with on_device(dev):
        stream = raw_stream(dev)
        ws, ws_words = _workspace(dev, stream)
        native.cuda.binarize(wf.data_ptr(), n, bits, codes.data_ptr(), n, sign.data_ptr(), nbytes, scale.data_ptr(),
                             ws.data_ptr(), ws_words, dev.index, stream)
    return codes, sign, scale


def dequantize(codes: Tensor, sign: Tensor, scale: Tensor, bits: int) -> Tensor:
    dev = codes.device
    c = codes.contiguous()
    n = c.numel()
    out = torch.empty(n, dtype=_F32, device=dev)
    if n == 0:
        return out
    nbytes = bitmap_nbytes(n)
    sw = words(sign, nbytes)
    s = _scale(scale, dev)
    with on_device(dev):
        native.cuda.dequantize(c.data_ptr(), n, sw.data_ptr(), sw.numel(), s.data_ptr(), bits, out.data_ptr(), n,
                               dev.index, raw_stream(dev))
    return out


def _grad_args(grad: Tensor, codes: Tensor, sign: Tensor):
    """One layer's dequantize_backward inputs as the kernels read them: (grad float32, codes,
    sign words, n), contiguous; n is grad's count (the binding refuses codes of another)."""
    c = codes.contiguous()
    g = _f32(grad)
    return g, c, words(sign, bitmap_nbytes(c.numel())), g.numel()


def dequantize_backward(grad: Tensor, codes: Tensor, sign: Tensor, bits: int) -> Tensor:
    dev = codes.device
    g, c, sw, n = _grad_args(grad, codes, sign)
    if n == 0 and c.numel() == 0:  # a count mismatch goes on to the binding, which refuses it
        return torch.zeros((), dtype=_F32, device=dev)
    out = torch.empty((), dtype=_F32, device=dev)  # written by the kernel's last block
    with on_device(dev):
        stream = raw_stream(dev)
        ws, ws_words = _workspace(dev, stream)
        native.cuda.dequantize_backward(g.data_ptr(), n, c.data_ptr(), c.numel(), sw.data_ptr(), sw.numel(), bits,
                                        out.data_ptr(), ws.data_ptr(), ws_words, dev.index, stream)
    return out


def dequantize_layers(codes, sign, scale, bits, shapes) -> List[Tensor]:
    """dequantize of each layer, its weight made in ``shapes[l]``, in one native call: one
    launch per group of up to 32 layers (launches over layer tables)."""
    dev = codes[0].device
    out, layers, keep = [], [], []
    for c, sg, sc, b, shape in zip(codes, sign, scale, bits, shapes):
        c = c.contiguous()
        n = c.numel()
        w = empty_f32(shape, dev)
        out.append(w)
        if n == 0:
            continue
        sw = words(sg, bitmap_nbytes(n))
        s = _scale(sc, dev)
        keep.append((c, sw, s))  # alive until the launches are queued (copies among them)
        layers.append((c.data_ptr(), n, sw.data_ptr(), sw.numel(), s.data_ptr(), b, w.data_ptr(), n))
    if layers:
        with on_device(dev):
            native.cuda.dequantize_layers(layers, dev.index, raw_stream(dev))
    return out


def dequantize_backward_layers(grads, codes, sign, bits) -> List[Tensor]:
    """dequantize_backward of each layer in one native call (one launch per group of up to 32
    layers, each layer's dL/ds the single-layer kernel's bit for bit): float32 0-dim each,
    views of one tensor."""
    dev = codes[0].device
    L = len(codes)
    # an empty layer launches nothing, so its dL/ds must be a zero already there
    out = (torch.zeros if any(c.numel() == 0 for c in codes) else torch.empty)(L, dtype=_F32, device=dev)
    base = out.data_ptr()
    layers, keep = [], []
    for i, (g, c, sg, b) in enumerate(zip(grads, codes, sign, bits)):
        g, c, sw, n = _grad_args(g, c, sg)
        if n == 0 and c.numel() == 0:
            continue
        keep.append((g, c, sw))  # alive until the launches are queued (copies among them)
        layers.append((g.data_ptr(), n, c.data_ptr(), c.numel(), sw.data_ptr(), sw.numel(), b, base + 4 * i))
    if layers:
        with on_device(dev):
            stream = raw_stream(dev)
            ws, ws_words = _workspace(dev, stream)
            native.cuda.dequantize_backward_layers(layers, ws.data_ptr(), ws_words, dev.index, stream)
    return list(out.unbind())


def plane_popcounts(codes: Tensor, bits: int) -> Tensor:
    dev = codes.device
    c = codes.contiguous()
    n = c.numel()
    if n == 0:
        return torch.zeros(bits, dtype=torch.int64, device=dev)
    out = torch.empty(bits, dtype=torch.int64, device=dev)
    with on_device(dev):
        stream = raw_stream(dev)
        ws, ws_words = _workspace(dev, stream)
        native.cuda.plane_popcounts(c.data_ptr(), n, bits, out.data_ptr(), bits, ws.data_ptr(), ws_words, dev.index,
                                    stream)
    return out


def plane_popcounts_layers(codes, bits) -> Tensor:
    """plane_popcounts of each layer, concatenated: one native call, one launch per group of
    up to 32 layers (an empty layer launches nothing: its counts are the zeros of a zero fill)."""
    dev = codes[0].device
    cs = [c.contiguous() for c in codes]
    layers = [(c.data_ptr(), c.numel(), b) for c, b in zip(cs, bits)]
    out = (torch.zeros if any(n == 0 for _, n, _ in layers) else torch.empty)(sum(bits), dtype=torch.int64,
                                                                               device=dev)
    with on_device(dev):
        stream = raw_stream(dev)
        ws, ws_words = _workspace(dev, stream)
        native.cuda.plane_popcounts_layers(layers, out.data_ptr(), out.numel(), ws.data_ptr(), ws_words, dev.index,
                                           stream)
    return out


def bitplane_step(codes: Tensor, sign: Tensor, mom: Tensor, gs: Tensor, grad: Tensor, coef: Tensor,
                  scale: Tensor, bits: int, lr: float, momentum: float, key: int,
                  key_tensor: Optional[Tensor] = None) -> Tensor:
    """``key_tensor`` (a one-element int64 tensor on codes' device): the update kernel loads
    the key from it (no host read, capturable in a CUDA graph) and ``key`` is ignored."""
    dev = codes.device
    n = codes.numel()
    if n == 0 and grad.numel() == 0:  # the reference: max over nothing is 0, so g_s = 0 (mom is empty)
        gs.zero_()
        return torch.zeros((), dtype=_F32, device=dev)
    # Working copies of the in-place state where the kernel cannot use it as it is.
    c = codes.contiguous()
    sw = words(sign)
    m = mom.contiguous()  # (bits, n): the public function checks
    g_state = words(gs)  # the one float32, read and written as a word
    g = _f32(grad)
    cf = _f32(coef)
    if c is not codes or sw is not sign or m is not mom or g_state is not gs or g is not grad or cf is not coef:
        refuse_aliased_step_copies((c, sw, m, g_state, g, cf), (codes, sign, mom, gs, grad, coef))  # a copy made?
    sc = _scale(scale, dev)
    if key_tensor is None:
        key_ptr = 0
    else:
        key, key_ptr = 0, key_tensor.data_ptr()  # the element's address, whatever the strides
    out = torch.empty(2, dtype=_F32, device=dev)  # g_s (returned), then the previous gs (pass 2's)
    with on_device(dev):
        stream = raw_stream(dev)
        ws, ws_words = _workspace(dev, stream)
        native.cuda.bitplane_step(c.data_ptr(), n, sw.data_ptr(), sw.numel(), m.data_ptr(), m.numel(),
                                  g_state.data_ptr(), g.data_ptr(), g.numel(), cf.data_ptr(), cf.numel(),
                                  sc.data_ptr(), bits, float(lr), float(momentum), int(key) & 0xFFFFFFFF,
                                  key_ptr, out.data_ptr(), ws.data_ptr(), ws_words, dev.index, stream)
    write_back((c, sw, m, g_state), (codes, sign, mom, gs))  # the working copies, if any
    return out[0]


def bitplane_step_layers(codes, sign, mom, gs, grad, coef, scale, bits, lr: float, momentum: float, keys,
                   key_tensor: Optional[Tensor] = None) -> Tensor:
    """bitplane_step on each layer, in order (lists as the reference's bitplane_step_layers
    takes them), one native call: two launches per group of up to 32 layers, or layer by
    layer when layers share memory. ``key_tensor`` (int64, one element per layer, on the
    device): layer l's kernel loads its key from element l."""
    L = len(codes)
    dev = codes[0].device
    if key_tensor is not None:
        kt, kt_step = key_tensor.data_ptr(), 8 * key_tensor.stride(0)
    work, layers, empty = [], [], []
    for l in range(L):
        c, sw, m, g_state = codes[l].contiguous(), words(sign[l]), mom[l].contiguous(), words(gs[l])
        g, cf, sc = _f32(grad[l]), _f32(coef[l]), _scale(scale[l], dev)
        # the usual layer's working buffers are its tensors: six identity tests (the helper's
        # loop cost ~0.3 µs a layer of every step)
        if (c is not codes[l] or sw is not sign[l] or m is not mom[l] or g_state is not gs[l] or g is not grad[l]
                or cf is not coef[l]):
            try:
                refuse_aliased_step_copies((c, sw, m, g_state, g, cf),
                                           (codes[l], sign[l], mom[l], gs[l], grad[l], coef[l]))
            except ValueError as e:
                raise ValueError(f"layer {l}: {e}") from None
        n = c.numel()
        if n == 0:
            empty.append(l)
        key, key_ptr = (0, kt + l * kt_step) if key_tensor is not None else (int(keys[l]) & 0xFFFFFFFF, 0)
        work.append((c, sw, m, g_state, g, cf, sc))
        layers.append((c.data_ptr(), n, sw.data_ptr(), sw.numel(), m.data_ptr(), m.numel(), g_state.data_ptr(),
                       g.data_ptr(), g.numel(), cf.data_ptr(), cf.numel(), sc.data_ptr(), bits[l], key, key_ptr))
    # (g_s, previous gs) per layer; an empty layer launches nothing, so its g_s is the 0 of a zero fill
    out = (torch.zeros if empty else torch.empty)(2 * L, dtype=_F32, device=dev)
    # layer by layer when copies are stepped among shared memory; the native call then only
    # checks every layer, so that none is stepped before a refusal
    one_by_one = copies_among_shared(work, [(codes[l], sign[l], mom[l], gs[l], grad[l], coef[l], scale[l])
                                            for l in range(L)])
    with on_device(dev):
        stream = raw_stream(dev)
        ws, ws_words = _workspace(dev, stream)
        native.cuda.bitplane_step_layers(layers, float(lr), float(momentum), out.data_ptr(), 2 * L, ws.data_ptr(),
                                         ws_words, dev.index, stream, one_by_one)
    if one_by_one:
        return torch.stack([bitplane_step(codes[l], sign[l], mom[l], gs[l], grad[l], coef[l], scale[l], bits[l], lr,
                                          momentum, keys[l], None if key_tensor is None else key_tensor[l])
                            for l in range(L)])
    for l in range(L):
        write_back(work[l], (codes[l], sign[l], mom[l], gs[l]))  # the working copies, if any
    for l in empty:  # the reference: max over nothing is 0, so gs = 0
        gs[l].zero_()
    return out[0::2]
