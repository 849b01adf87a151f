"""relu6_fake_quant (ReLU6 fused with the dynamic-scale activation quantizer) on every
backend against the reference, bit for bit: every bit-width, float32/16/bf16, odd and empty
sizes, strided inputs, contiguous slices at every offset (the CUDA kernels' shifted loads),
GPU sizes of several grid-stride trips, NaN, all-non-positive inputs, the mask and the
gradient through the public function, opcheck, the errors, the CPU kernel's threading and
streaming paths and both native bindings' refusals. The CUDA C++ kernel's cases (backend
``cuda``) skip without a GPU; tools/gpu_check.sh runs them."""
from __future__ import annotations

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels import registry
from fedmpq_kernels._native import native
from fedmpq_kernels.fake_quant import reference as R

from .helpers import GPU_SIZES, SLICE_SIZES, slice_offsets

BITS = [1, 2, 3, 4, 5, 6, 7, 8, 16]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 31, 33, 1000, 4097, 300_001]
SLICE_SIZES = [1, 33] + SLICE_SIZES  # whole 16-byte-vector tiles and odd tails


def inputs(n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + n)
    x = torch.randn(n, generator=g) * 4 + 1
    specials = torch.tensor([0.0, -0.0, 6.0, -6.0, 5.9999995, 6.0000005, 1e-30, -1e-30, 100.0, 3.0])
    k = min(n, specials.numel())
    x[:k] = specials[:k]
    return x.to(dtype)


def kernel(backend):
    """The backend's relu6_fake_quant (skips a backend without one: the registry would fall
    back to another, tested in its own case)."""
    return backend.op("fake_quant", "relu6_fake_quant")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN == NaN, -0 != +0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    view = torch.int16 if a.dtype in (torch.float16, torch.bfloat16) else torch.int32
    return torch.equal(a.view(view), b.view(view))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("numel", SIZES)
def test_matches_reference(backend, numel, bits, dtype):
    fn = kernel(backend)
    backend.skip_if_too_big(numel)
    if numel == SIZES[-1] and (dtype != torch.float32 or bits not in (1, 4, 8, 16)):
        pytest.skip("the large size: float32 and a few bit-widths only")
    x = inputs(numel, dtype)
    want_y, want_mask = R.relu6_fake_quant(x, bits)
    with backend.active():
        y = fk.relu6_fake_quant(x.to(backend.device), bits)
        y2, mask = torch.ops.fedmpq.relu6_fake_quant(x.to(backend.device), bits)
        y3, mask3 = fn(x.to(backend.device), bits)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert same(y, want_y) and same(y2, want_y) and same(y3, want_y)
    assert torch.equal(mask3.cpu(), want_mask)
    assert mask.dtype == torch.uint8 and mask.shape == (fk.bitmap_nbytes(numel),)
    assert torch.equal(mask.cpu(), want_mask)


def test_reference_hand_computed():
    # a = clamp(x, 0, 6) = 0, 0, 1, 2.5, 3, 6, 6; S = 6, L = 3: inv = 0.5, step = 2;
    # a * inv = 0, 0, 0.5, 1.25, 1.5, 3, 3 -> half to even 0, 0, 0, 1, 2, 3, 3 -> times 2.
    x = torch.tensor([-1.0, 0.0, 1.0, 2.5, 3.0, 7.0, 6.0])
    y, mask = R.relu6_fake_quant(x, 2)
    assert y.tolist() == [0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 6.0]
    assert mask.tolist() == [0b0011100, 0, 0, 0]  # 0 < x < 6: 1, 2.5, 3


def test_nan_propagates(backend):
    kernel(backend)
    x = inputs(1000)
    x[500] = float("nan")
    want_y, want_mask = R.relu6_fake_quant(x, 4)
    with backend.active():
        y, mask = torch.ops.fedmpq.relu6_fake_quant(x.to(backend.device), 4)
        y_pub = fk.relu6_fake_quant(x.to(backend.device), 4)
    assert torch.isnan(y).all() and torch.isnan(y_pub).all() and torch.isnan(want_y).all()
    assert torch.equal(mask.cpu(), want_mask)
    assert not (mask.cpu()[500 // 8] >> (500 % 8)) & 1  # NaN is not in (0, 6)


def test_infinities_clip_to_six_and_zero(backend):
    """+inf is ReLU6's 6 (S stays 6, not inf), -inf its 0; neither is in the mask. 72
    elements: whole 32-element words and a scalar tail. S = 6, L = 3: 3 -> 1.5 -> 2 -> 4,
    1 -> 0.5 -> 0 (half to even)."""
    kernel(backend)
    x = torch.tensor([float("inf"), float("-inf"), 3.0, 1.0] * 18)
    want_y, want_mask = R.relu6_fake_quant(x, 2)
    assert want_y.tolist() == [6.0, 0.0, 4.0, 0.0] * 18
    with backend.active():
        y, mask = torch.ops.fedmpq.relu6_fake_quant(x.to(backend.device), 2)
    assert same(y, want_y) and torch.equal(mask.cpu(), want_mask)
    assert mask.cpu().tolist() == [0xCC] * 9 + [0] * 3


def test_a_scale_below_six_is_found_at_every_position(backend):
    """S = max relu6(x) when no x reaches 6 (the other tests' inputs hold a 6, so their S is
    6 whatever the reduction does): the maximum at each of the 32 positions of a whole word
    (every lane of a vector reduction) and at the end of the tail."""
    kernel(backend)
    base = torch.linspace(-2.0, 2.0, 77)
    with backend.active():
        for j in list(range(32, 64)) + [76]:
            x = base.clone()
            x[j] = 3.5
            want_y, want_mask = R.relu6_fake_quant(x, 3)
            y, mask = torch.ops.fedmpq.relu6_fake_quant(x.to(backend.device), 3)
            assert same(y, want_y) and torch.equal(mask.cpu(), want_mask), f"max at {j}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_positive_input_gives_zeros(backend, dtype):
    kernel(backend)
    x = -torch.rand(77).to(dtype)
    x[3] = 0.0
    x[4] = -0.0
    with backend.active():
        y, mask = torch.ops.fedmpq.relu6_fake_quant(x.to(backend.device), 5)
    assert same(y, torch.zeros(77, dtype=dtype))  # +0 everywhere (S = 0)
    assert int(mask.count_nonzero()) == 0


@pytest.mark.parametrize("bits", range(1, 9))
def test_empty_and_strided(backend, bits):
    """An empty input, and a transposed (strided) one at every width 1..8."""
    kernel(backend)
    dev = backend.device
    with backend.active():
        e = fk.relu6_fake_quant(torch.empty(0, 5, device=dev), bits)
        assert e.shape == (0, 5)
        x = (torch.randn(33, 70, generator=torch.Generator().manual_seed(1)) * 4).to(dev)
        xt = x.t()
        assert not xt.is_contiguous()
        y, mask = torch.ops.fedmpq.relu6_fake_quant(xt, bits)
    want_y, want_mask = R.relu6_fake_quant(xt.cpu(), bits)
    assert y.shape == (70, 33) and y.is_contiguous()
    assert same(y, want_y) and torch.equal(mask.cpu(), want_mask)



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_values_form_without_a_mask(backend, dtype):
    """A backend's ``relu6_fake_quant_values`` (y alone, no mask written: the public function
    without gradient takes it) against the reference, bit for bit: every width, odd and empty
    sizes, a strided input, a 2-D shape."""
    fn = getattr(backend.module("fake_quant"), "relu6_fake_quant_values", None)
    if fn is None:
        pytest.skip(f"{backend.name} has no values form")
    dev = backend.device
    with backend.active():
        for numel in SIZES[:-1]:
            x = inputs(numel, dtype, seed=4)
            for bits in BITS:
                y = fn(x.to(dev), bits)
                assert y.dtype == dtype and y.shape == x.shape and same(y, R.relu6_fake_quant(x, bits)[0]), (numel, bits)
                assert same(fk.relu6_fake_quant(x.to(dev), bits), y)
        x = inputs(2 * 301, dtype, seed=6).view(301, 2)
        for bits in range(1, 9):  # the strided input at every width
            assert same(fn(x.to(dev).t(), bits), R.relu6_fake_quant(x.t(), bits)[0]), bits

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_is_relu6_mask(backend, dtype):
    kernel(backend)
    dev = backend.device
    x0 = inputs(1000, dtype, seed=2)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(3)).to(dtype)
    want = torch.where((x0 > 0) & (x0 < 6), g, torch.zeros_like(g))
    with backend.active():
        for via_op in (False, True):
            x = x0.clone().to(dev).requires_grad_(True)
            y = torch.ops.fedmpq.relu6_fake_quant(x, 4)[0] if via_op else fk.relu6_fake_quant(x, 4)
            y.backward(g.to(dev))
            assert x.grad.dtype == dtype
            assert same(x.grad, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SLICE_SIZES + GPU_SIZES)
def test_contiguous_slices_at_every_offset(backend, numel, dtype):
    """x[k:] of a contiguous tensor, k below one 16-byte vector: on CUDA the shifted-load
    path of both kernels (the max of relu6(x) and the quantizer); the backend's own function
    and the public op against the reference, bit for bit."""
    fn = kernel(backend)
    vec, offsets = slice_offsets(backend, numel, dtype)
    base = inputs(numel + vec, dtype, seed=5).to(backend.device)
    with backend.active():
        for off in offsets:
            x = base[off:off + numel]
            assert x.is_contiguous() and x.storage_offset() == off
            want_y, want_mask = R.relu6_fake_quant(x.cpu(), 4)
            y, mask = fn(x, 4)
            assert same(y, want_y) and torch.equal(mask.cpu(), want_mask), f"offset {off}"
            assert same(fk.relu6_fake_quant(x, 8), R.relu6_fake_quant(x.cpu(), 8)[0]), f"offset {off}"


@pytest.mark.gpu
def test_cuda_backend_runs_its_own_kernel():
    """On a GPU the default order gives relu6_fake_quant to the CUDA C++ backend's own
    function (no fallback to Triton); the cuda backend module defines it everywhere."""
    mod = registry.module("fake_quant", "cuda")
    assert callable(getattr(mod, "relu6_fake_quant", None))
    if not registry.available("cuda")[0]:
        pytest.skip(f"cuda backend unavailable here: {registry.available('cuda')[1]}")
    assert registry.backend_for("cuda", "fake_quant") == "cuda"
    assert registry.get("fake_quant", "relu6_fake_quant", "cuda") is mod.relu6_fake_quant


def test_opcheck(backend):
    kernel(backend)
    x = (torch.randn(3, 37) * 4).to(backend.device)
    with backend.active():
        torch.library.opcheck(torch.ops.fedmpq.relu6_fake_quant.default, (x.requires_grad_(True), 4))
        torch.library.opcheck(torch.ops.fedmpq.relu6_fake_quant.default, (x.detach(), 16))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: fk.relu6_fake_quant(torch.randn(5), 0), ValueError, "bits must be one of 1..8 or 16"),
        (lambda: fk.relu6_fake_quant(torch.randn(5), 9), ValueError, "bits must be one of 1..8 or 16"),
        (lambda: fk.relu6_fake_quant(torch.randn(5), 2.5), TypeError, "bits must be an int"),
        (lambda: fk.relu6_fake_quant(torch.arange(5), 4), TypeError, "x must be float32, float16 or bfloat16"),
        (lambda: fk.relu6_fake_quant(torch.randn(5, dtype=torch.float64), 4), TypeError, "x must be float32"),
        (lambda: fk.relu6_fake_quant([1.0], 4), TypeError, "must be a torch.Tensor"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- the native kernel ------------------------------------------------------------------
needs_native = pytest.mark.skipif(native is None, reason="native module not built")


@needs_native
def test_native_rejects_inconsistent_sizes():
    x, y, m = torch.randn(100), torch.empty(100), torch.empty(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="buffer holds 99 elements, needs 100"):
        native.cpu.relu6_fake_quant(x.data_ptr(), 100, y.data_ptr(), 99, 4, m.data_ptr(), 16, 1)
    with pytest.raises(ValueError, match="mask bitmap has 12 bytes, needs 16"):
        native.cpu.relu6_fake_quant(x.data_ptr(), 100, y.data_ptr(), 100, 4, m.data_ptr(), 12, 1)
    with pytest.raises(ValueError, match="bits must be in 1..8 or 16"):
        native.cpu.relu6_fake_quant(x.data_ptr(), 100, y.data_ptr(), 100, 9, m.data_ptr(), 16, 1)
    with pytest.raises(ValueError, match="overlap"):
        native.cpu.relu6_fake_quant(x.data_ptr(), 50, x.data_ptr() + 8, 50, 4, m.data_ptr(), 16, 1)


@needs_native
@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_native_threads_in_place_and_streaming(isa):
    """Serial, threaded and in-place runs agree with the reference; 2^21 + 5 floats (8 MiB)
    take the non-temporal-store path, a misaligned output the plain one."""
    if isa == "avx2" and not native.avx2_available():
        pytest.skip("no AVX2")
    prev = native.cpu_isa()
    native.set_cpu_isa(isa)
    try:
        n = (1 << 21) + 5
        x = torch.randn(n, generator=torch.Generator().manual_seed(4)) * 5
        want_y, want_mask = R.relu6_fake_quant(x, 4)
        for nt in (1, 2, 3):
            y = torch.empty(n + 8)[8:]  # 32-byte aligned
            m = torch.empty(fk.bitmap_nbytes(n), dtype=torch.uint8)
            s = native.cpu.relu6_fake_quant(x.data_ptr(), n, y.data_ptr(), n, 4, m.data_ptr(), m.numel(), nt)
            assert s == 6.0
            assert same(y, want_y) and torch.equal(m, want_mask)
        base = torch.empty(n + 1)
        y = base[1:]  # 4 bytes past alignment
        native.cpu.relu6_fake_quant(x.data_ptr(), n, y.data_ptr(), n, 4, 0, 0, 2)  # no mask
        assert same(y, want_y)
        xi = x.clone()
        native.cpu.relu6_fake_quant(xi.data_ptr(), n, xi.data_ptr(), n, 4, 0, 0, 2)  # in place
        assert same(xi, want_y)
    finally:
        native.set_cpu_isa(prev)


# ---- the CUDA binding: its refusals need no GPU (device -1: a call that passed every check
# would fail on that device in the workspace check, never launch) --------------------------
needs_cuda_build = pytest.mark.skipif(native is None or not getattr(native, "with_cuda", False),
                                      reason="native module not built with CUDA")
_P = 1 << 20  # fake device addresses: never dereferenced (every call below is refused first)


def _cuda_r6_args(**over):
    a = dict(x=_P, y=2 * _P, dtype=0, n=100, y_cap=100, bits=4, scale=3 * _P, mask=4 * _P, mask_nbytes=16,
             workspace=5 * _P, workspace_words=1 << 20, device=-1, stream=0)
    a.update(over)
    return a


@needs_cuda_build
@pytest.mark.parametrize(
    "over, match",
    [
        (dict(y_cap=99), "y: buffer holds 99 elements, needs 100"),
        (dict(n=-1, y_cap=-1), "negative element count"),
        (dict(x=0), "x: null data pointer"),
        (dict(dtype=1, x=_P + 1), "x: data pointer is not 2-byte aligned"),
        (dict(dtype=0, y=2 * _P + 2), "y: data pointer is not 4-byte aligned"),
        (dict(dtype=3), "unknown dtype code 3"),
        (dict(y=_P + 8), "overlap"),
        (dict(bits=9), "bits must be in 1..8 or 16"),
        (dict(bits=0), "bits must be in 1..8 or 16"),
        (dict(scale=0), "scale pointer is null or not 4-byte aligned"),
        (dict(scale=3 * _P + 2), "scale pointer is null or not 4-byte aligned"),
        (dict(mask_nbytes=12), "mask bitmap has 12 bytes, needs 16"),
        (dict(mask=4 * _P + 2), "mask bitmap must be 4-byte aligned"),
        (dict(workspace=0), "reduction workspace pointer is null"),
        (dict(n=(1 << 56) + 1, y_cap=(1 << 56) + 1), "more than the"),
    ],
)
def test_cuda_binding_rejects_inconsistent_sizes(over, match):
    with pytest.raises(ValueError, match=match):
        native.cuda.relu6_fake_quant(**_cuda_r6_args(**over))


@needs_cuda_build
def test_cuda_binding_launches_nothing_for_no_elements():
    # n = 0: no workspace or device needed, nothing launched (no GPU touched).
    assert native.cuda.relu6_fake_quant(**_cuda_r6_args(n=0, y_cap=0, mask=0, mask_nbytes=0, workspace=0,
                                                          workspace_words=0)) is None


@needs_cuda_build
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_binding_rejects_a_short_workspace_and_a_device_not_current():
    """The workspace's length is checked against the device's; a device that is not the
    current one is refused (the launchers never switch devices). The second part needs two
    GPUs: the workspace check asks the CUDA runtime about the device first."""
    dev = torch.cuda.current_device()
    with pytest.raises(ValueError, match="reduction workspace is too small"):
        native.cuda.relu6_fake_quant(**_cuda_r6_args(device=dev, workspace_words=1))
    if torch.cuda.device_count() < 2:
        return
    other = (dev + 1) % torch.cuda.device_count()
    x = torch.randn(64, device="cuda")
    y, s = torch.empty_like(x), torch.empty((), device="cuda")
    m = torch.empty(8, dtype=torch.uint8, device="cuda")
    words = max(native.cuda.workspace_words(dev), native.cuda.workspace_words(other))
    ws = torch.zeros(words, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=f"current CUDA device is .* but the tensors are on cuda:{other}"):
        native.cuda.relu6_fake_quant(x.data_ptr(), y.data_ptr(), 0, 64, 64, 4, s.data_ptr(), m.data_ptr(), 8,
                                     ws.data_ptr(), words, other, torch.cuda.current_stream().cuda_stream)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["transposed", "step3", "expanded", "contiguous"])
@pytest.mark.parametrize("bits", BITS)
def test_views_and_sizes_across_program_blocks(backend, kind, bits, dtype):
    """A transposed matrix, a slice with step 3, an expanded column (stride 0), each one
    element or more past the Triton kernels' 4096-element program, and contiguous 8199 (two
    whole programs and a tail; sizes the interpreter runs in about a second): y and the mask
    bit for bit, and the gradient through the public op, against the reference."""
    kernel(backend)
    dev = backend.device
    g = torch.Generator().manual_seed(len(kind))
    if kind == "transposed":
        x0 = (torch.randn(33, 125, generator=g) * 4 + 1).t()
    elif kind == "step3":
        x0 = (torch.randn(3 * 4097, generator=g) * 4 + 1)[::3]
    elif kind == "expanded":
        x0 = (torch.randn(33, 1, generator=g) * 4 + 1).expand(33, 125)
    else:
        x0 = torch.randn(8199, generator=g) * 4 + 1
    x0 = x0.to(dtype)
    gy = torch.randn(x0.shape, generator=g).to(dtype)
    want_y, want_mask = R.relu6_fake_quant(x0, bits)
    with backend.active():
        y, mask = torch.ops.fedmpq.relu6_fake_quant(x0.to(dev), bits)
        x = x0.to(dev).requires_grad_(True)
        y2 = fk.relu6_fake_quant(x, bits)
        y2.backward(gy.to(dev))
    assert same(y, want_y) and same(y2.detach(), want_y) and torch.equal(mask.cpu(), want_mask)
    assert same(x.grad, torch.where((x0 > 0) & (x0 < 6), gy, torch.zeros_like(gy)))
