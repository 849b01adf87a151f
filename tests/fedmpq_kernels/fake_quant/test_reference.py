"""The oracle itself, against hand-computed values and a NumPy float32 statement of the
same math (so it cannot drift with the kernels)."""
import numpy as np
import pytest
import torch

from fedmpq_kernels.fake_quant import reference as R


def test_hand_computed_two_bit_values_round_half_to_even():
    # bits=2: L=3; S=3 gives inv=1, step=1, so y = round(min(|x|,3)) with sign
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 3.7, -0.49, 1.0])
    y = R.fake_quant_values(x, 2, torch.tensor(3.0))
    assert y.tolist() == [0.0, 2.0, 2.0, -2.0, 3.0, -0.0, 1.0]


def test_hand_computed_dynamic_scale():
    # S = max|x| = 2, bits=1: L=1, y = 2*round(|x|/2)*sign(x); 1.0/2 = 0.5 rounds to 0
    x = torch.tensor([2.0, -1.0, 1.2, -2.0, 0.9])
    assert R.fake_quant_values(x, 1, None).tolist() == [2.0, -0.0, 2.0, -2.0, 0.0]
    # all-zero input: S = 0 gives zeros, not NaN
    assert R.fake_quant_values(torch.zeros(5), 4, None).tolist() == [0.0] * 5


def test_sixteen_bits_is_nearly_lossless():
    x = torch.linspace(-1, 1, 1001)
    y = R.fake_quant_values(x, 16, None)
    assert (y - x).abs().max().item() <= 0.5 / 65535 + 1e-7


def test_reference_backward_hand_case():
    x = torch.tensor([-3.0, -1.0, 0.0, 2.0, 0.5])
    _, b = R.fake_quant(x, 4, torch.tensor(1.0), 2)
    # two 4-byte bitmaps, element i at bit i: pass = -1, 0, 0.5 (bits 1, 2, 4); hi = 2 (bit 3)
    assert b.tolist() == [0b10110, 0, 0, 0, 0b01000, 0, 0, 0]
    g = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    gx, gs = R.fake_quant_backward(g, b, True)
    assert gx.tolist() == [0.0, 2.0, 4.0, 0.0, 16.0]
    assert gs.item() == 8.0 - 1.0


def _numpy_quantize(a: np.ndarray, sign_of: np.ndarray, bits: int, S: np.float32) -> np.ndarray:
    """The quantizer in NumPy float32, written from ALGORITHM.md: every operand float32."""
    L = np.float32((1 << bits) - 1)
    inv = L / S if S > 0 else np.float32(0)
    step = S / L
    q = np.rint(np.minimum(a, S) * inv)  # round half to even
    return np.copysign(q * step, sign_of)


def _numpy_bitmap(mask: np.ndarray) -> torch.Tensor:
    """Bit i of little-endian word i // 32 = mask[i], 4 * ceil(n / 32) bytes."""
    nb = 4 * ((mask.size + 31) // 32)
    out = np.zeros(nb, dtype=np.uint8)
    packed = np.packbits(mask.astype(np.uint8), bitorder="little")
    out[:packed.size] = packed
    return torch.from_numpy(out)


@pytest.mark.parametrize("given", [False, True], ids=["dynamic", "given"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_reference_matches_a_numpy_float32_oracle_at_every_width(bits, given):
    """The reference had hand cases at 1, 2 and 16 bits only, and every backend is held to
    it bit for bit: a width-specific slip in its order (L, inv, step) would pass everywhere.
    Values, pass and hi bitmaps at every width, with the clipping edges and signed zeros."""
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal(1031) * 2).astype(np.float32)
    S = np.float32(1.3) if given else np.abs(x).max()
    x[:8] = [0.0, -0.0, S, -S, np.nextafter(S, np.float32(9)), -np.nextafter(S, np.float32(9)), 2 * S, -2 * S]
    if not given:
        S = np.abs(x).max()
    y = _numpy_quantize(np.abs(x), x, bits, S)
    ry, rb = R.fake_quant(torch.from_numpy(x.copy()), bits, torch.tensor(S) if given else None, 2)
    assert torch.equal(ry.view(torch.int32), torch.from_numpy(y.view(np.int32)))
    nb = rb.numel() // 2
    assert torch.equal(rb[:nb], _numpy_bitmap(~((x > S) | (x < -S))))
    assert torch.equal(rb[nb:], _numpy_bitmap(x > S))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_relu6_reference_matches_a_numpy_float32_oracle_at_every_width(bits):
    """relu6_fake_quant's reference at every width (its hand case was at 2 bits): a =
    min(max(x, 0), 6) with +0 at and below zero, S = max a, the mask 0 < x < 6."""
    rng = np.random.default_rng(100 + bits)
    x = (rng.standard_normal(1031) * 4).astype(np.float32)
    x[:6] = [0.0, -0.0, 6.0, -6.0, 7.5, np.float32(5.999)]
    a = np.where(x > 0, np.minimum(x, np.float32(6)), np.float32(0)).astype(np.float32)
    y = _numpy_quantize(a, np.ones_like(a), bits, a.max())
    ry, rm = R.relu6_fake_quant(torch.from_numpy(x.copy()), bits)
    assert torch.equal(ry.view(torch.int32), torch.from_numpy(y.view(np.int32)))
    assert torch.equal(rm, _numpy_bitmap((x > 0) & (x < 6)))
