"""The native boundary re-checks every size it is given: a wrong size from Python is a
ValueError, never an out-of-bounds access."""
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
        native.fake_quant_fwd_f32(**a)


def test_backward_requires_the_pass_bitmap():
    g = torch.randn(40)
    gx = torch.empty(40)
    with pytest.raises(ValueError, match="pass bitmap is required"):
        native.fake_quant_bwd_f32(g.data_ptr(), 40, gx.data_ptr(), 40, 0, 0, 0, 0, 1)
    p = torch.empty(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs 8"):
        native.fake_quant_bwd_f32(g.data_ptr(), 40, gx.data_ptr(), 40, p.data_ptr(), 4, 0, 0, 1)


def test_isa_override_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown ISA"):
        native.set_cpu_isa("avx9000")


def test_threaded_and_serial_results_agree():
    x = torch.randn((1 << 20) + 5)
    outs = []
    for nt in (1, 2, 3):
        y = torch.empty_like(x)
        p = torch.empty(4 * ((x.numel() + 31) // 32), dtype=torch.uint8)
        native.fake_quant_fwd_f32(x.data_ptr(), x.numel(), y.data_ptr(), y.numel(), 3, 0.0, True,
                                  p.data_ptr(), p.numel(), 0, 0, nt)
        outs.append((y, p))
    for y, p in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(p, outs[0][1])


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_streaming_store_path_matches_reference(isa):
    """Outputs of >= 8 MiB take the non-temporal-store path (base[1:] is an input that
    is not 32-byte aligned)."""
    from fedmpq_kernels import cpu as C
    from fedmpq_kernels import reference as R

    if isa == "avx2" and not native.avx2_available():
        pytest.skip("no AVX2")
    prev = native.cpu_isa()
    native.set_cpu_isa(isa)
    try:
        base = torch.randn((8 << 20) // 4 + 77)
        for x in (base, base[1:]):
            s = torch.tensor(1.7)
            y, p, h = C.fake_quant_forward(x, 5, s, 2)
            ry, rp, rh = R.fake_quant_forward(x, 5, s, 2)
            assert torch.equal(y, ry) and torch.equal(p, rp) and torch.equal(h, rh)
            g = torch.randn(x.numel())
            gx, gs = C.fake_quant_backward(g, p, h, True)
            rgx, rgs = R.fake_quant_backward(g, rp, rh, True)
            assert torch.equal(gx, rgx)
            torch.testing.assert_close(gs, rgs, rtol=1e-5, atol=1e-2)
    finally:
        native.set_cpu_isa(prev)
