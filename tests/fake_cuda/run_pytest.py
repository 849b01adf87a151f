"""Child process of tests/fedmpq/test_host_cuda.py: ``python run_pytest.py LIB PYTEST-ARGS...``.

pytest on host CUDA (__init__.py): torch reports one CUDA device, and the CUDA backend's
adapters run the CUDA kernels compiled for the host, so the tests that skip without a GPU
run. What host CUDA cannot do (CUDA graphs, timing, memory ordering between blocks) is left
to a GPU: the caller deselects those tests."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests import fake_cuda  # noqa: E402

fake_cuda.load(sys.argv[1])
launched = fake_cuda.emulated_kernels()

import pytest  # noqa: E402

rc = pytest.main(["-p", "no:cacheprovider", *sys.argv[2:]])
# the last line: the CUDA kernels the tests launched (the caller checks that the CUDA path ran)
print("host CUDA launched:", " ".join(sorted({c for cuda in launched for c in cuda.calls})))
sys.exit(rc)
