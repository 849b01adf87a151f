"""Bit-plane training's kernels against the torch way and against copy_.

Groups, per size (``--fedmpq-sizes``) and device; candidates ``fedmpq[<backend>]``:

* ``relu6_fake_quant fwd+bwd`` (4 bits): the fused activation against ``torch_relu6_fq``
  (``F.relu6``, max / 15 as a tensor, ``torch.fake_quantize_per_tensor_affine`` on 0..15:
  the same values and gradient, the torch way and the anchor), ``torch_relu`` (the float
  model's ReLU forward + backward: the target is about its cost), ``relu6+fake_quant``
  (``F.relu6`` then ``fedmpq_kernels.fake_quant``, unfused) and ``copy_``. Bytes: 20 per
  element and the mask's 1/4 (x read twice, as the scale is max(relu6(x)), y written; the
  gradient read, grad_x written); ``torch_relu`` 16. ``copy_`` rows count their own 8 bytes
  per element (read + write of a float32) in every group here, so "% of floor's GB/s"
  compares with the bandwidth copy_ really reached.
* ``bitplane_step`` (4 bits, a layer of n weights): the fused optimizer step against
  ``torch_sgd`` (``torch.optim.SGD`` with momentum on n float32 weights, what a float client
  pays per step, the anchor) and ``copy_``. Bytes: what the step must move at least: read G
  (4n) and the codes, sign and momentum codes, write them back: (4 + 2 (1 + 1/8 + N)) n.
* ``dequantize`` fwd (4 bits): codes and sign bitmap to float32 weights, against
  ``torch_dequant`` (the sign bitmap unpacked with shifts, codes to float, times the signs
  and s / 15: the anchor) and copy_ of the float32 weight. Bytes: n + n/8 read, 4n written.
* ``binarize`` (4 bits): a float32 weight to codes, sign bitmap and scale, against
  ``torch_binarize`` (max|w|, round, the signs packed with shifts: the anchor) and copy_.
  Bytes: w read twice (the scale is max|w|), the codes and the bitmap written: 9.125 n.
* ``plane_popcounts`` (4 bits): set bits per plane of n codes, against ``torch_popcount``
  (a shift, mask and sum per plane: the anchor) and copy_ of the codes. Bytes: n read.
* ``bitplane_step, ResNet-20's layers`` (4 bits, its 20 layers, 270k weights, one size): a
  model's optimizer step in one call (``fk.bitplane_step_layers``: on CUDA, launches over
  layer tables) against the same step layer by layer (``... per layer``), ``torch_sgd`` on
  the float model's weights (the anchor) and ``copy_``. Small layers: what this shows is the
  host and launch cost per layer, not bandwidth.

Every candidate's result is checked once, untimed, against the reference backend's (the
step's: codes, signs, momentum and scale gradient after one step from the same state), so
a kernel that returned early or wrote garbage cannot time as fast.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fedmpq_kernels as fk
from fedmpq_kernels import registry

from conftest import randn, run_timed, selected, skip_unless_runs, torch_fq_dynamic

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BITS = 4
L = 2**BITS - 1
BACKENDS = [f"fedmpq[{b}]" for b in registry.BACKENDS]


def _record(benchmark, op, numel, device, impl, nbytes, anchor):
    benchmark.extra_info.update(group_key=(op, numel, f"{BITS}-bit", device), name=impl, bytes=nbytes,
                                torch_anchor=anchor)
    benchmark.group = f"{op} {numel} {device}"


def _torch_relu6_fq(x):
    """torch's ReLU6 then its fake-quant with the dynamic scale max / 15 on 0..15: the values
    and gradient of ``fk.relu6_fake_quant(x, 4)``."""
    return torch_fq_dynamic(F.relu6(x), BITS, signed=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["copy_", "torch_relu6_fq", "torch_relu", "relu6+fake_quant"] + BACKENDS)
def bench_relu6_fake_quant(benchmark, impl, device, numel):
    skip_unless_runs(impl, device, "fake_quant", "relu6_fake_quant")
    torch.manual_seed(0)
    x = (randn(numel, device=device) * 3).requires_grad_()
    g = randn(numel, device=device)
    if impl == "copy_":
        out = torch.empty(numel, device=device)
        fn = lambda: out.copy_(g)  # noqa: E731
    else:
        if impl == "torch_relu":
            fwd = lambda: F.relu(x)  # noqa: E731
        elif impl == "torch_relu6_fq":
            fwd = lambda: _torch_relu6_fq(x)  # noqa: E731
        elif impl == "relu6+fake_quant":
            fwd = lambda: fk.fake_quant(F.relu6(x), BITS)  # noqa: E731
        else:
            fwd = lambda: fk.relu6_fake_quant(x, BITS)  # noqa: E731

        def fn():
            fwd().backward(g)
            x.grad = None  # else every later call adds grad_x into x.grad (12 more bytes per element)

        with selected(impl, device):
            y = fwd()
            y.backward(g)  # smoke check, untimed: the values and gradient of the op the case names
        if impl != "torch_relu":
            with selected("fedmpq[reference]", device):
                assert torch.equal(y.detach(), fk.relu6_fake_quant(x.detach(), BITS)), f"{impl}: other values"
        keep = (x.detach() > 0) if impl == "torch_relu" else (x.detach() > 0) & (x.detach() < 6)
        torch.testing.assert_close(x.grad, torch.where(keep, g, torch.zeros_like(g)), rtol=0, atol=0)
        x.grad = None
    moved = {"copy_": 8 * numel, "torch_relu": 16 * numel}.get(impl, int(20.25 * numel))
    _record(benchmark, "relu6_fake_quant fwd+bwd", numel, device, impl, moved, "torch_relu6_fq")
    run_timed(benchmark, impl, fn, device)


def _layer(numel, device):
    torch.manual_seed(0)
    codes, sign, scale = fk.binarize(randn(numel, device=device), BITS)
    mom = torch.zeros((BITS, numel), dtype=torch.uint8, device=device)
    gs = torch.zeros(1, device=device)
    grad = randn(numel, device=device) * 1e-2
    coef = torch.full((BITS,), 1e-6, device=device)
    return codes, sign, scale, mom, gs, grad, coef


def _step(impl, device, state):
    """One step of ``state`` (a :func:`_layer` tuple, updated in place) with ``impl``'s backend."""
    codes, sign, scale, mom, gs, grad, coef = state
    with selected(impl, device):
        fk.bitplane_step(codes, sign, mom, gs, grad, coef, scale, BITS, 0.1, 0.9, 12345)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["copy_", "torch_sgd"] + BACKENDS)
def bench_bitplane_step(benchmark, impl, device, numel):
    skip_unless_runs(impl, device, "bitplane", "bitplane_step")
    codes, sign, scale, mom, gs, grad, coef = _layer(numel, device)
    if impl == "copy_":
        out = torch.empty(numel, device=device)
        fn = lambda: out.copy_(grad)  # noqa: E731
    elif impl == "torch_sgd":
        w = torch.nn.Parameter(randn(numel, device=device))
        w.grad = grad.clone()
        opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        fn = opt.step
    else:
        fn = lambda: fk.bitplane_step(codes, sign, mom, gs, grad, coef, scale, BITS, 0.1, 0.9, 12345)  # noqa: E731
        mine, ref = _layer(numel, device), _layer(numel, device)  # untimed: one step against the reference's
        _step(impl, device, mine)
        _step("fedmpq[reference]", device, ref)
        for name, a, b in zip(("codes", "sign", "momentum", "scale gradient"), mine[:2] + mine[3:5], ref[:2] + ref[3:5]):
            assert torch.equal(a, b), f"{impl}: bitplane_step's {name} differ from the reference's"
    nbytes = 8 * numel if impl == "copy_" else int((4 + 2 * (1 + 1 / 8 + BITS)) * numel)
    _record(benchmark, "bitplane_step", numel, device, impl, nbytes, "torch_sgd")
    run_timed(benchmark, impl, fn, device)


def _unpack_signs(sign, n):
    """The sign bitmap as n bools, with torch shifts (bit i of byte i // 8 is element i)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=sign.device)
    return ((sign[:, None] >> shifts) & 1).reshape(-1)[:n].bool()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["copy_", "torch_dequant"] + BACKENDS)
def bench_dequantize(benchmark, impl, device, numel):
    skip_unless_runs(impl, device, "bitplane", "dequantize")
    codes, sign, scale, *_ = _layer(numel, device)
    sink = fk.sink_like((numel,), device)
    if impl == "copy_":
        src = randn(numel, device=device)
        out = torch.empty(numel, device=device)
        fn = lambda: out.copy_(src)  # noqa: E731
    elif impl == "torch_dequant":
        def fn():
            return torch.where(_unpack_signs(sign, numel), -codes.float(), codes.float()) * (scale / L)
    else:
        fn = lambda: fk.dequantize(codes, sign, scale, BITS, sink)  # noqa: E731
    if impl != "copy_":  # untimed: the reference's weights
        with selected(impl, device):
            got = fn().detach()
        with selected("fedmpq[reference]", device):
            expect = fk.dequantize(codes, sign, scale, BITS, sink).detach()
        torch.testing.assert_close(got, expect, rtol=0 if impl.startswith("fedmpq[") else 1e-6, atol=0)
    _record(benchmark, "dequantize", numel, device, impl, 8 * numel if impl == "copy_" else int(5.125 * numel),
            "torch_dequant")
    run_timed(benchmark, impl, fn, device)


def _torch_binarize(w):
    """max|w|, the codes round(|w| * L / max|w|), and the signs packed with shifts into the
    sign bitmap's layout (4 * ceil(n / 32) bytes)."""
    s = w.abs().amax()
    codes = torch.round(w.abs() * (L / s)).to(torch.uint8)
    n = w.numel()
    neg = torch.zeros(-(-n // 32) * 32, dtype=torch.uint8, device=w.device)
    neg[:n] = w < 0
    shifts = torch.arange(8, dtype=torch.uint8, device=w.device)
    return codes, (neg.view(-1, 8) << shifts).sum(1, dtype=torch.uint8), s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["copy_", "torch_binarize"] + BACKENDS)
def bench_binarize(benchmark, impl, device, numel):
    skip_unless_runs(impl, device, "bitplane", "binarize")
    torch.manual_seed(0)
    w = randn(numel, device=device)
    if impl == "copy_":
        out = torch.empty(numel, device=device)
        fn = lambda: out.copy_(w)  # noqa: E731
    else:
        fn = (lambda: _torch_binarize(w)) if impl == "torch_binarize" else (lambda: fk.binarize(w, BITS))
        with selected(impl, device):  # untimed: the reference's codes, signs and scale
            got = fn()
        with selected("fedmpq[reference]", device):
            expect = fk.binarize(w, BITS)
        if impl.startswith("fedmpq["):
            assert all(torch.equal(a, b) for a, b in zip(got, expect)), f"{impl}: binarize differs from the reference"
        else:  # torch's own rounding of |w| * (L / s) may differ by one code at a half
            assert torch.equal(got[1], expect[1]) and (got[0].int() - expect[0].int()).abs().max() <= 1
    _record(benchmark, "binarize", numel, device, impl, 8 * numel if impl == "copy_" else int(9.125 * numel),
            "torch_binarize")
    run_timed(benchmark, impl, fn, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["copy_", "torch_popcount"] + BACKENDS)
def bench_plane_popcounts(benchmark, impl, device, numel):
    skip_unless_runs(impl, device, "bitplane", "plane_popcounts")
    codes = _layer(numel, device)[0]
    if impl == "copy_":
        out = torch.empty_like(codes)
        fn = lambda: out.copy_(codes)  # noqa: E731
    elif impl == "torch_popcount":
        fn = lambda: torch.stack([((codes >> (BITS - 1 - p)) & 1).sum() for p in range(BITS)])  # noqa: E731
    else:
        fn = lambda: fk.plane_popcounts(codes, BITS)  # noqa: E731
    if impl != "copy_":  # untimed: the counts
        with selected(impl, device):
            got = fn()
        expect = torch.tensor([int(((codes >> (BITS - 1 - p)) & 1).sum()) for p in range(BITS)])
        assert torch.equal(got.cpu(), expect), f"{impl}: plane_popcounts {got.tolist()} != {expect.tolist()}"
    _record(benchmark, "plane_popcounts", numel, device, impl, 2 * numel if impl == "copy_" else numel, "torch_popcount")
    run_timed(benchmark, impl, fn, device)


RESNET20 = [432] + [2304] * 6 + [4608] + [9216] * 5 + [18432] + [36864] * 5 + [640]  # its quantized layers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["copy_", "torch_sgd"] + [f"{b} per layer" for b in BACKENDS] + BACKENDS)
def bench_bitplane_model_step(benchmark, impl, device):
    backend = impl.split(" ")[0]  # fedmpq[<backend>], or an anchor
    skip_unless_runs(backend, device, "bitplane", "bitplane_step_layers")
    total = sum(RESNET20)
    layers = [_layer(n, device) for n in RESNET20]
    if impl == "copy_":
        src, out = randn(total, device=device), torch.empty(total, device=device)
        fn = lambda: out.copy_(src)  # noqa: E731
    elif impl == "torch_sgd":
        ws = [torch.nn.Parameter(randn(n, device=device)) for n in RESNET20]
        for w in ws:
            w.grad = randn(w.numel(), device=device) * 1e-2
        fn = torch.optim.SGD(ws, lr=0.1, momentum=0.9).step
    else:
        keys = list(range(len(RESNET20)))
        if impl.endswith("per layer"):
            def fn():
                for (codes, sign, scale, mom, gs, grad, coef), k in zip(layers, keys):
                    fk.bitplane_step(codes, sign, mom, gs, grad, coef, scale, BITS, 0.1, 0.9, k)
        else:
            cols = [list(c) for c in zip(*layers)]  # codes, sign, scale, mom, gs, grad, coef lists
            fn = lambda: fk.bitplane_step_layers(cols[0], cols[1], cols[3], cols[4], cols[5], cols[6], cols[2],  # noqa: E731
                                                 [BITS] * len(RESNET20), 0.1, 0.9, keys)
    nbytes = 8 * total if impl == "copy_" else int((4 + 2 * (1 + 1 / 8 + BITS)) * total)
    _record(benchmark, "bitplane_step, ResNet-20's layers", total, device, impl, nbytes, "torch_sgd")
    run_timed(benchmark, backend, fn, device)
