"""The Triton kernels that finish their reduction in the last program (binarize's scale,
dequantize_backward's dL/ds, the popcounts' planes, the step's g_s), with many programs: the
interpreter takes small sizes only, so the blocks shrink to 64 elements (the step's to 32)
and the finish step to 4 slots."""
from __future__ import annotations

import pytest
import torch

from fedmpq_kernels.bitplane import reference as R

from .helpers import STEPS, bits_of, fresh_state, layer, reference_run, weights


@pytest.mark.parametrize("numel", [64, 65, 256, 257, 4000])
def test_triton_last_program_reductions_with_many_programs(backend, monkeypatch, numel):
    if not backend.interpreted:
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


def _many_programs(backend, monkeypatch):
    """The Triton bit-plane module with 64-element blocks, 32-element step blocks and a
    4-slot finish step: many programs at the interpreter's small sizes."""
    from fedmpq_kernels import _triton_common
    mod = backend.module("bitplane")
    monkeypatch.setattr(mod, "BLOCK", 64)
    monkeypatch.setattr(mod, "STEP_CONFIG", {b: (32, 1) for b in range(1, 9)})
    monkeypatch.setattr(mod, "FINISH", 4)
    monkeypatch.setattr(_triton_common, "FINISH", 4)
    return mod


@pytest.mark.parametrize("numel", [33, 64, 65, 257, 1000])
def test_triton_popcounts_and_step_finish_in_the_last_program(backend, monkeypatch, numel):
    """plane_popcounts (per-plane int64 sums of the programs' counts) and the step's g_s
    (the max over the programs' maxima, then gs and the previous gs) against the reference
    over several steps, with up to 32 step programs and 16 popcount programs."""
    if not backend.interpreted:
        pytest.skip("the Triton interpreter case")
    mod = _many_programs(backend, monkeypatch)
    # at 1,000 weights two steps (the second with momentum): the other three took 14 s more
    steps = 2 if numel >= 1000 else STEPS
    for bits in (1, 3, 8):
        (codes, sign, mom, gs), scale = fresh_state(numel, bits, "cpu")
        for t, (grad, coef, key, want, want_gs) in enumerate(reference_run(numel, bits, 0.5, 0.9)[:steps]):
            assert torch.equal(mod.plane_popcounts(codes, bits), R.plane_popcounts(codes, bits)), f"step {t}"
            got_gs = mod.bitplane_step(codes, sign, mom, gs, grad, coef, scale, bits, 0.5, 0.9, key)
            assert torch.equal(bits_of(got_gs), bits_of(want_gs)), f"{bits} bits, step {t}: g_s"
            for name, a, b in zip(("codes", "sign", "mom", "gs"), (codes, sign, mom, gs), want):
                assert torch.equal(a, b), f"{bits} bits, step {t}: {name}"


def test_triton_momentum_planes_start_at_int64_offsets(backend):
    """Plane I of the momentum codes starts at I * n. n reaches a kernel as int32 below 2^31,
    and an int32 product wrapped once (N - 1) * n >= 2^31 (8 bits: 3.1e8 weights), sending
    planes 1..N-1 before ``mom``; the interpreter wraps as a GPU does. Too large to step here,
    so the offset itself is checked, for int32 and int64 n."""
    if not backend.interpreted:
        pytest.skip("the Triton interpreter case")
    from ._triton_offsets import plane_offsets
    for n in (1, (1 << 31) // 7 + 1, (1 << 30) + 5, (1 << 31) - 1, (1 << 31) + 3):
        out = torch.zeros(8, dtype=torch.int64)
        plane_offsets[(1,)](out, n, N=8)
        assert out.tolist() == [i * n for i in range(8)], n


def test_triton_reductions_leave_the_ticket_at_zero_in_a_kept_workspace(backend, monkeypatch):
    """On a GPU every launch on a stream gets the same workspace, so each kernel that finishes
    in its last program must set the ticket (word 0) back to 0: else the next launch's
    "last" program is one that arrives early and reads slots not yet written. The
    interpreter makes a fresh workspace per call, which hides that; here every launch gets one
    kept buffer, as on a GPU (its stale slots from the launch before included), and the
    ticket is checked after every call: absmax (binarize's scale), dequantize_backward, the
    popcounts and the step's g_s, each with many programs."""
    if not backend.interpreted:
        pytest.skip("the Triton interpreter case")
    mod = _many_programs(backend, monkeypatch)
    kept = torch.zeros(1 << 12, dtype=torch.int32)

    def the_kept_one(device, nprog, wide=False):
        words = 2 * (nprog + 1) if wide else nprog + 1
        assert int(kept[0]) == 0, "a launch left the ticket set"
        return kept[:words]

    from fedmpq_kernels import _triton_common
    monkeypatch.setattr(_triton_common, "reduction_workspace", the_kept_one)
    monkeypatch.setattr(mod, "reduction_workspace", the_kept_one)
    numel, bits = 257, 3
    w = weights(numel, bits)
    g = torch.randint(-50, 51, (numel,), generator=torch.Generator().manual_seed(1)).float()
    for _ in range(2):  # the second round reads the workspace the first one left
        q, s, sc = mod.binarize(w, bits)
        assert int(kept[0]) == 0, "binarize (absmax)"
        rq, rs, rsc = R.binarize(w, bits)
        assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(bits_of(sc), bits_of(rsc))
        got = mod.dequantize_backward(g, q, s, bits)
        assert int(kept[0]) == 0, "dequantize_backward"
        assert torch.equal(bits_of(got), bits_of(R.dequantize_backward(g, q, s, bits)))
        assert torch.equal(mod.plane_popcounts(q, bits), R.plane_popcounts(q, bits))
        assert int(kept[0]) == 0, "plane_popcounts"
    (codes, sign, mom, gs), scale = fresh_state(numel, bits, "cpu")
    for t, (grad, coef, key, want, want_gs) in enumerate(reference_run(numel, bits, 0.5, 0.9, 2)):
        got_gs = mod.bitplane_step(codes, sign, mom, gs, grad, coef, scale, bits, 0.5, 0.9, key)
        assert int(kept[0]) == 0, f"bitplane_step {t}"
        assert torch.equal(bits_of(got_gs), bits_of(want_gs)), f"step {t}: g_s"
        for name, a, b in zip(("codes", "sign", "mom", "gs"), (codes, sign, mom, gs), want):
            assert torch.equal(a, b), f"step {t}: {name}"
