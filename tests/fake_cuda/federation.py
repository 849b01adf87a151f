"""Child process of tests/fedmpq/test_host_cuda.py: ``python federation.py LIB OUT``.

Loads host CUDA (``LIB``, see __init__.py), then runs test_backends.py's two-round
federation with ``device="cuda"`` on the reference backend and on the CUDA backend, whose
adapters (``fedmpq_kernels/<family>/cuda.py``) run as on a GPU (device checks, streams,
workspaces on the device) with the CUDA kernels compiled for the host (tests/cuda_emu) in
place of ``_C.cuda``; and the float algorithm on the device. Prints one JSON line: whether
each run equals the reference run on the device byte for byte (the first difference
otherwise), the kernels the CUDA backend launched (each adapter refuses a tensor that is not
on a CUDA device), and the float run's rounds.
(Host CUDA convolves with other algorithms than the CPU, so the oracle is the reference
backend on the same device, as on a GPU.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests import fake_cuda  # noqa: E402

fake_cuda.load(sys.argv[1])

import torch  # noqa: E402

from fedmpq import simulate  # noqa: E402
from fedmpq_kernels import registry  # noqa: E402
from tests.fedmpq.test_backends import CFG, _assert_the_reference_run, _run  # noqa: E402


def main(out: Path) -> dict:
    launched = fake_cuda.emulated_kernels()
    report = {"cuda_available": torch.cuda.is_available()}
    with registry.use_backend("reference"):
        ref = _run("cuda", out / "reference")
    with registry.use_backend("cuda"):
        report["backends_on_cuda"] = {fam: registry.backend_for("cuda", fam) for fam in registry.FAMILIES}
        run = _run("cuda", out / "cuda")
    try:
        _assert_the_reference_run(run, ref)
        report["cuda_is_reference"] = True
    except AssertionError as e:
        report["cuda_is_reference"] = str(e)
    report["launched"] = sorted({c for cuda in launched for c in cuda.calls})
    fp = simulate.run(dict(CFG, alg="fp", device="cuda"), out=str(out / "fp"), progress=False)
    report["fp_rounds"] = [{k: r[k] for k in ("reported", "aggregated", "bytes_up", "bytes_down")} for r in fp["rounds"]]
    return report


if __name__ == "__main__":
    out = Path(sys.argv[2])
    for d in ("reference", "cuda", "fp"):
        (out / d).mkdir(parents=True, exist_ok=True)
    print(json.dumps(main(out)))
