"""Helpers the bit-plane tests share: sizes, random layers from the reference, bit-exact
comparisons, and the reference's cached step trajectory."""
from __future__ import annotations

import functools

import torch

from fedmpq_kernels.bitplane import reference as R
from fedmpq_kernels.pack.reference import pack_bitmap

ALL_BITS = range(1, 9)
SIZES = [0, 1, 7, 31, 33, 1000, 4097]
BIG = 300_001
STEPS = 5


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


def step_args(**over) -> dict:
    """Valid keyword arguments of ``fk.bitplane_step`` for a 40-weight 3-bit layer (zero
    codes, gradient and momentum; key 5), with ``over`` replacing any of them: the base of
    the argument-check tests."""
    n, bits = 40, 3
    a = dict(codes=torch.zeros(n, dtype=torch.uint8), sign=torch.zeros(8, dtype=torch.uint8),
             mom=torch.zeros(bits, n, dtype=torch.uint8), gs=torch.zeros(1), grad=torch.zeros(n), coef=torch.zeros(bits),
             scale=torch.tensor(1.0), bits=bits, lr=0.1, momentum=0.9, key=5)
    a.update(over)
    return a


def random_codes_signs(n: int, bits: int, seed: int = 0):
    """Random codes (zeros included) and a random sign bitmap, so that some zero codes carry
    the sign bit (dequantize must give -0.0 there, as the reference)."""
    g = torch.Generator().manual_seed(seed * 7919 + n * 13 + bits)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
    neg = torch.rand(n, generator=g) < 0.5
    return codes, pack_bitmap(neg)


def mid_round_state(n: int, bits: int, seed: int):
    """A mid-round state: random codes and signs, random momentum codes of every kind, a
    positive previous g_s."""
    g = torch.Generator().manual_seed(seed)
    codes, sign = random_codes_signs(n, bits, seed)
    det = torch.randint(-1, 2, (bits, n), generator=g, dtype=torch.int32) * (
        1 << torch.randint(0, bits + 1, (bits, n), generator=g, dtype=torch.int32))
    stoch = torch.zeros_like(det)
    stoch[bits - 1] = torch.randint(-1, 2, (n,), generator=g, dtype=torch.int32)
    mom = R.encode_r(det, stoch)
    return [codes, sign, mom, torch.tensor([0.0123])]


def _f32(pattern: int) -> float:
    return torch.tensor([pattern], dtype=torch.int32).view(torch.float32).item()


class EdgeStep:
    """One hand-set step at an edge of the step's rule (ALGORITHM.md, steps 3-4) that random
    trajectories never reach: its state (codes given, positive signs, no momentum, gs 0), its
    arguments, the g_s it must return, and ``check(state)``, an oracle worked out by hand for
    the state after it (on top of the reference's state, which every test also compares)."""

    def __init__(self, name, codes, grad, coef, scale, bits, lr, momentum, key, g_s, check):
        self.name, self.codes, self.grad, self.coef, self.g_s = name, codes, grad, coef, g_s
        self.scale, self.bits, self.lr, self.momentum, self.key, self.check = scale, bits, lr, momentum, key, check

    def state(self):
        """(codes, sign, mom, gs), fresh CPU tensors."""
        n = self.codes.numel()
        return [self.codes.clone(), torch.zeros(R.bitmap_nbytes(n), dtype=torch.uint8),
                torch.zeros(self.bits, n, dtype=torch.uint8), torch.zeros(1)]

    def args(self):
        """The step's arguments after the state: grad, coef, scale, bits, lr, momentum, key."""
        return self.grad, self.coef, torch.tensor(self.scale), self.bits, self.lr, self.momentum, self.key


def _pow2_edge(name, key, xs, want_mom):
    """A 1-bit layer of zero codes, scale 1, lr 1, no momentum: d = grad and g_s = max|d| = 1
    (grad[0]), so x = |grad_j| and each hand-set element's power-of-two step is known."""
    n = 256
    grad = torch.zeros(n)
    grad[0] = 1.0
    for j, x in xs.items():
        grad[j] = x

    def check(state):
        assert {j: int(state[2][0, j]) for j in want_mom} == want_mom
    return EdgeStep(name, torch.zeros(n, dtype=torch.uint8), grad, torch.zeros(1), 1.0, 1, 1.0, 0.0, key, 1.0, check)


def _msb_d_zero():
    """The stochastic LSB steps +1 only when the MSB plane's d > 0: here d is 0 on the MSB
    plane (no gradient, its bit clear) and c_1 > 0 on the LSB plane (p = 1/2, g_s = 2^-10,
    x_1 = 3 * lr = 3/8), so each hit is -1 (momentum code 2)."""
    n, key = 256, 77

    def check(state):
        hit = R.uniform(key, n) < 0.5
        assert 0 < int(hit.sum()) < n
        assert torch.equal(state[2][1], torch.where(hit, 2, 0).to(torch.uint8))
        assert int(state[2][0].count_nonzero()) == 0
    return EdgeStep("msb-d-zero", torch.ones(n, dtype=torch.uint8), torch.zeros(n),
                    torch.tensor([0.0, 3 * 2.0 ** -10]), 1.0, 2, 0.125, 0.9, key, 2.0 ** -10, check)


def _half_to_even():
    """v = q - R * step exactly half-way between integers rounds to even, and -0.5 to -0.0,
    which keeps the sign (flip only when qn < 0). 3 bits, scale 7 (k = 1), lr 1/4, no
    momentum: grad 1.75 at element 0 gives g_s = 1; grad 1 elsewhere gives x = 1, 1/2, 1/4 on
    the planes, R = 16 + 2 (p = 1/4 on the LSB) and v = q - 4.5 where the draw misses."""
    n, key = 512, 12345
    codes = torch.arange(n, dtype=torch.int32).remainder(8).to(torch.uint8)
    grad = torch.ones(n)
    grad[0] = 1.75

    def check(state):
        miss = R.uniform(key, n) >= 0.25
        miss[0] = False
        # q - 4.5 for q = 0..7 rounds (half to even) to -4 -4 -2 -2 -0 0 2 2
        want_codes = torch.tensor([4, 4, 2, 2, 0, 0, 2, 2], dtype=torch.uint8)[codes.long()]
        assert torch.equal(state[0][miss], want_codes[miss])
        assert torch.equal(R.negative_mask(state[1], n)[miss], (codes < 4)[miss])
    return EdgeStep("half-to-even", codes, grad, torch.zeros(3), 7.0, 3, 0.25, 0.0, key, 1.0, check)


def _step_product():
    """v = q - R * (lr * g_s): lr * g_s is rounded first, then R times it. 2 bits, scale 3
    (k = 1), no momentum, one gradient G everywhere: d = (2G, G), g_s = 2G/3, x = (3 lr,
    3 lr / 2) ~ (1.5, 0.75) -> r = (+4, +1), R = 9 (p = 0). At this G and lr,
    9 * float32(lr * g_s) rounds to 1.5 exactly and v = q - 1.5 goes half to even; in the
    other order, (9 * lr) * g_s, it is 1.4999999 and every code comes out otherwise."""
    n = 67  # the vector loop and a tail
    codes = torch.arange(n, dtype=torch.int32).remainder(4).to(torch.uint8)

    def check(state):
        # q - 1.5 for q = 0..3: -1.5 -0.5 0.5 1.5 -> -2 -0 0 2
        assert torch.equal(state[0], torch.tensor([2, 0, 0, 2], dtype=torch.uint8)[codes.long()])
        assert torch.equal(R.negative_mask(state[1], n), codes == 0)
        assert state[2][:, 0].tolist() == [(2 + 1) << 3, (0 + 1) << 3]
    return EdgeStep("step-product", codes, torch.full((n,), 0.49988991022109985), torch.zeros(2), 3.0, 2,
                    0.5001101493835449, 0.0, 1, 0.3332599401473999, check)


# Keys 56011 and 164390 draw u_182 = 0 and u_61 = 1/2 exactly (found by search; the test
# asserts it, see EDGE_DRAWS).
EDGE_DRAWS = {(56011, 182): 0.0, (164390, 61): 0.5}
EDGE_STEPS = [
    # round(log2 x) from the float's bits: the float just below sqrt(2)/2 rounds down to 2^-1
    # (no deterministic step; p = 1/2 > u_1 = 0.23: stochastic +1, code 1), the float just
    # above it up to 2^0 (deterministic +1: code 1 << 3)
    _pow2_edge("sqrt2", 56011, {1: _f32(0x3F3504F3), 2: _f32(0x3F3504F4)}, {1: 1, 2: 8}),
    _pow2_edge("u-equals-p", 164390, {61: 0.5}, {61: 0}),  # p = 1/2 and u = 1/2: u < p is strict
    _pow2_edge("x-at-tiny", 56011, {182: 2.0 ** -100}, {182: 1}),  # x = 2^-100 counts: p > u = 0
    _pow2_edge("x-zero", 56011, {182: 0.0}, {182: 0}),  # x = 0 does not: p = 0, no step though u = 0
    _msb_d_zero(),
    _half_to_even(),
    _step_product(),
]
