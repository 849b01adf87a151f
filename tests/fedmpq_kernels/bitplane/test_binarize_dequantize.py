"""Every bit-plane backend against the pure-torch reference, bit for bit: binarize,
dequantize (+ the scale gradient) and plane popcounts, on odd and empty sizes, every
bit-width, any dtype, strided and misaligned inputs, and through autograd."""
from __future__ import annotations

import math

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels.bitplane import reference as R
from fedmpq_kernels.pack.reference import pack_bitmap

from tests.fedmpq_kernels.misaligned import misaligned
from tests.fedmpq_kernels.subnormals import subnormals_kept

from .helpers import ALL_BITS, BIG, SIZES, bits_of, kernels, layer, random_codes_signs, weights


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
        assert s.dtype == torch.uint8 and s.shape == (fk.bitmap_nbytes(numel),)
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
    """Zeros of both signs, ties and the top code, in a partial word and repeated over whole
    32-element words (the CPU's AVX2 kernel takes whole words, the portable code the rest)."""
    kernels(backend)
    dev = backend.device
    edge = torch.tensor([0.0, -0.0, 1e-30, -3.0, 3.0, 1.5, -1.4999999], device=dev)
    with backend.active():
        for w in (edge, edge.repeat(10)):
            for bits in (1, 4, 8):
                q, s, sc = fk.binarize(w, bits)
                rq, rs, rsc = R.binarize(w.cpu(), bits)
                assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and float(sc) == 3.0
                assert int(q[4]) == (1 << bits) - 1 and int(q[3]) == (1 << bits) - 1
        # s so small that L / s overflows to inf, in the backend's own function (the public
        # one lifts such a w first: test_binarize_lifts_a_tiny_w): a zero weight is
        # 0 * inf = NaN before the clamp, and its code must still be 0 (CUDA's fminf(NaN, L)
        # gave L)
        tiny = torch.tensor([1e-38, 0.0, -1e-38, 5e-39, -0.0, 1e-45], device=dev)
        for t in (tiny, tiny.repeat(11)):
            for bits in (1, 2, 4, 8):
                q, s, sc = kernels(backend).binarize(t, bits)
                rq, rs, rsc = R.binarize(t.cpu(), bits)
                assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and torch.equal(sc.cpu(), rsc), bits
                assert int(q[1]) == 0 and int(q[4]) == 0 and int(q[-5]) == 0, bits
                if subnormals_kept():
                    assert int(q[0]) == (1 << bits) - 1, bits
        q, s, sc = fk.binarize(torch.zeros(40, device=dev), 3)  # s = 0: every code 0, all "negative"
        assert int(q.abs().sum()) == 0 and float(sc) == 0.0
        assert s.cpu().tolist() == [255] * 5 + [0] * 3


@pytest.mark.parametrize("bits", ALL_BITS)
def test_plane_popcounts_of_all_ones_and_all_zeros(backend, bits):
    """Every bit set in every code, over more than 255 words of 8 codes (the CPU counts each
    8-code word's bits in byte lanes, folded into its totals every 255 words: one word more
    and a lane would wrap to 0) and a tail: each plane's count is n; all zeros, 0."""
    kernels(backend)
    n = 255 * 8 * 3 + 8 + 13
    with backend.active():
        for fill, want in (((1 << bits) - 1, n), (0, 0)):
            codes = torch.full((n,), fill, dtype=torch.uint8, device=backend.device)
            assert fk.plane_popcounts(codes, bits).cpu().tolist() == [want] * bits
            assert fk.plane_popcounts_layers([codes, codes[:255 * 8]], [bits, bits]).cpu().tolist() == \
                [want] * bits + [want and 255 * 8] * bits


@pytest.mark.parametrize("bits", ALL_BITS)
def test_binarize_lifts_a_tiny_w(backend, bits):
    """A w whose max|w| is so small that L / max|w| overflows float32 (here 1000 * 2^-140,
    about 7e-40: at every width): in the kernels' order every nonzero weight got the top code,
    a layer de-quantized to +-max|w| everywhere. The public function (and the registered op)
    gives the codes of w * 2^64, the same ratios to max|w| in float32's normal range: so the
    codes and signs of k * 2^-140 are exactly those of k, the scale max|w| itself."""
    if not subnormals_kept():
        pytest.skip("subnormals are flushed to zero here")
    kernels(backend)
    k = torch.randint(-1000, 1001, (37,), generator=torch.Generator().manual_seed(bits)).float()
    k[3], k[5], k[7] = 1000.0, 0.0, -0.0
    w = k * 2.0**-140  # exact: every k * 2^-140 is a multiple of float32's smallest subnormal
    rq, rs, _ = R.binarize(k, bits)
    with backend.active():
        for q, s, sc in (fk.binarize(w.to(backend.device), bits),
                         torch.ops.fedmpq.binarize(w.to(backend.device), bits)):
            assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)
            assert float(sc) == 1000.0 * 2.0**-140
    assert not torch.equal(R.binarize(w, bits)[0], rq)  # the kernels' own order: what the lift changes


@pytest.mark.parametrize("bits", ALL_BITS)
def test_dequantize_strided_codes_and_misaligned_sign(backend, bits):
    """dequantize (and its scale gradient) and plane_popcounts on strided codes with a
    misaligned sign map, at every width 1..8."""
    kernels(backend)
    dev = backend.device
    n = 1000
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


def test_misaligned_float_inputs(backend):
    """A float32 weight or gradient whose data pointer is not 4-byte aligned is taken as
    any other (the CPU adapter copies it; the native checks refuse a misaligned pointer)."""
    kernels(backend)
    if backend.device != "cpu":
        pytest.skip("host memory only")
    n, bits = 1000, 6
    w = weights(n, bits)
    q, s, sc = R.binarize(w, bits)
    g = misaligned(torch.randn(n, generator=torch.Generator().manual_seed(1)))
    with backend.active():
        got = fk.binarize(misaligned(w), bits)
        assert all(torch.equal(a, b) for a, b in zip(got, (q, s, sc)))
        gsc = torch.ops.fedmpq.dequantize_backward(g, q, s, bits)
    torch.testing.assert_close(gsc, R.dequantize_backward(g, q, s, bits), rtol=1e-6, atol=0)


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["f64", "f16"])
def test_dequantize_backward_takes_a_grad_of_another_float_dtype(backend, dtype):
    """The registered op hands a float64 or float16 grad to the backend as it is: each takes
    it as that grad in float32 (a kernel reading float64 bytes as float32 sums garbage).
    The values are float16's, so every dtype holds them exactly."""
    kernels(backend)
    dev = backend.device
    n, bits = 300, 5
    q, s, _ = layer(n, bits)
    g = torch.randn(n, generator=torch.Generator().manual_seed(4)).half().float()
    want = R.dequantize_backward(g, q, s, bits)
    with backend.active():
        got = torch.ops.fedmpq.dequantize_backward(g.to(dtype).to(dev), q.to(dev), s.to(dev), bits)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0)


def test_dequantize_backward_refuses_a_grad_of_another_size(backend):
    """The registered op called with a grad shorter or longer than codes: refused on every
    backend (the kernels read n floats of grad), never read past its end."""
    kernels(backend)
    dev = backend.device
    q, s, _ = layer(40, 3)
    with backend.active():
        for m in (5, 41):
            with pytest.raises(ValueError, match=f"grad has {m} elements, codes 40"):
                torch.ops.fedmpq.dequantize_backward(torch.ones(m, device=dev), q.to(dev), s.to(dev), 3)


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_a_one_element_scale_of_any_shape_gets_its_gradient_in_its_shape(backend, shape):
    """A scale of shape (1,) or (1, 1) (one element, as the checks allow) takes the same dL/ds
    as a 0-dim one, in its own shape, through the public function and the registered op
    alike (the kernels' dL/ds is 0-dim: autograd would refuse it for a (1,) leaf)."""
    kernels(backend)
    dev = backend.device
    n, bits = 333, 3
    q, s, sc = layer(n, bits)
    G = torch.randn(n, generator=torch.Generator().manual_seed(5))
    want = R.dequantize_backward(G, q, s, bits)
    with backend.active():
        for call in (fk.dequantize, torch.ops.fedmpq.dequantize):
            scale = sc.reshape(shape).clone().to(dev).requires_grad_(True)
            w = call(q.to(dev), s.to(dev), scale, bits, fk.sink_like((n,), device=dev))
            assert torch.equal(bits_of(w.cpu()), bits_of(R.dequantize(q, s, sc, bits)))
            w.backward(G.to(dev))
            assert scale.grad.shape == shape, call
            torch.testing.assert_close(scale.grad.cpu().reshape(()), want, rtol=1e-6, atol=0)


def test_dequantize_backward_sums_in_float64_across_programs(backend, monkeypatch):
    """dL/ds = (sum sigma q G in float64) / L: no partial sum is held in float32. One block
    holds q G = 2^24 and 1 (2^24 + 1: not a float32), a later one -2^24 (a set sign bit), so
    the exact sum is 1 and the result float32(1 / 7); a float32 sum per block (or per slot of
    the last program's finish) gives 0. The Triton interpreter's blocks shrink to 64
    elements so that the two land in different programs."""
    bp = kernels(backend)
    dev = backend.device
    if backend.interpreted:
        from fedmpq_kernels import _triton_common
        monkeypatch.setattr(bp, "BLOCK", 64)
        monkeypatch.setattr(bp, "FINISH", 4)
        monkeypatch.setattr(_triton_common, "FINISH", 4)
    n, bits = 300, 3
    q = torch.zeros(n, dtype=torch.uint8)
    q[[0, 1, 200]] = torch.tensor([1, 1, 1], dtype=torch.uint8)
    g = torch.zeros(n)
    g[[0, 1, 200]] = torch.tensor([2.0**24, 1.0, 2.0**24])
    neg = torch.zeros(n, dtype=torch.bool)
    neg[200] = True
    s = pack_bitmap(neg)
    want = R.dequantize_backward(g, q, s, bits)
    assert float(want) == float(torch.tensor(1.0 / 7.0, dtype=torch.float32))
    with backend.active():
        got = bp.dequantize_backward(g.to(dev), q.to(dev), s.to(dev), bits)
        assert torch.equal(bits_of(got), bits_of(want)), f"{float(got)} != 1/7"
        got = torch.ops.fedmpq.dequantize_backward(g.to(dev), q.to(dev), s.to(dev), bits)
        assert torch.equal(bits_of(got), bits_of(want)), f"{float(got)} != 1/7 (registered op)"


@pytest.mark.parametrize("n, at, want", [
    # 2^24 + 1 in one vector lane (elements 0 and 8), -2^24 in another: the lanes' sum is 1
    (300, {0: 2.0**24, 8: 1.0, 1: -2.0**24}, 1.0 / 7.0),
    # 2^24 + 1 in the first task of 2^15 elements, -2^24 in the second: the tasks' sum is 1
    (40000, {0: 2.0**24, 1: 1.0, 39999: -2.0**24}, 1.0 / 7.0),
    # the exact sum 2^24 + 3 is no float32: one rounding of sum / L (2396745.5), not two (2396745.75)
    (300, {0: 2.0**24, 200: 3.0}, (2.0**24 + 3.0) / 7.0),
], ids=["lanes", "tasks", "one-rounding"])
def test_dequantize_backward_rounds_the_exact_sum_once(backend, n, at, want):
    """dL/ds is float32(S / L) of the float64 sum S (exact for these values): no partial sum
    (a vector lane's, a thread task's) is rounded to float32, nor S before the division.
    Codes 1, 3 bits, the gradients' signs on the weights'."""
    bp = kernels(backend)
    dev = backend.device
    backend.skip_if_too_big(n)
    q = torch.zeros(n, dtype=torch.uint8)
    g = torch.zeros(n)
    neg = torch.zeros(n, dtype=torch.bool)
    for j, v in at.items():
        q[j], g[j], neg[j] = 1, abs(v), v < 0
    s = pack_bitmap(neg)
    want = torch.tensor(want, dtype=torch.float32)
    assert torch.equal(bits_of(R.dequantize_backward(g, q, s, 3)), bits_of(want))
    with backend.active():
        got = bp.dequantize_backward(g.to(dev), q.to(dev), s.to(dev), 3)
    assert torch.equal(bits_of(got), bits_of(want)), f"{float(got)} != {float(want)}"


@pytest.mark.skipif(not subnormals_kept(), reason="this process flushes subnormals to zero")
def test_a_subnormal_weight_step_is_kept(backend):
    """s / L below 2^-126 (s = 1e-36 at 8 bits, 1e-37 at 4): every weight is a subnormal-step
    multiple q * s / L, as the reference gives it (a GPU kernel that flushed subnormals
    would give zeros)."""
    kernels(backend)
    dev = backend.device
    for bits, s in ((8, 1e-36), (4, 1e-37)):
        q, sg = random_codes_signs(1000, bits, seed=bits)
        sc = torch.tensor(s)
        assert float(sc) / ((1 << bits) - 1) < 2.0 ** -126
        want = R.dequantize(q, sg, sc, bits)
        assert (want != 0).any()
        with backend.active():
            got = fk.dequantize(q.to(dev), sg.to(dev), sc.to(dev), bits, fk.sink_like((1000,), device=dev))
        assert torch.equal(bits_of(got), bits_of(want)), bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("kind", ["transposed", "step3", "expanded", "contiguous"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_views_and_sizes_across_program_blocks(backend, bits, kind, dtype):
    """w and the incoming gradient as a transposed matrix, a slice with step 3, an expanded
    column (stride 0), each past the Triton kernels' 4096-element program, and contiguous
    8199 (two whole programs and a tail; sizes the interpreter runs in about a second):
    binarize, dequantize forward and backward through autograd, and popcounts against the
    reference, bit for bit."""
    bp = kernels(backend)
    dev = backend.device
    g = torch.Generator().manual_seed(len(kind) + bits)
    if kind == "transposed":
        w, gw = torch.randn(33, 125, generator=g).t(), torch.randn(33, 125, generator=g).t()
    elif kind == "step3":
        w, gw = torch.randn(3 * 4097, generator=g)[::3], torch.randn(3 * 4097, generator=g)[::3]
    elif kind == "expanded":
        w, gw = torch.randn(33, 1, generator=g).expand(33, 125), torch.randn(33, 1, generator=g).expand(33, 125)
    else:
        w, gw = torch.randn(8199, generator=g), torch.randn(8199, generator=g)
    w, gw = w.to(dtype), gw.to(dtype)
    rq, rs, rsc = R.binarize(w, bits)
    want = R.dequantize(rq, rs, rsc, bits).view(w.shape)
    with backend.active():
        q, s, sc = fk.binarize(w.to(dev), bits)
        assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and torch.equal(bits_of(sc), bits_of(rsc))
        scr = sc.clone().requires_grad_(True)
        sink = fk.sink_like(w.shape, device=dev).requires_grad_(True)
        got = fk.dequantize(q, s, scr, bits, sink)
        got.backward(gw.to(dev))
        assert torch.equal(bits_of(got.detach()), bits_of(want))
        torch.testing.assert_close(scr.grad.cpu(), R.dequantize_backward(gw, rq, rs, bits), rtol=1e-6, atol=0)
        torch.testing.assert_close(bp.dequantize_backward(gw.to(dev), q, s, bits).cpu(),
                                   R.dequantize_backward(gw, rq, rs, bits), rtol=1e-6, atol=0)
        assert torch.equal(sink.grad.cpu(), gw)
        assert torch.equal(fk.plane_popcounts(q, bits).cpu(), R.plane_popcounts(rq, bits))
