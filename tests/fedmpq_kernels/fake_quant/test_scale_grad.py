"""dL/dS, reduced inside the backward kernel (CUDA: the last block; Triton: the last
program; CPU: the kernel's own sum): every backend against the reference.

The reference sums with ``torch.sum``, whose order is torch's own, so on arbitrary floats
backends agree to rounding only (test_fake_quant.py checks that). Here the incoming
gradients are small integers: every partial sum is exact in float32 whatever the order, so
the fused reduction must give the reference's value bit for bit: each clipped element
counted once, with its side's sign, no program's or block's share lost or counted twice.
And the same call twice gives the same bits (a fixed order, no float atomics)."""
from __future__ import annotations

import contextlib

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels.fake_quant import reference as R

from .helpers import GPU_SIZES, exact_scale_grad

SIZES = [1, 31, 33, 1000, 4096, 4099, (1 << 20) + 3]


def _inputs(numel: int, device, dtype=torch.float32, seed: int = 0):
    """x with both sides clipping at S = 1, and integer gradients in -8..8 (exact sums up to
    2^24 / 8 elements), in -1..1 beyond that (exact sums up to 2^24 elements: the GPU sizes)."""
    gen = torch.Generator().manual_seed(seed + numel)
    x = (torch.randn(numel, generator=gen) * 1.5).to(device=device, dtype=dtype)
    gmax = 8 if numel <= (1 << 21) else 1
    assert numel * gmax <= 1 << 24, "a partial sum could pass 2^24: not exact in float32"
    g = torch.randint(-gmax, gmax + 1, (numel,), generator=gen).to(device=device, dtype=dtype)
    return x, torch.tensor(1.0, device=device), g


@pytest.mark.parametrize("numel", SIZES + GPU_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_fused_scale_gradient_equals_reference_bit_for_bit(backend, numel, dtype):
    """GPU_SIZES on the GPU backend cases only: at 2^20+3 a 132-SM GPU's grid covers the
    tensor in one pass, so only there do the grid-stride loops' later passes and the last
    block's reduction of them meet an exact check (off the GPU they would add CPU time alone)."""
    if numel in GPU_SIZES and backend.device != "cuda":
        pytest.skip("sizes for GPU grid-stride loops: GPU backend cases only")
    backend.skip_if_too_big(numel)
    x, s, g = _inputs(numel, backend.device, dtype)
    mod = backend.module("fake_quant")
    _, b = mod.fake_quant(x, 4, s, 2)
    gx, gs = mod.fake_quant_backward(g, b, True)
    rgx, rgs = R.fake_quant_backward(g, b, True)
    assert torch.equal(gx.cpu(), rgx.cpu())
    assert gs.dtype == torch.float32 and gs.shape == ()
    assert gs.item() == rgs.item() == exact_scale_grad(x, s, g)
    # and through the public op and autograd
    with backend.active():
        xr, sr = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
        fk.fake_quant(xr, 4, sr, ste="clipped").backward(g)
    assert sr.grad.item() == rgs.item()


@pytest.mark.parametrize("numel", [1, 4099])
def test_without_a_scale_gradient_the_backward_writes_its_zero(backend, numel, monkeypatch):
    """A backward without dL/dS (ReLU6's, a given scale's) still returns grad_scale = 0. The
    GPU kernels write that 0 themselves (no zero-fill launch), so here every 0-dim float32
    tensor torch hands out starts as NaN: a backend that left it unwritten would return NaN."""
    backend.skip_if_too_big(numel)
    real = torch.empty

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.dim() == 0 and t.dtype == torch.float32:
            t.fill_(float("nan"))
        return t

    mod = backend.module("fake_quant")
    x, s, g = _inputs(numel, backend.device)
    _, b = mod.fake_quant(x, 4, s, 1)
    _, mask = mod.relu6_fake_quant(x, 4)
    monkeypatch.setattr(torch, "empty", poisoned)
    for bitmaps in (b, mask):
        gx, gs = mod.fake_quant_backward(g, bitmaps, False)
        assert gs.dtype == torch.float32 and gs.shape == () and gs.item() == 0.0
        assert torch.equal(gx.cpu(), R.fake_quant_backward(g, bitmaps, False)[0].cpu())


@pytest.mark.parametrize("numel", [4099, (1 << 20) + 3])
def test_fused_scale_gradient_is_deterministic(backend, numel):
    """Arbitrary floats: the same bits on every call (and every block/program count the
    kernel picks for this size)."""
    backend.skip_if_too_big(numel)
    gen = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=gen) * 2).to(backend.device)
    g = torch.randn(numel, generator=gen).to(backend.device)
    mod = backend.module("fake_quant")
    _, b = mod.fake_quant(x, 4, torch.tensor(0.7, device=backend.device), 2)
    first = mod.fake_quant_backward(g, b, True)[1].item()
    for _ in range(3):
        assert mod.fake_quant_backward(g, b, True)[1].item() == first


def test_cpu_scale_gradient_is_not_held_in_float32_partial_sums(backend):
    """x all clipped high, g = 2^24 once, then ones: a float32 running sum would lose every
    1 added to 2^24 (the CPU kernel's float32 lanes are flushed to float64 every 32 words);
    the result must be the exact sum, as the reference gives it."""
    if backend.name not in ("cpu", "reference"):
        pytest.skip("the float64 reduction is the CPU kernel's (GPU kernels sum in their own order)")
    n = 2048
    g = torch.ones(n)
    g[0:1024:8] = 0.0  # the first 32 words' share of lane 0 is 2^24 alone: exact in float32
    g[0] = 2.0**24
    x = torch.full((n,), 10.0)
    mod = backend.module("fake_quant")
    _, b = mod.fake_quant(x, 4, torch.tensor(1.0), 2)
    _, gs = mod.fake_quant_backward(g, b, True)
    want = 2.0**24 + n - 128  # even, below 2^25: a float32
    assert gs.item() == want == R.fake_quant_backward(g, b, True)[1].item()


def test_triton_last_program_reduces_many_programs(backend, monkeypatch):
    """The interpreter takes small sizes only: with 64-element programs and a 4-slot finish
    step the same sizes run up to 63 programs, so the last program's loop takes several
    steps, over full and partial slot vectors; the dynamic scale's max takes the same path."""
    if not backend.interpreted:
        pytest.skip("the Triton interpreter case")
    from fedmpq_kernels import _triton_common
    mod = backend.module("fake_quant")
    monkeypatch.setattr(mod, "BLOCK", 64)
    monkeypatch.setattr(mod, "FINISH", 4)
    monkeypatch.setattr(_triton_common, "FINISH", 4)
    for numel in (64, 65, 4 * 64, 4 * 64 + 1, 4000):
        x, s, g = _inputs(numel, "cpu", seed=numel)
        _, b = mod.fake_quant(x, 4, s, 2)
        assert torch.equal(b, R.fake_quant(x, 4, s, 2)[1])
        gx, gs = mod.fake_quant_backward(g, b, True)
        assert gs.item() == exact_scale_grad(x, s, g)
        assert torch.equal(gx, R.fake_quant_backward(g, b, True)[0])
        # dynamic scale: S = max|x| from absmax's last program
        y = mod.fake_quant(x, 3, None, 0)[0]
        assert torch.equal(y, R.fake_quant(x, 3, None, 0)[0])
        x[numel // 2] = float("nan")  # the max propagates a NaN from any program
        assert torch.isnan(mod.fake_quant(x, 3, None, 0)[0]).all()


def test_triton_last_program_never_reads_a_stale_slot(backend, monkeypatch):
    """On a GPU the workspace is kept between launches and its slots hold the last launch's
    partials; the interpreter makes a fresh one per call. Here every call gets one whose
    slots are poisoned with NaN bits (the ticket zero, as the kernels leave it): the last
    program must read only slots written in the same launch, so results are unchanged."""
    if not backend.interpreted:
        pytest.skip("the Triton interpreter case")
    from fedmpq_kernels import _triton_common
    mod = backend.module("fake_quant")
    monkeypatch.setattr(mod, "BLOCK", 64)

    def poisoned(device, nprog, wide=False):
        ws = torch.full((2 * (nprog + 1) + 64,), 0x7FC00000, dtype=torch.int32, device=device)
        ws[0] = 0
        return ws

    monkeypatch.setattr(_triton_common, "reduction_workspace", poisoned)
    if hasattr(mod, "reduction_workspace"):
        monkeypatch.setattr(mod, "reduction_workspace", poisoned)
    for numel in (1, 65, 4000):
        x, s, g = _inputs(numel, "cpu", seed=numel)
        assert torch.equal(mod.fake_quant(x, 3, None, 0)[0], R.fake_quant(x, 3, None, 0)[0])
        _, b = mod.fake_quant(x, 4, s, 2)
        gx, gs = mod.fake_quant_backward(g, b, True)
        assert torch.equal(gx, R.fake_quant_backward(g, b, True)[0])
        assert gs.item() == exact_scale_grad(x, s, g)


def _gpu_calls(backend):
    """The reductions under test on one input: (a function making the calls, their eager
    results as [dynamic-scale y, grad_x, grad_scale, relu6 y, relu6 mask]; relu6_fake_quant's
    scale is the max of relu6(x), reduced as max|x| is)."""
    if backend.device != "cuda" or backend.name == "reference":
        pytest.skip("GPU kernel backends only")
    mod = backend.module("fake_quant")
    x, s, g = _inputs((1 << 20) + 3, "cuda")
    _, b = mod.fake_quant(x, 4, s, 2)

    def calls():
        return [mod.fake_quant(x, 4, None, 0)[0], *mod.fake_quant_backward(g, b, True), *mod.relu6_fake_quant(x, 4)]

    return calls, calls()


def _same(got, want, when: str) -> None:
    names = ["dynamic-scale y", "grad_x", "grad_scale", "relu6 y", "relu6 mask"]
    bad = [f"{n} (NaN: {bool(torch.isnan(a).any())}, max |diff| {float((a.float() - w.float()).abs().max())})"
           for n, a, w in zip(names, got, want) if not torch.equal(a, w)]
    assert not bad, f"{when}: differs from the eager results in " + ", ".join(bad)


def test_gpu_workspace_ticket_is_reset_and_stale_slots_are_never_read(backend):
    """The per-stream workspace's ticket (word 0) is zero between launches (each kernel's
    last block resets it); its slots may hold anything, since every block writes its slot
    before the last one reads them: slots poisoned with NaN bits change no result."""
    from fedmpq_kernels import _device
    calls, want = _gpu_calls(backend)
    torch.cuda.synchronize()
    assert _device._WORKSPACES, "the GPU reductions used no per-stream workspace"
    for key, ws in _device._WORKSPACES.items():
        assert int(ws[0]) == 0, f"workspace {key}: ticket {int(ws[0])} left after the launches"
        ws[1:] = 0x7FC00000  # float NaN bits, and above every |x| bit pattern for the max
    _same(calls(), want, "after poisoning the slots")
    torch.cuda.synchronize()
    for key, ws in _device._WORKSPACES.items():
        assert int(ws[0]) == 0, f"workspace {key}: ticket {int(ws[0])} left after the launches"


@pytest.mark.parametrize("shared", [False, True], ids=["per-call", "capture_workspace"])
def test_gpu_reductions_replay_from_a_cuda_graph(backend, shared):
    """Under CUDA-graph capture a call gets a captured workspace of its own, or, inside
    fk.capture_workspace(), every call of the capture shares one: replays give the eager
    results."""
    calls, want = _gpu_calls(backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):  # warm-up on the capture stream, as torch recommends
        calls()
    stream.synchronize()
    with torch.cuda.graph(graph, stream=stream):
        with fk.capture_workspace() if shared else contextlib.nullcontext():
            got = calls()
    for i in range(3):
        graph.replay()
        torch.cuda.synchronize()
        _same(got, want, f"replay {i + 1}")


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos", "neg"])
def test_a_scale_gradient_past_float32s_range_is_inf_not_an_error(backend, sign):
    """Two clipped-high elements whose finite gradients (3e38 each) sum past float32's range:
    dL/dS is +-inf on every backend, as the reference's float32 sum gives it (the CPU binding
    rounded its float64 sum in the caller's conversion, which raised "value cannot be
    converted to type float without overflow"); grad_x is the zeros of two clipped elements.
    An AMP-style loop skips a step on such a gradient: it must not stop training."""
    x = torch.tensor([10.0, 10.0], device=backend.device)
    g = torch.full((2,), sign * 3e38, device=backend.device)
    mod = backend.module("fake_quant")
    _, b = mod.fake_quant(x, 4, torch.tensor(1.0, device=backend.device), 2)
    gx, gs = mod.fake_quant_backward(g, b, True)
    rgs = R.fake_quant_backward(g, b, True)[1]
    assert gs.item() == rgs.item() == sign * float("inf")
    assert torch.equal(gx.cpu(), torch.zeros(2))
    with backend.active():
        xr = x.clone().requires_grad_(True)
        sr = torch.tensor(1.0, device=backend.device, requires_grad=True)
        fk.fake_quant(xr, 4, sr, ste="clipped").backward(g)
    assert sr.grad.item() == sign * float("inf")
