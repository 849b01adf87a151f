"""The server against faulty clients: an upload with another layout (none, part, extra
entries, wrong shapes) or a value that is not finite is left out with a logged reason,
wherever it comes in the round, and the honest uploads are aggregated exactly as without it;
a round with no valid upload keeps the model. The robust rules against a literal statement."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedmpq import aggregate, config, wire
from fedmpq.server import Server

SMALL = config.check_config(dict(n_clients=4, budgets=[2, 4, 6, 8]))


def _server(alg="fedmpq", rule="mean"):
    from fedmpq import data

    ds = data.load("digits")
    return Server(alg, config.model_builder(SMALL, ds), budgets={k: b for k, b in enumerate(SMALL["budgets"])},
                  num_samples={k: 100 + k for k in range(4)}, seed=0, rule=rule)


def _honest(srv, k, r=1, bump=0.0):
    """Client k's upload of round r: the global model nudged by ``bump``, at its budget."""
    g = srv.global_state
    layers = {n: wire.QuantizedTensor.from_float(g[n] + bump * (k + 1), int(srv.budgets[k])) for n in srv.layer_sizes}
    floats = {n: (v + bump * (k + 1) if v.is_floating_point() else v) for n, v in g.items() if n not in srv.layer_sizes}
    return wire.encode_upload(wire.Upload(k, r, 100 + k, float(srv.budgets[k]), layers, {n: 0 for n in layers}, floats))


def _faulty(srv, how, k=0, r=1):
    g = srv.global_state
    q = {n: wire.QuantizedTensor.from_float(g[n], 4) for n in srv.layer_sizes}
    f = {n: v.clone() for n, v in g.items() if n not in srv.layer_sizes}
    if how == "empty":
        q, f = {}, {}
    elif how == "one layer":
        q, f = dict(list(q.items())[:1]), {}
    elif how == "partial":
        q.pop(next(iter(q)))
    elif how == "extra":
        f["bogus.weight"] = torch.ones(3)
    elif how == "wrong shape":
        n = next(iter(q))
        q[n] = wire.QuantizedTensor.from_float(torch.randn(7, 3), 4)
    elif how == "float as quantized":
        n = next(k_ for k_ in f if f[k_].is_floating_point())
        q[n] = wire.QuantizedTensor.from_float(f.pop(n), 4)
    elif how in ("nan float", "inf float"):
        n = next(k_ for k_ in f if f[k_].is_floating_point())
        f[n][0] = float("nan") if how == "nan float" else float("inf")
    return wire.encode_upload(wire.Upload(k, r, 100, 4.0, q, {n: 0 for n in q}, f))


def _with_scale(data: bytes, value: float) -> bytes:
    """The upload with its first layer's scale replaced (checksum resealed): a NaN/inf scale."""
    import struct
    import zlib

    p = wire.parse(data, wire.KIND_UPLOAD)
    b = bytearray(data)
    off = p.offset[p.dtype == wire.DT_QUANTIZED].min() - 8 * int((p.dtype == wire.DT_QUANTIZED).sum()) + 4
    struct.pack_into("<f", b, int(off), value)
    crc = zlib.crc32(bytes(b[32:]), zlib.crc32(bytes(b[20:32]), zlib.crc32(bytes(b[:16]))))
    struct.pack_into("<I", b, 16, crc)
    return bytes(b)


FAULTS = ["empty", "one layer", "partial", "extra", "wrong shape", "float as quantized", "nan float", "inf float",
          "nan scale", "inf scale"]


def _bad(srv, how, k):
    if how.endswith("scale"):
        return _with_scale(_honest(srv, k), float("nan") if how == "nan scale" else float("inf"))
    return _faulty(srv, how, k)


@pytest.mark.parametrize("how", FAULTS)
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_faulty_upload_is_left_out_and_the_honest_ones_aggregated(how, where, caplog):
    ref = _server()
    ref.aggregate(1, {k: _honest(ref, k, bump=0.01) for k in (1, 2, 3)})  # the round without the faulty client
    srv = _server()
    faulty_k = 0 if where == "first" else 3
    honest = [k for k in range(4) if k != faulty_k][:3]
    uploads = {k: _honest(srv, k, bump=0.01) for k in honest}
    uploads[faulty_k] = _bad(srv, how, faulty_k)
    if where == "first":
        uploads = {faulty_k: uploads.pop(faulty_k), **uploads}
    with caplog.at_level(logging.WARNING, logger="fedmpq"):
        report = srv.aggregate(1, uploads)
    assert sorted(report["reported"]) == honest
    assert f"the upload of client {faulty_k} is left out" in caplog.text
    for name, v in srv.global_state.items():
        assert torch.isfinite(v.double()).all(), name
    if honest == [1, 2, 3]:
        for name, v in ref.global_state.items():
            assert torch.equal(srv.global_state[name], v), name


def test_a_round_with_no_valid_upload_keeps_the_model_and_bits(caplog):
    srv = _server()
    before = {k: v.clone() for k, v in srv.global_state.items()}
    bits = {k: list(v) for k, v in srv.assignments.items()}
    report = srv.aggregate(1, {k: _faulty(srv, "nan float", k) for k in range(4)})
    assert report["reported"] == [] and "no client reported" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in srv.global_state.items()) and srv.assignments == bits


def test_an_upload_claiming_another_client_or_round_is_left_out(caplog):
    srv = _server()
    report = srv.aggregate(2, {0: _honest(srv, 1, r=2), 1: _honest(srv, 1, r=1), 2: _honest(srv, 2, r=2)})
    assert report["reported"] == [2]
    assert "client 1's of round 2, expected client 0's" in caplog.text


@pytest.mark.parametrize("how", ["empty", "partial", "nan float", "extra"])
def test_a_faulty_float_model_is_left_out_under_fp(how, caplog):
    srv = _server("fp")
    good = {k: wire.encode_model(wire.Model(1, srv.global_state)) for k in (1, 2)}
    t = {n: v.clone() for n, v in srv.global_state.items()}
    if how == "empty":
        t = {}
    elif how == "partial":
        t.pop(next(iter(t)))
    elif how == "extra":
        t["bogus"] = torch.ones(2)
    else:
        next(v for v in t.values() if v.is_floating_point())[0] = float("nan")
    report = srv.aggregate(1, {0: wire.encode_model(wire.Model(1, t)), **good})
    assert report["reported"] == [1, 2] and "client 0 is left out" in caplog.text


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_robust_rules_match_their_statement(rule, k):
    x = torch.randn(k, 37, dtype=torch.float64)
    a = x.numpy()
    if rule == "median":
        want = np.median(a, axis=0)
    else:
        cut = max(int(0.2 * k), 1 if k >= 3 else 0)
        want = np.sort(a, axis=0)[cut:k - cut].mean(axis=0)
    assert np.allclose(aggregate.robust(x, rule).numpy(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_a_robust_server_shrugs_off_an_outlying_client(rule):
    srv = _server(rule=rule)
    mean = _server()
    ups = {k: _honest(srv, k, bump=0.01) for k in range(4)}
    ups[3] = _honest(srv, 3, bump=50.0)  # finite, well-formed, far off
    g0 = {n: v.clone() for n, v in srv.global_state.items()}
    srv.aggregate(1, ups)
    mean.aggregate(1, ups)
    for name in (n for n, v in g0.items() if v.is_floating_point()):
        moved, dragged = (srv.global_state[name] - g0[name]).abs().max(), (mean.global_state[name] - g0[name]).abs().max()
        assert moved < 1.0 < dragged, name


def test_a_bad_rule_is_refused_when_the_server_is_made():
    with pytest.raises(ValueError, match="rule must be one of"):
        _server(rule="max")


def test_each_download_holds_the_model_at_its_clients_bit_widths():
    """Clients that share a layer's bit-width share its binarization (the server makes it
    once): every download still decodes to the global model binarized at that client's own
    widths, built here one client at a time."""
    srv = _server()
    layers = len(srv.layer_sizes)
    assert layers >= 3
    widths = [[2, 4] * layers, [2] * layers, [8, 4, 1] * layers, [2, 4] * layers]  # shared and distinct
    srv.assignments = {k: w[:layers] for k, w in enumerate(widths)}
    downloads = srv.downloads(3, [0, 1, 2, 3])
    g = srv.global_state
    for k, data in downloads.items():
        d = wire.decode_download(data)
        assert (d.client_id, d.round) == (k, 3)
        for name, b in zip(srv.layer_sizes, srv.assignments[k]):
            want = wire.QuantizedTensor.from_float(g[name], b)
            got = d.layers[name]
            assert got.bits == b and got.scale == want.scale
            assert torch.equal(got.planes, want.planes) and torch.equal(got.signs, want.signs)
    # clients 0 and 3 have the same widths: the same layers
    d0, d3 = wire.decode_download(downloads[0]), wire.decode_download(downloads[3])
    assert all(torch.equal(d0.layers[n].planes, d3.layers[n].planes) for n in srv.layer_sizes)
