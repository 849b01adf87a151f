"""Bit-plane training, CPU backend: adapters to the C++ kernels in csrc/cpu/bitplane*
(their own thread pool), through ``fedmpq_kernels._C.cpu``. Contracts: :mod:`fedmpq_kernels.bitplane.reference`
(same signatures, same results bit for bit).

The kernels take contiguous buffers, float32 and bitmaps 4-byte aligned: inputs of any
strides, dtypes or alignment are copied here first; a state tensor updated in place
(codes, sign, gs) that is not usable as it is gets a working copy, written back after the
kernel. Thread count follows ``torch.get_num_threads()`` (capped natively at the cores); a
call small enough to run on the calling thread anyway does not ask (:data:`_SERIAL`).

Every tensor attribute or method read from Python costs ~0.1 µs, as much as a 32-weight
kernel: the adapters read each once, take the common case (contiguous, aligned, of the
kernel's dtype) in the fewest reads, and reuse the data pointer its alignment test read.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .._buffers import (copies_among_shared, empty_f32, f32_scalar, refuse_aliased_step, refuse_aliased_step_copies,
                        words, write_back)
from .._checks import bitmap_arg
from .._library import PLAIN as _PLAIN, _is_wrapped
from .._native import native

Tensor = torch.Tensor
_CPU = torch.device("cpu")
_F32, _U8, _I64 = torch.float32, torch.uint8, torch.int64
# Up to this many elements (element-planes for a step: its work grows with bits and its
# thread count comes from n * bits) the kernels run on the calling thread whatever count they
# are given (csrc/cpu/cpu_features.cpp threads_for: one thread below two grains; parallel.h),
# so a small call does not ask torch for its count (~0.1 µs of a 32-weight call).
_SERIAL = native.threading()["grain"] if native is not None else 0


# The kernels take a pointer and an element count, so inputs keep their shapes: a reshape
# costs about 0.9 µs, and a step call made nine of them.
def _f32(t: Tensor) -> Tensor:
    """t as contiguous, 4-byte-aligned float32, any shape (no copy when it already is)."""
    if t.dtype is _F32 and t.is_contiguous() and not t.data_ptr() & 3:
        return t  # the common case, in the fewest calls
    if t.dtype != torch.float32:
        t = t.float()
    t = t.contiguous()
    if t.data_ptr() % 4 != 0:
        return t.clone()  # fresh storage is aligned
    return t


def _f32p(t: Tensor) -> Tuple[Tensor, int]:
    """(:func:`_f32` (t), its data pointer): the common case in three reads, the pointer its
    alignment test read."""
    if t.dtype is _F32 and t.is_contiguous() and not (p := t.data_ptr()) & 3:
        return t, p
    t = _f32(t)
    return t, t.data_ptr()


def _bytes(t: Tensor) -> Tensor:
    """A uint8 tensor contiguous, any shape (no copy when it already is)."""
    return t.contiguous()


def _sign(sign: Tensor, n: int) -> Tuple[Tensor, int, int]:
    """(the sign bitmap as bitmap_arg hands it out, its data pointer, its bytes): the usual
    one (a plain contiguous, aligned uint8 CPU tensor, long enough) in five reads, anything
    else through bitmap_arg (its copy, its errors)."""
    if (type(sign) is Tensor and sign.dtype is _U8 and sign.is_cpu and (nb := sign.numel()) >= 4 * ((n + 31) >> 5)
            and sign.is_contiguous() and not (p := sign.data_ptr()) & 3):
        return sign, p, nb
    sg = bitmap_arg(sign, n, _CPU, "sign")
    return sg, sg.data_ptr(), sg.numel()


def binarize(w: Tensor, bits: int) -> Tuple[Tensor, Tensor, Tensor]:
    x, px = _f32p(w.detach())
    n = x.numel()
    nb = 4 * ((n + 31) >> 5)  # bitmap_nbytes
    codes = torch.empty(n, dtype=_U8)
    sign = torch.empty(nb, dtype=_U8)
    s = native.cpu.binarize(px, n, bits, codes.data_ptr(), n, sign.data_ptr(), nb,
                            torch.get_num_threads() if n > _SERIAL else 1)
    return codes, sign, f32_scalar(s)


def dequantize(codes: Tensor, sign: Tensor, scale: Tensor, bits: int) -> Tensor:
    c = _bytes(codes)
    n = c.numel()
    _, ps, nb = _sign(sign, n)
    out = empty_f32((n,))
    native.cpu.dequantize(c.data_ptr(), n, ps, nb, scale.item(), bits, out.data_ptr(), n,
                          torch.get_num_threads() if n > _SERIAL else 1)
    return out


def dequantize_backward(grad: Tensor, codes: Tensor, sign: Tensor, bits: int) -> Tensor:
    c = _bytes(codes)
    n = c.numel()
    g, pg = _f32p(grad)
    ng = g.numel()  # the binding refuses a grad of another length than codes
    _, ps, nb = _sign(sign, n)
    r = native.cpu.dequantize_backward(pg, ng, c.data_ptr(), n, ps, nb, bits,
                                       torch.get_num_threads() if n > _SERIAL else 1)
    return f32_scalar(r)


def dequantize_layers(codes, sign, scale, bits, shapes) -> List[Tensor]:
    """dequantize of each layer, its weight made in ``shapes[l]`` (the many-layer op's
    adapter: one pass here, no reshape per layer)."""
    nt = torch.get_num_threads()
    out = []
    for c, sg, sc, b, shape in zip(codes, sign, scale, bits, shapes):
        c = _bytes(c)
        n = c.numel()
        sw, psw = _words(sg)  # the public function checked it: only made contiguous and aligned
        w = empty_f32(shape)
        native.cpu.dequantize(c.data_ptr(), n, psw, sw.numel(), sc.item(), b, w.data_ptr(), n, nt)
        out.append(w)
    return out


def dequantize_layers_usual(codes, sign, scale, bits, sink) -> Optional[List[Tensor]]:
    """dequantize_layers of the usual call (a model's weights before its forward), checked and
    made in one pass over the layers, every tensor attribute read once: layer l's float32
    weight in ``sink[l]``'s shape, or None when a layer is not usual (the caller's general
    path then checks it and names what is wrong). Usual: plain CPU tensors, codes and sign
    uint8 and contiguous, the sign bitmap 4-byte aligned and long enough, a 0-dim float32
    scale, a float32 sink of the codes' count, none functorch-wrapped; bits an int in 1..8. The caller
    has checked that the lists have one length."""
    nt = torch.get_num_threads()
    out = []
    for c, sg, sc, b, sk in zip(codes, sign, scale, bits, sink):
        if not (type(b) is int and 0 < b <= 8 and type(c) in _PLAIN and type(sg) in _PLAIN and type(sc) in _PLAIN
                and type(sk) in _PLAIN and c.dtype is _U8 and sg.dtype is _U8 and sc.dtype is _F32
                and sk.dtype is _F32 and c.is_cpu and sg.is_cpu and sc.is_cpu and sk.is_cpu and sc.dim() == 0
                and c.is_contiguous() and sg.is_contiguous() and sk.numel() == (n := c.numel())
                and (nsg := sg.numel()) >= 4 * ((n + 31) >> 5) and not (psg := sg.data_ptr()) & 3
                and not _is_wrapped(c) and not _is_wrapped(sg) and not _is_wrapped(sc) and not _is_wrapped(sk)):
            return None
        w = empty_f32(sk.shape)
        native.cpu.dequantize(c.data_ptr(), n, psg, nsg, sc.item(), b, w.data_ptr(), n, nt)
        out.append(w)
    return out


def dequantize_backward_layers(grads, codes, sign, bits) -> List[Tensor]:
    """dequantize_backward of each layer: float32 0-dim dL/ds each (views of one tensor)."""
    nt = torch.get_num_threads()
    r = []
    for g, c, sg, b in zip(grads, codes, sign, bits):
        c = _bytes(c)
        sw, psw = _words(sg)
        g, pg = _f32p(g)  # the binding refuses a grad of another length than codes
        r.append(native.cpu.dequantize_backward(pg, g.numel(), c.data_ptr(), c.numel(), psw, sw.numel(), b, nt))
    return list(torch.tensor(r, dtype=torch.float32).unbind())  # one tensor: cheaper than one per layer


def plane_popcounts(codes: Tensor, bits: int) -> Tensor:
    c = _bytes(codes)
    n = c.numel()
    out = torch.empty(bits, dtype=_I64)
    native.cpu.plane_popcounts(c.data_ptr(), n, bits, out.data_ptr(), bits,
                               torch.get_num_threads() if n > _SERIAL else 1)
    return out


def plane_popcounts_layers_usual(codes, bits) -> Optional[Tensor]:
    """plane_popcounts_layers of the usual call (an optimizer's coefficients), checked and
    counted in one pass over the layers: int64 (sum of bits,), or None when a layer's codes
    are not a plain contiguous uint8 CPU tensor (not functorch-wrapped) or its width not an
    int in 1..8 (the caller's general path checks it and names what is wrong). The caller
    has checked that the lists have one length."""
    layers = []
    for c, b in zip(codes, bits):
        if not (type(b) is int and 0 < b <= 8 and type(c) in _PLAIN and c.dtype is _U8 and c.is_cpu
                and c.is_contiguous() and not _is_wrapped(c)):
            return None
        layers.append((c.data_ptr(), c.numel(), b))
    return _popcounts_of(layers, sum(bits))


def plane_popcounts_layers(codes, bits) -> Tensor:
    """plane_popcounts of each layer through one native call, concatenated."""
    cs = [_bytes(c) for c in codes]  # kept alive over the call (a copy of a strided one)
    return _popcounts_of([(c.data_ptr(), c.numel(), b) for c, b in zip(cs, bits)], sum(bits))


def _popcounts_of(layers, total: int) -> Tensor:
    """The native many-layer popcount of ``layers`` ((codes pointer, n, bits) each), int64 (total,)."""
    out = torch.empty(total, dtype=_I64)
    native.cpu.plane_popcounts_layers(layers, out.data_ptr(), total, torch.get_num_threads())
    return out


def bitplane_step(codes: Tensor, sign: Tensor, mom: Tensor, gs: Tensor, grad: Tensor, coef: Tensor,
                  scale: Tensor, bits: int, lr: float, momentum: float, key: int,
                  key_tensor: Optional[Tensor] = None) -> Tensor:
    if key_tensor is not None:  # a CPU tensor: reading it is free
        key = int(key_tensor) & 0xFFFFFFFF
    # Working copies of the in-place state where the kernel cannot use it as it is.
    c = _bytes(codes)
    n = c.numel()
    sg, psg = _words(sign)
    m = _bytes(mom)
    g_state, pgs = _words(gs)  # the one float32, read and written as a word
    g = _f32(grad)
    cf = _f32(coef)
    if c is not codes or sg is not sign or m is not mom or g_state is not gs or g is not grad or cf is not coef:
        refuse_aliased_step(codes, sign, mom, gs, grad, coef)  # the native overlap check sees the copies
    r = native.cpu.bitplane_step(c.data_ptr(), n, psg, sg.numel(), m.data_ptr(), m.numel(),
                                 pgs, g.data_ptr(), g.numel(), cf.data_ptr(), cf.numel(), scale.item(),
                                 bits, float(lr), float(momentum), int(key),
                                 torch.get_num_threads() if n * bits > _SERIAL else 1)
    write_back((c, sg, m, g_state), (codes, sign, mom, gs))  # the working copies, if any
    return f32_scalar(r)


def _words(t: Tensor) -> Tuple[Tensor, int]:
    """(:func:`words` (t), its data pointer): a 1-D contiguous aligned t in three reads."""
    if t.dim() == 1 and t.is_contiguous() and not (p := t.data_ptr()) & 3:
        return t, p
    w = words(t)
    return w, w.data_ptr()


def bitplane_step_layers_usual(codes, sign, mom, gs, grad, coef, scale, bits, lr: float, momentum: float,
                               keys) -> Optional[Tensor]:
    """bitplane_step_layers of the usual call (an optimizer's step over a model), its checks
    and its stepping in one pass over the layers, every tensor attribute read once: g_s float32
    (L,), or None, nothing stepped, when a layer is not usual. Usual: every tensor a plain
    contiguous CPU tensor of the kernel's dtype (uint8 codes, sign, mom; float32 gs, grad,
    coef, scale), sign, gs, grad and coef 4-byte aligned, of the sizes bitplane_step takes
    (_step_layer's checks; codes not functorch-wrapped); bits an int in 1..8 and key an int
    in 0..2^32-1 per layer. The caller has checked lr and momentum (floats, in range) and that
    the lists have one length; on None its general path checks every layer and names what is
    wrong. The native call checks every size again before it steps any layer."""
    layers = []
    for c, sg, m, g_s, g, cf, sc, b, k in zip(codes, sign, mom, gs, grad, coef, scale, bits, keys):
        if not (type(b) is int and 0 < b <= 8 and type(k) is int and 0 <= k <= 0xFFFFFFFF
                and type(c) in _PLAIN and type(sg) in _PLAIN and type(m) in _PLAIN and type(g_s) in _PLAIN
                and type(g) in _PLAIN and type(cf) in _PLAIN and type(sc) in _PLAIN
                and c.dtype is _U8 and sg.dtype is _U8 and m.dtype is _U8 and g_s.dtype is _F32 and g.dtype is _F32
                and cf.dtype is _F32 and sc.dtype is _F32
                and c.is_cpu and sg.is_cpu and m.is_cpu and g_s.is_cpu and g.is_cpu and cf.is_cpu and sc.is_cpu
                and c.is_contiguous() and sg.is_contiguous() and m.is_contiguous() and g_s.is_contiguous()
                and g.is_contiguous() and cf.is_contiguous()
                and (n := c.numel()) < 1 << 32 and (nsg := sg.numel()) >= 4 * ((n + 31) >> 5)
                and m.numel() == b * n and g_s.numel() == 1 and g.numel() == n and cf.numel() == b
                and sc.numel() == 1 and not _is_wrapped(c)
                and not ((psg := sg.data_ptr()) | (pgs := g_s.data_ptr()) | (pg := g.data_ptr())
                         | (pcf := cf.data_ptr())) & 3):
            return None
        layers.append((c.data_ptr(), n, psg, nsg, m.data_ptr(), b * n, pgs, pg, n, pcf, b, sc.item(), b, k))
    L = len(layers)
    out = empty_f32((L,))
    native.cpu.bitplane_step_layers(layers, lr, momentum, out.data_ptr(), L, torch.get_num_threads())
    return out


def bitplane_step_layers(codes, sign, mom, gs, grad, coef, scale, bits, lr: float, momentum: float, keys,
                   key_tensor: Optional[Tensor] = None) -> Tensor:
    """bitplane_step on each layer, in order, through one native call (lists as the
    reference's bitplane_step_layers takes them)."""
    L = len(codes)
    if key_tensor is not None:  # a CPU tensor: reading it is free
        keys = [k & 0xFFFFFFFF for k in key_tensor.tolist()]
    work, layers = [], []
    for l in range(L):
        c, (sg, psg), m, (g_state, pgs) = _bytes(codes[l]), _words(sign[l]), _bytes(mom[l]), _words(gs[l])
        g, cf = _f32(grad[l]), _f32(coef[l])
        try:
            refuse_aliased_step_copies((c, sg, m, g_state, g, cf), (codes[l], sign[l], mom[l], gs[l], grad[l], coef[l]))
        except ValueError as e:
            raise ValueError(f"layer {l}: {e}") from None
        work.append((c, sg, m, g_state, g, cf))
        layers.append((c.data_ptr(), c.numel(), psg, sg.numel(), m.data_ptr(), m.numel(), pgs, g.data_ptr(), g.numel(),
                       cf.data_ptr(), cf.numel(), scale[l].item(), bits[l], int(keys[l])))
    out = empty_f32((L,))
    if copies_among_shared(work, [(codes[l], sign[l], mom[l], gs[l], grad[l], coef[l]) for l in range(L)]):
        # layer by layer; still every layer checked before any is stepped
        native.cpu.bitplane_step_layers(layers, float(lr), float(momentum), out.data_ptr(), L, 1, True)
        return torch.stack([bitplane_step(codes[l], sign[l], mom[l], gs[l], grad[l], coef[l], scale[l], bits[l], lr,
                                          momentum, int(keys[l])) for l in range(L)])
    native.cpu.bitplane_step_layers(layers, float(lr), float(momentum), out.data_ptr(), L,
                                    torch.get_num_threads())  # once a call: not worth a test per layer
    for l in range(L):
        write_back(work[l], (codes[l], sign[l], mom[l], gs[l]))  # the working copies, if any
    return out
