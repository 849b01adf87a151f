"""fake_quant forward and forward+backward against torch's anchors.

Candidates: ``fedmpq[<backend>]`` for each backend available on the device (the
reference included). Anchors: ``copy_`` (read + write into a preallocated tensor: the
memory-bandwidth floor), ``torch_fq`` (``torch.fake_quantize_per_tensor_affine``; a
given scale only, torch has no dynamic form; a float scale, so no scale gradient),
``torch_fq_learnable`` (``torch._fake_quantize_learnable_per_tensor_affine``: a scale
tensor that gets a gradient, the like-for-like anchor of forward+backward with a learnable
scale, and that group's "torch way") and ``eager_composite`` (round/clamp/mul with a
straight-through estimator, as a user would write it).

``variant`` (benches/conftest.py): ``latency`` times one call and a synchronization (what
the first H200 run measured: host cost included), ``throughput`` 20 calls and one
synchronization, ``graph`` 20 calls captured in one CUDA graph and replayed (no host work);
the last two on CUDA only, on aligned inputs.

forward+backward: identity STE for the dynamic scale (FedMPQ's activations), clipped
STE with a learnable scale for the given one (both bitmaps kept and read back).

``sliced``: the input (and the incoming gradient) is ``t[1:]`` of a contiguous tensor, 4 bytes
past an aligned address; its groups are named ``... x[1:]`` and compare the kernels with
``copy_`` of the same slice (the CUDA kernels read it with shifted vector loads, so it should
cost what an aligned tensor costs). torch's fake-quant and the composite are not rerun there.
Run: ``pytest benches/ --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels import registry

from conftest import CALLS, VARIANTS, randn, run_variant, skip_unless_runs, variant_label

BITS = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = ["copy_", "torch_fq", "torch_fq_learnable", "eager_composite"] + [f"fedmpq[{b}]" for b in registry.BACKENDS]


def _skip_unless_runs(impl: str, device: str, scaled: bool):
    skip_unless_runs(impl, device, "fake_quant")
    if impl.startswith("torch_fq") and not scaled:
        pytest.skip("torch's fake-quant has no dynamic-scale form")


def _composite(x, scale, clipped):
    L = 2**BITS - 1
    s = x.detach().abs().amax() if scale is None else scale
    xc = torch.clamp(x, -s, s) if clipped else x
    q = torch.round(xc.abs() * (L / s)) * (s / L) * torch.sign(xc)
    return xc + (q - xc).detach()


def _setup(numel, device, scaled, need_grad, sliced=False):
    torch.manual_seed(0)
    x = randn(numel + 1, device=device)[1:] if sliced else randn(numel, device=device)
    if need_grad:
        x.requires_grad_(True)
    scale = torch.tensor(2.0, device=device, requires_grad=need_grad) if scaled else None
    return x, scale


def _record(benchmark, op, numel, scaled, device, impl, bytes_moved, sliced=False, variant="latency", anchor=None):
    op = op + " x[1:]" if sliced else op
    label = ("given" if scaled else "dynamic") + variant_label(variant)
    calls = 1 if variant == "latency" else CALLS
    benchmark.extra_info.update(group_key=(op, numel, label, device), name=impl, bytes=bytes_moved * calls)
    if anchor:
        benchmark.extra_info["torch_anchor"] = anchor
    benchmark.group = f"{op} {numel} {label} {device}"


def _measure(benchmark, impl, fn, device, variant="latency"):
    """Time ``fn`` with the backend selected, then store GB/s (from the median) in extra_info."""
    run_variant(benchmark, impl, fn, device, variant)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info["gb_per_s"] = benchmark.extra_info["bytes"] / stats.stats.median / 1e9


def _skip_sliced(impl: str, sliced: bool, variant: str):
    if sliced and (impl.startswith("torch_fq") or impl == "eager_composite"):
        pytest.skip("the sliced groups compare the kernels with copy_ only")
    if sliced and variant != "latency":
        pytest.skip("the throughput and graph variants run on aligned inputs")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sliced", [False, True], ids=["aligned", "sliced"])
@pytest.mark.parametrize("scaled", [False, True], ids=["dynamic", "given"])
@pytest.mark.parametrize("impl", IMPLS)
def bench_forward(benchmark, impl, scaled, sliced, device, variant, numel):
    _skip_unless_runs(impl, device, scaled)
    _skip_sliced(impl, sliced, variant)
    if impl == "torch_fq_learnable":
        pytest.skip("forward without a gradient: torch_fq is the anchor")
    x, scale = _setup(numel, device, scaled, need_grad=False, sliced=sliced)
    out = torch.empty_like(x)
    sf = 2.0
    if impl == "copy_":
        fn = lambda: out.copy_(x)  # noqa: E731
    elif impl == "torch_fq":
        fn = lambda: torch.fake_quantize_per_tensor_affine(x, sf / 7.5, 0, -7, 7)  # noqa: E731
    elif impl == "eager_composite":
        # no clamp for a dynamic S = max|x| (it clips nothing; fedmpq's kernel does not clamp there)
        fn = lambda: _composite(x, scale, clipped=scaled)  # noqa: E731
    else:
        fn = lambda: fk.fake_quant(x, BITS, scale)  # noqa: E731

    _record(benchmark, "forward", numel, scaled, device, impl, 8 * numel, sliced, variant)
    _measure(benchmark, impl, fn, device, variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sliced", [False, True], ids=["aligned", "sliced"])
@pytest.mark.parametrize("scaled", [False, True], ids=["dynamic", "given"])
@pytest.mark.parametrize("impl", IMPLS)
def bench_forward_backward(benchmark, impl, scaled, sliced, device, variant, numel):
    _skip_unless_runs(impl, device, scaled)
    _skip_sliced(impl, sliced, variant)
    if impl == "torch_fq_learnable" and variant == "graph" and device == "cuda":
        # ATen's learnable fake-quant reads the scale with .item(), a host sync: a capture fails
        pytest.skip("torch's learnable fake-quant synchronizes (scale.item()): not capturable")
    x, scale = _setup(numel, device, scaled, need_grad=impl != "copy_", sliced=sliced)
    grad = randn(numel + 1, device=device)[1:] if sliced else randn(numel, device=device)
    out = torch.empty_like(x)
    sf = 2.0

    leaves = [x] + ([scale] if scale is not None else [])  # their .grad is reset after each call
    if impl == "copy_":
        def fn():
            out.copy_(x)
    else:
        if impl == "torch_fq":
            fwd = lambda: torch.fake_quantize_per_tensor_affine(x, sf / 7.5, 0, -7, 7)  # noqa: E731
        elif impl == "torch_fq_learnable":
            # the scale (and x) get gradients, as fedmpq's clipped STE with a learnable scale
            s_t = torch.full((1,), sf / 7.5, device=device, requires_grad=True)
            zp = torch.zeros(1, device=device)
            leaves.append(s_t)
            fwd = lambda: torch._fake_quantize_learnable_per_tensor_affine(x, s_t, zp, -7, 7, 1.0)  # noqa: E731
        elif impl == "eager_composite":
            fwd = lambda: _composite(x, scale, clipped=scaled)  # noqa: E731
        else:
            fwd = lambda: fk.fake_quant(x, BITS, scale, ste="clipped" if scaled else "identity")  # noqa: E731

        def fn():
            fwd().backward(grad)
            for t in leaves:
                t.grad = None

    # x and grad read, y and grad_x written; copy_ is the one-pass floor it is compared with
    _record(benchmark, "forward+backward", numel, scaled, device, impl, 16 * numel if impl != "copy_" else 8 * numel,
            sliced, variant, anchor="torch_fq_learnable" if scaled else None)
    _measure(benchmark, impl, fn, device, variant)
