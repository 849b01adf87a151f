"""The fused optimizer step of every bit-plane backend against the pure-torch reference, bit
for bit (codes, sign bytes, momentum codes, gs and the returned g_s after each of several
steps), on odd and empty sizes and every bit-width; its special cases (g_s = 0, non-finite
gradients, lr overflow, sign flips, saturation, strided and misaligned state); hand-computed
cases of the rounding rule and of one whole step; the stochastic part against the generator."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels.bitplane import reference as R

from tests.fedmpq_kernels.misaligned import misaligned
from tests.fedmpq_kernels.subnormals import subnormals_kept

from .helpers import (ALL_BITS, BIG, EDGE_DRAWS, EDGE_STEPS, SIZES, STEPS, assert_state_equal, bits_of, fresh_state,
                      kernels, layer, reference_run)


def _replay(backend, n, bits, lr, momentum, steps=STEPS):
    kernels(backend)
    dev = backend.device
    traj = reference_run(n, bits, lr, momentum, steps)
    (codes, sign, mom, gs), scale = fresh_state(n, bits, dev)
    with backend.active():
        for t, (grad, coef, key, want, want_gs) in enumerate(traj):
            pc = fk.plane_popcounts(codes, bits)
            c = fk.group_lasso(pc, n, bits)[1].cpu() * 1e-4
            # group_lasso is the reference's own (pure torch): this checks the popcounts
            assert torch.equal(c, coef), f"step {t}: the plane popcounts' group-lasso coefficients differ"
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
    if backend.interpreted and numel < 1000 and (lr, momentum) != (0.5, 0.9):
        # one kernel for every lr and momentum (a GPU's lanes take every tl.where's both ways):
        # below 1,000 weights, where the trajectories hardly move, one pair at every width
        pytest.skip("the Triton interpreter takes lr 0.5, momentum 0.9 below 1,000 weights")
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
    step is skipped too, status +inf. An lr beyond float32 is refused by the public function
    and the op (it would skip every step): the backend's kernel, called as the op calls it,
    still skips rather than write an inf step into the state."""
    kernels(backend)
    dev = backend.device
    n, bits = 300, 4
    (codes, sign, mom, gs), scale = fresh_state(n, bits, dev)
    mom.fill_(0x18)
    gs.fill_(0.5)
    before = [t.clone() for t in (codes, sign, mom, gs)]
    grad = torch.randn(n, generator=torch.Generator().manual_seed(6)) * grad_scale
    if lr < 3.4028235677973366e38:
        (state, got), (ref_state, want) = _one_step(backend, [codes, sign, mom, gs], scale, grad, torch.zeros(bits), bits,
                                                    lr, 0.9, 3)
    else:
        with pytest.raises(ValueError, match="and below 3.4028235677973366e38"):
            _one_step(backend, [codes, sign, mom, gs], scale, grad, torch.zeros(bits), bits, lr, 0.9, 3)
        state, ref_state = [codes, sign, mom, gs], [t.detach().cpu().clone() for t in (codes, sign, mom, gs)]
        want = R.bitplane_step(*ref_state, grad, torch.zeros(bits), scale.cpu(), bits, lr, 0.9, 3)
        with backend.active():
            got = backend.op("bitplane", "bitplane_step")(codes, sign, mom, gs, grad.to(dev), torch.zeros(bits, device=dev),
                                                          scale, bits, lr, 0.9, 3, None)
    assert float(got) == float("inf") and float(want) == float("inf")
    assert_state_equal(state, [t.cpu() for t in before], "lr overflow")
    assert_state_equal(state, ref_state, "lr overflow vs reference")


@pytest.mark.parametrize("lr", [3.4028234663852886e38, 3.40282355e38], ids=["float32_max", "rounds_down_to_it"])
def test_step_lr_at_the_float32_limit_is_taken(backend, lr):
    """lr at float32's largest value, or a double below that plus half an ulp (it rounds to
    it): the float32 lr is finite, and with g_s < 1 so is lr * g_s, so the step runs (as the
    reference's: status g_s, the state written), unlike test_step_lr_overflow_is_skipped's."""
    kernels(backend)
    n, bits = 300, 4
    (codes, sign, mom, gs), scale = fresh_state(n, bits, backend.device)
    mom.fill_(0x18)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(6)) * 0.1
    (state, got), (ref_state, want) = _one_step(backend, [codes, sign, mom, gs], scale, grad, torch.zeros(bits), bits,
                                                lr, 0.9, 3)
    assert 0.0 < float(want) < 1.0 and torch.equal(bits_of(got), bits_of(want))
    assert_state_equal(state, ref_state, f"lr {lr!r}")


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
    sign = torch.zeros(fk.bitmap_nbytes(n), dtype=torch.uint8).to(dev)
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
        sign = torch.zeros(fk.bitmap_nbytes(n), dtype=torch.uint8)
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


@pytest.mark.parametrize("bits", ALL_BITS)
def test_step_takes_strided_grad_and_strided_misaligned_state(backend, bits):
    """One step on a strided gradient and strided/misaligned state, at every width 1..8."""
    kernels(backend)
    dev = backend.device
    n = 1000
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


def test_step_takes_misaligned_float_tensors(backend):
    """grad, coef and the gs state whose data pointers are not 4-byte aligned: stepped as
    the reference steps them (the CPU adapter steps aligned copies, and writes gs back)."""
    kernels(backend)
    if backend.device != "cpu":
        pytest.skip("host memory only")
    n, bits = 1000, 5
    (codes, sign, mom, gs), scale = fresh_state(n, bits, "cpu")
    grad = torch.randn(n, generator=torch.Generator().manual_seed(5)) * 0.1
    coef = torch.rand(bits, generator=torch.Generator().manual_seed(6)) * 0.01
    ref = [t.clone() for t in (codes, sign, mom, gs)]
    want = R.bitplane_step(*ref, grad, coef, scale, bits, 0.7, 0.9, 3)
    gs = misaligned(gs)
    with backend.active():
        got = fk.bitplane_step(codes, sign, mom, gs, misaligned(grad), misaligned(coef), scale, bits, 0.7, 0.9, 3)
    assert torch.equal(bits_of(got), bits_of(want)) and float(gs) > 0
    assert_state_equal((codes, sign, mom, gs), ref, "misaligned grad, coef and gs")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["f64", "f16"])
def test_the_backends_own_step_takes_a_grad_of_another_float_dtype(backend, dtype):
    """Each backend's step adapter, called as the registered op calls it (after its checks),
    takes a float64 or float16 grad as that grad in float32, as the public function does: a
    kernel reading a float64 grad's bytes as float32 would step on garbage."""
    mod = kernels(backend)
    dev = backend.device
    n, bits = 300, 3
    grad = (torch.randn(n, generator=torch.Generator().manual_seed(2)) * 0.1).to(dtype)
    coef = torch.rand(bits, generator=torch.Generator().manual_seed(3)) * 0.01
    (codes, sign, mom, gs), scale = fresh_state(n, bits, dev)
    ref = [t.cpu().clone() for t in (codes, sign, mom, gs)]
    key = R.step_key(4, 1, 0)
    want = R.bitplane_step(*ref, grad.float(), coef, scale.cpu(), bits, 0.7, 0.9, key)
    with backend.active():
        got = mod.bitplane_step(codes, sign, mom, gs, grad.to(dev), coef.to(dev), scale, bits, 0.7, 0.9, key)
    assert torch.equal(bits_of(got), bits_of(want))
    assert_state_equal((codes, sign, mom, gs), ref, f"grad {dtype}")
    assert (codes.cpu() != layer(n, bits)[0]).any()  # the step moved codes: the grad was read


@pytest.mark.parametrize("case", EDGE_STEPS, ids=[c.name for c in EDGE_STEPS])
def test_step_edge_cases(backend, case):
    """The boundaries of steps 3-4 the random trajectories never reach (helpers.EDGE_STEPS:
    the log2 rounding at sqrt(2), x >= 2^-100 to count, a draw exactly equal to p, the MSB
    plane's d = 0, requantization half to even), on every backend: the state and g_s as the
    reference's, and the hand-worked oracle of each case."""
    kernels(backend)
    dev = backend.device
    for (key, j), u in EDGE_DRAWS.items():
        assert float(R.uniform(key, 256)[j]) == u
    ref = case.state()
    grad, coef, scale, bits, lr, momentum, key = case.args()
    want = R.bitplane_step(*ref, grad, coef, scale, bits, lr, momentum, key)
    state = [t.to(dev) for t in case.state()]
    with backend.active():
        got = fk.bitplane_step(*state, grad.to(dev), coef.to(dev), scale.to(dev), bits, lr, momentum, key)
    assert float(want) == case.g_s and torch.equal(bits_of(got), bits_of(want))
    assert_state_equal(state, ref, case.name)
    case.check([t.cpu() for t in state])


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
    """With N = 1, no momentum and one gradient everywhere: d = a, g_s = |a|, so x = lr
    exactly and the update's exponent is round(log2 lr), exactly at the float32 neighbours of
    sqrt(2) * 2^k. One element (the scalar path) and 67 (the vector loop and its tail)."""
    kernels(backend)
    dev = backend.device
    lr = float(np.array(lr_bits, dtype=np.uint32).view(np.float32))
    key = R.step_key(0, 0, 0)
    for n in (1, 67):
        for q0 in (0, 1):
            state = [torch.full((n,), q0, dtype=torch.uint8, device=dev),
                     torch.zeros(fk.bitmap_nbytes(n), dtype=torch.uint8, device=dev),
                     torch.zeros(1, n, dtype=torch.uint8, device=dev), torch.zeros(1, device=dev)]
            (state, got), (ref_state, want) = _one_step(backend, state, torch.tensor(1.0), torch.full((n,), 0.75),
                                                        torch.zeros(1), 1, lr, 0.5, key)
            assert_state_equal(state, ref_state, f"lr {lr!r}, {n} elements")
            m = state[2].reshape(-1).cpu()
            if code is None:
                assert torch.equal(m == 1, R.uniform(key, n).cpu() < 0.5) and bool((m <= 1).all())
            else:
                assert m.tolist() == [code] * n, f"{n} elements"


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
    sign = torch.zeros(fk.bitmap_nbytes(n), dtype=torch.uint8, device=dev)
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


def test_step_clears_stray_sign_bits_past_n(backend):
    """The step rewrites the sign words of its n bits as the packed bitmap has them: bits set
    past n in the last word (a reused buffer) come back as zeros, as the reference's
    pack_bitmap writes them, and the bytes past the words n needs are left alone. The last
    (masked) block does it, with one block and with several."""
    kernels(backend)
    dev = backend.device
    for n, bits in ((40, 3), (300, 2)):
        (codes, sign, mom, gs), scale = fresh_state(n, bits, dev)
        nb = fk.bitmap_nbytes(n)
        long_sign = torch.full((nb + 4,), 0xA5, dtype=torch.uint8, device=dev)
        long_sign[:nb] = sign
        words = long_sign[:nb].view(torch.int32)
        words[-1] |= -1 << (n % 32)  # every padding bit of the last word set
        (state, got), (ref_state, want) = _one_step(backend, [codes, long_sign, mom, gs], scale, torch.randn(n) * 0.5,
                                                    torch.zeros(bits), bits, 1.0, 0.9, 4)
        assert_state_equal(state, ref_state, f"stray sign bits, n={n}")
        assert int(long_sign[:nb].view(torch.int32)[-1].cpu()) >> (n % 32) == 0, "padding bits left set"
        assert long_sign.cpu()[nb:].tolist() == [0xA5] * 4


def test_step_takes_buffers_back_to_back_in_one_allocation(backend):
    """Buffers that touch without overlapping are apart: codes then mom in one byte buffer,
    grad, gs and coef in one float buffer (one ends where the next begins). The step runs
    on them as on separate tensors."""
    kernels(backend)
    dev = backend.device
    n, bits = 40, 3
    (codes, sign, mom, gs), scale = fresh_state(n, bits, "cpu")
    grad, coef = torch.randn(n, generator=torch.Generator().manual_seed(3)) * 0.5, torch.full((bits,), 1e-3)
    ref = [t.clone() for t in (codes, sign, mom, gs)]
    want = R.bitplane_step(*ref, grad, coef, scale, bits, 1.0, 0.9, 4)
    u8 = torch.cat([codes, mom.reshape(-1)]).to(dev)
    f32 = torch.cat([grad, gs, coef]).to(dev)
    state = [u8[:n], sign.to(dev), u8[n:].view(bits, n), f32[n:n + 1]]
    with backend.active():
        got = fk.bitplane_step(*state, f32[:n], f32[n + 1:], scale.to(dev), bits, 1.0, 0.9, 4)
    assert torch.equal(bits_of(got), bits_of(want))
    assert_state_equal(state, ref, "back to back")


@pytest.mark.skipif(not subnormals_kept(), reason="this process flushes subnormals to zero")
def test_a_subnormal_g_s_is_kept(backend):
    """Gradients near 1e-36 make g_s = max|d| / L subnormal: the step and its state are the
    reference's (a GPU kernel that flushed it to 0 would take the no-update branch)."""
    kernels(backend)
    dev = backend.device
    n, bits = 300, 8
    ref, _ = fresh_state(n, bits, "cpu", seed=11)  # the first step of a round: d = the gradient's
    grad = torch.randn(n, generator=torch.Generator().manual_seed(3)) * 1e-36
    coef, scale = torch.zeros(bits), torch.tensor(1.0)
    state = [t.clone().to(dev) for t in ref]
    want = R.bitplane_step(*ref, grad, coef, scale, bits, 1.0, 0.9, 77)
    assert 0.0 < float(want) < 2.0 ** -126  # g_s itself is subnormal
    with backend.active():
        got = fk.bitplane_step(*state, grad.to(dev), coef.to(dev), scale.to(dev), bits, 1.0, 0.9, 77)
    assert torch.equal(bits_of(got), bits_of(want))
    assert_state_equal(state, ref, "subnormal g_s")


@pytest.mark.parametrize("alias", ["codes_in_mom", "sign_in_codes", "gs_in_grad"])
@pytest.mark.parametrize("call", ["single", "layers"])
def test_a_step_refuses_state_that_overlaps_through_a_strided_view(backend, alias, call):
    """A strided or misaligned state tensor is stepped in a working copy, which the native
    overlap checks see instead of the tensor: codes viewing mom's storage were stepped and
    their copy written back over mom, with no error. Refused by name, nothing written."""
    kernels(backend)
    dev = backend.device
    n, bits = 40, 3
    g = torch.Generator().manual_seed(0)
    store = torch.randint(0, 8, (4 * bits * n,), dtype=torch.uint8, generator=g).to(dev)
    codes = torch.randint(0, 8, (n,), dtype=torch.uint8, generator=g).to(dev)
    sign, mom = torch.zeros(8, dtype=torch.uint8, device=dev), torch.zeros(bits, n, dtype=torch.uint8, device=dev)
    gs, grad = torch.zeros(1, device=dev), torch.randn(n, generator=g).to(dev)
    if alias == "codes_in_mom":
        mom, codes = store[: bits * n].view(bits, n), store[::3][:n]
    elif alias == "sign_in_codes":
        codes, sign = store[1: n + 1], store[2: 2 + 16][::2]
    else:
        grad = torch.randn(2 * n + 1, generator=g).to(dev)[1::2]
        gs = grad[3:4]
    args = (codes, sign, mom, gs, grad, torch.zeros(bits, device=dev), torch.tensor(1.0, device=dev), bits, 0.5, 0.9)
    before = [t.clone() for t in (codes, sign, mom, gs, grad)]
    with backend.active(), pytest.raises(ValueError, match="overlap in memory"):
        if call == "single":
            fk.bitplane_step(*args, 7)
        else:
            fk.bitplane_step_layers(*[[a] for a in args[:8]], 0.5, 0.9, [7])
    assert all(torch.equal(t, b) for t, b in zip((codes, sign, mom, gs, grad), before))


def test_a_strided_state_of_its_own_storage_steps_as_the_contiguous_one(backend):
    """The overlap check refuses only memory that is shared: strided codes and signs of
    their own storage step as contiguous ones do."""
    kernels(backend)
    dev = backend.device
    n, bits = 40, 3
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 8, (2 * n,), dtype=torch.uint8, generator=g).to(dev)[::2]
    sign = torch.randint(0, 256, (16,), dtype=torch.uint8, generator=g).to(dev)[1::2]
    state = [codes, sign, torch.zeros(bits, n, dtype=torch.uint8, device=dev), torch.zeros(1, device=dev)]
    twin = [t.contiguous().clone() for t in state]
    rest = (torch.randn(n, generator=g).to(dev), torch.full((bits,), 1e-3, device=dev), torch.tensor(1.0, device=dev),
            bits, 0.5, 0.9, 7)
    with backend.active():
        assert torch.equal(fk.bitplane_step(*state, *rest), fk.bitplane_step(*twin, *rest))
    assert all(torch.equal(a, b) for a, b in zip(state, twin))


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_bfloat16_gradients_into_the_backends_step_and_scale_gradient(backend, bits):
    """A bfloat16 G (an autocast model's) into each backend's own dequantize_backward and
    bitplane_step, and the registered op: the reference's results on G in float32 (bfloat16
    widens exactly), bit for bit for the step, to float rounding for dL/ds. No test gave
    either a bfloat16 gradient before (float16 and float64 only; the Triton interpreter's
    adapter widens it first, a GPU's Triton kernel loads it)."""
    n = 1000
    dev = backend.device
    q, s, sc = layer(n, bits)
    g = torch.randn(n, generator=torch.Generator().manual_seed(3)).bfloat16()
    mod = backend.module("bitplane")
    want = R.dequantize_backward(g.float(), q, s, bits)
    with backend.active():
        got = mod.dequantize_backward(g.to(dev), q.to(dev), s.to(dev), bits)
        got_op = torch.ops.fedmpq.dequantize_backward(g.to(dev), q.to(dev), s.to(dev), bits)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_op.cpu(), want, rtol=1e-6, atol=0)
    (codes, sign, mom, gs), scale = fresh_state(n, bits, dev)
    ref = [t.clone().cpu() for t in (codes, sign, mom, gs)]
    coef = torch.full((bits,), 1e-3)
    gg = (g.float() * 0.1).bfloat16()
    want_gs = R.bitplane_step(*ref, gg.float(), coef, scale.cpu(), bits, 0.7, 0.9, 5)
    with backend.active():
        got_gs = mod.bitplane_step(codes, sign, mom, gs, gg.to(dev), coef.to(dev), scale, bits, 0.7, 0.9, 5)
    assert torch.equal(bits_of(got_gs), bits_of(want_gs))
    assert_state_equal((codes, sign, mom, gs), ref, "bfloat16 grad")
