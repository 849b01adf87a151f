"""fedmpq.client: a download in, an upload out, through the wire payloads only."""
from __future__ import annotations

import functools

import pytest
import torch

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
    assert [g["lr"] for g in client.scale_param_groups(model, 0.1, "sgd")] == [0.1]
    with pytest.raises(ValueError, match="scale_lr must be one of"):
        client.scale_param_groups(model, 0.1, "adam")


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
