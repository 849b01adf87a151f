"""A CUDA device for a CPU-only torch, for tracing only: FakeTensorMode's CUDA tensors, which
hold no memory, made to go through autograd and ``torch.compile``'s tracing.

A CPU build of torch makes fake CUDA tensors, but autograd stops on them (no CUDA device
guard, no CUDA hooks). ``fake_cuda.cpp`` registers c10's own ``FakeGuardImpl`` as CUDA's guard
and CUDA hooks that report CUDA present. That lets the device-dependent Python of a CUDA run
(the trace of a compiled model on CUDA, the optimizers' CUDA paths) be traced with no GPU, every
op answered by its fake (meta) implementation. Nothing runs on a device; an op without a fake
implementation raises.

The library must be loaded before torch is imported (torch asks for its CUDA hooks once), and
only in a process of its own, whose torch then claims CUDA: :func:`build` here, and the child
process loads it first thing (``trace_step.py``)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build() -> Path:
    """Compile ``fake_cuda.cpp`` against this torch (once per source and torch version) and
    return the library's path. Raises RuntimeError with the compiler's output on failure."""
    import torch
    from torch.utils import cpp_extension

    src = HERE / "fake_cuda.cpp"
    key = hashlib.sha256(src.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    lib = Path(tempfile.gettempdir()) / f"fedmpq-fake-cuda-{key}" / "libfedmpq_fake_cuda.so"
    if lib.exists():
        return lib
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) to build the fake CUDA device")
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    incs = [f"-I{p}" for p in cpp_extension.include_paths()]
    lib.parent.mkdir(parents=True, exist_ok=True)
    staged = lib.with_name(f"{lib.name}.{os.getpid()}")
    cmd = [cxx, "-std=c++17", "-O1", "-g0", "-fPIC", "-shared", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *incs,
           str(src), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}", "-o", str(staged)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError("building the fake CUDA device failed:\n" + " ".join(cmd) + "\n" + res.stderr[-6000:])
    os.replace(staged, lib)  # atomic: concurrent workers never load a half-written file
    return lib
