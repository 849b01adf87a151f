"""The CUDA C++ kernels (csrc/cuda/fake_quant.cu, pack.cu, bitplane.cu) run on the CPU, so CI tests their
logic against the reference without a GPU.

:func:`load` compiles those files unchanged as host C++ against ``emu.h`` (the CUDA
keywords, intrinsics and types they use; one fiber per CUDA thread, a block at a time; see
emu.h for what it models and what it cannot) and returns an :class:`Emu` that calls their
launchers on CPU tensors. The only change made to the sources is the launch syntax:
``kernel<<<grid, block, shmem, stream>>>(args)`` becomes ``emu::launch(kernel, grid, block,
shmem, stream, args)``. The library is cached in the temporary directory, keyed on every
file it is built from."""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Tuple

import torch

from fedmpq_kernels._checks import bitmap_nbytes

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
SOURCES = ["fake_quant.cu", "pack.cu", "bitplane.cu"]
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# A misaligned vector access (a float4 or uint4 at an address not a multiple of 16) faults on a
# GPU but not on the host: the emulator is built with UBSan's alignment check, whose report
# (to stderr: its runtime reads options only from the process's initial environment)
# Emu.call_raw catches and raises. Not under the sanitizer run's preloaded ASan, whose runtime
# the standalone UBSan one would clash with.
ALIGNMENT_CHECK = "libasan" not in os.environ.get("LD_PRELOAD", "")

# kernel<...>   <<<config>>>(   ->   ::emu::launch(kernel<...>, config,
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def rewrite_launches(text: str) -> str:
    """``k<<<g, b, s, st>>>(a...)`` -> ``::emu::launch(k, g, b, s, st, a...)``."""
    out = _LAUNCH.sub(lambda m: f"::emu::launch({m.group(1)}, {m.group(2)}, ", text)
    if "<<<" in out:
        raise RuntimeError("a kernel launch the emulator's rewrite did not recognize is left")
    return out


def _inputs() -> list[Path]:
    cuda = CSRC / "cuda"
    return sorted([*cuda.glob("*.cu"), *cuda.glob("*.h"), *cuda.glob("*.cuh"), *(CSRC / "common").glob("*.h"),
                   *HERE.glob("*.h"), *HERE.glob("*.cpp"),
                   *(HERE / "include").glob("*.h"), Path(__file__)])


def build(verbose: bool = False) -> Path:
    """Compile the emulated kernels (once per source state) and return the library's path.
    Raises RuntimeError with the compiler's output when the build fails."""
    key = hashlib.sha256(b"-fsanitize=alignment" if ALIGNMENT_CHECK else b"")
    for f in _inputs():
        key.update(f.name.encode())
        key.update(f.read_bytes())
    out_dir = Path(tempfile.gettempdir()) / f"fedmpq-cuda-emu-{key.hexdigest()[:16]}"
    lib = out_dir / "libfedmpq_cuda_emu.so"
    if lib.exists():
        return lib
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) to build the CUDA emulator")
    work = Path(tempfile.mkdtemp(prefix="fedmpq-cuda-emu-build-"))
    try:
        srcs = []
        for name in SOURCES:
            dst = work / (name[:-3] + "_emu.cpp")
            dst.write_text(rewrite_launches((CSRC / "cuda" / name).read_text()))
            srcs.append(str(dst))
        tmp_lib = work / lib.name
        # -ffp-contract=off: no fused multiply-add, as the module's --fmad=false.
        cmd = [cxx, "-std=c++17", "-O1", "-g0", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
               "-Wno-unknown-pragmas", *(["-fsanitize=alignment"] if ALIGNMENT_CHECK else []),
               f"-I{HERE / 'include'}", f"-I{HERE}", f"-I{CSRC}", *srcs, str(HERE / "emu.cpp"), "-o", str(tmp_lib)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError("building the CUDA emulator failed:\n" + " ".join(cmd) + "\n" + res.stderr[-6000:])
        if verbose:
            print(res.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)
        staged = out_dir / f"{lib.name}.{os.getpid()}"
        shutil.copy2(tmp_lib, staged)
        os.replace(staged, lib)  # atomic: concurrent test workers never load a half-written file
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class EmuError(RuntimeError):
    pass


_VP, _I64 = ctypes.c_void_p, ctypes.c_int64


class StepLayer(ctypes.Structure):
    """fedmpq::cuda::StepLayer (csrc/cuda/bitplane.h): one layer of bitplane_step_layers."""
    _fields_ = [("codes", _VP), ("sign", _VP), ("mom", _VP), ("gs", _VP), ("grad", _VP), ("coef", _VP), ("scale", _VP),
                ("n", _I64), ("bits", ctypes.c_int), ("key", ctypes.c_uint32), ("key_ptr", _VP)]


class PopcountLayer(ctypes.Structure):
    """fedmpq::cuda::PopcountLayer: one layer of plane_popcounts_layers."""
    _fields_ = [("codes", _VP), ("n", _I64), ("bits", ctypes.c_int)]


class DequantLayer(ctypes.Structure):
    """fedmpq::cuda::DequantLayer: one layer of dequantize_layers."""
    _fields_ = [("codes", _VP), ("sign", _VP), ("scale", _VP), ("out", _VP), ("n", _I64), ("bits", ctypes.c_int)]


class DequantGradLayer(ctypes.Structure):
    """fedmpq::cuda::DequantGradLayer: one layer of dequantize_backward_layers."""
    _fields_ = [("grad", _VP), ("codes", _VP), ("sign", _VP), ("out", _VP), ("n", _I64), ("bits", ctypes.c_int)]


class Emu:
    """The launchers of csrc/cuda/fake_quant.h, pack.h and bitplane.h on CPU tensors (the caller sizes
    and allocates every buffer, as the Python adapters do). ``buffers`` registers the
    tensors loads may read (each call registers its own inputs unless given ``ranges``)."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self._stderr = tempfile.TemporaryFile() if ALIGNMENT_CHECK else None  # each call's stderr
        L = self.lib
        vp, i, ll, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float
        L.emu_message.restype = ctypes.c_char_p
        L.emu_workspace_words.restype = ll
        L.emu_workspace_words.argtypes = [i]
        L.emu_bitplane_workspace_words.restype = ll
        L.emu_bitplane_workspace_words.argtypes = [i]
        L.emu_set_sm_count.argtypes = [i]
        L.emu_launches.restype = ll
        L.emu_set_block_order.argtypes = [ctypes.c_uint]
        L.emu_set_warp_order.argtypes = [ctypes.c_uint]
        L.emu_add_range.argtypes = [vp, ctypes.c_size_t]
        sigs = {
            "emu_absmax": [vp, i, ll, vp, vp, i],
            "emu_fake_quant": [vp, vp, i, ll, i, vp, i, vp, vp, i],
            "emu_relu6_fake_quant": [vp, vp, i, ll, i, vp, vp, vp, i],
            "emu_fake_quant_backward": [vp, vp, i, ll, vp, vp, vp, vp, i],
            "emu_pack_codes": [vp, ll, i, vp, vp, i],
            "emu_unpack_codes": [vp, ll, i, vp, i],
            "emu_dequant_accumulate": [vp, ll, vp, vp, i, f, i],
            "emu_binarize": [vp, ll, i, vp, vp, vp, vp, i],
            "emu_dequantize": [vp, vp, ll, i, vp, vp, i],
            "emu_dequantize_backward": [vp, vp, vp, ll, i, vp, vp, i],
            "emu_plane_popcounts": [vp, ll, i, vp, vp, i],
            "emu_bitplane_step": [vp, vp, vp, vp, vp, vp, vp, ll, i, f, f, ctypes.c_uint, vp, vp, vp, i],
        }
        sigs["emu_bitplane_step_layers"] = [vp, ll, f, f, vp, vp, i]
        sigs["emu_plane_popcounts_layers"] = [vp, ll, vp, vp, i]
        sigs["emu_dequantize_layers"] = [vp, ll, i]
        sigs["emu_dequantize_backward_layers"] = [vp, ll, vp, i]
        for name, argtypes in sigs.items():
            getattr(L, name).argtypes = argtypes
            getattr(L, name).restype = i
        for name, struct in (("emu_step_layer_size", StepLayer), ("emu_popcount_layer_size", PopcountLayer),
                             ("emu_dequant_layer_size", DequantLayer), ("emu_dequant_grad_layer_size", DequantGradLayer)):
            getattr(L, name).restype = ctypes.c_size_t
            if getattr(L, name)() != ctypes.sizeof(struct):
                raise RuntimeError(f"{struct.__name__} in ctypes does not match csrc/cuda/bitplane.h")
        self.sm_count(1)
        self.block_order(0)
        self.warp_order(0)

    def sm_count(self, n: int) -> None:
        """The SM count the launchers size grids with (8 blocks of 256 threads per SM)."""
        self.lib.emu_set_sm_count(n)

    def launches(self) -> int:
        """Kernel launches run so far (a running count: compare before and after a call)."""
        return int(self.lib.emu_launches())

    def block_order(self, seed: int) -> None:
        """Run each grid's blocks in index order (0) or in an order shuffled with ``seed``."""
        self.lib.emu_set_block_order(seed)

    def warp_order(self, seed: int) -> None:
        """Run a block's warps in lockstep (0), or one at a time, each as far as it can go
        (to a ``__syncthreads`` or its end), in an order shuffled with ``seed``: a warp that
        overtakes the others shows a missing barrier."""
        self.lib.emu_set_warp_order(seed)

    def workspace(self) -> torch.Tensor:
        """A zeroed reduction workspace: ``workspace_words`` int32 words."""
        return torch.zeros(int(self.lib.emu_workspace_words(0)), dtype=torch.int32)

    def bitplane_workspace(self) -> torch.Tensor:
        """A zeroed workspace for bitplane.h: ``bitplane_workspace_words`` int32 words, 8-byte
        aligned (torch's allocations are)."""
        return torch.zeros(int(self.lib.emu_bitplane_workspace_words(0)), dtype=torch.int32)

    def _call(self, name: str, reads: Iterable[Optional[torch.Tensor]], *args) -> None:
        self.call_raw(name, [(t.data_ptr(), t.numel() * t.element_size()) for t in reads if t is not None], *args)

    def call_raw(self, name: str, ranges: Iterable[Tuple[int, int]], *args) -> None:
        """Calls C entry ``name`` (emu.cpp) with ``args`` as they are (pointers as ints);
        loads may read the (pointer, bytes) ``ranges``. ValueError for the launchers'
        argument errors, EmuError for a kernel's."""
        self.lib.emu_clear_ranges()
        for p, nbytes in ranges:
            self.lib.emu_add_range(p, nbytes)
        fn = getattr(self.lib, name)
        if self._stderr is None:
            rc = fn(*args)
        else:
            rc = self._watched(fn, args)
        if rc == 1:
            raise ValueError(self.lib.emu_message().decode())
        if rc != 0:
            raise EmuError(self.lib.emu_message().decode())

    def _watched(self, fn, args) -> int:
        """``fn(*args)`` with file descriptor 2 sent to a temporary file; EmuError if UBSan
        reported a misaligned access in it (each source location once per process), any other
        output passed on to stderr."""
        err = self._stderr
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            rc = fn(*args)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if err.tell():
            err.seek(0)
            text = err.read().decode(errors="replace")
            err.seek(0)
            err.truncate()
            if "runtime error:" in text:
                line = next(ln for ln in text.splitlines() if "runtime error:" in ln)
                raise EmuError(f"a misaligned access, which faults on a GPU: {line.split('runtime error: ', 1)[1]}")
            sys.stderr.write(text)
        return rc

    # fake_quant.h
    def absmax(self, x, out_bits, ws, device=0):
        self._call("emu_absmax", [x, ws], _ptr(x), DTYPE_CODES[x.dtype], x.numel(), _ptr(out_bits), _ptr(ws), device)

    def fake_quant(self, x, y, bits, scale, scale_given, pass_=None, hi=None, device=0, dtype=None):
        code = DTYPE_CODES[x.dtype] if dtype is None else dtype
        self._call("emu_fake_quant", [x, scale], _ptr(x), _ptr(y), code, x.numel(), bits, _ptr(scale),
                   int(scale_given), _ptr(pass_), _ptr(hi), device)

    def relu6_fake_quant(self, x, y, bits, scale, mask, ws, device=0):
        self._call("emu_relu6_fake_quant", [x, scale, ws], _ptr(x), _ptr(y), DTYPE_CODES[x.dtype], x.numel(), bits,
                   _ptr(scale), _ptr(mask), _ptr(ws), device)

    def fake_quant_backward(self, g, gx, pass_, hi, ws, grad_scale, device=0):
        self._call("emu_fake_quant_backward", [g, pass_, hi, ws], _ptr(g), _ptr(gx), DTYPE_CODES[g.dtype], g.numel(),
                   _ptr(pass_), _ptr(hi), _ptr(ws), _ptr(grad_scale), device)

    # pack.h
    def pack_codes(self, codes, bits, planes, seen, device=0):
        self._call("emu_pack_codes", [codes], _ptr(codes), codes.numel(), bits, _ptr(planes), _ptr(seen), device)

    def unpack_codes(self, planes, n, bits, codes, device=0):
        self._call("emu_unpack_codes", [planes], _ptr(planes), n, bits, _ptr(codes), device)

    def dequant_accumulate(self, acc, planes, signs, bits, coef, device=0):
        self._call("emu_dequant_accumulate", [acc, planes, signs], _ptr(acc), acc.numel(), _ptr(planes), _ptr(signs),
                   bits, coef, device)

    # bitplane.h
    def binarize(self, w, bits, codes, sign, scale, ws, device=0):
        """``scale``: float32, receives max|w| (the absmax launch writes its bits there)."""
        self._call("emu_binarize", [w, ws, scale], _ptr(w), w.numel(), bits, _ptr(codes), _ptr(sign), _ptr(scale),
                   _ptr(ws), device)

    def dequantize(self, codes, sign, bits, scale, out, device=0):
        self._call("emu_dequantize", [codes, sign, scale], _ptr(codes), _ptr(sign), codes.numel(), bits, _ptr(scale),
                   _ptr(out), device)

    def dequantize_backward(self, grad, codes, sign, bits, out, ws, device=0):
        self._call("emu_dequantize_backward", [grad, codes, sign, ws], _ptr(grad), _ptr(codes), _ptr(sign),
                   codes.numel(), bits, _ptr(out), _ptr(ws), device)

    def plane_popcounts(self, codes, bits, out, ws, device=0):
        self._call("emu_plane_popcounts", [codes, ws], _ptr(codes), codes.numel(), bits, _ptr(out), _ptr(ws), device)

    def bitplane_step(self, codes, sign, mom, gs, grad, coef, scale, bits, lr, momentum, key, key_tensor, out, ws,
                      device=0):
        """``out``: float32 (2,), receives g_s and the previous gs. lr and momentum are
        rounded to float32 here, as the binding does."""
        self._call("emu_bitplane_step", [codes, sign, mom, gs, grad, coef, scale, key_tensor, out, ws], _ptr(codes),
                   _ptr(sign), _ptr(mom), _ptr(gs), _ptr(grad), _ptr(coef), _ptr(scale), codes.numel(), bits, lr,
                   momentum, key, _ptr(key_tensor), _ptr(out), _ptr(ws), device)

    def bitplane_step_layers_raw(self, layers, lr, momentum, out, ws, ranges, device=0):
        """bitplane_step_layers on ``layers``, tuples of StepLayer's fields (pointers as ints);
        ``out`` and ``ws`` pointers; loads may read ``ranges``."""
        table = (StepLayer * max(len(layers), 1))(*[StepLayer(*y) for y in layers])
        self.call_raw("emu_bitplane_step_layers", ranges, table, len(layers), lr, momentum, out, ws, device)

    def plane_popcounts_layers_raw(self, layers, out, ws, ranges, device=0):
        """plane_popcounts_layers on ``layers``, (codes pointer, n, bits) tuples."""
        table = (PopcountLayer * max(len(layers), 1))(*[PopcountLayer(*y) for y in layers])
        self.call_raw("emu_plane_popcounts_layers", ranges, table, len(layers), out, ws, device)

    def dequantize_layers_raw(self, layers, ranges, device=0):
        """dequantize_layers on ``layers``, tuples of DequantLayer's fields (pointers as ints)."""
        table = (DequantLayer * max(len(layers), 1))(*[DequantLayer(*y) for y in layers])
        self.call_raw("emu_dequantize_layers", ranges, table, len(layers), device)

    def dequantize_backward_layers_raw(self, layers, ws, ranges, device=0):
        """dequantize_backward_layers on ``layers``, tuples of DequantGradLayer's fields."""
        table = (DequantGradLayer * max(len(layers), 1))(*[DequantGradLayer(*y) for y in layers])
        self.call_raw("emu_dequantize_backward_layers", ranges, table, len(layers), ws, device)


def load() -> Emu:
    return Emu(build())


def words(n: int) -> int:
    """The uint32 words of a bitmap of n elements (the kernels' pass/hi/mask and plane words)."""
    return bitmap_nbytes(n) // 4


class Guarded:
    """``n`` elements of ``dtype`` at element ``offset`` past a 64-byte boundary, inside a
    larger buffer whose every byte starts as ``fill``: :meth:`check` finds a store outside
    the ``n`` elements (the emulator checks loads, not stores)."""

    def __init__(self, n: int, dtype: torch.dtype, offset: int = 0, fill: int = 0xA5, pad_bytes: int = 64):
        self.es = torch.empty((), dtype=dtype).element_size()
        pad = pad_bytes // self.es
        self.n, self.fill = n, fill
        self.base = torch.empty(pad + offset + n + pad, dtype=dtype)
        self.base.view(torch.uint8).fill_(fill)
        self.lo = pad + offset
        self.t = self.base[self.lo:self.lo + n]

    def check(self, name: str = "buffer") -> None:
        raw = self.base.view(torch.uint8)
        lo, hi = self.lo * self.es, (self.lo + self.n) * self.es
        bad = torch.cat([(raw[:lo] != self.fill).nonzero().flatten() - lo,
                         (raw[hi:] != self.fill).nonzero().flatten() + (hi - lo)])
        assert bad.numel() == 0, f"{name}: bytes written outside it, at byte offsets {bad[:8].tolist()}"
