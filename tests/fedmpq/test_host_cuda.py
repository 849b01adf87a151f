"""The federation's CUDA path, run without a GPU on host CUDA (tests/fake_cuda).

A federation with ``device="cuda"`` had run only on lent GPUs (twice), and the tests that
need a CUDA device skip here. Host CUDA is a stand-in CUDA device for the CPU build: tensors
labelled ``cuda:0`` in host memory, torch's ops run by the CPU's kernels, a CUDA tensor
beside a CPU one refused as a GPU refuses it, and the CUDA backend's adapters running the
CUDA kernels compiled for the host. In a child process (torch takes the device when it is
imported), this runs:
- test_backends.py's two-round federation on ``cuda`` through the CUDA backend against the
  reference backend on ``cuda``, byte for byte, and the float algorithm on ``cuda``;
- the tests that skip without a CUDA device (those that host CUDA can run: not CUDA graphs,
  not the real ``_C.cuda`` bindings);
- host CUDA's own semantics against the CPU (tests/fake_cuda/host_semantics.py).
Host CUDA convolves with the CPU's fallback algorithms, so its runs are not the CPU's bit for
bit; the oracle is the reference backend on the same device, as on a GPU."""
from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import early, fake_cuda

ROOT = Path(__file__).resolve().parents[2]


def _child(*args, timeout=600) -> subprocess.CompletedProcess:
    """A child on the stand-in device (its library the first argument), run beside the suite
    (tests/early.py)."""
    return early.run([sys.executable, *map(str, args[:1]), str(early.result("fake_cuda")), *map(str, args[1:])],
                     timeout=timeout, cwd=ROOT, env=fake_cuda.child_env(early.environ()))


@early.job("host_cuda:federation")
def _federation():
    with tempfile.TemporaryDirectory(prefix="fedmpq-host-cuda-") as out:
        return _child(ROOT / "tests" / "fake_cuda" / "federation.py", out)


@pytest.mark.early("fake_cuda", "host_cuda:federation")
def test_a_federation_on_cuda_through_the_cuda_backend_is_the_reference_run(fake_cuda_lib):
    res = early.result("host_cuda:federation")
    assert res.returncode == 0, res.stderr[-4000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["cuda_available"]
    assert r["backends_on_cuda"] == {"fake_quant": "cuda", "pack": "cuda", "bitplane": "cuda"}
    assert r["cuda_is_reference"] is True, r["cuda_is_reference"]
    # every kernel a quantized client round uses on the device (uploads are packed on the host)
    assert {"relu6_fake_quant", "fake_quant_backward", "dequantize_layers", "dequantize_backward_layers",
            "bitplane_step_layers", "plane_popcounts_layers"} <= set(r["launched"]), r["launched"]
    # the float algorithm: each round's one client reported and was aggregated, its model each way
    assert len(r["fp_rounds"]) == 2
    for rnd in r["fp_rounds"]:
        assert rnd["reported"] == rnd["aggregated"] and len(rnd["reported"]) == 1
        assert rnd["bytes_up"] == rnd["bytes_down"] > 0


def _run_pytest(*args) -> subprocess.CompletedProcess:
    return _child(ROOT / "tests" / "fake_cuda" / "run_pytest.py", "-q", "-rs", "-p", "no:randomly", *args)


def _pytest_on_host_cuda(key: str) -> tuple:
    """Job ``key``'s pytest on host CUDA: (passed count, the kernels the CUDA backend launched)."""
    res = early.result(key)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    m = re.search(r"(\d+) passed", res.stdout)
    assert m and "skipped" not in res.stdout and "failed" not in res.stdout, res.stdout[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("host CUDA launched:"), last
    return int(m.group(1)), set(last.split(":", 1)[1].split())


early.job("host_cuda:semantics")(functools.partial(_run_pytest, "tests/fake_cuda/host_semantics.py"))


@pytest.mark.early("fake_cuda", "host_cuda:semantics")
def test_host_cuda_aliases_refuses_and_resizes_as_a_gpu(fake_cuda_lib):
    """Host CUDA itself (tests/fake_cuda/host_semantics.py): views and in-place ops alias,
    out= and resize_ grow the device's storage, a CPU tensor beside a CUDA one is refused as on
    a GPU (written 0-dim ones, storages given with set_, too) and what a GPU takes from the
    host is taken."""
    passed, _ = _pytest_on_host_cuda("host_cuda:semantics")
    assert passed == 16


# The tests that skip without a CUDA device, and why some of them cannot run on host CUDA.
CUDA_ONLY = {"tests/fedmpq/test_simulate.py::test_a_federation_on_cuda_sends_payloads_of_the_cpu_layout": 2,
             "tests/fedmpq/test_nn.py::test_all_coefficients_on_a_gpu_are_the_cpus": 1}
NOT_ON_HOST_CUDA = {
    "test_cuda_binding_rejects_a_short_workspace_and_a_device_not_current": "calls the real _C.cuda binding",
    "test_a_round_replayed_from_a_cuda_graph_uploads_the_eager_rounds_bytes": "host CUDA has no CUDA graphs",
}


def test_every_test_that_needs_a_cuda_device_is_run_here_or_said_why_not():
    found = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        text = path.read_text()
        for m in re.finditer(r"skipif\(not torch\.cuda\.is_available\(\).*?\ndef (\w+)", text, re.S):
            found.add(m.group(1))
    assert found == {k.split("::")[1] for k in CUDA_ONLY} | set(NOT_ON_HOST_CUDA)


early.job("host_cuda:cuda_only")(functools.partial(_run_pytest, *CUDA_ONLY))


@pytest.mark.early("fake_cuda", "host_cuda:cuda_only")
def test_the_tests_that_need_a_cuda_device_pass_on_host_cuda(fake_cuda_lib):
    passed, launched = _pytest_on_host_cuda("host_cuda:cuda_only")
    assert passed == sum(CUDA_ONLY.values())
    # the fedmpq federation on cuda ran the CUDA backend's kernels
    assert {"relu6_fake_quant", "dequantize_layers", "bitplane_step_layers"} <= launched, launched
