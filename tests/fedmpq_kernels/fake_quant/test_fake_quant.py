"""Every fake-quant backend against the pure-torch reference: values and bitmaps bit
for bit, gradients against the reference's autograd, on odd sizes, every bit-width,
contiguous and strided inputs, dynamic and given scales, both STE modes."""
from __future__ import annotations

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels.fake_quant import reference as R

from tests.fedmpq_kernels.subnormals import subnormals_kept

from .helpers import GPU_SIZES, SLICE_SIZES, slice_offsets

ALL_BITS = [1, 2, 3, 4, 5, 6, 7, 8, 16]
SIZES = [0, 1, 7, 8, 9, 1023, (1 << 20) + 3]


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def make_input(numel: int, layout: str, device: str, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """numel elements with specials mixed in; 'strided' is a non-contiguous view."""
    g = torch.Generator().manual_seed(seed + numel)
    x = torch.randn(numel, 2, generator=g) * 2
    if numel >= 9:
        x[3] = 0.0
        x[4] = -0.0  # signed zeros
    x = x.to(device=device, dtype=dtype)
    # 'strided': every other element (stride 2, storage offset 1)
    x = x[:, 0].contiguous() if layout == "contiguous" else x[:, 1]
    assert layout == "contiguous" or numel <= 1 or not x.is_contiguous()
    return x


def given_scale(x: torch.Tensor) -> torch.Tensor:
    """A scale below max|x| so that both sides clip."""
    m = x.float().abs().amax().item() if x.numel() else 1.0
    return torch.tensor(max(0.6 * m, 0.1), device=x.device)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("scaled", [False, True], ids=["dynamic", "given"])
def test_forward_and_backward_kernels_match_reference(backend, bits, numel, layout, scaled):
    backend.skip_if_too_big(numel)
    x = make_input(numel, layout, backend.device)
    s = given_scale(x) if scaled else None
    g = make_input(numel, "strided" if layout == "contiguous" else "contiguous", backend.device, seed=7)
    with backend.active():
        for mode in (0, 1, 2):
            y, b = backend.module("fake_quant").fake_quant(x, bits, s, mode)
            ry, rb = R.fake_quant(x, bits, s, mode)
            assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
            exact(y, ry)
            # mode bitmaps of 4 * ceil(n / 32) bytes back to back: pass, then hi
            assert b.dtype == torch.uint8 and b.numel() == mode * 4 * ((numel + 31) // 32)
            assert torch.equal(b.cpu(), rb.cpu()), f"bitmaps differ (mode {mode})"
            if mode == 0:
                continue
            gx, gs = backend.module("fake_quant").fake_quant_backward(g, b, mode == 2)
            rgx, rgs = R.fake_quant_backward(g, rb, mode == 2)
            assert gx.shape == g.shape and gx.dtype == g.dtype
            exact(gx, rgx)
            assert gs.shape == () and gs.dtype == torch.float32
            torch.testing.assert_close(gs.cpu(), rgs.cpu(), rtol=1e-5, atol=1e-5 * max(1.0, g.abs().sum().item()) ** 0.5)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("scaled", [False, True], ids=["dynamic", "given"])
@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_public_op_gradients_match_reference_autograd(backend, bits, numel, layout, scaled, ste):
    backend.skip_if_too_big(numel)
    x0 = make_input(numel, layout, backend.device)
    s0 = given_scale(x0) if scaled else None
    g = make_input(numel, "contiguous", backend.device, seed=3)

    def run(fn):
        x = x0.detach().clone().requires_grad_(True)
        s = s0.detach().clone().requires_grad_(True) if s0 is not None else None
        y = fn(x, bits, s, ste=ste)
        y.backward(g)
        return y.detach(), x.grad, (s.grad if s is not None else None)

    with backend.active():
        y, gx, gs = run(fk.fake_quant)
    ry, rgx, rgs = run(R.fake_quant_autograd)
    exact(y, R.fake_quant_values(x0, bits, s0))
    exact(gx, rgx)
    if rgs is None:
        assert gs is None
    else:
        torch.testing.assert_close(gs, rgs, rtol=1e-5, atol=1e-5 * max(1.0, g.abs().sum().item()) ** 0.5)
        if scaled and ste == "clipped" and numel >= 9:
            assert rgs.abs().item() > 0, "the test input must clip on some element"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(backend, dtype):
    """float16/bfloat16 x: y is the float32 result rounded to x's dtype, on every backend (the
    Triton interpreter has no bfloat16: its adapter computes in float32 there, as relu6's; its
    own float32 -> bfloat16 store truncated, y one bfloat16 ulp low on about half the elements)."""
    x = make_input(1023, "strided", backend.device, dtype=dtype)
    s = given_scale(x)
    with backend.active():
        for mode in (0, 1, 2):
            for scale in (None, s):
                y, b = backend.module("fake_quant").fake_quant(x, 4, scale, mode)
                ry, rb = R.fake_quant(x, 4, scale, mode)
                assert y.dtype == dtype
                exact(y, ry)
                assert torch.equal(b.cpu(), rb.cpu()), f"bitmaps differ (mode {mode})"
        for scale in (None, s):
            y = fk.fake_quant(x, 3, scale)
            assert y.dtype == dtype
            exact(y, R.fake_quant_values(x, 3, scale).to(dtype))
            xr = x.detach().clone().requires_grad_(True)
            fk.fake_quant(xr, 3, scale, ste="clipped").backward(torch.ones_like(xr))
            # a dynamic S = max|x| clips nothing (the clipped STE is the identity there)
            S = x.float().abs().amax() if scale is None else scale.float()
            passed = (xr.detach().float().abs() <= S).to(dtype)
            assert bool(passed.all()) == (scale is None)
            exact(xr.grad, passed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_clips_against_the_float32_scale(backend, dtype):
    """A learnable scale s = 1.0077125 that x's dtype rounds up to x = 1.0078125 (both float16
    and bfloat16 hold it): x > s in float32, so x is clipped and passes its gradient to s, on
    every backend and in the autograd oracle (which compared x with s rounded to x's dtype,
    itself, and let it through)."""
    top, s_val = 1.0078125, 1.0078125 - 1e-4
    assert float(torch.tensor(s_val, dtype=dtype)) == top  # the scale rounds up to x
    x0 = torch.tensor([top, 0.5, -top, -3.0, 1.0], dtype=dtype)
    want_gx = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0], dtype=dtype)
    for fn in ("kernel", "oracle"):
        x = x0.to(backend.device).clone().requires_grad_(True)
        s = torch.tensor(s_val, device=backend.device, requires_grad=True)
        with backend.active():
            y = (fk.fake_quant(x, 3, s, ste="clipped") if fn == "kernel"
                 else R.fake_quant_autograd(x, 3, s, ste="clipped"))
        y.backward(torch.ones_like(y))
        exact(x.grad.cpu(), want_gx)
        assert float(s.grad) == 1.0 - 1.0 - 1.0, fn  # +1 above s, -1 below -s (twice)


def test_empty_and_multidimensional_shapes(backend):
    with backend.active():
        for shape in [(0,), (3, 0, 2), (2, 3, 5), (1,)]:
            x = torch.randn(shape, device=backend.device)
            for scale in (None, 0.5):
                y = fk.fake_quant(x, 4, scale, ste="clipped")
                assert y.shape == x.shape
                exact(y, R.fake_quant_values(x, 4, None if scale is None else torch.tensor(scale, device=backend.device)))


def test_nan_and_inf(backend):
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf"), float("-inf"), 0.25], device=backend.device)
    with backend.active():
        # dynamic: a NaN anywhere makes S NaN, hence every output
        assert torch.isnan(fk.fake_quant(x, 4)).all()
        # given scale: NaN stays NaN, infinities clip to +-S
        y = fk.fake_quant(x, 2, 1.5)
        exact(y, torch.tensor([1.0, float("nan"), -1.5, 1.5, -1.5, 0.0], device=backend.device))
        # clipped STE: NaN passes the gradient, clipped elements do not; the scale gets
        # +g for x > S and -g for x < -S
        xr = x.clone().requires_grad_(True)
        s = torch.tensor(1.5, device=backend.device, requires_grad=True)
        gy = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], device=backend.device)
        fk.fake_quant(xr, 2, s, ste="clipped").backward(gy)
        exact(xr.grad, torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 32.0], device=backend.device))
        exact(s.grad, torch.tensor(8.0 - 4.0 - 16.0, device=backend.device))


def test_nan_and_inf_in_whole_vector_words(backend):
    """test_nan_and_inf's values tiled to 72 elements, so that the vector loops over whole
    32-element words see them (6 elements reach only the scalar tail): NaN stays NaN under a
    given scale, infinities clip, and the backward's bitmaps agree."""
    dev = backend.device
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf"), float("-inf"), 0.25] * 12, device=dev)
    with backend.active():
        exact(fk.fake_quant(x, 2, 1.5), torch.tensor([1.0, float("nan"), -1.5, 1.5, -1.5, 0.0] * 12, device=dev))
        xr = x.clone().requires_grad_(True)
        s = torch.tensor(1.5, device=dev, requires_grad=True)
        gy = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0] * 12, device=dev)
        fk.fake_quant(xr, 2, s, ste="clipped").backward(gy)
        exact(xr.grad, torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 32.0] * 12, device=dev))
        exact(s.grad, torch.tensor(12 * (8.0 - 4.0 - 16.0), device=dev))


def _check_against_reference(backend, x, s, g, bits=5):
    """Every forward mode and the backward of ``backend`` against the reference, bit for bit."""
    for mode in (0, 1, 2):
        y, b = backend.module("fake_quant").fake_quant(x, bits, s, mode)
        ry, rb = R.fake_quant(x, bits, s, mode)
        exact(y, ry)
        assert torch.equal(b.cpu(), rb.cpu()), f"bitmaps differ (mode {mode})"
        if mode:
            gx, gs = backend.module("fake_quant").fake_quant_backward(g, b, mode == 2)
            rgx, rgs = R.fake_quant_backward(g, rb, mode == 2)
            exact(gx, rgx)
            torch.testing.assert_close(gs.cpu(), rgs.cpu(), rtol=1e-4, atol=1e-3 * max(1.0, g.float().abs().sum().item()) ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("numel", SLICE_SIZES + GPU_SIZES)
def test_contiguous_slices_at_every_offset_match_reference(backend, numel, dtype):
    """x[k:] of a contiguous tensor starts k elements past an aligned address: every offset
    below one 16-byte vector (the CUDA kernels' shifted-load path), on sizes with whole
    vector tiles and odd tails, input and incoming gradient both sliced."""
    vec, offsets = slice_offsets(backend, numel, dtype)
    gen = torch.Generator().manual_seed(numel)
    base = (torch.randn(numel + vec, generator=gen) * 2).to(device=backend.device, dtype=dtype)
    gbase = torch.randn(numel + vec, generator=gen).to(device=backend.device, dtype=dtype)
    with backend.active():
        for off in offsets:
            x = base[off:off + numel]
            g = gbase[vec - off:vec - off + numel]  # another misalignment than x
            assert x.is_contiguous() and x.storage_offset() == off
            s = given_scale(x)
            _check_against_reference(backend, x, None, g)
            _check_against_reference(backend, x, s, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_large_odd_sizes_on_gpu(backend, dtype):
    """Several grid-stride trips, 16-bit dtypes included, through the public op."""
    if backend.device != "cuda":
        pytest.skip("GPU sizes")
    x = make_input(GPU_SIZES[0], "contiguous", backend.device, dtype=dtype)
    g = make_input(GPU_SIZES[0], "contiguous", backend.device, dtype=dtype, seed=5)
    with backend.active():
        _check_against_reference(backend, x, None, g)
        _check_against_reference(backend, x, given_scale(x), g)
        exact(fk.fake_quant(x, 4), R.fake_quant_values(x, 4, None).to(dtype))


def test_backward_takes_bitmaps_by_one_rule(backend):
    """Every backend: the bitmaps must be uint8 on grad's device and long enough for the
    bitmaps read (clear errors otherwise); misaligned or strided ones are copied, never
    misread."""
    n = 1000
    x = make_input(n, "contiguous", backend.device)
    g = make_input(n, "contiguous", backend.device, seed=9)
    s = given_scale(x)
    mod = backend.module("fake_quant")
    with backend.active():
        _, b = mod.fake_quant(x, 3, s, 2)
        assert b.numel() == 256  # two bitmaps of 128 bytes
        rgx, rgs = R.fake_quant_backward(g, b, True)
        with pytest.raises(TypeError, match="bitmaps must be a uint8 tensor"):
            mod.fake_quant_backward(g, b.view(torch.int32), True)
        # the pass bitmap alone is enough without a scale gradient, not with one
        with pytest.raises(ValueError, match="bitmaps has 128 bytes, 256 needed for 2 bitmaps of 1000 elements"):
            mod.fake_quant_backward(g, b[:128], True)
        with pytest.raises(ValueError, match="bitmaps has 4 bytes, 128 needed for 1000 elements"):
            mod.fake_quant_backward(g, b[:4], False)
        exact(mod.fake_quant_backward(g, b[:128], False)[0], rgx)
        buf = torch.zeros(b.numel() + 1, dtype=torch.uint8, device=backend.device)
        buf[1:] = b
        strided = torch.stack([b, torch.zeros_like(b)], dim=1)[:, 0]  # stride 2
        assert buf[1:].data_ptr() % 4 != 0 and not strided.is_contiguous()
        for odd in (buf[1:], strided):
            gx, gs = mod.fake_quant_backward(g, odd, True)
            exact(gx, rgx)
            torch.testing.assert_close(gs.cpu(), rgs.cpu(), rtol=1e-5, atol=1e-4)


def test_backward_refuses_bitmaps_one_byte_short_or_on_another_device(backend):
    """The length rule at its edge: one byte less than the bitmaps read is refused on every
    backend (the CPU kernels would read the missing byte past the end); and bitmaps on
    another device than grad are refused by name (here meta: the CPU kernels read its null
    pointer as an absent bitmap, the reference failed inside torch)."""
    n = 1000
    x = make_input(n, "contiguous", backend.device)
    g = make_input(n, "contiguous", backend.device, seed=9)
    mod = backend.module("fake_quant")
    with backend.active():
        _, b = mod.fake_quant(x, 3, given_scale(x), 2)
        with pytest.raises(ValueError, match="bitmaps has 255 bytes, 256 needed for 2 bitmaps of 1000 elements"):
            mod.fake_quant_backward(g, b[:255], True)
        with pytest.raises(ValueError, match="bitmaps has 127 bytes, 128 needed for 1000 elements"):
            mod.fake_quant_backward(g, b[:127], False)
        for scale_grad in (False, True):
            with pytest.raises(ValueError, match="bitmaps is on meta but grad is on"):
                mod.fake_quant_backward(g, b.to("meta"), scale_grad)

def test_the_sign_bit_of_y_is_the_sign_bit_of_x(backend):
    """y = copysign(m, x) on the bit patterns: -0.0 gives -0.0 and a NaN keeps its sign, under
    a given scale and the dynamic one (a NaN makes that scale NaN: every y is NaN, each with
    its x's sign). exact() cannot see these (assert_close takes -0.0 == +0.0, and any NaN
    matches any NaN), so the sign bits are compared themselves. 72 elements: whole 32-element
    words as well as a partial one."""
    dev = backend.device
    vals = [-0.0, 0.0, -1e-9, 1e-9, float("nan"), float("nan"), -1.0, 1.0, float("-inf"), -0.2, 0.2, -5.0] * 6
    x = torch.tensor(vals, dtype=torch.float32)
    x[5::12] = torch.tensor([-1], dtype=torch.int32).view(torch.float32)  # -NaN (all bits set)
    assert torch.signbit(x[5]) and torch.isnan(x[5])
    x = x.to(dev)
    mod = backend.module("fake_quant")
    with backend.active():
        for scale in (torch.tensor(1.5, device=dev), None):
            for y in (mod.fake_quant(x, 2, scale, 0)[0], fk.fake_quant(x, 2, scale)):
                ry = R.fake_quant_values(x, 2, scale)
                exact(y, ry)
                assert torch.equal(torch.signbit(ry).cpu(), torch.signbit(x).cpu())  # the rule, in the reference
                assert torch.equal(torch.signbit(y).cpu(), torch.signbit(x).cpu()), \
                    f"scale {scale}: sign bits differ at {(torch.signbit(y) != torch.signbit(x)).nonzero().flatten().tolist()}"


def test_an_all_zero_input_gives_zeros_under_the_dynamic_scale(backend):
    """max|x| = 0 makes S = 0: y is x's zeros, signs kept (not the NaN that L / S would
    give), and every element passes. Only the dynamic-scale reduction sees this case: a
    reduction that starts above 0 turns S into a denormal. 77 elements: whole 32-element words
    and a tail."""
    dev = backend.device
    x = torch.zeros(77)
    x[1::3] = -0.0
    x = x.to(dev)
    mod = backend.module("fake_quant")
    with backend.active():
        for mode in (0, 1, 2):
            y, b = mod.fake_quant(x, 4, None, mode)
            ry, rb = R.fake_quant(x, 4, None, mode)
            assert torch.equal(y.cpu().view(torch.int32), ry.cpu().view(torch.int32)), f"mode {mode}"
            assert torch.equal(b.cpu(), rb.cpu()), f"bitmaps differ (mode {mode})"
        assert torch.equal(torch.signbit(fk.fake_quant(x, 4)).cpu(), torch.signbit(x).cpu())
        assert not fk.fake_quant(x, 4).any()


def test_the_largest_finite_float32_is_a_valid_given_scale(backend):
    """A given scale must be finite and > 0: float32's largest value is, on every backend
    (the CPU binding refused it as not finite), with the reference's outputs."""
    x = make_input(100, "contiguous", backend.device)
    s = torch.tensor(torch.finfo(torch.float32).max, device=backend.device)
    with backend.active():
        for mode in (0, 1, 2):
            y, b = backend.module("fake_quant").fake_quant(x, 4, s, mode)
            ry, rb = R.fake_quant(x, 4, s, mode)
            exact(y, ry)
            assert torch.equal(b.cpu(), rb.cpu()), f"bitmaps differ (mode {mode})"
        exact(fk.fake_quant(x, 4, s), ry)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_a_bad_given_scale_makes_every_output_nan(backend, bad):
    """A given scale that is not finite and > 0, handed to the kernels (a device scale is
    never read on the host; the public op refuses a bad CPU one): every y is NaN, as the
    reference's, the bitmaps its bitmaps (the kernels' CHECK_SCALE; a scale of 0 used as is
    would give zeros)."""
    if backend.name == "cpu":
        pytest.skip("the CPU kernels take scales the op has checked (finite and > 0)")
    n = 100
    x = make_input(n, "contiguous", backend.device)
    s = torch.tensor(bad, device=backend.device)
    with backend.active():
        for mode in (0, 1, 2):
            y, b = backend.module("fake_quant").fake_quant(x, 4, s, mode)
            ry, rb = R.fake_quant(x, 4, s, mode)
            assert torch.isnan(y).all() and torch.isnan(ry).all(), f"mode {mode}"
            assert torch.equal(b.cpu(), rb.cpu()), f"bitmaps differ (mode {mode})"


@pytest.mark.parametrize("sdtype", [torch.float64, torch.float16])
def test_a_scale_of_another_float_dtype_is_used_as_its_float32_value(backend, sdtype):
    """The registered op takes a one-element scale of any floating dtype: the kernels use its
    float32 value (the reference's ``scale.float()``), never compute in the scale's dtype.
    0.1 is not a float32: float64 arithmetic on it gives other values."""
    x = make_input(1000, "contiguous", backend.device)
    g = make_input(1000, "contiguous", backend.device, seed=4)
    s = torch.tensor(0.1 + 2.0**-40 if sdtype == torch.float64 else 0.1, dtype=sdtype, device=backend.device)
    with backend.active():
        for mode in (0, 1, 2):
            y, b = torch.ops.fedmpq.fake_quant(x, 3, s, mode)
            ry, rb = R.fake_quant(x, 3, s, mode)
            assert y.dtype == torch.float32
            exact(y, ry)
            assert torch.equal(b.cpu(), rb.cpu()), f"bitmaps differ (mode {mode})"
            if mode == 2:
                gx, gs = torch.ops.fedmpq.fake_quant_backward(g, b, True)
                rgx, rgs = R.fake_quant_backward(g, rb, True)
                exact(gx, rgx)
                torch.testing.assert_close(gs.cpu(), rgs.cpu(), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not subnormals_kept(), reason="this process flushes subnormals to zero")
def test_subnormal_outputs_are_kept(backend):
    """S / L below 2^-126 (S = 1e-36 at 8 bits: a step of 3.9e-39): y keeps the subnormal
    multiples of the step, as the reference does, for a given and a dynamic scale and for
    relu6 (these S are below 2^-100, so the grid is taken on S * 2^100 and its values scaled
    back into the subnormals). (A GPU kernel that flushed subnormals, a multiplication or
    division with .ftz, would give zeros; the interpreter and the host emulator never flush,
    so the GPU run decides.)"""
    dev = backend.device
    base = torch.tensor([1.0, 0.5, -1.0, 0.0, 0.3, -0.2, 0.07, 1.0, -0.4] * 5)
    for bits, S in ((8, 1e-36), (4, 1e-37), (16, 4e-34)):  # S / L subnormal
        s = torch.tensor(S)
        x = base * s  # max |x| = S: the dynamic scale is S too
        assert float(s) / ((1 << bits) - 1) < 2.0 ** -126
        cases = [("given", lambda t: fk.fake_quant(t, bits, s.to(dev)), R.fake_quant(x, bits, s, 0)[0]),
                 ("dynamic", lambda t: fk.fake_quant(t, bits), R.fake_quant(x, bits, None, 0)[0]),
                 ("relu6", lambda t: fk.relu6_fake_quant(t, bits), R.relu6_fake_quant(x, bits)[0])]
        for what, call, want in cases:
            assert (want != 0).any() and torch.isfinite(want).all(), what  # the oracle keeps them
            with backend.active():
                got = call(x.to(dev))
            assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32)), f"{what}, {bits} bits"


# S from the least float32 up to 2^-100, where the plain grid takes over: L / S overflowed
# float32 below L / FLT_MAX (4.4e-38 at 4 bits, 7.5e-37 at 8, 1.9e-34 at 16 bits).
TINY_SCALES = [2.0**-149, 5 * 2.0**-149, 1e-42, 1e-40, 2.0**-126, 1e-37, 3e-35, 0.75 * 2.0**-100, 2.0**-100]
TINY_BASE = [1.0, -0.83, 0.5, -0.31, 0.07, 0.0, -0.0, 0.012, 0.61, -1.0, 0.27, 0.94, -0.455]


def _grid_error(y: torch.Tensor, x: torch.Tensor, S: float, bits: int) -> float:
    """The largest distance, in units of the least float32 (2^-149) or of float32's rounding
    of the value (2^-23 relative), whichever is larger, from y to the grid value
    ``round(min(|x|, S) * L / S) * S / L * sign(x)`` in float64 arithmetic, an oracle
    independent of the float32 order; elements whose ``|x| * L / S`` lies within 1e-3 of a
    rounding tie are left out (float32 may round them either way)."""
    L = float((1 << bits) - 1)
    xd = x.double()
    t = torch.minimum(xd.abs(), torch.tensor(S, dtype=torch.float64)) * L / S
    keep = ((t - t.floor()) - 0.5).abs() > 1e-3
    want = torch.copysign(torch.round(t) * S / L, xd)
    unit = torch.maximum(want.abs() * 2.0**-23, torch.full_like(want, 2.0**-149))
    return float(((y.double() - want).abs() / unit)[keep].max())


@pytest.mark.skipif(not subnormals_kept(), reason="this process flushes subnormals to zero")
def test_a_scale_too_small_for_l_over_s_keeps_its_grid(backend):
    """S below L / FLT_MAX made L / S overflow float32: every output was +-inf (or NaN at the
    least S), on every backend and for a dynamic scale too, so a tensor of tiny values (a
    layer whose weights decayed, activations gone subnormal) became inf. Now, for a given
    scale, the dynamic scale and relu6, at every width: finite, the reference's bits, and
    within one float32 rounding of the float64 grid (at S = 2^-149 the grid is finer than
    float32 itself, so the values are 0 or the least float32)."""
    dev = backend.device
    base = torch.tensor(TINY_BASE + [2.5, -3.0])  # 2.5 and -3 clip under the given scale
    for S in TINY_SCALES:
        s = torch.tensor(S)
        x = base * s
        xr = x.clamp(min=0)
        for bits in ALL_BITS:
            cases = [("given", lambda t: fk.fake_quant(t, bits, s.to(dev)), R.fake_quant(x, bits, s, 0)[0], float(s)),
                     ("dynamic", lambda t: fk.fake_quant(t, bits), R.fake_quant(x, bits, None, 0)[0],
                      float(x.abs().amax())),
                     ("relu6", lambda t: fk.relu6_fake_quant(t, bits), R.relu6_fake_quant(x, bits)[0],
                      float(xr.amax()))]
            for what, call, want, scale in cases:
                where = f"{what}, S = {S:g}, {bits} bits"
                assert torch.isfinite(want).all(), where
                assert _grid_error(want, xr if what == "relu6" else x, scale, bits) <= 1.0, where
                with backend.active():
                    got = call(x.to(dev))
                assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32)), where


def test_the_tiny_scale_grid_is_the_plain_grid_scaled(backend):
    """Below 2^-100 the grid is computed on S * 2^100 and scaled back; where no value is
    subnormal that is exactly the plain grid of x * 2^100 under S * 2^100, scaled by 2^-100
    (every step a power-of-two scaling, exact): a check of the rule, by a route that never
    takes it, on every backend. 1e-31 at 4 bits: the smallest nonzero output, S / 15 * 0.07's
    level, is normal."""
    dev = backend.device
    up = 2.0**100
    x = torch.tensor(TINY_BASE + [2.5, -3.0]) * 1e-31
    s = torch.tensor(1e-31)
    assert float(s) < 2.0**-100
    with backend.active():
        y = fk.fake_quant(x.to(dev), 4, s.to(dev)).cpu()
        y_dyn = fk.fake_quant(x.to(dev), 4).cpu()
    plain = fk.fake_quant(x * up, 4, s * up) / up
    plain_dyn = fk.fake_quant(x * up, 4) / up
    assert (y[y != 0].abs() >= 2.0**-126).all()
    assert torch.equal(y.view(torch.int32), plain.view(torch.int32))
    assert torch.equal(y_dyn.view(torch.int32), plain_dyn.view(torch.int32))


def _view(kind: str, dtype, device):
    """Non-contiguous and block-crossing inputs: a transposed matrix, a slice with step 3, an
    expanded column (stride 0) of 4125 / 4097 elements (one element past the Triton kernels'
    4096-element program), and contiguous 8199 (two whole programs and a tail). Sizes the
    Triton interpreter runs in about a second: no skip_if_too_big."""
    g = torch.Generator().manual_seed(len(kind))
    if kind == "transposed":
        x = (torch.randn(33, 125, generator=g) * 2).t()
    elif kind == "step3":
        x = (torch.randn(3 * 4097, generator=g) * 2)[::3]
    elif kind == "expanded":
        x = (torch.randn(33, 1, generator=g) * 2).expand(33, 125)
    else:
        x = torch.randn(8199, generator=g) * 2
    assert kind == "contiguous" or not x.is_contiguous()
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("kind", ["transposed", "step3", "expanded", "contiguous"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_views_and_sizes_across_program_blocks_match_reference(backend, kind, dtype, bits):
    """Every mode of the backend's kernels and the public op's clipped STE with a learnable
    scale, against the reference: values and bitmaps bit for bit, dL/dx exactly, dL/dS as the
    reference backward's float32 sum."""
    x = _view(kind, dtype, backend.device)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device=backend.device, dtype=dtype)
    s = given_scale(x)
    with backend.active():
        _check_against_reference(backend, x, None, g, bits)
        _check_against_reference(backend, x, s, g, bits)
        xr = x.detach().clone().requires_grad_(True)
        sr = s.detach().clone().requires_grad_(True)
        y = fk.fake_quant(xr, bits, sr, ste="clipped")
        y.backward(g)
    ry, rb = R.fake_quant(x, bits, s, 2)
    exact(y.detach(), ry)
    rgx, rgs = R.fake_quant_backward(g, rb, True)
    exact(xr.grad, rgx)
    assert rgs.abs().item() > 0, "the input must clip on some element"
    torch.testing.assert_close(sr.grad.cpu(), rgs.cpu(), rtol=1e-5, atol=1e-5)
