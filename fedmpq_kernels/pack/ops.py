"""Packing's ops: torch.library schemas, fake (meta) impls and the public functions
:func:`pack_codes`, :func:`unpack_codes`, :func:`dequant_accumulate`. The layout and the
exact arithmetic are stated in :mod:`.reference`. None of them is differentiable: they move
integer codes, or accumulate into a buffer the server owns.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch

from .. import registry
from .._checks import F32_INF_FROM, MAX_BITS, MIN_BITS, bitmap_nbytes, check_bits, check_same_device
from .._library import _eager, bump_versions, lib, register_inplace
from ._common import own_words_begin, own_words_end, pending_check

Tensor = torch.Tensor
_FLT_MAX = float(np.finfo(np.float32).max)

lib.define("pack_codes(Tensor codes, int bits) -> Tensor")
lib.define("unpack_codes(Tensor planes, int bits, int n) -> Tensor")
lib.define("dequant_accumulate(Tensor(a!) acc, Tensor planes, Tensor? signs, int bits, float coef) -> ()")
lib.define("dequant_accumulate_layers(Tensor(a!) acc, Tensor payload, Tensor table, Tensor coefs) -> ()")


def _pack_codes_impl(codes: Tensor, bits: int) -> Tensor:
    return registry.get("pack", "pack_codes", codes.device.type)(codes, bits)


def _unpack_codes_impl(planes: Tensor, bits: int, n: int) -> Tensor:
    return registry.get("pack", "unpack_codes", planes.device.type)(planes, bits, n)


def _dequant_accumulate_impl(acc: Tensor, planes: Tensor, signs: Optional[Tensor], bits: int, coef: float) -> None:
    registry.get("pack", "dequant_accumulate", acc.device.type)(acc, planes, signs, bits, coef)


def _dequant_accumulate_layers_impl(acc: Tensor, payload: Tensor, table: Tensor, coefs: Tensor) -> None:
    registry.get("pack", "dequant_accumulate_layers", acc.device.type)(acc, payload, table, coefs)


# The registered ops check their arguments with the public functions' checks (below): those
# call the _impl functions directly, so these run only for a direct call of torch.ops.fedmpq.*
# or a compiled graph, and no backend is handed a buffer shorter than the sizes it is told.
def _pack_codes_op(codes: Tensor, bits: int) -> Tensor:
    _check_u8(codes, "codes")
    return _pack_codes_impl(codes, check_bits(bits))


def _unpack_codes_op(planes: Tensor, bits: int, n: int) -> Tensor:
    bits, n = _check_unpack(planes, bits, n)
    return _unpack_codes_impl(planes, bits, n)


def _dequant_accumulate_op(acc: Tensor, planes: Tensor, signs: Optional[Tensor], bits: int, coef: float) -> None:
    bits = _check_accumulate(acc, planes, signs, bits)
    if not (math.isfinite(coef) and abs(coef) <= _FLT_MAX):  # the kernels compute in float32
        raise ValueError(f"coef must be a finite float32 value, got {coef}")
    _dequant_accumulate_impl(acc, planes, signs, bits, coef)


def _dequant_accumulate_layers_op(acc: Tensor, payload: Tensor, table: Tensor, coefs: Tensor) -> None:
    _check_layers(acc, payload, table, coefs)
    _dequant_accumulate_layers_impl(acc, payload, table.contiguous(), coefs.contiguous())


lib.impl("dequant_accumulate_layers", _dequant_accumulate_layers_op, "CompositeExplicitAutograd")
lib.impl("pack_codes", _pack_codes_op, "CompositeExplicitAutograd")
lib.impl("unpack_codes", _unpack_codes_op, "CompositeExplicitAutograd")
lib.impl("dequant_accumulate", _dequant_accumulate_op, "CompositeExplicitAutograd")
register_inplace("dequant_accumulate", ("acc",))
register_inplace("dequant_accumulate_layers", ("acc",))


@torch.library.register_fake("fedmpq::pack_codes")
def _pack_codes_fake(codes, bits):
    return codes.new_empty((bits * bitmap_nbytes(codes.numel()),), dtype=torch.uint8)


@torch.library.register_fake("fedmpq::unpack_codes")
def _unpack_codes_fake(planes, bits, n):
    return planes.new_empty((n,), dtype=torch.uint8)


@torch.library.register_fake("fedmpq::dequant_accumulate")
def _dequant_accumulate_fake(acc, planes, signs, bits, coef):
    check_same_device(acc.device, "acc", planes=planes, signs=signs)
    return None


@torch.library.register_fake("fedmpq::dequant_accumulate_layers")
def _dequant_accumulate_layers_fake(acc, payload, table, coefs):
    check_same_device(acc.device, "acc", payload=payload)
    _check_table_devices(table, coefs)
    return None


def _check_u8(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8, got {t.dtype}")


def _check_acc(acc) -> None:
    if not isinstance(acc, Tensor) or acc.dtype != torch.float32:
        raise TypeError(f"acc must be a float32 tensor, got {getattr(acc, 'dtype', type(acc).__name__)}")
    if not acc.is_contiguous():
        raise ValueError("acc must be contiguous (it is updated in place)")
    if acc.requires_grad and torch.is_grad_enabled():  # torch refuses in-place on a leaf; no gradient flows here
        raise ValueError("acc requires grad: the accumulation is not differentiable; accumulate into acc.detach() "
                         "or under torch.no_grad()")


def _check_planes(planes, bits: int, n: int, device: torch.device, name: str = "planes") -> None:
    _check_u8(planes, name)
    if planes.device != device:
        raise ValueError(f"{name} is on {planes.device}, expected {device}")
    need = bits * bitmap_nbytes(n)
    if planes.numel() < need:
        raise ValueError(f"{name} has {planes.numel()} bytes, {need} needed for {n} codes of {bits} bits")


def pack_codes(codes: Tensor, bits: int, *, validate: Optional[bool] = None) -> Tensor:
    """Pack b-bit codes into b bit planes (layout: :mod:`fedmpq_kernels.pack.reference`).

    Args:
        codes: uint8 tensor, any shape and strides (flattened in C order), every value
            < 2**bits.
        bits: b, 1..8 (1 packs a mask, e.g. a sign map: nonzero bytes are not allowed then,
            pass 0/1).
        validate: when to check that every code fits. CPU tensors are always checked in
            the call (it is free there). On a GPU the check would synchronize the device:
            by default (None or False) the kernel records the codes on the device and
            :func:`fedmpq_kernels.check_packed` raises for them later, at a sync point the
            caller has anyway (after copying the planes to the host, say); True checks in
            the call (one synchronization).

    Returns:
        uint8 tensor of shape ``(bits * 4 * ceil(n / 32),)`` on codes' device: plane 0 (the
        most significant bit of every code) first.

    Raises:
        TypeError: codes not a uint8 tensor, bits not an int.
        ValueError: bits outside 1..8, or a code >= 2**bits (on a GPU: with ``validate``,
            else from :func:`fedmpq_kernels.check_packed`).
    """
    _check_u8(codes, "codes")
    bits = check_bits(bits)
    run = _pack_codes_impl if _eager(codes) else torch.ops.fedmpq.pack_codes
    if not pending_check(validate, codes.device):
        return run(codes, bits)
    own_words_begin()  # a backend that records codes on the device records this call's apart
    try:
        planes = run(codes, bits)
    except BaseException:
        own_words_end(bits, read=False)
        raise
    own_words_end(bits)
    return planes


def unpack_codes(planes: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``bits * 4 * ceil(n / 32)`` bytes of
    ``planes`` (uint8, any strides) -> uint8 codes of shape ``(n,)``.

    Raises:
        TypeError / ValueError: planes not uint8 or too short, bits outside 1..8, n < 0.
    """
    bits, n = _check_unpack(planes, bits, n)
    if _eager(planes):
        return _unpack_codes_impl(planes, bits, n)
    return torch.ops.fedmpq.unpack_codes(planes, bits, n)


def _check_unpack(planes, bits, n) -> tuple:
    """Checks unpack_codes' arguments; returns (bits, n) as ints."""
    bits = check_bits(bits)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    _check_u8(planes, "planes")
    _check_planes(planes, bits, int(n), planes.device)
    return bits, int(n)


def dequant_accumulate(acc: Tensor, planes: Tensor, signs: Optional[Tensor], bits: int, scale: float,
                       weight: float = 1.0) -> Tensor:
    """``acc += weight * W`` in place, ``W = scale * sigma * q / (2**bits - 1)`` de-quantized
    straight from the packed planes and sign map (the server's aggregation step; the exact
    float32 order is in :mod:`fedmpq_kernels.pack.reference`).

    Args:
        acc: contiguous float32 tensor of n elements (any shape), updated in place (its
            autograd version bumped, as torch's in-place ops do); not one that requires
            grad while grad mode is on (the accumulation is not differentiable).
        planes: uint8, ``bits * 4 * ceil(n / 32)`` bytes or more, acc's device.
        signs: uint8 sign map of n elements (bit set = negative), or None (all positive).
        bits: 1..8.
        scale: finite, >= 0.  weight: finite. Both as float32 values, and so their
            product ``weight * (scale / (2**bits - 1))``.

    Returns:
        acc.

    Raises:
        TypeError / ValueError naming the bad argument.
    """
    bits = _check_accumulate(acc, planes, signs, bits)
    if type(scale) is not float or type(weight) is not float:  # the usual call: two floats, two type tests
        for name, v in (("scale", scale), ("weight", weight)):  # float() took "1.0"
            if isinstance(v, (str, bytes, bool)) or not isinstance(v, (numbers.Real, Tensor)):
                raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    scale, weight = float(scale), float(weight)
    # Each is taken to float32 before the product (the reference's order): checked there, as
    # a double beyond float32's range would be inf, and inf * 0 NaN, in the accumulator.
    if not 0 <= scale < F32_INF_FROM:  # False for NaN too
        raise ValueError(f"scale must be finite and >= 0 in float32, got {scale}")
    if not abs(weight) < F32_INF_FROM:
        raise ValueError(f"weight must be finite in float32, got {weight}")
    k = np.float32(scale) / np.float32((1 << bits) - 1)
    w = np.float32(weight)
    # float32 * float32 is exact in a double: the float32 product is inf exactly when this is
    if not abs(float(w) * float(k)) < F32_INF_FROM:
        raise ValueError(f"weight * scale overflows float32 ({weight} * {scale})")
    coef = float(w * k)
    if _eager(acc):
        _dequant_accumulate_impl(acc, planes, signs, bits, coef)
        bump_versions((acc,))  # as the registered op's ADInplaceOrView kernel
    else:
        torch.ops.fedmpq.dequant_accumulate(acc, planes, signs, bits, coef)
    return acc


def _check_accumulate(acc, planes, signs, bits) -> int:
    """Checks dequant_accumulate's tensors and width; returns bits."""
    _check_acc(acc)
    bits = check_bits(bits)
    n = acc.numel()
    _check_planes(planes, bits, n, acc.device)
    if signs is not None:
        _check_planes(signs, 1, n, acc.device, "signs")
    return bits


def layer_coefs(scales, bits, weight: float = 1.0) -> Tensor:
    """float32 ``weight * scale / (2**bits - 1)`` per layer, in the float32 order of
    :func:`dequant_accumulate` (for :func:`dequant_accumulate_layers`). ValueError, as
    :func:`dequant_accumulate`'s, for bits that are not integers in 1..8 (one per scale, or
    one for all), a scale not finite and >= 0 in float32, a weight not finite in float32."""
    with np.errstate(over="ignore"):  # a double beyond float32's range becomes inf: refused below
        s = np.asarray(scales, dtype=np.float32)
    bad = ~(np.isfinite(s) & (s >= 0))  # NaN fails both
    if bad.any():
        raise ValueError(f"scale must be finite and >= 0 in float32, got {s[bad].flat[0]} "
                         f"(scale {int(np.flatnonzero(bad)[0])})")
    if not abs(float(weight)) < F32_INF_FROM:
        raise ValueError(f"weight must be finite in float32, got {weight}")
    b = np.asarray(bits)
    if (b.dtype.kind not in "iu" or b.shape not in (s.shape, ())
            or (b.size and not (b.min() >= MIN_BITS and b.max() <= MAX_BITS))):
        # 0 bits gave a division by zero's inf coefficient, 40 one that was silently 0
        raise ValueError(f"bits must be integers in {MIN_BITS}..{MAX_BITS}, one per scale or one for all, "
                         f"got {bits!r}"[:300])
    levels = np.float32(2.0) ** b.astype(np.float32) - np.float32(1.0)
    with np.errstate(over="ignore", invalid="ignore"):
        c = np.float32(weight) * (s / levels)
    if not np.isfinite(c).all():  # dequant_accumulate's refusal of the same product
        j = int(np.flatnonzero(~np.isfinite(c))[0]) if c.ndim else 0
        raise ValueError(f"weight * scale overflows float32 ({weight} * {float(s.flat[j] if s.ndim else s)}, "
                         f"scale {j})")
    return torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))


def dequant_accumulate_layers(acc: Tensor, payload: Tensor, table: Tensor, coefs: Tensor) -> Tensor:
    """:func:`dequant_accumulate` for many layers of one payload in one call: for row r of
    ``table`` = (acc_off, n, bits, data_off), ``acc[acc_off : acc_off + n] += coefs[r] * sign * q``
    with the codes' planes at byte ``data_off`` of ``payload`` and the sign map right after
    them (``bits * 4 * ceil(n / 32)`` bytes on): the layout of a quantized entry of
    ``fedmpq.wire``. The server adds a whole upload with it.

    Args:
        acc: contiguous float32 accumulator (any shape; addressed flat), updated in place.
        payload: contiguous uint8 tensor on acc's device, 4-byte aligned.
        table: int64 CPU tensor (nrows, 4); rows in ascending, disjoint accumulator ranges;
            data offsets 4-byte aligned, planes and sign map inside the payload.
        coefs: float32 CPU tensor (nrows,), finite (see :func:`layer_coefs`).

    Returns:
        acc.

    Raises:
        TypeError / ValueError naming the bad argument or table row.
    """
    _check_layers(acc, payload, table, coefs)
    table, coefs = table.contiguous(), coefs.contiguous()
    if _eager(acc):
        _dequant_accumulate_layers_impl(acc, payload, table, coefs)
        bump_versions((acc,))
    else:
        torch.ops.fedmpq.dequant_accumulate_layers(acc, payload, table, coefs)
    return acc


def _check_layers(acc, payload, table, coefs) -> None:
    """Checks dequant_accumulate_layers' tensors. Its rows are checked by the backend: the
    C++ binding itself, the others with :func:`check_layer_table`."""
    _check_acc(acc)
    _check_u8(payload, "payload")
    if payload.device != acc.device or not payload.is_contiguous() or payload.dim() != 1 or payload.data_ptr() % 4:
        raise ValueError("payload must be a contiguous, 4-byte-aligned 1-D uint8 tensor on acc's device")
    if not isinstance(table, Tensor) or table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != 4:
        raise TypeError("table must be an int64 tensor of shape (nrows, 4)")
    if not isinstance(coefs, Tensor) or coefs.dtype != torch.float32 or coefs.shape != (table.shape[0],):
        raise TypeError("coefs must be a float32 tensor of shape (nrows,)")
    _check_table_devices(table, coefs)


def _check_table_devices(table, coefs) -> None:
    if table.device.type != "cpu" or coefs.device.type != "cpu":
        raise ValueError("table and coefs must be CPU tensors (they describe the work)")


def check_layer_table(t: np.ndarray, coefs: np.ndarray, acc_n: int, payload_n: int) -> None:
    """The rules of :func:`dequant_accumulate_layers`' table, for backends without a native check."""
    if not len(t):
        return
    acc_off, n, bits, data_off = (t[:, k] for k in range(4))
    ends = acc_off + n
    need = (bits + 1) * bitmap_nbytes(n)  # planes + sign map
    bad = (
        # n > acc_n - acc_off, not ends > acc_n: acc_off + n can pass 2^63 and wrap (the C++ binding's form)
        (n < 0) | (n > 1 << 56) | (bits < MIN_BITS) | (bits > MAX_BITS) | (acc_off < 0) | (acc_off > acc_n)
        | (n > acc_n - acc_off)
        | (data_off < 0) | (data_off % 4 != 0) | (data_off > payload_n) | (need > payload_n - data_off)
        | ~np.isfinite(coefs)
    )
    bad[1:] |= acc_off[1:] < ends[:-1]
    if bad.any():
        r = int(np.argmax(bad))
        raise ValueError(f"table row {r} {t[r].tolist()} (coef {coefs[r]}) is invalid: bits {MIN_BITS}..{MAX_BITS}, "
                         f"accumulator ranges ascending, disjoint and inside acc ({acc_n}), planes + sign map "
                         f"inside the payload ({payload_n} bytes) at a 4-byte-aligned offset, finite coef")
