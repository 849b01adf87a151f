"""Bit-plane training, Triton backend: binarize, dequantize, dequantize_backward,
plane_popcounts and the fused optimizer step, bit for bit as
:mod:`fedmpq_kernels.bitplane.reference` (the storage, the math and the float32 order of
every step are stated there; ``dequantize_backward`` sums in float64 in another order:
within n * 2^-53 of sum |sigma q G| of the reference's, so 1e-6 relative where the terms do
not cancel, and no closer to the result itself where they do).

Design (the tricks of :mod:`fedmpq_kernels.fake_quant.triton` and ``pack.triton``)
--------------------------------------------------------------------------------
* Every kernel works on a ``[BLOCK // 32, 32]`` tile of the flattened layer: row r of
  program p is elements ``p * BLOCK + 32 * r + (0..31)``, exactly one sign-bitmap word, so
  no two programs share a word (the step rewrites the words without atomics). The words are
  packed and unpacked with :mod:`fedmpq_kernels._triton_common`'s ``store_words`` and
  ``load_bits``; binarize's scale is its ``absmax``. The momentum codes of plane i sit at
  ``i * n + j`` (uint8, plane-major).
* Offsets are int64. Programs whose block lies wholly inside the layer take an unmasked
  path (vectorizable); only the last block is masked. ``n``, ``nwords`` and the generator
  key (its value, or its pointer's alignment) are not specialized: one compile per
  bit-width and kind of key.
* Every launch passes ``_triton_common.LAUNCH`` (``enable_fp_fusion=False``: no multiply-add
  contracted into an FMA);
  ``s / L``, ``L / s`` and ``|d| / g_s`` use ``div_rn`` (Triton's plain fp32 ``/`` is not
  correctly rounded on NVIDIA GPUs; torch's is). Rounding half to even: ``(t + 2^23) - 2^23``
  on ``|t| < 2^23`` (larger floats are integers already), the sign put back; exact, and
  unlike libdevice's ``rint`` it runs in the interpreter too.
* The step, two launches with no host synchronization:
  1. ``_step_max_kernel``: d_ij recomputed from G, q, sigma, mom, gs, coef, s; one partial
     max of the bit patterns of |d| per program (non-negative floats order as int32, and
     NaN patterns sort above +inf, so a NaN or inf d makes the maximum non-finite). The
     program that arrives last (``_triton_common.take_ticket``) takes the maximum of the
     partials, stores ``g_s = gmax / L`` into a fresh 0-dim tensor (the return value), the
     previous gs into a scratch word (read by pass 2), and gs <- g_s when g_s is finite.
     (Until 2026-12-04 this was a second, one-program launch.)
  2. ``_step_update_kernel``: reads g_s from the device; not finite: does nothing (the step
     is skipped); 0: writes zero momentum codes only; else steps 3-7 per element,
     recomputing d, and writes the codes, the sign words and the momentum codes.
* plane_popcounts is one launch too: each program's per-plane counts to its slots, summed
  per plane (int64) by the last program (before: a partials tensor and a torch ``sum``).
* The generator: mix32 on uint32 tensors (multiplies wrap mod 2^32, shifts are logical).
  The key is passed as an int32 bit pattern, or (``KEY_IN_MEM``) loaded by the update
  kernel from a one-element int64 tensor on the device, its low 32 bits taken: never read
  on the host, so a step with a device key can be captured in a CUDA graph (checked in
  the interpreter; the graph test in tests/.../test_device_key.py not yet run on a GPU).
* Launches run under :func:`fedmpq_kernels._device.on_device`. Fixed block sizes, no
  autotune (it needs a GPU at the first call).
* dequantize_backward finishes in one launch: each program's float64 sum, added (in a fixed
  order), divided by L and rounded to float32 by the program that arrives last
  (:func:`fedmpq_kernels._triton_common.finish_in_last_program`; checked in the interpreter
  only, not yet on a GPU).
* dequantize negates on the bit pattern (``w ^ (sign << 31)``): a ``where(neg, -w, w)``
  lost the -0.0 of a zero code with its sign bit set on an H200 (the reference keeps it).

Verified bit for bit against the reference in the Triton interpreter (``TRITON_INTERPRET=1``)
and on an H200 (Triton 3.6, a throwaway script, layers up to 2^20 + 3 weights, every bit-width).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._buffers import refuse_aliased_step_copies, words
from .._checks import MAX_BITS, MIN_BITS, bitmap_nbytes
from .._device import on_device
from .._triton_common import (FINISH, INTERPRET, LAUNCH, MAX_I32, SUM_F64_DIV, SUM_I64, absmax, combine_slots,
                              finish_in_last_program, is_last, load_bits, reduction_workspace, release_workspace,
                              store_words, take_ticket)

Tensor = torch.Tensor

BLOCK = 4096  # elements per program of the streaming kernels (multiple of 32)
NUM_WARPS = 8
# The step's kernels keep more state per element (and are compute-bound at large N):
# (elements per program, warps) by bit-width. (256, 4) was the fastest or within 7% of it of
# six configurations at N = 2, 4, 6, 8 on an H200 (2^22 weights, CUDA-graph timing).
STEP_CONFIG = {N: (256, 4) for N in range(MIN_BITS, MAX_BITS + 1)}

# dtypes the kernels load as they are (others are converted to float32 first, exactly; the
# interpreter has no bfloat16)
_W_DTYPES = (torch.float32, torch.float16) + (() if INTERPRET else (torch.bfloat16,))
_GRAD_DTYPES = _W_DTYPES + (torch.float64,)


# ---- shared pieces -------------------------------------------------------------------------
@triton.jit
def _round_half_even(t):
    """torch.round (half to even) of float32 t, exactly; NaN and +-inf pass through."""
    at = tl.abs(t)
    r = tl.where(at < 8388608.0, (at + 8388608.0) - 8388608.0, at)  # no FMA: fusion off
    return tl.where(t < 0.0, -r, r)


@triton.jit
def _mix32(x):
    """The reference's 32-bit integer hash on uint32 (wrapping multiplies, logical shifts)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _store_codes_signs(codes_ptr, sign_ptr, offs, mask, q, neg, word, col, nwords, MASKED: tl.constexpr):
    """Store a [ROWS, 32] tile of codes (float q, integral, 0..L) and its sign words (neg
    0/1; zero past n, so a partial last word has no stray bits)."""
    if MASKED:
        tl.store(codes_ptr + offs, q.to(tl.int32).to(tl.uint8), mask=mask)
        neg = tl.where(mask, neg, 0)
    else:
        tl.store(codes_ptr + offs, q.to(tl.int32).to(tl.uint8))
    store_words(sign_ptr, word, neg, col, nwords, MASKED=MASKED)


# ---- binarize --------------------------------------------------------------------------------
@triton.jit
def _binarize_tile(w_ptr, codes_ptr, sign_ptr, word, col, n, nwords, inv, L, MASKED: tl.constexpr):
    offs = word[:, None] * 32 + col[None, :]
    mask = offs < n  # used on the masked path only
    if MASKED:
        x = tl.load(w_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    else:
        x = tl.load(w_ptr + offs).to(tl.float32)
    q = _round_half_even(tl.abs(x) * inv)
    q = tl.where(q > L, L, q)  # minimum(q, L)
    neg = tl.where(x > 0.0, 0, 1)  # not (W > 0)
    _store_codes_signs(codes_ptr, sign_ptr, offs, mask, q, neg, word, col, nwords, MASKED=MASKED)


@triton.jit(do_not_specialize=["n", "nwords"])
def _binarize_kernel(w_ptr, scale_ptr, codes_ptr, sign_ptr, n, nwords, L, BLOCK: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0)
    word = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, 32)
    S = tl.load(scale_ptr)
    inv = tl.where(S > 0.0, tl.math.div_rn(L, tl.where(S > 0.0, S, 1.0)), 0.0)
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        _binarize_tile(w_ptr, codes_ptr, sign_ptr, word, col, n, nwords, inv, L, MASKED=False)
    else:
        _binarize_tile(w_ptr, codes_ptr, sign_ptr, word, col, n, nwords, inv, L, MASKED=True)


# ---- dequantize and its backward ----------------------------------------------------------
@triton.jit
def _dequantize_tile(codes_ptr, sign_ptr, out_ptr, word, col, n, nwords, k, MASKED: tl.constexpr):
    offs = word[:, None] * 32 + col[None, :]
    if MASKED:
        mask = offs < n
        q = tl.load(codes_ptr + offs, mask=mask, other=0)
    else:
        q = tl.load(codes_ptr + offs)
    w = q.to(tl.int32).to(tl.float32) * k
    # negate where the sign bit is set, on the bit pattern (exactly torch's -w, -0.0 included,
    # which a select of -w and w need not keep once the compiler rewrites it)
    sb = load_bits(sign_ptr, word, col, nwords, MASKED=MASKED)
    w = (w.to(tl.int32, bitcast=True) ^ (sb << 31)).to(tl.float32, bitcast=True)
    if MASKED:
        tl.store(out_ptr + offs, w, mask=mask)
    else:
        tl.store(out_ptr + offs, w)


@triton.jit(do_not_specialize=["n", "nwords"])
def _dequantize_kernel(codes_ptr, sign_ptr, scale_ptr, out_ptr, n, nwords, L, BLOCK: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0)
    word = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, 32)
    k = tl.math.div_rn(tl.load(scale_ptr), L)  # s / L, correctly rounded as torch
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        _dequantize_tile(codes_ptr, sign_ptr, out_ptr, word, col, n, nwords, k, MASKED=False)
    else:
        _dequantize_tile(codes_ptr, sign_ptr, out_ptr, word, col, n, nwords, k, MASKED=True)


@triton.jit
def _dq_backward_tile(grad_ptr, codes_ptr, sign_ptr, word, col, n, nwords, MASKED: tl.constexpr):
    """The tile's sum of sigma_j q_j G_j, float64."""
    offs = word[:, None] * 32 + col[None, :]
    if MASKED:
        mask = offs < n
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        q = tl.load(codes_ptr + offs, mask=mask, other=0)
    else:
        g = tl.load(grad_ptr + offs)
        q = tl.load(codes_ptr + offs)
    v = g.to(tl.float64) * q.to(tl.int32).to(tl.float64)
    v = tl.where(load_bits(sign_ptr, word, col, nwords, MASKED=MASKED) != 0, -v, v)
    return tl.sum(tl.sum(v, axis=1), axis=0)


@triton.jit(do_not_specialize=["n", "nwords"])
def _dq_backward_kernel(grad_ptr, codes_ptr, sign_ptr, ws_ptr, slot_ptr, out_ptr, n, nwords, L,
                        BLOCK: tl.constexpr, FINISH: tl.constexpr):
    """*out = (sum_j sigma_j q_j G_j in float64) / L as float32, in one launch: the last
    program adds the programs' float64 sums (finish_in_last_program, SUM_F64_DIV)."""
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0)
    word = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, 32)
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        part = _dq_backward_tile(grad_ptr, codes_ptr, sign_ptr, word, col, n, nwords, MASKED=False)
    else:
        part = _dq_backward_tile(grad_ptr, codes_ptr, sign_ptr, word, col, n, nwords, MASKED=True)
    finish_in_last_program(part, ws_ptr, slot_ptr, out_ptr, L, KIND=SUM_F64_DIV, FINISH=FINISH)


# ---- popcounts -------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n"])
def _popcount_kernel(codes_ptr, ws_ptr, out_ptr, n, BITS: tl.constexpr, BLOCK: tl.constexpr, FINISH: tl.constexpr):
    """out[i] (int64) = the set bits of plane i: each program's BITS counts go to its slots
    (ws[1 + pid * BITS + i]), the last program sums them plane by plane (one launch)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        c = tl.load(codes_ptr + offs).to(tl.int32)
    else:
        c = tl.load(codes_ptr + offs, mask=offs < n, other=0).to(tl.int32)
    for i in tl.static_range(BITS):
        tl.store(ws_ptr + 1 + pid * BITS + i, tl.sum((c >> (BITS - 1 - i)) & 1, axis=0))
    if is_last(take_ticket(ws_ptr)):
        for i in tl.static_range(BITS):
            total = combine_slots(ws_ptr + 1 + i, tl.num_programs(0), BITS, KIND=SUM_I64, FINISH=FINISH)
            tl.store(out_ptr + i, total)
        release_workspace(ws_ptr)


# ---- the optimizer step ------------------------------------------------------------------------
@triton.jit
def _step_inputs(grad_ptr, codes_ptr, sign_ptr, word, col, n, nwords, k, MASKED: tl.constexpr):
    """Element index, mask, q (int32), the sign bit (int32 0/1) and a = sigma * (G * k)."""
    offs = word[:, None] * 32 + col[None, :]
    if MASKED:
        mask = offs < n
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        q = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        mask = offs < n  # unused on this path
        g = tl.load(grad_ptr + offs)
        q = tl.load(codes_ptr + offs).to(tl.int32)
    neg = load_bits(sign_ptr, word, col, nwords, MASKED=MASKED)
    a = g * k
    a = tl.where(neg != 0, -a, a)
    return offs, mask, q, neg, a


@triton.jit
def _plane_offset(n, I):
    """Where momentum plane I starts, ``I * n`` in int64: ``n`` comes in as int32 below 2^31,
    and an int32 product wraps for (N - 1) * n >= 2^31 (a layer of 3.1e8 weights at 8 bits)."""
    return n.to(tl.int64) * I


@triton.jit
def _step_d(mom_ptr, coef_ptr, offs, mask, n, q, a, gsp, mu, I: tl.constexpr, N: tl.constexpr,
            MASKED: tl.constexpr):
    """d of plane I (step 1): (mu * (f32(r_prev) * gs_prev)) + (a * 2^(N-1-I) [+ c_I])."""
    SH: tl.constexpr = N - 1 - I
    mptr = mom_ptr + _plane_offset(n, I) + offs
    if MASKED:
        c = tl.load(mptr, mask=mask, other=0).to(tl.int32)
    else:
        c = tl.load(mptr).to(tl.int32)
    # decode_r: bit 7 sign, bits 3..6 c (2^(c-1)), bits 0..1 the stochastic +-1
    cc = (c >> 3) & 15
    mag = tl.where(cc > 0, 1 << tl.maximum(cc - 1, 0), 0)
    r = tl.where(((c >> 7) & 1) != 0, -mag, mag)
    st = c & 3
    r = r + tl.where(st == 1, 1, tl.where(st == 2, -1, 0))
    m = r.to(tl.float32) * gsp
    gi = a * (1 << SH)
    gi = tl.where(((q >> SH) & 1) != 0, gi + tl.load(coef_ptr + I), gi)
    return mu * m + gi


@triton.jit
def _step_max_tile(grad_ptr, codes_ptr, sign_ptr, mom_ptr, coef_ptr, word, col, n, nwords, k, gsp, mu,
                   N: tl.constexpr, MASKED: tl.constexpr):
    offs, mask, q, neg, a = _step_inputs(grad_ptr, codes_ptr, sign_ptr, word, col, n, nwords, k, MASKED=MASKED)
    mx = tl.zeros(offs.shape, dtype=tl.int32)
    for i in tl.static_range(N):
        d = _step_d(mom_ptr, coef_ptr, offs, mask, n, q, a, gsp, mu, I=i, N=N, MASKED=MASKED)
        db = d.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # |d| bits; NaN sorts above +inf
        mx = tl.maximum(mx, db)
    if MASKED:
        mx = tl.where(mask, mx, 0)
    return tl.max(tl.max(mx, axis=1), axis=0)


@triton.jit(do_not_specialize=["n", "nwords"])
def _step_max_kernel(grad_ptr, codes_ptr, sign_ptr, mom_ptr, gs_ptr, coef_ptr, scale_ptr, ws_ptr, out_ptr, prev_ptr,
                     n, nwords, L, lr, mu, N: tl.constexpr, BLOCK: tl.constexpr, FINISH: tl.constexpr):
    """Pass 1: max |d| over the layer (each program's max to its slot, ws[1 + pid]); the
    last program turns it into g_s = max / L (*out_ptr), keeps the previous gs for pass 2
    (*prev_ptr) and stores the new one (*gs_ptr; a NaN or inf g_s keeps gs). Every program
    has read gs before it took its ticket, so the last one may overwrite it."""
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0)
    word = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, 32)
    k = tl.math.div_rn(tl.load(scale_ptr), L)
    gsp = tl.load(gs_ptr)
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        m = _step_max_tile(grad_ptr, codes_ptr, sign_ptr, mom_ptr, coef_ptr, word, col, n, nwords, k, gsp, mu, N=N,
                           MASKED=False)
    else:
        m = _step_max_tile(grad_ptr, codes_ptr, sign_ptr, mom_ptr, coef_ptr, word, col, n, nwords, k, gsp, mu, N=N,
                           MASKED=True)
    tl.store(ws_ptr + 1 + pid, m)
    if is_last(take_ticket(ws_ptr)):
        gmax = combine_slots(ws_ptr + 1, tl.num_programs(0), 1, KIND=MAX_I32, FINISH=FINISH)
        g_s = tl.math.div_rn(gmax.to(tl.float32, bitcast=True), L)
        g_s = tl.where(g_s * lr == float("inf"), float("inf"), g_s)  # lr * g_s overflows: skipped
        tl.store(out_ptr, g_s)
        tl.store(prev_ptr, gsp)  # pass 2 reads the previous gs from here
        tl.store(gs_ptr, tl.where(g_s < float("inf"), g_s, gsp))  # g_s >= 0: NaN and inf keep gs
        release_workspace(ws_ptr)


@triton.jit
def _step_update_tile(grad_ptr, codes_ptr, sign_ptr, mom_ptr, coef_ptr, word, col, n, nwords, k, gsp, g_s,
                      L, lr, mu, key, N: tl.constexpr, MASKED: tl.constexpr):
    offs, mask, q, neg, a = _step_inputs(grad_ptr, codes_ptr, sign_ptr, word, col, n, nwords, k, MASKED=MASKED)
    p = tl.zeros(offs.shape, dtype=tl.float32)
    R = tl.zeros(offs.shape, dtype=tl.int32)
    pos0 = offs < 0  # set at plane 0
    for i in tl.static_range(N):
        d = _step_d(mom_ptr, coef_ptr, offs, mask, n, q, a, gsp, mu, I=i, N=N, MASKED=MASKED)
        # step 3: x = (|d| / g_s) * lr, e = round(log2 x) + (N-1-i) from the float bits
        x = tl.math.div_rn(tl.abs(d), g_s) * lr
        valid = x >= 7.888609052210118e-31  # 2^-100
        xb = x.to(tl.int32, bitcast=True)
        e = ((xb >> 23) & 0xFF) - 127 + tl.where((xb & 0x7FFFFF) >= 0x3504F4, 1, 0) + (N - 1 - i)
        pos = d > 0.0
        if i == 0:
            pos0 = pos  # the MSB plane's sign decides the stochastic LSB
        det_on = valid & (e >= 0) & (e <= N)
        small = valid & (e < 0)
        ec = tl.minimum(tl.maximum(e, 0), 8)
        R += tl.where(det_on, tl.where(pos, 1, -1) * (1 << (ec + (N - 1 - i))), 0)
        # 2^e for -100 <= e < 0, from its bit pattern; p summed in plane order
        pw = ((tl.maximum(tl.minimum(e, 0), -126) + 127) << 23).to(tl.float32, bitcast=True)
        p = p + tl.where(small, pw, 0.0)
        code = tl.where(det_on, (tl.where(pos, 0, 1) << 7) | ((ec + 1) << 3), 0)
        if i == N - 1:
            # step 4: the stochastic LSB, u_j from the counter-based generator
            p = tl.minimum(p, 1.0)
            h = _mix32(key ^ _mix32(offs.to(tl.uint32) ^ 0x85EBCA6B))
            u = (h >> 8).to(tl.int32).to(tl.float32) * 5.960464477539063e-08  # 2^-24
            hit = u < p
            stoch = tl.where(hit, tl.where(pos0, 1, -1), 0)
            R += stoch
            code = code | tl.where(hit, tl.where(pos0, 1, 2), 0)
        code = code.to(tl.uint8)
        mptr = mom_ptr + _plane_offset(n, i) + offs
        if MASKED:
            tl.store(mptr, code, mask=mask)
        else:
            tl.store(mptr, code)
    # steps 5-6: v = f32(q) - f32(R) * (lr * g_s), rounded half to even, sign fold, saturate
    step = lr * g_s
    v = q.to(tl.float32) - R.to(tl.float32) * step
    qn = _round_half_even(v)
    flip = tl.where(qn < 0.0, 1, 0)
    qa = tl.abs(qn)
    qa = tl.where(qa > L, L, qa)  # minimum(|q|, L)
    _store_codes_signs(codes_ptr, sign_ptr, offs, mask, qa, neg ^ flip, word, col, nwords, MASKED=MASKED)


@triton.jit
def _step_zero_mom(mom_ptr, word, col, n, N: tl.constexpr, MASKED: tl.constexpr):
    offs = word[:, None] * 32 + col[None, :]
    z = tl.zeros(offs.shape, dtype=tl.uint8)
    for i in tl.static_range(N):
        if MASKED:
            tl.store(mom_ptr + _plane_offset(n, i) + offs, z, mask=offs < n)
        else:
            tl.store(mom_ptr + _plane_offset(n, i) + offs, z)


@triton.jit(do_not_specialize=["n", "nwords", "key", "key_ptr"])
def _step_update_kernel(grad_ptr, codes_ptr, sign_ptr, mom_ptr, prev_ptr, coef_ptr, scale_ptr, gs_new_ptr, n,
                        nwords, L, lr, mu, key, key_ptr, N: tl.constexpr, BLOCK: tl.constexpr,
                        KEY_IN_MEM: tl.constexpr):
    """key: the generator key's int32 bit pattern; with KEY_IN_MEM, key_ptr points to an
    int64 whose low 32 bits are the key instead (key is then unused)."""
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0)
    word = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, 32)
    full = (pid.to(tl.int64) + 1) * BLOCK <= n
    g_s = tl.load(gs_new_ptr)
    if g_s > 0.0:
        if g_s < float("inf"):
            k = tl.math.div_rn(tl.load(scale_ptr), L)
            gsp = tl.load(prev_ptr)
            if KEY_IN_MEM:
                ukey = (tl.load(key_ptr) & 0xFFFFFFFF).to(tl.uint32)  # in 0..2^32-1: the cast is exact
            else:
                ukey = key.to(tl.uint32, bitcast=True)
            if full:
                _step_update_tile(grad_ptr, codes_ptr, sign_ptr, mom_ptr, coef_ptr, word, col, n, nwords, k, gsp,
                                  g_s, L, lr, mu, ukey, N=N, MASKED=False)
            else:
                _step_update_tile(grad_ptr, codes_ptr, sign_ptr, mom_ptr, coef_ptr, word, col, n, nwords, k, gsp,
                                  g_s, L, lr, mu, ukey, N=N, MASKED=True)
    elif g_s == 0.0:  # every d is 0: momentum codes 0, codes and signs unchanged
        if full:
            _step_zero_mom(mom_ptr, word, col, n, N=N, MASKED=False)
        else:
            _step_zero_mom(mom_ptr, word, col, n, N=N, MASKED=True)
    # else NaN: the step is skipped


# ---- adapters ----------------------------------------------------------------------------------
def _L(bits: int) -> float:
    return float((1 << bits) - 1)


def _scalar(t: Tensor) -> Tensor:
    """A one-element tensor as float32 (1,) readable through a pointer."""
    return t.reshape(1).to(torch.float32).contiguous()


def binarize(w: Tensor, bits: int) -> Tuple[Tensor, Tensor, Tensor]:
    dev = w.device
    wf = w.detach().reshape(-1)
    if wf.dtype not in _W_DTYPES:
        wf = wf.float()
    wf = wf.contiguous()
    n = wf.numel()
    nbytes = bitmap_nbytes(n)
    codes = torch.empty(n, dtype=torch.uint8, device=dev)
    sign = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    if n == 0:
        return codes, sign, torch.zeros((), dtype=torch.float32, device=dev)
    grid = (triton.cdiv(n, BLOCK),)
    with on_device(dev):
        s = absmax(wf, n, BLOCK, NUM_WARPS)
        _binarize_kernel[grid](wf, s, codes, sign.view(torch.int32), n, nbytes // 4, _L(bits), BLOCK=BLOCK,
                               num_warps=NUM_WARPS, **LAUNCH)
    return codes, sign, s


def dequantize(codes: Tensor, sign: Tensor, scale: Tensor, bits: int) -> Tensor:
    dev = codes.device
    c = codes.reshape(-1).contiguous()
    n = c.numel()
    out = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return out
    nbytes = bitmap_nbytes(n)
    sw = words(sign, nbytes)
    with on_device(dev):
        _dequantize_kernel[(triton.cdiv(n, BLOCK),)](c, sw.view(torch.int32), _scalar(scale), out, n, nbytes // 4,
                                                     _L(bits), BLOCK=BLOCK, num_warps=NUM_WARPS,
                                                     **LAUNCH)
    return out


def dequantize_backward(grad: Tensor, codes: Tensor, sign: Tensor, bits: int) -> Tensor:
    dev = codes.device
    c = codes.reshape(-1).contiguous()
    g = grad.reshape(-1)
    if g.dtype not in _GRAD_DTYPES:
        g = g.float()
    g = g.contiguous()
    n = c.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=dev)
    nbytes = bitmap_nbytes(n)
    sw = words(sign, nbytes)
    grid = (triton.cdiv(n, BLOCK),)
    out = torch.empty((), dtype=torch.float32, device=dev)
    with on_device(dev):
        ws = reduction_workspace(dev, grid[0], wide=True)
        _dq_backward_kernel[grid](g, c, sw.view(torch.int32), ws, ws.view(torch.int64), out, n, nbytes // 4,
                                  float(_L(bits)), BLOCK=BLOCK, FINISH=FINISH, num_warps=NUM_WARPS,
                                  **LAUNCH)
    return out


def plane_popcounts(codes: Tensor, bits: int) -> Tensor:
    dev = codes.device
    c = codes.reshape(-1).contiguous()
    n = c.numel()
    if n == 0:
        return torch.zeros(bits, dtype=torch.int64, device=dev)
    grid = (triton.cdiv(n, BLOCK),)
    out = torch.empty(bits, dtype=torch.int64, device=dev)
    with on_device(dev):
        ws = reduction_workspace(dev, grid[0] * bits)
        _popcount_kernel[grid](c, ws, out, n, BITS=bits, BLOCK=BLOCK, FINISH=FINISH, num_warps=NUM_WARPS, **LAUNCH)
    return out


def bitplane_step(codes: Tensor, sign: Tensor, mom: Tensor, gs: Tensor, grad: Tensor, coef: Tensor,
                  scale: Tensor, bits: int, lr: float, momentum: float, key: int,
                  key_tensor: Optional[Tensor] = None) -> Tensor:
    """``key_tensor`` (a one-element int64 tensor on codes' device): the kernel loads the key
    from it (no host read, capturable in a CUDA graph) and ``key`` is ignored."""
    dev = codes.device
    n = codes.numel()
    if n == 0:  # the reference: max over nothing is 0, so g_s = 0 (mom is empty)
        gs.zero_()
        return torch.zeros((), dtype=torch.float32, device=dev)
    nbytes = bitmap_nbytes(n)
    cw = codes if codes.is_contiguous() else codes.contiguous()
    sw = words(sign)
    sign_copied = sw.data_ptr() != sign.data_ptr()  # a working copy: written back below
    mw = mom.reshape(-1) if mom.is_contiguous() else mom.contiguous().reshape(-1)  # the public function checks
    gsw = gs.reshape(-1)  # one float32
    g = grad.reshape(-1)
    if g.dtype != torch.float32:
        g = g.float()
    g = g.contiguous()
    cf = coef.reshape(-1).to(torch.float32).contiguous()
    refuse_aliased_step_copies((cw, sw, mw, gsw, g, cf), (codes, sign, mom, gs, grad, coef))
    sc = _scalar(scale)
    L = _L(bits)
    if key_tensor is None:
        key32 = int(key) & 0xFFFFFFFF
        key32 = key32 - (1 << 32) if key32 >= 1 << 31 else key32  # its int32 bit pattern
        key_ptr = sc  # any valid pointer: not read
    else:
        key32, key_ptr = 0, key_tensor  # its data pointer is the element's, whatever the strides
    sign32 = sw[:nbytes].view(torch.int32)
    step_block, step_warps = STEP_CONFIG[bits]
    grid = (triton.cdiv(n, step_block),)
    g_s = torch.empty((), dtype=torch.float32, device=dev)
    prev = torch.empty(1, dtype=torch.float32, device=dev)
    with on_device(dev):
        ws = reduction_workspace(dev, grid[0])
        _step_max_kernel[grid](g, cw, sign32, mw, gsw, cf, sc, ws, g_s, prev, n, nbytes // 4, L, float(lr),
                               float(momentum), N=bits, BLOCK=step_block, FINISH=FINISH, num_warps=step_warps,
                               **LAUNCH)
        _step_update_kernel[grid](g, cw, sign32, mw, prev, cf, sc, g_s, n, nbytes // 4, L, float(lr),
                                  float(momentum), key32, key_ptr, N=bits, BLOCK=step_block, num_warps=step_warps,
                                  KEY_IN_MEM=key_tensor is not None, **LAUNCH)
    if cw is not codes:
        codes.copy_(cw.reshape(codes.shape))
    if sign_copied:
        sign.copy_(sw.reshape(sign.shape))
    if not mom.is_contiguous():
        mom.copy_(mw.reshape(mom.shape))
    return g_s
