"""Packing's native boundary, CPU and CUDA bindings alike: every size, pointer and alignment
is re-checked before a kernel runs, so a wrong one from Python is a ValueError, never an
out-of-bounds access. The CUDA bindings are checked without a GPU (the checks come before
any CUDA call); they are called with device -1, so a check that is missing cannot launch
a kernel either: it fails at the launcher's device check with another message."""
from __future__ import annotations

import pytest
import torch

from fedmpq_kernels._native import native, native_error

pytestmark = pytest.mark.skipif(native is None, reason=f"native module not built: {native_error}")

N = 100  # 4 bitmap words; 3-bit planes: 48 bytes
_KEEP = []  # the buffers behind the pointers, alive for the whole module


def _ptr(t: torch.Tensor) -> int:
    _KEEP.append(t)
    return t.data_ptr()


def _args(op: str, device: str, **over):
    planes, signs = _ptr(torch.zeros(64, dtype=torch.uint8)), _ptr(torch.zeros(32, dtype=torch.uint8))
    if op == "pack_codes":
        a = dict(codes=_ptr(torch.zeros(N, dtype=torch.uint8)), n=N, bits=3, planes=planes, planes_nbytes=48)
        if device == "cuda":
            a["seen"] = _ptr(torch.zeros(2, dtype=torch.int32))
    elif op == "unpack_codes":
        a = dict(planes=planes, planes_nbytes=48, n=N, bits=3, codes=_ptr(torch.zeros(N, dtype=torch.uint8)),
                 codes_cap=N)
    else:
        a = dict(acc=_ptr(torch.zeros(N + 1)), n=N, planes=planes, planes_nbytes=48, signs=signs, signs_nbytes=16,
                 bits=3, coef=0.5)
    a.update(dict(device=-1, stream=0) if device == "cuda" else dict(nthreads=1))
    a.update(over)
    return a


def _module(device: str):
    if device == "cuda" and not native.with_cuda:
        pytest.skip("built without CUDA")
    return getattr(native, device)


CASES = [
    ("pack_codes", dict(n=-1), "codes: negative element count"),
    ("pack_codes", dict(n=2**62), "any kernel accepts"),
    ("pack_codes", dict(n=2**56, bits=0), "bits must be in 1..8"),  # 2^56 is the bound itself: the next check refuses
    ("pack_codes", dict(codes=0), "codes: null data pointer"),
    ("pack_codes", dict(bits=0), "bits must be in 1..8"),
    ("pack_codes", dict(bits=9), "bits must be in 1..8"),
    ("pack_codes", dict(planes_nbytes=47), "planes have 47 bytes, need 48 for 100 codes of 3 bits"),
    ("pack_codes", dict(planes=0), "planes: null data pointer"),
    ("pack_codes", dict(planes=1 << 20 | 2), "planes must be 4-byte aligned"),
    ("unpack_codes", dict(codes_cap=99), "codes: buffer holds 99 elements, needs 100"),
    ("unpack_codes", dict(codes=0), "codes: null data pointer"),
    ("unpack_codes", dict(bits=9), "bits must be in 1..8"),
    ("unpack_codes", dict(planes_nbytes=40, bits=3), "planes have 40 bytes, need 48"),
    ("unpack_codes", dict(planes=1 << 20 | 1), "planes must be 4-byte aligned"),
    ("dequant_accumulate", dict(n=2**63 - 1), "any kernel accepts"),
    ("dequant_accumulate", dict(acc=1 << 20 | 2), "acc: data pointer is not 4-byte aligned"),
    ("dequant_accumulate", dict(bits=0), "bits must be in 1..8"),
    ("dequant_accumulate", dict(planes_nbytes=47), "planes have 47 bytes, need 48"),
    ("dequant_accumulate", dict(signs_nbytes=15), "signs bitmap has 15 bytes, needs 16"),
    ("dequant_accumulate", dict(signs=1 << 20 | 2), "signs bitmap must be 4-byte aligned"),
    ("dequant_accumulate", dict(coef=float("nan")), "coef must be a finite float32 value"),
    ("dequant_accumulate", dict(coef=float("inf")), "coef must be a finite float32 value"),
    ("dequant_accumulate", dict(coef=3.5e38), "coef must be a finite float32 value"),
]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("op, over, match", CASES, ids=[f"{c[0]}-{'-'.join(c[1])}-{i}" for i, c in enumerate(CASES)])
def test_bindings_refuse_inconsistent_arguments(device, op, over, match):
    m = _module(device)
    with pytest.raises(ValueError, match=match):
        getattr(m, op)(**_args(op, device, **over))


@pytest.mark.parametrize("seen", [0, 1 << 20 | 2])
def test_cuda_pack_needs_an_aligned_seen_buffer(seen):
    m = _module("cuda")
    with pytest.raises(ValueError, match="seen pointer is null or not 4-byte aligned"):
        m.pack_codes(**_args("pack_codes", "cuda", seen=seen))


def test_cpu_kernels_accept_the_valid_arguments_the_refusals_start_from():
    """The baseline of the cases above is valid (each case breaks exactly one argument)."""
    for op in ("pack_codes", "unpack_codes", "dequant_accumulate"):
        getattr(native.cpu, op)(**_args(op, "cpu"))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_output_overlapping_an_input_is_refused(device):
    """pack_codes writes the planes, unpack_codes the codes, dequant_accumulate acc: sharing
    bytes with what the same call reads, the kernel would read what it already wrote (planes,
    codes or acc other than the reference's, no error). Each is refused before anything is
    written; back to back is not an overlap."""
    m = _module(device)
    buf = torch.zeros(512, dtype=torch.uint8)
    base = _ptr(buf)
    cases = [
        ("pack_codes", dict(codes=base, planes=base + 52), "codes and planes overlap"),
        ("pack_codes", dict(codes=base + 47, planes=base), "codes and planes overlap"),
        ("unpack_codes", dict(codes=base, planes=base + 96), "codes and planes overlap"),
        ("dequant_accumulate", dict(acc=base, planes=base + 396), "acc and planes overlap"),
        ("dequant_accumulate", dict(acc=base + 100, planes=base, signs=base + 96), "acc and signs overlap"),
    ]
    for op, over, match in cases:
        with pytest.raises(ValueError, match=match):
            getattr(m, op)(**_args(op, device, **over))
    assert not buf.any()
    if device == "cpu":  # back to back: accepted
        native.cpu.pack_codes(**_args("pack_codes", "cpu", codes=base, planes=base + 100))
        native.cpu.unpack_codes(**_args("unpack_codes", "cpu", codes=base + 48, planes=base))
        native.cpu.dequant_accumulate(**_args("dequant_accumulate", "cpu", acc=base, planes=base + 400,
                                              signs=base + 448))
