"""The CUDA bit-plane bindings (csrc/bindings/bitplane.cpp, ``_C.cuda``) refuse inconsistent
sizes and pointers with a ValueError naming the problem, before any launch: no GPU is needed,
since every call below is refused first (the addresses are never dereferenced)."""
from __future__ import annotations

import pytest
import torch

from fedmpq_kernels._native import native

needs_cuda_build = pytest.mark.skipif(native is None or not getattr(native, "with_cuda", False),
                                      reason="fedmpq_kernels._C was built without CUDA")
_P = 1 << 20  # fake device addresses, 8-byte aligned and far apart


def _bin(**over):
    a = dict(w=_P, n=100, bits=4, codes=2 * _P, codes_cap=100, sign=3 * _P, sign_nbytes=16, scale=4 * _P,
             workspace=5 * _P, workspace_words=1 << 20, device=-1, stream=0)
    a.update(over)
    return a


def _dq(**over):
    a = dict(codes=_P, n=100, sign=2 * _P, sign_nbytes=16, scale=3 * _P, bits=4, out=4 * _P, out_cap=100, device=-1,
             stream=0)
    a.update(over)
    return a


def _dqb(**over):
    a = dict(grad=_P, n=100, codes=2 * _P, codes_len=100, sign=3 * _P, sign_nbytes=16, bits=4, out=4 * _P,
             workspace=5 * _P, workspace_words=1 << 20, device=-1, stream=0)
    a.update(over)
    return a


def _pc(**over):
    a = dict(codes=_P, n=100, bits=4, out=2 * _P, out_len=4, workspace=3 * _P, workspace_words=1 << 20, device=-1,
             stream=0)
    a.update(over)
    return a


def _step(**over):
    a = dict(codes=_P, n=100, sign=2 * _P, sign_nbytes=16, mom=3 * _P, mom_len=400, gs=4 * _P, grad=5 * _P,
             grad_len=100, coef=6 * _P, coef_len=4, scale=7 * _P, bits=4, lr=0.1, momentum=0.9, key=5, key_ptr=0,
             out=8 * _P, workspace=9 * _P, workspace_words=1 << 20, device=-1, stream=0)
    a.update(over)
    return a


CASES = [
    ("binarize", _bin, dict(w=_P + 2), "w: data pointer is not 4-byte aligned"),
    ("binarize", _bin, dict(codes_cap=99), "codes: buffer holds 99 elements, needs 100"),
    ("binarize", _bin, dict(bits=0), "bits must be in 1..8, got 0"),
    ("binarize", _bin, dict(sign_nbytes=8), "sign bitmap has 8 bytes, needs 16"),
    ("binarize", _bin, dict(scale=0), "scale pointer is null"),
    ("binarize", _bin, dict(codes=_P + 8), "w and codes overlap"),
    ("binarize", _bin, dict(scale=_P + 396), "scale and w overlap"),
    ("binarize", _bin, dict(scale=2 * _P + 96), "scale and codes overlap"),
    ("binarize", _bin, dict(scale=3 * _P + 12), "scale and sign overlap"),
    ("binarize", _bin, dict(workspace=5 * _P + 4), "not 8-byte aligned"),
    ("dequantize", _dq, dict(n=-1), "negative element count"),
    ("dequantize", _dq, dict(codes=0), "codes: null data pointer"),
    ("dequantize", _dq, dict(sign_nbytes=12), "sign bitmap has 12 bytes, needs 16"),
    ("dequantize", _dq, dict(sign=2 * _P + 2), "sign bitmap must be 4-byte aligned"),
    ("dequantize", _dq, dict(bits=9), "bits must be in 1..8, got 9"),
    ("dequantize", _dq, dict(scale=0), "scale pointer is null"),
    ("dequantize", _dq, dict(out_cap=99), "out: buffer holds 99 elements, needs 100"),
    ("dequantize", _dq, dict(out=4 * _P + 2), "out: data pointer is not 4-byte aligned"),
    ("dequantize", _dq, dict(out=_P - 4), "codes and out overlap"),
    ("dequantize_backward", _dqb, dict(grad=_P + 1), "grad: data pointer is not 4-byte aligned"),
    ("dequantize_backward", _dqb, dict(bits=0), "bits must be in 1..8, got 0"),
    ("dequantize_backward", _dqb, dict(out=0), "out pointer is null"),
    ("dequantize_backward", _dqb, dict(workspace=0), "reduction workspace pointer is null"),
    ("dequantize_backward", _dqb, dict(workspace=5 * _P + 4), "not 8-byte aligned"),
    ("dequantize_backward", _dqb, dict(n=(1 << 56) + 1), "more than the"),
    # codes' own length against grad's count (a shorter codes would be read past its end)
    ("dequantize_backward", _dqb, dict(codes_len=99), "grad has 100 elements, codes 99"),
    ("dequantize_backward", _dqb, dict(codes_len=101), "grad has 100 elements, codes 101"),
    ("plane_popcounts", _pc, dict(out_len=3), "out: buffer holds 3 elements, needs 4"),
    ("plane_popcounts", _pc, dict(out=2 * _P + 4), "out: data pointer is not 8-byte aligned"),
    ("plane_popcounts", _pc, dict(workspace=0), "reduction workspace pointer is null"),
    ("bitplane_step", _step, dict(n=1 << 32, sign_nbytes=1 << 31, mom_len=1 << 34), "2\\^32 weights"),
    ("bitplane_step", _step, dict(mom_len=399), "mom: buffer holds 399 elements, needs 400"),
    ("bitplane_step", _step, dict(coef_len=3), "coef: buffer holds 3 elements, needs 4"),
    ("bitplane_step", _step, dict(grad_len=99), "grad has 99 elements, codes 100"),
    ("bitplane_step", _step, dict(grad_len=101), "grad has 101 elements, codes 100"),
    ("bitplane_step", _step, dict(gs=0), "gs: null data pointer"),
    ("bitplane_step", _step, dict(lr=0.0), "lr must be finite and > 0"),
    ("bitplane_step", _step, dict(lr=float("inf")), "lr must be finite and > 0"),
    ("bitplane_step", _step, dict(momentum=1.0), "momentum must be in \\[0, 1\\)"),
    ("bitplane_step", _step, dict(key=1 << 32), "key must be a uint32"),
    ("bitplane_step", _step, dict(scale=7 * _P + 2), "scale pointer is null or not 4-byte aligned"),
    ("bitplane_step", _step, dict(key_ptr=10 * _P + 4), "key pointer is not 8-byte aligned"),
    ("bitplane_step", _step, dict(out=0), "out pointer"),
    ("bitplane_step", _step, dict(out=4 * _P - 4), "out and gs overlap"),
    ("bitplane_step", _step, dict(mom=_P + 50), "codes and mom overlap"),
    ("bitplane_step", _step, dict(grad=3 * _P + 200), "mom and grad overlap"),
    # read by every block of both launches while the kernels write codes, sign, mom and gs
    ("bitplane_step", _step, dict(coef=3 * _P + 8), "coef and mom overlap"),
    ("bitplane_step", _step, dict(scale=4 * _P), "scale and gs overlap"),
    ("bitplane_step", _step, dict(scale=_P + 96), "scale and codes overlap"),
    ("bitplane_step", _step, dict(key_ptr=2 * _P + 8), "key and sign overlap"),
    ("bitplane_step", _step, dict(workspace=0), "reduction workspace pointer is null"),
]


@needs_cuda_build
@pytest.mark.parametrize("fn, args, over, match", CASES, ids=[f"{c[0]}-{'-'.join(c[2])}" for c in CASES])
def test_cuda_binding_rejects_inconsistent_arguments(fn, args, over, match):
    with pytest.raises(ValueError, match=match):
        getattr(native.cuda, fn)(**args(**over))


@needs_cuda_build
def test_cuda_bindings_launch_nothing_for_no_elements():
    """n = 0: no workspace or device needed, nothing launched (no GPU touched)."""
    assert native.cuda.binarize(**_bin(n=0, codes_cap=0, workspace=0, workspace_words=0)) is None
    assert native.cuda.dequantize(**_dq(n=0, out_cap=0)) is None
    assert native.cuda.dequantize_backward(**_dqb(n=0, codes_len=0, workspace=0, workspace_words=0)) is None
    assert native.cuda.plane_popcounts(**_pc(n=0, workspace=0, workspace_words=0)) is None
    assert native.cuda.bitplane_step(**_step(n=0, grad_len=0, mom_len=0, workspace=0, workspace_words=0)) is None


@needs_cuda_build
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_binding_without_a_gpu_raises_a_clear_error():
    """Valid arguments on a machine without a GPU reach the CUDA runtime, whose error comes
    back as a RuntimeError naming it (not a crash)."""
    with pytest.raises(RuntimeError, match="CUDA error"):
        native.cuda.dequantize(**_dq(device=0))


def _layer(**over):
    """One layer tuple of bitplane_step_layers, as _step's arguments (fake addresses)."""
    a = _step(**over)
    return tuple(a[k] for k in ("codes", "n", "sign", "sign_nbytes", "mom", "mom_len", "gs", "grad", "grad_len",
                                "coef", "coef_len", "scale", "bits", "key", "key_ptr"))


def _step_layers_args(layers, **over):
    a = dict(layers=layers, lr=0.1, momentum=0.9, out=20 * _P, out_len=2 * len(layers), workspace=21 * _P,
             workspace_words=1 << 20, device=-1, stream=0)
    a.update(over)
    return a


@needs_cuda_build
@pytest.mark.parametrize("layers, over, match", [
    ([_layer(), _layer(mom_len=399)], {}, "layer 1: mom"),
    ([_layer(), _layer(grad_len=99)], {}, "layer 1: grad has 99 elements, codes 100"),
    ([_layer(key=1 << 32)], {}, "layer 0: key must be a uint32"),
    ([_layer(), _layer(), _layer(scale=7)], {}, "layer 2: scale pointer"),
    ([_layer()], {"out_len": 1}, "out: buffer holds 1"),
    ([_layer()], {"lr": 0.0}, "lr must be finite and > 0"),
    ([_layer(), _layer(gs=20 * _P + 4)], {}, "layer 1: out and gs overlap"),
    ([_layer(), _layer(grad=20 * _P - 8)], {}, "layer 1: out and grad overlap"),
    ([_layer(), _layer(codes=20 * _P + 8, n=8, grad_len=8, mom_len=32, sign_nbytes=4)], {},
     "layer 1: out and codes overlap"),
    ([_layer(scale=20 * _P + 4)], {}, "layer 0: out and scale overlap"),
    ([_layer(key_ptr=20 * _P)], {}, "layer 0: out and key overlap"),
    ([_layer(), _layer(scale=4 * _P)], {}, "layer 1: scale and gs overlap"),
    ([_layer(), _layer(key_ptr=3 * _P + 8)], {}, "layer 1: key and mom overlap"),
    ([_layer(coef=_P + 4)], {}, "layer 0: coef and codes overlap"),
], ids=["mom", "grad-len", "key", "scale", "out", "lr", "out-gs", "out-grad", "out-codes", "out-scale", "out-key",
        "scale-gs", "key-mom", "coef-codes"])
@pytest.mark.parametrize("check_only", [False, True], ids=["step", "check-only"])
def test_cuda_step_layers_binding_names_the_bad_layer(layers, over, match, check_only):
    """check_only (the adapter's checks before it steps layer by layer) refuses the same."""
    with pytest.raises(ValueError, match=match):
        native.cuda.bitplane_step_layers(**_step_layers_args(layers, **over), check_only=check_only)


@needs_cuda_build
@pytest.mark.parametrize("over, match", [
    (dict(out=_P + 16), "out and codes overlap"),
    (dict(out=3 * _P + 396), "out and mom overlap"),
    (dict(out=7 * _P - 4), "out and scale overlap"),
    (dict(key_ptr=8 * _P + 4 - 4), "out and key overlap"),
])
def test_cuda_step_binding_keeps_out_apart_from_the_layer(over, match):
    """out (g_s, the previous gs) is written by the last block while other blocks may still
    read the layer: it may not overlap any of the layer's buffers."""
    with pytest.raises(ValueError, match=match):
        native.cuda.bitplane_step(**_step(**over))


@needs_cuda_build
def test_cuda_step_layers_binding_launches_nothing_for_empty_layers():
    assert native.cuda.bitplane_step_layers(**_step_layers_args([])) is None
    empty = [_layer(n=0, grad_len=0, mom_len=0)] * 2
    assert native.cuda.bitplane_step_layers(**_step_layers_args(empty, workspace=0, workspace_words=0)) is None


@needs_cuda_build
def test_cuda_popcounts_binding_checks_every_layer():
    with pytest.raises(ValueError, match="layer 1: bits must be in 1..8"):
        native.cuda.plane_popcounts_layers([(_P, 8, 2), (2 * _P, 8, 0)], 3 * _P, 2, 4 * _P, 1 << 20, -1, 0)
    with pytest.raises(ValueError, match="out: buffer holds 3"):
        native.cuda.plane_popcounts_layers([(_P, 8, 2), (2 * _P, 8, 2)], 3 * _P, 3, 4 * _P, 1 << 20, -1, 0)
    with pytest.raises(ValueError, match="layer 0: codes: null data pointer"):
        native.cuda.plane_popcounts_layers([(0, 8, 2)], 3 * _P, 2, 4 * _P, 1 << 20, -1, 0)
    assert native.cuda.plane_popcounts_layers([(0, 0, 2)], 3 * _P, 2, 0, 0, -1, 0) is None  # empty: no launch


def _dql(**over):
    """One layer of dequantize_layers, as a tuple (codes, n, sign, sign_nbytes, scale, bits, out, out_cap)."""
    a = _dq(**over)
    return tuple(a[k] for k in ("codes", "n", "sign", "sign_nbytes", "scale", "bits", "out", "out_cap"))


def _dqbl(**over):
    """One layer of dequantize_backward_layers: (grad, n, codes, codes_len, sign, sign_nbytes, bits, out)."""
    a = _dqb(**over)
    return tuple(a[k] for k in ("grad", "n", "codes", "codes_len", "sign", "sign_nbytes", "bits", "out"))


@needs_cuda_build
@pytest.mark.parametrize("over, match", [
    (dict(bits=9), "layer 1: bits must be in 1..8, got 9"),
    (dict(sign_nbytes=8), "layer 1: sign bitmap has 8 bytes, needs 16"),
    (dict(out_cap=99), "layer 1: out: buffer holds 99 elements, needs 100"),
    (dict(out=_P + 64), "layer 1: codes and out overlap"),
    (dict(scale=4 * _P + 8), "layer 1: scale and out overlap"),
    (dict(scale=0), "layer 1: scale pointer is null"),
], ids=["bits", "sign", "out-cap", "out-codes", "out-scale", "scale-null"])
def test_cuda_dequantize_layers_binding_checks_every_layer(over, match):
    """Every layer is checked as dequantize checks its arguments (its scale apart from its out
    too), before anything is launched; the bad one is named."""
    with pytest.raises(ValueError, match=match):
        native.cuda.dequantize_layers([_dql(), _dql(**over)], -1, 0)
    assert native.cuda.dequantize_layers([_dql(n=0, codes=0, sign=0, out=0, out_cap=0)], -1, 0) is None  # no launch
    with pytest.raises(ValueError, match="scale and out overlap"):
        native.cuda.dequantize(**_dq(scale=4 * _P + 8))


@needs_cuda_build
@pytest.mark.parametrize("over, match", [
    (dict(bits=0), "layer 1: bits must be in 1..8, got 0"),
    (dict(grad=_P + 2), "layer 1: grad: data pointer is not 4-byte aligned"),
    (dict(sign_nbytes=12), "layer 1: sign bitmap has 12 bytes, needs 16"),
    (dict(out=0), "layer 1: out pointer is null"),
    (dict(codes_len=99), "layer 1: grad has 100 elements, codes 99"),
], ids=["bits", "grad-align", "sign", "out-null", "codes-len"])
def test_cuda_dequantize_backward_layers_binding_checks_every_layer(over, match):
    with pytest.raises(ValueError, match=match):
        native.cuda.dequantize_backward_layers([_dqbl(), _dqbl(**over)], 5 * _P, 1 << 20, -1, 0)
    with pytest.raises(ValueError, match="reduction workspace pointer is null"):
        native.cuda.dequantize_backward_layers([_dqbl()], 0, 1 << 20, -1, 0)
    empty = _dqbl(n=0, grad=0, codes=0, codes_len=0, sign=0)
    assert native.cuda.dequantize_backward_layers([empty], 0, 0, -1, 0) is None
