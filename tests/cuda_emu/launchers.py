"""``_C.cuda`` for the host: the CUDA bindings' functions, with their signatures, calling the
emulated launchers (tests/cuda_emu) on host pointers, so that the Python adapters
(``fedmpq_kernels/<family>/cuda.py``) run on CPU tensors without a GPU. :func:`wire` points
an adapter module at it, with a CPU tensor for the per-stream workspace and stream 0. The
bindings' own argument checks are not repeated here (test_cuda_binding.py tests them), but
for one: that a layer's grad and codes hold the same count, which stands for the adapters'
refusal of a grad of another length (they pass both lengths and leave the check to the
binding). Every range handed to the emulator is a buffer's own length, so a kernel that read
past one would be caught."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict

import torch

from . import Emu

_ES = {0: 4, 1: 2, 2: 2}  # bytes per element of a dtype code (fake_quant.h)


def _same_count(grad_len: int, codes_len: int, layer=None) -> None:
    """The bindings' check_same_count("grad", ..., "codes", ...) (csrc/bindings/bitplane.cpp)."""
    if grad_len != codes_len:
        where = "" if layer is None else f"layer {layer}: "
        raise ValueError(f"{where}grad has {grad_len} elements, codes {codes_len}")


class EmulatedCuda:
    """The functions of ``_C.cuda`` the adapters call; ``calls`` lists them in order. A CPU
    tensor's device index is None: device 0 here."""

    def __init__(self, emu: Emu):
        self.emu = emu
        self.calls = []

    def _run(self, name, ranges, *args):
        self.calls.append(name)
        self.emu.call_raw(f"emu_{name}", [r for r in ranges if r[0]], *args)

    # fake_quant.h
    def workspace_words(self, device):
        return int(self.emu.lib.emu_workspace_words(device or 0))

    def absmax(self, x, dtype, n, out_bits, ws, ws_words, device, stream):
        self._run("absmax", [(x, _ES[dtype] * n), (ws, 4 * ws_words)], x, dtype, n, out_bits, ws, device or 0)

    def fake_quant(self, x, y, dtype, n, y_cap, bits, scale, scale_given, pass_, pass_nbytes, hi, hi_nbytes, device,
                   stream):
        self._run("fake_quant", [(x, _ES[dtype] * n), (scale, 4)], x, y, dtype, n, bits, scale, int(scale_given),
                  pass_ or None, hi or None, device or 0)

    def relu6_fake_quant(self, x, y, dtype, n, y_cap, bits, scale, mask, mask_nbytes, ws, ws_words, device, stream):
        self._run("relu6_fake_quant", [(x, _ES[dtype] * n), (scale, 4), (ws, 4 * ws_words)], x, y, dtype, n, bits,
                  scale, mask or None, ws, device or 0)

    def fake_quant_backward(self, g, gx, dtype, n, gx_cap, pass_, pass_nbytes, hi, hi_nbytes, ws, ws_words, grad_scale,
                            device, stream):
        self._run("fake_quant_backward", [(g, _ES[dtype] * n), (pass_, pass_nbytes), (hi, hi_nbytes),
                                          (ws, 4 * ws_words)],
                  g, gx, dtype, n, pass_, hi or None, ws or None, grad_scale or None, device or 0)

    # pack.h
    def pack_codes(self, codes, n, bits, planes, planes_nbytes, seen, device, stream):
        self._run("pack_codes", [(codes, n)], codes, n, bits, planes, seen, device or 0)

    def unpack_codes(self, planes, planes_nbytes, n, bits, codes, codes_cap, device, stream):
        self._run("unpack_codes", [(planes, planes_nbytes)], planes, n, bits, codes, device or 0)

    def dequant_accumulate(self, acc, n, planes, planes_nbytes, signs, signs_nbytes, bits, coef, device, stream):
        self._run("dequant_accumulate", [(acc, 4 * n), (planes, planes_nbytes), (signs, signs_nbytes)], acc, n, planes,
                  signs or None, bits, coef, device or 0)

    # bitplane.h
    def bitplane_workspace_words(self, device):
        return int(self.emu.lib.emu_bitplane_workspace_words(device or 0))

    def binarize(self, w, n, bits, codes, codes_cap, sign, sign_nbytes, scale, ws, ws_words, device, stream):
        self._run("binarize", [(w, 4 * n), (ws, 4 * ws_words), (scale, 4)], w, n, bits, codes, sign, scale, ws,
                  device or 0)

    def dequantize(self, codes, n, sign, sign_nbytes, scale, bits, out, out_cap, device, stream):
        self._run("dequantize", [(codes, n), (sign, sign_nbytes), (scale, 4)], codes, sign, n, bits, scale, out,
                  device or 0)

    def dequantize_backward(self, grad, n, codes, codes_len, sign, sign_nbytes, bits, out, ws, ws_words, device,
                            stream):
        _same_count(n, codes_len)
        ranges = [(grad, 4 * n), (codes, codes_len), (sign, sign_nbytes), (ws, 4 * ws_words)]
        self._run("dequantize_backward", ranges, grad, codes, sign, n, bits, out, ws, device or 0)

    def dequantize_layers(self, layers, device, stream):
        """The native many-layer launcher (launches over layer tables)."""
        self.calls.append("dequantize_layers")
        table, ranges = [], []
        for codes, n, sign, sign_nbytes, scale, bits, out, out_cap in layers:
            table.append((codes, sign, scale, out, n, bits))
            ranges += [(codes, n), (sign, sign_nbytes), (scale, 4)]
        self.emu.dequantize_layers_raw(table, [r for r in ranges if r[0]], device or 0)

    def dequantize_backward_layers(self, layers, ws, ws_words, device, stream):
        """The native many-layer launcher (launches over layer tables)."""
        self.calls.append("dequantize_backward_layers")
        table, ranges = [], [(ws, 4 * ws_words)]
        for l, (grad, n, codes, codes_len, sign, sign_nbytes, bits, out) in enumerate(layers):
            _same_count(n, codes_len, l)
            table.append((grad, codes, sign, out, n, bits))
            ranges += [(grad, 4 * n), (codes, codes_len), (sign, sign_nbytes)]
        self.emu.dequantize_backward_layers_raw(table, ws, [r for r in ranges if r[0]], device or 0)

    def plane_popcounts(self, codes, n, bits, out, out_len, ws, ws_words, device, stream):
        self._run("plane_popcounts", [(codes, n), (ws, 4 * ws_words)], codes, n, bits, out, ws, device or 0)

    def plane_popcounts_layers(self, layers, out, out_len, ws, ws_words, device, stream):
        """The native many-layer launcher (its launches over layer tables)."""
        assert out_len >= sum(b for _, _, b in layers)
        self.calls.append("plane_popcounts_layers")
        ranges = [(c, n) for c, n, _ in layers if c and n > 0] + [(ws, 4 * ws_words)]
        self.emu.plane_popcounts_layers_raw(list(layers), out, ws, ranges, device or 0)

    def bitplane_step(self, codes, n, sign, sign_nbytes, mom, mom_len, gs, grad, grad_len, coef, coef_len, scale, bits,
                      lr, momentum, key, key_ptr, out, ws, ws_words, device, stream):
        _same_count(grad_len, n)
        ranges = [(codes, n), (sign, sign_nbytes), (mom, mom_len), (gs, 4), (grad, 4 * grad_len),
                  (coef, 4 * coef_len), (scale, 4), (out, 8), (ws, 4 * ws_words), (key_ptr, 8)]
        self._run("bitplane_step", ranges, codes, sign, mom, gs, grad, coef, scale, n, bits, lr, momentum, key,
                  key_ptr or None, out, ws, device or 0)

    def bitplane_step_layers(self, layers, lr, momentum, out, out_len, ws, ws_words, device, stream, check_only=False):
        """The native many-layer launcher (grouped launches, or layer by layer when layers
        share memory); the binding's checks are test_cuda_binding.py's (``check_only``: those
        checks alone, so nothing here)."""
        assert out_len >= 2 * len(layers)
        for l, layer in enumerate(layers):
            _same_count(layer[8], layer[1], l)  # grad_len, n
        if check_only:
            self.calls.append("bitplane_step_layers (checks)")
            return
        self.calls.append("bitplane_step_layers")
        table, ranges = [], [(out, 8 * len(layers)), (ws, 4 * ws_words)]
        for codes, n, sign, sign_nbytes, mom, mom_len, gs, grad, grad_len, coef, coef_len, scale, bits, key, \
                key_ptr in layers:
            table.append((codes, sign, mom, gs, grad, coef, scale, n, bits, key, key_ptr or None))
            ranges += [(codes, n), (sign, sign_nbytes), (mom, mom_len), (gs, 4), (grad, 4 * grad_len),
                       (coef, 4 * coef_len), (scale, 4), (key_ptr, 8)]
        self.emu.bitplane_step_layers_raw(table, lr, momentum, out, ws, [r for r in ranges if r[0]], device or 0)

def wire(module, emu: Emu, monkeypatch) -> EmulatedCuda:
    """Points adapter module ``module`` (e.g. ``fedmpq_kernels.bitplane.cuda``) at an
    :class:`EmulatedCuda` for the test (``monkeypatch``): its ``native.cuda``, its stream
    (0), its workspaces (CPU tensors, one per size) and its device check (CPU tensors pass).
    Returns the EmulatedCuda (its ``calls``)."""
    cuda = EmulatedCuda(emu)
    workspaces: Dict[int, torch.Tensor] = {}
    stand_ins = {
        "native": SimpleNamespace(cuda=cuda),
        "raw_stream": lambda dev: 0,
        "workspace": lambda dev, stream, words: workspaces.setdefault(words, torch.zeros(words, dtype=torch.int32)),
        "_WS_WORDS": {},
        "_require_cuda": lambda t, name: None,
    }
    for name, value in stand_ins.items():
        if hasattr(module, name):  # what this module uses
            monkeypatch.setattr(module, name, value)
    return cuda
