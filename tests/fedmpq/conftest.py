"""Shared makers for the federated system's tests: random quantized layers and uploads."""
from __future__ import annotations

import math

import pytest
import torch

from fedmpq import wire
from tests import early


def make_layer(shape, bits: int, gen: torch.Generator, scale: float | None = None) -> wire.QuantizedTensor:
    n = math.prod(shape)
    codes = torch.randint(0, 1 << bits, (n,), generator=gen, dtype=torch.int32).to(torch.uint8).reshape(shape)
    neg = torch.rand(shape, generator=gen) < 0.5
    s = float(torch.rand((), generator=gen)) * 3 + 0.01 if scale is None else scale
    return wire.QuantizedTensor.from_codes(codes, neg, bits, s)


# A small model's layout: quantized convs/linear (odd sizes, one empty), float BN/bias/shortcut.
SHAPES = {
    "conv1.weight": (4, 3, 3, 3),
    "layer1.conv.weight": (5, 4, 3, 3),
    "empty.weight": (0, 3),
    "fc.weight": (7, 33),
}
FLOATS = {
    "bn1.weight": (4,),
    "bn1.bias": (4,),
    "bn1.running_mean": (4,),
    "bn1.running_var": (4,),
    "shortcut.weight": (5, 4, 1, 1),
    "fc.bias": (7,),
}


def make_upload(seed: int = 0, bits=None, client_id=None, num_samples: int = 120) -> wire.Upload:
    """An upload of the SHAPES/FLOATS model; client 3 + seed unless given (an aggregate takes
    one upload per client)."""
    client_id = 3 + seed if client_id is None else client_id
    gen = torch.Generator().manual_seed(seed)
    bits = bits or {name: 1 + (i + seed) % 8 for i, name in enumerate(SHAPES)}
    layers = {name: make_layer(shape, bits[name], gen) for name, shape in SHAPES.items()}
    floats = {name: torch.randn(shape, generator=gen) for name, shape in FLOATS.items()}
    floats["bn1.running_var"].abs_()  # a variance: the server refuses a negative one
    floats["bn1.num_batches_tracked"] = torch.tensor(17 + seed, dtype=torch.int64)
    floats["half.weight"] = torch.randn(3, 5, generator=gen).half()
    deltas = {name: (i * 3 + seed) % 8 for i, name in enumerate(SHAPES)}
    return wire.Upload(client_id, 5, num_samples, 4.0, layers, deltas, floats)


@pytest.fixture
def upload():
    return make_upload()


@pytest.fixture(autouse=True)
def _own_trainer_registry(tmp_path_factory, monkeypatch):
    """Every test sees only its own fedmpq runs: a default-threads ``fedmpq simulate`` shares
    the cores with the runs registered on the machine (fedmpq.trainers), so a study running
    beside the tests would change the threads, and the results, that tests compare."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))


# The kernel tests' backend matrix and CUDA emulator, for the federation run on each backend
# (test_backends.py).
from tests.fedmpq_kernels import conftest as _kernels  # noqa: E402

backend = _kernels.backend
cuda_emu = _kernels.cuda_emu
emu = _kernels.emu


@early.job("fake_cuda")
def _build_fake_cuda():
    from tests import fake_cuda

    if not fake_cuda.cpu_only_torch():
        pytest.skip("torch is built with CUDA: the stand-in device is for CPU-only builds")
    return fake_cuda.build()


@pytest.fixture(scope="session")
def fake_cuda_lib():
    """tests/fake_cuda's stand-in CUDA device, built once (its tests' children load it); the
    tests that take it skip on a CUDA build of torch, which the stand-in is not for. Built
    beside the suite (tests/early.py) when a test collected is marked ``early("fake_cuda")``."""
    return early.result("fake_cuda")
