"""Every packing backend against the pure-torch reference (itself checked against
numpy.packbits and hand-computed planes): every bit-width, odd and empty sizes, strided and
misaligned inputs, the dequantize-accumulate arithmetic bit for bit, and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels.pack import reference as R

ALL_BITS = range(1, 9)
SIZES = [0, 1, 7, 31, 32, 33, 128, 1023, (1 << 20) + 3]


def codes_for(n: int, bits: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 131 + n * 7 + bits)
    return torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int32).to(torch.uint8).to(device)


def test_reference_hand_computed_planes():
    # codes 5 = 101b, 2 = 010b, 7 = 111b at 3 bits: plane 0 (MSB) = [1,0,1] -> byte 0b101 = 5,
    # plane 1 = [0,1,1] -> 0b110 = 6, plane 2 (LSB) = [1,0,1] -> 5; each padded to 4 bytes.
    p = R.pack_codes(torch.tensor([5, 2, 7], dtype=torch.uint8), 3)
    assert p.tolist() == [5, 0, 0, 0, 6, 0, 0, 0, 5, 0, 0, 0]
    assert R.unpack_codes(p, 3, 3).tolist() == [5, 2, 7]
    acc = torch.tensor([1.0, 1.0, 1.0])
    signs = R.pack_codes(torch.tensor([0, 1, 0], dtype=torch.uint8), 1)
    R.dequant_accumulate(acc, p, signs, 3, 0.5)  # acc += sign * 0.5 * q
    assert acc.tolist() == [3.5, 0.0, 4.5]


def test_bitmap_pack_layout_and_roundtrip():
    mask = torch.zeros(40, dtype=torch.bool)
    mask[[0, 3, 8, 31, 32, 39]] = True
    b = R.pack_bitmap(mask)
    assert b.dtype == torch.uint8 and b.numel() == 8  # two uint32 words
    assert b.tolist() == [0b1001, 0b1, 0, 0b10000000, 0b10000001, 0, 0, 0]
    assert torch.equal(R.unpack_bitmap(b, 40), mask)
    with pytest.raises(ValueError, match="bitmap has"):
        R.unpack_bitmap(b[:4], 40)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("numel", SIZES)
def test_pack_and_unpack_match_reference(backend, bits, numel):
    backend.skip_if_too_big(numel)
    codes = codes_for(numel, bits, backend.device)
    with backend.active():
        planes = fk.pack_codes(codes, bits)
        want = R.pack_codes(codes.cpu(), bits)
        assert planes.dtype == torch.uint8 and planes.shape == (bits * fk.bitmap_nbytes(numel),)
        assert torch.equal(planes.cpu(), want)
        back = fk.unpack_codes(planes, bits, numel)
        assert back.dtype == torch.uint8 and back.shape == (numel,)
        assert torch.equal(back, codes)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_strided_codes_and_misaligned_planes(backend, bits):
    n = 1000
    with backend.active():
        wide = codes_for(2 * n, bits, backend.device).view(n, 2)
        codes = wide[:, 1]  # stride 2
        assert not codes.is_contiguous()
        planes = fk.pack_codes(codes, bits)
        assert torch.equal(planes.cpu(), R.pack_codes(codes.contiguous().cpu(), bits))
        buf = torch.zeros(planes.numel() + 1, dtype=torch.uint8, device=backend.device)
        buf[1:] = planes
        assert buf[1:].data_ptr() % 4
        assert torch.equal(fk.unpack_codes(buf[1:], bits, n), codes)
        longer = torch.cat([planes, torch.full((9,), 255, dtype=torch.uint8, device=backend.device)])
        assert torch.equal(fk.unpack_codes(longer, bits, n), codes)  # extra bytes are ignored


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("numel", [0, 1, 33, 1023, (1 << 18) + 5])
def test_dequant_accumulate_matches_reference_bit_for_bit(backend, bits, numel):
    backend.skip_if_too_big(numel)
    dev = backend.device
    codes = codes_for(numel, bits, dev)
    neg = codes_for(numel, 1, dev, seed=1)
    planes, signs = R.pack_codes(codes.cpu(), bits).to(dev), R.pack_codes(neg.cpu(), 1).to(dev)
    g = torch.Generator().manual_seed(numel)
    acc0 = torch.randn(numel, generator=g).to(dev)
    with backend.active():
        for scale, weight, sg in [(0.37, 1.0, signs), (2.5, 120.0, signs), (0.0, 3.0, signs), (1.0, -0.5, None)]:
            acc = acc0.clone()
            out = fk.dequant_accumulate(acc, planes, sg, bits, scale, weight)
            assert out is acc
            want = acc0.cpu().clone()
            coef = float(np.float32(weight) * (np.float32(scale) / np.float32((1 << bits) - 1)))
            R.dequant_accumulate(want, planes.cpu(), None if sg is None else sg.cpu(), bits, coef)
            torch.testing.assert_close(acc.cpu(), want, rtol=0, atol=0)
            # and the algorithm's formula, independently of the reference's code
            w = scale * torch.where(neg.cpu().bool() & (sg is not None), -1.0, 1.0) * codes.cpu().float() / ((1 << bits) - 1)
            torch.testing.assert_close(acc.cpu(), acc0.cpu() + weight * w, rtol=1e-5, atol=1e-5)


def test_dequant_accumulate_takes_the_largest_finite_float32_coef(backend):
    """±FLT_MAX is a finite float32 coef on every backend (the CPU and CUDA bindings refused
    it as not finite), with the reference's sums: codes 0 and 1 keep them finite, larger
    ones overflow to ±inf in float32 as the reference does."""
    dev = backend.device
    codes, neg = codes_for(77, 2, dev), codes_for(77, 1, dev, seed=1)
    planes, signs = R.pack_codes(codes.cpu(), 2).to(dev), R.pack_codes(neg.cpu(), 1).to(dev)
    fmax = float(np.finfo(np.float32).max)
    with backend.active():
        for coef in (fmax, -fmax):
            acc = torch.zeros(77, device=dev)
            torch.ops.fedmpq.dequant_accumulate(acc, planes, signs, 2, coef)
            want = torch.zeros(77)
            R.dequant_accumulate(want, planes.cpu(), signs.cpu(), 2, coef)
            assert torch.equal(acc.cpu(), want), f"coef {coef}"


def test_a_zero_code_keeps_the_sign_of_zero(backend):
    """acc = -0.0 everywhere, zero codes: a negative one adds -0.0 and keeps -0.0, a positive
    one adds +0.0 and gives +0.0, as the reference (the sign is put on by negation, which
    must stay exact for zeros too)."""
    dev = backend.device
    n, bits = 100, 3
    codes = torch.zeros(n, dtype=torch.uint8)
    codes[::5] = 3
    neg = torch.arange(n) % 2 == 1
    planes, signs = R.pack_codes(codes, bits), R.pack_bitmap(neg)
    want = torch.full((n,), -0.0)
    R.dequant_accumulate(want, planes, signs, bits, float(fk.layer_coefs([0.75], [bits], 1.0)[0]))
    assert torch.equal(torch.signbit(want), neg)  # every result carries its weight's sign
    with backend.active():
        got = torch.full((n,), -0.0, device=dev)
        fk.dequant_accumulate(got, planes.to(dev), signs.to(dev), bits, 0.75, 1.0)
    assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32))


def test_dequant_accumulate_takes_any_shape_of_acc(backend):
    with backend.active():
        acc = torch.zeros(3, 5, 7, device=backend.device)
        codes = codes_for(105, 4, backend.device)
        fk.dequant_accumulate(acc, fk.pack_codes(codes, 4), None, 4, 15.0)
        assert torch.equal(acc.reshape(-1), codes.float())


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda d: fk.pack_codes(torch.tensor([4], dtype=torch.uint8, device=d), 2, validate=True), ValueError,
         "does not fit in 2 bits"),
        (lambda d: fk.pack_codes(torch.tensor([255, 0], dtype=torch.uint8, device=d), 7, validate=True), ValueError,
         "does not fit in 7 bits"),
        (lambda d: fk.pack_codes(torch.tensor([1], dtype=torch.uint8, device=d), 2, validate="no"), TypeError,
         "validate must be True, False or None, got 'no'"),  # bool() took "no" as True
        (lambda d: fk.pack_codes(torch.tensor([1], dtype=torch.int32, device=d), 2), TypeError, "codes must be uint8"),
        (lambda d: fk.pack_codes([1, 2], 2), TypeError, "must be a torch.Tensor"),
        (lambda d: fk.pack_codes(torch.zeros(3, dtype=torch.uint8, device=d), 0), ValueError, "bits must be in 1..8"),
        (lambda d: fk.pack_codes(torch.zeros(3, dtype=torch.uint8, device=d), 9), ValueError, "bits must be in 1..8"),
        (lambda d: fk.pack_codes(torch.zeros(3, dtype=torch.uint8, device=d), 2.0), TypeError, "bits must be an int"),
        (lambda d: fk.unpack_codes(torch.zeros(7, dtype=torch.uint8, device=d), 2, 33), ValueError, "has 7 bytes, 16 needed"),
        (lambda d: fk.unpack_codes(torch.zeros(8, dtype=torch.uint8, device=d), 2, -1), ValueError, "n must be an int >= 0"),
        (lambda d: fk.unpack_codes(torch.zeros(8, dtype=torch.float32, device=d), 2, 1), TypeError, "planes must be uint8"),
        (lambda d: fk.dequant_accumulate(torch.zeros(4, dtype=torch.float64, device=d), torch.zeros(4, dtype=torch.uint8), None, 1, 1.0),
         TypeError, "acc must be a float32"),
        (lambda d: fk.dequant_accumulate(torch.zeros(8, 2, device=d)[:, 0], torch.zeros(4, dtype=torch.uint8, device=d), None, 1, 1.0),
         ValueError, "acc must be contiguous"),
        (lambda d: fk.dequant_accumulate(torch.zeros(40, device=d), torch.zeros(4, dtype=torch.uint8, device=d), None, 1, 1.0),
         ValueError, "planes has 4 bytes, 8 needed"),
        (lambda d: fk.dequant_accumulate(torch.zeros(4, device=d), torch.zeros(4, dtype=torch.uint8, device=d),
                                         torch.zeros(2, dtype=torch.uint8, device=d), 1, 1.0), ValueError, "signs has 2 bytes"),
        # planes or signs on another device than acc: named, never handed to a kernel (the CPU
        # kernels read a meta sign map's null pointer as 'all positive')
        (lambda d: fk.dequant_accumulate(torch.zeros(40, device=d), torch.zeros(8, dtype=torch.uint8, device="meta"), None, 1, 1.0),
         ValueError, "planes is on meta"),
        (lambda d: fk.dequant_accumulate(torch.zeros(40, device=d), torch.zeros(8, dtype=torch.uint8, device=d),
                                         torch.zeros(8, dtype=torch.uint8, device="meta"), 1, 1.0), ValueError, "signs is on meta"),
        (lambda d: fk.dequant_accumulate(torch.zeros(4, device=d), torch.zeros(4, dtype=torch.uint8, device=d), None, 1, float("nan")),
         ValueError, "scale must be finite"),
        (lambda d: fk.dequant_accumulate(torch.zeros(4, device=d), torch.zeros(4, dtype=torch.uint8, device=d), None, 1, -1.0),
         ValueError, "scale must be finite and >= 0"),
        (lambda d: fk.dequant_accumulate(torch.zeros(4, device=d), torch.zeros(4, dtype=torch.uint8, device=d), None, 1, 1.0, float("inf")),
         ValueError, "weight must be finite"),
        (lambda d: fk.dequant_accumulate(torch.zeros(4, device=d), torch.zeros(4, dtype=torch.uint8, device=d), None, 1, 3e38, 1e10),
         ValueError, "overflows float32"),
        # finite doubles beyond float32: inf (and inf * 0 = NaN) in the accumulator on the
        # reference and Triton, an error about an internal "coef" on the CPU
        (lambda d: fk.dequant_accumulate(torch.zeros(4, device=d), torch.zeros(4, dtype=torch.uint8, device=d), None, 1, 1e39, 1e-5),
         ValueError, "scale must be finite and >= 0 in float32, got 1e"),
        (lambda d: fk.dequant_accumulate(torch.zeros(4, device=d), torch.zeros(4, dtype=torch.uint8, device=d), None, 1, 0.0, 1e300),
         ValueError, "weight must be finite in float32, got 1e"),
        (lambda d: fk.dequant_accumulate(torch.zeros(4, device=d), torch.zeros(4, dtype=torch.uint8, device=d), None, 1, 3.4e38, 1.5),
         ValueError, "overflows float32"),
        (lambda d: fk.dequant_accumulate(torch.zeros(4, device=d), torch.zeros(4, dtype=torch.uint8, device=d), None, 1, "1.0"),
         TypeError, "scale must be a number, got str"),  # float() took it
        (lambda d: fk.dequant_accumulate(torch.zeros(4, device=d), torch.zeros(4, dtype=torch.uint8, device=d), None, 1, 1.0, True),
         TypeError, "weight must be a number, got bool"),
    ],
)
def test_bad_input_raises_a_clear_error(backend, call, exc, match):
    with backend.active(), pytest.raises(exc, match=match):
        call(backend.device)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda d: torch.ops.fedmpq.pack_codes(torch.zeros(3, dtype=torch.uint8, device=d), 0), ValueError,
         "bits must be in 1..8"),
        (lambda d: torch.ops.fedmpq.pack_codes(torch.zeros(3, dtype=torch.int32, device=d), 2), TypeError,
         "codes must be uint8"),
        (lambda d: torch.ops.fedmpq.unpack_codes(torch.zeros(10, dtype=torch.uint8, device=d), 4, 100), ValueError,
         "planes has 10 bytes, 64 needed"),
        (lambda d: torch.ops.fedmpq.unpack_codes(torch.zeros(64, dtype=torch.uint8, device=d), 4, -5), ValueError,
         "n must be an int >= 0"),
        (lambda d: torch.ops.fedmpq.dequant_accumulate(torch.zeros(100, device=d), torch.zeros(10, dtype=torch.uint8, device=d),
                                                       None, 4, 1.0), ValueError, "planes has 10 bytes, 64 needed"),
        (lambda d: torch.ops.fedmpq.dequant_accumulate(torch.zeros(100, device=d), torch.zeros(64, dtype=torch.uint8, device=d),
                                                       torch.zeros(2, dtype=torch.uint8, device=d), 4, 1.0),
         ValueError, "signs has 2 bytes"),
        (lambda d: torch.ops.fedmpq.dequant_accumulate(torch.zeros(100, device=d), torch.zeros(64, dtype=torch.uint8, device=d),
                                                       None, 9, 1.0), ValueError, "bits must be in 1..8"),
        (lambda d: torch.ops.fedmpq.dequant_accumulate(torch.zeros(100, device=d), torch.zeros(64, dtype=torch.uint8, device=d),
                                                       None, 4, float("inf")), ValueError, "coef must be a finite float32 value"),
        (lambda d: torch.ops.fedmpq.dequant_accumulate(torch.zeros(100, device=d), torch.zeros(64, dtype=torch.uint8, device=d),
                                                       None, 4, 1e300), ValueError, "coef must be a finite float32 value"),
        (lambda d: torch.ops.fedmpq.dequant_accumulate_layers(torch.zeros(100, device=d), torch.zeros(64, dtype=torch.uint8, device=d),
                                                              torch.zeros(1, 3, dtype=torch.int64), torch.ones(1)),
         TypeError, "table must be an int64 tensor of shape"),
    ],
)
def test_registered_ops_called_directly_refuse_bad_arguments(backend, call, exc, match):
    """torch.ops.fedmpq.* called directly checks its arguments on every backend before a
    kernel sees them: before, Triton packed at 0 bits, and Triton and the reference failed
    on short planes with torch's reshape or view errors."""
    with backend.active(), pytest.raises(exc, match=match):
        call(backend.device)


def test_ops_are_registered_and_pass_opcheck():
    codes = codes_for(77, 5, "cpu")
    planes = torch.ops.fedmpq.pack_codes(codes, 5)
    torch.library.opcheck(torch.ops.fedmpq.pack_codes.default, (codes, 5))
    torch.library.opcheck(torch.ops.fedmpq.unpack_codes.default, (planes, 5, 77))
    torch.library.opcheck(torch.ops.fedmpq.dequant_accumulate.default, (torch.zeros(77), planes, None, 5, 0.25))


# ---- every tile path: slices at odd offsets, tails, several programs / grid-stride trips ----

TILED = 3 * 512 + 37  # whole 512-code tiles of the CUDA kernels, then a 37-code tail


def coef_of(scale: float, weight: float, bits: int) -> float:
    return float(np.float32(weight) * (np.float32(scale) / np.float32((1 << bits) - 1)))


def check_all_ops(backend, n: int, bits: int, offset: int, ref_device) -> None:
    """pack/unpack of codes that are a contiguous slice at `offset` (not 16-byte aligned
    unless 0: the CUDA kernels' scalar path), dequant_accumulate into an acc slice at
    `offset` (the elements around it must stay as they were), against the reference
    computed on `ref_device`."""
    dev = backend.device
    codes = codes_for(n + offset, bits, dev, seed=5)[offset:]
    assert codes.is_contiguous()
    signs = R.pack_codes(codes_for(n, 1, dev, seed=6).to(ref_device), 1)
    g = torch.Generator().manual_seed(n + offset)
    acc_full = torch.randn(offset + n + 3, generator=g).to(dev)
    want_planes = R.pack_codes(codes.to(ref_device), bits)
    want_acc = acc_full.to(ref_device, copy=True)
    R.dequant_accumulate(want_acc[offset:offset + n], want_planes, signs, bits, coef_of(0.37, -2.5, bits))
    with backend.active():
        planes = fk.pack_codes(codes, bits)
        assert torch.equal(planes.to(ref_device), want_planes)
        assert torch.equal(fk.unpack_codes(planes, bits, n), codes)
        acc = acc_full.clone()
        fk.dequant_accumulate(acc[offset:offset + n], planes, signs.to(dev), bits, 0.37, -2.5)
        assert torch.equal(acc.to(ref_device), want_acc)


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_slices_at_any_offset_and_tails(backend, bits, offset):
    check_all_ops(backend, TILED, bits, offset, "cpu")


@pytest.mark.parametrize("where", [0, 700, TILED - 1])
def test_a_code_that_does_not_fit_is_found_anywhere(backend, where):
    codes = torch.zeros(TILED, dtype=torch.uint8, device=backend.device)
    codes[where] = 8
    # the kernels report the OR of all codes (the reference only the width)
    said = "" if backend.name == "reference" else r" .* OR-ed together are 0x8\)"
    with backend.active():
        with pytest.raises(ValueError, match="does not fit in 3 bits" + said):
            fk.pack_codes(codes, 3, validate=True)
        with pytest.raises(ValueError, match="does not fit in 3 bits"):
            fk.pack_codes(codes[1:] if where else codes, 3)  # the scalar path
            fk.check_packed(codes.device)  # a GPU reports it here, where the caller synchronizes
        assert torch.equal(fk.pack_codes(codes, 4).cpu(), R.pack_codes(codes.cpu(), 4))
        fk.check_packed()  # nothing left over


@pytest.mark.parametrize("where", [0, 1 << 15, (1 << 16) + 36])
def test_a_code_that_does_not_fit_is_found_in_every_chunk(backend, where):
    """Past 2^15 codes the CPU kernels check the codes in chunks of 2^15 (the thread pool's
    tasks, also on one thread) and OR the chunks' results: a bad code in the first, a middle
    or the last chunk is reported, not only one in the chunk combined last."""
    backend.skip_if_too_big((1 << 16) + 37)
    codes = torch.zeros((1 << 16) + 37, dtype=torch.uint8, device=backend.device)
    codes[where] = 8
    with backend.active(), pytest.raises(ValueError, match="does not fit in 3 bits"):
        fk.pack_codes(codes, 3, validate=True)


def test_a_code_that_does_not_fit_is_found_in_every_byte_of_a_word(backend):
    """The range check ORs whole 32-code words (a CPU vector: 8 lanes of 4 bytes): a bad code
    at each of the 32 positions of a word, not only where a single random case falls."""
    codes = torch.zeros(96, dtype=torch.uint8, device=backend.device)
    with backend.active():
        for j in range(32, 64):
            codes.zero_()
            codes[j] = 8
            with pytest.raises(ValueError, match="does not fit in 3 bits"):
                fk.pack_codes(codes, 3, validate=True)


def test_a_bad_code_on_a_gpu_is_reported_at_the_check_not_in_the_call(backend):
    """The GPU kernels (and Triton's, in the interpreter with validate=False) record the
    codes on the device instead of reading them back: pack_codes returns, check_packed
    raises for every bit-width that had a bad code since the last check, then forgets it.
    The CPU kernels and the reference raise in the call whatever validate says."""
    dev = backend.device
    bad = torch.tensor([0, 3, 5, 1] * 20, dtype=torch.uint8, device=dev)  # 5 needs 3 bits
    with backend.active():
        if backend.name in ("cpu", "reference"):
            with pytest.raises(ValueError, match="does not fit in 2 bits"):
                fk.pack_codes(bad, 2, validate=False)
            return
        fk.check_packed(dev)  # start clean
        planes = fk.pack_codes(bad, 2, validate=False)  # no synchronization, no error yet
        assert planes.numel() == 2 * 4 * 3
        assert torch.equal(fk.pack_codes(bad, 3, validate=False).cpu(), R.pack_codes(bad.cpu(), 3))  # fits
        with pytest.raises(ValueError, match=r"does not fit in 2 bits on .* are 0x7\)"):
            fk.check_packed(dev)
        fk.check_packed(dev)  # cleared: the 3-bit call was fine, and the 2-bit one is reported once
        fk.pack_codes(bad, 1, validate=False)
        with pytest.raises(ValueError, match="does not fit in 1 bits"):
            fk.check_packed()  # every device


def test_a_checked_call_reports_its_own_codes_only(backend):
    """pack_codes(validate=True) read and cleared the device's shared record: another call's
    (another thread's) bad codes raised in a call with valid ones and were then lost to
    check_packed, and a checked call's own bad codes could be cleared by another's check
    first (returned without an error). A checked call now records into words of its own:
    a valid call passes whatever the device's record holds, which check_packed still
    reports, and a bad call raises whatever was recorded before it."""
    dev = backend.device
    bad = torch.tensor([0, 3, 5, 1] * 20, dtype=torch.uint8, device=dev)  # 5 needs 3 bits
    good = torch.tensor([0, 3, 2, 1] * 20, dtype=torch.uint8, device=dev)
    with backend.active():
        if backend.name in ("cpu", "reference"):
            pytest.skip("checked in the call itself: no record on the device")
        fk.check_packed(dev)  # start clean
        fk.pack_codes(bad, 2, validate=False)  # recorded on the device, not raised
        assert torch.equal(fk.pack_codes(good, 2, validate=True).cpu(), R.pack_codes(good.cpu(), 2))
        with pytest.raises(ValueError, match="does not fit in 2 bits"):
            fk.pack_codes(bad, 2, validate=True)
        with pytest.raises(ValueError, match="does not fit in 2 bits"):  # the deferred one, still there
            fk.check_packed(dev)
        fk.check_packed(dev)


def test_a_bad_code_packed_on_another_stream_is_reported(backend):
    """check_packed synchronizes the whole device: a bad code packed on a side stream, with
    a large kernel queued before it there, is reported from the default stream."""
    if backend.device != "cuda":
        pytest.skip("a CUDA device's streams")
    dev = torch.device("cuda", torch.cuda.current_device())
    bad = torch.tensor([0, 3, 5, 1] * 20, dtype=torch.uint8, device=dev)
    big = torch.randn(1 << 24, device=dev)
    with backend.active():
        fk.pack_codes(bad[:4] * 0, 2)  # the status words exist before the side stream uses them
        fk.check_packed(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(8):
                big.mul_(1.0)  # keeps the side stream busy past the check's call
            fk.pack_codes(bad, 2, validate=False)
        with pytest.raises(ValueError, match="does not fit in 2 bits"):
            fk.check_packed(dev)
        torch.cuda.current_stream(dev).wait_stream(side)


def test_triton_runs_several_programs_in_the_interpreter(backend, monkeypatch):
    """The interpreter only takes sizes up to one 4096-element block: with a 64-element
    block the same sizes run many programs, full blocks unmasked and a masked last one."""
    if not backend.interpreted:
        pytest.skip("the Triton interpreter case")
    monkeypatch.setattr(backend.module("pack"), "BLOCK", 64)
    for n in (64, 65, 200, 1000):
        for bits in (1, 4, 8):
            check_all_ops(backend, n, bits, n % 3, "cpu")


GPU_BIG = (1 << 23) + 5  # several grid-stride trips of the CUDA kernels (grids are capped)


@pytest.mark.parametrize("bits", [1, 5, 8])
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_sizes_take_several_grid_stride_trips(backend, bits, offset):
    if backend.device != "cuda":
        pytest.skip("GPU only (2^23 elements)")
    check_all_ops(backend, GPU_BIG, bits, offset, backend.device)  # reference on the GPU: fast


@pytest.mark.parametrize("where", [5, 3 << 21, GPU_BIG - 1])
def test_gpu_a_code_that_does_not_fit_is_found_in_any_block(backend, where):
    if backend.device != "cuda":
        pytest.skip("GPU only (2^23 elements)")
    codes = torch.zeros(GPU_BIG + 1, dtype=torch.uint8, device=backend.device)
    codes[where] = 1 << 5
    said = "" if backend.name == "reference" else r" .* OR-ed together are 0x20\)"
    with backend.active():
        for c in (codes[:GPU_BIG], codes[1:]):
            with pytest.raises(ValueError, match="does not fit in 5 bits" + said):
                fk.pack_codes(c, 5, validate=True)
            with pytest.raises(ValueError, match="does not fit in 5 bits" + said):
                fk.pack_codes(c, 5)
                fk.check_packed(c.device)


@pytest.mark.parametrize("bits", [1, 4])
def test_dequant_accumulate_ignores_the_padding_bits_of_the_planes(backend, bits):
    """Only the n bits of each plane (and of signs) are codes: bits set past n in the last
    word (planes packed elsewhere, or a reused buffer) change nothing, and the elements of the
    buffer past acc's n (here -0.0, which even an added 0 would turn into +0.0) are never
    written. Checked on a slice, with the last block masked."""
    dev = backend.device
    n = 45  # two words per plane, 19 padding bits in the second
    codes = codes_for(n, bits, dev, seed=3)
    planes = R.pack_codes(codes.cpu(), bits).view(torch.int32).clone()
    signs = R.pack_codes(codes_for(n, 1, dev, seed=4).cpu(), 1).view(torch.int32).clone()
    want_planes, want_signs = planes.clone().view(torch.uint8), signs.clone().view(torch.uint8)
    planes[1::2] |= torch.tensor(-1 << (n - 32), dtype=torch.int32)  # every plane's padding bits set
    signs[1] |= torch.tensor(-1 << (n - 32), dtype=torch.int32)
    planes, signs = planes.view(torch.uint8).to(dev), signs.view(torch.uint8).to(dev)
    buf0 = torch.randn(n + 8, generator=torch.Generator().manual_seed(2))
    buf0[n + 1:] = -0.0
    want = buf0.clone()
    R.dequant_accumulate(want[1:n + 1], want_planes, want_signs, bits, coef_of(0.5, 2.0, bits))
    with backend.active():
        buf = buf0.to(dev)
        fk.dequant_accumulate(buf[1:n + 1], planes, signs, bits, 0.5, 2.0)
        assert torch.equal(buf.cpu(), want)
        assert torch.signbit(buf[n + 1:]).all(), "an element past acc was written"
        assert torch.equal(fk.unpack_codes(planes, bits, n), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("kind", ["transposed", "step3", "expanded", "contiguous"])
def test_views_and_sizes_across_program_blocks(backend, bits, kind):
    """Codes as a transposed matrix, a slice with step 3, an expanded column (stride 0), each
    past the Triton kernels' 4096-element program, and contiguous 8199 (two whole programs
    and a tail; sizes the interpreter runs in about a second): pack, unpack and
    dequant_accumulate against the reference, bit for bit."""
    dev = backend.device
    if kind == "transposed":
        codes = codes_for(33 * 125, bits, dev).view(33, 125).t()
    elif kind == "step3":
        codes = codes_for(3 * 4097, bits, dev)[::3]
    elif kind == "expanded":
        codes = codes_for(33, bits, dev).view(33, 1).expand(33, 125)
    else:
        codes = codes_for(8199, bits, dev)
    assert kind == "contiguous" or not codes.is_contiguous()
    n = codes.numel()
    flat = codes.cpu().reshape(-1)
    neg = codes_for(n, 1, dev, seed=1)
    want_planes = R.pack_codes(flat, bits)
    signs = R.pack_codes(neg.cpu(), 1).to(dev)
    acc0 = torch.randn(n, generator=torch.Generator().manual_seed(n))
    with backend.active():
        planes = fk.pack_codes(codes, bits)
        assert torch.equal(planes.cpu(), want_planes)
        assert torch.equal(fk.unpack_codes(planes, bits, n).cpu(), flat)
        for sg in (signs, None):
            acc = acc0.clone().to(dev)
            fk.dequant_accumulate(acc, planes, sg, bits, 0.37, 3.0)
            want = acc0.clone()
            coef = float(np.float32(3.0) * (np.float32(0.37) / np.float32((1 << bits) - 1)))
            R.dequant_accumulate(want, want_planes, None if sg is None else sg.cpu(), bits, coef)
            assert torch.equal(acc.cpu().view(torch.int32), want.view(torch.int32))


def test_accumulate_takes_every_float32_scale_and_weight(backend):
    """At float32's edges: a 1-bit scale of 3.2e38 (its coefficient finite; refused by a
    conservative 3.0e38 bound before), a weight of 1e-50 (float32 0: adds zeros), a scale of
    1e-50 with a weight of 1e30 (float32 0 * 1e30 = 0, never inf * 0): every backend adds
    the reference's float32 ``weight * (scale / L) * sigma * q``."""
    d = backend.device
    n = 40
    codes = torch.arange(n, dtype=torch.uint8) % 2
    neg = torch.arange(n) % 3 == 0
    planes = fk.pack_codes(codes.to(d), 1)
    signs = fk.pack_codes(neg.to(torch.uint8).to(d), 1)
    for scale, weight, want in ((3.2e38, 1.0, 3.2e38), (1.0, 1e-50, 0.0), (1e-50, 1e30, 0.0)):
        acc = torch.ones(n, device=d)
        with backend.active():
            fk.dequant_accumulate(acc, planes, signs, 1, scale, weight)
        exp = torch.ones(n) + torch.where(neg, -1.0, 1.0) * codes.float() * torch.tensor(want, dtype=torch.float32)
        assert torch.isfinite(acc).all(), (scale, weight)
        assert torch.equal(acc.cpu(), exp), (scale, weight)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 33, 1023])
def test_accumulate_from_planes_and_signs_at_odd_byte_offsets_or_strided(backend, bits, n):
    """Planes and signs sliced out of a payload at odd byte offsets (the copy the backends
    make of unaligned bytes), and strided planes, every width: the reference's sums, bit for
    bit (only unpack_codes and the CUDA adapter took such planes before)."""
    g = torch.Generator().manual_seed(n * 9 + bits)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
    neg = torch.randint(0, 2, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
    planes, signs = R.pack_codes(codes, bits), R.pack_codes(neg, 1)

    def at_offset(t, k):
        raw = torch.zeros(t.numel() + k, dtype=torch.uint8)
        raw[k:] = t
        return raw[k:].to(backend.device)

    acc0 = torch.randn(n, generator=g)
    want = acc0.clone()
    R.dequant_accumulate(want, planes, signs, bits, float(np.float32(2.0) * (np.float32(0.3) / np.float32((1 << bits) - 1))))
    cases = [(at_offset(planes, k), at_offset(signs, (k + 2) % 4 or 3)) for k in (1, 2, 3)]
    cases.append((torch.stack([planes, planes], 1)[:, 0].to(backend.device), signs.to(backend.device)))
    for p, sg in cases:
        acc = acc0.clone().to(backend.device)
        with backend.active():
            fk.dequant_accumulate(acc, p, sg, bits, 0.3, 2.0)
        assert torch.equal(acc.cpu().view(torch.int32), want.view(torch.int32)), (p.storage_offset(), p.stride())
