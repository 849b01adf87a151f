"""Every Triton kernel the backends launch compiles for an H100/H200 (sm_90: Triton's frontend,
LLVM, PTX and ptxas), without a GPU. The interpreter, which runs the Triton tests here,
executes a kernel's Python and lets through what the compiler refuses (a plain global read
inside jit code slipped through it once); tests/triton_compile.py runs the adapters with the
launch replaced by a compile. It needs a process without TRITON_INTERPRET, so it runs in
its own (about 45 s with a cold Triton cache), beside the suite (tests/early.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import early

from .conftest import _triton_missing

SCRIPT = Path(__file__).resolve().parents[1] / "triton_compile.py"


@early.job("triton_compile")
def _compile():
    why = _triton_missing()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in early.environ().items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the kernels set it per launch; this silences a warning
    return early.run([sys.executable, str(SCRIPT), "--arch", "90"], env=env, timeout=900)


@pytest.mark.early("triton_compile")  # beside the suite (tests/early.py)
def test_every_triton_kernel_compiles_for_sm90():
    res = early.result("triton_compile")
    out = res.stdout + res.stderr
    assert res.returncode == 0, "kernels that do not compile for sm_90:\n" + "\n".join(
        line for line in out.splitlines() if not line.startswith("ok "))[-6000:]
    assert "failed 0" in out and "compiled 0," not in out
