"""The CUDA emulator's own arithmetic (tests/cuda_emu/emu.h): its float16 and bfloat16
conversions against torch's on the CPU (both round to nearest even; NaN becomes the GPU's
canonical NaN, 0x7fff, where torch keeps a quiet NaN), over every half and a sweep of
float32 bit patterns (subnormals, the overflow edge, ties)."""
from __future__ import annotations

import ctypes

import pytest
import torch


def _floats() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    rand = torch.randint(-(1 << 31), 1 << 31, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 6.1035156e-05, 6.0975552e-05,
                          5.9604645e-08, 2.9802322e-08, 2.9802326e-08, 8.940697e-08, 1e-30, float("inf"),
                          -float("inf"), 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 3.3895314e38])
    # halves and halfway points between neighbouring halves: ties in both directions
    h = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    h = h[torch.isfinite(h)]
    mids = (h[:-1].double() + h[1:].double()) / 2
    return torch.cat([rand.view(torch.float32), edges, h, mids.float()])


@pytest.fixture(scope="module")
def lib(cuda_emu):
    L = cuda_emu.lib
    for name in ("emu_to_half", "emu_from_half", "emu_to_bfloat16"):
        getattr(L, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
    return L


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_float32_to_16_bits_rounds_as_torch(lib, dtype):
    x = _floats()
    out = torch.empty(x.numel(), dtype=torch.int16)
    (lib.emu_to_half if dtype == torch.float16 else lib.emu_to_bfloat16)(x.data_ptr(), out.data_ptr(), x.numel())
    want = x.to(dtype).view(torch.int16)
    nan = torch.isnan(x)
    assert torch.equal(out[nan], torch.full((int(nan.sum()),), 0x7FFF, dtype=torch.int16))
    bad = (out[~nan] != want[~nan]).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} differ, e.g. {x[~nan][bad[:4]].tolist()}"


def test_every_half_widens_as_torch(lib):
    h = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    out = torch.empty(h.numel(), dtype=torch.float32)
    lib.emu_from_half(h.data_ptr(), out.data_ptr(), h.numel())
    want = h.view(torch.float16).float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))
