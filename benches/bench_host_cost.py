"""Host cost per call on the CPU: fake_quant on a 1-element tensor against torch's op, where
the time is all Python, dispatch, autograd and allocation (the kernels do one element).

Groups ``host-cost forward+backward`` (clipped STE, learnable scale; anchor
``torch_fq_learnable``, torch's ``_fake_quantize_learnable_per_tensor_affine``: target at
most 1.15x, i.e. a speed-up column of at least 0.87; ``bound``: the least a Python
autograd.Function costs for the same work, the floor) and ``host-cost forward`` (no
gradient; anchor ``torch_fq``: at most 2.5x, at least 0.40). The cases are
``benches/host_cost.py``'s; pytest-benchmark times them one after another, each after its
warm-up (conftest), and ``python benches/host_cost.py`` times them interleaved (the numbers
docs/BENCHMARKS.md quotes).
"""
from __future__ import annotations

import pytest

from conftest import run_timed
from host_cost import cases

CASES = [("forward+backward", "torch_fq_learnable", "fwd+bwd torch learnable"),
         ("forward+backward", "fedmpq[cpu]", "fwd+bwd fedmpq"), ("forward+backward", "bound", "fwd+bwd bound"),
         ("forward", "torch_fq", "forward torch"), ("forward", "fedmpq[cpu]", "forward fedmpq")]


@pytest.mark.parametrize("op,impl,case", CASES, ids=[f"{o}-{i}" for o, i, _ in CASES])
def bench_host_cost(benchmark, op, impl, case):
    from fedmpq_kernels import registry

    ok, why = registry.available("cpu")
    if impl in ("fedmpq[cpu]", "bound") and not ok:
        pytest.skip(f"cpu backend unavailable: {why}")
    benchmark.group = f"host-cost {op} 1 cpu"
    benchmark.extra_info.update(group_key=(f"host-cost {op}", 1, "1 element", "cpu"), name=impl, bytes=0,
                                torch_anchor="torch_fq_learnable" if op == "forward+backward" else "torch_fq",
                                floor="bound")
    run_timed(benchmark, impl, cases()[case], "cpu")
