"""Argument checks shared by every op and backend (pure Python, traceable by dynamo)."""
from __future__ import annotations

import numbers

import torch

MIN_BITS, MAX_BITS = 1, 8  # the bit-widths a weight or code may have
FLOAT_BITS = 16  # fake_quant's "float in all but name" width (the server's evaluation)
ALLOWED_BITS = tuple(range(MIN_BITS, MAX_BITS + 1)) + (FLOAT_BITS,)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STE_MODES = ("identity", "clipped")


def levels(bits: int) -> int:
    """Number of non-zero magnitude levels, 2**bits - 1."""
    return (1 << bits) - 1


def bitmap_nbytes(n: int) -> int:
    """Bytes of a 1-bit-per-element bitmap of n elements (whole uint32 words)."""
    return 4 * ((n + 31) // 32)


def bitmap_arg(bits, n: int, device: torch.device, name: str, count: int = 1) -> torch.Tensor:
    """A bitmap handed to a backward kernel, as every backend takes it: uint8 on ``device``
    with at least ``count`` * :func:`bitmap_nbytes` (n) bytes (``count`` bitmaps of n
    elements back to back, as fake-quant's forward returns them). Returned contiguous and
    4-byte aligned (the kernels read whole uint32 words), copied only when it is not already
    (a bitmap from the forward always is: it costs n/8 bytes per bitmap to copy otherwise).

    Raises:
        TypeError: not a uint8 tensor.
        ValueError: on another device, or too short for n elements.
    """
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8:
        got = bits.dtype if isinstance(bits, torch.Tensor) else type(bits).__name__
        raise TypeError(f"{name} must be a uint8 tensor, got {got}")
    if not (bits.is_cpu and device.type == "cpu") and bits.device != device:  # is_cpu: no device object
        raise ValueError(f"{name} is on {bits.device} but grad is on {device}")
    need = count * bitmap_nbytes(n)
    if bits.numel() < need:
        what = f"{count} bitmaps of {n} elements" if count > 1 else f"{n} elements"
        raise ValueError(f"{name} has {bits.numel()} bytes, {need} needed for {what}")
    if not bits.is_contiguous() or bits.data_ptr() % 4 != 0:
        bits = bits.clone(memory_format=torch.contiguous_format)  # fresh storage: aligned
    return bits


def check_bits(bits, what: str = "bits", float_ok: bool = False) -> int:
    """``bits`` as an int in MIN_BITS..MAX_BITS (1..8), or also 16 with ``float_ok``.

    The one statement of the rule for every op, the wire and the layers. Raises
    ``TypeError`` (not an integer; bool refused) or ``ValueError`` naming ``what``."""
    if type(bits) is int and not float_ok and MIN_BITS <= bits <= MAX_BITS:
        return bits  # the common case, without the ABC isinstance below (about 0.3 µs)
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(bits).__name__}")
    if float_ok:
        if int(bits) not in ALLOWED_BITS:
            raise ValueError(f"{what} must be one of {MIN_BITS}..{MAX_BITS} or {FLOAT_BITS}, got {bits}")
    elif not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"{what} must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return int(bits)


def check_same_device(device: torch.device, what: str, **tensors) -> None:
    """Each tensor given (None skipped) is on ``device``, ``what``'s. The fake kernels run it
    too: the dispatcher sends a call that mixes meta tensors with real ones to the fake
    kernel, which would otherwise return an uninitialized result (or do nothing) where the
    real op refuses the mix."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but {what} is on {device}")


def check_float_tensor(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def check_ste(ste) -> str:
    if ste not in STE_MODES:
        raise ValueError(f"ste must be 'identity' or 'clipped', got {ste!r}")
    return ste


# The doubles float32 rounds to a finite value > 0: above 2^-150 (half the smallest subnormal;
# the tie rounds to 0) and below FLT_MAX + half its ulp (the tie rounds to inf).
F32_POSITIVE_FROM = 2.0 ** -150
F32_INF_FROM = 3.4028235677973366e38


def check_scale_value(value: float) -> None:
    """A given scale must be a finite number > 0 as the kernels' float32 holds it (1e39 was
    torch's RuntimeError from making the float32 tensor, 1e-50 a scale of 0)."""
    if not F32_POSITIVE_FROM < value < F32_INF_FROM:  # False for NaN too
        raise ValueError(f"scale must be finite and > 0 in float32, got {value}")
