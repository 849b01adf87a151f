"""The oracle itself, against hand-computed values (so it cannot drift with the kernels)."""
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
