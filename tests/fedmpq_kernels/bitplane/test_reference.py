"""The bit-plane oracle itself, against hand-computed values (so it cannot drift with the
kernels): binarize and popcounts, round(log2), the momentum codes, the generator."""
from __future__ import annotations

import numpy as np
import torch

from fedmpq_kernels.bitplane import reference as R

from .helpers import bits_of


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
    # the (seed, step) part is cached for ints: every combination, revisited after others
    # pushed it out, and NumPy ints (not cached), give the formula's key
    combos = [(s, t, l) for s in (0, 5, 2**40 + 3) for t in (0, 1, 2**32 - 1, 2**33 + 9) for l in (0, 19, 2**32 + 2)]
    for s, t, l in combos + combos[::-1]:
        want = mix32(mix32(mix32(s ^ 0x9E3779B9) ^ t) ^ l)
        assert R.step_key(s, t, l) == want and R.step_key(np.int64(s % 2**40), np.uint32(t % 2**32), l) == \
            mix32(mix32(mix32((s % 2**40) ^ 0x9E3779B9) ^ (t % 2**32)) ^ l)


def test_reference_step_hands_out_the_pre_clamp_value():
    """``pre`` (tools/unclamped_upload.py) is v = q - R*step before the sign fold and the
    saturation. The hand-computed case of test_step.py: q = 1, R = 72 (73 when the coin
    hits), step = lr * g_s = 8/225, so v = 1 - 72*8/225 = -1.56 (or 1 - 73*8/225), and the
    step folds it to sign 1, q = 2. Then a saturating step: v beyond L, codes at L."""
    lr = float(np.float32(1 / 15))
    for seed, r in ((0, 72), (2, 73)):
        codes, sign = torch.tensor([1], dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)
        mom, gs, pre = torch.zeros(4, 1, dtype=torch.uint8), torch.zeros(1), torch.full((1,), float("nan"))
        R.bitplane_step(codes, sign, mom, gs, torch.tensor([10.0]), torch.zeros(4), torch.tensor(1.5), 4, lr, 0.9,
                        R.step_key(seed, 0, 0), pre=pre)
        step = np.float32(lr) * np.float32(np.float32(8.0) / np.float32(15.0))
        assert abs(float(pre) - (1 - r * float(step))) < 1e-5 and codes.tolist() == [2] and sign[0] == 1
    # 8 bits, every code at 254 or 255 and a negative gradient: the codes grow past L = 255
    n, bits = 64, 8
    codes = torch.full((n,), 255, dtype=torch.uint8)
    codes[::2] = 254
    sign, mom, gs = torch.zeros(R.bitmap_nbytes(n), dtype=torch.uint8), torch.zeros(bits, n, dtype=torch.uint8), \
        torch.zeros(1)
    pre = torch.empty(n)
    before = codes.clone()
    R.bitplane_step(codes, sign, mom, gs, -torch.linspace(1, 2, n), torch.zeros(bits), torch.tensor(2.0), bits, 1.0,
                    0.9, 5, pre=pre)
    assert bool((pre > 255.5).any())
    assert torch.equal(codes, torch.round(pre).abs().clamp(max=255).to(torch.uint8))  # fold and saturate
    # a skipped step (g_s = 0: zero gradient, coefficients and momentum) hands out q itself
    mom.zero_()
    gs.zero_()
    R.bitplane_step(codes, sign, mom, gs, torch.zeros(n), torch.zeros(bits), torch.tensor(2.0), bits, 1.0, 0.9, 6,
                    pre=pre)
    assert torch.equal(pre, codes.float()) and not torch.equal(before, codes)
