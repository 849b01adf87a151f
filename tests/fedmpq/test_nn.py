"""fedmpq.nn: the models' layouts, conversions both ways, training state, the optimizer's
behaviour on a real (small) problem, torch.compile, and clear errors."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedmpq_kernels as fk
from fedmpq import layouts
from fedmpq import nn as qn
from tests import early


def _codes(model):
    return [(m.codes.clone(), m.sign.clone(), m.scale.detach().clone(), m.bits) for _, m in qn.bit_layers(model)]


@pytest.mark.parametrize("depth", [20, 44])
def test_resnet_state_dicts_match_the_layouts(depth):
    qshapes, fshapes = layouts.cifar_resnet(depth)
    fsd = qn.build(f"resnet{depth}").state_dict()
    assert {k: tuple(v.shape) for k, v in fsd.items()} == {**qshapes, **fshapes}
    qm = qn.build(f"resnet{depth}", quantized=True, bits=4)
    qsd = qn.to_float_state_dict(qm)
    assert {k: tuple(v.shape) for k, v in qsd.items()} == {**qshapes, **fshapes}
    assert [n for n, _ in qn.bit_layers(qm)] == [k[: -len(".weight")] for k in qshapes]  # layer order


@pytest.mark.parametrize("name,kw,shape", [
    ("resnet20", dict(num_classes=100), (2, 3, 32, 32)),
    ("resnet20", dict(in_channels=1), (2, 1, 32, 32)),
    ("small_cnn", dict(image_size=28), (3, 1, 28, 28)),
    ("small_cnn", dict(image_size=8, num_classes=7, in_channels=2), (3, 2, 8, 8)),
])
@pytest.mark.parametrize("quantized", [False, True])
def test_models_run_in_both_forms(name, kw, shape, quantized):
    m = qn.build(name, quantized=quantized, **kw)
    y = m(torch.randn(shape))
    assert y.shape == (shape[0], kw.get("num_classes", 10))
    assert bool(torch.isfinite(y).all())
    assert (len(qn.bit_layers(m)) > 0) == quantized


def test_quantized_forward_equals_float_model_with_dequantized_weights():
    """The quantized model computes what the float model (ReLU6 + the same quantizer) does
    with the de-quantized weights: the conversion is exact."""
    torch.manual_seed(0)
    qm = qn.small_cnn(quantized=True, bits=[3, 5, 2, 4], image_size=8).eval()
    fm = qn.small_cnn(image_size=8, act_bits=4).eval()
    fm.load_state_dict(qn.to_float_state_dict(qm))
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(qm(x), fm(x), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_float_to_quantized_to_float_round_trip(bits):
    torch.manual_seed(bits)
    fm = qn.resnet20()
    sd = fm.state_dict()
    qm = qn.load_float_state_dict(qn.resnet20(quantized=True, bits=8), sd, bits)
    assert qn.bit_assignment(qm) == [bits] * 20
    back = qn.to_float_state_dict(qm)
    for name, layer in qn.bit_layers(qm):
        w = sd[f"{name}.weight"]
        codes, sign, scale = fk.binarize(w, bits)
        assert torch.equal(layer.codes, codes) and torch.equal(layer.sign, sign)
        # de-quantized: within half a step of the float weight
        step = float(scale) / (2**bits - 1)
        assert float((back[f"{name}.weight"] - w).abs().max()) <= step / 2 + 1e-6 * float(scale)
    for k, v in sd.items():
        if not any(k == f"{n}.weight" for n, _ in qn.bit_layers(qm)):
            assert torch.equal(back[k], v), k
    # quantized -> float -> quantized at the same bit-widths is the identity on the codes,
    # and on the signs of non-zero codes (a zero weight binarizes as negative: ALGORITHM.md)
    qm2 = qn.load_float_state_dict(qn.resnet20(quantized=True, bits=2), back, qn.bit_assignment(qm))
    for (name, m), a, b in zip(qn.bit_layers(qm), _codes(qm), _codes(qm2)):
        assert torch.equal(a[0], b[0]), name
        n = m.numel
        neg_a = fk.unpack_codes(a[1], 1, n).bool()
        neg_b = fk.unpack_codes(b[1], 1, n).bool()
        nz = a[0] != 0
        assert torch.equal(neg_a[nz], neg_b[nz]), name


def test_per_layer_bits_and_conversion_errors():
    bits = list(range(1, 9)) * 2 + [4, 4, 4, 4]
    qm = qn.resnet20(quantized=True, bits=bits)
    assert qn.bit_assignment(qm) == bits
    with pytest.raises(ValueError, match="bit-widths"):
        qn.resnet20(quantized=True, bits=[4] * 19)
    with pytest.raises(ValueError, match="bits"):
        qn.resnet20(quantized=True, bits=9)
    sd = qn.to_float_state_dict(qm)
    with pytest.raises(ValueError, match="bit-widths"):
        qn.load_float_state_dict(qm, sd, [4] * 3)
    missing = dict(sd)
    del missing["layer2.0.bn1.running_mean"]
    with pytest.raises(ValueError, match="running_mean"):
        qn.load_float_state_dict(qm, missing, 4)
    extra = dict(sd, bogus=torch.zeros(1))
    with pytest.raises(ValueError, match="bogus"):
        qn.load_float_state_dict(qm, extra, 4)
    with pytest.raises(ValueError, match="shape"):
        qn.bit_layers(qm)[0][1].load_float(torch.zeros(3, 3), 4)
    with pytest.raises(ValueError, match="depth"):
        qn.resnet20.__wrapped__ if False else qn.CifarResNet(depth=21)
    with pytest.raises(ValueError, match="unknown model"):
        qn.build("vgg")


@pytest.mark.parametrize("name,kw,nq", [("resnet20", {}, 19), ("small_cnn", dict(image_size=8), 3)])
def test_a_float_classifier_is_a_float_layer_with_the_float_models_name(name, kw, nq):
    """float_classifier: the classifier leaves the bit-plane layers, takes no bit-width, and its
    weight travels in the float state under the name the float model gives it."""
    torch.manual_seed(0)
    qm = qn.build(name, quantized=True, bits=[3] * nq, float_classifier=True, **kw)
    assert len(qn.bit_layers(qm)) == nq and "linear" not in dict(qn.bit_layers(qm))
    assert type(qm.linear) is torch.nn.Linear
    assert {"linear.weight", "linear.bias"} <= set(qn.float_state(qm))
    with pytest.raises(ValueError, match="bit-widths"):
        qn.build(name, quantized=True, bits=[3] * (nq + 1), float_classifier=True, **kw)
    with pytest.raises(TypeError, match="float_classifier must be a bool"):
        qn.build(name, quantized=True, bits=3, float_classifier="yes", **kw)
    # the float model's state loads into it and comes back exactly for the classifier
    fm = qn.build(name, **kw)
    qn.load_float_state_dict(qm, fm.state_dict(), 4)
    back = qn.to_float_state_dict(qm)
    assert set(back) == set(fm.state_dict())
    assert torch.equal(back["linear.weight"], fm.state_dict()["linear.weight"])
    assert not torch.equal(back["conv1.weight"], fm.state_dict()["conv1.weight"])  # still quantized


@pytest.mark.parametrize("bits", range(1, 9))
def test_training_state_is_at_most_1_5_plus_n_bytes_per_weight(bits):
    qm = qn.small_cnn(quantized=True, bits=bits, image_size=8)
    opt = qn.BitPlaneOptimizer(qm, lr=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    F.cross_entropy(qm(x), y).backward()
    opt.step()
    opt.zero_grad()
    per_weight = qn.state_bytes_per_weight(qm, opt)
    assert per_weight <= 1.5 + bits
    # nothing float of the weights' size persists: integer buffers, a zero-stride sink, no grads
    for _, m in qn.bit_layers(qm):
        assert m.codes.dtype == torch.uint8 and m.sign.dtype == torch.uint8
        assert all(s == 0 for s in m.sink.stride()) and m.sink.grad is None
    for st in opt.state.values():
        assert st["mom"].dtype == torch.uint8 and st["gs"].numel() == 1


def test_sink_stays_one_float_after_moving_the_model():
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8).to(torch.float32).to("cpu")
    for _, m in qn.bit_layers(qm):
        assert all(s == 0 for s in m.sink.stride())


def test_sink_stays_one_float_after_a_deepcopy():
    """copy.deepcopy cloned the zero-stride sink into n floats per layer (state_bytes still
    counted 4); the copy's sink is made again, frozen or not, with its gradient, and an
    optimizer copied with the model holds the copy's layers."""
    import copy

    torch.manual_seed(0)
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    qm.conv1.requires_grad_(False)
    x = torch.randn(2, 1, 8, 8)
    qm(x).sum().backward()
    opt = qn.BitPlaneOptimizer(qm, lr=0.1)
    twin, twin_opt = copy.deepcopy((qm, opt))
    for (_, m), (_, t) in zip(qn.bit_layers(qm), qn.bit_layers(twin)):
        assert all(s == 0 for s in t.sink.stride()) and t.sink.untyped_storage().nbytes() == 4
        assert t.sink is not m.sink and t.sink.requires_grad == m.sink.requires_grad
        assert (t.sink.grad is None) == (m.sink.grad is None)
        if m.sink.grad is not None:
            assert torch.equal(t.sink.grad, m.sink.grad) and t.sink.grad is not m.sink.grad
    assert all(a is b for a, (_, b) in zip(twin_opt.layers, qn.bit_layers(twin)))
    assert torch.equal(twin(x), qm(x))


def test_a_quantized_model_learns_digits():
    """Ten epochs of 4-bit training (cross-entropy + group lasso, the bit-plane optimizer and
    SGD for the float parameters) on scikit-learn's digits: the loss falls and held-out
    accuracy is far above chance (0.1)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    opt = qn.BitPlaneOptimizer(qm, lr=0.1, lam=1e-3, seed=1)
    sgd = torch.optim.SGD(qn.float_parameters(qm), lr=0.1, momentum=0.9)
    first = None
    for epoch in range(10):
        total = 0.0
        for i in range(0, 1536, 64):
            loss = F.cross_entropy(qm(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            sgd.zero_grad()
            loss.backward()
            opt.step()
            sgd.step()
            total += float(loss.detach())
        first = total if first is None else first
    assert opt.skipped == 0
    assert total < 0.75 * first
    acc = (qm.eval()(x[1536:]).argmax(1) == y[1536:]).float().mean()
    assert acc > 0.35


def test_device_keys_draw_what_host_keys_draw(monkeypatch):
    """BitPlaneOptimizer(device_keys=True), whose keys come from a step count on the layers'
    device (what a CUDA graph replays), trains bit for bit as the host-keyed optimizer over
    several steps, and the count advances once per step."""
    torch.manual_seed(3)
    x, y = torch.randn(4, 16, 1, 8, 8).mul(0.7), torch.randint(0, 10, (4, 16))
    runs = []
    for device_keys in (False, True):
        torch.manual_seed(0)
        qm = qn.small_cnn(quantized=True, bits=3, image_size=8)
        opt = qn.BitPlaneOptimizer(qm, lr=0.5, lam=1e-3, seed=77, device_keys=device_keys)
        for i in range(4):
            opt.zero_grad()
            F.cross_entropy(qm(x[i]), y[i]).backward()
            opt.step()
        runs.append((_codes(qm), opt))
    (a, _), (b, opt) = runs
    assert int(opt.device_step) == 4 and opt.steps == 4
    for (ca, sa, *_), (cb, sb, *_) in zip(a, b):
        assert torch.equal(ca, cb) and torch.equal(sa, sb)
    # and the keys handed to the kernel are step_key(seed, step, layer), step by step
    seen = []
    real = qn.optim.fk.bitplane_step_layers

    def record(*args):
        assert isinstance(args[-1], torch.Tensor)  # from the device count, not the host's
        seen.extend(args[-1].tolist())
        return real(*args)

    monkeypatch.setattr(qn.optim.fk, "bitplane_step_layers", record)
    for i in range(2):
        opt.zero_grad()
        F.cross_entropy(qm(x[i]), y[i]).backward()
        opt.step()
    L = len(opt.layers)
    assert seen == [fk.step_key(77, s, l) for s in (4, 5) for l in range(L)]


def _mixed_resnet(device="cpu"):
    """A quantized ResNet-20 with every width 1..8 among its layers and random codes, one
    layer all zeros and one all at the top code (popcounts 0 and n)."""
    torch.manual_seed(5)
    qm = qn.resnet20(quantized=True, bits=[1 + i % 8 for i in range(20)]).to(device)
    layers = [m for _, m in qn.bit_layers(qm)]
    with torch.no_grad():
        for i, m in enumerate(layers):
            m.codes.copy_(torch.randint(0, 1 << m.bits, (m.numel,), dtype=torch.uint8))
        layers[3].codes.zero_()
        layers[4].codes.fill_((1 << layers[4].bits) - 1)
    return qm, layers


@pytest.mark.parametrize("lam", [1e-3, 3.7e-4])
def test_all_coefficients_at_once_are_the_per_layer_ones_bit_for_bit(lam):
    """The batched coefficients (one formula over every layer's popcounts: a GPU's way) give
    each layer's coefficients bit for bit: the CPU's Python floats and group_lasso's torch
    ops, times lam / T; and again after a layer changes its width (the kept weights follow)."""
    qm, layers = _mixed_resnet()
    opt = qn.BitPlaneOptimizer(qm, lr=0.1, lam=lam)
    for _ in range(2):
        got = opt.all_coefficients(batched=True)
        assert len(got) == len(layers)
        for m, c in zip(layers, got):
            want = fk.group_lasso(fk.plane_popcounts(m.codes, m.bits), m.numel, m.bits)[1] * (lam / opt.total)
            assert c.dtype == torch.float32 and c.shape == (m.bits,)
            assert torch.equal(c, want) and torch.equal(c, opt.coefficients(m))
        layers[7].load_float(torch.randn(layers[7].weight_shape), 9 - layers[7].bits)  # 8 -> 1, then 1 -> 8
    assert opt.all_coefficients(batched=False)[7].shape == (layers[7].bits,)
    zero_opt = qn.BitPlaneOptimizer(qm, lr=0.1, lam=0.0)
    zero = zero_opt.all_coefficients(batched=True)
    assert all(torch.equal(c, torch.zeros(m.bits)) for m, c in zip(layers, zero))
    zero_opt.lam = lam  # the kept zeros are not taken for weights
    assert all(torch.equal(c, zero_opt.coefficients(m)) for m, c in zip(layers, zero_opt.all_coefficients(batched=True)))


def test_steps_with_batched_coefficients_train_as_per_layer_ones(monkeypatch):
    """The optimizer hands layer l its own coefficients when they come all at once."""
    x, y = torch.randn(3, 8, 3, 32, 32), torch.randint(0, 10, (3, 8))
    runs = []
    for batched in (False, True):
        qm, _ = _mixed_resnet()
        opt = qn.BitPlaneOptimizer(qm, lr=0.5, lam=1e-2, seed=3)
        monkeypatch.setattr(opt, "_coefficients", lambda c, b, lay, bt=batched, f=opt._coefficients: f(c, b, lay, bt))
        for i in range(3):
            opt.zero_grad()
            F.cross_entropy(qm(x[i]), y[i]).backward()
            opt.step()
        runs.append(_codes(qm))
    for (ca, sa, *_), (cb, sb, *_) in zip(*runs):
        assert torch.equal(ca, cb) and torch.equal(sa, sb)


def test_the_step_follows_a_changed_width_and_a_cleared_state():
    """The optimizer keeps its layers' state dicts between steps without checking each one
    again: a layer whose width changed gets a momentum buffer of its new size, and a cleared
    ``state`` starts again from zeros, as a new optimizer at the same step count does."""
    import copy

    torch.manual_seed(2)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    opt = qn.BitPlaneOptimizer(qm, lr=0.5, lam=1e-2, seed=1)

    def train(model, o):
        o.zero_grad()
        F.cross_entropy(model(x), y).backward()
        o.step()

    train(qm, opt)
    layer = qn.bit_layers(qm)[1][1]
    layer.load_float(layer.float_weight(), 6)
    train(qm, opt)
    assert opt.state[1]["mom"].shape == (6, layer.numel) and opt.state[0]["mom"].shape[0] == 4
    twin = copy.deepcopy(qm)
    fresh = qn.BitPlaneOptimizer(twin, lr=0.5, lam=1e-2, seed=1)
    fresh.steps = opt.steps
    opt.state.clear()
    train(qm, opt)
    train(twin, fresh)
    assert len(opt.state) == len(opt.layers)
    for (ca, sa, *_), (cb, sb, *_) in zip(_codes(qm), _codes(twin)):
        assert torch.equal(ca, cb) and torch.equal(sa, sb)
    for l in opt.state:
        assert torch.equal(opt.state[l]["mom"], fresh.state[l]["mom"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_all_coefficients_on_a_gpu_are_the_cpus():
    qm, layers = _mixed_resnet()
    want = qn.BitPlaneOptimizer(qm, lr=0.1, lam=1e-3).all_coefficients(batched=False)  # the CPU's per layer
    qm.cuda()
    got = qn.BitPlaneOptimizer(qm, lr=0.1, lam=1e-3).all_coefficients()
    assert all(g.is_cuda and torch.equal(g.cpu(), w) for g, w in zip(got, want))


def test_a_non_finite_gradient_skips_the_step_and_keeps_the_codes():
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    opt = qn.BitPlaneOptimizer(qm, lr=0.1)
    before = _codes(qm)
    F.cross_entropy(qm(torch.randn(4, 1, 8, 8)), torch.randint(0, 10, (4,))).backward()
    layer = qn.bit_layers(qm)[1][1]
    layer.sink.grad[0, 0, 0, 0] = float("nan")
    opt.step()
    assert opt.skipped == 1
    after = _codes(qm)
    assert torch.equal(before[1][0], after[1][0]) and torch.equal(before[1][1], after[1][1])
    assert float(opt.state[0]["gs"]) > 0 and float(opt.state[2]["gs"]) > 0  # the other layers stepped
    assert 1 not in opt.state or float(opt.state[1]["gs"]) == 0


def test_optimizer_rejects_bad_settings():
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    with pytest.raises(ValueError, match="lr"):
        qn.BitPlaneOptimizer(qm, lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        qn.BitPlaneOptimizer(qm, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="lambda"):
        qn.BitPlaneOptimizer(qm, lr=0.1, lam=-1.0)
    with pytest.raises(ValueError, match="no bit-plane layers"):
        qn.BitPlaneOptimizer(qn.small_cnn(image_size=8), lr=0.1)


def test_optimizer_refuses_layers_without_weights():
    """T = sum n_l = 0 (every bit-plane layer holds 0 weights): the group lasso's lam * R / T is
    undefined. The optimizer says so when built (it raised ZeroDivisionError at the first step),
    and the reported R / T is 0, not NaN."""
    qm = torch.nn.Sequential(qn.BitLinear(0, 3, bits=4))
    with pytest.raises(ValueError, match="no weights"):
        qn.BitPlaneOptimizer(qm, lr=0.1)
    assert float(qn.regularizer(qm)) == 0.0
    mixed = torch.nn.Sequential(qn.BitLinear(0, 3, bits=4), qn.BitLinear(3, 2, bits=4))
    qn.BitPlaneOptimizer(mixed, lr=0.1).step()  # T > 0: a layer of 0 weights among others is fine


def test_regularizer_matches_the_definition():
    qm = qn.small_cnn(quantized=True, bits=[2, 3, 4, 5], image_size=8)
    total, r = 0, 0.0
    for _, m in qn.bit_layers(qm):
        q = m.codes.to(torch.int64)
        for i in range(m.bits):
            r += m.numel * m.bits * float(torch.sqrt(((q >> (m.bits - 1 - i)) & 1).sum().double() + 1e-8))
        total += m.numel
    assert float(qn.regularizer(qm)) == pytest.approx(r / total, rel=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@early.in_child  # beside the suite: inductor's first build takes 20-30 s
def test_compiled_forward_and_backward_match_eager(channels_last):
    """A quantized model runs under torch.compile(fullgraph=True): the forward and the
    compiled backward give eager's loss, G for every layer, and the scale gradients. The
    model has batch_weights' hooks on, as the client's does: inert under compile (no graph
    break), used eagerly. Channels-last too (the registered ops, contiguous, under compile;
    the eager path keeps the layout)."""
    torch.manual_seed(0)
    qm = qn.small_cnn(quantized=True, bits=[3, 4, 5, 6], image_size=8, channels_last=channels_last)
    qn.batch_weights(qm)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))

    def grads():
        out = [(m.sink.grad.clone(), m.scale.grad.clone()) for _, m in qn.bit_layers(qm)]
        qm.zero_grad(set_to_none=True)
        return out

    loss = F.cross_entropy(qm(x), y)
    loss.backward()
    eager = grads()
    compiled = torch.compile(qm, fullgraph=True)
    closs = F.cross_entropy(compiled(x), y)
    closs.backward()
    comp = grads()
    torch.testing.assert_close(closs.detach(), loss.detach(), rtol=1e-5, atol=1e-6)
    for (g0, s0), (g1, s1) in zip(eager, comp):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
        # the scale gradient is a sum of many terms that cancel: compare against their size
        assert abs(float(s1 - s0)) <= 1e-4 * float(g0.abs().sum()) + 1e-6


def test_layer_weights_and_parameter_scales_take_the_eager_autograd_path():
    """A bit-plane layer's scale and sink are Parameters: its weight must still take the
    direct autograd node, not the dispatcher and torch.library's wrapper (until 2026-12-04
    it did, costing ~45 us of host time per layer and step); the same for fake_quant with a
    Parameter scale. Gradients are those of the registered op."""
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    _, layer = qn.bit_layers(qm)[1]
    w = layer.quantized_weight()
    assert type(w.grad_fn).__name__ == "_DequantizeEagerBackward"
    g = torch.randn(w.shape)
    w.backward(g)
    got_scale, got_sink = layer.scale.grad.clone(), layer.sink.grad.clone()
    layer.scale.grad = layer.sink.grad = None
    torch.ops.fedmpq.dequantize(layer.codes, layer.sign, layer.scale, layer.bits, layer.sink).backward(g)
    assert torch.equal(got_scale, layer.scale.grad) and torch.equal(got_sink, layer.sink.grad)

    s = torch.nn.Parameter(torch.tensor(1.0))
    x = torch.randn(33, requires_grad=True)
    y = fk.fake_quant(x, 4, s, ste="clipped")
    assert type(y.grad_fn).__name__ == "_FakeQuantEagerBackward"


def test_a_layer_without_a_gradient_keeps_its_state_and_the_others_step_as_alone():
    """All layers with gradients step in one fk.bitplane_step_layers call; when one has none (not in
    this backward), the optimizer goes layer by layer: that layer keeps codes, signs and
    momentum, and every other layer's step is the one it takes when all step together."""
    x, y = torch.randn(2, 8, 1, 8, 8), torch.randint(0, 10, (2, 8))
    runs = []
    for drop in (None, 1):
        torch.manual_seed(0)
        qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
        opt = qn.BitPlaneOptimizer(qm, lr=0.5, lam=1e-3, seed=5)
        layers = [m for _, m in qn.bit_layers(qm)]
        for i in range(2):
            opt.zero_grad()
            F.cross_entropy(qm(x[i]), y[i]).backward()
            if drop is not None and i == 1:
                kept = (layers[drop].codes.clone(), layers[drop].sign.clone(), opt.state[drop]["mom"].clone())
                layers[drop].sink.grad = None
            opt.step()
        runs.append((qm, layers, opt))
    (_, full, full_opt), (_, part, opt) = runs
    assert torch.equal(part[1].codes, kept[0]) and torch.equal(part[1].sign, kept[1])
    assert torch.equal(opt.state[1]["mom"], kept[2])
    for l in (0, 2, 3):  # layer l's step does not depend on the others' (its own key and coefficients)
        assert torch.equal(part[l].codes, full[l].codes) and torch.equal(part[l].sign, full[l].sign), f"layer {l}"
    assert not torch.equal(full_opt.state[1]["mom"], kept[2])  # the dropped layer did step in the full run


class _Spy:
    """Counts the calls of fk.dequantize_layers and fk.dequantize (the layers' own path)."""

    def __init__(self, monkeypatch):
        self.many = self.one = 0
        real_many, real_one = fk.dequantize_layers, fk.dequantize

        def many(*a):
            self.many += 1
            return real_many(*a)

        def one(*a):
            self.one += 1
            return real_one(*a)

        monkeypatch.setattr(fk, "dequantize_layers", many)
        monkeypatch.setattr(fk, "dequantize", one)


def _train(model, x, y, steps: int = 3):
    """``steps`` optimizer steps; the losses and the state after them (codes, signs, scales,
    momentum, every float parameter)."""
    opt = qn.BitPlaneOptimizer(model, lr=0.5, lam=1e-3, seed=5)
    sgd = torch.optim.SGD(qn.float_parameters(model), lr=0.1, momentum=0.9)
    losses = []
    for i in range(steps):
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        sgd.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sgd.step()
        losses.append(loss.detach())
    state = [t.detach().clone() for t in model.state_dict().values()] + [st["mom"].clone() for st in opt.state.values()]
    return losses, state


@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
def test_batch_weights_trains_as_weights_made_per_layer(monkeypatch, name):
    """Under batch_weights every forward makes the weights in one dequantize_layers call and
    no layer makes its own; three steps give the per-layer run's losses and state bit for
    bit (codes, signs, scales, momentum, BatchNorm)."""
    shape = (3, 2, 1, 8, 8) if name == "small_cnn" else (3, 2, 3, 32, 32)
    kw = dict(image_size=8) if name == "small_cnn" else {}
    torch.manual_seed(1)
    x, y = torch.randn(*shape), torch.randint(0, 10, shape[:2])
    runs = []
    for batched in (False, True):
        torch.manual_seed(0)
        qm = qn.build(name, quantized=True, bits=4, **kw)
        spy = _Spy(monkeypatch)
        if batched:
            qn.batch_weights(qm)
        runs.append(_train(qm, x, y))
        assert (spy.many, spy.one) == ((3, 0) if batched else (0, 3 * len(qn.bit_layers(qm))))
    (l0, s0), (l1, s1) = runs
    assert all(torch.equal(a, b) for a, b in zip(l0, l1)), (l0, l1)
    assert len(s0) == len(s1) and all(torch.equal(a, b) for a, b in zip(s0, s1))


class _Twice(torch.nn.Module):
    """A bit-plane layer used twice in one forward, one in another grad mode, one not at all,
    and a forward that can raise."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = qn.BitLinear(6, 6, bits=3), qn.BitLinear(6, 4, bits=5), qn.BitLinear(2, 2)
        self.fail = False

    def forward(self, x):
        x = self.a(torch.relu(self.a(x)))
        if self.fail:
            raise RuntimeError("boom")
        with torch.enable_grad():
            return self.b(x)


def test_batch_weights_edge_cases(monkeypatch):
    torch.manual_seed(0)
    m = _Twice()
    x = torch.randn(5, 6)

    def grads():
        out = m(x)
        out.square().sum().backward()
        g = [None if p.grad is None else p.grad.clone() for p in m.parameters()]
        m.zero_grad(set_to_none=True)
        return out.detach(), g

    want_out, want = grads()
    spy = _Spy(monkeypatch)
    with qn.batch_weights(m):
        got_out, got = grads()  # a: its weight from the hook, then its own; the unused one dropped
        assert torch.equal(got_out, want_out)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, want))
        assert spy.many == 1 and spy.one == 1
        assert not any("_batched" in l.__dict__ for _, l in qn.bit_layers(m)), "a weight was left for the next forward"
        # called under no_grad, b runs under enable_grad: it must not take the no-grad weight
        with torch.no_grad():
            out = m(x)
        out.sum().backward()
        assert m.b.sink.grad is not None and m.b.scale.grad is not None and spy.one == 3
        m.zero_grad(set_to_none=True)
        m.fail = True
        with pytest.raises(RuntimeError, match="boom"):
            m(x)
        assert not any("_batched" in l.__dict__ for _, l in qn.bit_layers(m)), "a failed forward left a weight"
        m.fail = False
        many = spy.many
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        m(x)  # as under torch.compile: the layers make their own
        assert spy.many == many
        monkeypatch.undo()
    spy = _Spy(monkeypatch)
    m(x)  # removed: no hook left
    assert spy.many == 0 and spy.one == 3


def test_a_model_under_batch_weights_pickles_and_deep_copies(tmp_path):
    """The hooks are plain objects: torch.save of the whole model works, and a deepcopy makes
    its weights from its own layers (a copy trained apart from the original keeps apart)."""
    import copy

    torch.manual_seed(0)
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    qn.batch_weights(qm)
    x = torch.randn(2, 1, 8, 8)
    want = qm(x).detach()
    torch.save(qm, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(loaded(x), want)
    twin = copy.deepcopy(qm)
    _, layer = qn.bit_layers(twin)[-1]  # the classifier (no BatchNorm after it)
    with torch.no_grad():
        layer.scale.mul_(2)  # the copy's weights change, the original's do not
    assert not torch.equal(twin(x), want) and torch.equal(qm(x), want)
    made = twin._forward_pre_hooks[next(iter(twin._forward_pre_hooks))]
    assert made.layers[-1] is layer


def test_batch_weights_twice_is_once(monkeypatch):
    """A second batch_weights on the same model adds no second call per forward, and removing
    its handle leaves the first one's hooks; a model without bit-plane layers is unchanged."""
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    first = qn.batch_weights(qm)
    spy = _Spy(monkeypatch)
    with qn.batch_weights(qm):
        qm(torch.randn(2, 1, 8, 8))
    assert spy.many == 1 and spy.one == 0
    qm(torch.randn(2, 1, 8, 8))
    assert spy.many == 2, "removing the second handle took the first one's hooks off"
    first.remove()
    qm(torch.randn(2, 1, 8, 8))
    assert spy.many == 2 and spy.one == 4
    fm = qn.small_cnn(image_size=8)
    with qn.batch_weights(fm):
        fm(torch.randn(2, 1, 8, 8))
    assert spy.many == 2


def test_the_resnet_stem_is_a_plain_relu():
    """ALGORITHM.md, "Activations": the stem (first conv, BN, ReLU) is a plain ReLU, not
    clipped at 6 like the blocks' ReLU6: with a BatchNorm shift of 10 the first block sees
    relu(bn1(conv1(x))), values above 6 included."""
    torch.manual_seed(0)
    qm = qn.resnet20(quantized=True, bits=4).eval()
    with torch.no_grad():
        qm.bn1.bias.fill_(10.0)
    seen = []
    qm.layer1.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x = torch.randn(2, 3, 32, 32)
    qm(x)
    want = F.relu(qm.bn1(qm.conv1(x))).detach()
    assert float(want.max()) > 8
    assert torch.equal(seen[0], want)


def test_per_layer_bit_widths_load_into_their_own_layers():
    """load_float_state_dict binarizes layer l with bits[l], in layer order."""
    torch.manual_seed(0)
    sd = qn.small_cnn(image_size=8).state_dict()
    bits = [8, 1, 5, 3]
    qm = qn.load_float_state_dict(qn.small_cnn(quantized=True, bits=4, image_size=8), sd, bits)
    assert qn.bit_assignment(qm) == bits
    for (name, m), b in zip(qn.bit_layers(qm), bits):
        codes, sign, scale = fk.binarize(sd[f"{name}.weight"], b)
        assert torch.equal(m.codes, codes) and torch.equal(m.sign, sign) and float(m.scale.detach()) == float(scale), name


@pytest.mark.parametrize("bits", [1, 3, 7])
def test_load_packed_refuses_a_code_past_the_width(bits):
    """A code must be < 2^N: 2^N - 1 loads, 2^N is refused."""
    layer = qn.BitLinear(4, 2, bits=bits)
    sign = torch.zeros(fk.bitmap_nbytes(8), dtype=torch.uint8)
    codes = torch.zeros(8, dtype=torch.uint8)
    codes[3] = (1 << bits) - 1
    layer.load_packed(codes, sign, 0.5, bits)
    assert int(layer.codes[3]) == (1 << bits) - 1
    codes[3] = 1 << bits
    with pytest.raises(ValueError, match="code is >="):
        layer.load_packed(codes, sign, 0.5, bits)


def test_load_packed_checks_codes_of_other_dtypes_before_converting_them():
    """The uint8 conversion wrapped an int64 300 to 44 and -1 to 255, and truncated a float
    3.7 to 3: the first two passed the range check taken after it, and loaded. Integer codes
    in range of any dtype still load (bool too), with the same result as uint8 ones."""
    layer = qn.BitLinear(4, 2, bits=8)
    sign = torch.zeros(fk.bitmap_nbytes(8), dtype=torch.uint8)
    before = layer.codes.clone()
    with pytest.raises(ValueError, match=r"a code is >= 2\^8"):
        layer.load_packed(torch.tensor([300, 1, 2, 3, 4, 5, 6, 7]), sign, 0.5, 8)
    with pytest.raises(ValueError, match=r"a code is negative \(-1\)"):
        layer.load_packed(torch.tensor([-1, 1, 2, 3, 4, 5, 6, 7], dtype=torch.int16), sign, 0.5, 8)
    for bad in (torch.tensor([3.7] * 8), torch.ones(8, dtype=torch.complex64)):
        with pytest.raises(TypeError, match=f"codes must be an integer tensor, got {bad.dtype}"):
            layer.load_packed(bad, sign, 0.5, 8)
    with pytest.raises(TypeError, match="codes must be an integer tensor, got list"):
        layer.load_packed([1] * 8, sign, 0.5, 8)
    assert torch.equal(layer.codes, before) and layer.bits == 8
    layer.load_packed(torch.arange(8, dtype=torch.int64).view(2, 4) * 36, sign, 0.5, 8)
    assert torch.equal(layer.codes, torch.arange(8, dtype=torch.uint8) * 36)
    layer.load_packed(torch.tensor([True, False] * 4), sign, 0.5, 1)
    assert torch.equal(layer.codes, torch.tensor([1, 0] * 4, dtype=torch.uint8)) and layer.bits == 1


def test_optimizer_settings_at_their_bounds():
    """check_settings: momentum in [0, 1) (0 allowed, below 0 not), lambda >= 0 (0 allowed)."""
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    qn.BitPlaneOptimizer(qm, lr=0.1, momentum=0.0, lam=0.0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        qn.BitPlaneOptimizer(qm, lr=0.1, momentum=-0.1)


@pytest.mark.parametrize("kw, name", [(dict(lam=float("inf")), "lambda"), (dict(lr=float("inf")), "lr")])
def test_optimizer_refuses_infinite_settings(kw, name):
    """lambda = inf made every group-lasso coefficient inf, so g_s was inf and every layer's step
    was skipped (codes never moved, no error); lr = inf was refused only at the first step. Both
    are refused when the optimizer is built, as NaN is."""
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    kw = dict(dict(lr=0.1), **kw)
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        qn.BitPlaneOptimizer(qm, **kw)


def test_every_skipped_layer_step_is_counted():
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    opt = qn.BitPlaneOptimizer(qm, lr=0.1)
    F.cross_entropy(qm(torch.randn(4, 1, 8, 8)), torch.randint(0, 10, (4,))).backward()
    layers = qn.bit_layers(qm)
    layers[1][1].sink.grad.view(-1)[0] = float("nan")
    layers[3][1].sink.grad.view(-1)[5] = float("inf")
    opt.step()
    assert opt.skipped == 2


def test_state_bytes_count_every_kept_byte():
    """Per layer: the codes (n), the sign bitmap, the scale and the sink's one float; the
    optimizer: N_l bytes per weight of momentum codes and g_s (4 bytes)."""
    qm = qn.small_cnn(quantized=True, bits=[2, 3, 4, 5], image_size=8)
    opt = qn.BitPlaneOptimizer(qm, lr=0.1)
    F.cross_entropy(qm(torch.randn(4, 1, 8, 8)), torch.randint(0, 10, (4,))).backward()
    opt.step()
    layers = [m for _, m in qn.bit_layers(qm)]
    assert [m.state_bytes() for m in layers] == [m.numel + fk.bitmap_nbytes(m.numel) + 8 for m in layers]
    assert opt.state_bytes() == sum(m.bits * m.numel + 4 for m in layers)
    n = sum(m.numel for m in layers)
    assert qn.state_bytes_per_weight(qm, opt) == sum(m.numel + fk.bitmap_nbytes(m.numel) + 8 + m.bits * m.numel + 4
                                                     for m in layers) / n


def test_a_layer_that_changes_width_gets_a_fresh_momentum_buffer():
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    opt = qn.BitPlaneOptimizer(qm, lr=0.1)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    F.cross_entropy(qm(x), y).backward()
    opt.step()
    layer = qn.bit_layers(qm)[2][1]
    assert opt.state[2]["mom"].shape == (4, layer.numel)
    layer.load_float(torch.randn(layer.weight_shape), 6)
    opt.zero_grad()
    F.cross_entropy(qm(x), y).backward()
    opt.step()
    assert opt.state[2]["mom"].shape == (6, layer.numel) and opt.skipped == 0
    assert int(layer.codes.max()) < 64


def test_load_float_refuses_another_shape_of_the_same_size():
    layer = qn.BitLinear(6, 4, bits=3)
    with pytest.raises(ValueError, match=r"weight of shape \(6, 4\) does not fit a layer of shape \(4, 6\)"):
        layer.load_float(torch.randn(6, 4), 3)


def test_load_packed_takes_a_uint8_sign_bitmap_only():
    layer = qn.BitLinear(4, 2, bits=3)
    codes = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="expected a uint8 sign bitmap of 4 bytes, got torch.int8 of 4"):
        layer.load_packed(codes, torch.zeros(4, dtype=torch.int8), 0.5, 3)


def test_load_codes_needs_one_sign_per_weight():
    layer = qn.BitLinear(4, 2, bits=3)  # 8 weights: a 4-byte bitmap, as 5 signs would pack to
    with pytest.raises(ValueError, match="expected 8 signs, got 5"):
        layer.load_codes(torch.zeros(8, dtype=torch.uint8), torch.zeros(5, dtype=torch.bool), 0.5, 3)


def test_the_load_methods_name_what_is_wrong_before_changing_anything():
    """A float sign mask's 0.5 was taken as "not negative" and a mask of 2 was pack_codes'
    "a code does not fit in 1 bits"; a NumPy weight, a list bitmap and a str scale were
    AttributeErrors or float()'s message. Each is named now, the layer as it was; a 0/1
    integer mask and a one-element scale tensor still load."""
    layer = qn.BitLinear(4, 2, bits=3)
    state = [t.clone() for t in layer.plane_state()[:3]]
    codes, sign = torch.arange(8, dtype=torch.uint8) % 8, torch.zeros(4, dtype=torch.uint8)
    cases = [
        (lambda: layer.load_float(np.ones((2, 4), dtype=np.float32), 3), TypeError, "w must be a tensor, got ndarray"),
        (lambda: layer.load_codes(codes, torch.full((8,), 0.5), 0.5, 3), TypeError,
         "negative must be a bool mask, got torch.float32"),
        (lambda: layer.load_codes(codes, torch.full((8,), 2), 0.5, 3), ValueError,
         r"negative must be a bool mask \(or hold 0 and 1 only\)"),
        (lambda: layer.load_packed(codes, [0, 0, 0, 0], 0.5, 3), TypeError, "sign must be a uint8 tensor, got list"),
        (lambda: layer.load_packed(codes, sign, "x", 3), TypeError,
         "scale must be a number or a one-element tensor, got 'x'"),
        (lambda: layer.load_packed(codes, sign, torch.ones(3), 3), TypeError,
         "scale must be a number or a one-element tensor"),
    ]
    for call, kind, msg in cases:
        with pytest.raises(kind, match=msg):
            call()
        assert all(torch.equal(a, b) for a, b in zip(layer.plane_state()[:3], state)) and layer.bits == 3
    layer.load_codes(codes, torch.tensor([1, 0] * 4), torch.tensor([0.25]), 3)
    assert layer.sign.tolist() == [0b01010101, 0, 0, 0] and float(layer.scale.detach()) == 0.25
    assert torch.equal(layer.codes, codes)


def test_float_models_use_a_plain_relu():
    """ActQuant(None) (the float models, the fp baseline) is a plain ReLU: no clip at 6."""
    x = torch.tensor([-1.0, 3.0, 7.5])
    assert qn.ActQuant(None)(x).tolist() == [0.0, 3.0, 7.5]
    assert qn.ActQuant(16)(x).tolist() == pytest.approx([0.0, 3.0, 6.0], abs=1e-3)


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 0.0), (0.9, 5e-4), (0.0, 0.0)])
def test_float_sgd_is_torch_sgd_bit_for_bit(momentum, weight_decay):
    """qn.FloatSGD against torch.optim.SGD: groups with their own lr, a parameter without a
    gradient in some steps (skipped, its buffer kept), five steps, the same bits."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (1,), (2, 2, 3)]
    mine = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in mine]

    def groups(ps):
        return [{"params": ps[:2], "lr": 0.1}, {"params": ps[2:3], "lr": 0.0123}, {"params": ps[3:]}]
    opt = qn.FloatSGD(groups(mine), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    ref = torch.optim.SGD(groups(theirs), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    for step in range(5):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for i, (a, b) in enumerate(zip(mine, theirs)):
            skip = i == 3 and step in (1, 2)
            a.grad = None if skip else grads[i].clone()
            b.grad = None if skip else grads[i].clone()
        opt.step()
        ref.step()
        for a, b in zip(mine, theirs):
            assert torch.equal(a, b)
        opt.zero_grad()
        assert all(p.grad is None for p in mine)
    assert len(opt.buffers) == (len(shapes) if momentum else 0)


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(lr=0.1, momentum=1.0), dict(lr=0.1, weight_decay=-1.0)])
def test_float_sgd_refuses_bad_settings(bad):
    with pytest.raises(ValueError, match=next(iter(k for k in ("weight_decay", "momentum", "lr") if k in bad))):
        qn.FloatSGD([torch.zeros(1, requires_grad=True)], **bad)


@pytest.mark.parametrize("key,value", [("lr", "0.1"), ("lr", None), ("momentum", True), ("lam", 1j),
                                       ("lr", torch.ones(2))])
def test_optimizers_refuse_settings_that_are_not_numbers_by_name(key, value):
    """A setting that is not a real number was compared as one: "'<' not supported between
    instances of 'int' and 'str'" from deep inside, or a bool taken for 1. Both optimizers
    name it; NumPy numbers and one-element tensors are numbers."""
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    args = dict(lr=0.1, momentum=0.9, lam=1e-3)
    args[key] = value
    with pytest.raises(TypeError, match=f"^{key if key != 'lam' else 'lambda'} must be a number, got"):
        qn.BitPlaneOptimizer(qm, **args)
    if key != "lam":
        with pytest.raises(TypeError, match=f"^{key} must be a number, got"):
            qn.FloatSGD(qn.float_parameters(qm), **{k: v for k, v in args.items() if k != "lam"})
    ok = qn.BitPlaneOptimizer(qm, lr=np.float32(0.1), momentum=torch.tensor(0.9), lam=np.float64(1e-3))
    assert (ok.lr, ok.lam) == (float(np.float32(0.1)), 1e-3) and ok.momentum == float(torch.tensor(0.9))


@pytest.mark.parametrize("key,value,rule", [
    ("lr", -0.1, "lr must be a finite number > 0"), ("lr", float("nan"), "lr must be a finite number > 0"),
    ("lr", float("inf"), "lr must be a finite number > 0"), ("lr", 0.0, "lr must be a finite number > 0"),
    ("lr", 1e39, "lr must be a finite number > 0 that float32 holds"),  # inf in float32
    ("momentum", 0.99999999, r"momentum must be in \[0, 1\) \(below 1 - 2\*\*-25"),  # 1 in float32
    ("momentum", 1.0, r"momentum must be in \[0, 1\)"), ("momentum", float("nan"), r"momentum must be in \[0, 1\)"),
    ("weight_decay", float("inf"), "weight_decay must be a finite number >= 0"),
    ("weight_decay", 1e39, "weight_decay must be a finite number >= 0 that float32 holds"),  # inf in float32
    ("lr", None, "lr must be a number, got None"), ("momentum", "fast", "momentum must be a number, got 'fast'")])
def test_float_sgd_checks_each_groups_own_settings_as_its_arguments(key, value, rule):
    """A group's own lr was taken unchecked (lr -0.1, NaN or inf trained wrong, unsaid) and a
    bad momentum or weight_decay was refused without saying which group: each is refused by
    the arguments' rules, naming the group and the key."""
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=f"^param group 1: {rule}"):
        qn.FloatSGD([{"params": [a]}, {"params": [b], key: value}], lr=0.1, momentum=0.9)


def test_float_sgd_refuses_groups_it_cannot_read_in_one_line():
    """A bare dict was taken for its keys ("a group holds a str"), a group without params was a
    KeyError and a tensor after a dict group an IndexError."""
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError, match=r"got a dict \(give \[dict\]\)"):
        qn.FloatSGD({"params": [a]}, lr=0.1)
    with pytest.raises(ValueError, match="param group 1 has no 'params'"):
        qn.FloatSGD([{"params": [a]}, {"lr": 0.2}], lr=0.1)
    with pytest.raises(TypeError, match="param group 1 must be a dict, got a Tensor"):
        qn.FloatSGD([{"params": [a]}, b], lr=0.1)


def test_a_training_process_never_imports_dynamo():
    """A federation round in a fresh process trains without torch._dynamo (torch.optim's
    Optimizer imports it on first use: 145 MB and 0.7 s per process), for both the quantized
    and the float client."""
    import subprocess
    import sys

    code = ("import sys; from fedmpq import simulate; "
            "[simulate.run(dict(dataset='digits', n_clients=2, budgets=[2, 4], rounds=1, local_epochs=1, alg=a), "
            "progress=False) for a in ('fedmpq', 'fp')]; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_a_quantized_models_state_dict_loads_back(tmp_path):
    """load_state_dict of the model's own state_dict, strict and with assign, also through
    torch.save / torch.load(weights_only=True): the zero-stride sink is not copied into."""
    torch.manual_seed(0)
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8).eval()
    names = [n for n, _ in qm.named_parameters()]
    x = torch.randn(2, 1, 8, 8)
    torch.save(qm.state_dict(), tmp_path / "sd.pt")
    for assign in (False, True):
        other = qn.small_cnn(quantized=True, bits=4, image_size=8).eval()
        other.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True), assign=assign)
        assert torch.equal(other(x), qm(x))
        assert [n for n, _ in other.named_parameters()] == names
        assert all(s == 0 for _, m in qn.bit_layers(other) for s in m.sink.stride())
    bad = qm.state_dict()
    bad["conv1.sink"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="size mismatch for conv1.sink"):
        other.load_state_dict(bad)


def test_the_state_dict_carries_each_layers_bit_width(tmp_path):
    """A state dict saved at one set of widths loads into a model built at others with the
    saved widths (the codes alone fit any wider layer and would give other weights)."""
    torch.manual_seed(0)
    qm = qn.small_cnn(quantized=True, bits=[2, 3, 4, 5], image_size=8).eval()
    torch.save(qm.state_dict(), tmp_path / "sd.pt")
    other = qn.small_cnn(quantized=True, bits=8, image_size=8).eval()
    other.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert qn.bit_assignment(other) == [2, 3, 4, 5]
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(other(x), qm(x))
    assert not any(k.endswith("_extra_state") for k in list(qn.float_state(qm)) + list(qn.to_float_state_dict(qm)))
    bad = qm.state_dict()
    bad["conv1._extra_state"] = torch.tensor(9)
    with pytest.raises(ValueError, match="bit-width must be in 1..8, got 9"):
        other.load_state_dict(bad)


def test_codes_that_do_not_fit_the_width_are_refused_and_the_layer_left_as_it_was():
    """Codes of an 8-bit model loaded without their widths (strict=False) into a 4-bit one,
    a state dict whose width was edited down, and codes of another dtype (torch's copy would
    convert them): each layer concerned is named and left untouched, none loads wrong."""
    torch.manual_seed(0)
    sd = qn.small_cnn(quantized=True, bits=8, image_size=8).state_dict()
    assert int(sd["conv1.codes"].max()) >= 16
    other = qn.small_cnn(quantized=True, bits=4, image_size=8)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(RuntimeError) as e:
        other.load_state_dict({k: v for k, v in sd.items() if not k.endswith("_extra_state")}, strict=False)
    for layer in ("conv1", "conv2", "conv3", "linear"):
        assert f"{layer}.codes do not fit in 4 bits (the layer's bit-width): a code is" in str(e.value)
    after = other.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert qn.bit_assignment(other) == [4] * 4
    edited = dict(sd, **{"conv2._extra_state": torch.tensor(3)})
    with pytest.raises(RuntimeError, match=r"conv2.codes do not fit in 3 bits \(the state dict's bit-width\): "
                                           r"a code is \d+, codes must be < 8") as e:
        other.load_state_dict(edited)
    assert "conv1" not in str(e.value)
    assert torch.equal(other.conv2.codes, before["conv2.codes"]) and other.conv2.bits == 4
    for dtype in (torch.float32, torch.int64):
        with pytest.raises(RuntimeError, match=f"conv3.codes must be uint8 codes, got {dtype}"):
            other.load_state_dict(dict(sd, **{"conv3.codes": sd["conv3.codes"].to(dtype)}))
    with pytest.raises(RuntimeError, match="linear.sign must be a uint8 bitmap, got torch.int32"):
        other.load_state_dict(dict(sd, **{"linear.sign": sd["linear.sign"].int()}))
    other.load_state_dict(sd)  # the whole state dict, widths included, still loads
    assert qn.bit_assignment(other) == [8] * 4 and torch.equal(other.conv2.codes, sd["conv2.codes"])


def test_the_float_conversions_take_a_layer_tied_under_two_names():
    """A bit-plane layer shared by two attributes (self.b = self.a): to_float_state_dict
    leaked the alias's codes, sign, scale, sink and width as float entries, and
    load_float_state_dict then loaded the alias's old 4-bit codes over the 2-bit binarization.
    Now the alias is a float model's tied weight: listed under both names, loaded once."""
    from torch import nn

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = qn.BitLinear(5, 5, bits=4)
            self.b = self.a
            self.bn = nn.BatchNorm1d(5)

    torch.manual_seed(0)
    m = Tied()
    fs = qn.to_float_state_dict(m)
    assert sorted(fs) == ["a.bias", "a.weight", "b.bias", "b.weight", "bn.bias", "bn.num_batches_tracked",
                          "bn.running_mean", "bn.running_var", "bn.weight"]
    assert torch.equal(fs["a.weight"], fs["b.weight"]) and torch.equal(fs["a.weight"], m.a.float_weight())
    assert not any(k.rpartition(".")[2] in ("codes", "sign", "scale", "sink") for k in qn.float_state(m))
    other = Tied()
    qn.load_float_state_dict(other, fs, 2)
    assert qn.bit_assignment(other) == [2]
    want = qn.BitLinear(5, 5, bits=2)
    want.load_float(fs["a.weight"], 2)
    assert torch.equal(other.a.codes, want.codes) and torch.equal(other.a.scale, want.scale)
    with pytest.raises(ValueError, match="the state dict has no 'b.weight'"):
        qn.load_float_state_dict(Tied(), {k: v for k, v in fs.items() if k != "b.weight"}, 2)


def test_a_width_loaded_without_its_codes_is_refused():
    """A state dict holding a layer's width but not its codes, loaded with strict=False, re-read
    the layer's 4-bit codes at 8 bits (weights at 1/17 of theirs), no error. Refused by name,
    the layer left as it was; the same width without codes still loads."""
    torch.manual_seed(0)
    layer = qn.BitConv2d(2, 3, 3, bits=4)
    w = layer.float_weight()
    with pytest.raises(RuntimeError, match=r"_extra_state sets the width to 8 bits without codes: the layer's 4-bit "
                                           r"codes would be read at 8 bits"):
        layer.load_state_dict({"_extra_state": torch.tensor(8)}, strict=False)
    assert layer.bits == 4 and torch.equal(layer.float_weight(), w)
    layer.load_state_dict({"_extra_state": torch.tensor(4), "scale": torch.tensor(2.0)}, strict=False)
    assert layer.bits == 4 and layer.scale.item() == 2.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_quantized_model_in_half_precision_runs_and_trains(dtype):
    """model.half() turned the bit-plane layers' scales into float16, and every later forward
    and step raised "scale must be a one-element float32 tensor". The scale stays float32 (the
    kernels' dtype) and the weight is cast to the input's dtype: the outputs are the float32
    model's, to the half dtype's precision, and both optimizers step."""
    torch.manual_seed(0)
    m = qn.small_cnn(quantized=True, bits=4, image_size=8)
    x = torch.randn(3, 1, 8, 8)
    want = m(x)
    m.to(dtype)
    assert all(l.scale.dtype == torch.float32 for _, l in qn.bit_layers(m)) and m.bn1.weight.dtype == dtype
    y = m(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), want, rtol=0.1, atol=0.1)
    y.float().square().sum().backward()
    assert m.conv1.scale.grad.dtype == torch.float32 and m.conv1.sink.grad is not None
    codes = m.conv2.codes.clone()
    qn.BitPlaneOptimizer(m, lr=10.0).step()
    qn.FloatSGD(qn.float_parameters(m), lr=0.1).step()
    assert not torch.equal(m.conv2.codes, codes)
    m.float()
    assert m(x).dtype == torch.float32
    # a one-weight layer: its sink keeps its zero strides under .half() but not its float32
    # dtype, which dequantize refuses (G would come back rounded to the half dtype)
    one = qn.BitLinear(1, 1).to(dtype)
    assert one.sink.dtype == torch.float32
    one(torch.ones(2, 1, dtype=dtype)).float().sum().backward()
    assert one.sink.grad.dtype == torch.float32


def test_a_layers_width_is_not_set_alone_and_reduce_precision_sets_all_three():
    """`layer.bits = 2` on an 8-bit layer re-read every code at 2 bits (weights up to 85x the
    scale): refused, naming the ways that set codes, scale and width together. reduce_precision
    is fk.precision_reduction applied in place, the layer's weights W = s q / (2^N - 1) of its
    result; set_extra_state refuses a width its codes do not fit."""
    torch.manual_seed(0)
    layer = qn.BitLinear(7, 5, bits=8)
    codes, scale = layer.codes.clone(), layer.scale.detach().clone()
    with pytest.raises(AttributeError, match=r"BitLinear.bits is set with the layer's codes and scale, not alone.*"
                                             r"reduce_precision\(theta\)"):
        layer.bits = 2
    assert layer.bits == 8 and torch.equal(layer.codes, codes)
    with torch.no_grad():  # every code at 0..3 or 64: plane 1 (64) is the only sparse one above the low two
        layer.codes.copy_(torch.tensor([64 if i == 0 else i % 4 for i in range(35)], dtype=torch.uint8))
    codes = layer.codes.clone()
    want = fk.precision_reduction(codes, scale, 8, 5.0)
    assert want[0] < 8  # the case reduces
    assert layer.reduce_precision(5.0) == want[0] == layer.bits
    assert torch.equal(layer.codes, want[1]) and torch.equal(layer.scale.detach(), want[2])
    w = fk.dequantize(want[1], layer.sign, want[2], want[0], fk.sink_like((5, 7)))
    assert torch.equal(layer.float_weight(), w)
    wide = qn.BitLinear(7, 5, bits=8)
    with pytest.raises(ValueError, match=r"the state dict's bit-width 2 does not fit the layer's codes: a code is "
                                         r"\d+, codes must be < 4"):
        wide.set_extra_state(torch.tensor(2))
    assert wide.bits == 8
    narrow = qn.BitLinear(7, 5, bits=2)
    narrow.set_extra_state(np.int64(6))  # wider always fits
    assert narrow.bits == 6


def test_a_layer_pickled_whole_before_the_width_was_read_only_still_loads(tmp_path):
    """Such a layer's __dict__ held the width as "bits", which the read-only property now
    shadows: unpickling it (torch.save of a whole model) moves it to where the property reads."""
    torch.manual_seed(0)
    model = qn.small_cnn(quantized=True, bits=[2, 3, 4, 5], image_size=8).eval()
    for _, layer in qn.bit_layers(model):
        layer.__dict__["bits"] = layer.__dict__.pop("_bits")  # the old layout
    torch.save(model, tmp_path / "model.pt")
    back = torch.load(tmp_path / "model.pt", weights_only=False)
    assert qn.bit_assignment(back) == [2, 3, 4, 5]
    assert all("bits" not in layer.__dict__ for _, layer in qn.bit_layers(back))
    for _, layer in qn.bit_layers(model):
        layer.__dict__["_bits"] = layer.__dict__.pop("bits")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("bad", [4.5, 2.7, True])
def test_a_bit_width_that_is_not_an_integer_is_refused_not_truncated(bad):
    with pytest.raises(TypeError, match=r"bits\[1\] must be an int"):
        qn.small_cnn(quantized=True, bits=[4, bad, 4, 4], image_size=8)
    with pytest.raises(TypeError, match="bits must be an int"):
        qn.small_cnn(quantized=True, bits=bad, image_size=8)
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    state = qn.to_float_state_dict(qm)
    with pytest.raises(TypeError, match=r"bits\[1\] must be an int"):
        qn.load_float_state_dict(qm, state, [4, bad, 4, 4])
    with pytest.raises(TypeError, match="bits must be an int"):
        qn.load_float_state_dict(qm, state, bad)
    # integers of NumPy and torch still count
    assert qn.bit_assignment(qn.small_cnn(quantized=True, bits=np.int64(3), image_size=8)) == [3] * 4
    assert qn.bit_assignment(qn.load_float_state_dict(qm, state, torch.tensor([2, 3, 4, 5]))) == [2, 3, 4, 5]


def test_a_layer_with_no_inputs_is_made_as_nn_linear_makes_one():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not torch's "Initializing zero-element tensors is a no-op"
        layer = qn.BitLinear(0, 3, bits=4)
    out = layer(torch.randn(2, 0))
    assert out.shape == (2, 3) and torch.equal(out, layer.bias.detach().expand(2, 3))


def test_a_conv_takes_kernel_sizes_as_nn_conv2d_does():
    """(height, width) kernels, pair strides and paddings, as nn.Conv2d: the output is conv2d
    of the de-quantized weight (a tuple kernel_size failed in int() before)."""
    layer = qn.BitConv2d(3, 4, (1, 3), stride=(2, 1), padding=(0, 1), bits=4)
    x = torch.randn(2, 3, 5, 6)
    w = layer.quantized_weight().detach()
    assert w.shape == (4, 3, 1, 3)
    assert torch.equal(layer(x), F.conv2d(x, w, None, (2, 1), (0, 1)))
    assert qn.BitConv2d(3, 4, 3).weight_shape == (4, 3, 3, 3)
    for bad in ((3, 3, 3), (0, 3), (2.5, 3), True):
        with pytest.raises(ValueError, match="kernel_size must be an int >= 1 or a pair"):
            qn.BitConv2d(3, 4, bad)


def test_layer_sizes_are_named_and_numpy_integers_are_sizes():
    """None, 3.5, True or a negative size reached torch as "zeros(): argument 'size' must be
    tuple of ints" or "Dimension size must be non-negative", and a NumPy kernel size was
    "'numpy.int64' object is not iterable": each is named; NumPy integers are sizes, 0 too."""
    for make, names in ((lambda a, b: qn.BitLinear(a, b, bits=4), ("in_features", "out_features")),
                        (lambda a, b: qn.BitConv2d(a, b, 3, bits=4), ("in_channels", "out_channels"))):
        for i, name in enumerate(names):
            for bad, err in ((None, TypeError), (3.5, TypeError), (True, TypeError), ("4", TypeError),
                             (-1, ValueError)):
                args = [3, 4]
                args[i] = bad
                with pytest.raises(err, match=f"^{name} must be an int >= 0, got"):
                    make(*args)
    assert qn.BitLinear(np.int64(3), np.int32(2), bits=4).weight_shape == (2, 3)
    assert qn.BitLinear(0, 2, bits=4).weight_shape == (2, 0)
    conv = qn.BitConv2d(np.int64(3), 4, np.int64(3), bits=4)
    assert conv.weight_shape == (4, 3, 3, 3) and type(conv.in_channels) is int
    assert qn.BitConv2d(3, 4, (np.int64(1), 3), bits=4).weight_shape == (4, 3, 1, 3)


def test_model_arguments_are_named():
    """act_bits was refused as "bits" (ActQuant's own name), a non-int image_size or depth as
    "'<' not supported between instances of 'NoneType' and 'int'"."""
    for build in (qn.resnet20, qn.small_cnn):
        for bad, err in (("x", TypeError), (3.5, TypeError), (0, ValueError), (True, TypeError)):
            with pytest.raises(err, match="^act_bits must be"):
                build(quantized=True, act_bits=bad)
    for bad in (None, "28", 28.0):
        with pytest.raises(TypeError, match="^image_size must be an int, a multiple of 4"):
            qn.small_cnn(image_size=bad)
    with pytest.raises(ValueError, match="^image_size must be a multiple of 4"):
        qn.small_cnn(image_size=30)
    from fedmpq.nn.models import CifarResNet

    for bad in (None, 20.0, 21, True):
        with pytest.raises(ValueError, match="^depth must be 6k \\+ 2 >= 8, got"):
            CifarResNet(depth=bad)
    assert qn.small_cnn(quantized=True, act_bits=np.int64(16), image_size=8).act1.bits == 16


def test_models_take_numpy_ints_and_refuse_a_non_bool_quantized():
    """A sweep's np.arange gives NumPy ints: depth, num_classes, in_channels and image_size
    take them (depth was refused as not 6k + 2) and the model holds Python ints; a quantized
    flag that is not a bool ("no" was true: a bit-plane model) is named."""
    from fedmpq.nn.models import CifarResNet

    m = CifarResNet(depth=np.int64(8), num_classes=np.int32(3), in_channels=np.int64(1))
    assert len(m.layer1) == 1 and m.linear.out_features == 3 and m.conv1.in_channels == 1
    m = qn.small_cnn(num_classes=np.int64(4), in_channels=np.int64(2), image_size=np.int64(8), quantized=True)
    assert m.linear.weight_shape == (4, 64) and m.conv1.weight_shape == (16, 2, 3, 3)
    assert m(torch.zeros(1, 2, 8, 8)).shape == (1, 4)
    for bad in (1, "no", None, np.bool_(True)):
        for build in (qn.resnet20, qn.small_cnn):
            with pytest.raises(TypeError, match="^quantized must be a bool, got"):
                build(quantized=bad)
    for kw in ({"num_classes": True}, {"in_channels": True}, {"num_classes": 3.0}, {"in_channels": np.float64(1)}):
        with pytest.raises(ValueError, match="^(num_classes|in_channels) must be an int"):
            qn.small_cnn(**kw)


def test_float_sgd_takes_each_groups_momentum_and_weight_decay_as_torch_sgd():
    """Per-group momentum and weight_decay (no decay on BatchNorm, say) are applied as
    torch.optim.SGD applies them, bit for bit; options it lacks are refused, not ignored."""
    g = torch.Generator().manual_seed(0)
    mine = [torch.randn(4, generator=g).requires_grad_() for _ in range(3)]
    theirs = [p.detach().clone().requires_grad_() for p in mine]

    def groups(ps):
        return [{"params": ps[:1], "weight_decay": 0.0}, {"params": ps[1:2], "momentum": 0.0, "lr": 0.2},
                {"params": ps[2:]}]
    opt = qn.FloatSGD(groups(mine), lr=0.1, momentum=0.9, weight_decay=0.05)
    ref = torch.optim.SGD(groups(theirs), lr=0.1, momentum=0.9, weight_decay=0.05)
    for _ in range(3):
        for a, b in zip(mine, theirs):
            a.grad = torch.randn(4, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    with pytest.raises(ValueError, match="nesterov"):
        qn.FloatSGD([{"params": mine, "nesterov": True}], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        qn.FloatSGD([{"params": mine, "momentum": 1.5}], lr=0.1)


def test_float_sgd_takes_its_params_as_torch_sgd_and_refuses_what_would_never_step():
    """A group's params given as one tensor trained as torch.optim.SGD trains it (FloatSGD took
    its rows, views whose .grad is never set, and silently never stepped); a bare tensor, a
    non-leaf tensor and a parameter listed twice (two steps per step) are refused."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 4, generator=g).requires_grad_()
    q = p.detach().clone().requires_grad_()
    opt = qn.FloatSGD([{"params": p}], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD([{"params": q}], lr=0.1, momentum=0.9)
    for _ in range(3):
        p.grad = torch.randn(3, 4, generator=g)
        q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(p, q)
    with pytest.raises(TypeError, match="got a tensor"):
        qn.FloatSGD(p, lr=0.1)
    with pytest.raises(ValueError, match="non-leaf"):
        qn.FloatSGD([p * 2], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        qn.FloatSGD([{"params": [p]}, {"params": [p], "lr": 0.2}], lr=0.1)


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_float_sgd_keeps_its_momentum_through_a_copy_of_model_and_optimizer(copy_with):
    """Buffers were keyed by id(param): a deepcopy or pickle of (model, optimizer) held the old
    ids and started the copy's momentum from zero. Two steps, a copy, two more steps: the
    same parameters as four steps of torch.optim.SGD."""
    import copy
    import pickle

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2)
    twin = copy.deepcopy(model)
    opt = qn.FloatSGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.2}], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD([{"params": [twin.weight]}, {"params": [twin.bias], "lr": 0.2}], lr=0.1, momentum=0.9)
    grads = [(torch.randn(2, 3, generator=g), torch.randn(2, generator=g)) for _ in range(4)]

    def steps(m, o, gs):
        for gw, gb in gs:
            m.weight.grad, m.bias.grad = gw.clone(), gb.clone()
            o.step()
    steps(model, opt, grads[:2])
    model, opt = copy.deepcopy((model, opt)) if copy_with == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    steps(model, opt, grads[2:])
    steps(twin, ref, grads)
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)
    assert len(opt.buffers) == 2


def test_float_sgd_refuses_an_empty_list_and_a_bit_plane_sink():
    """FloatSGD([]) stepped nothing, silently (torch.optim.SGD refuses it); a quantized model's
    model.parameters() took in the sinks, and step() failed with torch's "more than one
    element of the written-to tensor refers to a single memory location"."""
    with pytest.raises(ValueError, match="^FloatSGD got an empty parameter list"):
        qn.FloatSGD([], lr=0.1)
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    with pytest.raises(ValueError, match="zero strides: a bit-plane layer's sink.*float_parameters"):
        qn.FloatSGD(qm.parameters(), lr=0.1)
    qn.FloatSGD(qn.float_parameters(qm), lr=0.1)
    qn.FloatSGD([torch.zeros(3).as_strided((1, 3), (0, 1)).requires_grad_()], lr=0.1)  # a size-1 dim's stride is free


def test_zero_grad_takes_set_to_none_as_torch_optimizers():
    torch.manual_seed(0)
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    bit_opt = qn.BitPlaneOptimizer(qm, lr=0.1)
    sgd = qn.FloatSGD(qn.float_parameters(qm), lr=0.1)
    qm(torch.randn(2, 1, 8, 8)).sum().backward()
    bit_opt.zero_grad(set_to_none=False)
    sgd.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in qm.parameters())
    bit_opt.zero_grad(set_to_none=True)
    sgd.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in qm.parameters())


@pytest.mark.parametrize("bad", [4.5, True, "4"])
def test_an_activation_width_that_is_not_an_integer_is_refused_not_truncated(bad):
    with pytest.raises(TypeError, match="bits must be an int"):
        qn.ActQuant(bad)
    with pytest.raises(TypeError, match="bits must be an int"):
        qn.small_cnn(quantized=True, bits=4, image_size=8, act_bits=bad)
    assert qn.ActQuant(np.int64(16)).bits == 16 and qn.ActQuant(None).bits is None


def test_a_frozen_layer_stays_frozen_and_a_gradient_stays_when_the_model_is_moved():
    """Module.to() copies the sink (here channels_last; a move to a GPU alike) and the layer
    makes it again: as it was, not requires_grad=True (the frozen layer would train again)."""
    torch.manual_seed(0)
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    qm.conv1.requires_grad_(False)
    qm(torch.randn(2, 1, 8, 8)).sum().backward()
    g = qm.conv2.sink.grad.clone()
    qm.to(memory_format=torch.channels_last)
    assert not qm.conv1.sink.requires_grad and qm.conv2.sink.requires_grad
    assert all(s == 0 for s in qm.conv1.sink.stride())
    assert torch.equal(qm.conv2.sink.grad, g)
    qm.zero_grad()
    qm(torch.randn(2, 1, 8, 8)).sum().backward()
    assert qm.conv1.sink.grad is None and qm.conv2.sink.grad is not None


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_load_codes_refuses_a_scale_that_is_not_finite(scale):
    layer = qn.BitLinear(3, 2, bits=4)
    before = _codes(torch.nn.Sequential(layer))
    with pytest.raises(ValueError, match="scale must be finite"):
        layer.load_codes(torch.ones(6, dtype=torch.uint8), torch.zeros(6, dtype=torch.bool), scale, 4)
    after = _codes(torch.nn.Sequential(layer))
    assert all(torch.equal(a, b) for x, y in zip(before, after) for a, b in zip(x[:3], y[:3]))


@pytest.mark.parametrize("bad", [None, "model", 3, [torch.nn.Linear(2, 2)]])
def test_every_function_that_takes_a_model_names_one_that_is_not(bad):
    """Each was "'NoneType' object has no attribute 'named_modules'" (or '_forward_pre_hooks')."""
    from fedmpq.nn import float_planes as fp

    calls = [qn.bit_layers, lambda m: qn.BitPlaneOptimizer(m, lr=0.1), qn.batch_weights, qn.float_parameters,
             qn.regularizer, qn.bit_assignment, qn.to_float_state_dict, qn.float_state,
             lambda m: qn.load_float_state_dict(m, {}, 4), fp.float_plane_layers, fp.float_parameters]
    for call in calls:
        with pytest.raises(TypeError, match=f"model must be a torch.nn.Module, got {type(bad).__name__}$"):
            call(bad)


def test_the_optimizers_seed_is_an_int():
    """int() took a seed of 1.5 as 1 (the same draws as seed 1, unsaid); NumPy ints still count."""
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    for bad in (1.5, "1", True, None):
        with pytest.raises(TypeError, match=f"seed must be an int, got {type(bad).__name__}"):
            qn.BitPlaneOptimizer(qm, lr=0.1, seed=bad)
    assert qn.BitPlaneOptimizer(qm, lr=0.1, seed=np.int64(7)).seed == 7


def test_load_float_state_dict_checks_the_whole_state_before_loading_a_layer():
    """A state dict missing a later entry left the layers before it binarized at the new
    widths; None, a NumPy entry and a wrong shape were torch's or Python's messages."""
    torch.manual_seed(0)
    qm = qn.small_cnn(quantized=True, bits=4, image_size=8)
    state = qn.to_float_state_dict(qn.small_cnn(quantized=True, bits=8, image_size=8))
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    bad_states = [
        (None, TypeError, "state must be a mapping of names to tensors, got NoneType"),
        ({k: v for k, v in state.items() if k != "linear.weight"}, ValueError, "the state dict has no 'linear.weight'"),
        ({k: v for k, v in state.items() if k != "bn3.bias"}, ValueError, "the state dict has no 'bn3.bias'"),
        (dict(state, **{"conv3.weight": state["conv3.weight"].numpy()}), TypeError,
         "the state dict's 'conv3.weight' must be a tensor, got ndarray"),
        (dict(state, **{"conv2.weight": state["conv2.weight"][:1]}), ValueError,
         r"the state dict's 'conv2.weight' has shape \(1, "),
        (dict(state, extra=torch.zeros(1)), ValueError, r"unexpected keys in the state dict: \['extra'\]"),
    ]
    for bad, kind, msg in bad_states:
        with pytest.raises(kind, match=msg):
            qn.load_float_state_dict(qm, bad, [2, 3, 5, 6])
        after = qm.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()) and qn.bit_assignment(qm) == [4] * 4
    qn.load_float_state_dict(qm, state, [2, 3, 5, 6])
    assert qn.bit_assignment(qm) == [2, 3, 5, 6]


def test_both_optimizers_resume_a_round_from_their_state_dicts(tmp_path):
    """Neither optimizer had state_dict(): a round stopped mid-way could not go on as it would
    have. Two steps, torch.save of the model's and both optimizers' state dicts, a new model and
    new optimizers loaded from them (weights_only), two more steps: the same codes, signs,
    scales and float parameters, bit for bit, as four steps without a stop."""
    from fedmpq.client import scale_param_groups

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(4)]
    ys = [torch.randint(0, 10, (4,), generator=g) for _ in range(4)]

    def make():
        torch.manual_seed(1)
        m = qn.small_cnn(quantized=True, bits=[2, 4, 6, 8], image_size=8)
        return m, qn.BitPlaneOptimizer(m, lr=2.0, momentum=0.9, lam=1e-2, seed=7), \
            qn.FloatSGD(scale_param_groups(m, 0.1), lr=0.1, momentum=0.9)

    def steps(m, bit, sgd, batches):
        for x, y in batches:
            bit.zero_grad()
            sgd.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            bit.step()
            sgd.step()

    whole = make()
    steps(*whole, zip(xs, ys))
    first = make()
    steps(*first, list(zip(xs, ys))[:2])
    torch.save({"model": first[0].state_dict(), "bit": first[1].state_dict(), "sgd": first[2].state_dict()},
               tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = make()
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["bit"])
    resumed[2].load_state_dict(saved["sgd"])
    steps(*resumed, list(zip(xs, ys))[2:])
    assert resumed[1].steps == whole[1].steps == 4
    for (k, a), b in zip(whole[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(a, b), k
    # what does not fit is named, and nothing changes
    other = qn.BitPlaneOptimizer(qn.small_cnn(quantized=True, bits=4, image_size=8), lr=2.0)
    with pytest.raises(ValueError, match="layer 0 state does not fit the layer"):
        other.load_state_dict(saved["bit"])
    assert other.steps == 0 and not other.state
    sgd = qn.FloatSGD(qn.float_parameters(resumed[0]), lr=0.1)
    with pytest.raises(ValueError, match="groups of"):
        sgd.load_state_dict(saved["sgd"])
    with pytest.raises(ValueError, match="must be a BitPlaneOptimizer.state_dict"):
        other.load_state_dict({"lr": 1.0})


def _build_pair(name, in_channels, **kw):
    """(the model, the same model built channels_last=True with its state dict)."""
    extra = dict(image_size=8) if name == "small_cnn" else {}
    torch.manual_seed(0)
    a = qn.build(name, in_channels=in_channels, **extra, **kw)
    b = qn.build(name, in_channels=in_channels, channels_last=True, **extra, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("name,in_channels", [("resnet20", 3), ("resnet20", 1), ("small_cnn", 1)])
def test_a_channels_last_float_model_computes_the_same_in_that_layout(name, in_channels):
    """The activations are channels-last, the 1-channel input's model's too; the outputs and
    every parameter's gradient are the contiguous model's up to the convolutions' own order
    of sums; the parameters keep their layout and the state dict its keys."""
    size = 8 if name == "small_cnn" else 32
    a, b = _build_pair(name, in_channels)
    seen = []
    for m in b.modules():
        if isinstance(m, qn.ActQuant):
            m.register_forward_hook(lambda mod, i, out: seen.append(
                out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()))
    x = torch.randn(3, in_channels, size, size)
    ya, yb = a(x), b(x)
    assert seen and all(seen), seen
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert pb.stride() == pa.stride(), n
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-3, atol=1e-3 * float(pa.grad.abs().max()), msg=n)
    assert list(a.state_dict()) == list(b.state_dict())


@pytest.mark.parametrize("name,in_channels", [("resnet20", 3), ("resnet20", 1), ("small_cnn", 1)])
def test_a_channels_last_quantized_model_trains_a_step(name, in_channels):
    """4-bit weights and activations: the activations run channels-last and a whole client
    step runs (every gradient finite, no bit-plane layer step skipped). Neither outputs nor
    gradients are compared with the contiguous model's: BatchNorm's batch statistics sum in
    another order in this layout, and a last-ulp difference on a rounding boundary flips a
    4-bit activation level (0.4 at S = 6), which the next layers carry on. The quantizer
    itself is compared bit for bit, both ways, in
    tests/fedmpq_kernels/fake_quant/test_channels_last.py."""
    size = 8 if name == "small_cnn" else 32
    a, b = _build_pair(name, in_channels, quantized=True, bits=4)
    seen = []
    for m in b.modules():
        if isinstance(m, qn.ActQuant):
            m.register_forward_hook(lambda mod, i, out: seen.append(
                out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()))
    opt = qn.BitPlaneOptimizer(b, lr=0.1, lam=1e-3)
    x, y = torch.randn(8, in_channels, size, size), torch.randint(0, 10, (8,))
    with qn.batch_weights(b):
        out = b(x)
        F.cross_entropy(out, y).backward()
    assert seen and all(seen), seen
    assert torch.isfinite(out).all() and out.shape == a(x).shape
    assert all(torch.isfinite(p.grad).all() for p in b.parameters() if p.grad is not None)
    opt.step()
    assert opt.steps == 1 and opt.skipped == 0


def test_channels_last_must_be_a_bool():
    for name in ("resnet20", "small_cnn"):
        with pytest.raises(TypeError, match="channels_last must be a bool"):
            qn.build(name, channels_last="yes")


def test_a_channels_last_model_refuses_a_3d_input_as_the_contiguous_one_does():
    for cl in (False, True):
        with pytest.raises(ValueError, match="expected 4D input"):
            qn.resnet20(channels_last=cl)(torch.randn(3, 32, 32))
