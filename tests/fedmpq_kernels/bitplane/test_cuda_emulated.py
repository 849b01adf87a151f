"""The CUDA C++ bit-plane kernels (csrc/cuda/bitplane.cu) run on the CPU under the emulator
of tests/cuda_emu: binarize, dequantize, its scale gradient, the plane popcounts and the fused
optimizer step against the reference, bit for bit (the scale gradient within 1e-6 relative:
it sums in float64 in its own order), for every width, on sizes that cut a sign word short
and take the grid-stride loops several times, with blocks and a block's warps in shuffled
orders, stale workspace slots, loads checked against the buffers and canaries around every output. Speed,
and the kernels on real hardware, are tools/gpu_check.sh's."""
from __future__ import annotations

import pytest
import torch

from fedmpq_kernels.bitplane import reference as R
from tests.cuda_emu import Guarded, words

from .helpers import (ALL_BITS, EDGE_DRAWS, EDGE_STEPS, assert_state_equal, bits_of, mid_round_state,
                      random_codes_signs, reference_run, weights)

# One SM (the emulator's default) is a grid of 8 blocks of 256 threads: 70001 elements take
# the grid-stride loops several times, and 33 or 4097 cut a sign word short.
SIZES = [1, 31, 32, 33, 1000, 4097, 70001]
STEP_SIZES = [1, 33, 1000, 4097]


def _stale(ws: torch.Tensor) -> torch.Tensor:
    """The workspace as a reused one looks: the ticket 0, every slot NaN bits."""
    ws.fill_(0x7FC00000)
    ws[0] = 0
    return ws


@pytest.mark.parametrize("n", SIZES)
def test_binarize(emu, n):
    """Codes, signs and the scale as the reference's, with zeros and -0.0 among the weights
    (negative = not (w > 0), so both set the sign bit), an all-zero layer (s = 0: q = 0), and
    a layer whose s is so small that L / s is inf (a zero's 0 * inf is NaN: code 0)."""
    # binarize's absmax launch uses the bit-plane workspace: it must hold absmax's slots
    assert emu.bitplane_workspace().numel() >= emu.workspace().numel()
    w = weights(n, 3)
    w[::7] = 0.0
    w[3::11] = -0.0
    for bits in ALL_BITS:
        tiny = w * 1e-40  # subnormal: L / s overflows to inf at every width
        for x in (w, torch.zeros(n), tiny):
            codes, sign = Guarded(n, torch.uint8), Guarded(words(n), torch.int32)
            scale = Guarded(1, torch.float32)
            emu.warp_order(bits)
            emu.binarize(x, bits, codes.t, sign.t, scale.t, _stale(emu.bitplane_workspace()))
            rc, rs, rscale = R.binarize(x, bits)
            assert torch.equal(codes.t, rc), f"{bits} bits: codes"
            assert torch.equal(sign.t.view(torch.uint8), rs), f"{bits} bits: sign"
            assert int(bits_of(scale.t)) == int(bits_of(rscale)), f"{bits} bits: scale"
            for g, name in ((codes, "codes"), (sign, "sign"), (scale, "scale")):
                g.check(name)


@pytest.mark.parametrize("n", SIZES)
def test_dequantize(emu, n):
    for bits in ALL_BITS:
        codes, sign = random_codes_signs(n, bits)
        scale = torch.tensor(0.7310585975646973)
        out = Guarded(n, torch.float32)
        emu.dequantize(codes, sign.view(torch.int32), bits, scale, out.t)
        want = R.dequantize(codes, sign, scale, bits)
        assert torch.equal(bits_of(out.t), bits_of(want)), f"{bits} bits"
        out.check("out")


@pytest.mark.parametrize("n", SIZES)
def test_dequantize_backward(emu, n):
    for bits in ALL_BITS:
        codes, sign = random_codes_signs(n, bits, seed=1)
        grad = torch.randn(n, generator=torch.Generator().manual_seed(n + bits))
        out = Guarded(1, torch.float32)
        ws = _stale(emu.bitplane_workspace())
        emu.dequantize_backward(grad, codes, sign.view(torch.int32), bits, out.t, ws)
        want = R.dequantize_backward(grad, codes, sign, bits)
        assert torch.allclose(out.t[0], want, rtol=1e-6, atol=1e-30), f"{bits} bits: {float(out.t[0])} != {float(want)}"
        assert int(ws[0]) == 0, "the ticket is not reset"
        out.check("out")


def test_dequantize_backward_is_deterministic_whatever_the_block_order(emu):
    """The blocks' float64 sums are added in slot order by whichever block arrives last."""
    n, bits = 70001, 5
    codes, sign = random_codes_signs(n, bits, seed=2)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(3)) * torch.logspace(-6, 6, n)
    results = set()
    for seed in (0, 1, 2, 3):
        emu.block_order(seed)
        emu.warp_order(seed)
        out = torch.empty(1)
        emu.dequantize_backward(grad, codes, sign.view(torch.int32), bits, out, _stale(emu.bitplane_workspace()))
        results.add(int(bits_of(out)[0]))
    assert len(results) == 1, "the scale gradient depends on the order the blocks finish in"


@pytest.mark.parametrize("sms", [1, 3])
@pytest.mark.parametrize("n", SIZES)
def test_plane_popcounts(emu, n, sms):
    emu.sm_count(sms)
    for bits in ALL_BITS:
        codes, _ = random_codes_signs(n, bits, seed=4)
        out = Guarded(bits, torch.int64)
        ws = _stale(emu.bitplane_workspace())
        emu.block_order(bits)  # blocks and warps in a shuffled order, another per width
        emu.warp_order(bits)
        emu.plane_popcounts(codes, bits, out.t, ws)
        assert torch.equal(out.t, R.plane_popcounts(codes, bits)), f"{bits} bits"
        assert int(ws[0]) == 0, "the ticket is not reset"
        out.check("popcounts")


def test_plane_popcounts_sum_more_slots_than_a_warp(emu):
    """5 SMs: a grid of 40 blocks, so the last block's sum of each plane's slots spans two
    warps; with the warps in shuffled orders, one that runs ahead into the next plane's sum
    must wait until the block's shared slots of this plane are read (the barrier between
    planes)."""
    emu.sm_count(5)
    n = 70001
    for bits in (2, 5, 8):  # more than one plane
        codes, _ = random_codes_signs(n, bits, seed=5)
        out = Guarded(bits, torch.int64)
        emu.warp_order(bits)
        emu.plane_popcounts(codes, bits, out.t, _stale(emu.bitplane_workspace()))
        assert torch.equal(out.t, R.plane_popcounts(codes, bits)), f"{bits} bits"
        out.check("popcounts")


def _step(emu, state, scale, grad, coef, bits, lr, momentum, key, key_tensor=None, ws=None):
    """One emulated step on ``state`` (codes, sign, mom, gs), in place; returns out (g_s, the
    previous gs)."""
    codes, sign, mom, gs = state
    out = Guarded(2, torch.float32)
    emu.bitplane_step(codes, sign.view(torch.int32), mom, gs, grad, coef, scale, bits, lr, momentum,
                      0 if key_tensor is not None else key, key_tensor, out.t,
                      _stale(emu.bitplane_workspace()) if ws is None else ws)
    out.check("out")
    return out.t


@pytest.mark.parametrize("lr, momentum", [(0.05, 0.9), (0.5, 0.9), (2.0, 0.0)])
@pytest.mark.parametrize("n", STEP_SIZES)
def test_step_follows_the_reference_trajectory(emu, n, lr, momentum):
    """Five steps from a fresh layer: the state and g_s bit for bit after every step, and
    out[1] the previous step's g_s (what pass 2 read)."""
    for bits in ALL_BITS:
        traj = reference_run(n, bits, lr, momentum)
        codes, sign, scale = R.binarize(weights(n, bits), bits)
        c0 = codes.clone()
        state = [codes, sign, torch.zeros(bits, n, dtype=torch.uint8), torch.zeros(1)]
        for t, (grad, coef, key, want, want_gs) in enumerate(traj):
            prev = state[3].clone()
            out = _step(emu, state, scale, grad, coef, bits, lr, momentum, key)
            where = f"n={n} bits={bits} lr={lr} step {t}"
            assert int(bits_of(out)[0]) == int(bits_of(want_gs)), f"{where}: g_s {float(out[0])} != {float(want_gs)}"
            assert int(bits_of(out)[1]) == int(bits_of(prev)[0]), f"{where}: out[1] is not the previous gs"
            assert_state_equal(state, want, where)
        if n >= 1000 and lr >= 0.5:  # the trajectory really moves
            assert int(state[2].count_nonzero()) > 0 and (state[0] != c0).any()


@pytest.mark.parametrize("sms, order", [(1, 0), (2, 5), (5, 9)])
def test_step_from_a_mid_round_state_any_grid_and_block_order(emu, sms, order):
    """Momentum of every code kind, several grid sizes, block and warp orders: the same bits
    as the reference (a max is exact, so g_s cannot depend on the order either)."""
    emu.sm_count(sms)
    emu.block_order(order)
    emu.warp_order(order)
    n = 70001
    for bits in (1, 4, 8):
        state = mid_round_state(n, bits, seed=bits)
        ref = [t.clone() for t in state]
        g = torch.Generator().manual_seed(bits)
        grad = torch.randn(n, generator=g) * 0.05
        coef = torch.rand(bits, generator=g) * 1e-3
        scale = torch.tensor(0.4)
        key = R.step_key(7, 3, bits)
        want = R.bitplane_step(*ref, grad, coef, scale, bits, 0.3, 0.9, key)
        out = _step(emu, state, scale, grad, coef, bits, 0.3, 0.9, key)
        assert int(bits_of(out)[0]) == int(bits_of(want))
        assert_state_equal(state, ref, f"{bits} bits, {sms} SMs, order {order}")


def test_step_device_key_takes_the_low_32_bits(emu):
    """A key on the device (an int64) gives the int key's draws: its low 32 bits, loaded by
    the update kernel."""
    n, bits = 4097, 3
    key = R.step_key(11, 2, 1)
    base = mid_round_state(n, bits, seed=3)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(5)) * 0.2
    coef, scale = torch.zeros(bits), torch.tensor(1.0)
    a = [t.clone() for t in base]
    _step(emu, a, scale, grad, coef, bits, 0.8, 0.5, key)
    b = [t.clone() for t in base]
    _step(emu, b, scale, grad, coef, bits, 0.8, 0.5, None, key_tensor=torch.tensor([key + (5 << 32)]))
    assert_state_equal(b, a, "device key")
    c = [t.clone() for t in base]
    _step(emu, c, scale, grad, coef, bits, 0.8, 0.5, key ^ 1)
    assert not torch.equal(c[0], a[0]) or not torch.equal(c[2], a[2]), "another key draws the same numbers"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_step_non_finite_is_skipped(emu, bad):
    n, bits = 1000, 4
    state = mid_round_state(n, bits, seed=6)
    before = [t.clone() for t in state]
    grad = torch.randn(n)
    grad[517] = bad
    out = _step(emu, state, torch.tensor(0.5), grad, torch.zeros(bits), bits, 0.1, 0.9, 9)
    assert not torch.isfinite(out[0])
    assert int(bits_of(out)[1]) == int(bits_of(before[3])[0])
    assert_state_equal(state, before, f"grad {bad}")


def test_step_lr_overflow_is_skipped(emu):
    """g_s finite but lr * g_s past float32: status +inf, nothing written."""
    n, bits = 100, 2
    state = mid_round_state(n, bits, seed=7)
    before = [t.clone() for t in state]
    grad = torch.full((n,), 1e30)
    out = _step(emu, state, torch.tensor(1e3), grad, torch.zeros(bits), bits, 1e20, 0.0, 9)
    assert float(out[0]) == float("inf")
    assert_state_equal(state, before, "lr overflow")


def test_step_zero_g_s_zeroes_momentum_only(emu):
    """Every d is 0 (no gradient, no coefficient, previous gs 0 under nonzero momentum
    codes): mom <- 0 and gs <- 0, codes and signs unchanged."""
    n, bits = 4097, 6
    state = mid_round_state(n, bits, seed=8)
    state[3].zero_()
    codes, sign = state[0].clone(), state[1].clone()
    out = _step(emu, state, torch.tensor(0.5), torch.zeros(n), torch.zeros(bits), bits, 0.1, 0.9, 9)
    assert float(out[0]) == 0.0
    assert torch.equal(state[0], codes) and torch.equal(state[1], sign)
    assert int(state[2].count_nonzero()) == 0 and float(state[3]) == 0.0


def test_step_writes_nothing_outside_its_buffers(emu):
    """codes, the sign words and mom with canaries around them: the last, partial sign word
    gets zeros past n and the words after it are untouched."""
    n, bits = 1000 + 7, 3
    base = mid_round_state(n, bits, seed=9)
    codes, sign, mom = Guarded(n, torch.uint8), Guarded(words(n), torch.int32), Guarded(bits * n, torch.uint8)
    codes.t.copy_(base[0])
    sign.t.copy_(base[1].view(torch.int32))
    mom.t.copy_(base[2].reshape(-1))
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1))
    ref = [t.clone() for t in base]
    want = R.bitplane_step(*ref, grad, torch.zeros(bits), torch.tensor(0.9), bits, 0.7, 0.9, 17)
    state = [codes.t, sign.t.view(torch.uint8), mom.t.view(bits, n), base[3]]
    out = _step(emu, state, torch.tensor(0.9), grad, torch.zeros(bits), bits, 0.7, 0.9, 17)
    assert int(bits_of(out)[0]) == int(bits_of(want))
    assert_state_equal(state, ref, "guarded")
    assert int(sign.t[-1]) >> (n % 32) == 0, "bits past n in the last sign word"
    for g, name in ((codes, "codes"), (sign, "sign"), (mom, "mom")):
        g.check(name)


@pytest.mark.parametrize("case", EDGE_STEPS, ids=[c.name for c in EDGE_STEPS])
def test_step_edge_cases(emu, case):
    """The boundaries of steps 3-4 the random trajectories never reach (helpers.EDGE_STEPS:
    the log2 rounding at sqrt(2), x >= 2^-100 to count, u < p strictly, the MSB plane's
    d = 0, requantization half to even): the state and g_s as the reference's, and the
    hand-worked oracle of each case."""
    for (key, j), u in EDGE_DRAWS.items():
        assert float(R.uniform(key, 256)[j]) == u
    state = case.state()
    ref = [t.clone() for t in state]
    grad, coef, scale, bits, lr, momentum, key = case.args()
    want = R.bitplane_step(*ref, grad, coef, scale, bits, lr, momentum, key)
    out = _step(emu, state, scale, grad, coef, bits, lr, momentum, key)
    assert float(want) == case.g_s and int(bits_of(out)[0]) == int(bits_of(want))
    assert_state_equal(state, ref, case.name)
    case.check(state)


def test_errors_and_empty_inputs(emu):
    codes = torch.zeros(40, dtype=torch.uint8)
    sign = torch.zeros(2, dtype=torch.int32)
    ws = emu.bitplane_workspace()
    with pytest.raises(ValueError, match="bits must be in 1..8, got 9"):
        emu.plane_popcounts(codes, 9, torch.empty(9, dtype=torch.int64), ws)
    with pytest.raises(ValueError, match="bits must be in 1..8, got 0"):
        emu.dequantize(codes, sign, 0, torch.tensor(1.0), torch.empty(40))
    with pytest.raises(ValueError, match="bits must be in 1..8, got 9"):
        emu.binarize(torch.zeros(40), 9, codes, sign, torch.empty(1), ws)
    with pytest.raises(ValueError, match="on cuda:2"):
        emu.dequantize_backward(torch.zeros(40), codes, sign, 3, torch.empty(1), ws, device=2)
    out = Guarded(0, torch.float32)
    emu.dequantize(torch.empty(0, dtype=torch.uint8), sign, 4, torch.tensor(1.0), out.t)  # n == 0: nothing launched
    out.check("out")
    gs = torch.tensor([3.0])
    o = Guarded(2, torch.float32)
    emu.bitplane_step(torch.empty(0, dtype=torch.uint8), sign, torch.empty(0, dtype=torch.uint8), gs, torch.empty(0),
                      torch.zeros(4), torch.tensor(1.0), 4, 0.1, 0.9, 1, None, o.t, ws)
    o.check("out")  # nothing written: the adapter returns the empty layer's 0 itself
    assert float(gs) == 3.0
