"""Per-call host cost of the bit-plane family on the CPU: each public op on a 32-weight, 4-bit
layer (the kernels do almost nothing, so the time is Python, checks, allocation and the
native call), against the same native call made bare (``floor``: pointers prepared once, no
checks, no copies). On a GPU the same Python runs before every launch; a ResNet-20 step
makes about four of these calls per layer. Also the bit-plane optimizer's step over 20 such
layers, per layer.

Cases, timed interleaved (every round runs ``--batch`` calls of each case, in a shuffled
order), medians and minima over ``--rounds`` rounds, µs per call:
* ``bitplane_step``: ``fk.bitplane_step`` with an int key;
* ``plane_popcounts``, ``dequantize`` (no gradient), ``dequantize fwd+bwd`` (the scale and
  the sink take gradients; ``.backward`` included), ``binarize``;
* ``optimizer step / layer``: ``BitPlaneOptimizer.step()`` over 20 layers (popcounts,
  coefficients, the step), divided by 20;
* ``weights fwd+bwd / layer``: the 20 layers' weights made and back-propagated (one
  ``torch.autograd.backward`` over the 20), one ``dequantize`` per layer (``per layer``, as
  a layer's forward does alone) or one ``dequantize_layers`` for all (``batched``, as under
  ``fedmpq.nn.batch_weights``), divided by 20; ``weights, no grad / layer``: the same
  forwards under ``torch.no_grad()`` (evaluation).

Run: ``OMP_NUM_THREADS=1 python benches/host_cost_bitplane.py``.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from host_cost import time_interleaved  # benches/, this script's folder

import fedmpq_kernels as fk
from fedmpq import nn as qn
from fedmpq_kernels._native import native

N_WEIGHTS, BITS, LAYERS = 32, 4, 20


def _optimizer():
    """A BitPlaneOptimizer over LAYERS bit-plane layers of N_WEIGHTS weights, with gradients."""
    model = torch.nn.Sequential(*[qn.BitLinear(N_WEIGHTS // 4, 4, bits=BITS) for _ in range(LAYERS)])
    opt = qn.BitPlaneOptimizer(model, lr=0.1, lam=1e-3)
    for m in opt.layers:
        m.sink.grad = torch.randn(m.weight_shape)
    return opt


def cases():
    torch.manual_seed(0)
    n = N_WEIGHTS
    w = torch.randn(n)
    codes, sign, scale = fk.binarize(w, BITS)
    mom = torch.zeros(BITS, n, dtype=torch.uint8)
    gs = torch.zeros(1)
    g = torch.randn(n) * 0.1
    coef = torch.full((BITS,), 1e-4)
    key = fk.step_key(0, 0, 0)
    sc = torch.tensor(float(scale), requires_grad=True)
    sink = fk.sink_like((n,)).requires_grad_(True)
    gw = torch.randn(n)
    out_f = torch.empty(n)
    pc = torch.empty(BITS, dtype=torch.int64)
    ncpu = native.cpu
    p = dict(c=codes.data_ptr(), s=sign.data_ptr(), sb=sign.numel(), m=mom.data_ptr(), gs=gs.data_ptr(),
             g=g.data_ptr(), cf=coef.data_ptr(), w=w.data_ptr(), o=out_f.data_ptr(), pc=pc.data_ptr())
    sv = float(scale)
    wc, ws = torch.empty(n, dtype=torch.uint8), torch.empty(sign.numel(), dtype=torch.uint8)
    opt = _optimizer()
    p["alive"] = (out_f, pc)  # the floor lambdas hold p, so the memory its pointers name stays
    layers = opt.layers
    gws = [torch.randn(m.weight_shape) for m in layers]
    lists = ([m.codes for m in layers], [m.sign for m in layers], [m.scale for m in layers],
             [m.bits for m in layers], [m.sink for m in layers])

    def opt_step():
        opt.step()

    # The forward+backward cases leave no .grad behind to accumulate into on the next call (a
    # step's zero_grad sets them to None); the layers' G, which opt_step reads, is put back.
    g0 = [m.sink.grad for m in layers]

    def no_grads():
        for m in layers:
            m.sink.grad = m.scale.grad = None

    def restore_g():
        for m, g_ in zip(layers, g0):
            m.sink.grad, m.scale.grad = g_, None

    def weights_per_layer():
        no_grads()
        torch.autograd.backward([m.quantized_weight() for m in layers], gws)
        restore_g()

    def weights_batched():
        no_grads()
        torch.autograd.backward(fk.dequantize_layers(*lists), gws)
        restore_g()

    def dequantize_fwd_bwd():
        fk.dequantize(codes, sign, sc, BITS, sink).backward(gw)
        sc.grad = sink.grad = None

    def weights_nograd_per_layer():
        with torch.no_grad():
            [m.quantized_weight() for m in layers]

    def weights_nograd_batched():
        with torch.no_grad():
            fk.dequantize_layers(*lists)

    return {
        "bitplane_step": lambda: fk.bitplane_step(codes, sign, mom, gs, g, coef, scale, BITS, 0.1, 0.9, key),
        "bitplane_step floor": lambda: ncpu.bitplane_step(p["c"], n, p["s"], p["sb"], p["m"], BITS * n, p["gs"],
                                                          p["g"], n, p["cf"], BITS, sv, BITS, 0.1, 0.9, key, 1),
        "plane_popcounts": lambda: fk.plane_popcounts(codes, BITS),
        "plane_popcounts floor": lambda: ncpu.plane_popcounts(p["c"], n, BITS, p["pc"], BITS, 1),
        "dequantize": lambda: fk.dequantize(codes, sign, scale, BITS, sink.detach()),
        "dequantize floor": lambda: ncpu.dequantize(p["c"], n, p["s"], p["sb"], sv, BITS, p["o"], n, 1),
        "dequantize fwd+bwd": dequantize_fwd_bwd,
        "dequantize fwd+bwd floor": lambda: (ncpu.dequantize(p["c"], n, p["s"], p["sb"], sv, BITS, p["o"], n, 1),
                                             ncpu.dequantize_backward(p["g"], n, p["c"], n, p["s"], p["sb"], BITS, 1)),
        "binarize": lambda: fk.binarize(w, BITS),
        "binarize floor": lambda: ncpu.binarize(p["w"], n, BITS, wc.data_ptr(), n, ws.data_ptr(), ws.numel(), 1),
        "optimizer step / layer": opt_step,
        "weights fwd+bwd / layer, per layer": weights_per_layer,
        "weights fwd+bwd / layer, batched": weights_batched,
        "weights, no grad / layer, per layer": weights_nograd_per_layer,
        "weights, no grad / layer, batched": weights_nograd_batched,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases_ = cases()
    times, load0, load1 = time_interleaved(cases_, args.rounds, args.batch, {k: LAYERS for k in cases_ if "/ layer" in k})
    print(f"load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end; {args.rounds} rounds x "
          f"{args.batch} calls, 1 thread, torch {torch.__version__}; a {N_WEIGHTS}-weight {BITS}-bit layer")
    print()
    print("| case | median µs | min µs | median / floor |")
    print("|---|---|---|---|")
    for k, v in times.items():
        if k.endswith(" floor"):
            continue
        med, low = statistics.median(v), min(v)
        floor = times.get(f"{k} floor")
        ratio = f"{med / statistics.median(floor):.1f}" if floor else "–"
        print(f"| {k} | {med:.2f} | {low:.2f} | {ratio} |")
        if floor:
            print(f"| {k} floor | {statistics.median(floor):.2f} | {min(floor):.2f} | 1.0 |")


if __name__ == "__main__":
    main()
