"""No GPU kernel call waits for the device (issue 17: no host sync anywhere in a kernel call,
pack's range check included).

On a CUDA device ``torch.cuda.set_sync_debug_mode("error")`` turns every synchronizing torch
call (``.item()``, a copy to the host, ``nonzero``, a stream or device synchronize) into a
RuntimeError. Each call below runs once to warm up (Triton's JIT, the per-stream reduction
workspaces, pack's status words: each made once per device or stream) and then again under
that mode: the calls of a training step (fake-quant forward and backward with a given, a
learnable and a dynamic scale, ReLU6's, a model's weights and their backward, popcounts, the
optimizer step over layer tables with keys on the device) and of the wire (packing,
unpacking, de-quantizing into an accumulator). ``binarize`` (it refuses a non-finite weight,
which needs a look at the values) and ``check_packed`` (the caller's chosen sync point) are
the documented exceptions, not called here.

The CPU cases have no device to wait for and are skipped; test_calls_are_valid_on_the_cpu
runs the same calls on the CPU, so that a change of an op's arguments shows in CI, not first
on a GPU. Written without a GPU (2026-12-06): tools/gpu_check.sh's tests-cuda and
tests-triton-cuda steps run it.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fedmpq_kernels as fk

from .bitplane.helpers import layer

N = 4099  # odd: a partial last word
BITS = [3, 1, 8]


def _calls(dev: str):
    """(name, thunk) of every call checked, its tensors made on ``dev`` once."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(N, generator=g) * 3).to(dev)
    gy = torch.randn(N, generator=g).to(dev)
    layers = [layer(n, b, seed=i) for i, (n, b) in enumerate(zip((N, 37, 1000), BITS))]
    codes = [c.to(dev) for c, _, _ in layers]
    sign = [s.to(dev) for _, s, _ in layers]
    scale = [s.to(dev) for _, _, s in layers]
    moms = [torch.zeros(b, c.numel(), dtype=torch.uint8, device=dev) for c, b in zip(codes, BITS)]
    gss = [torch.zeros(1, device=dev) for _ in codes]
    grads = [torch.randn(c.numel(), generator=g).to(dev) * 1e-2 for c in codes]
    coefs = [torch.full((b,), 1e-4, device=dev) for b in BITS]
    step = torch.zeros(1, dtype=torch.int64, device=dev)
    planes = fk.pack_codes(codes[0], BITS[0])
    acc = torch.zeros(N, device=dev)
    given = torch.full((), 2.5, device=dev)  # made here: a tensor from host data is a copy that waits

    def fq_given():
        return fk.fake_quant(x, 4, given)

    def fq_learnable():
        xs, s = x.clone().requires_grad_(True), given.clone().requires_grad_(True)
        fk.fake_quant(xs, 4, s, ste="clipped").backward(gy)

    def fq_dynamic():
        xs = x.clone().requires_grad_(True)
        fk.fake_quant(xs, 4).backward(gy)

    def relu6():
        xs = x.clone().requires_grad_(True)
        fk.relu6_fake_quant(xs, 4).backward(gy)

    def weights_and_backward():
        sc = [s.clone().requires_grad_(True) for s in scale]
        sinks = [fk.sink_like(c.shape, dev) for c in codes]
        ws = fk.dequantize_layers(codes, sign, sc, BITS, sinks)
        torch.autograd.backward(ws, grads)
        sc0 = scale[0].clone().requires_grad_(True)
        fk.dequantize(codes[0], sign[0], sc0, BITS[0], fk.sink_like(codes[0].shape, dev)).backward(grads[0])

    def popcounts():
        fk.plane_popcounts_layers(codes, BITS)

    def optimizer_step():
        keys = fk.step_keys(5, step, len(codes))
        fk.bitplane_step_layers(codes, sign, moms, gss, grads, coefs, scale, BITS, 0.5, 0.9, keys)
        fk.bitplane_step(codes[0], sign[0], moms[0], gss[0], grads[0], coefs[0], scale[0], BITS[0], 0.5, 0.9, keys[0])
        step.add_(1)

    def pack():
        fk.pack_codes(codes[0], BITS[0])  # validate=None: checked later, at check_packed

    def unpack():
        fk.unpack_codes(planes, BITS[0], N)

    # an upload's quantized layers: planes then sign map, back to back, and their table
    payload = torch.cat([torch.cat([fk.pack_codes(c, b), s]) for c, s, b in zip(codes, sign, BITS)])
    sizes = [(b + 1) * fk.bitmap_nbytes(c.numel()) for c, b in zip(codes, BITS)]
    table = torch.tensor([[sum(c.numel() for c in codes[:i]), c.numel(), b, sum(sizes[:i])]
                          for i, (c, b) in enumerate(zip(codes, BITS))], dtype=torch.int64)
    coefs_l = fk.layer_coefs([0.5, 1.0, 2.0], BITS, 1.0)
    acc_l = torch.zeros(sum(c.numel() for c in codes), device=dev)

    def accumulate():
        fk.dequant_accumulate(acc, planes, sign[0], BITS[0], 0.75, 0.5)
        fk.dequant_accumulate_layers(acc_l, payload, table, coefs_l)  # the server's call, an upload at a time

    return [(f.__name__, f) for f in (fq_given, fq_learnable, fq_dynamic, relu6, weights_and_backward, popcounts,
                                       optimizer_step, pack, unpack, accumulate)]


@contextlib.contextmanager
def _syncs_raise():
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def test_no_call_waits_for_the_device(backend):
    if backend.device == "cpu":
        pytest.skip("a CPU call has no device to wait for (test_calls_are_valid_on_the_cpu runs the calls)")
    if backend.name == "reference":
        pytest.skip("the pure-torch reference reads values on the host by design (keys, g_s checks)")
    with backend.active():
        calls = _calls(backend.device)
        for _, f in calls:  # warm-up: JIT, workspaces, status words
            f()
        torch.cuda.synchronize()
        waited = []
        for name, f in calls:
            try:
                with _syncs_raise():
                    f()
            except RuntimeError as e:
                waited.append(f"{name}: {e}")
        fk.check_packed(backend.device)  # every code fitted (the sync point pack leaves to its caller)
    assert waited == []


def test_calls_are_valid_on_the_cpu():
    """The GPU test's calls run on the CPU (so the GPU run meets no argument error), and the
    wire calls give back what was packed."""
    calls = dict(_calls("cpu"))
    for f in calls.values():
        f()
    c, _, _ = layer(N, BITS[0], seed=0)
    assert torch.equal(fk.unpack_codes(fk.pack_codes(c, BITS[0]), BITS[0], N), c)
