"""The CUDA backend's packing adapters (fedmpq_kernels/pack/cuda.py) without a GPU: CPU
tensors, with the CUDA kernels compiled for the host (tests/cuda_emu) standing in for
``_C.cuda`` (tests/cuda_emu/launchers.py). This checks what the adapters add to the kernels
(argument order, the status word of the deferred range check, strided codes, planes and
signs at odd offsets, accumulators sliced at an odd offset) against the reference; the
kernels themselves are test_cuda_emulated.py's."""
from __future__ import annotations

import pytest
import torch

from fedmpq_kernels.pack import _common
from fedmpq_kernels.pack import reference as P
from tests.cuda_emu.launchers import wire


@pytest.fixture
def pc(emu, monkeypatch):
    """fedmpq_kernels.pack.cuda wired to the emulated kernels, with its own status words."""
    from fedmpq_kernels.pack import cuda as pc

    wire(pc, emu, monkeypatch)
    monkeypatch.setattr(_common, "_STATUS", {})
    return pc


def _codes(n: int, bits: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n * 9 + bits)
    return torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int32).to(torch.uint8)


def _odd(t: torch.Tensor) -> torch.Tensor:
    """A copy of the uint8 tensor t one byte past a 4-byte boundary."""
    raw = torch.empty(t.numel() + 1, dtype=torch.uint8)
    raw[1:].copy_(t)
    return raw[1:]


@pytest.mark.parametrize("n", [1, 33, 4099])
def test_pack_and_unpack_codes(pc, n):
    for bits in range(1, 9):
        codes = _codes(n, bits)
        strided = torch.stack([codes, codes], 1)[:, 0]
        planes = pc.pack_codes(strided, bits)
        assert torch.equal(planes, P.pack_codes(codes, bits)), f"{bits} bits"
        assert torch.equal(pc.unpack_codes(_odd(planes), bits, n), codes), f"{bits} bits"
    _common.check_packed("cpu")  # every code fit: nothing to report


def test_pack_codes_defers_the_range_check_to_check_packed(pc):
    codes = _codes(100, 3)
    codes[57] = 9
    pc.pack_codes(codes, 3)  # no error in the call: the kernel ORs the codes into a status word
    with pytest.raises(ValueError, match="3 bits on cpu \\(the bits of its codes OR-ed together are 0xf\\)"):
        _common.check_packed("cpu")
    _common.check_packed("cpu")  # read and cleared


@pytest.mark.parametrize("signed", [False, True], ids=["no-signs", "signs"])
@pytest.mark.parametrize("n", [1, 33, 4099])
def test_dequant_accumulate(pc, n, signed):
    gen = torch.Generator().manual_seed(n)
    for bits in (1, 4, 8):
        planes = P.pack_codes(_codes(n, bits), bits)
        signs = P.pack_bitmap(torch.rand(n, generator=gen) < 0.5) if signed else None
        coef = float(torch.tensor(0.37 / ((1 << bits) - 1), dtype=torch.float32))
        start = torch.randn(n + 1, generator=gen)
        acc = start.clone()[1:]  # a slice at an odd offset: the kernel's scalar path
        want = start[1:].clone()
        P.dequant_accumulate(want, planes, signs, bits, coef)
        pc.dequant_accumulate(acc, _odd(planes), None if signs is None else _odd(signs), bits, coef)
        assert torch.equal(acc.view(torch.int32), want.view(torch.int32)), f"{bits} bits"
    assert pc.native.cuda.calls.count("dequant_accumulate") == 3


def test_check_packed_without_a_device_checks_every_device(pc):
    """check_packed() (no device) reads the status words of every device pack_codes ran on,
    here the CPU's, and clears them."""
    codes = _codes(100, 2)
    codes[3] = 4
    pc.pack_codes(codes, 2)
    with pytest.raises(ValueError, match="2 bits on cpu"):
        _common.check_packed()
    _common.check_packed()


def test_dequant_accumulate_layers_is_one_kernel_per_row(pc):
    """The CUDA backend has no table kernel: one dequant_accumulate launch per row (the empty
    layer launches nothing), the table checked whole first, the reference's bits."""
    from tests.fedmpq_kernels.pack.test_layers import make_payload

    sizes, bits = [0, 1, 33, 4099], [2, 8, 3, 5]
    payload, table, acc_n, _, _ = make_payload(sizes, bits, "cpu", seed=6)
    coefs = torch.tensor([0.5, 0.25, 0.125, 3.0])
    acc0 = torch.randn(acc_n, generator=torch.Generator().manual_seed(2))
    want = acc0.clone()
    P.dequant_accumulate_layers(want, payload, table, coefs)
    got = acc0.clone()
    pc.dequant_accumulate_layers(got, payload, table, coefs)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert pc.native.cuda.calls.count("dequant_accumulate") == 3
    bad = table.clone()
    bad[3, 3] += 2  # misaligned data offset: refused before any launch
    with pytest.raises(ValueError, match="table row 3"):
        pc.dequant_accumulate_layers(acc0.clone(), payload, bad, coefs)
    assert pc.native.cuda.calls.count("dequant_accumulate") == 3
