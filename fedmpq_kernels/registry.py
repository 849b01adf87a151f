"""Which backend runs each op family, per device type. Knows no op names.

An op family is a package ``fedmpq_kernels.<family>`` (one of :data:`FAMILIES`) with one
module per backend it has: ``reference.py`` always, ``cpu.py``, ``cuda.py``, ``triton.py``
where it has them, each defining one function per op, named as the op's schema.

Defaults: CPU tensors -> ``cpu`` (C++), CUDA tensors -> ``cuda`` (CUDA C++) then
``triton``, any other device -> ``reference``; a backend that is not available is skipped,
and :func:`explain` says why; one that a family does not have is skipped for that family.
``FEDMPQ_BACKEND`` (read at import) or :func:`use_backend` override the choice on the
devices that backend supports, for the families that have it: for every family
(``FEDMPQ_BACKEND=triton``, ``use_backend("triton")``) or for one (``bitplane=triton``,
``use_backend("triton", family="bitplane")``); comma-separated entries combine
(``FEDMPQ_BACKEND=cuda,bitplane=triton``), and a family's own entry wins over the one for
every family. Forcing an unavailable backend raises ``RuntimeError`` with the reason on
first use; an unknown backend or family name raises ``ValueError``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
import threading
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
FAMILIES = ("fake_quant", "pack", "bitplane")
_DEFAULT_ORDER = {"cpu": ["cpu", "reference"], "cuda": ["cuda", "triton", "reference"]}

_override: Optional[str] = None  # forced for every family
_family_override: Dict[str, str] = {}  # family -> backend forced for it (wins over _override)
_cache: Dict[Tuple[str, str, str], Callable] = {}
_derived: List[dict] = []  # the dicts derived_cache() handed out, emptied with _cache
# Bumped by every backend change, under _lock with the caches' clearing: a cache entry is
# stored only if no change came between its lookup and its store (a lookup in flight on
# another thread when a change cleared the caches stored the old backend back, for good).
_generation = 0
_lock = threading.Lock()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown op family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


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


def _cpu_available() -> Tuple[bool, str]:
    from ._native import native, native_error

    return (True, "") if native is not None else (False, native_error)


def _cuda_available() -> Tuple[bool, str]:
    from ._native import native, native_error

    if native is None:
        return False, f"the native module fedmpq_kernels._C did not load: {native_error}"
    if not getattr(native, "with_cuda", False):
        return False, "fedmpq_kernels._C was built without CUDA (no nvcc at build time, or FEDMPQ_CUDA=0)"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    torch_count = torch.cuda.device_count()
    if torch_count == 0:
        return False, "torch sees no CUDA device"
    native_count = native.cuda_device_count()
    if native_count == 0:
        # The module links the CUDA runtime statically: it needs a driver new enough
        # for the toolkit it was built with, even when torch's own runtime works.
        return False, (
            f"fedmpq_kernels._C's CUDA runtime sees no device although torch sees {torch_count} "
            f"(is the NVIDIA driver older than the CUDA toolkit the module was built with? "
            f"compiled for sm {native.cuda_archs()})"
        )
    problem = arch_problem(native.cuda_archs(), [torch.cuda.get_device_capability(i) for i in range(torch_count)])
    return (False, problem) if problem else (True, "")


def arch_problem(archs: str, capabilities: List[Tuple[int, int]]) -> str:
    """Why kernels compiled for ``archs`` (CMake's list as the module reports it, e.g.
    ``"80,90"`` or ``"90a-real"``) cannot run on every device of ``capabilities`` ((major,
    minor) each), "" if they can. A plain ``NN`` entry holds machine code for sm_NN and PTX
    that the driver compiles for any newer device; ``-real`` only the first, ``-virtual`` only
    the second; an ``a`` suffix runs on that exact version only, ``f`` on its major version's
    later minors. Entries it does
    not know (``native``, ``all``) are taken to run anywhere."""
    entries = []
    for entry in archs.replace(";", ",").split(","):
        m = re.fullmatch(r"(\d+)(\d)([af]?)(-real|-virtual)?", entry.strip())
        if m is None:
            return ""  # not a list of numbers: trust it
        entries.append(((int(m.group(1)), int(m.group(2))), m.group(3), m.group(4) or ""))
    for dev, cap in enumerate(capabilities):
        cap = tuple(cap)
        ok = False
        for arch, suffix, kind in entries:
            if suffix:  # arch-specific code: "a" that exact device, "f" its family
                ok |= arch == cap if suffix == "a" else arch[0] == cap[0] and arch[1] <= cap[1]
                continue
            sass = kind != "-virtual" and arch[0] == cap[0] and arch[1] <= cap[1]
            ptx = kind != "-real" and arch <= cap
            ok |= sass or ptx
        if not ok:
            return (f"fedmpq_kernels._C's CUDA kernels were compiled for sm {archs}, which cannot run on "
                    f"CUDA device {dev} (sm_{cap[0]}{cap[1]}); rebuild with FEDMPQ_CUDA_ARCHS including "
                    f"{cap[0]}{cap[1]} (pip install -e . with FEDMPQ_CUDA_ARCHS=\"{cap[0]}{cap[1]};80;90\")")
    return ""


# The oldest Triton the kernels are tested with: 3.6 is the first whose GPU code keeps
# subnormals as torch does (3.4 and 3.5 turn libdevice's flush-to-zero on for every kernel, and
# div_rn compiles to div.rn.ftz.f32 in 49 of the 105 sm_90 kernels: tests/triton_compile.py),
# and 3.4 the first whose interpreter runs them (3.2 and 3.3 lack int1 there, 3.0 and 3.1 want
# constexpr aranges); pyproject's extra says the same.
MIN_TRITON = (3, 6)


def triton_too_old(version: str) -> str:
    """Why Triton ``version`` (e.g. ``3.6.0``, ``3.9.0+git1a2b``) is not used, "" if it is new
    enough (:data:`MIN_TRITON` or later)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m and (int(m.group(1)), int(m.group(2))) >= MIN_TRITON:
        return ""
    least = ".".join(map(str, MIN_TRITON))
    return f"triton {version} is older than {least}, the oldest these kernels are tested with (pip install 'triton>={least}')"


def _triton_available() -> Tuple[bool, str]:
    # Triton kernels run on a CUDA device, or in the interpreter with TRITON_INTERPRET=1
    # set before triton is imported.
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        return False, f"import triton failed: {type(exc).__name__}: {exc}"
    old = triton_too_old(str(getattr(triton, "__version__", "?")))
    if old:
        return False, old
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    try:
        if torch.cuda.is_available():
            return True, ""
    except Exception as exc:
        return False, f"torch.cuda.is_available() failed: {type(exc).__name__}: {exc}"
    return False, "no CUDA device (torch.cuda.is_available() is False) and TRITON_INTERPRET is not '1'"


_AVAILABLE = {"cpu": _cpu_available, "cuda": _cuda_available, "triton": _triton_available}


def available(name: str) -> Tuple[bool, str]:
    """(True, "") if backend ``name`` can run here, else (False, the exact reason)."""
    _check_name(name)
    if name == "reference":
        return True, ""
    try:
        return _AVAILABLE[name]()
    except Exception as e:  # a failing check is a reason, not a crash
        return False, f"{type(e).__name__}: {e}"


def has(family: str, name: str) -> bool:
    """Whether op family ``family`` has backend ``name`` (a module ``<family>/<name>.py``)."""
    return importlib.util.find_spec(f"fedmpq_kernels.{family}.{_check_name(name)}") is not None


def module(family: str, name: str):
    """The Python module implementing backend ``name`` of ``family`` (its functions take tensors)."""
    return importlib.import_module(f"fedmpq_kernels.{family}.{_check_name(name)}")


def _forced(device_type: str, family: Optional[str]) -> Optional[str]:
    """The backend an override forces for ``family`` on ``device_type``, or None: the
    family's own override, else the one for every family, where it applies (a backend the
    device cannot run or the family does not have is no override there)."""
    for name in (_family_override.get(family) if family is not None else None, _override):
        if name is not None and supports(name, device_type) and (family is None or has(family, name)):
            return name
    return None


def backend_for(device_type: str, family: Optional[str] = None) -> str:
    """The backend name that runs ops on ``device_type`` now (of ``family``, when given)."""
    forced = _forced(device_type, family)
    if forced is not None:
        ok, why = available(forced)
        if not ok:
            raise RuntimeError(f"fedmpq backend {forced!r} was requested but is not available: {why}")
        return forced
    for name in _DEFAULT_ORDER.get(device_type, ["reference"]):
        if (family is None or has(family, name)) and available(name)[0]:
            return name
    return "reference"


def get(family: str, op: str, device_type: str) -> Callable:
    """The implementation of ``op`` (e.g. ``fake_quant``) of ``family`` for ``device_type``:
    from the backend :func:`backend_for` picks, or, when that backend's module has no such
    function (an op a backend does not implement yet), from the next one in the device's
    order that has it, ending with ``reference``, which has every op."""
    key = (family, op, device_type)
    fn = _cache.get(key)
    if fn is None:
        fn = remember(_cache, key, lambda: _resolve(family, op, device_type))
    return fn


def _resolve(family: str, op: str, device_type: str) -> Callable:
    """:func:`get`'s lookup, uncached."""
    fn = None
    first = backend_for(device_type, family)
    order = _DEFAULT_ORDER.get(device_type, ["reference"])
    names = [first] + [b for b in order[order.index(first) + 1 if first in order else len(order):]] + ["reference"]
    for name in names:
        if has(family, name) and (name == first or available(name)[0]):
            fn = getattr(module(family, name), op, None)
            if fn is not None:
                break
    if fn is None:
        raise AttributeError(f"op {op!r} of family {family!r} has no implementation, not even in reference.py")
    return fn


def get_many(family: str, ops: Tuple[str, ...], device_type: str) -> Tuple[Callable, ...]:
    """:func:`get` of several ops of ``family`` at once (an op's forward and backward, say),
    cached as one entry: one dict lookup per call on a hot path."""
    key = (family, ops, device_type)
    fns = _cache.get(key)
    if fns is None:
        fns = remember(_cache, key, lambda: tuple(get(family, op, device_type) for op in ops))
    return fns


def companions(fns: Tuple[Callable, ...], names: Tuple[str, ...]) -> Optional[Tuple[Callable, ...]]:
    """The functions ``names`` of the one backend module that defined every function of
    ``fns`` (results of :func:`get`), or None when ``fns`` come from more than one module or
    that module lacks one of ``names``: a backend's own forms of its ops for one caller (the
    CPU backend's kept-bitmap forms for fake-quant's eager autograd path)."""
    mods = {fn.__module__ for fn in fns}
    if len(mods) != 1:
        return None
    mod = sys.modules[mods.pop()]
    found = tuple(getattr(mod, name, None) for name in names)
    return None if None in found else found


def derived_cache() -> dict:
    """A dict in which a hot path keeps what it builds from the functions :func:`get` hands
    out, per device type (an autograd.Function over an op's forward and backward, say): one
    subscript per call instead of a call of :func:`get_many`. Emptied whenever the backends
    change (:func:`set_backend`, :func:`use_backend`); fill it with :func:`remember`."""
    d: dict = {}
    _derived.append(d)
    return d


def remember(d: dict, key, make: Callable[[], object]):
    """``d[key] = make()`` for a cache of what the backends choose (``_cache``, a
    :func:`derived_cache`), and that value: made again while a backend change comes between
    the making and the store (another thread's :func:`set_backend`), so that what is stored,
    and returned, is of one choice of backends, never one a change has already undone."""
    while True:
        gen = _generation
        value = make()
        with _lock:
            if gen == _generation:
                d[key] = value
                return value


def set_backend(name: Optional[str], family: Optional[str] = None) -> None:
    """Force backend ``name`` on the devices it supports, for every family or for ``family``
    only (None restores the defaults of that scope)."""
    global _override, _generation
    if name is not None:
        _check_name(name)
    if family is not None:
        family = _check_family(family)
    with _lock:
        if family is None:
            _override = name
        elif name is None:
            _family_override.pop(family, None)
        else:
            _family_override[family] = name
        _generation += 1
        _cache.clear()
        for d in _derived:
            d.clear()


@contextlib.contextmanager
def use_backend(name: Optional[str], family: Optional[str] = None) -> Iterator[None]:
    """Context manager form of :func:`set_backend` (restores the previous choice of that
    scope). The choice is process-wide: every thread sees it. Enter it around the threads
    that should run under it, not in each of them: threads that enter and leave it at once
    each restore what they found, and the last to leave may restore another's choice."""
    prev = _override if family is None else _family_override.get(_check_family(family))
    set_backend(name, family)
    try:
        yield
    finally:
        set_backend(prev, family)


def set_backends_from(spec: str) -> None:
    """Apply an override list as ``FEDMPQ_BACKEND`` takes it: comma-separated entries, each
    ``backend`` (every family) or ``family=backend``. Raises ValueError naming a bad entry."""
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        family, sep, name = item.rpartition("=")
        try:
            set_backend(name.strip(), family.strip() if sep else None)
        except ValueError as exc:
            raise ValueError(f"FEDMPQ_BACKEND entry {item!r}: {exc}") from None


def explain() -> List[str]:
    """One line per backend: available or why not; then the overrides in force, if any."""
    lines = []
    for name in BACKENDS:
        ok, why = available(name)
        lines.append(f"{name:9s} {'available' if ok else 'unavailable: ' + why}")
    forced = ([_override] if _override else []) + [f"{f}={b}" for f, b in sorted(_family_override.items())]
    if forced:
        lines.append("forced    " + ",".join(forced) + " (FEDMPQ_BACKEND or use_backend)")
    return lines


if os.environ.get("FEDMPQ_BACKEND"):
    set_backends_from(os.environ["FEDMPQ_BACKEND"])
