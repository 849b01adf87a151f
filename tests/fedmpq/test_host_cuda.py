"""The federation's CUDA path, run without a GPU on host CUDA (tests/fake_cuda).

A federation with ``device="cuda"`` had run only on lent GPUs (twice), and the tests that
need a CUDA device skip here. Host CUDA is a stand-in CUDA device for the CPU build: tensors
labelled ``cuda:0`` in host memory, torch's ops run by the CPU's kernels, a CUDA tensor
beside a CPU one refused as a GPU refuses it, and the CUDA backend's adapters running the
CUDA kernels compiled for the host. In a child process (torch takes the device when it is
imported), this runs:
- test_backends.py's two-round federation on ``cuda`` through the CUDA backend against the
  reference backend on ``cuda``, byte for byte, and the float algorithm on ``cuda``;
- the tests that skip without a CUDA device (but those of CUDA graphs, which host CUDA does
  not have).
Host CUDA convolves with the CPU's fallback algorithms, so its runs are not the CPU's bit for
bit; the oracle is the reference backend on the same device, as on a GPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import fake_cuda

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lib() -> Path:
    return fake_cuda.build()


def _child(args, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("FEDMPQ_TEST_BACKENDS", None)
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_a_federation_on_cuda_through_the_cuda_backend_is_the_reference_run(lib, tmp_path):
    res = _child([ROOT / "tests" / "fake_cuda" / "federation.py", lib, tmp_path])
    assert res.returncode == 0, res.stderr[-4000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["cuda_available"]
    assert r["backends_on_cuda"] == {"fake_quant": "cuda", "pack": "cuda", "bitplane": "cuda"}
    assert r["cuda_is_reference"] is True, r["cuda_is_reference"]
    # every kernel a quantized client round uses on the device (uploads are packed on the host)
    assert {"relu6_fake_quant", "fake_quant_backward", "dequantize_layers", "dequantize_backward_layers",
            "bitplane_step_layers", "plane_popcounts_layers"} <= set(r["launched"]), r["launched"]
    # the float algorithm: each round's one client reported and was aggregated, its model each way
    for rnd in r["fp_rounds"]:
        assert rnd["reported"] == rnd["aggregated"] and len(rnd["reported"]) == 1
        assert rnd["bytes_up"] == rnd["bytes_down"] > 0


# The tests that skip without a CUDA device, but those of CUDA graphs.
CUDA_ONLY = ["tests/fedmpq/test_simulate.py::test_a_federation_on_cuda_sends_payloads_of_the_cpu_layout",
             "tests/fedmpq/test_nn.py::test_all_coefficients_on_a_gpu_are_the_cpus"]


def test_the_tests_that_need_a_cuda_device_pass_on_host_cuda(lib):
    res = _child([ROOT / "tests" / "fake_cuda" / "run_pytest.py", lib, "-q", "-rs", *CUDA_ONLY])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    m = re.search(r"(\d+) passed", res.stdout)
    assert m and int(m.group(1)) == 3 and "skipped" not in res.stdout, res.stdout[-2000:]
