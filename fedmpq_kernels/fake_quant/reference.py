"""Fake-quant in pure torch: the test oracle, the fallback backend, and the one full
statement of the math and of what the clipping masks hold.

FedMPQ's sign-magnitude symmetric quantizer (ALGORITHM.md "Activations"), computed in
float32 whatever the input dtype, in exactly this order (the native and Triton kernels
follow it, so every backend agrees bit for bit)::

    L    = 2**bits - 1
    S    = max|x|            (dynamic)   or the given scale
    u, d = (2**100, 2**-100) if S < 2**-100 else (1, 1)
    Su   = S * u                         (exact)
    inv  = L / Su if Su > 0 else 0       (float32 division)
    step = Su / L
    a    = minimum(|x|, S)               (the clamp to [-S, S]; NaN propagates)
    y    = copysign(round_half_even((a * u) * inv) * step * d, x)

u and d are 1 (exact no-ops) for every S from 2**-100 up: the grid is then the plain
``round(a * L / S) * S / L``. Below it ``L / S`` would overflow float32 (S < L / FLT_MAX,
about 4e-38 at 4 bits) and ``S / L`` go subnormal, which made every output inf or NaN; on
``S * 2**100`` (exact: a power of two) the grid keeps its levels, and ``* d`` scales the
values back, rounding only where they are subnormal.

Bitmaps (clipped STE): one bit per element of the flattened (C-order) input, in the layout
stated in :mod:`fedmpq_kernels.pack.reference` (4 * ceil(n / 32) bytes, bits past n zero).
``pass = not (x > S) and not (x < -S)`` (NaN passes, like the identity STE) and
``hi = x > S``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import bitmap_arg, bitmap_nbytes, levels
from ..pack.reference import pack_bitmap, unpack_bitmap

Tensor = torch.Tensor

def fake_quant_values(x: Tensor, bits: int, scale: Optional[Tensor]) -> Tensor:
    """The quantized values, float32, x's shape. scale: None (dynamic) or 0-dim tensor."""
    xf = x.float()
    return _quantize(xf, bits, _effective_scale(xf, scale))


def _effective_scale(xf: Tensor, scale: Optional[Tensor]) -> Tensor:
    if scale is None:
        return xf.abs().amax() if xf.numel() else xf.new_zeros(())
    s = scale.reshape(()).float()
    # A bad scale on a device is never read on the host (that would synchronize):
    # it turns every output into NaN instead, as the GPU kernels do.
    return torch.where((s > 0) & torch.isfinite(s), s, torch.full_like(s, float("nan")))


def _quantize(xf: Tensor, bits: int, s: Tensor) -> Tensor:
    L = float(levels(bits))
    Lt = torch.full_like(s, L)
    tiny = s < 2.0 ** -100  # L / s would overflow (see the module docstring)
    u = torch.where(tiny, torch.full_like(s, 2.0 ** 100), torch.ones_like(s))
    d = torch.where(tiny, torch.full_like(s, 2.0 ** -100), torch.ones_like(s))
    su = s * u
    inv = torch.where(su > 0, Lt / su, torch.zeros_like(s))
    # Tensor / tensor, never tensor / Python number: on CUDA torch turns ``t / c`` into
    # ``t * (1 / c)``, one ulp off the kernels' true division (seen on an H200).
    step = su / Lt
    a = torch.minimum(xf.abs(), s) * u
    return torch.copysign(torch.round(a * inv) * step * d, xf)


def fake_quant(x: Tensor, bits: int, scale: Optional[Tensor], mode: int) -> Tuple[Tensor, Tensor]:
    """Backend forward: y (x's shape and dtype, contiguous) and the bitmaps, uint8.

    The bitmaps by mode: 0, none (0 bytes); 1, the pass bitmap; 2, the pass bitmap then the
    hi bitmap, ``bitmap_nbytes(n)`` bytes each, back to back in one tensor (one allocation
    and one saved tensor per call).
    """
    xf = x.float()
    s = _effective_scale(xf, scale)
    y = _quantize(xf, bits, s).to(x.dtype).contiguous()
    if mode == 0:
        return y, torch.empty(0, dtype=torch.uint8, device=x.device)
    hi = xf > s
    lo = xf < -s
    bitmaps = pack_bitmap(~(hi | lo))
    if mode == 2:
        bitmaps = torch.cat([bitmaps, pack_bitmap(hi)])
    return y, bitmaps


def fake_quant_backward(grad: Tensor, bitmaps: Tensor, scale_grad: bool) -> Tuple[Tensor, Tensor]:
    """Clipped-STE backward: grad_x = grad where pass else 0; grad_scale (0-dim float32) =
    sum over clipped elements of (+grad where hi, -grad where lo), or 0 if not scale_grad.

    bitmaps: the forward's (uint8): the pass bitmap, then, read only when scale_grad, the
    hi bitmap (``bitmap_nbytes(n)`` bytes each); longer is allowed."""
    n = grad.numel()
    nb = bitmap_nbytes(n)
    bitmaps = bitmap_arg(bitmaps, n, grad.device, "bitmaps", 2 if scale_grad else 1)
    passed = unpack_bitmap(bitmaps[:nb], n).view(grad.shape)
    gx = torch.where(passed, grad, torch.zeros_like(grad)).contiguous()
    if not scale_grad:
        return gx, torch.zeros((), dtype=torch.float32, device=grad.device)
    hi = unpack_bitmap(bitmaps[nb:2 * nb], n).view(grad.shape)
    g = grad.float()
    signed = torch.where(hi, g, -g)
    gs = torch.where(passed, torch.zeros_like(g), signed).sum(dtype=torch.float32)
    return gx, gs


def relu6_fake_quant(x: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """ReLU6 fused with the dynamic-scale quantizer (FedMPQ's activations): y (x's shape and
    dtype, contiguous) and the gradient mask bitmap.

    ``a = min(x, 6)`` where ``x > 0``, NaN where x is NaN, else +0; ``S = max a`` (NaN
    anywhere makes every output NaN; S = 0 gives zeros); ``y = round(a * inv) * step`` with
    inv and step as :func:`fake_quant` (a >= 0, so no clamp and no sign). The mask is
    ``0 < x < 6`` (ReLU6's derivative, 0 at both ends and for NaN), in the pass-bitmap
    layout, so the backward is ``fake_quant_backward(grad, mask, False)``.
    """
    xf = x.float()
    six = torch.full((), 6.0, dtype=torch.float32, device=x.device)
    a = torch.where(xf > 0, torch.minimum(xf, six), torch.where(torch.isnan(xf), xf, torch.zeros_like(xf)))
    s = a.amax() if a.numel() else a.new_zeros(())
    y = _quantize(a, bits, s).to(x.dtype).contiguous()
    return y, pack_bitmap((xf > 0) & (xf < 6))


def fake_quant_autograd(x: Tensor, bits: int, scale=None, ste: str = "identity") -> Tensor:
    """Independent autograd oracle for gradients: the quantizer written with
    differentiable torch ops, its rounding detached (straight-through).

    identity: d y / d x = 1.  clipped: x is clamped to [-s, s] with ``torch.where``, so
    autograd gives d y / d x = [x not clipped] and d y / d s = +1 where x > s, -1 where
    x < -s (PACT's rule for the clip value); the rounding passes gradients unchanged.
    Forward values equal :func:`fake_quant_values` wherever x is finite.
    """
    s = None
    if scale is not None:
        s = scale if isinstance(scale, Tensor) else torch.tensor(float(scale), device=x.device)
    yq = fake_quant_values(x.detach(), bits, None if s is None else s.detach()).to(x.dtype)
    if ste == "identity" or s is None:
        return yq + (x - x.detach())
    # Clipped where x > s in float32, as the kernels compare a half-precision x: not against s
    # rounded to x's dtype (bfloat16 rounds 1.006 up to 1.0078125, which x = 1.0078125 is not above).
    s0, xf = s.reshape(()), x.float()
    hi, lo = xf > s0.float(), xf < -s0.float()
    xc = torch.where(hi, s0.to(x.dtype), torch.where(lo, -s0.to(x.dtype), x))
    return yq + (xc - xc.detach())
