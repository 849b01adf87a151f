"""The op layer: torch.library registration (opcheck), torch.compile without graph
breaks, and the errors bad input gets."""
from __future__ import annotations

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
        (lambda x, d: torch.ops.fedmpq.fake_quant(x, 4, torch.ones(2, device=d), 1), ValueError, "one-element"),
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
