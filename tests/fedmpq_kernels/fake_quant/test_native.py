"""The native boundary re-checks every size it is given: a wrong size from Python is a
ValueError, never an out-of-bounds access."""
import os
import subprocess
import sys

import pytest
import torch

from fedmpq_kernels._native import native, native_error
from tests.fedmpq_kernels.misaligned import misaligned

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
        (dict(bits=17), "bits must be in 1..8 or 16, got 17"),  # 16 is the one width above 8
        (dict(x=0), "null data pointer"),
        (dict(scale=0.0), "scale must be finite and > 0"),
        (dict(scale=float("inf")), "scale must be finite and > 0"),
        (dict(scale=3.5e38), "scale must be finite and > 0"),  # finite as a double, inf as the kernels' float32
        (dict(scale=1e-50), "scale must be finite and > 0"),  # > 0 as a double, 0 as the kernels' float32
        (dict(scale=2.0**-150), "scale must be finite and > 0"),  # half the least float32: rounds to 0 (even)
    ],
)
def test_forward_rejects_inconsistent_sizes(over, match):
    a, keep = _args(**over)
    with pytest.raises(ValueError, match=match):
        native.cpu.fake_quant(**a)


def test_the_least_float32_scale_is_accepted():
    """2^-149 (the least float32, and any double that rounds to it) is a scale > 0: run with
    the reference's result (finite: the grid is taken on S * 2^100), not refused."""
    from fedmpq_kernels.fake_quant import reference as R

    for scale in (2.0**-149, 0.75 * 2.0**-149):
        a, (x, y, p) = _args(scale=scale, nthreads=1)
        assert native.cpu.fake_quant(**a) == 2.0**-149
        want = R.fake_quant_values(x, 4, torch.tensor(2.0**-149))
        assert torch.isfinite(want).all() and torch.equal(y.view(torch.int32), want.view(torch.int32))


def test_backward_requires_the_pass_bitmap():
    g = torch.randn(40)
    gx = torch.empty(40)
    with pytest.raises(ValueError, match="pass bitmap is required"):
        native.cpu.fake_quant_backward(g.data_ptr(), 40, gx.data_ptr(), 40, 0, 0, 0, 0, 1)
    p = torch.empty(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs 8"):
        native.cpu.fake_quant_backward(g.data_ptr(), 40, gx.data_ptr(), 40, p.data_ptr(), 4, 0, 0, 1)


@pytest.mark.parametrize("hi_nbytes, offset, match", [(15, 0, "hi bitmap has 15 bytes, needs 16"),
                                                        (16, 2, "hi bitmap must be 4-byte aligned")])
def test_the_hi_bitmap_is_checked_like_the_pass_bitmap(hi_nbytes, offset, match):
    """The optional hi bitmap (written by the forward, read by the backward) is re-checked
    like pass: one byte short of the 16 that 100 elements need, or 2 bytes off its 4-byte
    alignment, is refused by both, with y and grad_x left as they were (the buffer is 20
    bytes, so a kernel that ran anyway would stay inside it)."""
    n = 100
    x, g = torch.randn(n), torch.randn(n)
    p = torch.zeros(16, dtype=torch.uint8)
    h = torch.zeros(20, dtype=torch.uint8)
    y, gx = torch.zeros(n), torch.zeros(n)
    with pytest.raises(ValueError, match=match):
        native.cpu.fake_quant(x.data_ptr(), n, y.data_ptr(), n, 4, 1.0, False, p.data_ptr(), 16,
                              h.data_ptr() + offset, hi_nbytes, 1)
    with pytest.raises(ValueError, match=match):
        native.cpu.fake_quant_backward(g.data_ptr(), n, gx.data_ptr(), n, p.data_ptr(), 16,
                                       h.data_ptr() + offset, hi_nbytes, 1)
    assert not y.any() and not gx.any() and not h.any()


def test_isa_override_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown ISA 'avx9000' \\(expected 'portable', 'avx2' or 'gfni'\\)"):
        native.set_cpu_isa("avx9000")


def test_isa_levels_are_ordered():
    """Each level is refused exactly where the CPU lacks it (the default is the best: above)."""
    prev = native.cpu_isa()
    try:
        for isa, ok in (("portable", True), ("avx2", native.avx2_available()), ("gfni", native.gfni_available())):
            if ok:
                native.set_cpu_isa(isa)
                assert native.cpu_isa() == isa
            else:
                with pytest.raises(ValueError, match="not available on this CPU"):
                    native.set_cpu_isa(isa)
        assert not native.gfni_available() or native.avx2_available()  # GFNI only with AVX2
    finally:
        native.set_cpu_isa(prev)


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


def test_streamed_outputs_16_bytes_past_a_32_byte_boundary():
    """Outputs of >= 8 MiB take non-temporal 32-byte stores, which fault on an address that
    is not 32-byte aligned; the kernels stream only to an aligned output. Here every output
    starts 16 bytes past a 32-byte boundary (aligned for 16-byte vectors, not for these):
    forward, ReLU6 and backward give the reference's results (a kernel that streamed there
    would crash the process)."""
    from fedmpq_kernels.fake_quant import reference as R

    if not native.avx2_available():
        pytest.skip("no AVX2: no streaming stores")
    prev = native.cpu_isa()
    native.set_cpu_isa("avx2")
    try:
        n = (8 << 20) // 4 + 77
        x = torch.randn(n, generator=torch.Generator().manual_seed(2)) * 2
        g = torch.randn(n, generator=torch.Generator().manual_seed(3))
        buf = torch.empty(n + 8)
        out = buf[4:4 + n]  # torch's CPU allocations are 64-byte aligned
        assert out.data_ptr() % 32 == 16
        ry, rb = R.fake_quant(x, 4, torch.tensor(1.5), 2)
        b = torch.empty_like(rb)
        nb = b.numel() // 2
        native.cpu.fake_quant(x.data_ptr(), n, out.data_ptr(), n, 4, 1.5, False, b.data_ptr(), nb,
                              b.data_ptr() + nb, nb, 1)
        assert torch.equal(out, ry) and torch.equal(b, rb)
        native.cpu.fake_quant_backward(g.data_ptr(), n, out.data_ptr(), n, b.data_ptr(), nb, 0, 0, 1)
        assert torch.equal(out, R.fake_quant_backward(g, rb, False)[0])
        native.cpu.relu6_fake_quant(x.data_ptr(), n, out.data_ptr(), n, 4, 0, 0, 1)
        assert torch.equal(out, R.relu6_fake_quant(x, 4)[0])
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
        "t = native.threading()\n"
        "assert t['workers'] < t['max_threads'], t  # the caller and at most max_threads - 1 workers\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def _misaligned(n: int, seed: int = 0) -> torch.Tensor:
    return misaligned(torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 2)


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


def test_the_isa_can_be_forced_from_the_environment():
    """FEDMPQ_CPU_ISA=portable or avx2 (read when the module loads) caps the kernels at that
    level; any other value leaves the best one. The module is loaded by path in a fresh
    interpreter (it does not link torch: no torch import, well under a second)."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('fedmpq_kernels._C', {native.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.cpu_isa())\n"
    )
    avx2 = "avx2" if native.avx2_available() else "portable"
    best = "gfni" if native.gfni_available() else avx2
    for value, want in (("portable", "portable"), ("avx2", avx2), ("gfni", best), ("", best)):
        env = dict(os.environ, FEDMPQ_CPU_ISA=value)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0 and r.stdout.strip() == want, (value, r.stdout, r.stderr[-2000:])


def test_input_and_output_back_to_back_are_not_an_overlap():
    """y starting where x ends (or x where y ends) shares no element with it: accepted, with
    the reference's result; one element less apart is the partial overlap that is refused."""
    from fedmpq_kernels.fake_quant import reference as R

    n = 100
    src = torch.randn(n, generator=torch.Generator().manual_seed(3)) * 2
    want = R.fake_quant_values(src, 4, torch.tensor(1.0))
    for x_first in (True, False):
        buf = torch.empty(2 * n + 1)
        x, y = (buf[:n], buf[n:2 * n]) if x_first else (buf[n:2 * n], buf[:n])
        x.copy_(src)
        native.cpu.fake_quant(x.data_ptr(), n, y.data_ptr(), n, 4, 1.0, False, 0, 0, 0, 0, 1)
        assert torch.equal(y, want), f"x first: {x_first}"
        x2, y2 = (buf[:n], buf[n - 1:2 * n - 1]) if x_first else (buf[n - 1:2 * n - 1], buf[:n])
        with pytest.raises(ValueError, match="overlap without being the same buffer"):
            native.cpu.fake_quant(x2.data_ptr(), n, y2.data_ptr(), n, 4, 1.0, False, 0, 0, 0, 0, 1)


def test_bitmaps_overlapping_the_floats_are_refused():
    """The bitmaps are written with y (forward) or read while grad_x is written (backward): one
    that shares bytes with x, y or grad_x, or pass and hi sharing theirs, would make the kernel
    read what it already wrote (a y, bitmap or grad_x other than the reference's, no error).
    Each is refused, with every output left as it was."""
    n, nb = 100, 16
    x, g = torch.randn(n), torch.randn(n)
    y = torch.zeros(n)
    b = torch.zeros(2 * nb, dtype=torch.uint8)
    p, h = b.data_ptr(), b.data_ptr() + nb
    xp, yp, gp = x.data_ptr(), y.data_ptr(), g.data_ptr()
    fwd = dict(x=xp, n=n, y=yp, y_cap=n, bits=4, scale=1.0, dynamic=False, pass_bits=p, pass_nbytes=nb,
               hi_bits=h, hi_nbytes=nb, nthreads=1)
    for over, match in [(dict(pass_bits=yp + 4 * 96), "pass and y overlap"), (dict(hi_bits=yp), "hi and y overlap"),
                        (dict(pass_bits=xp), "pass and x overlap"), (dict(hi_bits=xp + 4 * 90), "hi and x overlap"),
                        (dict(hi_bits=p), "pass and hi overlap"), (dict(hi_bits=p + 4), "pass and hi overlap")]:
        with pytest.raises(ValueError, match=match):
            native.cpu.fake_quant(**{**fwd, **over})
        with pytest.raises(ValueError, match=match):
            native.cpu.fake_quant(**{**fwd, **over, "dynamic": True})
    for mask, match in [(yp, "mask and y overlap"), (xp + 4 * 97, "mask and x overlap")]:
        with pytest.raises(ValueError, match=match):
            native.cpu.relu6_fake_quant(xp, n, yp, n, 4, mask, nb, 1)
    buf = torch.zeros(n)
    for args, match in [((buf.data_ptr(), nb, 0, 0), "pass and grad_x overlap"),
                        ((p, nb, buf.data_ptr() + 4 * 96, nb), "hi and grad_x overlap")]:
        with pytest.raises(ValueError, match=match):
            native.cpu.fake_quant_backward(gp, n, buf.data_ptr(), n, *args, 1)
    assert not y.any() and not b.any() and not buf.any()
    # x and y in place, the bitmaps apart (and back to back): accepted
    native.cpu.fake_quant(xp, n, xp, n, 4, 1.0, False, p, nb, h, nb, 1)
    native.cpu.fake_quant_backward(gp, n, gp, n, p, nb, h, nb, 1)


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_the_kept_forms_match_the_tensor_forms(isa):
    """fake_quant_kept, relu6_fake_quant_kept and fake_quant_backward_kept (the eager autograd
    path's forms, their bitmaps in a bytearray the binding makes uninitialized) give the
    tensor forms' y, bitmaps to the byte (the bits past n zero), grad_x and dL/dS, on sizes
    around a word's 32 elements and at every width."""
    if isa == "avx2" and not native.avx2_available():
        pytest.skip("no AVX2 on this CPU")
    prev = native.cpu_isa()
    native.set_cpu_isa(isa)
    try:
        gen = torch.Generator().manual_seed(11)
        for n in (0, 1, 31, 32, 33, 100, 1000):
            x, g = torch.randn(n, generator=gen) * 2, torch.randn(n, generator=gen)
            nb = 4 * ((n + 31) // 32)
            for bits in (1, 2, 3, 4, 5, 6, 7, 8, 16):
                for maps in (1, 2):
                    y, y2, gx, gx2 = torch.empty(n), torch.empty(n), torch.empty(n), torch.empty(n)
                    b = torch.empty(2 * nb, dtype=torch.uint8)
                    p = b.data_ptr()
                    native.cpu.fake_quant(x.data_ptr(), n, y.data_ptr(), n, bits, 1.1, False, p, nb,
                                          p + nb if maps == 2 else 0, nb if maps == 2 else 0, 2)
                    kept = native.cpu.fake_quant_kept(x.data_ptr(), n, y2.data_ptr(), n, bits, 1.1, maps, 2)
                    assert type(kept) is bytearray and bytes(kept) == bytes(b[:nb * maps].tolist()), (n, bits, maps)
                    assert torch.equal(y2, y)
                    want = native.cpu.fake_quant_backward(g.data_ptr(), n, gx.data_ptr(), n, p if n else 0, nb,
                                                          p + nb if maps == 2 and n else 0, nb if maps == 2 else 0, 2)
                    got = native.cpu.fake_quant_backward_kept(g.data_ptr(), n, gx2.data_ptr(), n, kept, maps == 2, 2)
                    assert got == want and torch.equal(gx2, gx), (n, bits, maps)
                y, y2 = torch.empty(n), torch.empty(n)
                m = torch.empty(nb, dtype=torch.uint8)
                native.cpu.relu6_fake_quant(x.data_ptr(), n, y.data_ptr(), n, bits, m.data_ptr(), nb, 2)
                kept = native.cpu.relu6_fake_quant_kept(x.data_ptr(), n, y2.data_ptr(), n, bits, 2)
                assert bytes(kept) == bytes(m.tolist()) and torch.equal(y2, y), (n, bits)
    finally:
        native.set_cpu_isa(prev)


def test_the_kept_forms_check_what_they_are_given():
    """Each kept form re-checks its sizes as the tensor forms do, and the backward its
    bytearray: another type is a TypeError; one too short for the elements and bitmaps
    asked for, or one whose memory grad_x shares (torch.frombuffer), a ValueError; with
    grad_x left as it was."""
    n = 100
    x, g = torch.randn(n), torch.randn(n)
    y, gx = torch.zeros(n), torch.zeros(n)
    fwd = native.cpu.fake_quant_kept
    for over, match in [(dict(maps=0), "maps must be 1 .* got 0"), (dict(maps=3), "maps must be 1 .* got 3"),
                        (dict(scale=0.0), "scale must be finite and > 0"), (dict(scale=1e-50), "scale must be"),
                        (dict(bits=9), "bits must be in 1..8 or 16"), (dict(y_cap=99), "holds 99 elements"),
                        (dict(n=-1, y_cap=-1), "negative element count"), (dict(x=0), "null data pointer")]:
        a = dict(x=x.data_ptr(), n=n, y=y.data_ptr(), y_cap=n, bits=4, scale=1.0, maps=2, nthreads=1)
        with pytest.raises(ValueError, match=match):
            fwd(**{**a, **over})
    with pytest.raises(ValueError, match="holds 99 elements"):
        native.cpu.relu6_fake_quant_kept(x.data_ptr(), n, y.data_ptr(), 99, 4, 1)
    assert not y.any()
    kept = fwd(x.data_ptr(), n, y.data_ptr(), n, 4, 1.0, 1, 1)  # pass only: 16 bytes
    bwd = native.cpu.fake_quant_backward_kept
    for bad in (bytes(kept), torch.zeros(16, dtype=torch.uint8), memoryview(kept), None):
        with pytest.raises(TypeError, match="kept bitmaps must be a bytearray"):
            bwd(g.data_ptr(), n, gx.data_ptr(), n, bad, False, 1)
    with pytest.raises(ValueError, match="kept bitmaps hold 16 bytes, need 32 for 100 elements"):
        bwd(g.data_ptr(), n, gx.data_ptr(), n, kept, True, 1)  # hi asked for, not kept
    g129, gx129 = torch.randn(129), torch.zeros(129)  # bound: a temporary's memory is freed before the call
    with pytest.raises(ValueError, match="hold 16 bytes, need 20 for 129 elements"):
        bwd(g129.data_ptr(), 129, gx129.data_ptr(), 129, kept, False, 1)
    shared = bytearray(4 * n + 16)
    gx_over = torch.frombuffer(shared, dtype=torch.float32, count=n, offset=12)  # 4 bytes on the 16 read
    with pytest.raises(ValueError, match="kept bitmaps and grad_x overlap"):
        bwd(g.data_ptr(), n, gx_over.data_ptr(), n, shared, False, 1)
    assert not gx.any() and not gx_over.any() and not gx129.any()
    assert bwd(g.data_ptr(), 0, 0, 0, bytearray(), True, 1) == 0.0  # no elements: no bitmaps needed
    shifted = bytearray(33)
    del shifted[:1]  # bytearray drops a head in place: its 32 bytes start 1 byte past the allocation's
    with pytest.raises(ValueError, match="kept bitmaps hold 32 bytes, not 4-byte aligned, need 32 for 100 elements"):
        bwd(g.data_ptr(), n, gx.data_ptr(), n, shifted, True, 1)
    assert not gx.any()
    # no elements read no word, wherever the bytes lie: Python 3.13's empty bytearray points
    # at a static empty string at an odd address
    assert bwd(g.data_ptr(), 0, 0, 0, shifted, True, 1) == 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS: Linux")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="sanitizer build: ASan's shadow memory alone is past any address-space cap; "
                           "tested in the normal build")
def test_kept_bitmaps_that_cannot_be_allocated_are_a_memory_error():
    """A kept form whose bytearray cannot be allocated raises MemoryError before any kernel
    runs (pybind11's bytearray constructor raised a RuntimeError with the MemoryError still
    pending). In a child whose address space is capped at 16 GiB, in place (x is y) so that
    only the allocation can refuse 2^42 elements' bitmaps."""
    code = (
        "import resource, torch\n"
        "from fedmpq_kernels._native import native\n"
        "x = torch.randn(1)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (16 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
        "n, p = 1 << 42, x.data_ptr()\n"
        "for call in (lambda: native.cpu.fake_quant_kept(p, n, p, n, 4, 1.0, 2, 1),\n"
        "             lambda: native.cpu.relu6_fake_quant_kept(p, n, p, n, 4, 1)):\n"
        "    try:\n"
        "        call()\n"
        "    except MemoryError:\n"
        "        print('MemoryError')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # (CPython 3.11 may print "SystemError: deallocated bytearray object has exported buffers"
    # from the failed allocation's own clean-up: its uninitialized export count, not ours.)
    assert r.returncode == 0 and r.stdout.split() == ["MemoryError", "MemoryError"], (r.stdout, r.stderr[-2000:])
