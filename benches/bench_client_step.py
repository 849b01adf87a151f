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

``compile`` ids (CUDA only, groups ``client-step-b32 compiled`` / ``-b128 compiled``): the
same steps with the model under ``torch.compile`` (default mode; fedmpq's ops are
torch.library ops, so the graph has no breaks), against the compiled float model; the
bit-plane optimizer and SGD run eagerly in both. The first call compiles (untimed).

Target: fedmpq-4bit at batch 32 within 1.15x of float (the ``speed-up vs torch's way``
column reads float's median over each row's; 0.87 is 1.15x). ``python
benches/client_step_split.py`` prints where a 4-bit step's time goes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedmpq import nn as qn

from conftest import sync

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = ["float", "fedmpq-2bit", "fedmpq-4bit", "fedmpq-8bit", "float-planes-4bit"]
CASES = [(b, d, i, "eager") for b in (32, 128) for d in DEVICES for i in IMPLS]
# torch.compile on the GPU (the float-plane reference is not a candidate there)
CASES += [(b, "cuda", i, "compile") for b in (32, 128) for i in IMPLS[:4] if "cuda" in DEVICES]


def make_step(impl: str, batch: int, device: str, compiled: bool = False):
    """A closure running one local step, and the model's training-state bytes per weight
    (``compiled``: the model's forward and backward under ``torch.compile``)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if impl == "float":
        model = qn.resnet20().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        run = torch.compile(model) if compiled else model

        def step():
            loss = F.cross_entropy(run(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step, 4.0 * 2  # a float weight and its momentum buffer
    bits = int(impl.split("-")[-1][:-3])
    model = qn.resnet20(quantized=True, bits=bits).to(device)
    if impl.startswith("float-planes"):
        from fedmpq.nn import float_planes

        model = float_planes.FloatPlaneModel.from_quantized(model)
        bit_opt = float_planes.FloatPlaneOptimizer(model, lr=0.1, momentum=0.9, lam=1e-3, seed=0)
        sgd = torch.optim.SGD(float_planes.float_parameters(model), lr=0.1, momentum=0.9)
    else:
        bit_opt = qn.BitPlaneOptimizer(model, lr=0.1, momentum=0.9, lam=1e-3, seed=0)
        sgd = torch.optim.SGD(qn.float_parameters(model), lr=0.1, momentum=0.9)

    run = torch.compile(model) if compiled else model

    def step():
        loss = F.cross_entropy(run(x), y)
        bit_opt.zero_grad()
        sgd.zero_grad(set_to_none=True)
        loss.backward()
        bit_opt.step()  # before SGD moves the scales: the planes' gradient uses the forward's
        sgd.step()

    step()
    per_weight = (qn.state_bytes_per_weight(model, bit_opt) if not impl.startswith("float-planes")
                  else 12.0 * bits)  # float planes, their gradients and momentum
    return step, per_weight


@pytest.mark.parametrize("batch,device,impl,mode", CASES,
                         ids=[f"b{b}-{d}-{i}" + ("-compile" if m == "compile" else "") for b, d, i, m in CASES])
def bench_client_step(benchmark, batch, device, impl, mode):
    compiled = mode == "compile"
    step, per_weight = make_step(impl, batch, device, compiled)
    label = "resnet20" + (", compiled" if compiled else "")
    benchmark.group = f"client-step-b{batch}" + (" compiled" if compiled else "")
    benchmark.extra_info.update(group_key=("client-step", batch, label, device), name=impl, bytes=0,
                                torch_anchor="float", state_bytes_per_weight=per_weight)

    def run():
        step()
        sync(device)

    run()  # compiles, for the compiled cases
    rounds = 15 if device == "cpu" else (20 if compiled else 50)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=2)
