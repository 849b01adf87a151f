"""Whether this process keeps subnormal floats, for the tests of subnormal values."""
from __future__ import annotations

import torch


def subnormals_kept() -> bool:
    """False where the whole process flushes subnormals to zero: torch.compile on the CPU in
    older torch (2.4) loads code built with -ffast-math, which sets the flush-to-zero mode for
    every thread, the reference's arithmetic included."""
    return bool(torch.tensor(1e-38) * 1.0 > 0)
