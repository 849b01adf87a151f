"""A federation on every kernel backend gives the reference backend's run, byte for byte.

The kernel tests hold each op to the pure-torch reference; this holds the trainer's use of
them: two rounds of ``fedmpq simulate`` with every op family routed to one backend (the
clients' weights from bit planes and their backward over layer tables, the activations'
fake-quant, the bit-plane step over layer tables, precision reduction, packing the uploads,
the server's decoding and reassignment) against the same run on the reference backend on
the same device. Every backend is bit-exact against the reference op by op, so the runs
must be too: the final model and bit assignments, and every round's accuracy, loss, bits and
bytes. (The scale gradients are float64 sums, in another order on some backends; their
float32 results could differ only where that order moves a float64 sum across a float32
rounding boundary, which these runs do not meet.) A dL/ds off by one part in 10^6, or one
layer stepped with another's scale, fails it. The step's random draws reach the momentum
buffers here but no uploaded code (a draw moves a code only where lr * g_s is about 1/2 or
more; other keys give these runs' uploads), so these runs do not hold them; the kernel
tests do.

On this machine: the C++ kernels (both ISAs), the Triton kernels in its interpreter, and the
CUDA C++ kernels and adapters through the host emulator (tests/cuda_emu). On a GPU (the
``cuda`` and ``triton-cuda`` cases, tools/gpu_check.sh's client step): the same federation
with ``device=cuda`` against the reference on the GPU, cuDNN held deterministic.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from fedmpq import simulate
from fedmpq_kernels import registry
from tests.cuda_emu.launchers import wire

# Two clients of 64 samples, one sampled a round, two steps a round (batch 32), budgets 2
# and 6. A large learning rate, so that two steps move codes (at the default 0.1 they move
# none: only the scales would be compared), and a threshold just above the planes' fill of
# these fresh uniform weights (about 50 %), so that precision reduction drops planes (6 to
# 5 bits in round 1, 8 to 6 in round 2) and round 2 trains several widths in a model.
CFG = dict(dataset="digits", alg="fedmpq", n_clients=2, budgets=[2, 6], rounds=2, local_epochs=1, batch_size=32,
           train_samples=128, alpha=None, sampling_rate=0.5, threads=1, seed=3, lr=4.0, threshold=50.5)
_TIMES = ("seconds", "quant_seconds", "threads")


def _run(device: str, out) -> dict:
    """The run on ``device``: its rounds without their timings, and its final server state
    (``checkpoint.pt``)."""
    res = simulate.run(dict(CFG, device=device), out=str(out), progress=False)
    rounds = [{k: v for k, v in r.items() if k not in _TIMES} for r in res["rounds"]]
    for r in rounds:  # a client that failed on a backend is left out of its round: say so here
        assert r["aggregated"] == r["reported"] and len(r["reported"]) == 1, r
    return {"rounds": rounds, "server": torch.load(out / "checkpoint.pt", weights_only=False)["server"]}


_ORACLE = {}


@pytest.fixture
def reference_run(tmp_path_factory, monkeypatch):
    """The run on the reference backend, per device (made once)."""
    def get(device: str) -> dict:
        if device not in _ORACLE:
            with registry.use_backend("reference"):
                _ORACLE[device] = _run(device, tmp_path_factory.mktemp(f"reference-{device}"))
        return _ORACLE[device]
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    return get


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _assert_same(got, want, where="server") -> None:
    """Equal, tensors bit for bit (dtype, shape and bytes: -0.0 is not 0.0)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and (got.dtype, got.shape) == (want.dtype, want.shape), where
        assert torch.equal(_bits(got), _bits(want)), f"{where}: differs from the reference run"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _assert_the_reference_run(run: dict, ref: dict) -> None:
    assert run["rounds"] == ref["rounds"]
    _assert_same(run["server"], ref["server"])


def test_a_federation_on_every_backend_is_the_reference_run(backend, reference_run, tmp_path):
    if backend.name == "reference":
        pytest.skip("the reference backend is the oracle of the other cases")
    ref = reference_run(backend.device)
    with backend.active():
        for fam in registry.FAMILIES:  # the backend runs every family (no fallback to another)
            assert registry.backend_for(backend.device, fam) == backend.name, fam
        run = _run(backend.device, tmp_path)
    _assert_the_reference_run(run, ref)


def test_a_federation_through_the_emulated_cuda_kernels_is_the_reference_run(emu, reference_run, tmp_path,
                                                                            monkeypatch):
    """The CUDA backend's adapters (``fedmpq_kernels/<family>/cuda.py``) and kernels
    (csrc/cuda, compiled for the host) run the federation on CPU tensors."""
    launched = []
    for fam in registry.FAMILIES:
        launched.append(wire(importlib.import_module(f"fedmpq_kernels.{fam}.cuda"), emu, monkeypatch))
    supports = registry.supports
    monkeypatch.setattr(registry, "supports", lambda name, dev: (name, dev) == ("cuda", "cpu") or supports(name, dev))
    monkeypatch.setitem(registry._AVAILABLE, "cuda", lambda: (True, ""))
    ref = reference_run("cpu")
    with registry.use_backend("cuda"):
        run = _run("cpu", tmp_path)
    calls = {c for cuda in launched for c in cuda.calls}
    # every kernel a quantized client round and the server's decoding use
    assert {"relu6_fake_quant", "fake_quant_backward", "dequantize_layers", "dequantize_backward_layers",
            "bitplane_step_layers", "plane_popcounts_layers", "binarize", "pack_codes", "unpack_codes"} <= calls, calls
    _assert_the_reference_run(run, ref)
