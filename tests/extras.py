"""Optional extras in tests: a test that needs one skips, with the install command, where it
is missing; CI sets ``FEDMPQ_REQUIRE_<EXTRA>=1`` (TRITON, FLOWER, PLOTS) to fail instead."""
from __future__ import annotations

import importlib
import os

import pytest


def optional(module: str, extra: str):
    """``import module`` from the ``extra`` extra, or skip the calling test (module-level too)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get(f"FEDMPQ_REQUIRE_{extra.upper()}") == "1":
            raise
        pytest.skip(f"the {extra} extra is not installed (pip install -e \".[{extra}]\")", allow_module_level=True)
