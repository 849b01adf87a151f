"""Which backend runs each op, per device type.

Defaults: CPU tensors -> ``cpu`` (C++), CUDA tensors -> ``cuda`` (CUDA C++) then
``triton``, any other device -> ``reference``; a backend that is not available is skipped,
and :func:`explain` says why. ``FEDMPQ_BACKEND=reference|cpu|cuda|triton`` (read at
import) or :func:`use_backend` override the choice on the devices that backend supports;
forcing an unavailable backend raises ``RuntimeError`` with the reason on first use.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, Dict, Iterator, List, Optional, Tuple

BACKENDS = ("reference", "cpu", "cuda", "triton")
_DEFAULT_ORDER = {"cpu": ["cpu", "reference"], "cuda": ["cuda", "triton", "reference"]}
_MODULES = {
    "reference": "fedmpq_kernels.reference",
    "cpu": "fedmpq_kernels.cpu",
    "cuda": "fedmpq_kernels.cuda",
    "triton": "fedmpq_kernels.triton.fake_quant",
}

_override: Optional[str] = None
_cache: Dict[Tuple[str, str], Callable] = {}


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def supports(name: str, device_type: str) -> bool:
    """Whether backend ``name`` can run on tensors of ``device_type`` at all."""
    if name == "reference":
        return True
    if name == "cpu":
        return device_type == "cpu"
    if name == "cuda":
        return device_type == "cuda"
    # Triton runs CPU tensors only through its interpreter (the CI path).
    return device_type == "cuda" or (device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def available(name: str) -> Tuple[bool, str]:
    """(True, "") if backend ``name`` can run here, else (False, the exact reason)."""
    _check_name(name)
    if name == "reference":
        return True, ""
    try:
        if name == "triton":
            from .triton import available as triton_available

            return triton_available()
        return importlib.import_module(_MODULES[name]).available()
    except Exception as e:  # an import error is a reason, not a crash
        return False, f"{type(e).__name__}: {e}"


def module(name: str):
    """The Python module implementing backend ``name`` (its functions take tensors)."""
    return importlib.import_module(_MODULES[_check_name(name)])


def backend_for(device_type: str) -> str:
    """The backend name that runs ops on ``device_type`` now."""
    if _override is not None and supports(_override, device_type):
        ok, why = available(_override)
        if not ok:
            raise RuntimeError(f"fedmpq backend {_override!r} was requested but is not available: {why}")
        return _override
    for name in _DEFAULT_ORDER.get(device_type, ["reference"]):
        if available(name)[0]:
            return name
    return "reference"


def get(op: str, device_type: str) -> Callable:
    """The implementation of backend function ``op`` (e.g. ``fake_quant_forward``) for ``device_type``."""
    key = (op, device_type)
    fn = _cache.get(key)
    if fn is None:
        fn = _cache[key] = getattr(module(backend_for(device_type)), op)
    return fn


def set_backend(name: Optional[str]) -> None:
    """Force backend ``name`` on the devices it supports (None restores the defaults)."""
    global _override
    _override = None if name is None else _check_name(name)
    _cache.clear()


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Context manager form of :func:`set_backend` (restores the previous choice)."""
    prev = _override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


def explain() -> List[str]:
    """One line per backend: available or why not."""
    lines = []
    for name in BACKENDS:
        ok, why = available(name)
        lines.append(f"{name:9s} {'available' if ok else 'unavailable: ' + why}")
    return lines


if os.environ.get("FEDMPQ_BACKEND"):
    set_backend(os.environ["FEDMPQ_BACKEND"])
