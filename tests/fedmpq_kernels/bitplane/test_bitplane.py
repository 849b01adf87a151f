"""Every bit-plane backend against the pure-torch reference, bit for bit: binarize,
dequantize (+ the scale gradient), plane popcounts and the fused optimizer step (codes, sign
bytes, momentum codes, gs and the returned g_s after each of several steps), on odd and empty
sizes and every bit-width; the step's special cases (g_s = 0, non-finite gradients, sign
flips, saturation, strided and misaligned state); hand-computed cases of the rounding rule,
the generator and one whole step; the public functions' errors, opcheck and the native
boundary's refusals."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels import registry
from fedmpq_kernels._native import native
from fedmpq_kernels.bitplane import reference as R

ALL_BITS = range(1, 9)
SIZES = [0, 1, 7, 31, 33, 1000, 4097]
BIG = 300_001
STEPS = 5
OPS = ("binarize", "dequantize", "dequantize_backward", "plane_popcounts", "bitplane_step")


def nbytes(n: int) -> int:
    return 4 * ((n + 31) // 32)


def weights(n: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + n * 17 + bits)
    return torch.randn(n, generator=g)


def layer(n: int, bits: int, seed: int = 0):
    """(codes, sign, scale) of a random layer, from the reference."""
    return R.binarize(weights(n, bits, seed), bits)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """float32 as its bit patterns (so that -0.0 != +0.0 and NaN == NaN)."""
    return t.detach().cpu().contiguous().view(torch.int32)


def assert_state_equal(got, want, where: str):
    for name, a, b in zip(("codes", "sign", "mom", "gs"), got, want):
        a = a.cpu()
        if a.dtype == torch.float32:
            a, b = bits_of(a), bits_of(b)
        assert torch.equal(a, b), f"{where}: {name} differs at {(a != b).nonzero()[:8].flatten().tolist()}"


def kernels(backend):
    """The backend's bitplane module (skips the backends that have none: the registry would
    only fall back to another one, tested in its own case)."""
    return backend.module("bitplane")


def fresh_state(n: int, bits: int, device, seed: int = 0):
    codes, sign, scale = layer(n, bits, seed)
    mom = torch.zeros(bits, n, dtype=torch.uint8)
    gs = torch.zeros(1)
    return [t.to(device) for t in (codes, sign, mom, gs)], scale.to(device)


@functools.lru_cache(maxsize=None)
def reference_run(n: int, bits: int, lr: float, momentum: float, steps: int = STEPS):
    """The reference's trajectory from a fresh state: per step (grad, coef, key, state after,
    returned g_s). Cached: the same oracle serves every backend case."""
    (codes, sign, mom, gs), scale = fresh_state(n, bits, "cpu")
    g = torch.Generator().manual_seed(n * 31 + bits)
    out = []
    for t in range(steps):
        grad = torch.randn(n, generator=g) * 0.1
        coef = R.group_lasso(R.plane_popcounts(codes, bits), n, bits)[1] * 1e-4
        key = R.step_key(1234, t, 5)
        g_s = R.bitplane_step(codes, sign, mom, gs, grad, coef, scale, bits, lr, momentum, key)
        out.append((grad, coef, key, (codes.clone(), sign.clone(), mom.clone(), gs.clone()), g_s.clone()))
    return tuple(out)


# ---- binarize, dequantize, popcounts -----------------------------------------------------
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("numel", SIZES + [BIG])
def test_binarize_dequantize_popcounts_match_reference(backend, bits, numel):
    backend.skip_if_too_big(numel)
    bp = kernels(backend)
    dev = backend.device
    w = weights(numel, bits)
    rq, rs, rsc = R.binarize(w, bits)
    g = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    with backend.active():
        q, s, sc = fk.binarize(w.to(dev), bits)
        assert q.dtype == torch.uint8 and q.shape == (numel,)
        assert s.dtype == torch.uint8 and s.shape == (nbytes(numel),)
        assert sc.dtype == torch.float32 and sc.shape == ()
        assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and torch.equal(bits_of(sc), bits_of(rsc))

        want = R.dequantize(rq, rs, rsc, bits)
        got = fk.dequantize(q, s, sc, bits, fk.sink_like((numel,), device=dev))
        assert got.dtype == torch.float32 and got.shape == (numel,)
        assert torch.equal(bits_of(got), bits_of(want))

        assert torch.equal(bits_of(bp.dequantize(q, s, sc, bits)), bits_of(want))

        want_gs = R.dequantize_backward(g, rq, rs, bits)
        for gsc in (torch.ops.fedmpq.dequantize_backward(g.to(dev), q, s, bits),
                    bp.dequantize_backward(g.to(dev), q, s, bits)):
            assert gsc.dtype == torch.float32 and gsc.shape == ()
            torch.testing.assert_close(gsc.cpu(), want_gs, rtol=1e-6, atol=0)

        pc = fk.plane_popcounts(q, bits)
        assert pc.dtype == torch.int64 and pc.shape == (bits,)
        assert torch.equal(pc.cpu(), R.plane_popcounts(rq, bits))


def test_reference_hand_computed_binarize_and_popcounts():
    # s = 2, L = 3: |w| * 1.5 = 3, 0.75 -> 1 (0.75 rounds to 1), 0 -> 0, 1.5 -> 2, 2.25 -> 2
    w = torch.tensor([-2.0, 0.5, 0.0, 1.0, -1.5])
    q, s, sc = R.binarize(w, 2)
    assert q.tolist() == [3, 1, 0, 2, 2] and float(sc) == 2.0
    assert s.tolist() == [0b10101, 0, 0, 0]  # negative = not (w > 0): -2, 0 and -1.5
    assert R.plane_popcounts(q, 2).tolist() == [3, 2]  # MSB (bit 1) set in 3, 2, 2; LSB in 3, 1
    k = np.float32(2.0) / np.float32(3.0)  # s / L in float32, then q * k
    want = np.array([-(3 * k), 1 * k, -(0 * k), 2 * k, -(2 * k)], dtype=np.float32)
    assert torch.equal(bits_of(R.dequantize(q, s, sc, 2)), torch.from_numpy(want).view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_binarize_any_dtype_shape_and_strides(backend, dtype):
    kernels(backend)
    w = (torch.randn(37, 29, generator=torch.Generator().manual_seed(3)) * 3).to(dtype).to(backend.device).t()
    assert not w.is_contiguous()
    rq, rs, rsc = R.binarize(w.cpu(), 5)
    with backend.active():
        q, s, sc = fk.binarize(w, 5)
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and torch.equal(sc.cpu(), rsc)
    # the flattening is C order of the (transposed) view
    assert torch.equal(rq, R.binarize(w.cpu().contiguous().reshape(-1), 5)[0])


def test_binarize_edge_values(backend):
    kernels(backend)
    dev = backend.device
    w = torch.tensor([0.0, -0.0, 1e-30, -3.0, 3.0, 1.5, -1.4999999], device=dev)
    with backend.active():
        for bits in (1, 4, 8):
            q, s, sc = fk.binarize(w, bits)
            rq, rs, rsc = R.binarize(w.cpu(), bits)
            assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and float(sc) == 3.0
            assert int(q[4]) == (1 << bits) - 1 and int(q[3]) == (1 << bits) - 1
        q, s, sc = fk.binarize(torch.zeros(40, device=dev), 3)  # s = 0: every code 0, all "negative"
        assert int(q.abs().sum()) == 0 and float(sc) == 0.0
        assert s.cpu().tolist() == [255] * 5 + [0] * 3


def test_dequantize_strided_codes_and_misaligned_sign(backend):
    kernels(backend)
    dev = backend.device
    n, bits = 1000, 6
    q, s, sc = layer(n, bits)
    wide = torch.zeros(n, 2, dtype=torch.uint8)
    wide[:, 1] = q
    qs = wide.to(dev)[:, 1]
    buf = torch.zeros(s.numel() + 1, dtype=torch.uint8, device=dev)
    buf[1:] = s.to(dev)
    sm = buf[1:]
    assert not qs.is_contiguous() and sm.data_ptr() % 4
    g = torch.randn(n, 3)[:, 1]
    with backend.active():
        got = fk.dequantize(qs, sm, sc.to(dev), bits, fk.sink_like((10, 100), device=dev))
        assert got.shape == (10, 100)
        assert torch.equal(bits_of(got).reshape(-1), bits_of(R.dequantize(q, s, sc, bits)))
        gsc = torch.ops.fedmpq.dequantize_backward(g.to(dev), qs, sm, bits)
        torch.testing.assert_close(gsc.cpu(), R.dequantize_backward(g, q, s, bits), rtol=1e-6, atol=0)
        assert torch.equal(fk.plane_popcounts(qs, bits).cpu(), R.plane_popcounts(q, bits))


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_dequantize_autograd(backend, bits):
    """dL/ds = sum sigma q G / L, and the sink receives G itself, through the public function."""
    kernels(backend)
    dev = backend.device
    n = 333
    q, s, sc = layer(n, bits)
    G = torch.randn(n, generator=torch.Generator().manual_seed(bits))
    with backend.active():
        scale = sc.clone().to(dev).requires_grad_(True)
        sink = fk.sink_like((9, 37), device=dev).clone().requires_grad_(True)
        w = fk.dequantize(q.to(dev), s.to(dev), scale, bits, sink)
        w.backward(G.reshape(9, 37).to(dev))
    torch.testing.assert_close(scale.grad.cpu(), R.dequantize_backward(G, q, s, bits), rtol=1e-6, atol=0)
    assert torch.equal(sink.grad.cpu().reshape(-1), G)
    sigma = torch.where(R.negative_mask(s, n), -1.0, 1.0).double()
    want = float((sigma * q.double() * G.double()).sum() / ((1 << bits) - 1))
    assert math.isclose(float(scale.grad), want, rel_tol=1e-6)


# ---- the step ---------------------------------------------------------------------------
def _replay(backend, n, bits, lr, momentum, steps=STEPS):
    kernels(backend)
    dev = backend.device
    traj = reference_run(n, bits, lr, momentum, steps)
    (codes, sign, mom, gs), scale = fresh_state(n, bits, dev)
    with backend.active():
        for t, (grad, coef, key, want, want_gs) in enumerate(traj):
            pc = fk.plane_popcounts(codes, bits)
            c = fk.group_lasso(pc, n, bits)[1].cpu() * 1e-4
            assert torch.equal(c, coef), f"step {t}: the group-lasso coefficients differ"
            got_gs = fk.bitplane_step(codes, sign, mom, gs, grad.to(dev), coef.to(dev), scale, bits, lr, momentum, key)
            assert got_gs.dtype == torch.float32 and got_gs.shape == ()
            assert torch.equal(bits_of(got_gs), bits_of(want_gs)), f"step {t}: g_s {float(got_gs)} != {float(want_gs)}"
            assert_state_equal((codes, sign, mom, gs), want, f"n={n} bits={bits} lr={lr} step {t}")
    return traj


@pytest.mark.parametrize("lr, momentum", [(0.05, 0.9), (0.5, 0.9), (2.0, 0.0)])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("numel", SIZES)
def test_steps_match_reference_bit_for_bit(backend, numel, bits, lr, momentum):
    backend.skip_if_too_big(numel)
    traj = _replay(backend, numel, bits, lr, momentum)
    if numel >= 1000 and lr >= 0.5:  # the trajectory really moves: codes, signs and momentum change
        c0, s0, _ = layer(numel, bits)
        codes, sign, mom, gs = traj[-1][3]
        assert (codes != c0).any() and int(mom.count_nonzero()) > 0 and float(gs) > 0
        if bits >= 2:
            assert (R.negative_mask(sign, numel) != R.negative_mask(s0, numel)).any()


@pytest.mark.parametrize("bits", ALL_BITS)
def test_steps_match_reference_on_a_large_layer(backend, bits):
    """Many threads' chunks (the reference's own run there costs seconds a step: 3 steps,
    and no reference-against-itself case)."""
    backend.skip_if_too_big(BIG)
    if backend.name == "reference":
        pytest.skip("the reference against itself, at a size where it costs seconds a step")
    _replay(backend, BIG, bits, 0.5, 0.9, steps=3)


def _one_step(backend, state, scale, grad, coef, bits, lr, momentum, key):
    """Runs one step on the backend and on CPU copies with the reference; returns both
    (state, g_s) pairs."""
    dev = backend.device
    ref_state = [t.detach().cpu().clone() for t in state]
    want = R.bitplane_step(*ref_state, grad.cpu().reshape(-1).float(), coef.cpu(), scale.cpu(), bits, lr, momentum, key)
    with backend.active():
        got = fk.bitplane_step(*state, grad.to(dev), coef.to(dev), scale.to(dev), bits, lr, momentum, key)
    return (state, got), (ref_state, want)


def test_step_gs_zero_zeroes_momentum_and_keeps_codes(backend):
    kernels(backend)
    dev = backend.device
    n, bits = 1000, 4
    (codes, sign, mom, gs), scale = fresh_state(n, bits, dev)
    g = torch.Generator().manual_seed(1)
    mom.copy_(torch.randint(0, 256, (bits, n), generator=g, dtype=torch.int32).to(torch.uint8))
    gs.fill_(0.7)
    c0, s0 = codes.clone(), sign.clone()
    # momentum 0, grad 0, coef 0: every d is 0 (mu * m = 0 * m), so g_s = 0
    (state, got), (ref_state, want) = _one_step(backend, [codes, sign, mom, gs], scale, torch.zeros(n),
                                                torch.zeros(bits), bits, 0.5, 0.0, 7)
    assert float(got) == 0.0 and float(want) == 0.0
    assert torch.equal(codes, c0) and torch.equal(sign, s0)
    assert int(mom.count_nonzero()) == 0 and float(gs) == 0.0
    assert_state_equal(state, ref_state, "g_s = 0")


@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "nan_scale", "inf_scale", "nan_coef"])
def test_step_non_finite_is_skipped(backend, bad):
    kernels(backend)
    dev = backend.device
    n, bits = 777, 5
    (codes, sign, mom, gs), scale = fresh_state(n, bits, dev)
    mom.copy_(torch.randint(0, 256, (bits, n), dtype=torch.int32, generator=torch.Generator().manual_seed(2)).to(torch.uint8))
    gs.fill_(0.01)
    grad = torch.randn(n) * 0.1
    coef = torch.full((bits,), 0.02)
    if bad == "nan_grad":
        grad[123] = float("nan")
    elif bad == "inf_grad":
        grad[-1] = float("-inf")
    elif bad == "nan_scale":
        scale = torch.tensor(float("nan"))
    elif bad == "inf_scale":
        scale = torch.tensor(float("inf"))
    else:
        coef[0] = float("nan")  # the MSB plane of some code is set, so a d is NaN
    before = [t.clone() for t in (codes, sign, mom, gs)]
    (state, got), (ref_state, want) = _one_step(backend, [codes, sign, mom, gs], scale, grad, coef, bits, 0.5, 0.9, 3)
    assert not math.isfinite(float(got)) and not math.isfinite(float(want))
    if bad.startswith("nan"):
        assert math.isnan(float(got)) and math.isnan(float(want))
    assert_state_equal(state, [t.cpu() for t in before], "skipped step")
    assert_state_equal(state, ref_state, "skipped step vs reference")


@pytest.mark.parametrize("lr, grad_scale", [(1e39, 0.1), (1e10, 1e30)], ids=["lr_beyond_float32", "lr_times_gs_overflows"])
def test_step_lr_overflow_is_skipped(backend, lr, grad_scale):
    """g_s finite but lr * g_s overflowing float32 (lr itself beyond float32 included): the
    step is skipped too, status +inf."""
    kernels(backend)
    dev = backend.device
    n, bits = 300, 4
    (codes, sign, mom, gs), scale = fresh_state(n, bits, dev)
    mom.fill_(0x18)
    gs.fill_(0.5)
    before = [t.clone() for t in (codes, sign, mom, gs)]
    grad = torch.randn(n, generator=torch.Generator().manual_seed(6)) * grad_scale
    (state, got), (ref_state, want) = _one_step(backend, [codes, sign, mom, gs], scale, grad, torch.zeros(bits), bits,
                                                lr, 0.9, 3)
    assert float(got) == float("inf") and float(want) == float("inf")
    assert_state_equal(state, [t.cpu() for t in before], "lr overflow")
    assert_state_equal(state, ref_state, "lr overflow vs reference")


def test_step_keeps_the_tail_of_a_longer_sign_buffer(backend):
    """sign may hold more bytes than n needs: those are left alone (the bits past n in the
    last word needed are rewritten as zeros, as the packed bitmap has them)."""
    kernels(backend)
    dev = backend.device
    n, bits = 40, 3
    (codes, sign, mom, gs), scale = fresh_state(n, bits, dev)
    long_sign = torch.full((16,), 0xA5, dtype=torch.uint8, device=dev)
    long_sign[:8] = sign
    (state, got), (ref_state, want) = _one_step(backend, [codes, long_sign, mom, gs], scale, torch.randn(n) * 0.5,
                                                torch.zeros(bits), bits, 1.0, 0.9, 4)
    assert_state_equal(state, ref_state, "longer sign")
    assert long_sign.cpu()[8:].tolist() == [0xA5] * 8


def test_step_flips_signs_of_small_codes(backend):
    """A large positive gradient on small positive codes pushes them through zero."""
    kernels(backend)
    dev = backend.device
    n, bits = 200, 4
    codes = torch.ones(n, dtype=torch.uint8).to(dev)
    codes[::2] = 2
    sign = torch.zeros(nbytes(n), dtype=torch.uint8).to(dev)
    mom = torch.zeros(bits, n, dtype=torch.uint8).to(dev)
    gs = torch.zeros(1).to(dev)
    grad = 10.0 + torch.rand(n, generator=torch.Generator().manual_seed(4))
    (state, got), (ref_state, want) = _one_step(backend, [codes, sign, mom, gs], torch.tensor(1.5), grad,
                                                torch.zeros(bits), bits, 1 / 15, 0.9, 11)
    assert_state_equal(state, ref_state, "sign flips")
    neg = R.negative_mask(sign.cpu(), n)
    assert int(neg.sum()) >= n // 2  # most flipped to negative
    assert int(codes.cpu()[neg].min()) >= 1


def test_step_saturates_at_the_top_code(backend):
    kernels(backend)
    dev = backend.device
    n = 300
    for bits in (1, 3, 8):
        L = (1 << bits) - 1
        codes = torch.full((n,), L, dtype=torch.uint8).to(dev)
        codes[1::3] = max(L - 1, 0)
        sign = torch.zeros(nbytes(n), dtype=torch.uint8)
        sign[:4] = 0b10101010  # a few negative weights: their magnitude grows with a positive grad
        sign = sign.to(dev)
        mom = torch.zeros(bits, n, dtype=torch.uint8).to(dev)
        gs = torch.zeros(1).to(dev)
        grad = -5.0 - torch.rand(n, generator=torch.Generator().manual_seed(bits))
        grad[1:32:2] *= -1.0
        (state, got), (ref_state, want) = _one_step(backend, [codes, sign, mom, gs], torch.tensor(2.0), grad,
                                                    torch.zeros(bits), bits, 1.0, 0.9, 5)
        assert_state_equal(state, ref_state, f"saturation, bits {bits}")
        assert int(codes.max()) == L and int((codes.cpu() == L).sum()) >= n // 2


def test_step_takes_strided_grad_and_strided_misaligned_state(backend):
    kernels(backend)
    dev = backend.device
    n, bits = 1000, 5
    (codes, sign, mom, gs), scale = fresh_state(n, bits, dev)
    grad_wide = (torch.randn(n, 3, generator=torch.Generator().manual_seed(5)) * 0.1).to(dev)
    grad = grad_wide[:, 2]
    assert not grad.is_contiguous()
    coef = torch.rand(bits) * 0.01
    # the same state, stored strided (codes), misaligned (sign, gs) and as another shape (grad)
    cbuf = torch.zeros(n, 2, dtype=torch.uint8, device=dev)
    cbuf[:, 0] = codes
    c_view = cbuf[:, 0]
    sbuf = torch.zeros(sign.numel() + 1, dtype=torch.uint8, device=dev)
    sbuf[1:] = sign
    s_view = sbuf[1:]
    gbuf = torch.zeros(2, device=dev)
    g_view = gbuf[1:]
    assert not c_view.is_contiguous() and s_view.data_ptr() % 4
    ref = [t.cpu().clone() for t in (codes, sign, mom, gs)]
    key = R.step_key(9, 1, 0)
    want = R.bitplane_step(*ref, grad.cpu().contiguous(), coef, scale.cpu(), bits, 0.7, 0.9, key)
    with backend.active():
        got = fk.bitplane_step(c_view, s_view, mom, g_view, grad, coef.to(dev), scale, bits, 0.7, 0.9, key)
    assert torch.equal(bits_of(got), bits_of(want))
    assert_state_equal((c_view, s_view, mom, g_view), ref, "strided state")
    assert torch.equal(cbuf[:, 1].cpu(), torch.zeros(n, dtype=torch.uint8))  # the other column untouched
    assert int(sbuf[0]) == 0 and float(gbuf[0]) == 0.0


def test_step_hand_computed(backend):
    """n = 1, N = 4, q = 1 positive, s = 1.5 (k = 0.1), G = 10 (a = 1), no momentum state,
    lr = 1/15. d = (8, 4, 2, 1), g_s = 8/15, x = d / g_s * lr = (1, 1/2, 1/4, 1/8) (to a few
    ulps) -> round(log2 x) = (0, -1, -2, -3), e = (3, 1, -1, -3): r = (+8, +2, 0, 0) and
    p = 2^-1 + 2^-3 = 0.625. R = 8*8 + 2*4 (+1 if u < p) = 72 or 73, step = lr * g_s = 8/225,
    v = 1 - R * step = -1.56 or -1.60 -> -2: the sign flips and q = 2. mom codes: 8 = 2^3 ->
    c = 4 -> 0x20, 2 = 2^1 -> c = 2 -> 0x10, the LSB plane 1 (+1) when the coin hits."""
    kernels(backend)
    dev = backend.device
    lr = float(np.float32(1 / 15))
    for seed, hit in ((0, False), (2, True)):
        key = R.step_key(seed, 0, 0)
        assert bool(R.uniform(key, 1)[0] < 0.625) == hit
        codes = torch.tensor([1], dtype=torch.uint8, device=dev)
        sign = torch.zeros(4, dtype=torch.uint8, device=dev)
        mom = torch.zeros(4, 1, dtype=torch.uint8, device=dev)
        gs = torch.zeros(1, device=dev)
        with backend.active():
            g_s = fk.bitplane_step(codes, sign, mom, gs, torch.tensor([10.0], device=dev), torch.zeros(4, device=dev),
                                   torch.tensor(1.5, device=dev), 4, lr, 0.9, key)
        want_gs = float(np.float32(8.0) / np.float32(15.0))
        assert float(g_s) == want_gs and float(gs) == want_gs
        assert codes.tolist() == [2] and sign.tolist() == [1, 0, 0, 0]
        assert mom.reshape(-1).tolist() == [0x20, 0x10, 0, 1 if hit else 0]


@pytest.mark.parametrize(
    "lr_bits, code",
    [
        (0x3FB504F3, 1 << 3),  # just below sqrt 2: round(log2) = 0 -> r = +1 (c = 1)
        (0x3FB504F4, 2 << 3),  # just above sqrt 2: 1 -> r = +2 (c = 2)
        (0x3F800000, 1 << 3),  # 1: 0
        (0x3F3504F4, 1 << 3),  # just above sqrt 2 / 2: 0
        (0x3F3504F3, None),  # just below sqrt 2 / 2: -1 -> p = 1/2 (stochastic)
        (0x403504F4, 0),  # just above 2 sqrt 2: 2 > N = 1 -> no update
        (0x403504F3, 2 << 3),  # just below 2 sqrt 2: 1
    ],
)
def test_step_power_of_two_rule(backend, lr_bits, code):
    """With N = 1, one element, no momentum: d = a, g_s = |a|, so x = lr exactly and the
    update's exponent is round(log2 lr), exactly at the float32 neighbours of sqrt(2) * 2^k."""
    kernels(backend)
    dev = backend.device
    lr = float(np.array(lr_bits, dtype=np.uint32).view(np.float32))
    key = R.step_key(0, 0, 0)
    for q0 in (0, 1):
        state = [torch.tensor([q0], dtype=torch.uint8, device=dev), torch.zeros(4, dtype=torch.uint8, device=dev),
                 torch.zeros(1, 1, dtype=torch.uint8, device=dev), torch.zeros(1, device=dev)]
        (state, got), (ref_state, want) = _one_step(backend, state, torch.tensor(1.0), torch.tensor([0.75]),
                                                    torch.zeros(1), 1, lr, 0.5, key)
        assert_state_equal(state, ref_state, f"lr {lr!r}")
        m = int(state[2].reshape(-1)[0])
        if code is None:
            assert m in (0, 1) and (m == 1) == bool(R.uniform(key, 1)[0] < 0.5)
        else:
            assert m == code


def test_reference_round_log2_hand_computed():
    vals, want = [], []
    for k in (-100, -20, -1, 0, 1, 3, 20, 100):
        for mant, up in ((0x3504F3, 0), (0x3504F4, 1), (0, 0), (0x7FFFFF, 1)):
            vals.append(((k + 127) << 23) | mant)
            want.append(k + up)
    x = torch.tensor(vals, dtype=torch.int64).to(torch.int32).view(torch.float32)
    assert R.round_log2(x).tolist() == want
    # and against float64 math on random normal floats
    y = torch.exp2(torch.empty(10000).uniform_(-90, 90))
    ref = torch.round(torch.log2(y.double())).to(torch.int32)
    assert torch.equal(R.round_log2(y), ref)


def test_reference_encode_decode_r():
    det = torch.tensor([0, 1, -1, 2, -4, 256, -256, 0, 8], dtype=torch.int32)
    st = torch.tensor([0, 0, 1, -1, 1, 0, -1, 1, -1], dtype=torch.int32)
    codes = R.encode_r(det, st)
    assert codes.tolist() == [0, 8, 0x88 | 1, 16 | 2, 0x98 | 1, 72, 0xC8 | 2, 1, 32 | 2]
    assert torch.equal(R.decode_r(codes), det + st)


# ---- the generator -------------------------------------------------------------------------
def test_generator_hand_computed_and_statistics():
    def mix32(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x735A2D97) & 0xFFFFFFFF
        return x ^ (x >> 15)

    assert R.mix32_int(0) == 0 and R.mix32_int(1) == mix32(1) and R.mix32_int(2**32 + 5) == mix32(5)
    key = R.step_key(42, 7, 3)
    assert key == mix32(mix32(mix32(42 ^ 0x9E3779B9) ^ 7) ^ 3)
    u = R.uniform(key, 100_000)
    for j in (0, 1, 31, 99_999):
        assert float(u[j]) == (mix32(key ^ mix32(j ^ 0x85EBCA6B)) >> 8) * 2.0**-24
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, torch.floor(u * 2**24))  # multiples of 2^-24
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    keys = {R.step_key(s, t, l) for s in range(4) for t in range(4) for l in range(4)}
    assert len(keys) == 64  # seed, step and layer all change the key
    streams = torch.stack([R.uniform(k, 1000) for k in sorted(keys)[:8]])
    for i in range(8):
        for j in range(i + 1, 8):
            assert (streams[i] != streams[j]).float().mean() > 0.99
    assert R.step_key(1, 2, 3) == R.step_key(1 + 2**32, 2, 3)  # each taken mod 2^32


@pytest.mark.parametrize("lr_exp", [-1, -3])
def test_step_stochastic_part_follows_the_generator(backend, lr_exp):
    """N = 1, all d equal and positive: x = lr = 2^lr_exp -> p = 2^lr_exp, and the LSB
    update is +1 exactly where uniform(key, j) < p."""
    kernels(backend)
    dev = backend.device
    n = 4000
    p = 2.0**lr_exp
    key = R.step_key(5, 6, 7)
    codes = torch.zeros(n, dtype=torch.uint8, device=dev)
    sign = torch.zeros(nbytes(n), dtype=torch.uint8, device=dev)
    mom = torch.zeros(1, n, dtype=torch.uint8, device=dev)
    gs = torch.zeros(1, device=dev)
    with backend.active():
        fk.bitplane_step(codes, sign, mom, gs, torch.ones(n, device=dev), torch.zeros(1, device=dev),
                         torch.tensor(1.0, device=dev), 1, p, 0.0, key)
    hit = R.uniform(key, n) < p
    assert torch.equal(mom.cpu().reshape(-1), hit.to(torch.uint8))
    assert abs(float(hit.float().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)
    # v = 0 - 1 * (p * 1): rounds to -0 for p <= 1/2, so no flip and no code change
    assert int(codes.count_nonzero()) == 0 and int(sign.count_nonzero()) == 0


# ---- the op layer ------------------------------------------------------------------------
def test_registry_routes_to_the_cpu_backend():
    if native is None:
        pytest.skip("native module not built")
    from fedmpq_kernels.bitplane import cpu as C

    with registry.use_backend("cpu"):
        for op in OPS:
            assert registry.get("bitplane", op, "cpu") is getattr(C, op)


def test_opcheck(backend):
    kernels(backend)
    dev = backend.device
    n, bits = 77, 4
    w = torch.randn(n, device=dev)
    with backend.active():
        q, s, sc = fk.binarize(w, bits)
        torch.library.opcheck(torch.ops.fedmpq.binarize.default, (w, bits))
        torch.library.opcheck(torch.ops.fedmpq.dequantize.default,
                              (q, s, sc.clone().requires_grad_(), bits, torch.zeros(7, 11, device=dev, requires_grad=True)))
        torch.library.opcheck(torch.ops.fedmpq.dequantize_backward.default, (torch.randn(n, device=dev), q, s, bits))
        torch.library.opcheck(torch.ops.fedmpq.plane_popcounts.default, (q, bits))
        torch.library.opcheck(torch.ops.fedmpq.bitplane_step.default,
                              (q.clone(), s.clone(), torch.zeros(bits, n, dtype=torch.uint8, device=dev),
                               torch.zeros(1, device=dev), torch.randn(n, device=dev), torch.rand(bits, device=dev), sc,
                               bits, 0.5, 0.9, R.step_key(1, 2, 3)))


def _step_args(**over):
    n, bits = 40, 3
    a = dict(codes=torch.zeros(n, dtype=torch.uint8), sign=torch.zeros(8, dtype=torch.uint8),
             mom=torch.zeros(bits, n, dtype=torch.uint8), gs=torch.zeros(1), grad=torch.zeros(n), coef=torch.zeros(bits),
             scale=torch.tensor(1.0), bits=bits, lr=0.1, momentum=0.9, key=5)
    a.update(over)
    return a


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: fk.binarize(torch.randn(5), 0), ValueError, "bits must be in 1..8"),
        (lambda: fk.binarize(torch.randn(5), 9), ValueError, "bits must be in 1..8"),
        (lambda: fk.binarize(torch.randn(5), 2.0), TypeError, "bits must be an int"),
        (lambda: fk.binarize(torch.randn(5), True), TypeError, "bits must be an int"),
        (lambda: fk.binarize(torch.arange(5), 4), TypeError, "w must be a floating-point"),
        (lambda: fk.binarize([1.0], 4), TypeError, "must be a torch.Tensor"),
        (lambda: fk.binarize(torch.tensor([1.0, float("nan")]), 4), ValueError, "NaN or inf"),
        (lambda: fk.binarize(torch.tensor([float("inf")]), 4), ValueError, "NaN or inf"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.int32), torch.zeros(4, dtype=torch.uint8), torch.tensor(1.0), 3,
                               fk.sink_like((5,))), TypeError, "codes must be torch.uint8"),
        (lambda: fk.dequantize(torch.zeros(33, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), torch.tensor(1.0), 3,
                               fk.sink_like((33,))), ValueError, "sign has 4 bytes, 8 needed"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.uint8), torch.zeros(4, dtype=torch.float32), torch.tensor(1.0), 3,
                               fk.sink_like((5,))), TypeError, "sign must be torch.uint8"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8),
                               torch.tensor(1.0, dtype=torch.float64), 3, fk.sink_like((5,))), TypeError, "scale must be"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), torch.ones(2), 3,
                               fk.sink_like((5,))), TypeError, "scale must be a one-element"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), torch.tensor(1.0), 3,
                               fk.sink_like((6,))), ValueError, "sink has 6 elements, codes 5"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), torch.tensor(1.0), 9,
                               fk.sink_like((5,))), ValueError, "bits must be in 1..8"),
        (lambda: fk.plane_popcounts(torch.zeros(5, dtype=torch.uint8), 0), ValueError, "bits must be in 1..8"),
        (lambda: fk.plane_popcounts(torch.zeros(5), 3), TypeError, "codes must be torch.uint8"),
        (lambda: fk.bitplane_step(**_step_args(bits=0)), ValueError, "bits must be in 1..8"),
        (lambda: fk.bitplane_step(**_step_args(bits=9)), ValueError, "bits must be in 1..8"),
        (lambda: fk.bitplane_step(**_step_args(codes=torch.zeros(40))), TypeError, "codes must be torch.uint8"),
        (lambda: fk.bitplane_step(**_step_args(sign=torch.zeros(4, dtype=torch.uint8))), ValueError, "sign has 4 bytes"),
        (lambda: fk.bitplane_step(**_step_args(mom=torch.zeros(2, 40, dtype=torch.uint8))), ValueError, "mom must be"),
        (lambda: fk.bitplane_step(**_step_args(mom=torch.zeros(40, 3, dtype=torch.uint8).t())), ValueError, "contiguous"),
        (lambda: fk.bitplane_step(**_step_args(mom=torch.zeros(3, 40))), TypeError, "mom must be torch.uint8"),
        (lambda: fk.bitplane_step(**_step_args(gs=torch.zeros(2))), ValueError, "gs must hold one float32"),
        (lambda: fk.bitplane_step(**_step_args(gs=torch.zeros(1, dtype=torch.float64))), TypeError, "gs must be torch.float32"),
        (lambda: fk.bitplane_step(**_step_args(grad=torch.zeros(41))), ValueError, "grad has 41 elements, codes 40"),
        (lambda: fk.bitplane_step(**_step_args(coef=torch.zeros(2))), ValueError, "coef must hold 3 values"),
        (lambda: fk.bitplane_step(**_step_args(scale=torch.ones(2))), TypeError, "scale must be a one-element"),
        (lambda: fk.bitplane_step(**_step_args(lr=0.0)), ValueError, "lr must be > 0"),
        (lambda: fk.bitplane_step(**_step_args(lr=-1.0)), ValueError, "lr must be > 0"),
        (lambda: fk.bitplane_step(**_step_args(lr=float("nan"))), ValueError, "lr must be a finite number"),
        (lambda: fk.bitplane_step(**_step_args(lr=float("inf"))), ValueError, "lr must be a finite number"),
        (lambda: fk.bitplane_step(**_step_args(momentum=1.0)), ValueError, r"momentum must be in \[0, 1\)"),
        (lambda: fk.bitplane_step(**_step_args(momentum=-0.1)), ValueError, r"momentum must be in \[0, 1\)"),
        (lambda: fk.bitplane_step(**_step_args(key=-1)), ValueError, "key must be a uint32"),
        (lambda: fk.bitplane_step(**_step_args(key=2**32)), ValueError, "key must be a uint32"),
        (lambda: fk.bitplane_step(**_step_args(key=1.0)), ValueError, "key must be a uint32"),
        (lambda: fk.bitplane_step(**_step_args(key=True)), ValueError, "key must be a uint32"),
    ],
)
def test_public_functions_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_public_errors_leave_the_state_untouched():
    a = _step_args(codes=torch.full((40,), 3, dtype=torch.uint8), momentum=1.5)
    with pytest.raises(ValueError):
        fk.bitplane_step(**a)
    assert int(a["codes"].min()) == 3 and int(a["mom"].count_nonzero()) == 0


# ---- the native boundary ------------------------------------------------------------------
needs_native = pytest.mark.skipif(native is None, reason="native module not built")


def _native_step():
    n, bits = 100, 4
    keep = dict(codes=torch.zeros(n, dtype=torch.uint8), sign=torch.zeros(16, dtype=torch.uint8),
                mom=torch.zeros(bits * n, dtype=torch.uint8), gs=torch.zeros(1), grad=torch.zeros(n), coef=torch.zeros(bits))
    a = dict(codes=keep["codes"].data_ptr(), n=n, sign=keep["sign"].data_ptr(), sign_nbytes=16, mom=keep["mom"].data_ptr(),
             mom_len=bits * n, gs=keep["gs"].data_ptr(), grad=keep["grad"].data_ptr(), coef=keep["coef"].data_ptr(),
             coef_len=bits, scale=1.0, bits=bits, lr=0.1, momentum=0.5, key=1, nthreads=2)
    return a, keep


@needs_native
@pytest.mark.parametrize(
    "over, match",
    [
        (dict(sign_nbytes=12), "sign bitmap has 12 bytes, needs 16"),
        (dict(mom_len=399), "mom: buffer holds 399 elements, needs 400"),
        (dict(coef_len=3), "coef: buffer holds 3 elements, needs 4"),
        (dict(bits=9), "bits must be in 1..8"),
        (dict(bits=0), "bits must be in 1..8"),
        (dict(n=-1), "negative element count"),
        (dict(grad=0), "grad: null data pointer"),
        (dict(gs=0), "gs: null data pointer"),
        (dict(key=-1), "key must be a uint32"),
        (dict(key=2**32), "key must be a uint32"),
        (dict(lr=0.0), "lr must be finite and > 0"),
        (dict(lr=float("inf")), "lr must be finite and > 0"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(n=2**32, mom_len=2**34), "2\\^32 weights"),
    ],
)
def test_native_step_rejects_inconsistent_arguments(over, match):
    a, keep = _native_step()
    a.update(over)
    with pytest.raises(ValueError, match=match):
        native.cpu.bitplane_step(**a)


@needs_native
def test_native_step_rejects_overlapping_buffers():
    a, keep = _native_step()
    with pytest.raises(ValueError, match="codes and mom overlap"):
        native.cpu.bitplane_step(**dict(a, mom=a["codes"] + 50))
    with pytest.raises(ValueError, match="gs and grad overlap"):
        native.cpu.bitplane_step(**dict(a, gs=a["grad"] + 8))
    with pytest.raises(ValueError, match="sign and grad overlap"):
        native.cpu.bitplane_step(**dict(a, sign=a["grad"]))


@needs_native
def test_native_other_ops_reject_inconsistent_arguments():
    n = 100
    w, codes, sign, out = torch.zeros(n), torch.zeros(n, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8), torch.zeros(n)
    pc = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="codes: buffer holds 99 elements"):
        native.cpu.binarize(w.data_ptr(), n, 4, codes.data_ptr(), 99, sign.data_ptr(), 16, 1)
    with pytest.raises(ValueError, match="sign bitmap has 8 bytes, needs 16"):
        native.cpu.binarize(w.data_ptr(), n, 4, codes.data_ptr(), n, sign.data_ptr(), 8, 1)
    with pytest.raises(ValueError, match="sign bitmap must be 4-byte aligned"):
        native.cpu.dequantize(codes.data_ptr(), n, sign.data_ptr() + 1, 16, 1.0, 4, out.data_ptr(), n, 1)
    with pytest.raises(ValueError, match="sign bitmap is required"):
        native.cpu.dequantize(codes.data_ptr(), n, 0, 0, 1.0, 4, out.data_ptr(), n, 1)
    with pytest.raises(ValueError, match="out: buffer holds 50 elements"):
        native.cpu.dequantize(codes.data_ptr(), n, sign.data_ptr(), 16, 1.0, 4, out.data_ptr(), 50, 1)
    with pytest.raises(ValueError, match="4-byte aligned"):
        native.cpu.dequantize_backward(w.data_ptr() + 2, n - 1, codes.data_ptr(), sign.data_ptr(), 16, 4, 1)
    with pytest.raises(ValueError, match="out: buffer holds 4 elements, needs 8"):
        native.cpu.plane_popcounts(codes.data_ptr(), n, 8, pc.data_ptr(), 4, 1)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        native.cpu.plane_popcounts(codes.data_ptr(), n, 9, pc.data_ptr(), 9, 1)


@needs_native
@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_native_step_threads_and_isas_agree(isa):
    if isa == "avx2" and not native.avx2_available():
        pytest.skip("no AVX2")
    prev = native.cpu_isa()
    native.set_cpu_isa(isa)
    try:
        _threads_agree()
    finally:
        native.set_cpu_isa(prev)


def _threads_agree():
    n, bits = BIG, 6
    results = []
    for nt in (1, 2, 3):
        (codes, sign, mom, gs), scale = fresh_state(n, bits, "cpu")
        grad = torch.randn(n, generator=torch.Generator().manual_seed(8)) * 0.1
        coef = torch.full((bits,), 1e-3)
        for t in range(2):
            g = native.cpu.bitplane_step(codes.data_ptr(), n, sign.data_ptr(), sign.numel(), mom.data_ptr(), mom.numel(),
                                         gs.data_ptr(), grad.data_ptr(), coef.data_ptr(), bits, float(scale), bits, 0.5,
                                         0.9, R.step_key(0, t, 0), nt)
        results.append((codes, sign, mom, gs, g))
    for r in results[1:]:
        for a, b in zip(r[:4], results[0][:4]):
            assert torch.equal(a, b)
        assert r[4] == results[0][4]
