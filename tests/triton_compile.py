"""Compile every Triton kernel the backends launch for a GPU target, without a GPU:
``python tests/triton_compile.py [--arch 90]`` (run by tests/fedmpq_kernels/test_triton_compiles.py).

The Triton interpreter (the CI path) runs a kernel's Python and lets through code that the
compiler refuses: a plain global read inside ``@triton.jit`` code, say, which the
interpreter reads and the GPU build rejects. Here each backend adapter runs on small CPU
tensors with ``JITFunction.run`` replaced: instead of launching, it builds the kernel's
signature from the arguments it got (tensor dtypes, ints, floats, constexpr values, the
launch options) and compiles it with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``,
through PTX and ptxas, and fails a kernel whose PTX has a flushing (``.ftz``) instruction:
the kernels keep subnormals as torch does. Every kernel and specialization the adapters reach
is compiled once.
Prints one line per compile and ends with ``compiled N, failed M``; exits 1 if any failed.
Must run without ``TRITON_INTERPRET`` (it refuses to start otherwise).
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tests/triton_compile.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_PTR = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
        torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
        torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")


class Compiler:
    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.done: dict = {}
        self.failed = 0

    def run(self, fn: JITFunction, *args, grid=None, warmup=False, **kwargs):
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTIONS}
        bound = inspect.signature(fn.fn).bind(*args, **kwargs)
        bound.apply_defaults()
        sig, consts = {}, {}
        for p in fn.params:
            v = bound.arguments[p.name]
            if p.is_constexpr or v is None:
                sig[p.name], consts[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + _PTR[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -(1 << 31) <= v < (1 << 31) else "i64"
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{fn.fn.__name__}: argument {p.name} of type {type(v).__name__}")
        key = (fn.fn.__module__, fn.fn.__name__, tuple(sig.items()), tuple(sorted(consts.items(), key=str)),
               tuple(sorted(opts.items())))
        if key in self.done:
            return None
        what = f"{fn.fn.__module__.split('.', 1)[1]}.{fn.fn.__name__} {consts} {opts}"
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=self.target, options=opts)
            # the kernels must keep subnormals, as torch does: a flushing instruction (a
            # libdevice routine under nvvm-reflect-ftz, say) would give zeros on a GPU only
            ftz = sorted(set(re.findall(r"\b[a-z0-9]+(?:\.[a-z0-9]+)*\.ftz\b[.a-z0-9]*", k.asm["ptx"])))
            if ftz:
                raise RuntimeError(f"its PTX flushes subnormals to zero: {ftz[:4]}")
            self.done[key] = True
            print("ok  ", what)
        except Exception as e:  # noqa: BLE001 -- every failure is reported, then the run fails
            self.done[key] = False
            self.failed += 1
            print("FAIL", what, "\n    " + str(e).replace("\n", "\n    ")[:3000])
        return None


def exercise() -> None:
    """Every adapter of every Triton family, every width and mode, on small CPU tensors."""
    from fedmpq_kernels._checks import bitmap_nbytes
    from fedmpq_kernels.bitplane import triton as bt
    from fedmpq_kernels.fake_quant import triton as ft
    from fedmpq_kernels.pack import triton as pt

    n = 1000
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(n).to(dt)
        for bits in (1, 4, 8, 16):
            for mode in (0, 1, 2):
                ft.fake_quant(x, bits, torch.tensor(1.0), mode)
                ft.fake_quant(x, bits, None, mode)
            ft.relu6_fake_quant(x, bits)
        bm = torch.zeros(2 * bitmap_nbytes(n), dtype=torch.uint8)
        ft.fake_quant_backward(x, bm, True)
        ft.fake_quant_backward(x, bm, False)
    for bits in range(1, 9):
        codes = torch.zeros(n, dtype=torch.uint8)
        planes = pt.pack_codes(codes, bits)
        pt.unpack_codes(planes, bits, n)
        acc = torch.zeros(n)
        pt.dequant_accumulate(acc, planes, None, bits, 0.5)
        pt.dequant_accumulate(acc, planes, torch.zeros(bitmap_nbytes(n), dtype=torch.uint8), bits, 0.5)
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        w = torch.randn(n).to(dt)
        if dt != torch.float64:
            bt.binarize(w, 4)
        codes, sign, scale = bt.binarize(w.float(), 4)
        bt.dequantize_backward(w, codes, sign, 4)
    for bits in range(1, 9):
        codes, sign, scale = bt.binarize(torch.randn(n), bits)
        bt.dequantize(codes, sign, scale, bits)
        bt.plane_popcounts(codes, bits)
        mom, gs, g = torch.zeros(bits, n, dtype=torch.uint8), torch.zeros(1), torch.randn(n)
        coef = torch.zeros(bits)
        bt.bitplane_step(codes, sign, mom, gs, g, coef, scale, bits, 0.1, 0.9, 7)
        bt.bitplane_step(codes, sign, mom, gs, g, coef, scale, bits, 0.1, 0.9, 0,
                         key_tensor=torch.tensor([7], dtype=torch.int64))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="the target's compute capability as an int (default 90)")
    a = ap.parse_args()
    comp = Compiler(a.arch)
    JITFunction.run = lambda self, *args, grid=None, warmup=False, **kw: comp.run(self, *args, **kw)
    exercise()
    print(f"compiled {sum(comp.done.values())}, failed {comp.failed} (sm_{a.arch})")
    return 1 if comp.failed or not comp.done else 0


if __name__ == "__main__":
    sys.exit(main())
