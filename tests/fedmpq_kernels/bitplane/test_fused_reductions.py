"""The Triton kernels that finish their reduction in the last program (binarize's scale,
dequantize_backward's dL/ds), with many programs: the interpreter takes small sizes only,
so the blocks shrink to 64 elements and the finish step to 4 slots."""
from __future__ import annotations

import pytest
import torch

from fedmpq_kernels.bitplane import reference as R

from .helpers import bits_of, layer, weights


@pytest.mark.parametrize("numel", [64, 65, 256, 257, 4000])
def test_triton_last_program_reductions_with_many_programs(backend, monkeypatch, numel):
    if backend.name != "triton" or backend.device != "cpu":
        pytest.skip("the Triton interpreter case")
    from fedmpq_kernels import _triton_common
    mod = backend.module("bitplane")
    monkeypatch.setattr(mod, "BLOCK", 64)
    monkeypatch.setattr(mod, "FINISH", 4)
    monkeypatch.setattr(_triton_common, "FINISH", 4)
    for bits in (1, 4, 8):
        w = weights(numel, bits)
        w[numel // 3] = -5.0  # the maximum |w| in one program, not the last
        q, s, sc = mod.binarize(w, bits)
        rq, rs, rsc = R.binarize(w, bits)
        assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(bits_of(sc), bits_of(rsc))
        q, s, _ = layer(numel, bits, seed=3)
        # integer gradients: the float64 sums are exact in any order, so the result is the
        # reference's bit for bit (one division, one rounding to float32)
        g = torch.randint(-50, 51, (numel,), generator=torch.Generator().manual_seed(numel)).float()
        assert torch.equal(bits_of(mod.dequantize_backward(g, q, s, bits)), bits_of(R.dequantize_backward(g, q, s, bits)))
        g = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
        torch.testing.assert_close(mod.dequantize_backward(g, q, s, bits), R.dequantize_backward(g, q, s, bits),
                                   rtol=1e-6, atol=0)
