"""Bit-plane training in pure torch: the test oracle, the fallback backend, and the one full
statement of the math, the storage and the float32 order of every step (ALGORITHM.md,
"Local representation", "Local objective", "Bit-plane optimizer", "Precision reduction").
The native and Triton kernels follow it operation for operation, so every backend gives the
same codes, signs and momentum for the same seed.

Storage of a quantized layer of n weights at N bits (1..8)
-----------------------------------------------------------
* ``codes``: uint8 (n,), the magnitude q_j in 0..2^N-1; bit N-1-i of q_j is plane B^(i)_j
  (i = 0 is the MSB plane). Never float planes.
* ``sign``: a bitmap (the layout of :mod:`fedmpq_kernels.pack.reference`: 4*ceil(n/32)
  uint8 bytes, little-endian uint32 words, bit j%32 of word j//32), bit set = sigma_j = -1
  (negative).
* ``scale``: float32 0-dim, s.  W_j = sigma_j * (q_j * k) with k = s / L, L = 2^N - 1.
* optimizer state: ``mom`` uint8 (N, n), plane-major, the code of r_ij = Delta_ij / g_s of
  the last step (:func:`encode_r`), and ``gs`` float32 (1,), that step's g_s; zeros at the
  start of a round (then m = 0 and the first step's d = g, as the authors' first step).

Codes of r (one byte per plane element): bit 7 = sign of the deterministic part (1 = -),
bits 3..6 = c (0: none, c >= 1: magnitude 2^(c-1), c <= 9), bits 0..1 = the stochastic LSB
part (0: none, 1: +1, 2: -1). r = +-2^(c-1) + stoch.

Gradients (G = dCE/dW, float32 (n,))
------------------------------------
* scale: dL/ds = (sum_j sigma_j * q_j * G_j, accumulated in float64) / L, rounded to float32.
* planes, never materialized: g_ij = a_j * 2^(N-1-i) + (B_ij ? c_i : 0) with
  a_j = sigma_j * (G_j * k), k = s / L, and c_i the group-lasso coefficient
  (λ/T) * n * N / sqrt(ε + popcount_i) from :func:`group_lasso`.

The step (:func:`bitplane_step`), per layer, float32, each operation rounded on its own
-------------------------------------------------------------------------------------
1. m_ij = f32(r_ij) * gs_prev;  d_ij = (mu * m_ij) + g_ij.
2. g_s = max_ij |d_ij| / L (tensor division). Not finite (a NaN/inf gradient or scale):
   the step is **skipped** (codes, sign, mom, gs untouched) and the returned status is
   that non-finite g_s. g_s == 0: codes and sign unchanged, mom <- 0, gs <- 0. g_s finite
   but lr * g_s overflowing float32: skipped too, status +inf.
3. x = (|d_ij| / g_s) * lr. x < 2^-100 (zero or tiny): no contribution. Else
   k = round(log2 x), computed exactly from the float32 bits (x normal):
   k = E + (mantissa field >= 0x3504F4), E the unbiased exponent (x >= sqrt 2 * 2^E,
   and log2 x is never exactly k + 1/2). e = k + (N-1-i).
   0 <= e <= N: r_ij = +-2^e (+ when d_ij > 0, else -: sign(0) = -1);
   e < 0: p_j += 2^e (float32, planes in order 0..N-1), r_ij = 0;  e > N: r_ij = 0.
4. p_j = min(p_j, 1); u_j = :func:`uniform` (key, j); if u_j < p_j the LSB plane's r gets
   sign(d_0j) (the MSB plane's d, as the authors' code).
5-6. R_j = sum_i r_ij * 2^(N-1-i) (an exact integer); v_j = f32(q_j) - f32(R_j) * (lr * g_s);
   q_j <- round_half_even(v_j); q_j < 0 -> sigma_j flips and q_j <- -q_j (**deviation**, as
   ALGORITHM.md); q_j <- min(q_j, L).
7. mom <- codes of r; gs <- g_s.

Randomness: a counter-based generator keyed by (seed, step, layer, element):
``key = mix32(mix32(mix32(seed ^ 0x9E3779B9) ^ step) ^ layer)`` (each taken mod 2^32),
``u_j = (mix32(key ^ mix32(j ^ 0x85EBCA6B)) >> 8) * 2^-24``, with mix32 the 32-bit
integer hash ``x ^= x>>16; x *= 0x21F0AAAD; x ^= x>>15; x *= 0x735A2D97; x ^= x>>15``.
The key is a uint32 computed on the host (:func:`step_key`) or an int64 tensor on the device
whose low 32 bits are used (``fedmpq_kernels.step_keys`` derives it from a step count kept
there, for a step captured in a CUDA graph): the same key gives the same draws either way.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import List, Optional, Tuple

import torch

from .._buffers import refuse_aliased_step
from .._checks import bitmap_nbytes
from ..pack.reference import pack_bitmap, unpack_bitmap

Tensor = torch.Tensor

EPS = 1e-8
M32 = 0xFFFFFFFF
MANT_SQRT2 = 0x3504F4  # mantissa field of the smallest float32 above sqrt(2)
TINY = 2.0 ** -100


# ---- the counter-based generator ------------------------------------------------------
def mix32_int(x: int) -> int:
    """mix32 on a Python int (the host computes the key with it)."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & M32
    x ^= x >> 15
    return x


def step_key(seed: int, step: int, layer: int) -> int:
    """The generator's key for one layer's step: a uint32 as a Python int. Each argument an
    int (any integer, taken mod 2^32); TypeError naming one that is not (a float was a bare
    TypeError from the mixing, a tensor gave a tensor)."""
    if type(seed) is int and type(step) is int and type(layer) is int:  # an optimizer's call
        return mix32_int(_step_prefix(seed, step) ^ (layer & M32))
    for name, v in (("seed", seed), ("step", step), ("layer", layer)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    seed, step, layer = int(seed), int(step), int(layer)
    return mix32_int(mix32_int(mix32_int((seed & M32) ^ 0x9E3779B9) ^ (step & M32)) ^ (layer & M32))


@functools.lru_cache(maxsize=16)
def _step_prefix(seed: int, step: int) -> int:
    # the key's (seed, step) part, shared by every layer of a step: an optimizer asks for
    # all its layers' keys in a row, and two of the three mixes are then a cache lookup
    return mix32_int(mix32_int((seed & M32) ^ 0x9E3779B9) ^ (step & M32))


def step_keys(seed: int, step: Tensor, layers: int) -> Tensor:
    """:func:`step_key` of layers 0..layers-1 with the step a one-element int64 tensor, on its
    device and without reading it: int64 (layers,) holding the uint32 keys."""
    k = _mix32(mix32_int((seed & M32) ^ 0x9E3779B9) ^ (step.reshape(()) & M32))
    return _mix32(k ^ torch.arange(layers, dtype=torch.int64, device=step.device))


def _mix32(x: Tensor) -> Tensor:
    """mix32 on int64 tensors holding uint32 values (products stay below 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def uniform(key: int, n: int, device=None) -> Tensor:
    """u_j in [0, 1), float32 (n,), for elements j = 0..n-1 (multiples of 2^-24)."""
    j = torch.arange(n, dtype=torch.int64, device=device)
    h = _mix32(_mix32(j ^ 0x85EBCA6B) ^ (key & M32))
    return (h >> 8).to(torch.float32) * (2.0 ** -24)


# ---- helpers ---------------------------------------------------------------------------
def _L(bits: int, like: Tensor) -> Tensor:
    return torch.full((), float((1 << bits) - 1), dtype=torch.float32, device=like.device)


def negative_mask(sign: Tensor, n: int) -> Tensor:
    """The sign bitmap as bool (n,), True = negative."""
    return unpack_bitmap(sign, n)


def round_log2(x: Tensor) -> Tensor:
    """round(log2 x) for normal positive float32 x, exactly (see step 3), int32."""
    b = x.view(torch.int32)
    e = ((b >> 23) & 0xFF) - 127
    return e + ((b & 0x7FFFFF) >= MANT_SQRT2).to(torch.int32)


def encode_r(det: Tensor, stoch: Tensor) -> Tensor:
    """det: int32 0 or +-2^e (e 0..8); stoch: int32 in {-1, 0, 1} -> uint8 codes."""
    mag = det.abs()
    c = torch.where(mag > 0, torch.log2(mag.clamp(min=1).float()).round().to(torch.int32) + 1, 0)
    neg = (det < 0).to(torch.int32)
    st = torch.where(stoch > 0, 1, torch.where(stoch < 0, 2, 0))
    return ((neg << 7) | (c << 3) | st).to(torch.uint8)


def decode_r(code: Tensor) -> Tensor:
    """uint8 codes -> r as int32."""
    c = code.to(torch.int32)
    mag = torch.where(((c >> 3) & 0xF) > 0, 1 << (((c >> 3) & 0xF) - 1).clamp(min=0), 0)
    det = torch.where((c >> 7) & 1 == 1, -mag, mag)
    st = c & 3
    return det + torch.where(st == 1, 1, torch.where(st == 2, -1, 0))


# ---- ops -----------------------------------------------------------------------------
def binarize(w: Tensor, bits: int) -> Tuple[Tensor, Tensor, Tensor]:
    """float W (any shape; computed in float32) -> (codes uint8 (n,), sign bitmap, scale
    float32 0-dim): s = max|W|, q = min(round(|W| * (L / s)), L) (s = 0: q = 0),
    negative = not (W > 0). Bit for bit :meth:`fedmpq.wire.QuantizedTensor.from_float`.
    W must be finite (the public function checks)."""
    wf = w.detach().reshape(-1).float()
    a = wf.abs()
    s = a.amax() if wf.numel() else torch.zeros((), device=w.device)
    L = _L(bits, wf)
    inv = torch.where(s > 0, L / s, torch.zeros_like(s))
    q = torch.minimum(torch.round(a * inv), L).to(torch.uint8)
    return q, pack_bitmap(~(wf > 0)), s.clone()


def dequantize(codes: Tensor, sign: Tensor, scale: Tensor, bits: int) -> Tensor:
    """W_j = sigma_j * (q_j * (s / L)), float32 (n,)."""
    n = codes.numel()
    k = scale.reshape(()).float() / _L(bits, codes)
    w = codes.reshape(-1).float() * k
    return torch.where(negative_mask(sign, n), -w, w)


def dequantize_backward(grad: Tensor, codes: Tensor, sign: Tensor, bits: int) -> Tensor:
    """dL/ds = (sum_j sigma_j q_j G_j in float64) / L -> float32 0-dim."""
    n = codes.numel()
    g = grad.reshape(-1).double() * codes.reshape(-1).double()
    g = torch.where(negative_mask(sign, n), -g, g)
    return (g.sum() / torch.tensor(float((1 << bits) - 1), dtype=torch.float64, device=g.device)).float()


def dequantize_layers(codes, sign, scale, bits, shapes) -> List[Tensor]:
    """:func:`dequantize` of each layer l, in ``shapes[l]`` (the op over a model's layers)."""
    return [dequantize(c, sg, sc, b).reshape(shape) for c, sg, sc, b, shape in zip(codes, sign, scale, bits, shapes)]


def dequantize_backward_layers(grads, codes, sign, bits) -> List[Tensor]:
    """:func:`dequantize_backward` of each layer l (``grads[l]`` of any shape)."""
    return [dequantize_backward(g, c, sg, b) for g, c, sg, b in zip(grads, codes, sign, bits)]


def plane_popcounts(codes: Tensor, bits: int) -> Tensor:
    """popcount of each plane, int64 (bits,): plane i counts bit bits-1-i of the codes."""
    c = codes.reshape(-1).to(torch.int32)
    shifts = torch.arange(bits - 1, -1, -1, device=codes.device, dtype=torch.int32)
    return ((c.unsqueeze(0) >> shifts.unsqueeze(1)) & 1).sum(dim=1)


def plane_popcounts_layers(codes, bits) -> Tensor:
    """:func:`plane_popcounts` of each layer l (``codes[l]``, ``bits[l]``), concatenated:
    int64 (sum of bits,)."""
    if not len(codes):
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([plane_popcounts(c, b) for c, b in zip(codes, bits)])


def group_lasso(popcounts: Tensor, n: int, bits: int) -> Tuple[Tensor, Tensor]:
    """The layer's term R_l = n*N * sum_i sqrt(eps + popcount_i) and d R_l / d B^(i)_j for a
    set bit, n*N / sqrt(eps + popcount_i): float32 0-dim and float32 (bits,). Pure torch on
    N <= 8 values (a kernel launch would cost more than the arithmetic)."""
    root = torch.sqrt(popcounts.to(torch.float64) + EPS)
    w = float(n * bits)
    return (w * root.sum()).float(), (w / root).float()


def bitplane_step(codes: Tensor, sign: Tensor, mom: Tensor, gs: Tensor, grad: Tensor, coef: Tensor,
                  scale: Tensor, bits: int, lr: float, momentum: float, key: int,
                  key_tensor: Optional[Tensor] = None, pre: Optional[Tensor] = None) -> Tensor:
    """One fused bit-plane optimizer step with re-quantization, in place on codes, sign,
    mom and gs (the module docstring states every operation). grad: G float32 (n,);
    coef: c float32 (bits,). Returns the step's g_s, float32 0-dim (non-finite: skipped).
    ``key_tensor``: a one-element int64 tensor; when given, its value mod 2^32 is the key
    (read on the host here: this is the oracle) and ``key`` is ignored.
    ``pre``: float32 (n,), receives the re-quantized value before the sign fold and the
    saturation (v = q - R*step, in the old sign's orientation; q itself when the step is
    skipped): the authors' unclamped value, for tools/unclamped_upload.py."""
    # as every backend refuses it: written state that shares memory (a view of another's
    # storage) would be overwritten by whichever write comes last
    refuse_aliased_step(codes, sign, mom, gs, grad, coef)
    n = codes.numel()
    if key_tensor is not None:
        key = int(key_tensor.reshape(())) & M32
    if pre is not None:
        pre.copy_(codes.reshape(-1).float())
    N = bits
    dev = codes.device
    L = _L(bits, codes)
    neg = negative_mask(sign, n)
    k = scale.reshape(()).float() / L
    G = grad.reshape(-1).float()
    a = G * k
    a = torch.where(neg, -a, a)
    q = codes.reshape(-1).to(torch.int32)
    r_prev = decode_r(mom.reshape(N, n)).float()
    mu = torch.tensor(momentum, dtype=torch.float32, device=dev)
    lr_t = torch.tensor(lr, dtype=torch.float32, device=dev)
    d = []
    for i in range(N):
        bit = ((q >> (N - 1 - i)) & 1).bool()
        gi = a * float(1 << (N - 1 - i))
        gi = torch.where(bit, gi + coef[i].float(), gi)
        m = r_prev[i] * gs.reshape(()).float()
        d.append(mu * m + gi)
    d = torch.stack(d) if n else torch.zeros((N, 0), device=dev)
    gmax = d.abs().amax() if n else torch.zeros((), device=dev)
    g_s = gmax / L
    if not bool(torch.isfinite(g_s)):
        return g_s
    if not bool(g_s > 0):
        mom.zero_()
        gs.zero_()
        return g_s
    step = lr_t * g_s
    if not bool(torch.isfinite(step)):  # lr * g_s overflows float32: skipped as well
        return torch.full((), float("inf"), dtype=torch.float32, device=dev)
    x = (d.abs() / g_s) * lr_t
    valid = x >= TINY
    kk = round_log2(torch.where(valid, x, torch.ones_like(x)))
    e = kk + (N - 1 - torch.arange(N, device=dev, dtype=torch.int32)).unsqueeze(1)
    pos = d > 0
    det_on = valid & (e >= 0) & (e <= N)
    det = torch.where(det_on, torch.where(pos, 1, -1) * (1 << e.clamp(0, 8)), 0).to(torch.int32)
    small = valid & (e < 0)
    p = torch.zeros(n, dtype=torch.float32, device=dev)
    for i in range(N):  # plane order, as the kernels sum
        p = p + torch.where(small[i], torch.ldexp(torch.ones_like(p), e[i].clamp(max=0)), torch.zeros_like(p))
    p = torch.minimum(p, torch.ones_like(p))
    u = uniform(key, n, dev)
    hit = u < p
    stoch = torch.where(hit, torch.where(pos[0], 1, -1), 0).to(torch.int32)
    r = det.clone()
    r[N - 1] = r[N - 1] + stoch
    R = torch.zeros(n, dtype=torch.int32, device=dev)
    for i in range(N):
        R = R + r[i] * (1 << (N - 1 - i))
    v = q.float() - R.float() * step
    if pre is not None:
        pre.copy_(v)
    qn = torch.round(v)
    flip = qn < 0
    qn = torch.minimum(qn.abs(), L)
    codes.copy_(qn.to(torch.uint8).reshape(codes.shape))
    nb = bitmap_nbytes(n)  # sign may be longer than its n bits' words: the rest is left alone
    sign.reshape(-1)[:nb].copy_(pack_bitmap(neg ^ flip))
    stoch_all = torch.zeros_like(det)
    stoch_all[N - 1] = stoch
    mom.copy_(encode_r(det, stoch_all).reshape(mom.shape))
    gs.copy_(g_s.reshape(gs.shape))
    return g_s


def bitplane_step_layers(codes, sign, mom, gs, grad, coef, scale, bits, lr: float, momentum: float, keys,
                   key_tensor: Optional[Tensor] = None) -> Tensor:
    """:func:`bitplane_step` on each layer l of the lists, in order (key ``keys[l]``, or
    ``key_tensor[l]`` when given): float32 (L,), each layer's g_s."""
    return torch.stack([bitplane_step(codes[l], sign[l], mom[l], gs[l], grad[l], coef[l], scale[l], bits[l], lr,
                                      momentum, keys[l], None if key_tensor is None else key_tensor[l])
                        for l in range(len(codes))])


def precision_reduction(codes: Tensor, scale: Tensor, bits: int, theta: float) -> Tuple[int, Tensor, Tensor]:
    """ALGORITHM.md "Precision reduction" with threshold theta (percent): returns
    (new N, new codes uint8 (n,), new scale float32 0-dim); signs are unchanged.

    f_i = 100 * popcount_i / n. MSB side, top plane down, while N > 1: f = 0 drops the
    plane, 0 < f < theta drops it saturating q <- min(q, 2^(N-1) - 1), f >= theta stops
    (recounted after every drop). LSB side, bottom up, while N > 1: f <= theta drops it
    (q <- q >> 1, s <- 2s), else stop. Finally s <- (s * (2^N - 1)) / (2^N0 - 1), in float32;
    where that order overflows (s above ~1.3e36 at 8 bits) the same value in float64, rounded
    to float32 (never above s)."""
    n = codes.numel()
    q = codes.reshape(-1).to(torch.int32)
    s = scale.reshape(()).float().clone()
    N0 = N = bits
    if n == 0:
        return N, codes.clone(), s

    def frac(plane_bit: int) -> float:
        return 100.0 * int(((q >> plane_bit) & 1).sum()) / n

    while N > 1:
        f = frac(N - 1)
        if f == 0:
            N -= 1
        elif f < theta:
            q = torch.minimum(q, torch.full_like(q, (1 << (N - 1)) - 1))
            N -= 1
        else:
            break
    k = 0  # LSB planes dropped
    while N > 1:
        if frac(0) <= theta:
            q = q >> 1
            s = s * 2
            N -= 1
            k += 1
        else:
            break
    out = (s * float((1 << N) - 1)) / torch.tensor(float((1 << N0) - 1), dtype=torch.float32, device=s.device)
    if not math.isfinite(float(out)) and math.isfinite(s0 := float(scale)):
        # s * 2^k * (2^N - 1) passed float32's range on the way (a scale above ~1.3e36 at 8
        # bits), though the result is at most s (2^k (2^N - 1) <= 2^N0 - 1): in float64 then
        out = torch.tensor(s0 * 2.0**k * ((1 << N) - 1) / ((1 << N0) - 1), dtype=torch.float32, device=s.device)
    return N, q.to(torch.uint8), out
