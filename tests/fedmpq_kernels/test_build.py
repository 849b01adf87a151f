"""The CPU kernels' sources as a build without x86 (aarch64: a Raspberry Pi, a Jetson) compiles
them: the dispatch sites name the AVX2 functions whatever the ISA, and such a build has no
AVX2 translation units, so every name must resolve without them. An undefined symbol still
links into a shared object, and the module then fails to load on import (as it did on
aarch64 under qemu until the headers forwarded the AVX2 names to the portable code)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CXX = shutil.which("g++") or shutil.which("c++")


UNITS = ["fake_quant", "pack", "bitplane", "cpu_features", "thread_pool"]  # csrc/cpu, the *_avx2.cpp left out


def _symbols(obj: Path, which: str) -> set:
    out = subprocess.run(["nm", "-C", which, str(obj)], check=True, capture_output=True, text=True).stdout
    return {line.split(None, 2)[-1] if which == "--defined-only" else line.split(None, 1)[-1]
            for line in out.splitlines() if "fedmpq::" in line}


@pytest.mark.skipif(CXX is None or shutil.which("nm") is None or not (ROOT / "csrc").is_dir(),
                    reason="needs a C++ compiler, nm and the sources")
def test_a_build_without_x86_leaves_no_kernel_name_undefined(tmp_path):
    defined, undefined = set(), set()
    for unit in UNITS:
        obj = tmp_path / f"{unit}.o"
        # -O0: no dead branch folded away, so every name a dispatch site uses must resolve
        subprocess.run([CXX, "-std=c++17", "-O0", f"-I{ROOT / 'csrc'}", "-c", str(ROOT / "csrc" / "cpu" / f"{unit}.cpp"),
                        "-o", str(obj)], check=True, capture_output=True, text=True)
        defined |= _symbols(obj, "--defined-only")
        undefined |= _symbols(obj, "--undefined-only")
    assert sorted(undefined - defined) == []
