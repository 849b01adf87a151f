"""Fake-quant's Triton backend: kernels for the forward and the clipped-STE backward.

Same contract and the same float32 math, bit for bit, as
:func:`fedmpq_kernels.fake_quant.reference.fake_quant` / ``fake_quant_backward`` (see that
module's docstring for the formulas and the bitmap layout).

Design
------
* Every kernel works on a ``[BLOCK // 32, 32]`` tile of the flattened (C-order) tensor,
  one bitmap word per row, packed and unpacked with the helpers of
  :mod:`fedmpq_kernels._triton_common`. Offsets are int64. Programs whose block lies
  wholly inside the tensor take an unmasked path (a mask ``offs < n`` with n not a multiple
  of 16 would stop Triton from vectorizing the loads/stores); only the last block is masked.
* Launches run under ``torch.cuda.device(x.device)`` (:func:`fedmpq_kernels._device.on_device`):
  Triton launches on the current device and its current stream, not the tensor's.
* The scale is never read on the host: the kernels load it through a pointer. A given
  scale that is not finite and > 0 becomes NaN in the kernel (``CHECK_SCALE``).
* Dynamic scale: :func:`fedmpq_kernels._triton_common.absmax` (the maximum of the bit
  patterns of |x|, reduced on the device in one launch; a NaN propagates).
* Rounding: half-to-even via ``(t + 2**23) - 2**23`` (0 <= t < 2**23 here, NaN/inf pass
  through). Every kernel is launched with ``_triton_common.LAUNCH`` (``enable_fp_fusion=False``)
  so that no add is fused with the preceding multiply into an FMA (which would change the
  rounding).
  ``L / S`` and ``S / L`` (on ``S * 2**100`` when S < 2**-100, see the reference) use
  ``div_rn`` (Triton's plain fp32 ``/`` is not correctly rounded on NVIDIA GPUs; torch's is).
* copysign is done on the bit patterns, so -0.0 and the sign of NaN follow x.
* Backward: ``grad_scale`` in the same launch: one float32 sum per program, added by the
  program that finishes last in a fixed order
  (:func:`fedmpq_kernels._triton_common.finish_in_last_program`: deterministic, no second
  launch, no host work).
* ``relu6_fake_quant`` reuses both forward kernels with the ``RELU6`` flag: each maps x to
  ``a = relu6(x)`` right after the load (the partial maxima of a give S; a >= +0 or NaN,
  so the clamp and the copysign change nothing) and the forward writes the mask
  ``0 < x < 6`` as its pass bitmap (MODE 1; ``relu6_fake_quant_values``, y alone for a
  forward without gradient, MODE 0).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._checks import bitmap_arg, bitmap_nbytes
from .._device import on_device
from .._triton_common import (FINISH, INTERPRET, LAUNCH, SUM_F32, absmax, finish_in_last_program, load_bits,
                              reduction_workspace, relu6, store_words)

Tensor = torch.Tensor

# Elements per program (multiple of 32) and warps. Fixed (no autotune: it needs a GPU
# at import / first call, and these are memory-bound streaming kernels).
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _fq_forward_tile(x_ptr, y_ptr, pass_ptr, hi_ptr, word, col, n, nwords, S, inv, step, up, down,
                     MODE: tl.constexpr, MASKED: tl.constexpr, RELU6: tl.constexpr):
    offs = word[:, None] * 32 + col[None, :]  # [ROWS, 32] element index
    if MASKED:
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs).to(tl.float32)
    if RELU6:  # quantize a = relu6(x) (>= +0 or NaN: the clamp and copysign are no-ops)
        xin = x
        x = relu6(x)
    xb = x.to(tl.int32, bitcast=True)
    axb = xb & 0x7FFFFFFF
    ax = axb.to(tl.float32, bitcast=True)
    # minimum(|x|, S) with a NaN |x| kept (explicit: tl.minimum's NaN rule differs on GPU);
    # a NaN S gives inv = 0 and step = NaN, so y is NaN anyway.
    a = tl.where(ax > S, S, ax)
    t = (a * up) * inv  # up, down: 1 unless S < 2**-100 (reference.py)
    q = (t + 8388608.0) - 8388608.0  # round half to even, 0 <= t < 2**23 (no FMA: fusion off)
    m = (q * step) * down
    yb = m.to(tl.int32, bitcast=True) | (xb ^ axb)  # copysign(m, x): m >= 0 or NaN
    y = yb.to(tl.float32, bitcast=True).to(y_ptr.dtype.element_ty)
    if MASKED:
        tl.store(y_ptr + offs, y, mask=mask)
    else:
        tl.store(y_ptr + offs, y)

    if MODE >= 1:
        if RELU6:  # the mask: ReLU6's derivative, 0 < x < 6 (false for NaN)
            ok = (xin > 0.0) & (xin < 6.0)
            hi = ok  # unused (MODE 1)
        else:
            hi = x > S
            ok = ~(hi | (x < -S))  # NaN passes
        if MASKED:
            ok = ok & mask
            hi = hi & mask
        store_words(pass_ptr, word, ok.to(tl.int32), col, nwords, MASKED=MASKED)
        if MODE >= 2:
            store_words(hi_ptr, word, hi.to(tl.int32), col, nwords, MASKED=MASKED)


@triton.jit
def _fq_forward_kernel(
    x_ptr, y_ptr, scale_ptr, pass_ptr, hi_ptr, n, nwords, L,
    CHECK_SCALE: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr, RELU6: tl.constexpr = False,
):
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0)
    word = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS] bitmap word index
    col = tl.arange(0, 32)

    S = tl.load(scale_ptr)
    if CHECK_SCALE:  # a given scale must be finite and > 0, else NaN (no host check)
        S = tl.where((S > 0.0) & (S < float("inf")), S, float("nan"))
    tiny = S < 7.888609052210118e-31  # 2**-100: L / S would overflow, so the grid is taken on S * 2**100
    up = tl.where(tiny, 1.2676506002282294e+30, 1.0)  # 2**100
    down = tl.where(tiny, 7.888609052210118e-31, 1.0)  # 2**-100
    su = S * up  # exact
    inv = tl.where(su > 0.0, tl.math.div_rn(L, su), 0.0)  # div_rn: IEEE division like torch
    step = tl.math.div_rn(su, L)

    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        _fq_forward_tile(x_ptr, y_ptr, pass_ptr, hi_ptr, word, col, n, nwords, S, inv, step, up, down,
                         MODE=MODE, MASKED=False, RELU6=RELU6)
    else:
        _fq_forward_tile(x_ptr, y_ptr, pass_ptr, hi_ptr, word, col, n, nwords, S, inv, step, up, down,
                         MODE=MODE, MASKED=True, RELU6=RELU6)


@triton.jit
def _fq_backward_tile(g_ptr, gx_ptr, pass_ptr, hi_ptr, word, col, n, nwords,
                      SCALE_GRAD: tl.constexpr, MASKED: tl.constexpr):
    """Writes the tile's grad_x; returns its share of dL/dS (0.0 without SCALE_GRAD)."""
    offs = word[:, None] * 32 + col[None, :]
    if MASKED:
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    else:
        g = tl.load(g_ptr + offs)
    ok = load_bits(pass_ptr, word, col, nwords, MASKED=MASKED) != 0
    gx = tl.where(ok, g, 0.0).to(gx_ptr.dtype.element_ty)
    if MASKED:
        tl.store(gx_ptr + offs, gx, mask=mask)
    else:
        tl.store(gx_ptr + offs, gx)

    part = 0.0
    if SCALE_GRAD:
        hi = load_bits(hi_ptr, word, col, nwords, MASKED=MASKED) != 0
        gf = g.to(tl.float32)
        signed = tl.where(hi, gf, -gf)
        clipped = ~ok
        if MASKED:
            clipped = clipped & mask
        contrib = tl.where(clipped, signed, 0.0)
        part = tl.sum(tl.sum(contrib, axis=1), axis=0)
    return part


@triton.jit
def _fq_backward_kernel(
    g_ptr, gx_ptr, pass_ptr, hi_ptr, ws_ptr, gs_ptr, n, nwords,
    SCALE_GRAD: tl.constexpr, BLOCK: tl.constexpr, FINISH: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0)
    word = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, 32)
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        part = _fq_backward_tile(g_ptr, gx_ptr, pass_ptr, hi_ptr, word, col, n, nwords,
                                 SCALE_GRAD=SCALE_GRAD, MASKED=False)
    else:
        part = _fq_backward_tile(g_ptr, gx_ptr, pass_ptr, hi_ptr, word, col, n, nwords,
                                 SCALE_GRAD=SCALE_GRAD, MASKED=True)
    if SCALE_GRAD:  # dL/dS in this launch: the last program adds the programs' sums
        finish_in_last_program(part, ws_ptr, ws_ptr, gs_ptr, 1.0, KIND=SUM_F32, FINISH=FINISH)
    elif pid == 0:  # dL/dS = 0, written here: no zero fill launched for it
        tl.store(gs_ptr, 0.0)


def fake_quant(x: Tensor, bits: int, scale: Optional[Tensor], mode: int) -> Tuple[Tensor, Tensor]:
    """y (x's shape and dtype, contiguous) and the bitmaps (uint8, ``mode`` bitmaps back to
    back: the pass bitmap, then the hi bitmap; empty for mode 0)."""
    if INTERPRET and x.dtype == torch.bfloat16:
        # The interpreter has no bfloat16 (its float32 -> bfloat16 store truncates, not
        # rounds): computed as float32 there (the same values), y converted back.
        y, bitmaps = fake_quant(x.float(), bits, scale, mode)
        return y.to(torch.bfloat16), bitmaps
    xc = x.contiguous()
    n = xc.numel()
    dev = x.device
    y = torch.empty_like(xc)  # contiguous, x's shape and dtype
    nbytes = bitmap_nbytes(n)
    bitmaps = torch.empty(nbytes * mode, dtype=torch.uint8, device=dev)
    if n == 0:
        return y, bitmaps
    grid = (triton.cdiv(n, BLOCK),)
    with on_device(dev):
        if scale is None:
            s = absmax(xc, n, BLOCK, NUM_WARPS)  # 0-dim: the kernel loads it through its pointer
            check = False
        else:
            s = scale if scale.dtype is torch.float32 else scale.to(torch.float32)  # one value (checked)
            check = True
        nwords = nbytes // 4
        words = bitmaps.view(torch.int32)
        pw = words if mode >= 1 else y
        hw = words[nwords:] if mode >= 2 else y
        _fq_forward_kernel[grid](
            xc, y, s, pw, hw, n, nwords, float((1 << bits) - 1),
            CHECK_SCALE=check, MODE=mode, BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH,
        )
    return y, bitmaps


def fake_quant_backward(grad: Tensor, bitmaps: Tensor, scale_grad: bool) -> Tuple[Tensor, Tensor]:
    """grad_x = grad where pass else 0 (grad's shape/dtype, contiguous); grad_scale (0-dim
    float32) = sum over clipped elements of (+g where hi, -g otherwise), or 0. bitmaps: the
    forward's (the pass bitmap, then the hi bitmap, read only when scale_grad). One launch:
    the last program adds the programs' sums (fixed order) straight into grad_scale, or
    program 0 writes its 0 (a ReLU6 or given-scale backward: no zero fill launched)."""
    gc = grad.contiguous()
    n = gc.numel()
    dev = grad.device
    gx = torch.empty_like(gc)
    nwords = bitmap_nbytes(n) // 4
    words = bitmap_arg(bitmaps, n, dev, "bitmaps", 2 if scale_grad else 1).view(torch.int32)
    pw = words[:nwords]
    hw = words[nwords:2 * nwords] if scale_grad else pw
    if n == 0:
        return gx, torch.zeros((), dtype=torch.float32, device=dev)
    gs = torch.empty((), dtype=torch.float32, device=dev)  # written by the kernel (0 without scale_grad)
    grid = (triton.cdiv(n, BLOCK),)
    with on_device(dev):
        ws = reduction_workspace(dev, grid[0]) if scale_grad else gs
        _fq_backward_kernel[grid](
            gc, gx, pw, hw, ws, gs, n, nwords,
            SCALE_GRAD=bool(scale_grad), BLOCK=BLOCK, FINISH=FINISH, num_warps=NUM_WARPS, **LAUNCH,
        )
    return gx, gs


def relu6_fake_quant(x: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """ReLU6 fused with the dynamic-scale quantizer: y (x's shape and dtype, contiguous) and
    the mask bitmap ``0 < x < 6`` (pass-bitmap layout), as
    :func:`fedmpq_kernels.fake_quant.reference.relu6_fake_quant`. Two passes: the maximum
    of ``a = relu6(x)`` (:func:`fedmpq_kernels._triton_common.absmax` with ``relu6``), then the
    forward kernel quantizing ``a`` with that scale (``RELU6``, ``MODE`` 1: the mask)."""
    return _relu6(x, bits, True)


def relu6_fake_quant_values(x: Tensor, bits: int) -> Tensor:
    """:func:`relu6_fake_quant`'s y alone, no mask made or written (``MODE`` 0: a forward
    without gradient)."""
    return _relu6(x, bits, False)[0]


def _relu6(x: Tensor, bits: int, with_mask: bool) -> Tuple[Tensor, Optional[Tensor]]:
    out_dtype = x.dtype
    # The interpreter has no bfloat16: computed as float32 there (the same values), y converted back.
    if x.dtype == torch.bfloat16 and INTERPRET:
        x = x.float()
    xc = x.contiguous()
    n = xc.numel()
    dev = x.device
    y = torch.empty_like(xc)
    mask = torch.empty(bitmap_nbytes(n), dtype=torch.uint8, device=dev) if with_mask else None
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        with on_device(dev):
            s = absmax(xc, n, BLOCK, NUM_WARPS, relu6=True)
            pw = y if mask is None else mask.view(torch.int32)  # MODE 0 writes no bitmap: y stands in
            _fq_forward_kernel[grid](
                xc, y, s, pw, y, n, 0 if mask is None else mask.numel() // 4, float((1 << bits) - 1),
                CHECK_SCALE=False, MODE=int(with_mask), BLOCK=BLOCK, RELU6=True, num_warps=NUM_WARPS, **LAUNCH,
            )
    if y.dtype != out_dtype:
        y = y.to(out_dtype)
    return y, mask
