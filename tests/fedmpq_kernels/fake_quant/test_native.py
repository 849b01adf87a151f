"""The native boundary re-checks every size it is given: a wrong size from Python is a
ValueError, never an out-of-bounds access."""
import subprocess
import sys

import pytest
import torch

from fedmpq_kernels._native import native, native_error

pytestmark = pytest.mark.skipif(native is None, reason=f"native module not built: {native_error}")


def _args(**over):
    n = 100
    x = torch.randn(n)
    y = torch.empty(n)
    p = torch.empty(16, dtype=torch.uint8)
    a = dict(x=x.data_ptr(), n=n, y=y.data_ptr(), y_cap=n, bits=4, scale=1.0, dynamic=False,
             pass_bits=p.data_ptr(), pass_nbytes=16, hi_bits=0, hi_nbytes=0, nthreads=2)
    a.update(over)
    return a, (x, y, p)


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(y_cap=99), "buffer holds 99 elements, needs 100"),
        (dict(pass_nbytes=15), "pass bitmap has 15 bytes, needs 16"),
        (dict(n=-1, y_cap=-1), "negative element count"),
        (dict(bits=9), "bits must be in 1..8 or 16"),
        (dict(bits=0), "bits must be in 1..8 or 16"),
        (dict(x=0), "null data pointer"),
        (dict(scale=0.0), "scale must be finite and > 0"),
        (dict(scale=float("inf")), "scale must be finite and > 0"),
    ],
)
def test_forward_rejects_inconsistent_sizes(over, match):
    a, keep = _args(**over)
    with pytest.raises(ValueError, match=match):
        native.cpu.fake_quant(**a)


def test_backward_requires_the_pass_bitmap():
    g = torch.randn(40)
    gx = torch.empty(40)
    with pytest.raises(ValueError, match="pass bitmap is required"):
        native.cpu.fake_quant_backward(g.data_ptr(), 40, gx.data_ptr(), 40, 0, 0, 0, 0, 1)
    p = torch.empty(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs 8"):
        native.cpu.fake_quant_backward(g.data_ptr(), 40, gx.data_ptr(), 40, p.data_ptr(), 4, 0, 0, 1)


def test_isa_override_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown ISA"):
        native.set_cpu_isa("avx9000")


def test_threaded_and_serial_results_agree():
    x = torch.randn((1 << 20) + 5)
    outs = []
    for nt in (1, 2, 3):
        y = torch.empty_like(x)
        p = torch.empty(4 * ((x.numel() + 31) // 32), dtype=torch.uint8)
        native.cpu.fake_quant(x.data_ptr(), x.numel(), y.data_ptr(), y.numel(), 3, 0.0, True,
                              p.data_ptr(), p.numel(), 0, 0, nt)
        outs.append((y, p))
    for y, p in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(p, outs[0][1])


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_streaming_store_path_matches_reference(isa):
    """Outputs of >= 8 MiB take the non-temporal-store path (base[1:] is an input that
    is not 32-byte aligned)."""
    from fedmpq_kernels.fake_quant import cpu as C
    from fedmpq_kernels.fake_quant import reference as R

    if isa == "avx2" and not native.avx2_available():
        pytest.skip("no AVX2")
    prev = native.cpu_isa()
    native.set_cpu_isa(isa)
    try:
        base = torch.randn((8 << 20) // 4 + 77)
        for x in (base, base[1:]):
            s = torch.tensor(1.7)
            y, b = C.fake_quant(x, 5, s, 2)
            ry, rb = R.fake_quant(x, 5, s, 2)
            assert torch.equal(y, ry) and torch.equal(b, rb)
            g = torch.randn(x.numel())
            gx, gs = C.fake_quant_backward(g, b, True)
            rgx, rgs = R.fake_quant_backward(g, rb, True)
            assert torch.equal(gx, rgx)
            torch.testing.assert_close(gs, rgs, rtol=1e-5, atol=1e-2)
    finally:
        native.set_cpu_isa(prev)


def test_huge_thread_counts_are_capped():
    """libgomp exits the whole process when it cannot create the threads asked for: the
    native side caps every request at the cores available (in a subprocess, so that a
    regression fails this test instead of killing the run)."""
    code = (
        "import torch\n"
        "from fedmpq_kernels._native import native\n"
        "from fedmpq_kernels.fake_quant import reference as R\n"
        "x = torch.randn(1 << 20); y = torch.empty_like(x)\n"
        "native.cpu.fake_quant(x.data_ptr(), x.numel(), y.data_ptr(), y.numel(), 4, 0.0, True, 0, 0, 0, 0, 2**31 - 1)\n"
        "assert torch.equal(y, R.fake_quant_values(x, 4, None))\n"
        "torch.get_num_threads = lambda: 2**31 - 1  # torch itself crashes at set_num_threads(10**5)\n"
        "import fedmpq_kernels as fk\n"
        "assert torch.equal(fk.fake_quant(x, 3), R.fake_quant_values(x, 3, None))\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def _misaligned(n: int, seed: int = 0) -> torch.Tensor:
    buf = bytearray(4 * n + 4)
    t = torch.frombuffer(buf, dtype=torch.float32, offset=1, count=n)
    t.copy_(torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 2)
    assert t.data_ptr() % 4 != 0
    return t


def test_misaligned_float_pointers_are_rejected():
    x = _misaligned(100)
    y = torch.empty(100)
    with pytest.raises(ValueError, match="x: data pointer is not 4-byte aligned"):
        native.cpu.fake_quant(x.data_ptr(), 100, y.data_ptr(), 100, 4, 0.0, True, 0, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="grad_x: data pointer is not 4-byte aligned"):
        p = torch.zeros(16, dtype=torch.uint8)
        native.cpu.fake_quant_backward(y.data_ptr(), 100, x.data_ptr(), 100, p.data_ptr(), 16, 0, 0, 1)
    with pytest.raises(ValueError, match="x: data pointer is not 4-byte aligned"):
        native.cpu.absmax(x.data_ptr(), 100, 1)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_misaligned_tensors_work_through_the_op(isa):
    """The CPU adapter copies the rare misaligned float32 tensor (torch.frombuffer at an
    odd offset) instead of handing the kernels a misaligned pointer."""
    import fedmpq_kernels as fk
    from fedmpq_kernels.fake_quant import reference as R

    if isa == "avx2" and not native.avx2_available():
        pytest.skip("no AVX2")
    prev = native.cpu_isa()
    native.set_cpu_isa(isa)
    try:
        x = _misaligned(4099)
        assert torch.equal(fk.fake_quant(x, 4), R.fake_quant_values(x, 4, None))
        g = _misaligned(4099, seed=1)
        xr = x.detach().requires_grad_(True)  # still the misaligned storage
        s = torch.tensor(1.5, requires_grad=True)
        fk.fake_quant(xr, 4, s, ste="clipped").backward(g)
        xo = x.clone().requires_grad_(True)
        so = torch.tensor(1.5, requires_grad=True)
        R.fake_quant_autograd(xo, 4, so, "clipped").backward(g.clone())
        assert torch.equal(xr.grad, xo.grad)
        # a sum of +-g over the clipped elements: the kernel adds in float64, the autograd
        # oracle in float32, so compare against the size of what cancels
        assert abs(float(s.grad - so.grad)) <= 1e-6 * float(g.abs().sum())
    finally:
        native.set_cpu_isa(prev)


@pytest.mark.parametrize("n", [2**63 - 1, 2**62, (1 << 56) + 1])
def test_element_counts_are_bounded_before_any_size_arithmetic(n):
    """n + 31 and 4 * n overflow near 2^63: a count past the bound is rejected first, so a
    small bitmap can never pass a wrapped-around size check."""
    x = torch.randn(64)
    p = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="any kernel accepts"):
        native.cpu.fake_quant(x.data_ptr(), n, x.data_ptr(), n, 4, 0.0, True, p.data_ptr(), 8, 0, 0, 1)
    with pytest.raises(ValueError, match="any kernel accepts"):
        native.cpu.fake_quant_backward(x.data_ptr(), n, x.data_ptr(), n, p.data_ptr(), 8, 0, 0, 1)
    with pytest.raises(ValueError, match="any kernel accepts"):
        native.cpu.absmax(x.data_ptr(), n, 1)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
@pytest.mark.parametrize("n", [5, 1000, (1 << 16) + 7])
def test_backward_in_place_gives_the_same_result(isa, n):
    """grad_x may be grad itself: each element is read before it is written, so the scale
    gradient is the same as out of place. A partial overlap is rejected."""
    if isa == "avx2" and not native.avx2_available():
        pytest.skip("no AVX2")
    prev = native.cpu_isa()
    native.set_cpu_isa(isa)
    try:
        x = torch.randn(n) * 2
        y = torch.empty(n)
        nb = 4 * ((n + 31) // 32)
        p = torch.empty(nb, dtype=torch.uint8)
        h = torch.empty(nb, dtype=torch.uint8)
        native.cpu.fake_quant(x.data_ptr(), n, y.data_ptr(), n, 3, 1.0, False, p.data_ptr(), nb, h.data_ptr(), nb, 2)
        g = torch.randn(n)
        gx = torch.empty(n)
        out_of_place = native.cpu.fake_quant_backward(g.data_ptr(), n, gx.data_ptr(), n, p.data_ptr(), nb, h.data_ptr(), nb, 2)
        gi = g.clone()
        in_place = native.cpu.fake_quant_backward(gi.data_ptr(), n, gi.data_ptr(), n, p.data_ptr(), nb, h.data_ptr(), nb, 2)
        assert in_place == out_of_place and torch.equal(gi, gx)
        big = torch.randn(n + 1)
        with pytest.raises(ValueError, match="overlap without being the same buffer"):
            native.cpu.fake_quant_backward(big.data_ptr(), n, big[1:].data_ptr(), n, p.data_ptr(), nb, 0, 0, 1)
        with pytest.raises(ValueError, match="overlap without being the same buffer"):
            native.cpu.fake_quant(big[1:].data_ptr(), n, big.data_ptr(), n, 3, 1.0, False, 0, 0, 0, 0, 1)
    finally:
        native.set_cpu_isa(prev)
