"""Triton backend of fedmpq_kernels (fake-quant forward / clipped-STE backward).

Importing this package does not import triton; :func:`available` says whether the
kernels in :mod:`fedmpq_kernels.triton.fake_quant` can run here (a CUDA device, or the
Triton interpreter with ``TRITON_INTERPRET=1`` set before triton is imported).
"""
from __future__ import annotations

import os
from typing import Tuple

__all__ = ["available"]


def available() -> Tuple[bool, str]:
    """(True, "") when the Triton kernels can run, else (False, the reason)."""
    try:
        import triton  # noqa: F401  (absolute import: the top-level triton package)
    except Exception as exc:  # ImportError, or a broken install
        return False, f"import triton failed: {type(exc).__name__}: {exc}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    try:
        import torch

        if torch.cuda.is_available():
            return True, ""
    except Exception as exc:
        return False, f"torch.cuda.is_available() failed: {type(exc).__name__}: {exc}"
    return False, "no CUDA device (torch.cuda.is_available() is False) and TRITON_INTERPRET is not '1'"
