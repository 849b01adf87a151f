"""Host tensors whose data pointer is not 4-byte aligned, as ``torch.frombuffer`` at an odd
offset makes them: the rare input the CPU adapters must copy before a kernel reads it (the
native checks refuse a misaligned pointer)."""
from __future__ import annotations

import torch


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy of ``t`` (flattened) at an address that is not 4-byte aligned."""
    buf = bytearray(4 * t.numel() + 4)
    out = torch.frombuffer(buf, dtype=torch.float32, offset=1, count=t.numel())
    out.copy_(t.reshape(-1))
    assert out.data_ptr() % 4 != 0
    return out
