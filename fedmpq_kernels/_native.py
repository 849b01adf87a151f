"""Loads the native module once and keeps the exact reason when it cannot be loaded."""
from __future__ import annotations

native = None  # fedmpq_kernels._C, or None
native_error = ""  # why it is None

try:
    from . import _C as native  # type: ignore[no-redef]
except ImportError as e:  # not built, or built for another Python/ABI
    native = None
    native_error = f"{type(e).__name__}: {e}"
