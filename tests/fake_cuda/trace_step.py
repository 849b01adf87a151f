"""Child process of tests/fedmpq/test_compile_on_cuda.py: ``python trace_step.py LIB CASE``.

Loads the stand-in CUDA device (``LIB``, see __init__.py) before torch, then runs two training
steps of a quantized ResNet-20 on fake CUDA tensors as ``benches/bench_client_step.py``'s
``compile`` cases make them: the model under ``torch.compile(fullgraph=True)`` (AOT autograd,
eager kernels: the trace, forward and backward, is what is checked; inductor's CUDA code
generation needs a GPU), the bit-plane optimizer and SGD eager. ``CASE`` is JSON with
``bits`` (an int, or "mixed": 2..8 in turn), ``channels_last`` and ``device_keys``. Prints one
JSON line: the graphs compiled, the fedmpq ops in them, graph breaks, each parameter's
gradient (device, shape) and the optimizers' states (fake tensors hold no values: what is
checked is that every step traces and where its tensors are)."""
from __future__ import annotations

import ctypes
import json
import sys

ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)  # before torch: see __init__.py

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from fedmpq import nn as qn  # noqa: E402


def main(case: dict) -> dict:
    torch.manual_seed(0)
    cl = case["channels_last"]
    bits = case["bits"]
    if bits == "mixed":
        n = len(qn.bit_layers(qn.resnet20(quantized=True, bits=4)))
        bits = [2 + i % 7 for i in range(n)]
    model = qn.resnet20(quantized=True, bits=bits, channels_last=cl)
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def on_cuda(t: torch.Tensor) -> torch.Tensor:
        # .to("cuda") copies values, which a CPU build cannot do even into a fake tensor: an
        # empty one of the same shape, strides (the sink's zero strides) and dtype instead
        with mode:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")

    for m in model.modules():
        for k, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[k] = nn.Parameter(on_cuda(p), requires_grad=p.requires_grad)
        for k, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[k] = on_cuda(b)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    with mode:
        bit_opt = qn.BitPlaneOptimizer(model, lr=0.1, momentum=0.9, lam=1e-3, seed=0, device_keys=case["device_keys"])
        sgd = torch.optim.SGD(qn.float_parameters(model), lr=0.1, momentum=0.9)
        qn.batch_weights(model)  # as the client trains (inert under torch.compile)
        x = torch.randn(8, 3, 32, 32, device="cuda")
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (8,), device="cuda")
        run = torch.compile(model, fullgraph=True, backend=backend)
        params = dict(model.named_parameters())
        for _ in range(2):  # the second step: the optimizers' states exist, the graph is reused
            loss = F.cross_entropy(run(x), y)
            bit_opt.zero_grad()
            sgd.zero_grad(set_to_none=True)
            loss.backward()
            grads = {k: None if p.grad is None else [str(p.grad.device), list(p.grad.shape)] for k, p in params.items()}
            bit_opt.step()  # before SGD moves the scales, as the client does
            sgd.step()
    ops = sorted({str(n.target) for g in graphs for n in g.graph.nodes
                  if n.op == "call_function" and str(n.target).startswith("fedmpq.")})
    return {
        "graphs": len(graphs),
        "graph_breaks": sum(counters["graph_break"].values()),
        "fedmpq_ops": ops,
        "loss_device": str(loss.device),
        "params": {k: [str(p.device), list(p.shape), p.requires_grad] for k, p in params.items()},
        "grads": grads,
        "widths": [m.bits for _, m in qn.bit_layers(model)],
        "sizes": [m.numel for _, m in qn.bit_layers(model)],
        "bit_opt_steps": bit_opt.steps,
        "bit_opt_state": [[str(st["mom"].device), list(st["mom"].shape)] for _, st in sorted(bit_opt.state.items())],
        "device_step": None if bit_opt.device_step is None else str(bit_opt.device_step.device),
        "sgd_state": [[str(sgd.state[p]["momentum_buffer"].device), list(sgd.state[p]["momentum_buffer"].shape)]
                      if p in sgd.state else None for p in qn.float_parameters(model)],
        "float_shapes": [list(p.shape) for p in qn.float_parameters(model)],
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[2]))))
