"""The CUDA C++ fake-quant kernels (csrc/cuda/fake_quant.cu) run on the CPU under the emulator
of tests/cuda_emu (one fiber per CUDA thread, shuffles and ballots as warp-wide meeting
points): every read path (16-byte vectors; a slice's shifted vectors; the scalar words), dtype
and bit-width against the reference, bit for bit. Loads are checked against the buffers
(inside the 16-byte span of one, aligned), and a canary around every output catches a stray
store. CI has no GPU: this is where the CUDA backend's logic is tested there. It cannot show
memory ordering between blocks or speed: tools/gpu_check.sh runs the same kernels on a GPU."""
from __future__ import annotations

import pytest
import torch

from fedmpq_kernels._checks import bitmap_nbytes
from fedmpq_kernels._native import native
from fedmpq_kernels.fake_quant import reference as R
from tests.cuda_emu import EmuError, Guarded, words

from .helpers import DT_IDS, DTYPES, same_bits

BITS = [1, 2, 3, 4, 5, 6, 7, 8, 16]
# With one SM a grid holds 64 warps: 20011 float32 elements take the vector loop's grid
# stride twice, and leave a tail for the scalar words.
SIZES = [1, 31, 33, 257, 1000, 4099, 20011]
# Elements past a 16-byte boundary: 0 takes the vector path, 1 and 3 the shifted one (x[k:]).
OFFSETS = [0, 1, 3]


def _x(n: int, dtype, offset: int, specials: bool, seed: int = 0, spread: float = 1.5) -> Guarded:
    """x at ``offset`` elements past a 16-byte boundary; ``specials``: NaN, +-inf, +-0 and
    +-1 (the scale the tests give) at fixed places. The bytes around x are 0x7e: huge
    (float32, bfloat16) or NaN (float16), so a kernel that takes them for elements shows."""
    gen = torch.Generator().manual_seed(seed * 1000003 + n)
    v = torch.randn(n, generator=gen) * spread
    if specials:
        for i, s in enumerate([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 6.0]):
            if 7 * i + 3 < n:
                v[7 * i + 3] = s
    x = Guarded(n, dtype, offset, fill=0x7E)
    x.t.copy_(v.to(dtype))
    return x


def _bitmaps(ref: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb = bitmap_nbytes(n)
    return ref[k * nb:(k + 1) * nb].view(torch.int32)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_forward_with_a_given_scale(emu, dtype, n, offset):
    x = _x(n, dtype, offset, specials=True)
    s = torch.tensor(1.0)
    for bits in BITS:
        y, pw, hw = Guarded(n, dtype), Guarded(words(n), torch.int32), Guarded(words(n), torch.int32)
        emu.fake_quant(x.t, y.t, bits, s, True, pw.t, hw.t)
        ry, rb = R.fake_quant(x.t, bits, s, 2)
        same_bits(y.t, ry, f"y, {bits} bits")
        assert torch.equal(pw.t, _bitmaps(rb, n, 0)), f"pass bitmap, {bits} bits"
        assert torch.equal(hw.t, _bitmaps(rb, n, 1)), f"hi bitmap, {bits} bits"
        for b, name in ((y, "y"), (pw, "pass"), (hw, "hi")):
            b.check(name)
        # inference: no bitmaps asked for, the same values
        y2 = Guarded(n, dtype)
        emu.fake_quant(x.t, y2.t, bits, s, True)
        same_bits(y2.t, ry, f"y without bitmaps, {bits} bits")
        y2.check("y")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_a_bad_given_scale_makes_every_output_nan(emu, bad):
    n = 1000
    x = _x(n, torch.float32, 0, specials=False)
    y, pw, hw = Guarded(n, torch.float32), Guarded(words(n), torch.int32), Guarded(words(n), torch.int32)
    emu.fake_quant(x.t, y.t, 4, torch.tensor(bad), True, pw.t, hw.t)
    ry, rb = R.fake_quant(x.t, 4, torch.tensor(bad), 2)
    assert torch.isnan(y.t).all()
    same_bits(y.t, ry, "y")
    assert torch.equal(pw.t, _bitmaps(rb, n, 0)) and torch.equal(hw.t, _bitmaps(rb, n, 1))


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "nan-inf"])
def test_forward_with_the_dynamic_scale(emu, dtype, n, offset, specials):
    """absmax (max|x| reduced in the last block) then the quantizer reading it on the device."""
    x = _x(n, dtype, offset, specials)
    ws = emu.workspace()
    out = torch.full((), -1, dtype=torch.int32)
    emu.absmax(x.t, out, ws)
    want = x.t.float().abs().amax()
    got = out.view(torch.float32)
    assert (torch.isnan(want) and torch.isnan(got)) or got.item() == want.item()
    assert int(ws[0]) == 0, "the last block resets the ticket"
    for bits in (1, 4, 8, 16):
        y, pw, hw = Guarded(n, dtype), Guarded(words(n), torch.int32), Guarded(words(n), torch.int32)
        emu.fake_quant(x.t, y.t, bits, got, False, pw.t, hw.t)
        ry, rb = R.fake_quant(x.t, bits, None, 2)
        same_bits(y.t, ry, f"y, {bits} bits")
        assert torch.equal(pw.t, _bitmaps(rb, n, 0)) and torch.equal(hw.t, _bitmaps(rb, n, 1))
        y.check("y")


@pytest.mark.parametrize("sms", [1, 3])
def test_reductions_ignore_stale_slots_and_the_order_blocks_finish_in(emu, sms):
    """The workspace is reused between launches: its slots hold old partials (here NaN bits,
    above every |x| pattern for the max) that no launch may read, and the ticket (word 0) is
    back at zero after each. Blocks finishing in another order, and warps running one at a
    time in any order (a missing barrier shows), give the same bits."""
    emu.sm_count(sms)
    n = 50_001
    x = _x(n, torch.float32, 1, specials=False)
    g = torch.randn(n, generator=torch.Generator().manual_seed(5))
    _, rb = R.fake_quant(x.t, 4, torch.tensor(1.0), 2)
    pw, hw = _bitmaps(rb, n, 0), _bitmaps(rb, n, 1)

    def run(ws):
        out, gs, scale = torch.empty((), dtype=torch.int32), torch.empty(()), torch.empty(())
        gx, y, mask = torch.empty(n), torch.empty(n), torch.empty(words(n), dtype=torch.int32)
        emu.absmax(x.t, out, ws)
        emu.fake_quant_backward(g, gx, pw, hw, ws, gs)
        emu.relu6_fake_quant(x.t, y, 4, scale, mask, ws)
        assert int(ws[0]) == 0, "a ticket left in the workspace"
        return [out, gs, scale, y]

    ws = emu.workspace()
    want = run(ws)
    assert want[0].view(torch.float32).item() == x.t.abs().max().item()
    for seed in (0, 1, 2):
        ws[1:] = 0x7FC00000
        emu.block_order(seed)
        emu.warp_order(seed)
        got = run(ws)
        for a, b, name in zip(got, want, ["max|x|", "dL/dS", "relu6 scale", "relu6 y"]):
            assert torch.equal(a, b), f"{name} differs with stale slots, blocks and warps in order {seed}"


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_relu6_fake_quant(emu, dtype, n, offset):
    x = _x(n, dtype, offset, specials=False, spread=4.0)
    for bits in (1, 2, 4, 8, 16):
        y, mask = Guarded(n, dtype), Guarded(words(n), torch.int32)
        scale, ws = torch.full((), -1.0), emu.workspace()
        emu.relu6_fake_quant(x.t, y.t, bits, scale, mask.t, ws)
        ry, rm = R.relu6_fake_quant(x.t, bits)
        same_bits(y.t, ry, f"y, {bits} bits")
        assert torch.equal(mask.t, rm.view(torch.int32)), f"mask, {bits} bits"
        assert scale.item() == x.t.float().clamp(0, 6).max().item()
        y.check("y")
        mask.check("mask")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_relu6_fake_quant_nan_and_edges(emu, dtype):
    n = 300
    x = _x(n, dtype, 0, specials=True, spread=4.0)
    y, mask = torch.empty(n, dtype=dtype), torch.empty(words(n), dtype=torch.int32)
    scale, ws = torch.empty(()), emu.workspace()
    emu.relu6_fake_quant(x.t, y, 4, scale, mask, ws)
    ry, rm = R.relu6_fake_quant(x.t, 4)
    same_bits(y, ry, "y")
    assert torch.equal(mask, rm.view(torch.int32))
    assert torch.isnan(scale) and torch.isnan(y.float()).all()


def _int_grads(n: int, dtype, offset: int) -> Guarded:
    """Gradients in -8..8: every partial sum is exact in float32 whatever the order, so the
    fused dL/dS must equal the exact sum."""
    g = Guarded(n, dtype, offset)
    g.t.copy_(torch.randint(-8, 9, (n,), generator=torch.Generator().manual_seed(n)).to(dtype))
    return g


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_backward(emu, dtype, n, offset):
    x = _x(n, torch.float32, 0, specials=False)
    s = torch.tensor(1.0)
    _, rb = R.fake_quant(x.t, 4, s, 2)
    g = _int_grads(n, dtype, offset)
    gx, gs, ws = Guarded(n, dtype), torch.full((), float("nan")), emu.workspace()
    emu.fake_quant_backward(g.t, gx.t, _bitmaps(rb, n, 0), _bitmaps(rb, n, 1), ws, gs)
    rgx, rgs = R.fake_quant_backward(g.t, rb, True)
    same_bits(gx.t, rgx, "grad_x")
    gx.check("grad_x")
    xd, gd = x.t.double(), g.t.double()
    exact = float(gd[xd > 1].sum() - gd[xd < -1].sum())
    assert gs.item() == rgs.item() == exact
    assert int(ws[0]) == 0
    # Without hi (a given scale, ReLU6): no sum, and grad_scale gets its 0 from the kernel.
    gx2, gs2 = Guarded(n, dtype), torch.full((), float("nan"))
    emu.fake_quant_backward(g.t, gx2.t, _bitmaps(rb, n, 0), None, ws, gs2)
    same_bits(gx2.t, rgx, "grad_x without hi")
    assert gs2.item() == 0.0
    # and with no grad_scale at all
    gx3 = Guarded(n, dtype)
    emu.fake_quant_backward(g.t, gx3.t, _bitmaps(rb, n, 0), None, None, None)
    same_bits(gx3.t, rgx, "grad_x, no grad_scale")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_backward_float_gradients(emu, dtype):
    """With arbitrary float gradients dL/dS is the reference's up to the summation order, and
    the same bits on every call and block order."""
    n = 20011
    x = _x(n, torch.float32, 0, specials=False)
    _, rb = R.fake_quant(x.t, 4, torch.tensor(1.0), 2)
    g = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(dtype)
    rgx, rgs = R.fake_quant_backward(g, rb, True)
    ws = emu.workspace()
    sums = []
    for seed in (0, 7, 8):
        emu.block_order(seed)
        gx, gs = torch.empty_like(g), torch.empty(())
        emu.fake_quant_backward(g, gx, _bitmaps(rb, n, 0), _bitmaps(rb, n, 1), ws, gs)
        same_bits(gx, rgx, "grad_x")
        sums.append(gs.item())
    assert sums[0] == sums[1] == sums[2]
    assert sums[0] == pytest.approx(rgs.item(), rel=1e-5, abs=1e-3)


def test_errors_are_exceptions_with_the_reason(emu):
    x, y, s = torch.ones(8), torch.empty(8), torch.tensor(1.0)
    with pytest.raises(ValueError, match="unknown dtype code 5"):
        emu.fake_quant(x, y, 4, s, True, dtype=5)
    with pytest.raises(ValueError, match="bits must be in 1..8 or 16, got 9"):
        emu.fake_quant(x, y, 9, s, True)
    with pytest.raises(ValueError, match="current CUDA device is 0 but the tensors are on cuda:1"):
        emu.fake_quant(x, y, 4, s, True, device=1)
    # n == 0 launches nothing
    y0 = Guarded(0, torch.float32)
    emu.fake_quant(torch.empty(0), y0.t, 4, s, True, None, None)
    y0.check("y")


def test_the_emulator_reports_a_load_outside_the_buffers(emu):
    """The load check can fail: a kernel told that x has more elements than its buffer."""
    x, y, s = torch.ones(64), torch.empty(256), torch.tensor(1.0)
    emu.lib.emu_clear_ranges()
    emu.lib.emu_add_range(x.data_ptr(), 64 * 4)
    emu.lib.emu_add_range(s.data_ptr(), 4)
    rc = emu.lib.emu_fake_quant(x.data_ptr(), y.data_ptr(), 0, 256, 4, s.data_ptr(), 1, None, None, 0)
    assert rc == 2 and b"outside every buffer" in emu.lib.emu_message()
    buf = torch.zeros(4)
    with pytest.raises(EmuError, match="misaligned load of 4 bytes"):
        emu.lib.emu_clear_ranges()
        emu._call("emu_fake_quant", [], x.data_ptr(), y.data_ptr(), 0, 64, 4, buf.data_ptr() + 2, 1, None, None, 0)


def test_the_largest_finite_given_scale_is_valid(emu):
    """A given scale turns the outputs into NaN only when it is not finite and > 0: FLT_MAX
    itself is a valid scale (L / S and S / L are finite), so nothing is NaN."""
    fmax = torch.finfo(torch.float32).max
    x = torch.tensor([fmax, -fmax, float("inf"), float("-inf"), 1e38, -3e37, 1.0, 0.0, -0.0] * 5)
    n, s = x.numel(), torch.tensor(fmax)
    for bits in (1, 4, 16):
        y, pw, hw = torch.empty(n), torch.empty(words(n), dtype=torch.int32), torch.empty(words(n), dtype=torch.int32)
        emu.fake_quant(x, y, bits, s, True, pw, hw)
        ry, rb = R.fake_quant(x, bits, s, 2)
        assert not torch.isnan(y).any(), f"{bits} bits: FLT_MAX taken for a bad scale"
        same_bits(y, ry, f"y, {bits} bits")
        assert torch.equal(pw, _bitmaps(rb, n, 0)) and torch.equal(hw, _bitmaps(rb, n, 1))


@pytest.mark.parametrize("S", [2.0**-149, 1e-42, 1e-38, 3e-35, 0.75 * 2.0**-100, 2.0**-100])
def test_a_scale_too_small_for_l_over_s_keeps_its_grid(emu, S):
    """Below 2^-100 load_params takes the grid on S * 2^100 and fq_value scales it back:
    finite values, the reference's bits, for a given scale, the dynamic one (absmax on the
    device) and relu6, at every width (L / S overflowed float32 below L / FLT_MAX: all inf).
    x is float32 (16-bit floats hold no such values). 301 elements: the vector path and a
    tail."""
    n = 301
    x = _x(n, torch.float32, 0, specials=False)
    x.t.mul_(S / float(x.t.abs().amax()))  # max|x| = S, or its float32 rounding
    s = torch.tensor(S)
    out, ws = torch.full((), -1, dtype=torch.int32), emu.workspace()
    emu.absmax(x.t, out, ws)
    for bits in BITS:
        for given, scale in ((True, s), (False, out.view(torch.float32))):
            y, pw, hw = Guarded(n, torch.float32), Guarded(words(n), torch.int32), Guarded(words(n), torch.int32)
            emu.fake_quant(x.t, y.t, bits, scale, given, pw.t, hw.t)
            ry, rb = R.fake_quant(x.t, bits, s if given else None, 2)
            assert torch.isfinite(ry).all()
            same_bits(y.t, ry, f"y, {bits} bits, {'given' if given else 'dynamic'}")
            assert torch.equal(pw.t, _bitmaps(rb, n, 0)) and torch.equal(hw.t, _bitmaps(rb, n, 1))
        y, mask, r6 = Guarded(n, torch.float32), Guarded(words(n), torch.int32), torch.empty(())
        emu.relu6_fake_quant(x.t, y.t, bits, r6, mask.t, emu.workspace())
        ry, rm = R.relu6_fake_quant(x.t, bits)
        assert torch.isfinite(ry).all()
        same_bits(y.t, ry, f"relu6 y, {bits} bits")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_a_dynamic_scale_of_zero_gives_zeros(emu, dtype):
    """max|x| = 0 (x all +-0): inv is 0, not L / 0, so y is x's zeros with their signs, not
    NaN; the dynamic S is used as it is (only a given S <= 0 makes NaN)."""
    n = 300
    x = torch.zeros(n, dtype=dtype)
    x[::3] = -0.0
    out, ws = torch.full((), -1, dtype=torch.int32), emu.workspace()
    emu.absmax(x, out, ws)
    assert int(out) == 0
    y, pw, hw = Guarded(n, dtype), Guarded(words(n), torch.int32), Guarded(words(n), torch.int32)
    emu.fake_quant(x, y.t, 4, out.view(torch.float32), False, pw.t, hw.t)
    same_bits(y.t, x, "y")  # the zeros, -0 kept
    ry, rb = R.fake_quant(x, 4, None, 2)
    same_bits(y.t, ry, "y")
    assert torch.equal(pw.t, _bitmaps(rb, n, 0)) and torch.equal(hw.t, _bitmaps(rb, n, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_relu6_fake_quant_gives_plus_zero_at_and_below_zero(emu, dtype):
    """relu6 maps v <= 0, -0 included, to +0, so y there is +0 (bits 0). When all of x is
    <= 0, S = max relu6(x) = 0 is the dynamic scale, not a refused given one: y is all +0,
    not NaN."""
    n = 300
    x = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    x[::5] = -0.0
    for v in (x, -x.abs()):  # some positives (S > 0); none (S = 0)
        y, mask = torch.empty(n, dtype=dtype), torch.empty(words(n), dtype=torch.int32)
        scale, ws = torch.empty(()), emu.workspace()
        emu.relu6_fake_quant(v, y, 4, scale, mask, ws)
        ry, rm = R.relu6_fake_quant(v, 4)
        same_bits(y, ry, "y")
        assert torch.equal(mask, rm.view(torch.int32))
        below = ~(v > 0)
        assert (y[below].view(torch.int16 if dtype != torch.float32 else torch.int32) == 0).all(), "not +0"
    assert scale.item() == 0.0  # the last x: S = 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_absmax_of_a_slice_sees_the_elements_at_both_ends(emu, dtype):
    """On a slice (the shifted path: x's aligned vectors less the `shift` elements before x,
    then one element at a time from the end of the last whole vector) every element counts:
    a large value planted at each of the first and last 2V places in turn is the max."""
    V = 16 // torch.empty((), dtype=dtype).element_size()
    n = 100
    base = torch.rand(n, generator=torch.Generator().manual_seed(2)).to(dtype)  # |x| < 1
    for offset in sorted({1, V // 2, V - 1}):
        x = Guarded(n, dtype, offset)
        for at in [*range(2 * V), *range(n - 2 * V, n)]:
            x.t.copy_(base)
            x.t[at] = -5.0
            out = torch.empty((), dtype=torch.int32)
            emu.absmax(x.t, out, emu.workspace())
            assert out.view(torch.float32).item() == 5.0, f"offset {offset}: the max at {at} was missed"


@pytest.mark.skipif(native is None or not getattr(native, "with_cuda", False),
                    reason="fedmpq_kernels._C was built without CUDA")
@pytest.mark.parametrize("dtype, off", [(1, 1), (2, 3), (0, 2)], ids=["f16+1", "bf16+3", "f32+2"])
def test_pointers_not_element_aligned_never_reach_the_kernels(dtype, off):
    """An input that is not even element-aligned (never a torch tensor; a raw pointer) would
    fault on a GPU whatever path read it (the emulator's alignment check says so too), so the
    CUDA bindings refuse it before any launch, for every op that reads one: the launchers'
    scalar fallback for such pointers is never reached."""
    p = (1 << 20) + off  # a fake device address: refused before it is dereferenced
    es = {0: 4, 1: 2, 2: 2}[dtype]
    with pytest.raises(ValueError, match=f"x: data pointer is not {es}-byte aligned"):
        native.cuda.absmax(x=p, dtype=dtype, n=100, out_bits=2 << 20, workspace=3 << 20, workspace_words=1 << 20,
                           device=-1, stream=0)
    with pytest.raises(ValueError, match=f"x: data pointer is not {es}-byte aligned"):
        native.cuda.fake_quant(x=p, y=2 << 20, dtype=dtype, n=100, y_cap=100, bits=4, scale=3 << 20, scale_given=True,
                               pass_bits=0, pass_nbytes=0, hi_bits=0, hi_nbytes=0, device=-1, stream=0)
    with pytest.raises(ValueError, match=f"grad: data pointer is not {es}-byte aligned"):
        native.cuda.fake_quant_backward(grad=p, grad_x=2 << 20, dtype=dtype, n=100, gx_cap=100, pass_bits=3 << 20,
                                        pass_nbytes=16, hi_bits=0, hi_nbytes=0, workspace=4 << 20,
                                        workspace_words=1 << 20, grad_scale=0, device=-1, stream=0)


@pytest.mark.skipif(native is None or not getattr(native, "with_cuda", False),
                    reason="fedmpq_kernels._C was built without CUDA")
def test_the_cuda_bindings_refuse_an_output_that_is_its_input():
    """The kernels read x (and g) through the read-only data cache (__ldg), which PTX allows
    only for memory that no thread writes during the kernel: y == x (gx == g), which the CPU
    kernels take, is refused before any launch, as is any other overlap; back to back is not
    an overlap (refused here only by the fake device, after the checks)."""
    p, es, n = 1 << 20, 4, 100
    fwd = dict(dtype=0, n=n, y_cap=n, bits=4, scale=3 << 20, scale_given=True, pass_bits=0, pass_nbytes=0,
               hi_bits=0, hi_nbytes=0, device=-1, stream=0)
    for y in (p, p + 8):
        with pytest.raises(ValueError, match="x and y overlap"):
            native.cuda.fake_quant(x=p, y=y, **fwd)
        with pytest.raises(ValueError, match="x and y overlap"):
            native.cuda.relu6_fake_quant(x=p, y=y, dtype=0, n=n, y_cap=n, bits=4, scale=3 << 20, mask=0, mask_nbytes=0,
                                         workspace=4 << 20, workspace_words=1 << 20, device=-1, stream=0)
        with pytest.raises(ValueError, match="grad and grad_x overlap"):
            native.cuda.fake_quant_backward(grad=p, grad_x=y, dtype=0, n=n, gx_cap=n, pass_bits=3 << 20, pass_nbytes=16,
                                            hi_bits=0, hi_nbytes=0, workspace=4 << 20, workspace_words=1 << 20,
                                            grad_scale=0, device=-1, stream=0)
    with pytest.raises(Exception) as e:  # past the overlap check: the fake device is what fails
        native.cuda.fake_quant(x=p, y=p + n * es, **fwd)
    assert "overlap" not in str(e.value)


def test_argument_errors_come_first_and_empty_inputs_launch_nothing(emu):
    """Bad arguments are refused even for n == 0 (the dtype code 3, one past bfloat16; bits
    0, 9, 15 and 17); n == 0 then returns before any launch, writing nothing."""
    x, y, s = torch.ones(8), torch.empty(8), torch.tensor(1.0)
    for bits in (0, 9, 15, 17):
        with pytest.raises(ValueError, match=f"bits must be in 1..8 or 16, got {bits}"):
            emu.fake_quant(x, y, bits, s, True)
    e = torch.empty(0)
    with pytest.raises(ValueError, match="unknown dtype code 3"):
        emu.fake_quant(e, e, 4, s, True, dtype=3)
    before = emu.launches()
    out, ws = torch.full((), -7, dtype=torch.int32), emu.workspace()
    emu.absmax(e, out, ws)
    emu.fake_quant(e, e, 4, s, True, torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32))
    emu.relu6_fake_quant(e, e, 4, s, torch.empty(0, dtype=torch.int32), ws)
    gs = torch.full((), float("nan"))
    emu.fake_quant_backward(e, e, torch.empty(0, dtype=torch.int32), None, ws, gs)
    assert emu.launches() == before, "an empty input launched a kernel"
    assert int(out) == -7 and s.item() == 1.0 and torch.isnan(gs) and not ws.any()
