"""Server aggregation straight from upload bytes, against the mean of the de-quantized
uploads computed with plain torch (unweighted and sample-weighted), its statistics, and
its refusal of bad uploads (which leave the sum untouched)."""
from __future__ import annotations

import pytest
import torch

from fedmpq import aggregate, wire

from conftest import make_upload


def dense(u: wire.Upload):
    """The upload as a float state dict: the oracle's input."""
    out = {n: q.dequantize().double() for n, q in u.layers.items()}
    out.update({n: t.double() for n, t in u.floats.items()})
    return out


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
        assert torch.equal(got[n], q.dequantize())
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
    da, db = dense(a), dense(b)
    for name in da:
        want = (da[name] + db[name]) / 2
        if got[name].dtype == torch.int64:
            assert torch.equal(got[name], want.round().long())
        else:
            torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6)
