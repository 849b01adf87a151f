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
    """Client k's upload of round r: the global model nudged by ``bump``, at its budget (it
    states its own budget and sample count, as a client does)."""
    g = srv.global_state
    layers = {n: wire.QuantizedTensor.from_float(g[n] + bump * (k + 1), int(srv.budgets[k])) for n in srv.layer_sizes}
    floats = {n: (v + bump * (k + 1) if v.is_floating_point() else v) for n, v in g.items() if n not in srv.layer_sizes}
    return wire.encode_upload(wire.Upload(k, r, 100 + k, float(srv.client_budgets[k]), layers, {n: 0 for n in layers},
                                          floats))


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
    elif how == "empty dim":  # (C,) sent as (C, 0): the same dims but one more of them (and no values)
        n = next(k_ for k_ in f if f[k_].is_floating_point() and f[k_].dim() == 1)
        f[n] = torch.zeros(*f[n].shape, 0)
    elif how == "negative running var":
        f["bn1.running_var"][1] = -0.5
    elif how in ("nan float", "inf float"):
        n = next(k_ for k_ in f if f[k_].is_floating_point())
        f[n][0] = float("nan") if how == "nan float" else float("inf")
    # Otherwise the sample count and budget the server has for client k: each fault alone.
    samples = {"other samples": 5000, "no samples": 0}.get(how, 100 + k)
    budget = 3.0 if how == "other budget" else float(srv.client_budgets[k])
    return wire.encode_upload(wire.Upload(k, r, samples, budget, q, {n: 0 for n in q}, f))


def _resealed(b: bytearray) -> bytes:
    """The bytes with their checksum recomputed (docs/FORMAT.md: over all but its own field)."""
    import struct
    import zlib

    crc = zlib.crc32(bytes(b[32:]), zlib.crc32(bytes(b[20:32]), zlib.crc32(bytes(b[:16]))))
    struct.pack_into("<I", b, 16, crc)
    return bytes(b)


def _with_budget(data: bytes, value: float) -> bytes:
    """The upload with its stated budget replaced (the encoder refuses a NaN one): the
    float32 after client_id, num_samples and round in the metadata at byte 32."""
    import struct

    b = bytearray(data)
    struct.pack_into("<f", b, 32 + 8 + 8 + 4, value)
    return _resealed(b)


def _with_scale(data: bytes, value: float) -> bytes:
    """The upload with its first layer's scale replaced (checksum resealed): a NaN/inf scale."""
    import struct

    p = wire.parse(data, wire.KIND_UPLOAD)
    b = bytearray(data)
    off = p.offset[p.dtype == wire.DT_QUANTIZED].min() - 8 * int((p.dtype == wire.DT_QUANTIZED).sum()) + 4
    struct.pack_into("<f", b, int(off), value)
    return _resealed(b)


# each with the words its logged reason must hold
FAULTS = {"empty": "does not match the model", "one layer": "does not match the model",
          "partial": "does not match the model", "extra": "does not match the model",
          "wrong shape": "does not match the model", "float as quantized": "does not match the model",
          "empty dim": "does not match the model",
          "nan float": "holds NaN or inf", "inf float": "holds NaN or inf", "nan scale": "scale", "inf scale": "scale",
          # averaged in, it gave the global model NaN outputs
          "negative running var": "bn1.running_var holds a negative value",
          # a client cannot change the weights it is aggregated and reassigned with (which once
          # stopped the round: the bit reassignment refused the budget after the model had changed)
          "other budget": "states budget 3.0, the server has", "nan budget": "states budget nan",
          "other samples": "states 5000 samples, the server has", "no samples": "states 0 samples",
          # N + Delta must be the bits it was sent: no upload claims more bits than its budget gave
          "more bits": "(N + Delta = ", "fewer bits, no Delta": "(N + Delta = "}


def _pruned(srv, k, extra, delta):
    """Client k's upload with every layer at its assigned bits + ``extra`` and Delta ``delta``."""
    g = srv.global_state
    layers = {n: wire.QuantizedTensor.from_float(g[n], b + extra) for n, b in zip(srv.layer_sizes, srv.assignments[k])}
    floats = {n: v for n, v in g.items() if n not in srv.layer_sizes}
    return wire.encode_upload(wire.Upload(k, 1, 100 + k, float(srv.client_budgets[k]), layers,
                                          {n: delta for n in layers}, floats))


def _bad(srv, how, k):
    if how == "more bits":  # 8-bit clients cannot go above: 7 bits claimed as 7 + 2
        return _pruned(srv, k, 1, 0) if srv.budgets[k] < 8 else _pruned(srv, k, -1, 2)
    if how == "fewer bits, no Delta":
        return _pruned(srv, k, -1, 0)
    if how.endswith("scale"):
        return _with_scale(_honest(srv, k), float("nan") if how == "nan scale" else float("inf"))
    if how == "nan budget":
        data = _with_budget(_honest(srv, k), float("nan"))
        assert wire.parse(data, wire.KIND_UPLOAD).meta[3] != wire.parse(data, wire.KIND_UPLOAD).meta[3]  # NaN
        return data
    return _faulty(srv, how, k)


@pytest.mark.parametrize("how", list(FAULTS))
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_faulty_upload_is_left_out_and_the_honest_ones_aggregated(how, where, caplog):
    faulty_k = 0 if where == "first" else 3
    honest = [k for k in range(4) if k != faulty_k]
    ref = _server()
    ref.aggregate(1, {k: _honest(ref, k, bump=0.01) for k in honest})  # the round without the faulty client
    srv = _server()
    uploads = {k: _honest(srv, k, bump=0.01) for k in honest}
    uploads[faulty_k] = _bad(srv, how, faulty_k)
    if where == "first":
        uploads = {faulty_k: uploads.pop(faulty_k), **uploads}
    with caplog.at_level(logging.WARNING, logger="fedmpq"):
        report = srv.aggregate(1, uploads)
    assert sorted(report["reported"]) == honest
    assert f"the upload of client {faulty_k} is left out" in caplog.text and FAULTS[how] in caplog.text
    for name, v in ref.global_state.items():
        assert torch.equal(srv.global_state[name], v), name


@pytest.mark.parametrize("alg", ["fedmpq", "aqfl", "fp8"])
def test_every_algorithm_takes_the_uploads_that_state_the_clients_own_budget(alg):
    """Clients state their own budget beta_k in every algorithm (fp8 trains at 8 bits but
    is still client k's): the server takes them all."""
    srv = _server(alg)
    assert srv.aggregate(1, {k: _honest(srv, k) for k in range(4)})["reported"] == [0, 1, 2, 3]


@pytest.mark.parametrize("alg", ["fedmpq", "aqfl", "fp8"])
def test_only_fedmpq_clients_may_prune_bits(alg, caplog):
    """N + Delta = the bits sent, Delta > 0 (planes the group lasso emptied): a FedMPQ upload;
    AQFL and FP8 clients prune nothing, so the same upload is left out there."""
    srv = _server(alg)
    uploads = {k: _pruned(srv, k, -1, 1) for k in range(4)}
    report = srv.aggregate(1, uploads)
    if alg == "fedmpq":
        assert report["reported"] == [0, 1, 2, 3]
        assert report["bits"][0] == [b - 1 for b in _server(alg).assignments[0]]
    else:
        assert report["reported"] == [] and "(pruned bits), but it was sent" in caplog.text


@pytest.mark.parametrize("samples, match", [({0: 100, 1: 101, 2: 102}, r"num_samples\[3\] must be an integer >= 1, got None"),
                                            ({0: 100, 1: 101, 2: 102, 3: 0}, r"num_samples\[3\] .* got 0"),
                                            ({0: 100, 1: 101, 2: 102, 3: 2.5}, r"num_samples\[3\] .* got 2.5")])
def test_a_server_needs_a_sample_count_for_every_client(samples, match):
    from fedmpq import data

    with pytest.raises(ValueError, match=match):
        Server("fedmpq", config.model_builder(SMALL, data.load("digits")), budgets=dict(enumerate(SMALL["budgets"])),
               num_samples=samples)


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


@pytest.mark.parametrize("how", ["empty", "partial", "nan float", "extra", "negative running var"])
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
    elif how == "negative running var":
        t["bn1.running_var"][0] = -1.0
    else:
        next(v for v in t.values() if v.is_floating_point())[0] = float("nan")
    report = srv.aggregate(1, {0: wire.encode_model(wire.Model(1, t)), **good})
    assert report["reported"] == [1, 2] and "client 0 is left out" in caplog.text


def test_bad_arguments_to_the_servers_rounds_are_named(caplog):
    """downloads() for a client the server lacks was a bare KeyError, aggregate() of a list
    "'list' object has no attribute 'items'", and a key that is not an int lost its logged
    reason ("--- Logging error ---": %d of a str)."""
    srv = _server()
    with pytest.raises(ValueError, match=r"^client 7 is not one of the server's 4 clients \(0, 1, 2, 3\)"):
        srv.downloads(1, [0, 7])
    with pytest.raises(TypeError, match="^clients must be a sequence of client ids, got int"):
        srv.downloads(1, 3)
    assert sorted(srv.downloads(1, (1, 2))) == [1, 2]
    for bad in ([_honest(srv, 0)], None):
        with pytest.raises(TypeError, match=r"^uploads must be a mapping \(client id -> upload bytes\), got"):
            srv.aggregate(1, bad)
    with caplog.at_level(logging.WARNING, logger="fedmpq"):
        report = srv.aggregate(1, {"0": _honest(srv, 0), 1: _honest(srv, 1)})
    assert report["reported"] == [1]
    assert "the upload of client '0' is left out: the server has no such client" in caplog.text


def test_a_float_model_of_another_round_is_left_out_under_fp(caplog):
    """A float model names no client, but it names its round: an old round's model (a late
    or replayed reply) is left out as a quantized upload of another round is."""
    srv = _server("fp")
    good = {k: wire.encode_model(wire.Model(2, srv.global_state)) for k in (1, 2)}
    old = {n: (v + 1 if v.is_floating_point() else v) for n, v in srv.global_state.items()}
    before = {n: v.clone() for n, v in srv.global_state.items()}
    with caplog.at_level(logging.WARNING, logger="fedmpq"):
        report = srv.aggregate(2, {0: wire.encode_model(wire.Model(1, old)), **good})
    assert report["reported"] == [1, 2]
    assert "client 0 is left out: the model says it is of round 1, expected round 2" in caplog.text
    assert all(torch.equal(srv.global_state[n], v) for n, v in before.items())


def _huge(srv, k, value, carrier):
    """Client k's honest upload with one finite but huge value: a layer's scale, or a float."""
    if carrier == "scale":
        return _with_scale(_honest(srv, k), value)
    g = srv.global_state
    layers = {n: wire.QuantizedTensor.from_float(g[n], int(srv.budgets[k])) for n in srv.layer_sizes}
    floats = {n: v.clone() for n, v in g.items() if n not in srv.layer_sizes}
    next(v for v in floats.values() if v.is_floating_point())[0] = value
    return wire.encode_upload(wire.Upload(k, 1, 100 + k, float(srv.client_budgets[k]), layers, {n: 0 for n in layers},
                                          floats))


@pytest.mark.parametrize("carrier", ["scale", "float"])
@pytest.mark.parametrize("rule", ["mean", "trimmed_mean"])
def test_finite_values_whose_sum_overflows_are_left_out_and_the_next_round_goes_on(carrier, rule, caplog):
    """Each value is finite (the wire takes it), but two of them add up past float32's range
    (in the mean's sums, or in the mean of the values the trimmed mean keeps): the model went
    inf, and the next round's downloads raised (a non-finite weight cannot be binarized). The
    uploads that would overflow the sums are left out with their reason."""
    srv = _server(rule=rule)
    if rule == "mean":
        ups = {0: _huge(srv, 0, 1e38, carrier), 1: _huge(srv, 1, 3e38, carrier), 2: _honest(srv, 2),
               3: _honest(srv, 3)}
        kept = [0, 2, 3]
    else:  # three of four far off: the two middle values are 1e38 and 2.5e38
        ups = {0: _huge(srv, 0, 1e38, carrier), 1: _huge(srv, 1, 2.5e38, carrier), 2: _huge(srv, 2, 3e38, carrier),
               3: _honest(srv, 3)}
        kept = [0, 3]
    with caplog.at_level(logging.WARNING, logger="fedmpq"):
        report = srv.aggregate(1, ups)
    assert report["reported"] == kept
    assert "the upload of client 1 is left out" in caplog.text and "would overflow" in caplog.text
    for name, v in srv.global_state.items():
        assert torch.isfinite(v.double()).all(), name
    assert sorted(srv.downloads(2, [0, 1, 2, 3])) == [0, 1, 2, 3]


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 8, 10])
def test_robust_rules_match_their_statement(rule, k):
    x = torch.randn(k, 37, dtype=torch.float64)
    a = x.numpy()
    if rule == "median":
        want = np.median(a, axis=0)
    else:
        cut = max(int(0.2 * k), 1 if k >= 3 else 0)
        want = np.sort(a, axis=0)[cut:k - cut].mean(axis=0)
    assert np.allclose(aggregate.robust(x, rule).numpy(), want, rtol=0, atol=1e-12)


def test_trim_count_is_flowers_int_of_a_fifth_but_one_from_three_on():
    # int(0.2 k): 0 0 0 0 1 1 1 1 1 2 for k = 1..10 (Flower's FedTrimmedAvg, truncated: k = 8
    # cuts int(1.6) = 1, not round(1.6) = 2); at least one from k = 3 on.
    assert [aggregate.trim_count(k) for k in range(1, 11)] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 2]


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


@pytest.mark.parametrize("alg", ["fedmpq", "fp8", "fp"])
def test_budgets_and_sample_counts_are_checked_when_the_server_is_made(alg):
    """Under fp8 and fp no budget was checked: a NaN one made under fp8 left every upload of
    that client out (its stated budget never equal to NaN). A list was "has no attribute
    'items'", and int() took a client id of 1.5 as client 1. NumPy keys and values count."""
    from fedmpq import nn as qn

    def build(quantized, bits=8, act_bits=None):
        return qn.small_cnn(quantized=quantized, bits=bits, image_size=8)

    for budgets, num_samples, msg in [
        ({0: float("nan")}, {0: 10}, r"budgets\[0\] must be finite, got nan"),
        ({0: 9}, {0: 10}, r"budgets\[0\] must be in \[1, 8\], got 9"),
        ({0: "4"}, {0: 10}, r"budgets\[0\] must be a real number, got '4'"),
        ([4], {0: 10}, r"budgets must be a mapping \(client id -> value\), got list"),
        ({0: 4}, None, r"num_samples must be a mapping \(client id -> value\), got NoneType"),
        ({1.5: 4}, {1.5: 10}, "budgets: a client id must be an int >= 0, got 1.5"),
        ({-1: 4}, {-1: 10}, "budgets: a client id must be an int >= 0, got -1"),
        ({0: 4}, {"a": 10}, "num_samples: a client id must be an int >= 0, got 'a'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Server(alg, build, budgets, num_samples)
    srv = Server(alg, build, {np.int64(0): np.float32(4.5), 1: 2}, {np.int64(0): np.int64(10), 1: 3})
    assert srv.client_budgets == {0: 4.5, 1: 2} and srv.num_samples == {0: 10, 1: 3}


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


def _server_with(alg, weighting, num_samples):
    from fedmpq import data

    ds = data.load("digits")
    n = len(num_samples)
    return Server(alg, config.model_builder(SMALL, ds), budgets={k: SMALL["budgets"][k] for k in range(n)},
                  num_samples=num_samples, seed=0, weighting=weighting)


def _shifted(g, shift, batches=None):
    """The state ``g`` with every float entry moved by ``shift`` (int entries = ``batches``)."""
    return {n: (v + shift if v.is_floating_point() else torch.full_like(v, v.item() if batches is None else batches))
            for n, v in g.items()}


def test_a_sample_weighted_server_weights_each_upload_by_its_samples():
    """weighting="samples" reaches the server's aggregation: two uploads holding the model
    moved by 0 and by 1, of 1 and 3 samples, average to the model moved by 3/4 (the
    unweighted mean would give 1/2)."""
    srv = _server_with("fedmpq", "samples", {0: 1, 1: 3})
    g = {n: v.clone() for n, v in srv.global_state.items()}
    ups = {}
    for k, (shift, samples) in enumerate([(0.0, 1), (1.0, 3)]):
        s = _shifted(g, shift)
        layers = {n: wire.QuantizedTensor.from_float(s[n], b) for n, b in zip(srv.layer_sizes, srv.assignments[k])}
        floats = {n: v for n, v in s.items() if n not in srv.layer_sizes}
        ups[k] = wire.encode_upload(wire.Upload(k, 1, samples, float(srv.budgets[k]), layers, {n: 0 for n in layers},
                                                floats))
    srv.aggregate(1, ups)
    for n, v in g.items():
        if n in srv.layer_sizes:  # the de-quantized uploads, weighted 1:3
            d = [wire.decode_upload(ups[k]).layers[n].dequantize().double() for k in (0, 1)]
            torch.testing.assert_close(srv.global_state[n].double(), (d[0] + 3 * d[1]) / 4, rtol=1e-5, atol=1e-6)
        elif v.is_floating_point():
            torch.testing.assert_close(srv.global_state[n], v + 0.75, rtol=0, atol=1e-5)


def test_a_sample_weighted_fp_server_weights_each_model_by_its_clients_samples():
    """fp with weighting="samples": each float model counts by its client's |D_k| (1 and 3
    here): the model moved by 0 and by 1 averages to the model moved by 3/4."""
    srv = _server_with("fp", "samples", {0: 1, 1: 3})
    g = {n: v.clone() for n, v in srv.global_state.items()}
    srv.aggregate(1, {k: wire.encode_model(wire.Model(1, _shifted(g, shift))) for k, shift in ((0, 0.0), (1, 1.0))})
    for n, v in g.items():
        if v.is_floating_point():
            torch.testing.assert_close(srv.global_state[n], v + 0.75, rtol=0, atol=1e-5)


def test_fp_rounds_the_mean_of_integer_entries_to_the_nearest():
    """fp: an integer entry (BatchNorm's num_batches_tracked) averages to the nearest
    integer: 0, 1 and 1 give 2/3 -> 1 (not 0, as truncation would)."""
    srv = _server_with("fp", "mean", {0: 10, 1: 10, 2: 10})
    g = srv.global_state
    srv.aggregate(1, {k: wire.encode_model(wire.Model(1, _shifted(g, 0.0, batches=b))) for k, b in enumerate([0, 1, 1])})
    ints = [n for n, v in g.items() if not v.is_floating_point()]
    assert ints and all(srv.global_state[n].dtype == torch.int64 and int(srv.global_state[n]) == 1 for n in ints)


@pytest.mark.parametrize("how", ["broadcastable shape", "wrong shape", "int as float"])
def test_a_float_model_with_another_shape_or_kind_is_left_out_under_fp(how, caplog):
    """fp: an upload whose entry has another shape (even one that would broadcast) or is
    float where the model's is an integer is left out; the others are averaged alone."""
    ref = _server("fp")
    good = {k: wire.encode_model(wire.Model(1, _shifted(ref.global_state, 0.1 * k))) for k in (1, 2)}
    ref.aggregate(1, dict(good))
    srv = _server("fp")
    t = {n: v.clone() for n, v in srv.global_state.items()}
    name = next(n for n, v in t.items() if v.is_floating_point() and v.dim() == 1)
    if how == "broadcastable shape":
        t[name] = torch.zeros(1)
    elif how == "wrong shape":
        t[name] = torch.zeros(t[name].numel() + 1)
    else:
        n_int = next(n for n, v in t.items() if not v.is_floating_point())
        t[n_int] = t[n_int].float()
    report = srv.aggregate(1, {0: wire.encode_model(wire.Model(1, t)), **good})
    assert report["reported"] == [1, 2] and "client 0 is left out" in caplog.text
    for n, v in ref.global_state.items():
        assert srv.global_state[n].shape == v.shape and torch.equal(srv.global_state[n], v), n


@pytest.mark.parametrize("alg", ["fedmpq", "fp"])
def test_an_upload_from_a_client_the_server_does_not_know_is_left_out(alg, caplog):
    srv = _server(alg)
    if alg == "fp":
        ups = {k: wire.encode_model(wire.Model(1, _shifted(srv.global_state, 0.1 * k))) for k in (1, 2)}
        ups[9] = wire.encode_model(wire.Model(1, _shifted(srv.global_state, 100.0)))
    else:
        ups = {k: _honest(srv, k, bump=0.01) for k in (1, 2)}
        ups[9] = _honest(srv, 3, bump=0.01)
    with caplog.at_level(logging.WARNING, logger="fedmpq"):
        report = srv.aggregate(1, ups)
    assert report["reported"] == [1, 2] and "client 9 is left out: the server has no such client" in caplog.text


def test_the_server_evaluates_in_eval_mode_with_16_bit_activations():
    """ALGORITHM.md: the global model as a float model with ReLU6 and 16-bit activations (fp:
    plain ReLU), BatchNorm in eval mode (its aggregated statistics); accuracy over every sample."""
    from fedmpq import data
    from fedmpq import nn as qn

    ds = data.load("digits")
    for alg, bits in (("fedmpq", 16), ("fp", None)):
        srv = _server(alg)
        acts = [m.bits for m in srv._eval_model().modules() if isinstance(m, qn.ActQuant)]
        assert acts and all(b == bits for b in acts)
    srv = _server()
    x, y = ds.test_x[:101], ds.test_y[:101]
    model = srv._eval_model().eval()
    with torch.no_grad():
        want = int((model(x).argmax(1) == y).sum()) / 101
    assert srv.evaluate(x, y, batch_size=40) == want
    # train mode over a seeded order; the last batch of 1 (train-mode BatchNorm needs two) is
    # left out: the accuracy is the first batch's alone
    x, y = ds.test_x[:129], ds.test_y[:129]
    idx = torch.randperm(129, generator=torch.Generator().manual_seed(0))[:128]
    model = srv._eval_model().train()
    with torch.no_grad():
        first = float((model(x[idx]).argmax(1) == y[idx]).float().mean())
    assert srv.evaluate_train_mode(x, y, batch_size=128) == first


def test_the_reported_mean_bits_are_weighted_by_layer_size():
    srv = _server()
    report = srv.aggregate(1, {k: _honest(srv, k, bump=0.01) for k in range(4)})
    sizes = list(srv.layer_sizes.values())
    assert len(set(sizes)) > 1
    for k, bits in srv.assignments.items():
        assert report["assigned_mean_bits"][k] == sum(n * b for n, b in zip(sizes, bits)) / sum(sizes)
    assert any(len(set(b)) > 1 for b in srv.assignments.values())  # where the weighting matters
    for k, bits in report["bits"].items():
        assert report["mean_bits"][k] == sum(n * b for n, b in zip(sizes, bits)) / sum(sizes)
