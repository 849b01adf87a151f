"""The compiled client step on CUDA, traced without a GPU.

``benches/bench_client_step.py``'s ``compile`` cases run a quantized ResNet-20 under
``torch.compile(fullgraph=True)`` on CUDA, where no test had traced it: a CUDA-only branch
that broke the graph, or a fake implementation wrong for a CUDA tensor, would show first on a
lent GPU. Here the step runs on FakeTensorMode's CUDA tensors, in a child process that loads
a stand-in CUDA device for the CPU build (tests/fake_cuda): dynamo's trace and AOT
autograd's joint graph of the model, then the bit-plane optimizer and SGD, eager, on their
CUDA paths (no values: fake tensors hold none; the kernels' arithmetic is tested elsewhere).
Inductor's CUDA code generation needs a GPU and is not run."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import early, fake_cuda

ROOT = Path(__file__).resolve().parents[2]


CASES = {
    "4bit": {"bits": 4, "channels_last": False, "device_keys": False},
    # every width in one model, channels-last activations, the step keys on the device (the
    # CUDA-graph case's optimizer)
    "mixed-channels_last-device_keys": {"bits": "mixed", "channels_last": True, "device_keys": True},
}


def _trace(case: dict) -> subprocess.CompletedProcess:
    lib = early.result("fake_cuda")
    return early.run([sys.executable, str(ROOT / "tests" / "fake_cuda" / "trace_step.py"), str(lib), json.dumps(case)],
                     timeout=300, cwd=ROOT, env=fake_cuda.child_env(early.environ()))


for _id, _case in CASES.items():  # the traces run beside the suite (tests/early.py)
    early.job(f"compile_on_cuda:{_id}")(functools.partial(_trace, _case))


@pytest.mark.parametrize("case_id", [pytest.param(i, id=i, marks=pytest.mark.early("fake_cuda", f"compile_on_cuda:{i}"))
                                     for i in CASES])
def test_quantized_resnet20_step_compiles_whole_on_cuda(fake_cuda_lib, case_id):
    case = CASES[case_id]
    res = early.result(f"compile_on_cuda:{case_id}")
    assert res.returncode == 0, res.stderr[-4000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    # one graph, no break (fullgraph=True raises on one: counted too), fedmpq's ops inside it
    assert r["graphs"] == 1 and r["graph_breaks"] == 0
    assert {"fedmpq.dequantize", "fedmpq.relu6_fake_quant"} <= set(r["fedmpq_ops"])
    assert r["loss_device"] == "cuda:0"
    # the compiled backward reached every parameter, on the device, in its shape
    for name, (device, shape, requires_grad) in r["params"].items():
        assert device == "cuda:0", name
        if requires_grad:
            assert r["grads"][name] == ["cuda:0", shape], name
    # the bit-plane optimizer stepped every layer twice on the device: a momentum of N_l x n_l
    # bits per layer, where an optimizer that skipped layers or kept its state on the host fails
    widths = r["widths"]
    assert widths == ([4] * 20 if case["bits"] == 4 else [2 + i % 7 for i in range(20)])
    assert r["bit_opt_steps"] == 2
    assert r["bit_opt_state"] == [["cuda:0", [b, n]] for b, n in zip(widths, r["sizes"])]
    assert r["device_step"] == ("cuda:0" if case["device_keys"] else None)
    # and SGD every float parameter
    assert r["sgd_state"] == [["cuda:0", s] for s in r["float_shapes"]]
