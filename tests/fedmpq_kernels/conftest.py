"""The backend matrix, shared by every op family's tests: every test that takes
``backend`` runs once per backend and device, skipped (with the reason) where that
backend cannot run here."""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch

from fedmpq_kernels import registry
from fedmpq_kernels._native import native


@dataclass(frozen=True)
class Backend:
    name: str  # registry name
    device: str
    isa: str | None = None  # CPU instruction set forced for the native kernels
    max_numel: int | None = None  # the Triton interpreter is slow: small sizes only

    def module(self, family: str):
        """This backend's module of op family ``family`` (e.g. ``"fake_quant"``); skips the
        test where this backend has no such family (the registry falls back to another)."""
        if not registry.has(family, self.name):
            pytest.skip(f"{self.name} has no {family} kernels (the registry falls back to the next backend)")
        return registry.module(family, self.name)

    def op(self, family: str, name: str):
        """This backend's function for op ``name`` of ``family``; skips where it has none."""
        fn = getattr(self.module(family), name, None)
        if fn is None:
            pytest.skip(f"{self.name} has no {name} kernel (the registry falls back to the next backend)")
        return fn

    @contextlib.contextmanager
    def active(self):
        """Route the public ops to this backend (and ISA) inside the block."""
        prev_isa = native.cpu_isa() if native is not None else None
        if self.isa:
            native.set_cpu_isa(self.isa)
        try:
            with registry.use_backend(self.name):
                yield
        finally:
            if self.isa:
                native.set_cpu_isa(prev_isa)

    @property
    def interpreted(self) -> bool:
        """Whether this case runs in the Triton interpreter (about 25 ms a launch, 0.1-1 s a
        call at a thousand elements): tests thin out their repeated cases there."""
        return self.name == "triton" and self.device == "cpu"

    def skip_if_too_big(self, numel: int) -> None:
        if self.max_numel is not None and numel > self.max_numel:
            pytest.skip(f"{self.name} on {self.device} runs in the Triton interpreter: sizes <= {self.max_numel} only")


# FEDMPQ_TEST_BACKENDS=cuda,triton-cuda (case ids below): run only the tests of those
# backend cases, and fail rather than skip where one of them cannot run (tools/gpu_check.sh
# runs each GPU backend on its own this way, so a missing one cannot pass as skipped).
_ONLY = {s.strip() for s in os.environ.get("FEDMPQ_TEST_BACKENDS", "").split(",") if s.strip()}


def _triton_missing() -> str:
    """Why the Triton cases cannot run ("" when they can). Triton is an optional extra: a
    user who did not install it gets those cases skipped; CI sets FEDMPQ_REQUIRE_TRITON=1,
    so there a missing Triton fails instead."""
    if os.environ.get("FEDMPQ_REQUIRE_TRITON") == "1":
        return ""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install -e \".[triton]\"; FEDMPQ_REQUIRE_TRITON=1 makes this a failure)"
    import triton  # tests/conftest.py has set TRITON_INTERPRET when it should be

    old = registry.triton_too_old(str(getattr(triton, "__version__", "?")))
    return f"{old}; FEDMPQ_REQUIRE_TRITON=1 makes this a failure" if old else ""


def _cases(gfni: bool = False):
    """The backend cases; ``gfni`` adds cpu-gfni, for the packing family only: the other
    families have no GFNI kernels (that level runs their AVX2 ones, which cpu-avx2 covers)."""
    cuda = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    avx2 = native is not None and native.avx2_available()
    no_triton = _triton_missing()
    table = [
        (Backend("reference", "cpu"), "reference-cpu", False, ""),
        (Backend("cpu", "cpu", "gfni"), "cpu-gfni", native is None or not native.gfni_available(),
         "no AVX2/FMA with GFNI on this CPU or no native module"),
        (Backend("cpu", "cpu", "avx2"), "cpu-avx2", not avx2, "no AVX2/FMA on this CPU or no native module"),
        (Backend("cpu", "cpu", "portable"), "cpu-portable", native is None, "native module not built"),
        (Backend("triton", "cpu", max_numel=4096), "triton-interpreter", not interp or bool(no_triton),
         no_triton or "TRITON_INTERPRET is not 1"),
        (Backend("reference", "cuda"), "reference-cuda", not cuda, "no CUDA device"),
        (Backend("cuda", "cuda"), "cuda", not cuda, "no CUDA device"),
        (Backend("triton", "cuda"), "triton-cuda", not cuda or interp or bool(no_triton),
         no_triton or "no CUDA device (or interpreter forced)"),
    ]
    unknown = _ONLY - {t[1] for t in table}
    if unknown:
        raise pytest.UsageError(f"FEDMPQ_TEST_BACKENDS names unknown cases {sorted(unknown)}")
    cases = []
    for b, cid, skip, why in table:
        if (_ONLY and cid not in _ONLY) or (cid == "cpu-gfni" and not gfni):
            continue
        if _ONLY and skip:  # asked for by name: a case that cannot run is a failure
            cases.append(pytest.param(_Unrunnable(cid, why), id=cid))
            continue
        cases.append(pytest.param(b, id=cid, marks=pytest.mark.skipif(skip, reason=why)))
    return cases


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device but takes no backend case; kept when "
                                       "FEDMPQ_TEST_BACKENDS names cuda (tools/gpu_check.sh's CUDA step)")


def pytest_collection_modifyitems(config, items):
    """With FEDMPQ_TEST_BACKENDS set, only tests that run on a backend case are kept, and,
    when it names cuda, the GPU tests that take none (marked ``gpu``)."""
    if not _ONLY:
        return
    gpu = "cuda" in _ONLY
    keep = [it for it in items if "backend" in getattr(it, "fixturenames", ())
            or (gpu and it.get_closest_marker("gpu") is not None)]
    config.hook.pytest_deselected(items=[it for it in items if it not in keep])
    items[:] = keep


@dataclass(frozen=True)
class _Unrunnable:
    case: str
    why: str


@pytest.fixture(params=_cases())
def backend(request):
    """The case's Backend. A CPU case's instruction set is forced for the whole test, not
    only inside ``active()``: a test that calls ``backend.module(...)``'s functions directly
    ran the cpu-portable case on AVX2 (whatever was current) and could not fail there."""
    yield from enter_case(request.param)


def enter_case(b):
    """The body of the ``backend`` fixture (pack/conftest.py's adds the cpu-gfni case)."""
    if isinstance(b, _Unrunnable):
        pytest.fail(f"FEDMPQ_TEST_BACKENDS asks for {b.case}, which cannot run here: {b.why}")
    ok, why = registry.available(b.name)
    if not ok:
        pytest.fail(f"backend {b.name} should run here but is unavailable: {why}")
    if not b.isa:
        yield b
        return
    prev = native.cpu_isa()
    native.set_cpu_isa(b.isa)
    try:
        yield b
    finally:
        native.set_cpu_isa(prev)


@pytest.fixture(scope="session")
def cuda_emu():
    """The CUDA C++ kernels compiled for the host and run under tests/cuda_emu (no GPU
    needed; built once per source state, about 5 s). A build failure is a test error."""
    from tests import cuda_emu as emu

    return emu.load()


@pytest.fixture
def emu(cuda_emu):
    """:func:`cuda_emu` with its defaults back for each test (one SM, blocks in order, warps
    in lockstep)."""
    def defaults():
        cuda_emu.sm_count(1)
        cuda_emu.block_order(0)
        cuda_emu.warp_order(0)

    defaults()
    yield cuda_emu
    defaults()
