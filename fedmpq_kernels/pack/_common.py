"""Helpers every pack backend adapter shares."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def words(t: Tensor, nbytes: int) -> Tensor:
    """The first nbytes of a uint8 tensor, contiguous and 4-byte aligned (copied if not):
    the kernels read planes and sign maps as uint32 words."""
    t = t.reshape(-1)[:nbytes]
    if not t.is_contiguous() or t.data_ptr() % 4:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def check_seen(seen: int, bits: int) -> None:
    """pack_codes' range check: the kernels OR all codes together; a bit at or above
    ``bits`` means a code did not fit."""
    if seen >> bits:
        raise ValueError(f"a code does not fit in {bits} bits (codes must be < {1 << bits}; "
                         f"the bits of all codes OR-ed together are {seen:#x})")
