"""The bit-plane native boundary re-checks every size and argument it is given (a
ValueError, never an out-of-bounds access), and its step gives the same state for any
thread count and instruction set."""
from __future__ import annotations

import pytest
import torch

from fedmpq_kernels._native import native
from fedmpq_kernels.bitplane import reference as R

from .helpers import BIG, fresh_state

needs_native = pytest.mark.skipif(native is None, reason="native module not built")


def _native_step():
    n, bits = 100, 4
    keep = dict(codes=torch.zeros(n, dtype=torch.uint8), sign=torch.zeros(16, dtype=torch.uint8),
                mom=torch.zeros(bits * n, dtype=torch.uint8), gs=torch.zeros(1), grad=torch.zeros(n), coef=torch.zeros(bits))
    a = dict(codes=keep["codes"].data_ptr(), n=n, sign=keep["sign"].data_ptr(), sign_nbytes=16, mom=keep["mom"].data_ptr(),
             mom_len=bits * n, gs=keep["gs"].data_ptr(), grad=keep["grad"].data_ptr(), grad_len=n,
             coef=keep["coef"].data_ptr(), coef_len=bits, scale=1.0, bits=bits, lr=0.1, momentum=0.5, key=1, nthreads=2)
    return a, keep


@needs_native
@pytest.mark.parametrize(
    "over, match",
    [
        (dict(sign_nbytes=12), "sign bitmap has 12 bytes, needs 16"),
        (dict(mom_len=399), "mom: buffer holds 399 elements, needs 400"),
        (dict(coef_len=3), "coef: buffer holds 3 elements, needs 4"),
        # grad's own length, not codes' count taken on trust: shorter would be read past its end
        (dict(grad_len=99), "grad has 99 elements, codes 100"),
        (dict(grad_len=101), "grad has 101 elements, codes 100"),
        (dict(bits=9), "bits must be in 1..8"),
        (dict(bits=0), "bits must be in 1..8"),
        (dict(n=-1), "negative element count"),
        (dict(grad=0), "grad: null data pointer"),
        (dict(gs=0), "gs: null data pointer"),
        (dict(key=-1), "key must be a uint32"),
        (dict(key=2**32), "key must be a uint32"),
        (dict(lr=0.0), "lr must be finite and > 0"),
        (dict(lr=float("inf")), "lr must be finite and > 0"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(momentum=-0.1), r"momentum must be in \[0, 1\)"),
        (dict(lr=2.0**-150), "lr must be finite and > 0"),  # float32 0
        (dict(momentum=1 - 2.0**-25), r"momentum must be in \[0, 1\)"),  # float32 1
        (dict(n=2**32, mom_len=2**34), "2\\^32 weights"),
    ],
)
def test_native_step_rejects_inconsistent_arguments(over, match):
    a, keep = _native_step()
    a.update(over)
    with pytest.raises(ValueError, match=match):
        native.cpu.bitplane_step(**a)


@needs_native
def test_native_step_rejects_overlapping_buffers():
    a, keep = _native_step()
    with pytest.raises(ValueError, match="codes and mom overlap"):
        native.cpu.bitplane_step(**dict(a, mom=a["codes"] + 50))
    with pytest.raises(ValueError, match="gs and grad overlap"):
        native.cpu.bitplane_step(**dict(a, gs=a["grad"] + 8))
    # coef is read for every element while mom is written: apart from everything written
    with pytest.raises(ValueError, match="coef and mom overlap"):
        native.cpu.bitplane_step(**dict(a, coef=a["mom"] + 8))
    with pytest.raises(ValueError, match="coef and gs overlap"):
        native.cpu.bitplane_step(**dict(a, coef=a["gs"] - 12))
    with pytest.raises(ValueError, match="sign and grad overlap"):
        native.cpu.bitplane_step(**dict(a, sign=a["grad"]))


@needs_native
@pytest.mark.parametrize("name", ["gs", "grad", "coef"])
def test_native_step_refuses_misaligned_float_buffers(name):
    """The float32 buffers the step reads or writes must be 4-byte aligned, like the sign
    words (a misaligned float load is undefined behaviour)."""
    a, keep = _native_step()
    with pytest.raises(ValueError, match=f"{name}: data pointer is not 4-byte aligned"):
        native.cpu.bitplane_step(**dict(a, **{name: a[name] + 2}))


@needs_native
def test_native_step_empty_buffers_never_overlap():
    """An empty layer's buffers hold no bytes, so they clash with nothing, even where their
    pointers fall inside another buffer (an empty view into a shared allocation): the step
    runs (g_s = 0) instead of refusing an overlap."""
    a, keep = _native_step()
    inside = keep["coef"].data_ptr() + 4
    e = dict(a, n=0, codes=inside, sign=inside, sign_nbytes=0, mom=inside, mom_len=0, grad=inside, grad_len=0)
    assert native.cpu.bitplane_step(**e) == 0.0


@needs_native
def test_native_step_refuses_every_pair_of_overlapping_buffers():
    """Each of the step's buffers placed at the start of another it fits in (so nothing is
    read past an allocation): every pair is refused. Only grad and coef, both only read,
    may share memory."""
    a, keep = _native_step()
    size = {k: t.numel() * t.element_size() for k, t in keep.items()}
    for x in size:
        for y in size:
            if x != y and size[x] <= size[y] and {x, y} != {"grad", "coef"}:
                with pytest.raises(ValueError, match="overlap"):
                    native.cpu.bitplane_step(**dict(a, **{x: a[y]}))


@needs_native
def test_native_other_ops_reject_inconsistent_arguments():
    n = 100
    w, codes, sign, out = torch.zeros(n), torch.zeros(n, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8), torch.zeros(n)
    pc = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="codes: buffer holds 99 elements"):
        native.cpu.binarize(w.data_ptr(), n, 4, codes.data_ptr(), 99, sign.data_ptr(), 16, 1)
    with pytest.raises(ValueError, match="sign bitmap has 8 bytes, needs 16"):
        native.cpu.binarize(w.data_ptr(), n, 4, codes.data_ptr(), n, sign.data_ptr(), 8, 1)
    with pytest.raises(ValueError, match="sign bitmap must be 4-byte aligned"):
        native.cpu.dequantize(codes.data_ptr(), n, sign.data_ptr() + 1, 16, 1.0, 4, out.data_ptr(), n, 1)
    with pytest.raises(ValueError, match="sign bitmap is required"):
        native.cpu.dequantize(codes.data_ptr(), n, 0, 0, 1.0, 4, out.data_ptr(), n, 1)
    with pytest.raises(ValueError, match="out: buffer holds 50 elements"):
        native.cpu.dequantize(codes.data_ptr(), n, sign.data_ptr(), 16, 1.0, 4, out.data_ptr(), 50, 1)
    with pytest.raises(ValueError, match="4-byte aligned"):
        native.cpu.dequantize_backward(w.data_ptr() + 2, n - 1, codes.data_ptr(), n - 1, sign.data_ptr(), 16, 4, 1)
    for short in (n - 1, n + 1):  # codes' own length, checked against grad's count
        with pytest.raises(ValueError, match=f"grad has {n} elements, codes {short}"):
            native.cpu.dequantize_backward(w.data_ptr(), n, codes.data_ptr(), short, sign.data_ptr(), 16, 4, 1)
    with pytest.raises(ValueError, match="out: buffer holds 4 elements, needs 8"):
        native.cpu.plane_popcounts(codes.data_ptr(), n, 8, pc.data_ptr(), 4, 1)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        native.cpu.plane_popcounts(codes.data_ptr(), n, 9, pc.data_ptr(), 9, 1)
    with pytest.raises(ValueError, match="sign bitmap has 8 bytes, needs 16"):
        native.cpu.dequantize_backward(w.data_ptr(), n, codes.data_ptr(), n, sign.data_ptr(), 8, 4, 1)
    # what a kernel writes must not overlap what it reads or writes besides
    with pytest.raises(ValueError, match="w and codes overlap"):
        native.cpu.binarize(w.data_ptr(), n, 4, w.data_ptr() + 8, n, sign.data_ptr(), 16, 1)
    big = torch.zeros(128, dtype=torch.uint8)
    with pytest.raises(ValueError, match="codes and sign overlap"):
        native.cpu.binarize(w.data_ptr(), n, 4, big.data_ptr(), n, big.data_ptr() + 96, 16, 1)
    with pytest.raises(ValueError, match="codes and out overlap"):
        native.cpu.dequantize(out.data_ptr() + 4, n, sign.data_ptr(), 16, 1.0, 4, out.data_ptr(), n, 1)


@needs_native
@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_native_step_threads_and_isas_agree(isa):
    if isa == "avx2" and not native.avx2_available():
        pytest.skip("no AVX2")
    prev = native.cpu_isa()
    native.set_cpu_isa(isa)
    try:
        _threads_agree()
    finally:
        native.set_cpu_isa(prev)


def _threads_agree():
    n, bits = BIG, 6
    results = []
    for nt in (1, 2, 3):
        (codes, sign, mom, gs), scale = fresh_state(n, bits, "cpu")
        grad = torch.randn(n, generator=torch.Generator().manual_seed(8)) * 0.1
        coef = torch.full((bits,), 1e-3)
        for t in range(2):
            g = native.cpu.bitplane_step(codes.data_ptr(), n, sign.data_ptr(), sign.numel(), mom.data_ptr(), mom.numel(),
                                         gs.data_ptr(), grad.data_ptr(), n, coef.data_ptr(), bits, float(scale), bits,
                                         0.5, 0.9, R.step_key(0, t, 0), nt)
        results.append((codes, sign, mom, gs, g))
    for r in results[1:]:
        for a, b in zip(r[:4], results[0][:4]):
            assert torch.equal(a, b)
        assert r[4] == results[0][4]
