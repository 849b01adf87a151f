"""Bit-plane packing against what a user would otherwise call, and against copy_.

Groups ``pack`` / ``unpack`` per size and bit-width. Candidates: ``fedmpq[<backend>]``.
Anchors: ``copy_`` (a uint8 copy of the codes into a preallocated tensor: the target is
4-bit pack and unpack within 3.5x of it), ``numpy_packbits`` (the same plane layout with
numpy: one ``packbits`` / ``unpackbits`` per plane) and ``torch_shift_or`` (torch's usual
dense packing, ``8 / b`` codes per byte with shifts and ORs, b in 1, 2, 4, 8: a different
layout, the torch way a user would write), at every width. Bytes moved: the codes (n) plus
the planes (n * b / 8); copy_ moves 2n. Each candidate is checked once, untimed: its planes
unpack to the codes.

``dequant_accumulate`` group: the server's fused de-quantize-and-accumulate of one 4-bit
layer, against the torch way from decoded codes (codes and signs, one byte each, to float,
multiply, add: it skips the bit-plane unpack the kernel does, so it is the stricter anchor)
and against ``acc.add_`` (an in-place pass over the float32 accumulator, the floor: the op
reads and writes the accumulator in place, which costs less than a copy_ from another
tensor).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels import registry

from conftest import CALLS, VARIANTS, backend_of, run_timed, run_variant, selected, skip_unless_runs, variant_label

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BITS = [1, 4, 8]
IMPLS = ["copy_", "numpy_packbits", "torch_shift_or"] + [f"fedmpq[{b}]" for b in registry.BACKENDS]


def _skip(impl: str, device: str, bits: int):
    if backend_of(impl) is not None:
        skip_unless_runs(impl, device, "pack")
    elif impl == "numpy_packbits" and device != "cpu":
        pytest.skip("numpy runs on the CPU")


def _record(benchmark, op, numel, bits, device, impl, nbytes, anchor="torch_shift_or", variant="latency"):
    label = f"{bits}-bit" + variant_label(variant)
    nbytes *= 1 if variant == "latency" else CALLS
    benchmark.extra_info.update(group_key=(op, numel, label, device), name=impl, bytes=nbytes, torch_anchor=anchor)
    benchmark.group = f"{op} {numel} {label} {device}"


def _codes(numel, bits, device):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1 << bits, (numel,), generator=g, dtype=torch.int32).to(torch.uint8).to(device)


def _np_pack(c: np.ndarray, bits: int) -> list:
    return [np.packbits((c >> (bits - 1 - p)) & 1, bitorder="little") for p in range(bits)]


def _np_unpack(planes: list, bits: int, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.uint8)
    for p in range(bits):
        out |= np.unpackbits(planes[p], count=n, bitorder="little") << (bits - 1 - p)
    return out


def _torch_pack(c: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    if c.numel() % per:  # pad to whole bytes
        c = torch.cat([c, c.new_zeros(per - c.numel() % per)])
    v = c.view(-1, per)
    out = v[:, 0].clone()
    for k in range(1, per):
        out |= v[:, k] << (bits * k)
    return out


def _torch_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    mask = (1 << bits) - 1
    return torch.stack([(packed >> (bits * k)) & mask for k in range(per)], dim=1).view(-1)


def _pack_fn(impl, codes, bits):
    if impl == "numpy_packbits":
        c = codes.numpy()
        return lambda: _np_pack(c, bits)
    if impl == "torch_shift_or":
        return lambda: _torch_pack(codes, bits)
    return lambda: fk.pack_codes(codes, bits)


def _unpack_fn(impl, codes, bits):
    n = codes.numel()
    if impl == "numpy_packbits":
        planes = _np_pack(codes.numpy(), bits)
        return lambda: _np_unpack(planes, bits, n)
    if impl == "torch_shift_or":
        packed = _torch_pack(codes, bits)
        return lambda: _torch_unpack(packed, bits)
    planes = fk.pack_codes(codes, bits)
    return lambda: fk.unpack_codes(planes, bits, n)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["pack", "unpack"])
def bench_pack_unpack(benchmark, op, impl, bits, device, variant, numel):
    """``variant``: see benches/conftest.py (throughput and graph: CUDA, 4 bits; pack_codes
    no longer synchronizes, so it can be captured)."""
    _skip(impl, device, bits)
    if variant != "latency" and (bits != 4 or impl == "numpy_packbits"):
        pytest.skip("the throughput and graph variants: 4 bits, GPU implementations")
    codes = _codes(numel, bits, device)
    if impl == "copy_":
        out = torch.empty_like(codes)
        fn = lambda: out.copy_(codes)  # noqa: E731
    else:
        fn = (_pack_fn if op == "pack" else _unpack_fn)(impl, codes, bits)
    if backend_of(impl) is not None:  # untimed: the round trip gives the codes back
        with selected(impl, device):
            back = fk.unpack_codes(fk.pack_codes(codes, bits), bits, numel) if op == "pack" else fn()
        assert torch.equal(back, codes), f"{impl}: {op} at {bits} bits does not give the codes back"
    _record(benchmark, op, numel, bits, device, impl, 2 * numel if impl == "copy_" else numel + numel * bits // 8,
            variant=variant)
    run_variant(benchmark, impl, fn, device, variant)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["acc.add_", "torch_dequant_add"] + [f"fedmpq[{b}]" for b in registry.BACKENDS])
def bench_dequant_accumulate(benchmark, impl, device, numel):
    bits = 4
    if impl.startswith("fedmpq["):
        _skip(impl, device, bits)
    codes = _codes(numel, bits, device)
    neg = _codes(numel, 1, device)
    planes, signs = fk.pack_codes(codes, bits), fk.pack_codes(neg, 1)
    acc = torch.zeros(numel, device=device)
    if impl == "acc.add_":
        fn = lambda: acc.add_(1.0)  # noqa: E731
    elif impl == "torch_dequant_add":
        # what torch code does with a decoded layer: codes and signs to float, scale, add
        # (the signs' conversion timed too, as the kernel decodes its sign map in the call)
        def fn():
            return acc.add_(codes.float() * (1.0 - 2.0 * neg.float()), alpha=0.37 / 15)
    else:
        fn = lambda: fk.dequant_accumulate(acc, planes, signs, bits, 0.37, 1.0)  # noqa: E731
    if impl != "acc.add_":  # smoke check, untimed: each case adds the same layer
        with selected(impl, device):
            fn()
        expect = codes.float() * (1.0 - 2.0 * neg.float()) * (0.37 / 15)
        torch.testing.assert_close(acc, expect, rtol=1e-6, atol=1e-7)
        acc.zero_()
    # read and write the accumulator, read the planes and the sign map
    moved = 8 * numel if impl == "acc.add_" else 8 * numel + numel * (bits + 1) // 8
    _record(benchmark, "dequant_accumulate", numel, bits, device, impl, moved, anchor="torch_dequant_add")
    benchmark.extra_info["floor"] = "acc.add_"
    run_timed(benchmark, impl, fn, device)
