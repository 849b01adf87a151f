"""A stand-in CUDA device for a CPU-only torch (fake_cuda.cpp), in two forms:

- *Fake CUDA tensors for tracing.* A CPU build makes FakeTensorMode's CUDA tensors, but
  autograd stops on them (no CUDA device guard, no CUDA hooks). The library registers c10's
  own ``FakeGuardImpl`` as CUDA's guard and CUDA hooks that report CUDA present, so the
  device-dependent Python of a CUDA step traces under FakeTensorMode (trace_step.py,
  test_compile_on_cuda.py).
- *Host CUDA for running.* Tensors labelled ``cuda:0`` whose memory is host memory: every
  aten op runs the CPU's kernel on a CPU alias of the same memory (a fallback for the CUDA
  dispatch key; views, in-place and out= ops keep their aliasing), and a CPU tensor beside a
  CUDA one is refused as on a GPU (but in a copy, as an index, or as a 0-dim scalar that is
  only read). :mod:`.host` points torch.cuda's
  Python at it (one device, streams and events that order nothing), and
  :func:`emulated_kernels` gives the CUDA backend's adapters the CUDA kernels compiled for the
  host (tests/cuda_emu). It has no CUDA graphs, no concurrency and other convolution
  algorithms than the CPU's (test_host_cuda.py, federation.py, run_pytest.py).

The library must be loaded before torch is imported (torch asks for its CUDA hooks once), and
only in a process of its own, whose torch then claims CUDA: :func:`build` here, :func:`load`
first thing in the child process. For a CPU-only torch only: a CUDA build has CUDA's hooks,
guard and kernels already (and a GPU runs the CUDA path itself), so :func:`build` refuses it
and the tests skip (:func:`cpu_only_torch`)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping, Optional

HERE = Path(__file__).resolve().parent


def child_env(base: Optional[Mapping[str, str]] = None) -> dict:
    """The environment of a child process on the stand-in device: ``base`` (default
    os.environ) with the repository on its path, one thread, and none of the parent's choices
    (a backend forced, the Triton interpreter that tests/conftest.py sets where torch has no
    CUDA, pytest options)."""
    base = os.environ if base is None else base
    root = str(HERE.parents[1])
    env = dict(base, PYTHONPATH=os.pathsep.join(filter(None, [root, base.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    for key in ("FEDMPQ_TEST_BACKENDS", "FEDMPQ_BACKEND", "TRITON_INTERPRET", "PYTEST_ADDOPTS"):
        env.pop(key, None)
    return env


def cpu_only_torch() -> bool:
    """Whether this torch is a CPU-only build, the one the stand-in device is for."""
    import torch

    return not torch.backends.cuda.is_built()


def load(lib: str) -> None:
    """In a fresh process, before anything imports torch: load ``lib`` (:func:`build`'s), then
    torch, and point torch.cuda's Python at host CUDA (host.py)."""
    import ctypes
    import sys

    if "torch" in sys.modules:
        raise RuntimeError("tests.fake_cuda.load: torch is already imported (its CUDA hooks are looked up once)")
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    from . import host

    host.install()


def emulated_kernels() -> list:
    """Host CUDA's kernels: every CUDA adapter (``fedmpq_kernels/<family>/cuda.py``) given the
    CUDA kernels compiled for the host (tests/cuda_emu) as its ``_C.cuda``, the rest of it
    (device checks, streams, workspaces on the device) as on a GPU; the cuda backend made
    available. Returns the :class:`~tests.cuda_emu.launchers.EmulatedCuda` objects (their
    ``calls``)."""
    import importlib
    from types import SimpleNamespace

    from fedmpq_kernels import registry
    from tests import cuda_emu
    from tests.cuda_emu.launchers import EmulatedCuda

    emu = cuda_emu.load()
    launched = []
    for fam in registry.FAMILIES:
        launched.append(EmulatedCuda(emu))
        importlib.import_module(f"fedmpq_kernels.{fam}.cuda").native = SimpleNamespace(cuda=launched[-1])
    registry._AVAILABLE["cuda"] = lambda: (True, "")
    return launched


def build() -> Path:
    """Compile ``fake_cuda.cpp`` against this torch (once per source, compiler and torch) and
    return the library's path. Raises RuntimeError with the compiler's output on failure."""
    import torch
    from torch.utils import cpp_extension

    if not cpu_only_torch():
        raise RuntimeError(f"tests.fake_cuda is for a CPU-only torch; this one ({torch.__version__}) is built with CUDA")
    src = HERE / "fake_cuda.cpp"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) to build the fake CUDA device")
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    incs = [f"-I{p}" for p in cpp_extension.include_paths()]
    flags = ["-std=c++17", "-O1", "-g0", "-fPIC", "-shared", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *incs]
    # keyed on everything the library is made of: the source, the compiler and flags, and the
    # torch it links (its rpath is that torch's lib folder); in a folder of this user's own
    key = hashlib.sha256("\0".join([src.read_text(), cxx, *flags, str(torch_lib), torch.__version__]).encode())
    uid = os.getuid() if hasattr(os, "getuid") else 0
    lib = Path(tempfile.gettempdir()) / f"fedmpq-fake-cuda-{uid}-{key.hexdigest()[:16]}" / "libfedmpq_fake_cuda.so"
    lib.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if hasattr(os, "getuid") and lib.parent.stat().st_uid != uid:
        raise RuntimeError(f"{lib.parent} belongs to another user: not loading a library from it")
    if lib.exists():
        return lib
    staged = lib.with_name(f"{lib.name}.{os.getpid()}")
    cmd = [cxx, *flags, str(src), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}", "-o", str(staged)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError("building the fake CUDA device failed:\n" + " ".join(cmd) + "\n" + res.stderr[-6000:])
    os.replace(staged, lib)  # atomic: concurrent workers never load a half-written file
    return lib
