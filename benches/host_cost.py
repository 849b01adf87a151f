"""Per-call host cost of fake_quant on a 1-element CPU tensor against torch's own op, measured
interleaved in one run (the numbers docs/BENCHMARKS.md quotes; bench_host_cost.py is the
pytest-benchmark form of the same cases).

Cases (targets of issue 17):
* forward+backward, clipped STE with a learnable scale: ``fk.fake_quant(x, 4, s,
  ste="clipped").backward(g)`` against ``torch._fake_quantize_learnable_per_tensor_affine``
  (a scale tensor that gets a gradient) forward+backward: at most 1.15x.
* inference forward (no gradient): ``fk.fake_quant(x, 4, s)`` against
  ``torch.fake_quantize_per_tensor_affine``: at most 2.5x.
* ``bound``: the least a Python autograd.Function costs for the same work here (the two
  native kernel calls fedmpq's makes, its three tensor allocations, the bitmaps in the
  bytearray the kept forms make, kept on ctx; no argument checks, no dispatch): how close the
  first target can be got without a C++ autograd node.

Each round times ``--batch`` calls of every case in a shuffled order; medians (and minima)
over ``--rounds`` rounds, in microseconds per call, with the machine's load average.
Run: ``OMP_NUM_THREADS=1 python benches/host_cost.py``.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

import fedmpq_kernels as fk
from fedmpq_kernels._library import direct_apply
from fedmpq_kernels._native import native


def cases():
    x = torch.randn(1, requires_grad=True)
    g = torch.ones(1)
    s = torch.tensor(0.5, requires_grad=True)
    # torch's grid for fedmpq's 4-bit scale 0.5 (sign-magnitude, L = 15): step 0.5/15, -15..15
    st = torch.tensor([0.5 / 15], requires_grad=True)
    zp = torch.tensor([0.0])
    xi, si = torch.randn(1), torch.tensor(0.5)
    # the bound calls the native kernels: without the extension only torch's cases run
    nf, nb = (native.cpu.fake_quant_kept, native.cpu.fake_quant_backward_kept) if native is not None else (None, None)
    f32 = torch.float32

    class Bound(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, s):
            y = torch.empty_like(x)
            ctx.kept = nf(x.data_ptr(), 1, y.data_ptr(), 1, 4, s.item(), 2, 1)  # pass and hi bitmaps
            return y

        @staticmethod
        def backward(ctx, gy):
            gx = torch.empty_like(gy)
            r = nb(gy.data_ptr(), 1, gx.data_ptr(), 1, ctx.kept, True, 1)
            return gx, torch.scalar_tensor(r, dtype=f32)

    bound = direct_apply(Bound)

    # Each forward+backward leaves its leaves' .grad as None, as a training step's
    # zero_grad(set_to_none=True) does: otherwise every call after the first also runs
    # AccumulateGrad's in-place add into x.grad and the scale's .grad.
    def fedmpq_fb():
        fk.fake_quant(x, 4, s, ste="clipped").backward(g)
        x.grad = s.grad = None

    def torch_fb():
        torch._fake_quantize_learnable_per_tensor_affine(x, st, zp, -15, 15, 1.0).backward(g)
        x.grad = st.grad = None

    def bound_fb():
        bound(x, s).backward(g)
        x.grad = s.grad = None

    return {
        "fwd+bwd fedmpq": fedmpq_fb,
        "fwd+bwd torch learnable": torch_fb,
        "fwd+bwd bound": bound_fb,
        "forward fedmpq": lambda: fk.fake_quant(xi, 4, si),
        "forward torch": lambda: torch.fake_quantize_per_tensor_affine(xi, 0.5 / 15, 0, -15, 15),
    }


def time_interleaved(fns, rounds: int, batch: int, per_call=None):
    """µs per call of each case of ``fns`` (name -> function): every round runs ``batch``
    calls of each, in a shuffled order; ``per_call`` (name -> n) divides a case's time by n.
    Returns ({name: [µs per round]}, load average at the start, at the end)."""
    for f in fns.values():  # warm up
        for _ in range(200):
            f()
    per_call = per_call or {}
    times = {k: [] for k in fns}
    items = list(fns.items())
    load0 = os.getloadavg()
    for _ in range(rounds):
        random.shuffle(items)
        for k, f in items:
            t0 = time.perf_counter_ns()
            for _ in range(batch):
                f()
            times[k].append((time.perf_counter_ns() - t0) / batch / per_call.get(k, 1) / 1e3)
    return times, load0, os.getloadavg()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    times, load0, load1 = time_interleaved(cases(), args.rounds, args.batch)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(f"load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end; {args.rounds} rounds x "
          f"{args.batch} calls, 1 thread, torch {torch.__version__}")
    print()
    print("| case | median µs | min µs | median ratio | min ratio | target |")
    print("|---|---|---|---|---|---|")
    rows = [("fwd+bwd fedmpq", "fwd+bwd torch learnable", "≤ 1.15"), ("fwd+bwd bound", "fwd+bwd torch learnable", "–"),
            ("fwd+bwd torch learnable", "fwd+bwd torch learnable", ""), ("forward fedmpq", "forward torch", "≤ 2.5"),
            ("forward torch", "forward torch", "")]
    for k, ref, target in rows:
        print(f"| {k} | {med[k]:.2f} | {low[k]:.2f} | {med[k] / med[ref]:.2f} | {low[k] / low[ref]:.2f} | {target} |")


if __name__ == "__main__":
    main()
