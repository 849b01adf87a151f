"""Bit-plane training, CPU backend: adapters to the C++ kernels in csrc/cpu/bitplane*
(their own thread pool), through ``fedmpq_kernels._C.cpu``. Contracts: :mod:`fedmpq_kernels.bitplane.reference`
(same signatures, same results bit for bit).

The kernels take contiguous buffers, float32 and bitmaps 4-byte aligned: inputs of any
strides, dtypes or alignment are copied here first; a state tensor updated in place
(codes, sign, gs) that is not usable as it is gets a working copy, written back after the
kernel. Thread count follows ``torch.get_num_threads()`` (capped natively at the cores).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .._buffers import copies_among_shared, empty_f32, words, write_back
from .._checks import bitmap_arg, bitmap_nbytes
from .._native import native

Tensor = torch.Tensor
_CPU = torch.device("cpu")


# The kernels take a pointer and an element count, so inputs keep their shapes: a reshape
# costs about 0.9 µs, and a step call made nine of them.
def _f32(t: Tensor) -> Tensor:
    """t as contiguous, 4-byte-aligned float32, any shape (no copy when it already is)."""
    if t.dtype != torch.float32:
        t = t.float()
    t = t.contiguous()
    if t.data_ptr() % 4 != 0:
        return t.clone()  # fresh storage is aligned
    return t


def _bytes(t: Tensor) -> Tensor:
    """A uint8 tensor contiguous, any shape (no copy when it already is)."""
    return t.contiguous()


def _scalar(t: Tensor) -> float:
    return float(t)  # any one-element tensor


def binarize(w: Tensor, bits: int) -> Tuple[Tensor, Tensor, Tensor]:
    x = _f32(w.detach())
    n = x.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    sign = torch.empty(bitmap_nbytes(n), dtype=torch.uint8)
    s = native.cpu.binarize(x.data_ptr(), n, bits, codes.data_ptr(), n, sign.data_ptr(), sign.numel(),
                            torch.get_num_threads())
    return codes, sign, torch.scalar_tensor(s, dtype=torch.float32)


def dequantize(codes: Tensor, sign: Tensor, scale: Tensor, bits: int) -> Tensor:
    c = _bytes(codes)
    n = c.numel()
    sg = bitmap_arg(sign, n, _CPU, "sign")
    out = torch.empty(n, dtype=torch.float32)
    native.cpu.dequantize(c.data_ptr(), n, sg.data_ptr(), sg.numel(), _scalar(scale), bits, out.data_ptr(), n,
                          torch.get_num_threads())
    return out


def dequantize_backward(grad: Tensor, codes: Tensor, sign: Tensor, bits: int) -> Tensor:
    c = _bytes(codes)
    n = c.numel()
    g = _f32(grad)  # the binding refuses a grad of another length than codes
    sg = bitmap_arg(sign, n, _CPU, "sign")
    r = native.cpu.dequantize_backward(g.data_ptr(), g.numel(), c.data_ptr(), n, sg.data_ptr(), sg.numel(), bits,
                                       torch.get_num_threads())
    return torch.scalar_tensor(r, dtype=torch.float32)  # cheaper than torch.tensor


def dequantize_layers(codes, sign, scale, bits, shapes) -> List[Tensor]:
    """dequantize of each layer, its weight made in ``shapes[l]`` (the many-layer op's
    adapter: one pass here, no reshape per layer)."""
    nt = torch.get_num_threads()
    out = []
    for c, sg, sc, b, shape in zip(codes, sign, scale, bits, shapes):
        c = _bytes(c)
        n = c.numel()
        sw = words(sg)  # the public function checked it: only made contiguous and aligned
        w = empty_f32(shape)
        native.cpu.dequantize(c.data_ptr(), n, sw.data_ptr(), sw.numel(), _scalar(sc), b, w.data_ptr(), n, nt)
        out.append(w)
    return out


def dequantize_backward_layers(grads, codes, sign, bits) -> List[Tensor]:
    """dequantize_backward of each layer: float32 0-dim dL/ds each (views of one tensor)."""
    nt = torch.get_num_threads()
    r = []
    for g, c, sg, b in zip(grads, codes, sign, bits):
        c = _bytes(c)
        n = c.numel()
        g = _f32(g)  # the binding refuses a grad of another length than codes
        sw = words(sg)
        r.append(native.cpu.dequantize_backward(g.data_ptr(), g.numel(), c.data_ptr(), n, sw.data_ptr(), sw.numel(), b,
                                                nt))
    return list(torch.tensor(r, dtype=torch.float32).unbind())  # one tensor: cheaper than one per layer


def plane_popcounts(codes: Tensor, bits: int) -> Tensor:
    c = _bytes(codes)
    out = torch.empty(bits, dtype=torch.int64)
    native.cpu.plane_popcounts(c.data_ptr(), c.numel(), bits, out.data_ptr(), bits, torch.get_num_threads())
    return out


def plane_popcounts_layers(codes, bits) -> Tensor:
    """plane_popcounts of each layer through one native call, concatenated."""
    cs = [_bytes(c) for c in codes]
    out = torch.empty(sum(bits), dtype=torch.int64)
    native.cpu.plane_popcounts_layers([(c.data_ptr(), c.numel(), b) for c, b in zip(cs, bits)], out.data_ptr(),
                                      out.numel(), torch.get_num_threads())
    return out


def bitplane_step(codes: Tensor, sign: Tensor, mom: Tensor, gs: Tensor, grad: Tensor, coef: Tensor,
                  scale: Tensor, bits: int, lr: float, momentum: float, key: int,
                  key_tensor: Optional[Tensor] = None) -> Tensor:
    n = codes.numel()
    if key_tensor is not None:  # a CPU tensor: reading it is free
        key = int(key_tensor) & 0xFFFFFFFF
    # Working copies of the in-place state where the kernel cannot use it as it is.
    c = _bytes(codes)
    sg = words(sign)
    m = _bytes(mom)
    g_state = words(gs)  # the one float32, read and written as a word
    g = _f32(grad)
    cf = _f32(coef)
    r = native.cpu.bitplane_step(c.data_ptr(), n, sg.data_ptr(), sg.numel(), m.data_ptr(), m.numel(),
                                 g_state.data_ptr(), g.data_ptr(), g.numel(), cf.data_ptr(), cf.numel(), _scalar(scale),
                                 bits, float(lr), float(momentum), int(key), torch.get_num_threads())
    write_back((c, sg, m, g_state), (codes, sign, mom, gs))  # the working copies, if any
    return torch.scalar_tensor(r, dtype=torch.float32)  # cheaper than torch.tensor


def bitplane_step_layers(codes, sign, mom, gs, grad, coef, scale, bits, lr: float, momentum: float, keys,
                   key_tensor: Optional[Tensor] = None) -> Tensor:
    """bitplane_step on each layer, in order, through one native call (lists as the
    reference's bitplane_step_layers takes them)."""
    L = len(codes)
    if key_tensor is not None:  # a CPU tensor: reading it is free
        keys = [k & 0xFFFFFFFF for k in key_tensor.tolist()]
    work, layers = [], []
    for l in range(L):
        c, sg, m, g_state = _bytes(codes[l]), words(sign[l]), _bytes(mom[l]), words(gs[l])
        g, cf = _f32(grad[l]), _f32(coef[l])
        work.append((c, sg, m, g_state, g, cf))
        layers.append((c.data_ptr(), c.numel(), sg.data_ptr(), sg.numel(), m.data_ptr(), m.numel(), g_state.data_ptr(),
                       g.data_ptr(), g.numel(), cf.data_ptr(), cf.numel(), _scalar(scale[l]), bits[l], int(keys[l])))
    out = torch.empty(L, dtype=torch.float32)
    if copies_among_shared(work, [(codes[l], sign[l], mom[l], gs[l], grad[l], coef[l]) for l in range(L)]):
        # layer by layer; still every layer checked before any is stepped
        native.cpu.bitplane_step_layers(layers, float(lr), float(momentum), out.data_ptr(), L, 1, True)
        return torch.stack([bitplane_step(codes[l], sign[l], mom[l], gs[l], grad[l], coef[l], scale[l], bits[l], lr,
                                          momentum, int(keys[l])) for l in range(L)])
    native.cpu.bitplane_step_layers(layers, float(lr), float(momentum), out.data_ptr(), L, torch.get_num_threads())
    for l in range(L):
        write_back(work[l], (codes[l], sign[l], mom[l], gs[l]))  # the working copies, if any
    return out
