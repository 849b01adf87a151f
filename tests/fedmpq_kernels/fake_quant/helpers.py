"""Shared by this folder's tests: the sizes and offsets of the contiguous-slice cases, the
floating dtypes, and a bit-for-bit comparison."""
from __future__ import annotations

import pytest
import torch

# Sizes where a GPU kernel's grid-stride loops run several trips (at 2^20+3 a 132-SM GPU
# covers the tensor in one), and 16-byte vectors meet odd tails.
GPU_SIZES = [(1 << 23) + 5]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["f32", "f16", "bf16"]
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
SLICE_SIZES = [1023, 4099, (1 << 16) + 3]


def slice_offsets(backend, numel: int, dtype: torch.dtype):
    """For a test of contiguous slices x[k:]: skips what ``backend`` cannot run (GPU sizes off
    a GPU, large sizes in the Triton interpreter, bfloat16 there); returns (vec, the offsets
    k): vec elements of dtype make one 16-byte vector, and k takes every value below it (the
    CUDA kernels' shifted-load path), or 0, 1 and vec - 1 on large CPU sizes."""
    if numel in GPU_SIZES and backend.device != "cuda":
        pytest.skip("sizes for GPU grid-stride loops")
    backend.skip_if_too_big(numel)
    if backend.interpreted and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    return vec, (range(vec) if numel <= 4099 or backend.device == "cuda" else (0, 1, vec - 1))


def same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bit for bit, except that NaN matches any NaN (the GPU narrows NaN to its canonical
    pattern, torch on the CPU keeps the payload)."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    gn, wn = torch.isnan(got.float()), torch.isnan(want.float())
    assert torch.equal(gn, wn), f"{what}: NaN at different places"
    it = _INT[got.element_size()]
    g, w = got[~gn].view(it), want[~wn].view(it)
    bad = (g != w).nonzero().flatten()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} of {g.numel()} differ, first at {bad[:5].tolist()}: "
                              f"{got[~gn][bad[:3]].tolist()} vs {want[~wn][bad[:3]].tolist()}")


def exact_scale_grad(x, s, g) -> float:
    """The clipped STE's dL/ds (+g where x > s, -g where x < -s) summed in float64."""
    xf, gf = x.double().cpu(), g.double().cpu()
    sv = float(s)
    return float(gf[xf > sv].sum() - gf[xf < -sv].sum())
