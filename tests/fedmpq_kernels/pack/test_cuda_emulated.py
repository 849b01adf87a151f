"""The CUDA C++ packing kernels (csrc/cuda/pack.cu) run on the CPU under the emulator of
tests/cuda_emu: pack_codes (with the range check it ORs into *seen), unpack_codes and
dequant_accumulate against the reference, bit for bit, for every width, on the vector path
(16-byte-aligned codes or acc: whole tiles, then scalar words) and the scalar one (a slice at
an odd offset), with loads checked against the buffers and a canary around every output.
Speed, and the kernels on real hardware, are tools/gpu_check.sh's."""
from __future__ import annotations

import pytest
import torch

from fedmpq_kernels.pack import reference as P
from tests.cuda_emu import Guarded, words

BITS = list(range(1, 9))
# One SM holds 64 warps: 70000 codes take the tile loop's grid stride three times (512 codes
# a tile), sizes around 512 and 32 cut a tile or a word short.
SIZES = [1, 31, 32, 33, 511, 512, 513, 4099, 70001]
# bytes past a 16-byte boundary: 0 the vector path, else the scalar one (8: aligned for 8-byte
# loads, not for a 16-byte vector, which faults on a GPU and which the emulator's alignment
# check refuses)
OFFSETS = [0, 1, 5, 8]


def _codes(n: int, bits: int, offset: int) -> Guarded:
    c = Guarded(n, torch.uint8, offset)
    c.t.copy_(torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n * 9 + bits),
                            dtype=torch.int32).to(torch.uint8))
    return c


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("n", SIZES)
def test_pack_codes(emu, n, offset):
    for bits in BITS:
        codes = _codes(n, bits, offset)
        planes = Guarded(bits * words(n), torch.int32)
        seen = torch.zeros(1, dtype=torch.int32)
        emu.pack_codes(codes.t, bits, planes.t, seen)
        assert torch.equal(planes.t.view(torch.uint8), P.pack_codes(codes.t, bits)), f"{bits} bits"
        planes.check("planes")
        want = 0
        for v in codes.t.unique().tolist():
            want |= v
        assert int(seen) == want, f"{bits} bits: seen {int(seen):#x}, the codes OR to {want:#x}"


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n", [33, 513, 70001])
def test_pack_codes_reports_a_code_that_does_not_fit_wherever_it_is(emu, n, offset):
    """One code >= 2**bits at the start, in each 4-byte word of a lane's 16 codes, in the
    tiles, in the last word: it shows in *seen, which the kernel ORs into (earlier calls'
    bits stay). A block's warps run one at a time, in a shuffled order: the block's OR of
    its warps' codes must wait for all of them (its barrier)."""
    emu.warp_order(n + offset)
    for bits in (1, 3, 7):
        for at in sorted({a for a in (0, 5, 10, 15, 127, n // 2, n - 1) if a < n}):
            codes = _codes(n, bits, offset)
            codes.t[at] = 1 << bits
            seen = torch.tensor([0x100], dtype=torch.int32)  # an earlier call's OR: kept
            emu.pack_codes(codes.t, bits, torch.empty(bits * words(n), dtype=torch.int32), seen)
            assert int(seen) >> bits == 1 | (0x100 >> bits), f"{bits} bits, bad code at {at}: seen {int(seen):#x}"


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("n", SIZES)
def test_unpack_codes(emu, n, offset):
    for bits in BITS:
        want = _codes(n, bits, 0).t
        planes = P.pack_codes(want, bits).view(torch.int32)
        out = Guarded(n, torch.uint8, offset)
        emu.unpack_codes(planes, n, bits, out.t)
        assert torch.equal(out.t, want), f"{bits} bits"
        out.check("codes")


@pytest.mark.parametrize("signed", [False, True], ids=["no-signs", "signs"])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])  # floats past a 16-byte boundary (2: 8-byte aligned only)
@pytest.mark.parametrize("n", SIZES)
def test_dequant_accumulate(emu, n, offset, signed):
    gen = torch.Generator().manual_seed(n)
    for bits in BITS:
        codes = _codes(n, bits, 0).t
        planes = P.pack_codes(codes, bits).view(torch.int32)
        signs = P.pack_bitmap(torch.rand(n, generator=gen) < 0.5).view(torch.int32) if signed else None
        coef = float(torch.tensor(0.37 / ((1 << bits) - 1), dtype=torch.float32))
        acc = Guarded(n, torch.float32, offset)
        acc.t.copy_(torch.randn(n, generator=gen))
        want = acc.t.clone()
        P.dequant_accumulate(want, planes.view(torch.uint8), None if signs is None else signs.view(torch.uint8), bits,
                             coef)
        emu.dequant_accumulate(acc.t, planes, signs, bits, coef)
        assert torch.equal(acc.t.view(torch.int32), want.view(torch.int32)), f"{bits} bits"
        acc.check("acc")


def test_errors_and_empty_inputs(emu):
    codes = torch.zeros(40, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits must be in 1..8, got 9"):
        emu.pack_codes(codes, 9, torch.empty(100, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="on cuda:2"):
        emu.unpack_codes(torch.zeros(2, dtype=torch.int32), 40, 1, codes, device=2)
    seen = torch.zeros(1, dtype=torch.int32)
    out = Guarded(0, torch.int32)
    emu.pack_codes(torch.empty(0, dtype=torch.uint8), 4, out.t, seen)  # n == 0: nothing launched
    out.check("planes")
    assert int(seen) == 0


@pytest.mark.parametrize("offset", [0, 1])
def test_pack_codes_reports_a_bad_code_in_every_warp_of_a_block(emu, offset):
    """The block's OR of its warps' codes takes all 8 warps: with one tile (aligned) or one
    scalar word (a slice) per warp, a code >= 2**bits in warp k's share alone shows in
    *seen, for every k."""
    per_warp = 512 if offset == 0 else 32
    n = 8 * per_warp  # one block of 8 warps, one share each
    for k in range(8):
        codes = _codes(n, 2, offset)
        codes.t[k * per_warp + 7] = 4
        seen = torch.zeros(1, dtype=torch.int32)
        emu.pack_codes(codes.t, 2, torch.empty(2 * words(n), dtype=torch.int32), seen)
        assert int(seen) >> 2 == 1, f"a bad code in warp {k}'s share: seen {int(seen):#x}"


def test_bits_outside_1_to_8_are_refused(emu):
    """Every packing launcher refuses bits 0 and 9 (the kernels exist for 1..8 only) before
    looking at n, so an empty input is refused too."""
    codes, acc = torch.zeros(40, dtype=torch.uint8), torch.zeros(40)
    planes, seen = torch.zeros(100, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    for bits in (0, 9):
        for n in (40, 0):
            with pytest.raises(ValueError, match=f"bits must be in 1..8, got {bits}"):
                emu.pack_codes(codes[:n], bits, planes, seen)
            with pytest.raises(ValueError, match=f"bits must be in 1..8, got {bits}"):
                emu.unpack_codes(planes, n, bits, codes)
            with pytest.raises(ValueError, match=f"bits must be in 1..8, got {bits}"):
                emu.dequant_accumulate(acc[:n], planes, None, bits, 1.0)
