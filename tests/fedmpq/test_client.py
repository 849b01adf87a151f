"""fedmpq.client: a download in, an upload out, through the wire payloads only."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq import client, wire
from fedmpq import nn as qn

BUILD = functools.partial(qn.small_cnn, image_size=8, in_channels=1, num_classes=10)


def _download(bits, client_id=3, round_=1, seed=0):
    torch.manual_seed(seed)
    sd = BUILD(quantized=False).state_dict()
    names = [n for n, _ in qn.bit_layers(BUILD(quantized=True, bits=1))]
    layers = {f"{n}.weight": wire.QuantizedTensor.from_float(sd[f"{n}.weight"], b) for n, b in zip(names, bits)}
    floats = {k: v for k, v in sd.items() if k not in layers}
    return wire.encode_download(wire.Download(client_id, round_, layers, floats)), layers


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() / 5
    return x, y


@pytest.mark.parametrize("alg", ["fedmpq", "aqfl"])
def test_client_turns_a_download_into_an_upload(alg):
    dl, layers = _download([4, 2, 6, 3])
    x, y = _data()
    cfg = client.TrainConfig(alg=alg, local_epochs=1, threshold=2.0)
    r = client.client_update(dl, x, y, BUILD, cfg, 3, 1, 4.0)
    up = wire.decode_upload(r.upload)
    assert (up.client_id, up.round, up.num_samples, up.budget) == (3, 1, 256, 4.0)
    assert set(up.layers) == set(layers)
    for k, q in up.layers.items():
        assigned = layers[k].bits
        assert 1 <= q.bits <= assigned
        assert up.deltas[k] == assigned - q.bits
        if alg == "aqfl":
            assert q.bits == assigned and up.deltas[k] == 0
        assert q.scale >= 0
    assert "linear.bias" in up.floats and "bn1.running_mean" in up.floats
    assert 0.0 <= r.train_accuracy <= 1.0


def test_the_same_seed_gives_the_same_upload():
    dl, _ = _download([3, 3, 3, 3])
    x, y = _data()
    cfg = client.TrainConfig(local_epochs=1, seed=5)
    a = client.client_update(dl, x, y, BUILD, cfg, 3, 1, 3.0).upload
    b = client.client_update(dl, x, y, BUILD, cfg, 3, 1, 3.0).upload
    assert a == b


def test_a_download_for_someone_else_or_malformed_is_refused():
    dl, _ = _download([4, 4, 4, 4], client_id=2)
    x, y = _data(64)
    with pytest.raises(ValueError, match="client 2"):
        client.client_update(dl, x, y, BUILD, client.TrainConfig(), 3, 1, 4.0)
    with pytest.raises(wire.WireFormatError):
        client.client_update(dl[:-3], x, y, BUILD, client.TrainConfig(), 2, 1, 4.0)
    with pytest.raises(ValueError, match="unknown algorithm"):
        client.client_update(dl, x, y, BUILD, client.TrainConfig(alg="sgd"), 2, 1, 4.0)


def test_fp_client_trains_a_float_model():
    torch.manual_seed(0)
    sd = BUILD(quantized=False).state_dict()
    dl = wire.encode_model(wire.Model(1, sd))
    x, y = _data()
    r = client.client_update(dl, x, y, BUILD, client.TrainConfig(alg="fp"), 0, 1, 32.0)
    m = wire.decode_model(r.upload)
    assert set(m.tensors) == set(sd)
    assert not torch.equal(m.tensors["conv1.weight"], sd["conv1.weight"])


@pytest.mark.parametrize("n,bs,sizes", [(65, 32, [32, 33]), (80, 32, [32, 32, 16]), (75, 32, [32, 43]), (64, 32, [32, 32]), (5, 32, [5]),
                                        (1, 32, [1]), (3, 2, [3]), (4, 2, [2, 2]), (0, 8, [])])
def test_batches_cover_every_sample_once_and_never_leave_a_tiny_remainder(n, bs, sizes):
    # A batch of one made train-mode BatchNorm epsilon-dominated and sent a scale through zero.
    batches = list(client._batches(n, bs, seed=3))
    assert [len(b) for b in batches] == sizes
    assert sorted(torch.cat(batches).tolist() if batches else []) == list(range(n))


def test_scale_learning_rates_follow_the_rule():
    import math
    model = BUILD(quantized=True, bits=[2, 4, 6, 8])
    layers = [layer for _, layer in qn.bit_layers(model)]
    groups = client.scale_param_groups(model, 0.1, "lsq")
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(by_param) == len(qn.float_parameters(model))  # every float parameter exactly once
    for layer in layers:  # e.g. the classifier: 640 weights at 8 bits -> 0.1 / sqrt(640 * 255)
        assert by_param[id(layer.scale)] == pytest.approx(0.1 / math.sqrt(layer.numel * (2 ** layer.bits - 1)))
    scales = {id(layer.scale) for layer in layers}
    assert all(lr == 0.1 for pid, lr in by_param.items() if pid not in scales)
    # one group per rate: layers of one size and width share one (a group is a call of SGD)
    resnet = qn.resnet20(quantized=True, bits=4)
    lrs = [g["lr"] for g in client.scale_param_groups(resnet, 0.1, "lsq")]
    assert len(lrs) == len(set(lrs)) == 1 + 7
    assert [g["lr"] for g in client.scale_param_groups(model, 0.1, "sgd")] == [0.1]
    with pytest.raises(ValueError, match="scale_lr must be one of"):
        client.scale_param_groups(model, 0.1, "adam")


def test_scale_learning_rates_of_a_layer_without_weights():
    """A bit-plane layer of 0 weights among others: its scale gets no gradient (dL/ds sums over
    no weights), so any rate does; lr / sqrt(n (2^N - 1)) raised ZeroDivisionError there, and
    a local step with such a model never ran."""
    model = torch.nn.Sequential(qn.BitLinear(0, 3, bits=4), qn.BitLinear(3, 2, bits=4))
    groups = client.scale_param_groups(model, 0.1, "lsq")
    lrs = [g["lr"] for g in groups for p in g["params"] if p is model[1].scale]
    assert lrs == [pytest.approx(0.1 / (3 * 2 * 15) ** 0.5)]
    assert all(math.isfinite(g["lr"]) for g in groups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("alg", ["fedmpq", "aqfl", "fp"])
def test_a_round_replayed_from_a_cuda_graph_uploads_the_eager_rounds_bytes(alg, monkeypatch):
    """cuda_graph: 2 warm-up steps, one capture, replays, and the eager remainder batch of
    each epoch (100 samples at batch 32: 32, 32, 36): the same upload, byte for byte, as
    every step run eagerly (deterministic cuDNN, so that both make the same convolutions)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    graphs = []

    class Recorded(client.StepGraph):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            graphs.append(self)

    monkeypatch.setattr(client, "StepGraph", Recorded)
    if alg == "fp":
        torch.manual_seed(0)
        dl = wire.encode_model(wire.Model(1, BUILD(quantized=False).state_dict()))
        cid = 0
    else:
        dl, _ = _download([4, 2, 6, 3])
        cid = 3
    x, y = _data(100)
    ups = {}
    for graphed in (False, True):
        cfg = client.TrainConfig(alg=alg, local_epochs=3, device="cuda", cuda_graph=graphed, seed=1)
        r = client.client_update(dl, x, y, BUILD, cfg, cid, 1, 4.0)
        ups[graphed] = r
    assert len(graphs) == 1
    g = graphs[0]
    # epoch 1: 2 warm-up steps, then the remainder; epochs 2 and 3: the capture on the first
    # batch, 2 replays each, and the remainder
    assert (g.eager, g.replays) == (2 + 3, 4), (g.eager, g.replays)
    assert ups[True].upload == ups[False].upload
    assert ups[True].train_loss == ups[False].train_loss and ups[True].train_accuracy == ups[False].train_accuracy


def test_a_step_graph_needs_the_data_on_a_cuda_device():
    x, y = _data(8)
    with pytest.raises(ValueError, match="needs the data on one CUDA device"):
        client.StepGraph(lambda xb, yb: None, x, y, 4)


def _spy_optimizers(monkeypatch):
    """Record what train_local builds: the bit-plane optimizer's settings, SGD's parameter
    groups, and the order of their steps."""
    seen = {"bit": [], "sgd": [], "steps": []}

    class BitSpy(qn.BitPlaneOptimizer):
        def __init__(self, model, **kw):
            super().__init__(model, **kw)
            seen["bit"].append(kw)

        def step(self):
            seen["steps"].append("bit")
            super().step()

    class SGDSpy(qn.FloatSGD):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            seen["sgd"].append(self)

        def step(self):
            seen["steps"].append("sgd")
            return super().step()

    monkeypatch.setattr(qn, "BitPlaneOptimizer", BitSpy)
    monkeypatch.setattr(qn, "FloatSGD", SGDSpy)
    return seen


def test_the_configs_settings_reach_the_optimizers(monkeypatch):
    """ALGORITHM.md, "Bit-plane optimizer": the planes take lr, momentum and lambda from the
    config, each step before SGD moves the scales; the float parameters (scales included)
    take SGD with momentum and no weight decay. fp (FedAvg) takes SGD with the weight decay.
    The draws are seeded apart for every (round, client)."""
    seen = _spy_optimizers(monkeypatch)
    x, y = _data(64)
    cfg = client.TrainConfig(lr=0.05, momentum=0.5, lam=3e-3, weight_decay=1e-3, batch_size=32, seed=7)
    seeds = []
    for round_, cid in ((1, 0), (1, 1), (2, 0)):
        torch.manual_seed(0)
        model = BUILD(quantized=True, bits=3)
        seen["bit"].clear(), seen["sgd"].clear(), seen["steps"].clear()
        client.train_local(model, x, y, cfg, cid, round_, quantized=True)
        (kw,), (sgd,) = seen["bit"], seen["sgd"]
        assert (kw["lr"], kw["momentum"], kw["lam"]) == (0.05, 0.5, 3e-3)
        seeds.append(kw["seed"])
        assert seen["steps"] == ["bit", "sgd"] * 2  # two batches; planes first, then SGD
        params = [p for g in sgd.groups for p in g["params"]]
        assert {id(p) for p in params} == {id(p) for p in qn.float_parameters(model)}
        assert {id(m.scale) for _, m in qn.bit_layers(model)} <= {id(p) for p in params}
        assert sgd.weight_decay == 0 and sgd.momentum == 0.5
    assert len(set(seeds)) == 3
    fm = BUILD(quantized=False)
    seen["sgd"].clear()
    client.train_local(fm, x, y, cfg, 0, 1, quantized=False)
    (sgd,) = seen["sgd"]
    assert sgd.weight_decay == 1e-3 and sgd.momentum == 0.5 and all(g["lr"] == 0.05 for g in sgd.groups)
    assert sum(len(g["params"]) for g in sgd.groups) == len(list(fm.parameters()))


def test_every_epoch_and_round_draws_its_own_shuffle(monkeypatch):
    """Local training reshuffles the samples every epoch, round and client: each epoch's
    batches cover the samples once, in an order of its own."""
    orders = []
    real = client._batches

    def recording(*a, **kw):
        batches = list(real(*a, **kw))
        orders.append(torch.cat(batches).tolist())
        return iter(batches)

    monkeypatch.setattr(client, "_batches", recording)
    x, y = _data(64)
    cfg = client.TrainConfig(alg="aqfl", local_epochs=3, batch_size=16)
    for round_, cid in ((1, 0), (2, 0), (1, 1)):
        client.train_local(BUILD(quantized=True, bits=2), x, y, cfg, cid, round_, quantized=True)
    assert len(orders) == 9
    assert all(sorted(o) == list(range(64)) for o in orders)
    assert len({tuple(o) for o in orders}) == 9


def test_reported_accuracy_and_loss_are_the_last_epochs():
    """train_local reports the last epoch's accuracy and sample-weighted mean loss, computed
    here from the outputs of that epoch's forwards (every label 0)."""
    x, _ = _data(64)
    y = torch.zeros(64, dtype=torch.int64)
    torch.manual_seed(0)
    model = BUILD(quantized=True, bits=4)
    outs = []
    model.register_forward_hook(lambda m, a, out: outs.append(out.detach().clone()))
    cfg = client.TrainConfig(local_epochs=2, batch_size=32, lr=0.1)
    acc, loss, _ = client.train_local(model, x, y, cfg, 0, 1, quantized=True)
    assert len(outs) == 4
    last = torch.cat(outs[2:])
    want_loss = sum(float(torch.nn.functional.cross_entropy(o, torch.zeros(len(o), dtype=torch.int64))) * len(o)
                    for o in outs[2:]) / 64
    first = torch.cat(outs[:2])
    assert float(torch.nn.functional.cross_entropy(first, torch.zeros(64, dtype=torch.int64))) != pytest.approx(want_loss)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert acc == pytest.approx(float((last.argmax(1) == 0).double().mean()))


def test_a_negative_scale_uploads_as_a_positive_scale_with_flipped_signs():
    """SGD may take a scale below 0: the upload carries |s| and every sign flipped, so it
    de-quantizes to the layer's weight s*sigma*q/L; the sign bitmap's bits past n stay 0 (the
    wire layout). conv1 has 144 weights: its last bitmap word is half padding."""
    torch.manual_seed(0)
    model = BUILD(quantized=True, bits=3)
    _, layer = qn.bit_layers(model)[0]
    with torch.no_grad():
        layer.scale.fill_(-0.7)
    want = layer.float_weight()
    up = wire.decode_upload(wire.encode_upload(client.make_upload(model, 0, 1, 10, 3.0, {})))
    q = up.layers["conv1.weight"]
    assert q.scale == pytest.approx(0.7)
    import numpy as np
    bits = np.unpackbits(q.signs.numpy(), bitorder="little")
    assert not bits[layer.numel:].any()
    neg = torch.from_numpy(bits[:layer.numel].astype(bool))
    codes = layer.codes.to(torch.float32)
    got = torch.where(neg, -1.0, 1.0) * q.scale * codes / 7
    torch.testing.assert_close(got.reshape(want.shape), want)


def test_precision_reduction_uses_the_configs_threshold():
    """theta = 100 %: every plane is below it, so every layer is pruned to 1 bit and reports
    Delta = assigned - 1."""
    dl, layers = _download([4, 2, 6, 3])
    x, y = _data(64)
    up = wire.decode_upload(client.client_update(dl, x, y, BUILD, client.TrainConfig(threshold=100.0), 3, 1, 4.0).upload)
    for k, q in up.layers.items():
        assert q.bits == 1 and up.deltas[k] == layers[k].bits - 1, k


@pytest.mark.parametrize("theta", [2.0, 60.0, 90.0])
def test_each_layer_is_reduced_with_the_configs_threshold(theta, monkeypatch):
    """Every layer's upload has the bits, codes and scale that fk.precision_reduction gives
    its trained codes at the config's theta (here 2 % keeps every plane, 60 % drops one of each
    layer, 90 % more: 4/2/6/3 bits -> 1/1/3/1)."""
    from fedmpq.nn import layers as qlayers
    seen = []
    real = qlayers._BitWeight.reduce_precision

    def spy(self, t):
        seen.append((self.codes.detach().clone(), self.scale.detach().clone(), self.bits, t))
        return real(self, t)

    monkeypatch.setattr(qlayers._BitWeight, "reduce_precision", spy)
    dl, layers = _download([4, 2, 6, 3])
    x, y = _data(64)
    up = wire.decode_upload(client.client_update(dl, x, y, BUILD, client.TrainConfig(threshold=theta), 3, 1, 4.0).upload)
    assert len(seen) == len(up.layers)
    for (k, q), (codes, scale, bits, t) in zip(up.layers.items(), seen):
        assert t == theta and bits == layers[k].bits, k
        want_bits, want_codes, want_scale = fk.precision_reduction(codes, scale, bits, theta)
        assert q.bits == want_bits and up.deltas[k] == bits - want_bits, k
        assert torch.equal(q.codes(), want_codes.reshape(q.shape).to(torch.uint8)), k
        assert q.scale == pytest.approx(float(want_scale), rel=1e-6), k


def test_a_download_for_another_round_is_refused():
    dl, _ = _download([4, 4, 4, 4], client_id=3, round_=2)
    x, y = _data(64)
    with pytest.raises(ValueError, match="is for client 3 round 2, not 3 round 1"):
        client.client_update(dl, x, y, BUILD, client.TrainConfig(), 3, 1, 4.0)


def test_load_download_refuses_a_download_of_another_model():
    """Every quantized layer and every float entry of the model, in its shape, and nothing else."""
    dl, _ = _download([4, 2, 6, 3])
    model = BUILD(quantized=True, bits=1)
    d = wire.decode_download(dl)
    client.load_download(model, d)  # the right one loads
    assert [m.bits for _, m in qn.bit_layers(model)] == [4, 2, 6, 3]
    name = next(iter(d.floats))
    cases = [
        (dict(floats={k: v for k, v in d.floats.items() if k != name}), f"the download lacks \\['{name}'\\]"),
        (dict(floats={**d.floats, "bogus.bias": torch.zeros(2)}), "entries the model lacks: \\['bogus.bias'\\]"),
        (dict(layers={**d.layers, "bogus.weight": next(iter(d.layers.values()))}),
         "quantized entries the model lacks: \\['bogus.weight'\\]"),
    ]
    first, q = next(iter(d.layers.items()))
    t = q.shape[::-1] if q.shape[::-1] != q.shape else (q.numel,)
    cases.append((dict(layers={**d.layers, first: wire.QuantizedTensor(t, q.bits, q.scale, q.planes, q.signs)}),
                  f"{first} has shape"))  # the same number of weights in another shape
    for change, match in cases:
        bad = wire.Download(d.client_id, d.round, change.get("layers", d.layers), change.get("floats", d.floats))
        with pytest.raises(ValueError, match=match):
            client.load_download(BUILD(quantized=True, bits=1), bad)


def test_a_loss_that_is_not_finite_stops_local_training():
    x, y = _data(32)
    x[3] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        client.train_local(BUILD(quantized=True, bits=2), x, y, client.TrainConfig(alg="aqfl"), 0, 1, quantized=True)


def test_fp_uploads_float32():
    torch.manual_seed(0)
    sd = BUILD(quantized=False).state_dict()
    x, y = _data(64)
    r = client.client_update(wire.encode_model(wire.Model(1, sd)), x, y, BUILD, client.TrainConfig(alg="fp"), 0, 1, 32.0)
    m = wire.decode_model(r.upload)
    assert {k: v.dtype for k, v in m.tensors.items()} == {k: v.dtype for k, v in sd.items()}


def test_skipped_bit_plane_steps_are_said(caplog):
    """A layer step whose gradient, scale or coefficient is not finite in float32 is skipped
    (the layer kept as it was); the optimizer counted them and nobody read the count, so a run
    whose lr or lambda was too large trained less, or nothing, and looked like one that did.
    lr 1e20 takes some scales past float32 within two epochs; at 0.1 nothing is skipped."""
    import logging

    x, y = _data(64)
    caplog.set_level(logging.WARNING, logger="fedmpq")
    for lr, said in ((0.1, False), (1e20, True)):
        caplog.clear()
        torch.manual_seed(0)
        cfg = client.TrainConfig(lr=lr, local_epochs=2, batch_size=16, scale_lr="sgd")
        client.train_local(BUILD(quantized=True, bits=4), x, y, cfg, 5, 3, quantized=True)
        msgs = [r.getMessage() for r in caplog.records if "bit-plane layer steps" in r.getMessage()]
        assert bool(msgs) == said, (lr, msgs)
    import re
    m = re.fullmatch(r"round 3: client 5 skipped (\d+) bit-plane layer steps of 8 steps x 4 layers .*lambda or lr "
                     r"too large\?\)", msgs[0])  # 64 samples in batches of 16, 2 epochs; small_cnn's 4 layers
    assert m and 0 < int(m.group(1)) <= 8 * 4, msgs
