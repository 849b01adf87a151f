"""The autograd layer's host work: no zero-filled gradients for the uint8 bitmaps (neither
the registered op nor the eager path makes any), and a backward that works with only the
float output used."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fedmpq_kernels as fk
from fedmpq_kernels.fake_quant import reference as R


class _Recorder(TorchDispatchMode):
    """The aten ops run inside the block (below autograd: what the backward pass executes)."""

    def __init__(self):
        super().__init__()
        self.made = []  # (op, dtypes of its outputs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.made.append((str(func), [o.dtype for o in outs if isinstance(o, torch.Tensor)]))
        return out


def _uint8_made(rec: _Recorder):
    return [op for op, dtypes in rec.made if torch.uint8 in dtypes]


@pytest.mark.parametrize("path", ["eager", "registered"])
def test_no_zero_gradients_are_made_for_the_bitmaps(path):
    """Autograd used to fill one zero uint8 tensor per bitmap output before every backward."""
    x = (torch.randn(300) * 2).requires_grad_(True)
    s = torch.tensor(1.1, requires_grad=True)
    g = torch.randn(300)
    if path == "eager":
        y = fk.fake_quant(x, 4, s, ste="clipped")
    else:
        y, b = torch.ops.fedmpq.fake_quant(x, 4, s, 2)
        assert not b.requires_grad  # uint8: no gradient
    with _Recorder() as rec:
        y.backward(g)
    assert _uint8_made(rec) == [], rec.made
    x2, s2 = x.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    R.fake_quant_autograd(x2, 4, s2, "clipped").backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(s.grad, s2.grad)


@pytest.mark.parametrize("path", ["eager", "registered"])
def test_relu6_makes_no_zero_gradient_for_its_mask(path):
    x = (torch.randn(300) * 4).requires_grad_(True)
    y = fk.relu6_fake_quant(x, 4) if path == "eager" else torch.ops.fedmpq.relu6_fake_quant(x, 4)[0]
    with _Recorder() as rec:
        y.sum().backward()
    assert _uint8_made(rec) == [], rec.made
    assert torch.equal(x.grad, ((x > 0) & (x < 6)).float())


def test_only_the_float_output_used():
    """The registered op's bitmaps are outputs nobody differentiates: a loss on y alone
    backpropagates, the bitmaps get no .grad, and a second use of y adds up."""
    x = torch.randn(70, requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y, b = torch.ops.fedmpq.fake_quant(x, 3, s, 2)
    (y.sum() + (2 * y).sum()).backward()
    assert b.grad is None
    inside = (x.detach().abs() <= 0.5).float()
    assert torch.equal(x.grad, 3 * inside)
    want = 3 * ((x.detach() > 0.5).sum() - (x.detach() < -0.5).sum()).float()
    assert s.grad.item() == want.item()



@pytest.mark.filterwarnings("ignore:.*batching rule")
@pytest.mark.parametrize("batched_scale", [False, True])
def test_clipped_ste_under_vmap_with_autograd_outside(batched_scale):
    """vmap's batched tensors report requires_grad False for a tensor that requires grad
    outside the transform: the clipped STE became the identity and the scale got no gradient."""
    torch.manual_seed(0)
    xb = torch.randn(3, 50) * 2
    sb = torch.tensor([0.5, 1.0, 2.0]) if batched_scale else torch.tensor(1.0)
    g = torch.randn(3, 50)
    x, s = xb.clone().requires_grad_(True), sb.clone().requires_grad_(True)
    if batched_scale:
        y = torch.func.vmap(lambda t, u: fk.fake_quant(t, 3, u, ste="clipped"))(x, s)
    else:
        y = torch.func.vmap(lambda t: fk.fake_quant(t, 3, s, ste="clipped"))(x)
    gx, gs = torch.autograd.grad(y, [x, s], g)
    x2, s2 = xb.clone().requires_grad_(True), sb.clone().requires_grad_(True)
    rows = [R.fake_quant_autograd(x2[i], 3, s2[i] if batched_scale else s2, "clipped") for i in range(3)]
    gx2, gs2 = torch.autograd.grad(torch.stack(rows), [x2, s2], g)
    torch.testing.assert_close(y, torch.stack(rows), rtol=0, atol=0)
    torch.testing.assert_close(gx, gx2, rtol=0, atol=0)
    torch.testing.assert_close(gs, gs2)
    # a float scale, and no gradient wanted at all: the same values
    y = torch.func.vmap(lambda t: fk.fake_quant(t, 3, 1.0, ste="clipped"))(x)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.where(xb.abs() <= 1, g, torch.zeros_like(g)))
    assert torch.equal(torch.func.vmap(lambda t: fk.fake_quant(t, 3, 1.0, ste="clipped"))(xb), y.detach())


def _through(path, x, s):
    if path == "eager":
        return fk.fake_quant(x, 3, s, ste="clipped"), fk.relu6_fake_quant(x * 3, 4)
    return torch.ops.fedmpq.fake_quant(x, 3, s, 2)[0], torch.ops.fedmpq.relu6_fake_quant(x * 3, 4)[0]


@pytest.mark.parametrize("path", ["eager", "registered"])
def test_create_graph_gives_a_backward_differentiable_in_the_incoming_gradient(path):
    """With create_graph (a gradient penalty, second-order methods) the native backward's
    outputs had no graph: the gradient of a penalty on dL/dx missed every path through the
    clipped STE's and relu6's backward (an error when it was the only one; the registered
    op only warned "silently incorrect")."""
    torch.manual_seed(0)
    x0, v0, u0 = torch.randn(200) * 2, torch.randn(200), torch.randn(200)

    def penalty_grads(fq, r6):
        x, s = x0.clone().requires_grad_(True), torch.tensor(1.1, requires_grad=True)
        v, u = v0.clone().requires_grad_(True), u0.clone().requires_grad_(True)
        y, z = fq(x, s), r6(x)
        loss = (v * y).sum() + (u * z).sum()
        gx, gs = torch.autograd.grad(loss, [x, s], create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum() + gs.pow(2), [v, u])

    got = penalty_grads(lambda x, s: _through(path, x, s)[0], lambda x: _through(path, x, None)[1])
    def relu6_oracle(x):  # relu6_fake_quant(3x)'s rule: d/dx = 3 [0 < 3x < 6]
        m = ((x * 3 > 0) & (x * 3 < 6)).float()
        return x * 3 * m - (x * 3 * m).detach()  # its value does not matter here, its graph does

    want = penalty_grads(lambda x, s: R.fake_quant_autograd(x, 3, s, "clipped"), relu6_oracle)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_the_eager_paths_bitmaps_and_a_retained_graph(backend_name):
    """The eager path on the CPU backend keeps the forward's bitmaps on the autograd node as
    the bytearray its kept forms make (no uint8 tensor allocated, saved and freed per call),
    holding the reference's bitmaps; a backend without kept forms saves them as a uint8
    tensor. Either way a retained graph's second backward gives the first one's gradients,
    and the gradients are the reference's."""
    from fedmpq_kernels import registry
    from fedmpq_kernels._native import native

    if backend_name == "cpu" and native is None:
        pytest.skip("native module not built")
    torch.manual_seed(5)
    x0, g = torch.randn(77) * 2, torch.randn(77)
    with registry.use_backend(backend_name):
        x, s = x0.clone().requires_grad_(True), torch.tensor(1.1, requires_grad=True)
        y, z = fk.fake_quant(x, 4, s, ste="clipped"), fk.relu6_fake_quant(x * 3, 4)
        for out, want in ((y, R.fake_quant(x0, 4, torch.tensor(1.1), 2)[1]),
                          (z, R.relu6_fake_quant(x0 * 3, 4)[1])):
            if backend_name == "cpu":
                assert out.grad_fn.saved_tensors == () and type(out.grad_fn.kept) is bytearray
                assert bytes(out.grad_fn.kept) == bytes(want.tolist())
            else:
                (saved,) = out.grad_fn.saved_tensors
                assert torch.equal(saved, want)
        loss = (g * y).sum() + (g * z).sum()
        first = torch.autograd.grad(loss, [x, s], retain_graph=True)
        second = torch.autograd.grad(loss, [x, s])
    x2, s2 = x0.clone().requires_grad_(True), torch.tensor(1.1, requires_grad=True)
    want_x, want_s = torch.autograd.grad((g * R.fake_quant_autograd(x2, 4, s2, "clipped")).sum(), [x2, s2])
    want_x = want_x + g * 3 * ((x0 * 3 > 0) & (x0 * 3 < 6))  # relu6_fake_quant(3x)'s rule
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.testing.assert_close(first[0], want_x, rtol=0, atol=0)
    torch.testing.assert_close(first[1], want_s)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_plain_gradients(use_reentrant):
    """torch.utils.checkpoint recomputes the forward at backward (the non-reentrant form under
    saved-tensor hooks, which do not see the CPU path's kept bitmaps): the gradients are those
    of the plain graph, bit for bit."""
    torch.manual_seed(0)
    x, s, g = torch.randn(500, requires_grad=True), torch.tensor(1.0, requires_grad=True), torch.randn(500)

    def f(x, s):
        return fk.relu6_fake_quant(fk.fake_quant(x * 2, 4, s, ste="clipped") * 3, 3)

    torch.utils.checkpoint.checkpoint(f, x, s, use_reentrant=use_reentrant).backward(g)
    got = (x.grad.clone(), s.grad.clone())
    x.grad = s.grad = None
    f(x, s).backward(g)
    assert torch.equal(got[0], x.grad) and torch.equal(got[1], s.grad)
