"""The CUDA backend's adapters (fedmpq_kernels/fake_quant/cuda.py) without a GPU: CPU
tensors, with the CUDA kernels compiled for the host (tests/cuda_emu) standing in for
``_C.cuda`` (tests/cuda_emu/launchers.py). This checks what the adapters add to the kernels
(argument order, the bitmaps' layout, a given scale's conversion, strided inputs and slices,
the zero written for dL/dS without a hi bitmap) against the reference; the kernels themselves
are test_cuda_emulated.py's. relu6_fake_quant's CUDA path has not run on a GPU yet: this is
its adapter's only test until one does."""
from __future__ import annotations

import pytest
import torch

from fedmpq_kernels.fake_quant import reference as R
from tests.cuda_emu.launchers import wire

from .helpers import DT_IDS, DTYPES, same_bits

SIZES = [1, 33, 4099]


@pytest.fixture
def fc(emu, monkeypatch):
    """fedmpq_kernels.fake_quant.cuda wired to the emulated kernels (``fc.native.cuda.calls``
    lists the launcher calls)."""
    from fedmpq_kernels.fake_quant import cuda as fc

    wire(fc, emu, monkeypatch)
    return fc


def _input(n: int, dtype, kind: str) -> torch.Tensor:
    """x of n elements: contiguous, a slice one element in (the kernels' shifted path), or
    strided (the adapter makes it contiguous)."""
    v = (torch.randn(n + 1, generator=torch.Generator().manual_seed(n)) * 4).to(dtype)
    if kind == "slice":
        return v[1:]
    if kind == "strided":
        return torch.stack([v[:n], v[:n]], 1)[:, 0]
    return v[:n].clone()


@pytest.mark.parametrize("kind", ["contiguous", "slice", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n", SIZES)
def test_fake_quant_and_its_backward(fc, n, dtype, kind):
    x = _input(n, dtype, kind)
    g = _input(n, dtype, "contiguous").flip(0)
    for bits, scale in ((4, None), (8, torch.tensor(1.5, dtype=torch.float64)), (2, torch.tensor([0.7]))):
        for mode in (0, 1, 2):
            y, bm = fc.fake_quant(x, bits, scale, mode)
            ry, rb = R.fake_quant(x, bits, None if scale is None else scale.reshape(()).float(), mode)
            same_bits(y, ry, f"y, {bits} bits, mode {mode}")
            assert torch.equal(bm, rb), f"bitmaps, {bits} bits, mode {mode}"
        _, bm = fc.fake_quant(x, bits, scale, 2)
        for scale_grad in (False, True):
            gx, gs = fc.fake_quant_backward(g, bm, scale_grad)
            rgx, rgs = R.fake_quant_backward(g, bm, scale_grad)
            same_bits(gx, rgx, f"grad_x, {bits} bits")
            assert gs.shape == () and gs.dtype == torch.float32
            assert float(gs) == pytest.approx(float(rgs), rel=1e-5, abs=1e-3), f"dL/dS, {bits} bits"
            if not scale_grad:
                assert float(gs) == 0.0  # written by the kernel (no zero fill)


@pytest.mark.parametrize("kind", ["contiguous", "slice", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n", SIZES)
def test_relu6_fake_quant(fc, n, dtype, kind):
    x = _input(n, dtype, kind)
    for bits in (1, 4, 8):
        y, mask = fc.relu6_fake_quant(x, bits)
        ry, rm = R.relu6_fake_quant(x, bits)
        same_bits(y, ry, f"y, {bits} bits")
        assert torch.equal(mask, rm), f"mask, {bits} bits"
        same_bits(fc.relu6_fake_quant_values(x, bits), ry, f"values form, {bits} bits")  # no mask
    assert fc.native.cuda.calls.count("relu6_fake_quant") == 6


def test_empty_inputs_launch_nothing(fc):
    e = torch.empty(0)
    y, bm = fc.fake_quant(e, 4, None, 2)
    assert y.shape == (0,) and bm.shape == (0,)
    y, mask = fc.relu6_fake_quant(e, 4)
    assert y.shape == (0,) and mask.shape == (0,)
    assert fc.relu6_fake_quant_values(e, 4).shape == (0,)
    gx, gs = fc.fake_quant_backward(e, torch.empty(0, dtype=torch.uint8), True)
    assert gx.shape == (0,) and float(gs) == 0.0
    assert fc.native.cuda.calls == []


def test_a_bad_scale_shape_is_refused(fc):
    with pytest.raises(ValueError, match="scale must hold one value, got shape \\(2,\\)"):
        fc.fake_quant(torch.randn(8), 4, torch.ones(2), 1)
    # no value at all is as wrong as two (not a reshape error)
    with pytest.raises(ValueError, match="scale must hold one value, got shape \\(0,\\)"):
        fc.fake_quant(torch.randn(8), 4, torch.ones(0), 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_backward_without_scale_grad_reads_only_the_pass_bitmap(fc, dtype):
    """Without scale_grad the backward needs no hi bitmap: a mode-1 forward's bitmaps, and
    relu6_fake_quant's mask (ops.py's ReLU6 backward passes it alone), are the whole input."""
    n = 100
    x, g = _input(n, dtype, "contiguous"), _input(n, dtype, "slice")
    _, pass_only = fc.fake_quant(x, 4, torch.tensor(1.0), 1)
    _, mask = fc.relu6_fake_quant(x, 4)
    for bm in (pass_only, mask):
        assert bm.numel() == 4 * ((n + 31) // 32)
        gx, gs = fc.fake_quant_backward(g, bm, False)
        rgx, _ = R.fake_quant_backward(g, bm, False)
        same_bits(gx, rgx, "grad_x")
        assert float(gs) == 0.0


def test_a_dynamic_scale_of_zero_is_not_refused(fc):
    """The dynamic S (absmax's, on the device) goes to the quantizer as computed, not as a
    given scale: for an all-zero x it is 0, and y is x's zeros, not the NaN a given 0 makes."""
    x = torch.zeros(100)
    x[::2] = -0.0
    y, bm = fc.fake_quant(x, 4, None, 2)
    ry, rb = R.fake_quant(x, 4, None, 2)
    same_bits(y, x, "y")
    same_bits(y, ry, "y")
    assert torch.equal(bm, rb)
