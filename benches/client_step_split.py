"""Where one quantized client step's time goes (ResNet-20, 3x32x32, N bits, 4-bit
activations): ``python benches/client_step_split.py [--batch 32] [--bits 4] [--device cpu]
[--channels-last]``.

Each part is timed on its own, on the step's real shapes (medians of repeated runs):
* weight dequantize: the bit-plane layers' weights, forward and backward, made as the
  client makes them (``fedmpq.nn.batch_weights``: one ``dequantize_layers`` call; with
  ``--per-layer-weights``, one ``dequantize`` per layer, in the step too);
* activation quantizer: ``relu6_fake_quant`` forward + backward on every activation the
  model quantizes, minus a plain ReLU's forward + backward on the same tensors (what the
  float model pays anyway);
* optimizer and re-quantization: ``BitPlaneOptimizer.step`` (popcounts, group lasso, the
  fused step) and the float parameters' SGD step;
* model compute: the whole step minus the parts above.

``--profile N`` then profiles N whole steps with torch.profiler and prints, per step, the
host time and the kernel launches, and the ops that take the most host time: on a GPU a
step that waits on the host shows it there, not in the kernels.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fedmpq_kernels as fk
from fedmpq import nn as qn


def median_ms(fn, reps: int, device: str) -> float:
    fn()
    ts = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile N whole steps (default: none)")
    ap.add_argument("--channels-last", action="store_true",
                    help="both models' activations channels-last (fedmpq.nn's channels_last, memory_format)")
    ap.add_argument("--per-layer-weights", action="store_true",
                    help="one dequantize per layer instead of fedmpq.nn.batch_weights' one call for all")
    a = ap.parse_args()
    dev = a.device
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (a.batch,), device=dev)
    model = qn.resnet20(quantized=True, bits=a.bits, channels_last=a.channels_last).to(dev)
    bit_opt = qn.BitPlaneOptimizer(model, lr=0.1, lam=1e-3)
    if not a.per_layer_weights:
        qn.batch_weights(model)
    sgd = torch.optim.SGD(qn.float_parameters(model), lr=0.1, momentum=0.9)
    acts = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: acts.append(inp[0].detach().clone()))
             for m in model.modules() if isinstance(m, qn.ActQuant)]

    def step():
        loss = F.cross_entropy(model(x), y)
        bit_opt.zero_grad()
        sgd.zero_grad(set_to_none=True)
        loss.backward()
        bit_opt.step()
        sgd.step()

    step()
    for h in hooks:
        h.remove()
    whole = median_ms(step, a.reps, dev)
    float_model = qn.resnet20(channels_last=a.channels_last).to(dev)
    fopt = torch.optim.SGD(float_model.parameters(), lr=0.1, momentum=0.9)

    def float_step():
        loss = F.cross_entropy(float_model(x), y)
        fopt.zero_grad(set_to_none=True)
        loss.backward()
        fopt.step()

    float_ms = median_ms(float_step, a.reps, dev)
    layers = [m for _, m in qn.bit_layers(model)]
    grads = [torch.randn(m.weight_shape, device=dev) for m in layers]

    def dequant():
        if a.per_layer_weights:
            for m, g in zip(layers, grads):
                w = fk.dequantize(m.codes, m.sign, m.scale, m.bits, m.sink)
                w.backward(g)
        else:
            ws = fk.dequantize_layers([m.codes for m in layers], [m.sign for m in layers], [m.scale for m in layers],
                                      [m.bits for m in layers], [m.sink for m in layers])
            torch.autograd.backward(ws, grads)
        for m in layers:  # as the step's zero_grad: no AccumulateGrad add into a kept .grad next time
            m.sink.grad = m.scale.grad = None

    acts_g = [a_.clone().requires_grad_() for a_ in acts]
    ones = [torch.ones_like(a_) for a_ in acts]

    def act_quant():
        for t, g in zip(acts_g, ones):
            fk.relu6_fake_quant(t, 4).backward(g)
            t.grad = None

    def relu():
        for t, g in zip(acts_g, ones):
            F.relu(t).backward(g)
            t.grad = None

    t_dq = median_ms(dequant, a.reps, dev)
    t_act = median_ms(act_quant, a.reps, dev) - median_ms(relu, a.reps, dev)
    # the optimizers need the last backward's G (dequant() above clears the layers' .grad, as
    # a step's zero_grad does): make one after it, then time the steps on it
    F.cross_entropy(model(x), y).backward()
    assert all(m.sink.grad is not None and m.scale.grad is not None for m in layers)
    t_opt = median_ms(bit_opt.step, a.reps, dev)
    t_sgd = median_ms(sgd.step, a.reps, dev)
    parts = [("model compute (the rest)", whole - t_dq - t_act - t_opt - t_sgd),
             ("activation quantizer (beyond ReLU)", t_act), ("weight dequantize (fwd + bwd)", t_dq),
             ("bit-plane optimizer + re-quantization", t_opt), ("SGD on the float parameters", t_sgd)]
    print(f"ResNet-20, batch {a.batch}, {a.bits}-bit weights, 4-bit activations, {dev}, "
          f"weights {'per layer' if a.per_layer_weights else 'batched'}, "
          f"{'channels-last' if a.channels_last else 'contiguous'} activations, "
          f"{torch.get_num_threads()} threads; medians of {a.reps}")
    print("| part | ms | share |\n|---|---|---|")
    for name, t in parts:
        print(f"| {name} | {t:.2f} | {100 * t / whole:.0f} % |")
    print(f"| **whole step** | {whole:.2f} | 100 % |")
    print(f"| float ResNet-20 step (SGD) | {float_ms:.2f} | ratio {whole / float_ms:.2f}x |")
    if a.profile:
        profile_steps(step, a.profile, dev)


def profile_steps(step, n: int, dev: str) -> None:
    """Print what ``n`` calls of ``step`` cost the host, per step: launches, and the ops
    with the most self host time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
    avg = prof.key_averages()
    launches = sum(e.count for e in avg if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                      "cudaLaunchKernelExC"))
    host_us = sum(e.self_cpu_time_total for e in avg)
    print(f"\nprofile of {n} steps: {host_us / n / 1e3:.2f} ms of host time and {launches / n:.0f} kernel launches per step")
    print(avg.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
