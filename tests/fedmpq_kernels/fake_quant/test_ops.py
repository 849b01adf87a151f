"""The op layer: torch.library registration (opcheck), torch.compile without graph
breaks, and the errors bad input gets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels.fake_quant import reference as R


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("scaled", [False, True], ids=["dynamic", "given"])
def test_opcheck(backend, mode, scaled):
    x = torch.randn(3, 37, device=backend.device)
    s = torch.tensor(0.8, device=backend.device, requires_grad=mode == 2) if scaled else None
    with backend.active():
        torch.library.opcheck(torch.ops.fedmpq.fake_quant.default, (x.requires_grad_(mode > 0), 4, s, mode))
        _, b = torch.ops.fedmpq.fake_quant(x.detach(), 4, s.detach() if s is not None else None, 2)
        if scaled:
            torch.library.opcheck(torch.ops.fedmpq.fake_quant_backward.default, (torch.randn(3, 37, device=backend.device), b, True))


def test_eager_fast_path_and_registered_op_agree():
    """Plain eager tensors skip the dispatcher; the registered op (what torch.compile and
    tensor subclasses see) must give the same values and gradients."""
    x0 = torch.randn(4, 50) * 2
    g = torch.randn(4, 50)
    results = []
    for via_op in (False, True):
        x = x0.clone().requires_grad_(True)
        s = torch.tensor(1.3, requires_grad=True)
        if via_op:
            y = torch.ops.fedmpq.fake_quant(x, 3, s, 2)[0]
        else:
            y = fk.fake_quant(x, 3, s, ste="clipped")
        y.backward(g)
        results.append((y.detach(), x.grad, s.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_has_no_graph_break(compile_backend):
    torch._dynamo.reset()

    def f(x, s):
        return fk.fake_quant(x * 2, 4, s, ste="clipped").sum() + fk.fake_quant(x, 3).square().sum()

    cf = torch.compile(f, fullgraph=True, backend=compile_backend)  # fullgraph: a graph break raises
    x = torch.randn(5, 33, requires_grad=True)
    s = torch.tensor(1.1, requires_grad=True)
    out = cf(x, s)
    out.backward()
    x2, s2 = x.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    ref = R.fake_quant_autograd(x2 * 2, 4, s2, "clipped").sum() + R.fake_quant_autograd(x2, 3).square().sum()
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(s.grad, s2.grad)


def test_no_grad_keeps_no_bitmaps(monkeypatch):
    from fedmpq_kernels import registry
    from fedmpq_kernels.fake_quant import ops as fq_ops

    seen = []
    orig_get_many = registry.get_many

    def get_many(family, ops, device_type):
        fwd, *rest = orig_get_many(family, ops, device_type)
        assert ops[0] == "fake_quant"

        def spy(*a):
            seen.append(a[3])
            return fwd(*a)

        return (spy, *rest)

    monkeypatch.setattr(registry, "get_many", get_many)
    monkeypatch.setattr(fq_ops, "_EAGER", {})  # its per-device cache of what get_many handed out
    x = torch.randn(64, requires_grad=True)
    with torch.no_grad():
        fk.fake_quant(x, 4, 1.0, ste="clipped")
    fk.fake_quant(x.detach(), 4, 1.0, ste="clipped")
    fk.fake_quant(x, 4, 1.0, ste="clipped")
    fk.fake_quant(x, 4, torch.tensor(1.0, requires_grad=True), ste="clipped")
    fk.fake_quant(x, 4, None, ste="clipped")  # dynamic: nothing can clip
    assert seen == [0, 0, 1, 2, 0]


def test_scale_gradient_flows_to_any_float_scale_tensor():
    x = torch.tensor([3.0, -3.0, 0.1])
    s = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    fk.fake_quant(x, 4, s, ste="clipped").backward(torch.tensor([1.0, 10.0, 100.0]))
    assert s.grad.dtype == torch.float64 and s.grad.shape == (1,)
    assert s.grad.item() == 1.0 - 10.0


def test_identity_ste_gives_scale_no_gradient():
    x = torch.randn(10, requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    fk.fake_quant(x, 4, s).sum().backward()
    assert s.grad is None
    assert torch.equal(x.grad, torch.ones(10))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x=torch.arange(4)), TypeError, "float32, float16 or bfloat16"),
        (dict(x=torch.ones(4, dtype=torch.float64)), TypeError, "float64"),
        (dict(x=[1.0, 2.0]), TypeError, "torch.Tensor"),
        (dict(bits=0), ValueError, "bits must be one of"),
        (dict(bits=9), ValueError, "bits must be one of"),
        (dict(bits=32), ValueError, "bits must be one of"),
        (dict(bits=4.0), TypeError, "bits must be an int"),
        (dict(bits=True), TypeError, "bits must be an int"),
        (dict(scale=0.0), ValueError, "finite and > 0"),
        (dict(scale=-1.0), ValueError, "finite and > 0"),
        (dict(scale=float("nan")), ValueError, "finite and > 0"),
        (dict(scale=float("inf")), ValueError, "finite and > 0"),
        (dict(scale=torch.tensor(0.0)), ValueError, "finite and > 0"),
        (dict(scale=torch.tensor(-2.0)), ValueError, "finite and > 0"),
        (dict(scale=torch.tensor(float("nan"))), ValueError, "finite and > 0"),
        (dict(scale=torch.tensor(float("inf"))), ValueError, "finite and > 0"),
        (dict(scale=torch.tensor([1.0, 2.0])), ValueError, "one value"),
        (dict(scale=torch.tensor([])), ValueError, "one value"),  # none is not one either
        (dict(scale=torch.tensor(1)), TypeError, "floating-point"),
        (dict(scale=torch.tensor(1.0, device="meta")), ValueError, "on meta but x is on cpu"),
        (dict(scale="1.0"), TypeError, "scale must be None, a float"),
        (dict(scale=True), TypeError, "scale must be None, a float"),
        (dict(ste="pact"), ValueError, "ste must be"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, exc, match):
    args = dict(x=torch.randn(8), bits=4, scale=None, ste="identity")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fk.fake_quant(args["x"], args["bits"], args["scale"], ste=args["ste"])


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x, d: torch.ops.fedmpq.fake_quant(x, 9, None, 0), ValueError, "bits must be one of"),
        (lambda x, d: torch.ops.fedmpq.fake_quant(x, 4, torch.tensor(1.0, device=d), 5), ValueError, "mode must be 0"),
        # a negative mode too: the reference backend took -1 as 1, the fake kernel a negative size
        (lambda x, d: torch.ops.fedmpq.fake_quant(x, 4, torch.tensor(1.0, device=d), -1), ValueError, "mode must be 0"),
        (lambda x, d: torch.ops.fedmpq.fake_quant(x, 4, torch.ones(2, device=d), 1), ValueError, "one-element"),
        (lambda x, d: torch.ops.fedmpq.fake_quant(x, 4, torch.ones(0, device=d), 1), ValueError, "one-element"),
        (lambda x, d: torch.ops.fedmpq.fake_quant(x, 4, torch.tensor(1, device=d), 1), ValueError, "floating-point"),
        (lambda x, d: torch.ops.fedmpq.fake_quant(x.double(), 4, None, 0), TypeError, "float64"),
        (lambda x, d: torch.ops.fedmpq.fake_quant_backward(x.int(), torch.zeros(8, dtype=torch.uint8, device=d), False),
         TypeError, "grad must be float32"),
        (lambda x, d: torch.ops.fedmpq.fake_quant_backward(x, torch.zeros(4, dtype=torch.uint8, device=d), True),
         ValueError, "bitmaps has 4 bytes, 16 needed"),
        (lambda x, d: torch.ops.fedmpq.relu6_fake_quant(x, 9), ValueError, "bits must be one of"),
        (lambda x, d: torch.ops.fedmpq.relu6_fake_quant(x.double(), 4), TypeError, "float64"),
    ],
)
def test_registered_ops_called_directly_refuse_bad_arguments(backend, call, exc, match):
    """torch.ops.fedmpq.* called directly checks its arguments on every backend: before, the
    Triton and reference backends quantized at 9 bits and took mode 5."""
    x = torch.randn(40, device=backend.device)
    with backend.active(), pytest.raises(exc, match=match):
        call(x, backend.device)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_registered_op_refuses_a_bad_cpu_scale_value(backend, bad):
    """A CPU scale is free to read, so the registered op refuses one that is not finite and
    > 0 on every backend, as the public function does (only a device scale, never read on the
    host, turns into NaN outputs): the reference and Triton backends would quietly give NaN."""
    if backend.device != "cpu":
        pytest.skip("a device scale is not read on the host (NaN outputs instead)")
    x = torch.randn(40)
    with backend.active():
        for mode in (0, 1, 2):
            with pytest.raises(ValueError, match="scale must be finite and > 0"):
                torch.ops.fedmpq.fake_quant(x, 4, torch.tensor(bad), mode)


@pytest.mark.parametrize("bad", [1e39, 1e-50, 2.0 ** -150])
def test_a_python_scale_float32_cannot_hold_is_named(bad):
    """A Python float scale, finite and > 0 as a double but not as float32: 1e39 was torch's
    RuntimeError ("value cannot be converted to type float without overflow"), 1e-50 a scale of
    0 in the kernels. Float32's own extremes are scales."""
    x = torch.randn(40)
    with pytest.raises(ValueError, match=r"^scale must be finite and > 0 in float32, got"):
        fk.fake_quant(x, 4, bad)
    for ok in (torch.finfo(torch.float32).max, 2.0 ** -149):
        assert fk.fake_quant(x, 4, ok).shape == (40,)


def test_registered_op_mode_0_bitmaps_are_a_fresh_tensor(backend):
    """Mode 0 has no bitmaps, but the op's (empty) bitmaps output is still the caller's own
    tensor: a backend may share one empty tensor between calls, and a caller who resized
    that output would otherwise change what every later call returns (and break the fake
    kernel's 0-byte promise)."""
    x = torch.randn(40, device=backend.device)
    with backend.active():
        _, b1 = torch.ops.fedmpq.fake_quant(x, 4, None, 0)
        assert b1.dtype == torch.uint8 and b1.numel() == 0
        b1.resize_(8).fill_(255)  # the caller's to change
        _, b2 = torch.ops.fedmpq.fake_quant(x, 4, torch.tensor(1.0, device=backend.device), 0)
    assert b2.numel() == 0 and b2.untyped_storage().data_ptr() != b1.untyped_storage().data_ptr()


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_scale_gradient_comes_in_a_float32_scale_tensors_own_shape(shape):
    """A one-element float32 scale that is not 0-dim is reshaped for the kernels, and its
    gradient comes back in its own shape (autograd refuses a 0-dim gradient for a (1,)
    tensor). The float64 case above takes the conversion path; this one only the reshape."""
    x = torch.tensor([3.0, -3.0, 0.1], requires_grad=True)
    s = torch.full(shape, 2.0, requires_grad=True)
    fk.fake_quant(x, 4, s, ste="clipped").backward(torch.tensor([1.0, 10.0, 100.0]))
    assert s.grad.shape == shape and s.grad.dtype == torch.float32
    assert s.grad.flatten().item() == 1.0 - 10.0  # +g where x > S, -g where x < -S
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 100.0]))


def test_opcheck_half_precision(backend):
    """float16 in and out of both ops: y and grad_x keep the input's dtype while dL/dS is
    float32 whatever grad's dtype (the kernels sum in float32 or wider), and the fake kernels
    must say so for torch.compile to trace a half-precision model."""
    x = torch.randn(3, 37, device=backend.device).half()
    s = torch.tensor(0.8, device=backend.device)
    with backend.active():
        torch.library.opcheck(torch.ops.fedmpq.fake_quant.default, (x.requires_grad_(True), 4, s, 1))
        _, b = torch.ops.fedmpq.fake_quant(x.detach(), 4, s, 2)
        g = torch.randn(3, 37, device=backend.device).half()
        torch.library.opcheck(torch.ops.fedmpq.fake_quant_backward.default, (g, b, True))
        gx, gs = torch.ops.fedmpq.fake_quant_backward(g, b, True)
    assert gx.dtype == torch.float16 and gs.dtype == torch.float32 and gs.shape == ()


def test_registered_op_refuses_a_scale_on_another_device():
    """The registered op's own device check: x and scale on different devices reach one
    device's kernel (a CUDA scale with CPU x goes to the CUDA kernel), which must refuse them
    rather than hand a backend a scale it cannot read. Without a second real device, the
    CPU kernel is called the way the dispatcher would call it, with a meta scale (a plain
    call with a meta argument goes to the fake kernel instead)."""
    op = torch.ops.fedmpq.fake_quant.default
    cpu_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    x = torch.randn(10)
    y, _ = op.redispatch(cpu_key, x, 4, torch.tensor(1.0), 1)  # the same route, same device: runs
    torch.testing.assert_close(y, R.fake_quant_values(x, 4, torch.tensor(1.0)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="scale is on meta but x is on cpu"):
        op.redispatch(cpu_key, x, 4, torch.tensor(1.0, device="meta"), 1)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["f32", "f64", "shape-1"])
def test_public_function_refuses_a_bad_cpu_scale_on_every_backend(backend, bad, kind):
    """fake_quant reads a CPU scale tensor and refuses one that is not finite and > 0 itself,
    on every backend and on both of its paths (a 0-dim float32 scale takes the fast one,
    another dtype or shape the general one): only the CPU kernels check it again, so the
    reference and Triton backends would return NaN."""
    if backend.device != "cpu":
        pytest.skip("a device scale is not read on the host (NaN outputs instead)")
    s = {"f32": torch.tensor(bad), "f64": torch.tensor(bad, dtype=torch.float64), "shape-1": torch.tensor([bad])}[kind]
    x = torch.randn(40, requires_grad=True)
    with backend.active():
        for ste in ("identity", "clipped"):
            with pytest.raises(ValueError, match="scale must be finite and > 0"):
                fk.fake_quant(x, 4, s, ste=ste)
            with torch.no_grad(), pytest.raises(ValueError, match="scale must be finite and > 0"):
                fk.fake_quant(x, 4, s, ste=ste)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_a_python_float_scale_is_used_as_its_float32_value(dtype):
    """A Python float scale is the float32 of that number whatever x's dtype, as a float32
    scale tensor is (the math is float32): 0.1 rounded to float16 or bfloat16 first is
    another scale, and other outputs."""
    x = (torch.randn(300, generator=torch.Generator().manual_seed(3)) * 0.2).to(dtype)
    want = R.fake_quant_values(x, 4, torch.tensor(0.1)).to(dtype)
    torch.testing.assert_close(fk.fake_quant(x, 4, 0.1), want, rtol=0, atol=0)
    torch.testing.assert_close(fk.fake_quant(x, 4, torch.tensor(0.1)), want, rtol=0, atol=0)


def test_a_scale_that_alone_requires_grad_gets_its_gradient():
    """x a constant (an input batch), the scale learned: the output is still differentiable
    and the scale gets PACT's gradient (the gradient is needed when x *or* the scale needs
    one)."""
    x = torch.tensor([3.0, -3.0, 0.1, 4.0])
    s = torch.tensor(2.0, requires_grad=True)
    y = fk.fake_quant(x, 4, s, ste="clipped")
    assert y.requires_grad
    y.backward(torch.tensor([1.0, 10.0, 100.0, 1000.0]))
    assert s.grad.item() == 1.0 - 10.0 + 1000.0


def test_clipped_with_a_dynamic_scale_is_the_identity_ste_on_the_general_path():
    """A dynamic scale clips nothing, so ste='clipped' without a scale is the identity STE;
    the general path (here taken because bits is a numpy integer, not an int) must say so
    as the fast path does, not ask a missing scale whether it requires grad."""
    x = (torch.randn(50) * 3).requires_grad_(True)
    g = torch.randn(50)
    y = fk.fake_quant(x, np.int64(4), None, ste="clipped")
    torch.testing.assert_close(y.detach(), R.fake_quant_values(x.detach(), 4, None), rtol=0, atol=0)
    y.backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("scale", [0.5, "f64", "shape-1"])
def test_identity_ste_on_the_general_path_passes_the_gradient(scale):
    """The general path (a Python float scale, or a scale tensor not 0-dim float32) with the
    identity STE: dL/dx = dL/dy, the scale gets no gradient, and the backward needs no
    bitmaps (none are kept in mode 0)."""
    s = {"f64": torch.tensor(0.5, dtype=torch.float64, requires_grad=True),
         "shape-1": torch.tensor([0.5], requires_grad=True)}.get(scale, scale)
    x = (torch.randn(60) * 2).requires_grad_(True)
    g = torch.randn(60)
    y = fk.fake_quant(x, 3, s)
    torch.testing.assert_close(y.detach(), R.fake_quant_values(x.detach(), 3, torch.tensor(0.5)), rtol=0, atol=0)
    y.backward(g)
    assert torch.equal(x.grad, g)
    if isinstance(s, torch.Tensor):
        assert s.grad is None


def test_the_scale_gradient_is_float32_under_another_default_dtype(backend):
    """Every backend's backward returns dL/dS as a 0-dim float32 tensor whatever
    torch's default dtype (the CPU adapter skips the dtype argument only where the default
    gives float32), and the public path hands a float32 scale a float32 gradient."""
    mod = backend.module("fake_quant")
    x = torch.tensor([3.0, -3.0, 0.5], device=backend.device)
    s = torch.tensor(2.0, device=backend.device)
    _, b = mod.fake_quant(x, 4, s, 2)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _, gs = mod.fake_quant_backward(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float32, device=backend.device),
                                        b, True)
        sp = torch.tensor(2.0, dtype=torch.float32, device=backend.device, requires_grad=True)
        with backend.active():  # the public path on this backend, not the device's default one
            fk.fake_quant(x, 4, sp, ste="clipped").backward(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float32,
                                                                           device=backend.device))
    finally:
        torch.set_default_dtype(prev)
    assert gs.dtype == torch.float32 and gs.shape == () and gs.item() == 1.0 - 10.0
    assert sp.grad.dtype == torch.float32 and sp.grad.item() == 1.0 - 10.0
