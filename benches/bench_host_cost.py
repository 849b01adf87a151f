"""Host cost per call on the CPU: fake_quant on a 1-element tensor against torch's op, where
the time is all Python, dispatch, autograd and allocation (the kernels do one element).

Groups ``host-cost forward+backward`` (clipped STE, learnable scale; anchor
``torch_fq_learnable``, torch's ``_fake_quantize_learnable_per_tensor_affine``: target at
most 1.15x, i.e. a speed-up column of at least 0.87) and ``host-cost forward`` (no
gradient; anchor ``torch_fq``: at most 2.5x, at least 0.40). pytest-benchmark times the
cases one after another; ``python benches/host_cost.py`` times them interleaved (the
numbers in docs/BENCHMARKS.md).
"""
from __future__ import annotations

import pytest
import torch

import fedmpq_kernels as fk

from conftest import run_timed

CASES = [("forward+backward", "torch_fq_learnable"), ("forward+backward", "fedmpq[cpu]"),
         ("forward", "torch_fq"), ("forward", "fedmpq[cpu]")]


@pytest.mark.parametrize("op,impl", CASES, ids=[f"{o}-{i}" for o, i in CASES])
def bench_host_cost(benchmark, op, impl):
    from fedmpq_kernels import registry

    ok, why = registry.available("cpu")
    if impl == "fedmpq[cpu]" and not ok:
        pytest.skip(f"cpu backend unavailable: {why}")
    torch.manual_seed(0)
    if op == "forward":
        x, s = torch.randn(1), torch.tensor(0.5)
        if impl == "torch_fq":
            fn = lambda: torch.fake_quantize_per_tensor_affine(x, 0.5, 0, -7, 7)  # noqa: E731
        else:
            fn = lambda: fk.fake_quant(x, 4, s)  # noqa: E731
    else:
        x, g = torch.randn(1, requires_grad=True), torch.ones(1)
        if impl == "torch_fq_learnable":
            st, zp = torch.tensor([0.5], requires_grad=True), torch.tensor([0.0])
            fwd, leaves = lambda: torch._fake_quantize_learnable_per_tensor_affine(x, st, zp, -7, 7, 1.0), (x, st)  # noqa: E731
        else:
            s = torch.tensor(0.5, requires_grad=True)
            fwd, leaves = lambda: fk.fake_quant(x, 4, s, ste="clipped"), (x, s)  # noqa: E731

        def fn():
            fwd().backward(g)
            for t in leaves:  # no AccumulateGrad add into a kept .grad on the next call
                t.grad = None
    anchor = "torch_fq_learnable" if op == "forward+backward" else "torch_fq"
    benchmark.group = f"host-cost {op} 1 cpu"
    benchmark.extra_info.update(group_key=(f"host-cost {op}", 1, "1 element", "cpu"), name=impl, bytes=8,
                                torch_anchor=anchor)
    run_timed(benchmark, impl, fn, "cpu")
