"""The backend matrix: every test that takes ``backend`` runs once per backend and
device, skipped (with the reason) where that backend cannot run here."""
from __future__ import annotations

import contextlib
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

    @property
    def module(self):
        return registry.module(self.name)

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

    def skip_if_too_big(self, numel: int) -> None:
        if self.max_numel is not None and numel > self.max_numel:
            pytest.skip(f"{self.name} on {self.device} runs in the Triton interpreter: sizes <= {self.max_numel} only")


def _cases():
    cuda = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    avx2 = native is not None and native.avx2_available()
    cases = [
        pytest.param(Backend("reference", "cpu"), id="reference-cpu"),
        pytest.param(Backend("cpu", "cpu", "avx2"), id="cpu-avx2",
                     marks=pytest.mark.skipif(not avx2, reason="no AVX2/FMA on this CPU or no native module")),
        pytest.param(Backend("cpu", "cpu", "portable"), id="cpu-portable",
                     marks=pytest.mark.skipif(native is None, reason="native module not built")),
        pytest.param(Backend("triton", "cpu", max_numel=4096), id="triton-interpreter",
                     marks=pytest.mark.skipif(not interp, reason="TRITON_INTERPRET is not 1")),
        pytest.param(Backend("reference", "cuda"), id="reference-cuda",
                     marks=pytest.mark.skipif(not cuda, reason="no CUDA device")),
        pytest.param(Backend("cuda", "cuda"), id="cuda",
                     marks=pytest.mark.skipif(not cuda, reason="no CUDA device")),
        pytest.param(Backend("triton", "cuda"), id="triton-cuda",
                     marks=pytest.mark.skipif(not cuda or interp, reason="no CUDA device (or interpreter forced)")),
    ]
    return cases


@pytest.fixture(params=_cases())
def backend(request) -> Backend:
    b: Backend = request.param
    ok, why = registry.available(b.name)
    if not ok:
        pytest.fail(f"backend {b.name} should run here but is unavailable: {why}")
    return b
