"""fake_quant forward and forward+backward against torch's anchors and the floors.

Candidates: ``fedmpq[<backend>]`` for each backend available on the device (the
reference included), each checked once, untimed, against the reference's output. Floors:
``copy_`` (read + write into a preallocated tensor: the memory-bandwidth floor) and
``clone`` (the op's outputs as fresh tensors: ``x.clone()``, and the incoming gradient's for
a clipped backward; the page faults of a fresh output included, as every candidate and
anchor pays them). Anchors, on fedmpq's grid (4 bits sign-magnitude: L = 15, levels
-15..15 of S/15, fedmpq's levels): ``torch_fq``
(``torch.fake_quantize_per_tensor_affine``: a float scale, so no scale gradient; for the
dynamic scale, ``max|x| / 15`` as a tensor first, the way torch code would write it),
``torch_fq_learnable`` (``torch._fake_quantize_learnable_per_tensor_affine``: a scale
tensor that gets a gradient, the like-for-like anchor of forward+backward with a learnable
scale, and that group's "torch way") and ``eager_composite`` (round/clamp/mul with a
straight-through estimator, as a user would write it).

``variant`` (benches/conftest.py): ``latency`` times one call and a synchronization (what
the first H200 run measured: host cost included), ``throughput`` 20 calls and one
synchronization, ``graph`` 20 calls captured in one CUDA graph and replayed (no host work);
the last two on CUDA only, on aligned inputs.

forward+backward: identity STE for the dynamic scale (FedMPQ's activations: the gradient
passes through unchanged), clipped STE with a learnable scale for the given one (both
bitmaps kept and read back). Bytes each must move at least: given forward 8 per element
(read x, write y); dynamic forward 12 (max|x| is known only after a whole read of x, then x
is read again); given forward+backward 16 (and the bitmaps); dynamic forward+backward 12.

``sliced``: the input (and the incoming gradient) is ``t[1:]`` of a contiguous tensor, 4 bytes
past an aligned address; its groups are named ``... x[1:]`` and compare the kernels with
``copy_`` and ``clone`` of the same slice (the CUDA kernels read it with shifted vector loads,
so it should cost what an aligned tensor costs). torch's fake-quant and the composite are not
rerun there. Run: ``pytest benches/ --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels import registry

from conftest import CALLS, VARIANTS, randn, run_variant, selected, skip_unless_runs, torch_fq_dynamic, variant_label

BITS = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
L = 2**BITS - 1
SCALE = 2.0  # the given scale
IMPLS = ["copy_", "clone", "torch_fq", "torch_fq_learnable", "eager_composite"] + [f"fedmpq[{b}]" for b in registry.BACKENDS]


def _skip_unless_runs(impl: str, device: str, scaled: bool):
    skip_unless_runs(impl, device, "fake_quant")
    if impl == "torch_fq_learnable" and not scaled:
        pytest.skip("a dynamic scale learns nothing: torch_fq is the anchor")


def _torch_fq(x, scale):
    """torch's fake-quant on fedmpq's grid: the levels of ``fk.fake_quant(x, 4, scale)``."""
    if scale is None:
        return torch_fq_dynamic(x, BITS)
    return torch.fake_quantize_per_tensor_affine(x, SCALE / L, 0, -L, L)


def _check(impl, device, fn, x, scale):
    """Untimed: a candidate's forward output equals the reference's, bit for bit (the
    backends' contract), so a kernel that returned early or wrote garbage cannot time as
    fast."""
    if not impl.startswith("fedmpq["):
        return
    with selected(impl, device):
        y = fn().detach()
    with selected("fedmpq[reference]", device):
        expect = fk.fake_quant(x.detach(), BITS, None if scale is None else scale.detach())
    assert torch.equal(y, expect), f"{impl}: fake_quant's output differs from the reference's"


def _composite(x, scale, clipped):
    s = x.detach().abs().amax() if scale is None else scale
    xc = torch.clamp(x, -s, s) if clipped else x
    q = torch.round(xc.abs() * (L / s)) * (s / L) * torch.sign(xc)
    return xc + (q - xc).detach()


def _setup(numel, device, scaled, need_grad, sliced=False):
    torch.manual_seed(0)
    x = randn(numel + 1, device=device)[1:] if sliced else randn(numel, device=device)
    if need_grad:
        x.requires_grad_(True)
    scale = torch.tensor(SCALE, device=device, requires_grad=need_grad) if scaled else None
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
        pytest.skip("the sliced groups compare the kernels with copy_ and clone only")
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
    if impl == "copy_":
        fn = lambda: out.copy_(x)  # noqa: E731
    elif impl == "clone":
        fn = x.clone
    elif impl == "torch_fq":
        fn = lambda: _torch_fq(x, scale)  # noqa: E731
    elif impl == "eager_composite":
        # no clamp for a dynamic S = max|x| (it clips nothing; fedmpq's kernel does not clamp there)
        fn = lambda: _composite(x, scale, clipped=scaled)  # noqa: E731
    else:
        fn = lambda: fk.fake_quant(x, BITS, scale)  # noqa: E731
    _check(impl, device, fn, x, scale)
    moved = 12 * numel if not scaled and impl not in ("copy_", "clone") else 8 * numel
    _record(benchmark, "forward", numel, scaled, device, impl, moved, sliced, variant)
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
    floor = impl in ("copy_", "clone")
    x, scale = _setup(numel, device, scaled, need_grad=not floor, sliced=sliced)
    grad = randn(numel + 1, device=device)[1:] if sliced else randn(numel, device=device)
    out = torch.empty_like(x)

    leaves = [x] + ([scale] if scale is not None else [])  # their .grad is reset after each call
    if impl == "copy_":
        def fn():
            out.copy_(x)
    elif impl == "clone":
        def fn():  # y, and grad_x where the backward clips (the identity STE passes grad on)
            return (x.clone(), grad.clone()) if scaled else x.clone()
    else:
        if impl == "torch_fq":
            fwd = lambda: _torch_fq(x, scale.detach() if scaled else None)  # noqa: E731
        elif impl == "torch_fq_learnable":
            # the scale (and x) get gradients, as fedmpq's clipped STE with a learnable scale
            s_t = torch.full((1,), SCALE / L, device=device, requires_grad=True)
            zp = torch.zeros(1, device=device)
            leaves.append(s_t)
            fwd = lambda: torch._fake_quantize_learnable_per_tensor_affine(x, s_t, zp, -L, L, 1.0)  # noqa: E731
        elif impl == "eager_composite":
            fwd = lambda: _composite(x, scale, clipped=scaled)  # noqa: E731
        else:
            fwd = lambda: fk.fake_quant(x, BITS, scale, ste="clipped" if scaled else "identity")  # noqa: E731
        _check(impl, device, fwd, x, scale)

        def fn():
            fwd().backward(grad)
            for t in leaves:
                t.grad = None

    # given: x and grad read, y and grad_x written (and the bitmaps); dynamic: x read twice, y
    # written, the gradient passed on; copy_ is the one-pass floor it is compared with
    moved = 8 * numel if impl == "copy_" else 16 * numel if scaled else 8 * numel if impl == "clone" else 12 * numel
    _record(benchmark, "forward+backward", numel, scaled, device, impl, moved,
            sliced, variant, anchor="torch_fq_learnable" if scaled else None)
    _measure(benchmark, impl, fn, device, variant)
