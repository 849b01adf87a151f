"""Server aggregation straight from upload bytes, against the mean of the de-quantized
uploads computed with plain torch (unweighted and sample-weighted), its statistics, and
its refusal of bad uploads (which leave the sum untouched)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmpq import aggregate, wire
from fedmpq_kernels.pack import reference as R

from conftest import make_upload


def _codes_signs(q: wire.QuantizedTensor):
    """A layer's codes (float64) and signs (+-1) from its planes by the pure-torch reference:
    not QuantizedTensor.dequantize, which runs the aggregator's own native kernel."""
    codes = R.unpack_codes(q.planes, q.bits, q.numel).double().reshape(q.shape)
    return codes, torch.where(R.unpack_bitmap(q.signs, q.numel).reshape(q.shape), -1.0, 1.0).double()


def dense(u: wire.Upload):
    """The upload as a float64 state dict, ``scale * sigma * q / (2**bits - 1)``: the oracle's input."""
    out = {}
    for n, q in u.layers.items():
        codes, sigma = _codes_signs(q)
        out[n] = q.scale * sigma * codes / (2 ** q.bits - 1)
    out.update({n: t.double() for n, t in u.floats.items()})
    return out


def dense_f32(q: wire.QuantizedTensor) -> torch.Tensor:
    """The layer in float32 as the format rounds it, by the pure-torch reference's
    dequant_accumulate: coef = scale / (2**bits - 1) rounded to float32, then each coef * q
    rounded, then the sign."""
    out = torch.zeros(q.numel)
    R.dequant_accumulate(out, q.planes, q.signs, q.bits, float(np.float32(np.float32(q.scale) / np.float32(2 ** q.bits - 1))))
    return out.reshape(q.shape)


def _assert_mean_of(got, *ups):
    """got is the mean of the uploads, entry by entry (int64 entries rounded)."""
    ds = [dense(u) for u in ups]
    for name in ds[0]:
        want = sum(d[name] for d in ds) / len(ds)
        if got[name].dtype == torch.int64:
            assert torch.equal(got[name], want.round().long())
        else:
            torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighting", ["mean", "samples"])
def test_mean_of_uploads(weighting):
    ups = [make_upload(seed=s, client_id=s, num_samples=10 + 7 * s) for s in range(5)]
    agg = aggregate.Aggregator(weighting)
    for u in ups:
        agg.add(wire.encode_upload(u))
    got = agg.result()
    ws = [1.0 if weighting == "mean" else float(u.num_samples) for u in ups]
    dicts = [dense(u) for u in ups]
    for name in dicts[0]:
        want = sum(w * d[name] for w, d in zip(ws, dicts)) / sum(ws)
        if ups[0].floats.get(name) is not None and ups[0].floats[name].dtype == torch.int64:
            assert got[name].dtype == torch.int64 and torch.equal(got[name], want.round().long())
        else:
            assert got[name].dtype == torch.float32 and got[name].shape == want.shape
            torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6)
    assert agg.count == 5


def test_one_upload_is_reproduced_exactly():
    u = make_upload(seed=8)
    agg = aggregate.Aggregator()
    agg.add(wire.encode_upload(u))
    got = agg.result()
    for n, q in u.layers.items():
        assert torch.equal(got[n], dense_f32(q)), n
    for n, t in u.floats.items():
        assert torch.equal(got[n], t.float() if t.is_floating_point() else t)


def test_statistics_come_out_of_the_same_pass():
    u = make_upload(seed=2, client_id=41, num_samples=77)
    st = aggregate.Aggregator().add(wire.encode_upload(u))
    assert (st.client_id, st.round, st.num_samples, st.budget) == (41, 5, 77, 4.0)
    assert st.bits == {n: q.bits for n, q in u.layers.items()} and st.deltas == u.deltas


def test_bad_uploads_are_refused_and_leave_the_sum_unchanged():
    agg = aggregate.Aggregator()
    agg.add(wire.encode_upload(make_upload(seed=0)))
    before = {n: t.clone() for n, t in agg.result().items()}
    good = wire.encode_upload(make_upload(seed=1))
    corrupt = bytearray(good)
    corrupt[-5] ^= 1
    with pytest.raises(wire.WireFormatError, match="checksum"):
        agg.add(bytes(corrupt))
    other = make_upload(seed=1)
    other.floats["bn1.weight"] = torch.zeros(5)  # another shape
    with pytest.raises(wire.WireFormatError, match=r"bn1.weight: expected float32 \(4,\), got float32 \(5,\)"):
        agg.add(wire.encode_upload(other))
    other = make_upload(seed=1)
    del other.floats["fc.bias"]
    with pytest.raises(wire.WireFormatError, match="missing"):
        agg.add(wire.encode_upload(other))
    assert agg.count == 1
    for n, t in agg.result().items():
        assert torch.equal(t, before[n])


@pytest.mark.parametrize("rule", ["mean", "median"])
@pytest.mark.parametrize("reorder", [False, True])
def test_a_negative_running_variance_or_a_second_upload_of_a_client_is_refused(rule, reorder):
    """One client's negative BatchNorm running variance was averaged in (the global model then
    gave NaN outputs); the same client's upload added twice counted twice. Both are refused
    whole, in the first upload's order or another (reorder), and the sum stays as it was."""
    agg = aggregate.Aggregator(rule=rule)
    agg.add(wire.encode_upload(make_upload(seed=0)))
    before = {n: t.clone() for n, t in agg.result().items()}
    bad = make_upload(seed=1)
    bad.floats["bn1.running_var"][2] = -1e-3
    if reorder:
        bad.floats = dict(reversed(list(bad.floats.items())))
    with pytest.raises(wire.WireFormatError, match="^upload of client 4: bn1.running_var holds a negative value"):
        agg.add(wire.encode_upload(bad))
    with pytest.raises(wire.WireFormatError, match="^upload of client 3: this aggregate already holds one"):
        agg.add(wire.encode_upload(make_upload(seed=0)))
    assert agg.count == 1 and [s.client_id for s in agg.stats] == [0 + 3]
    for n, t in agg.result().items():
        assert torch.equal(t, before[n])
    bad.floats["bn1.running_var"][2] = 0.0  # a variance of 0 is a variance
    agg.add(wire.encode_upload(bad))
    assert agg.count == 2


def test_errors():
    with pytest.raises(ValueError, match="weighting"):
        aggregate.Aggregator("median")
    with pytest.raises(RuntimeError, match="nothing to average"):
        aggregate.Aggregator().result()
    agg = aggregate.Aggregator("samples")
    with pytest.raises(wire.WireFormatError, match="0 samples"):
        agg.add(wire.encode_upload(make_upload(num_samples=0)))


def test_uploads_listing_tensors_in_another_order_are_added_by_name():
    a = make_upload(seed=0)
    b = make_upload(seed=1)
    b.layers = dict(reversed(list(b.layers.items())))
    b.floats = dict(reversed(list(b.floats.items())))
    agg = aggregate.Aggregator()
    agg.add(wire.encode_upload(a))
    agg.add(wire.encode_upload(b))
    got = agg.result()
    first = wire.decode_upload(wire.encode_upload(a))
    assert list(got) == list(first.layers) + list(first.floats)  # the first upload's order
    _assert_mean_of(got, a, b)


def test_a_robust_rule_is_unweighted_only():
    for rule in ("median", "trimmed_mean"):
        with pytest.raises(ValueError, match=f"the {rule} rule is unweighted"):
            aggregate.Aggregator("samples", rule)
        aggregate.Aggregator("mean", rule)  # unweighted: fine


def test_a_float16_entry_holding_nan_is_refused():
    """Every float entry is checked finite, float16 ones too (int64 ones cannot be NaN)."""
    agg = aggregate.Aggregator()
    bad = make_upload(seed=1)
    assert bad.floats["half.weight"].dtype == torch.float16
    bad.floats["half.weight"][1, 2] = float("nan")
    with pytest.raises(wire.WireFormatError, match="half.weight holds NaN or inf"):
        agg.add(wire.encode_upload(bad))
    agg.add(wire.encode_upload(make_upload(seed=0)))
    with pytest.raises(wire.WireFormatError, match="half.weight holds NaN or inf"):
        agg.add(wire.encode_upload(bad))
    assert agg.count == 1


def test_integer_entries_average_exactly_beyond_float32():
    """int64 entries (num_batches_tracked) are summed in float64: 2^40 + 1 and 2^40 + 3 average
    to 2^40 + 2 exactly (float32 has 24 bits: it would give 2^40)."""
    agg = aggregate.Aggregator()
    for seed, count in ((0, 2**40 + 1), (1, 2**40 + 3)):
        u = make_upload(seed=seed)
        u.floats["bn1.num_batches_tracked"] = torch.tensor(count, dtype=torch.int64)
        agg.add(wire.encode_upload(u))
    got = agg.result()["bn1.num_batches_tracked"]
    assert got.dtype == torch.int64 and int(got) == 2**40 + 2


def test_the_expected_layout_sets_the_order_even_when_the_first_upload_differs():
    """With the model's layout given, the aggregate comes out in the model's order (not the
    first upload's) and every entry is the mean of its own tensors."""
    ups = []
    for seed in (0, 1):
        u = make_upload(seed=seed)
        del u.floats["half.weight"]  # a model's float entries are float32 or int64
        ups.append(u)
    state = dense(ups[0])
    state["bn1.num_batches_tracked"] = ups[0].floats["bn1.num_batches_tracked"]
    model = aggregate.model_layout(state, list(ups[0].layers))
    first = ups[0]
    first.layers = dict(reversed(list(first.layers.items())))
    first.floats = dict(reversed(list(first.floats.items())))
    agg = aggregate.Aggregator(expected=model)
    for u in ups:
        agg.add(wire.encode_upload(u))
    got = agg.result()
    assert list(got) == model.names
    _assert_mean_of(got, ups[0], ups[1])


def test_uploads_in_the_encoders_order_add_one_float_run_at_a_time(monkeypatch):
    """The server's case: the model's layout interleaves quantized weights and float entries
    (a layer, then its BatchNorm), the uploads list the quantized ones first. The aggregate
    still comes out in the model's order, and every upload reads its floats a run of one
    dtype at a time (here float32 and int64: two reads), not entry by entry."""
    ups = []
    for seed in range(3):
        u = make_upload(seed=seed)
        del u.floats["half.weight"]  # a model's float entries are float32 or int64
        ups.append(u)
    flat = dense(ups[0])
    flat["bn1.num_batches_tracked"] = ups[0].floats["bn1.num_batches_tracked"]
    quant, floats = list(ups[0].layers), [n for n in flat if n not in ups[0].layers]
    order = [quant[0]] + floats[:5] + quant[1:3] + floats[5:] + quant[3:]  # interleaved
    model = aggregate.model_layout({n: flat[n] for n in order}, quant)
    reads = []
    real = aggregate.Aggregator._floats
    monkeypatch.setattr(aggregate.Aggregator, "_floats", staticmethod(lambda *a: reads.append(a[2:]) or real(*a)))
    agg = aggregate.Aggregator(expected=model)
    for u in ups:
        agg.add(wire.encode_upload(u))
    assert len(reads) == 2 * len(ups), reads
    got = agg.result()
    assert list(got) == order
    _assert_mean_of(got, *ups)


def test_model_layout_refuses_quantized_names_the_state_lacks():
    with pytest.raises(ValueError, match=r"quantized entries not in the state: \['fc.weight'\]"):
        aggregate.model_layout({"conv.weight": torch.zeros(2, 3)}, ["conv.weight", "fc.weight"])


@pytest.mark.parametrize("stated", [float("nan"), float("inf"), 0.0, -1.0, 64.0])
def test_an_upload_stating_a_budget_outside_0_32_is_refused(stated):
    """The budget field is f32 in (0, 32] (FORMAT.md): decode_upload refuses others, and so
    does an aggregator that is not given the budget to compare with (it took them into its
    statistics)."""
    import struct

    b = bytearray(wire.encode_upload(make_upload(seed=3)))
    struct.pack_into("<f", b, 52, stated)
    struct.pack_into("<I", b, 16, wire._crc(bytes(b[:32]), memoryview(bytes(b))[32:]))
    with pytest.raises(wire.WireFormatError, match=r"outside \(0, 32\]"):
        wire.decode_upload(bytes(b))
    agg = aggregate.Aggregator()
    with pytest.raises(wire.WireFormatError, match=r"outside \(0, 32\]"):
        agg.add(bytes(b))
    assert agg.count == 0


@pytest.mark.parametrize("rule", ["mean", "median"])
def test_int64_entries_near_the_ends_of_int64_do_not_wrap(rule):
    """A valid upload's num_batches_tracked of 2^63 - 1 averages to 2^63 in float64; it gave
    -2^63 (the conversion wrapped), one client flipping the global entry's sign."""
    hi, hi2, lo = make_upload(seed=1), make_upload(seed=1, client_id=9), make_upload(seed=2)  # hi2: hi's twin
    for u in (hi, hi2):
        u.floats["bn1.num_batches_tracked"] = torch.tensor(2**63 - 1)
    lo.floats["bn1.num_batches_tracked"] = torch.tensor(-2**63)
    for ups, want in (([hi], 2**63 - 1024), ([hi, hi2], 2**63 - 1024), ([lo], -2**63)):
        agg = aggregate.Aggregator(rule=rule)
        for u in ups:
            agg.add(wire.encode_upload(u))
        assert int(agg.result()["bn1.num_batches_tracked"]) == want


def test_the_fp_server_averages_int64_entries_near_2_63_without_wrapping():
    from test_server import _server

    srv = _server("fp")
    name = next(k for k, v in srv.global_state.items() if v.dtype == torch.int64)
    state = {k: v.clone() for k, v in srv.global_state.items()}
    state[name] = torch.tensor(2**63 - 1)
    srv.aggregate(1, {0: wire.encode_model(wire.Model(1, state))})
    assert int(srv.global_state[name]) == 2**63 - 1024
