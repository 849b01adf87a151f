"""One whole local step of a FedMPQ client on ResNet-20 (3x32x32 inputs, 10 classes):
forward, cross-entropy (+ the group lasso, whose gradient the bit-plane optimizer applies),
backward, the bit-plane optimizer with re-quantization, and SGD with momentum for the float
parameters (scale, BatchNorm, shortcuts, biases).

Groups ``client-step-b32`` and ``client-step-b128``; ids end in:
* ``float``: the float ResNet-20 (plain ReLUs) with SGD + momentum: the anchor.
* ``fedmpq-2bit`` / ``-4bit`` / ``-8bit``: the quantized ResNet-20, every layer at N bits,
  4-bit ReLU6 activations (fedmpq.nn). extra_info["state_bytes_per_weight"]: the training
  state kept between steps per quantized weight (codes, sign bitmap, scale, optimizer).
* ``float-planes-4bit``: the pure-torch float-plane implementation of the authors' method
  (fedmpq.nn.float_planes), the slow reference.
* ``float-cl`` / ``fedmpq-4bit-cl``: the float and 4-bit models with ``channels_last=True``
  (the federation's ``memory_format``), against the same contiguous float anchor.

``compile`` ids (CUDA only, groups ``client-step-b32 compiled`` / ``-b128 compiled``): the
same steps with the model under ``torch.compile(fullgraph=True)`` (default mode; fedmpq's
ops are torch.library ops, so the graph has no breaks, and a break would raise, not time a
partly eager step), against the compiled float model; the
bit-plane optimizer and SGD run eagerly in both. The first call compiles (untimed).

``graph`` ids (CUDA only, groups ``client-step-b32 graph`` / ``-b128 graph``): the whole
step (forward, backward, both optimizers) replayed from one CUDA graph, as a client does
with ``cuda_graph`` (:class:`fedmpq.step_graph.StepGraph`, the bit-plane optimizer with
device keys), against the float step replayed the same way. The eager float step is the
anchor of the eager groups, so the two groups together say what a graph buys each.

Target: fedmpq-4bit at batch 32 within 1.15x of float (the ``speed-up vs torch's way``
column reads float's median over each row's; 0.87 is 1.15x). ``python
benches/client_step_split.py`` prints where a 4-bit step's time goes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedmpq import nn as qn
from fedmpq.step_graph import StepGraph

from conftest import randn, sync

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = ["float", "fedmpq-2bit", "fedmpq-4bit", "fedmpq-8bit", "float-planes-4bit"]
CASES = [(b, d, i, "eager") for b in (32, 128) for d in DEVICES for i in IMPLS + ["float-cl", "fedmpq-4bit-cl"]]
# torch.compile and CUDA graphs on the GPU (the float-plane reference is not a candidate there)
CASES += [(b, "cuda", i, m) for m in ("compile", "graph") for b in (32, 128) for i in IMPLS[:4] if "cuda" in DEVICES]


def _graphed(fn, x, y):
    """``fn(xb, yb)`` on the whole batch, replayed from a CUDA graph once warm (StepGraph)."""
    graph = StepGraph(fn, x, y, len(y))
    idx = torch.arange(len(y), device=x.device)
    return lambda: graph(idx)


def make_step(impl: str, batch: int, device: str, mode: str = "eager"):
    """A closure running one local step, and the model's training-state bytes per weight
    (``mode``: ``eager``; ``compile``, the model's forward and backward under
    ``torch.compile``; ``graph``, the whole step replayed from a CUDA graph after two eager
    warm-up steps and the capture, which the caller's first calls make)."""
    compiled = mode == "compile"
    cl = impl.endswith("-cl")  # channels-last activations
    impl = impl[:-3] if cl else impl
    torch.manual_seed(0)
    x = randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,)).to(device)  # drawn on the CPU, as randn (conftest)
    if impl == "float":
        model = qn.resnet20(channels_last=cl).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        run = torch.compile(model, fullgraph=True) if compiled else model

        def fn(xb, yb):
            loss = F.cross_entropy(run(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return (_graphed(fn, x, y) if mode == "graph" else lambda: fn(x, y)), 4.0 * 2  # a weight, its momentum
    bits = int(impl.split("-")[-1][:-3])
    model = qn.resnet20(quantized=True, bits=bits, channels_last=cl).to(device)
    if impl.startswith("float-planes"):
        from fedmpq.nn import float_planes

        model = float_planes.FloatPlaneModel.from_quantized(model)
        bit_opt = float_planes.FloatPlaneOptimizer(model, lr=0.1, momentum=0.9, lam=1e-3, seed=0)
        sgd = torch.optim.SGD(float_planes.float_parameters(model), lr=0.1, momentum=0.9)
    else:
        bit_opt = qn.BitPlaneOptimizer(model, lr=0.1, momentum=0.9, lam=1e-3, seed=0, device_keys=mode == "graph")
        sgd = torch.optim.SGD(qn.float_parameters(model), lr=0.1, momentum=0.9)
        qn.batch_weights(model)  # as the client trains (inert under torch.compile)

    run = torch.compile(model, fullgraph=True) if compiled else model

    def fn(xb, yb):
        loss = F.cross_entropy(run(xb), yb)
        bit_opt.zero_grad()
        sgd.zero_grad(set_to_none=True)
        loss.backward()
        bit_opt.step()  # before SGD moves the scales: the planes' gradient uses the forward's
        sgd.step()

    step = _graphed(fn, x, y) if mode == "graph" else lambda: fn(x, y)
    step()
    per_weight = (qn.state_bytes_per_weight(model, bit_opt) if not impl.startswith("float-planes")
                  else 12.0 * bits)  # float planes, their gradients and momentum
    return step, per_weight


@pytest.mark.parametrize("batch,device,impl,mode", CASES,
                         ids=[f"b{b}-{d}-{i}" + ("" if m == "eager" else f"-{m}") for b, d, i, m in CASES])
def bench_client_step(benchmark, batch, device, impl, mode):
    compiled = mode == "compile"
    step, per_weight = make_step(impl, batch, device, mode)
    label = "resnet20" + {"eager": "", "compile": ", compiled", "graph": ", CUDA graph"}[mode]
    benchmark.group = f"client-step-b{batch}" + {"eager": "", "compile": " compiled", "graph": " graph"}[mode]
    benchmark.extra_info.update(group_key=("client-step", batch, label, device), name=impl, bytes=0,
                                torch_anchor="float", state_bytes_per_weight=per_weight)

    def run():
        step()
        sync(device)

    run()  # compiles, for the compiled cases; the graph cases capture in their first calls
    rounds = 15 if device == "cpu" else (20 if compiled else 50)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=2)
