"""``fk.dequantize_layers``, a model's weights in one call and one autograd node, on every
backend: the weights against the reference's ``dequantize`` layer by layer (the oracle), and
the gradients against the same backend's ``dequantize`` called layer by layer (the same
kernels: bit for bit) and the reference (the scale's float64 sum: within 1e-6). Mixed widths,
odd and empty layers, strided codes and misaligned sign bitmaps, sinks of several shapes; an
output without a gradient, a scale without one, gradients that accumulate; the refusals name
the layer."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fedmpq_kernels as fk
from fedmpq_kernels.bitplane import reference as R

from .helpers import bits_of, kernels, layer

# (weight shape, bits): every width, odd sizes, an empty layer, a 0-dim weight
SHAPES = [((5, 3, 3, 3), 3), ((0, 4), 2), ((40, 25), 8), ((), 1), ((64,), 4), ((7, 37), 5), ((3, 1, 3, 3), 6),
          ((33, 31), 7)]


def _layers(dev, strided: bool = False, seed: int = 0):
    """codes, sign, scale (leaves that take gradients), bits, sink of each layer, and the
    reference's codes and signs (contiguous CPU copies). ``strided``: layer 0's codes a
    strided view and its sign bitmap one byte off a word boundary."""
    codes, sign, scale, bits, sink, ref = [], [], [], [], [], []
    for l, (shape, b) in enumerate(SHAPES):
        n = int(torch.Size(shape).numel())
        q, s, sc = layer(n, b, seed=seed + l)
        ref.append((q, s))
        q, s = q.to(dev), s.to(dev)
        if strided and l == 0:
            buf = torch.zeros(n, 2, dtype=torch.uint8, device=dev)
            buf[:, 1] = q
            raw = torch.zeros(s.numel() + 1, dtype=torch.uint8, device=dev)
            raw[1:] = s
            q, s = buf[:, 1], raw[1:]
            assert not q.is_contiguous() and s.data_ptr() % 4
        codes.append(q)
        sign.append(s)
        scale.append(sc.to(dev).requires_grad_(True))
        bits.append(b)
        sink.append(fk.sink_like(shape, device=dev).requires_grad_(True))
    return codes, sign, scale, bits, sink, ref


def _grads(dev, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dev) for shape, _ in SHAPES]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_weights_and_gradients_are_the_layers_one_by_one(backend, strided):
    kernels(backend)
    dev = backend.device
    codes, sign, scale, bits, sink, ref = _layers(dev, strided)
    G = _grads(dev)
    skip = 3  # this layer's weight gets no gradient
    with backend.active():
        ws = fk.dequantize_layers(codes, sign, scale, bits, sink)
        assert len(ws) == len(SHAPES)
        for l, (w, (shape, b), (q, s)) in enumerate(zip(ws, SHAPES, ref)):
            assert w.shape == shape and w.dtype == torch.float32 and w.device.type == dev
            assert torch.equal(bits_of(w).reshape(-1), bits_of(R.dequantize(q, s, scale[l].detach().cpu(), b))), \
                f"layer {l}"
        torch.autograd.backward([w for l, w in enumerate(ws) if l != skip], [g for l, g in enumerate(G) if l != skip])
        got = [(None if s.grad is None else s.grad.clone(), None if k.grad is None else k.grad.clone())
               for s, k in zip(scale, sink)]
        for t in scale + sink:
            t.grad = None
        one = [fk.dequantize(q, s, sc, b, k) for q, s, sc, b, k in zip(codes, sign, scale, bits, sink)]
        torch.autograd.backward([w for l, w in enumerate(one) if l != skip], [g for l, g in enumerate(G) if l != skip])
    for l, ((gs, gk), (q, s)) in enumerate(zip(got, ref)):
        if l == skip:
            assert gs is None and gk is None, "a weight without a gradient gave its layer one"
            continue
        assert gs.shape == () and gs.dtype == torch.float32
        assert torch.equal(bits_of(gs), bits_of(scale[l].grad)), f"layer {l}: dL/ds {float(gs)} != {float(scale[l].grad)}"
        torch.testing.assert_close(gs.cpu(), R.dequantize_backward(G[l].cpu(), q, s, SHAPES[l][1]), rtol=1e-6, atol=0)
        assert torch.equal(gk, G[l]), f"layer {l}: the sink's gradient is not G"


@pytest.mark.parametrize("unusual", [None, "strided", "numpy-width", "one-element-scale", "no-grad"])
def test_the_usual_call_takes_one_pass_and_any_other_the_checked_path(monkeypatch, unusual):
    """A model's weights on the CPU (plain tensors, int widths, 0-dim scales) are checked and
    made by the CPU backend in one pass, then get one autograd node; one layer that pass does
    not take sends the call through the general checks. The same weights and gradients
    either way: the reference's. Under no_grad the one pass's weights are plain tensors."""
    import numpy as np

    from fedmpq_kernels.bitplane import ops

    codes, sign, scale, bits, sink, ref = _layers("cpu", strided=unusual == "strided")
    if unusual == "numpy-width":
        bits[2] = np.int64(bits[2])
    elif unusual == "one-element-scale":
        scale[4] = scale[4].detach().reshape(1).requires_grad_(True)
    G = _grads("cpu")
    checked = []
    real = ops._tensor
    monkeypatch.setattr(ops, "_tensor", lambda *a, **k: checked.append(1) or real(*a, **k))
    if unusual == "no-grad":
        with torch.no_grad():
            ws = fk.dequantize_layers(codes, sign, scale, bits, sink)
        assert all(w.grad_fn is None and not w.requires_grad for w in ws)
    else:
        ws = fk.dequantize_layers(codes, sign, scale, bits, sink)
        torch.autograd.backward(ws, G)
    assert bool(checked) == (unusual in ("strided", "numpy-width", "one-element-scale")), "the wrong path made them"
    for l, (w, (shape, b), (q, sg)) in enumerate(zip(ws, SHAPES, ref)):
        assert w.shape == shape and torch.equal(bits_of(w).reshape(-1), bits_of(R.dequantize(q, sg, scale[l].detach(),
                                                                                             int(b))))
        if unusual != "no-grad":
            torch.testing.assert_close(scale[l].grad.reshape(()), R.dequantize_backward(G[l], q, sg, int(b)),
                                       rtol=1e-6, atol=0)
            assert torch.equal(sink[l].grad, G[l])


def test_gradients_accumulate_and_only_where_asked(backend):
    """Two backward passes add up (each layer's dL/ds is its own tensor's value, though the
    layers' share one buffer); a scale that takes no gradient gets none, its sink still does;
    under no_grad the weights are plain tensors."""
    kernels(backend)
    dev = backend.device
    codes, sign, scale, bits, sink, ref = _layers(dev)
    scale[1].requires_grad_(False)
    G = _grads(dev)
    with backend.active():
        for _ in range(2):
            torch.autograd.backward(fk.dequantize_layers(codes, sign, scale, bits, sink), G)
        with torch.no_grad():
            plain = fk.dequantize_layers(codes, sign, scale, bits, sink)
    assert all(w.grad_fn is None and not w.requires_grad for w in plain)
    assert scale[1].grad is None and torch.equal(sink[1].grad, 2 * G[1])
    for l in (0, 2, 4, 5):
        once = R.dequantize_backward(G[l].cpu(), *ref[l], SHAPES[l][1])
        torch.testing.assert_close(scale[l].grad.cpu(), 2 * once, rtol=1e-6, atol=0)
        assert torch.equal(sink[l].grad, 2 * G[l])


def test_a_sink_that_takes_no_gradient_leaves_its_scale_one(backend):
    """The converse of the test above: each layer's scale gradient follows that scale's own
    requires_grad, not its sink's (a frozen sink, e.g. a layer evaluated with its weight
    fixed while its scale is learned, still gets dL/ds; the sink gets no .grad)."""
    kernels(backend)
    dev = backend.device
    codes, sign, scale, bits, sink, ref = _layers(dev)
    sink[2] = fk.sink_like(SHAPES[2][0], device=dev)  # no gradient
    G = _grads(dev)
    with backend.active():
        torch.autograd.backward(fk.dequantize_layers(codes, sign, scale, bits, sink), G)
    assert sink[2].grad is None
    for l in (0, 2, 5):
        torch.testing.assert_close(scale[l].grad.cpu(), R.dequantize_backward(G[l].cpu(), *ref[l], SHAPES[l][1]),
                                   rtol=1e-6, atol=0)
    assert torch.equal(sink[0].grad, G[0])

def test_traced_calls_take_the_registered_op_per_layer():
    """Under a TorchDispatchMode (as under tracing) the call is fedmpq.dequantize per layer,
    which the mode sees, with the same weights and gradients."""
    codes, sign, scale, bits, sink, _ = _layers("cpu")
    G = _grads("cpu")
    want = fk.dequantize_layers(codes, sign, scale, bits, sink)
    torch.autograd.backward(want, G)
    want_g = [s.grad.clone() for s in scale]
    for s in scale:
        s.grad = None
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        got = fk.dequantize_layers(codes, sign, scale, bits, sink)
    torch.autograd.backward(got, G)
    assert seen.count("fedmpq.dequantize.default") == len(SHAPES)
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(got, want))
    assert all(torch.equal(bits_of(a.grad), bits_of(b)) for a, b in zip(scale, want_g))


def _args():
    codes, sign, scale, bits, sink, _ = _layers("cpu")
    return [codes, sign, scale, bits, sink]


@pytest.mark.parametrize("change, err, match", [
    (lambda a: a[0].__setitem__(2, a[0][2].int()), TypeError, "layer 2: codes must be torch.uint8"),
    (lambda a: a[1].__setitem__(4, a[1][4][:-1]), ValueError, "layer 4: sign has 7 bytes, 8 needed for 64 weights"),
    (lambda a: a[2].__setitem__(5, torch.tensor([1.0, 2.0])), TypeError, "layer 5: scale must be a one-element"),
    (lambda a: a[3].__setitem__(6, 9), ValueError, "layer 6: bits must be in 1..8"),
    # 0 too: the one-expression check of the usual case must hold the lower bound as well (the
    # reference backend dequantized at 0 bits into inf and NaN)
    (lambda a: a[3].__setitem__(3, 0), ValueError, "layer 3: bits must be in 1..8"),
    (lambda a: a[3].__setitem__(1, True), TypeError, "layer 1: bits must be an int"),
    (lambda a: a[4].__setitem__(7, fk.sink_like((3,))), ValueError, "layer 7: sink has 3 elements, codes 1023"),
    (lambda a: a[4].__setitem__(2, a[4][2].half()), TypeError, "layer 2: sink must be float32"),
    (lambda a: a[2].__setitem__(0, torch.tensor(1.0, device="meta")), ValueError, "layer 0: scale is on meta"),
    (lambda a: a[4].pop(), ValueError, "sink has 7 entries, codes 8"),
], ids=["codes-dtype", "sign-short", "scale-shape", "bits-range", "bits-zero", "bits-bool", "sink-size", "sink-dtype", "scale-device",
        "length"])
def test_a_bad_layer_is_named(change, err, match):
    a = _args()
    change(a)
    with pytest.raises(err, match=match):
        fk.dequantize_layers(*a)


def test_no_layers():
    assert fk.dequantize_layers([], [], [], [], []) == []


def test_one_element_scales_of_any_shape_get_their_gradients_in_their_shapes(backend):
    """Scales of shape (1,) and (1, 1) beside 0-dim ones: the same weights and dL/ds as 0-dim
    scales, each gradient in its scale's own shape; the caller's list is left as it was."""
    kernels(backend)
    dev = backend.device
    codes, sign, scale, bits, sink, ref = _layers(dev)
    shaped = [sc.detach().reshape((1,) if l % 3 == 1 else (1, 1) if l % 3 == 2 else ()).clone().requires_grad_(True)
              for l, sc in enumerate(scale)]
    given = list(shaped)
    G = _grads(dev)
    with backend.active():
        torch.autograd.backward(fk.dequantize_layers(codes, sign, scale, bits, sink), G)
        ws = fk.dequantize_layers(codes, sign, shaped, bits, sink)
        torch.autograd.backward(ws, G)
    assert all(a is b for a, b in zip(shaped, given))
    for l, (w, (shape, b), (q, s)) in enumerate(zip(ws, SHAPES, ref)):
        assert torch.equal(bits_of(w.detach()).reshape(-1), bits_of(R.dequantize(q, s, scale[l].detach().cpu(), b)))
        assert shaped[l].grad.shape == shaped[l].shape, f"layer {l}"
        assert torch.equal(bits_of(shaped[l].grad.reshape(())), bits_of(scale[l].grad)), f"layer {l}"


@pytest.mark.parametrize("many", [False, True], ids=["dequantize", "dequantize_layers"])
def test_create_graph_gives_a_scale_gradient_differentiable_in_the_incoming_gradient(many):
    """With create_graph the native dL/ds had no graph: a penalty on it raised "does not
    require grad", or silently lost this path when another one existed."""
    codes, sign, scale, bits, sink, ref = _layers(torch.device("cpu"))
    vs = [g.requires_grad_(True) for g in _grads(torch.device("cpu"))]
    if many:
        ws = fk.dequantize_layers(codes, sign, scale, bits, sink)
    else:
        ws = [fk.dequantize(*a) for a in zip(codes, sign, scale, bits, sink)]
    gs = torch.autograd.grad(sum((v * w).sum() for v, w in zip(vs, ws)), scale, create_graph=True)
    got = torch.autograd.grad(sum(g.pow(2) for g in gs), vs)
    s2 = [sc.detach().clone().requires_grad_(True) for sc in scale]
    ws2 = [R.dequantize(q, s, sc, b).reshape(w.shape) for (q, s), sc, b, w in zip(ref, s2, bits, ws)]
    gs2 = torch.autograd.grad(sum((v * w).sum() for v, w in zip(vs, ws2)), s2, create_graph=True)
    want = torch.autograd.grad(sum(g.pow(2) for g in gs2), vs)
    for a, b in zip(gs, gs2):
        torch.testing.assert_close(a, b)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
