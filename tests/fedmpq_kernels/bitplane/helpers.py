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
