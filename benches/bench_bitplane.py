"""Bit-plane training's kernels against the torch way and against copy_.

Groups, per size (``--fedmpq-sizes``) and device; candidates ``fedmpq[<backend>]``:

* ``relu6_fake_quant fwd+bwd`` (4 bits): the fused activation against ``torch_relu`` (the
  float model's ReLU forward + backward, the anchor: the target is about its cost),
  ``relu6+fake_quant`` (``F.relu6`` then ``fedmpq_kernels.fake_quant``, unfused) and
  ``copy_``. Bytes: 16 per element (read x, write y; read the gradient, write grad_x).
  ``copy_`` rows count their own 8 bytes per element (read + write of a float32) in every
  group here, so "% of copy_ GB/s" compares with the bandwidth copy_ really reached.
* ``bitplane_step`` (4 bits, a layer of n weights): the fused optimizer step against
  ``torch_sgd`` (``torch.optim.SGD`` with momentum on n float32 weights, what a float client
  pays per step, the anchor) and ``copy_``. Bytes: what the step must move at least: read G
  (4n) and the codes, sign and momentum codes, write them back: (4 + 2 (1 + 1/8 + N)) n.
* ``dequantize`` fwd (4 bits): codes and sign bitmap to float32 weights, against copy_ of
  the float32 weight. Bytes: n + n/8 read, 4n written.
* ``bitplane_step, ResNet-20's layers`` (4 bits, its 20 layers, 270k weights, one size): a
  model's optimizer step in one call (``fk.bitplane_step_layers``: on CUDA, launches over
  layer tables) against the same step layer by layer (``... per layer``), ``torch_sgd`` on
  the float model's weights (the anchor) and ``copy_``. Small layers: what this shows is the
  host and launch cost per layer, not bandwidth.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fedmpq_kernels as fk
from fedmpq_kernels import registry

from conftest import randn, run_timed, selected, skip_unless_runs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BITS = 4
BACKENDS = [f"fedmpq[{b}]" for b in registry.BACKENDS]


def _record(benchmark, op, numel, device, impl, nbytes, anchor):
    benchmark.extra_info.update(group_key=(op, numel, f"{BITS}-bit", device), name=impl, bytes=nbytes,
                                torch_anchor=anchor)
    benchmark.group = f"{op} {numel} {device}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["copy_", "torch_relu", "relu6+fake_quant"] + BACKENDS)
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
        elif impl == "relu6+fake_quant":
            fwd = lambda: fk.fake_quant(F.relu6(x), BITS)  # noqa: E731
        else:
            fwd = lambda: fk.relu6_fake_quant(x, BITS)  # noqa: E731

        def fn():
            fwd().backward(g)
            x.grad = None  # else every later call adds grad_x into x.grad (12 more bytes per element)

        with selected(impl, device):
            fwd().backward(g)  # smoke check, untimed: the gradient of the op the case names
        keep = (x.detach() > 0) if impl == "torch_relu" else (x.detach() > 0) & (x.detach() < 6)
        torch.testing.assert_close(x.grad, torch.where(keep, g, torch.zeros_like(g)), rtol=0, atol=0)
        x.grad = None
    _record(benchmark, "relu6_fake_quant fwd+bwd", numel, device, impl, 8 * numel if impl == "copy_" else 16 * numel,
            "torch_relu")
    run_timed(benchmark, impl, fn, device, warmup=True)


def _layer(numel, device):
    torch.manual_seed(0)
    codes, sign, scale = fk.binarize(randn(numel, device=device), BITS)
    mom = torch.zeros((BITS, numel), dtype=torch.uint8, device=device)
    gs = torch.zeros(1, device=device)
    grad = randn(numel, device=device) * 1e-2
    coef = torch.full((BITS,), 1e-6, device=device)
    return codes, sign, scale, mom, gs, grad, coef


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
    nbytes = 8 * numel if impl == "copy_" else int((4 + 2 * (1 + 1 / 8 + BITS)) * numel)
    _record(benchmark, "bitplane_step", numel, device, impl, nbytes, "torch_sgd")
    run_timed(benchmark, impl, fn, device, warmup=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["copy_"] + BACKENDS)
def bench_dequantize(benchmark, impl, device, numel):
    skip_unless_runs(impl, device, "bitplane", "dequantize")
    codes, sign, scale, *_ = _layer(numel, device)
    sink = fk.sink_like((numel,), device)
    if impl == "copy_":
        src = randn(numel, device=device)
        out = torch.empty(numel, device=device)
        fn = lambda: out.copy_(src)  # noqa: E731
    else:
        fn = lambda: fk.dequantize(codes, sign, scale, BITS, sink)  # noqa: E731
    _record(benchmark, "dequantize", numel, device, impl, 8 * numel if impl == "copy_" else int(5.125 * numel), "copy_")
    run_timed(benchmark, impl, fn, device, warmup=True)


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
    run_timed(benchmark, backend, fn, device, warmup=True)
