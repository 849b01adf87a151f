"""Helpers every pack backend adapter shares (the word-aligned buffers: ``.._buffers``)."""
from __future__ import annotations


def check_seen(seen: int, bits: int) -> None:
    """pack_codes' range check: the kernels OR all codes together; a bit at or above
    ``bits`` means a code did not fit."""
    if seen >> bits:
        raise ValueError(f"a code does not fit in {bits} bits (codes must be < {1 << bits}; "
                         f"the bits of all codes OR-ed together are {seen:#x})")
