"""``python -m fedmpq_kernels.info``: what was built, what loaded, what runs where.

Prints the package, torch and triton versions; whether the native module loaded (and
the exact reason if not); the CPU features, the kernel ISA in use and the kernels' threading
(their own blocking pool, no OpenMP) with the thread count; the CUDA
architectures compiled; each backend's availability; and, per op family, the backend its
public ops run on for CPU and CUDA tensors.
"""
from __future__ import annotations

import importlib
import sys
from typing import List


def report() -> List[str]:
    import torch

    from . import __version__, registry
    from ._native import native, native_error

    lines = [f"fedmpq_kernels {__version__}", f"python         {sys.version.split()[0]}", f"torch          {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton         {triton.__version__}")
    except Exception as e:  # triton is optional
        lines.append(f"triton         not importable ({type(e).__name__}: {e})")
    if native is None:
        lines.append(f"native module  NOT LOADED: {native_error}")
    else:
        lines.append(f"native module  loaded from {native.__file__}")
        lines.append(f"cpu features   {native.cpu_features()}")
        lines.append(f"cpu kernels    isa={native.cpu_isa()} {_threading(native, torch.get_num_threads())}")
        if native.with_cuda:
            lines.append(f"cuda kernels   compiled for sm {native.cuda_archs()}; devices visible: {native.cuda_device_count()}")
        else:
            lines.append("cuda kernels   not compiled (no nvcc at build time, or FEDMPQ_CUDA=0)")
    lines.append(f"torch cuda     {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    lines.append("backends:")
    lines += ["  " + line for line in registry.explain()]
    lines.append("ops (backend per device):")
    for family in registry.FAMILIES:
        ops = importlib.import_module(f"{__package__}.{family}").__all__  # its public functions
        ref = registry.module(family, "reference")
        for dev in ("cpu", "cuda"):
            for op in ops:
                single = op[:-len("_layers")] if op.endswith("_layers") else ""
                if hasattr(ref, op) and not hasattr(torch.ops.fedmpq, op) and hasattr(torch.ops.fedmpq, single):
                    # many layers in one call, on the backend of the one-layer op: with that
                    # backend's own many-layer function where it has one, else layer by layer
                    try:
                        fn = registry.get(family, single, dev)
                        name = fn.__module__.rsplit(".", 1)[-1]
                        if not hasattr(sys.modules[fn.__module__], op):
                            name += f" (layer by layer, {single})"
                    except RuntimeError as e:
                        name = f"ERROR: {e}"
                    lines.append(f"  {op:15s} {dev:5s} -> {name}")
                    continue
                if not hasattr(ref, op) or not hasattr(torch.ops.fedmpq, op):
                    if dev == "cpu":
                        lines.append(f"  {op:15s} any   -> no kernel (Python and torch ops)")
                    continue
                try:  # the backend that runs it, after the registry's per-op fallback
                    name = registry.get(family, op, dev).__module__.rsplit(".", 1)[-1]
                except RuntimeError as e:
                    name = f"ERROR: {e}"
                lines.append(f"  {op:15s} {dev:5s} -> {name}")
    return lines


def _threading(native, requested: int) -> str:
    """How the CPU kernels run in parallel: ``threading=own pool (blocking), threads=2 (of 2
    cores), grain=32768`` (threads: torch.get_num_threads(), which each call passes, capped at
    the cores; a tensor uses one thread per grain elements at most, one below 2 grains)."""
    t = getattr(native, "threading", None)
    if t is None:  # a module built before the pool (it used OpenMP)
        return f"threading=openmp threads={requested}"
    t = t()
    return (f"threading={t['kind']} ({t['wait']}), threads={min(requested, t['max_threads'])} "
            f"(of {t['max_threads']} cores), grain={t['grain']}")


def main() -> int:
    print("\n".join(report()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
