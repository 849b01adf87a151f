"""Channels-last inputs through the public functions, on every backend: ``relu6_fake_quant``
and ``fake_quant`` compute a 4-d channels_last (5-d channels_last_3d) tensor in its memory
order, without the copy ``.contiguous()`` would make, and return their output in its layout.
Checked on the same values laid out contiguously, bit for bit, through the same backend and
against the pure-torch reference (fedmpq_kernels.fake_quant.reference): the outputs, the
gradients (arriving channels-last, contiguous, or under create_graph), the forward without
gradient; the outputs are tensors of their own to autograd (an in-place op on them is
allowed) and the registered ops keep their contiguous outputs."""
from __future__ import annotations

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels.fake_quant import reference as R

from .helpers import exact_scale_grad, same_bits

FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
# odd sizes: 2*3*5*7 = 210 elements (6 whole 32-element words and a tail), 1 element, empty
SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (0, 3, 4, 4), (2, 3, 3, 2, 5), (3, 2, 1, 4, 3)]


def _pair(shape, dtype, seed=0):
    """(x channels-last, the same values contiguous), both leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    v = (torch.randn(shape, generator=g) * 4 + 1).to(dtype)
    fmt = FORMATS[len(shape)]
    x = v.contiguous(memory_format=fmt).requires_grad_()
    return x, v.clone().requires_grad_(), fmt


def _dtypes(backend):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if not backend.interpreted
                                             else [])  # the Triton interpreter has no bfloat16


def _check_layout(y, x, fmt):
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.numel() > 1 and not x.is_contiguous():
        assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous(), "the output lost x's layout"
    assert not y._is_view(), "the output is a view: an in-place op on it would be refused"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_relu6_fake_quant(backend, shape):
    backend.op("fake_quant", "relu6_fake_quant")
    dev = backend.device
    for dtype in _dtypes(backend):
        x, xr, fmt = _pair(shape, dtype)
        x, xr = (x.detach().to(dev).requires_grad_(), xr.detach().to(dev).requires_grad_())
        assert x.is_contiguous(memory_format=fmt)
        gy = (torch.randn(shape) * 3).to(dtype).to(dev)
        with backend.active():
            for bits in (1, 4, 8):
                y, yr = fk.relu6_fake_quant(x, bits), fk.relu6_fake_quant(xr, bits)
                _check_layout(y, x, fmt)
                same_bits(y, yr, f"y, {bits} bits, {dtype}")
                ry, rmask = R.relu6_fake_quant(xr.detach().cpu(), bits)
                same_bits(y.detach().cpu(), ry, f"y against the reference, {bits} bits, {dtype}")
                for g in (gy, gy.contiguous(memory_format=fmt)):  # the gradient in either layout
                    gx, = torch.autograd.grad(y, x, g, retain_graph=True)
                    gxr, = torch.autograd.grad(yr, xr, g, retain_graph=True)
                    same_bits(gx, gxr, f"grad, {bits} bits, {dtype}")
                    same_bits(gx.cpu(), R.fake_quant_backward(g.cpu().contiguous(), rmask, False)[0],
                              f"grad against the reference, {bits} bits, {dtype}")
                with torch.no_grad():
                    y0 = fk.relu6_fake_quant(x, bits)
                _check_layout(y0, x, fmt)
                same_bits(y0, yr, f"no-grad y, {bits} bits, {dtype}")
            y = fk.relu6_fake_quant(x, 4)
            y.mul_(2)  # allowed: the output is no view of the Function's
            gx, = torch.autograd.grad(y, x, gy)
            gxr, = torch.autograd.grad(fk.relu6_fake_quant(xr, 4) * 2, xr, gy)
            same_bits(gx, gxr, "grad through an in-place op")


@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[3:4], ids=lambda s: "x".join(map(str, s)))
def test_fake_quant_every_mode(backend, shape):
    backend.op("fake_quant", "fake_quant")
    dev = backend.device
    gy = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 3).to(dev)
    for scale in (None, 2.0):
        for ste in ("identity", "clipped"):
            x, xr, fmt = _pair(shape, torch.float32, seed=1)
            x, xr = x.detach().to(dev).requires_grad_(), xr.detach().to(dev).requires_grad_()
            s = sr = scale
            if scale is not None:
                s = torch.tensor(scale, device=dev, requires_grad=True)
                sr = torch.tensor(scale, device=dev, requires_grad=True)
            with backend.active():
                y, yr = fk.fake_quant(x, 3, s, ste=ste), fk.fake_quant(xr, 3, sr, ste=ste)
                _check_layout(y, x, fmt)
                same_bits(y, yr, f"y, scale {scale}, {ste}")
                y.backward(gy.contiguous(memory_format=fmt))
                yr.backward(gy)
                with torch.no_grad():
                    y0 = fk.fake_quant(x, 3, scale)
            same_bits(x.grad, xr.grad, f"grad, scale {scale}, {ste}")
            # the reference: its values, and its autograd rule's gradients (its y adds x - x, which
            # makes a -0.0 +0.0: the values come from fake_quant_values)
            xo = xr.detach().cpu().clone().requires_grad_()
            so = None if scale is None else torch.tensor(scale, requires_grad=True)
            R.fake_quant_autograd(xo, 3, so, ste=ste).backward(gy.cpu())
            ry = R.fake_quant_values(xo.detach(), 3, None if so is None else so.detach())
            same_bits(y.detach().cpu(), ry, f"y against the reference, scale {scale}, {ste}")
            same_bits(x.grad.cpu(), xo.grad, f"grad against the reference, scale {scale}, {ste}")
            if scale is not None and ste == "clipped":
                # summed in memory order against logical order: the same terms, float64
                assert float(s.grad) == pytest.approx(float(sr.grad), rel=1e-6, abs=1e-6)
                # and the oracle's rule (+g where x > s, -g where x < -s) summed in float64, as
                # the kernels sum it (the reference backend's autograd sums in float32, in an
                # order of its own: 1.5e-6 off in one CI run)
                if backend.name != "reference":
                    want_gs = exact_scale_grad(xo.detach(), so.detach(), gy)
                    assert float(s.grad) == pytest.approx(want_gs, rel=1e-6, abs=1e-6)
                assert float(sr.grad) != 0.0  # the case clips something
            _check_layout(y0, x, fmt)
            same_bits(y0, yr, f"no-grad y, scale {scale}")


@pytest.mark.parametrize("op", ["relu6", "clipped"])
def test_create_graph_stays_differentiable(backend, op):
    """Under create_graph the pure-torch rule runs on the bitmaps made in memory order: its
    gradient equals the contiguous input's, and is itself differentiable in the incoming one."""
    backend.op("fake_quant", "fake_quant")
    dev = backend.device
    x, xr, fmt = _pair((2, 3, 5, 7), torch.float32, seed=2)
    x, xr = x.detach().to(dev).requires_grad_(), xr.detach().to(dev).requires_grad_()
    g = (torch.randn(2, 3, 5, 7) * 3).to(dev).requires_grad_()
    with backend.active():
        f = (lambda t: fk.relu6_fake_quant(t, 4)) if op == "relu6" else (lambda t: fk.fake_quant(t, 4, 2.5, ste="clipped"))
        gx, = torch.autograd.grad(f(x), x, g, create_graph=True)
        gxr, = torch.autograd.grad(f(xr), xr, g, create_graph=True)
    same_bits(gx, gxr, "grad under create_graph")
    assert gx.requires_grad
    gg, = torch.autograd.grad(gx.sum(), g)
    ggr, = torch.autograd.grad(gxr.sum(), g)
    assert torch.equal(gg, ggr)  # the pass mask itself, as 0/1
    assert 0 < int(gg.sum()) < gg.numel()


def test_the_registered_ops_stay_contiguous(backend):
    backend.op("fake_quant", "relu6_fake_quant")
    x, xr, _ = _pair((2, 3, 5, 7), torch.float32)
    x, xr = x.detach().to(backend.device), xr.detach().to(backend.device)
    with backend.active():
        y, mask = torch.ops.fedmpq.relu6_fake_quant(x, 4)
        yr, maskr = torch.ops.fedmpq.relu6_fake_quant(xr, 4)
        z, bitmaps = torch.ops.fedmpq.fake_quant(x, 4, torch.tensor(2.0, device=backend.device), 2)
        zr, bitmapsr = torch.ops.fedmpq.fake_quant(xr, 4, torch.tensor(2.0, device=backend.device), 2)
    assert y.is_contiguous() and z.is_contiguous()
    same_bits(y, yr, "op y")
    same_bits(z, zr, "op fake_quant y")
    assert torch.equal(mask, maskr) and torch.equal(bitmaps, bitmapsr)  # in logical order, as documented


def test_other_strides_still_give_contiguous_outputs(backend):
    """A transposed (not channels-last) input is made contiguous first, as before."""
    backend.op("fake_quant", "relu6_fake_quant")
    v = torch.randn(2, 3, 5, 7).to(backend.device) * 4
    x = v.transpose(2, 3)  # neither contiguous nor channels-last
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    with backend.active():
        y = fk.relu6_fake_quant(x, 4)
        with torch.no_grad():
            z = fk.fake_quant(x, 4)
        # the same backend on the values made contiguous
        same_bits(y, fk.relu6_fake_quant(x.contiguous(), 4), "transposed relu6")
        same_bits(z, fk.fake_quant(x.contiguous(), 4), "transposed fake_quant")
    assert y.is_contiguous() and z.is_contiguous()
    # and the reference (the oracle was the default backend's, computed outside active())
    same_bits(y.cpu(), R.relu6_fake_quant(x.cpu(), 4)[0], "transposed relu6 against the reference")
    same_bits(z.cpu(), R.fake_quant_values(x.cpu(), 4, None), "transposed fake_quant against the reference")
