"""Argument checks shared by every op and backend (pure Python, traceable by dynamo)."""
from __future__ import annotations

import math
import numbers

import torch

ALLOWED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STE_MODES = ("identity", "clipped")


def levels(bits: int) -> int:
    """Number of non-zero magnitude levels, 2**bits - 1."""
    return (1 << bits) - 1


def bitmap_nbytes(n: int) -> int:
    """Bytes of a 1-bit-per-element bitmap of n elements (whole uint32 words)."""
    return 4 * ((n + 31) // 32)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if int(bits) not in ALLOWED_BITS:
        raise ValueError(f"bits must be one of 1..8 or 16, got {bits}")
    return int(bits)


def check_float_tensor(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def check_ste(ste) -> str:
    if ste not in STE_MODES:
        raise ValueError(f"ste must be 'identity' or 'clipped', got {ste!r}")
    return ste


def check_scale_value(value: float) -> None:
    """A given scale must be a finite number > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be finite and > 0, got {value}")
