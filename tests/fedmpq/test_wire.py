"""The wire format: round trips, hand-computed binarization, the size bound, and decoding
that raises WireFormatError (and nothing else) on every hostile input, fuzzed."""
from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmpq import aggregate, layouts, wire
from fedmpq_kernels.pack import reference as PR

from conftest import make_layer, make_upload

# FEDMPQ_FUZZ_EXAMPLES=100000 for the long run (docs/BENCHMARKS.md records its result).
FUZZ = int(os.environ.get("FEDMPQ_FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=FUZZ, deadline=None, suppress_health_check=list(HealthCheck), derandomize=FUZZ <= 300)


def assert_same_upload(a: wire.Upload, b: wire.Upload):
    assert (a.client_id, a.round, a.num_samples) == (b.client_id, b.round, b.num_samples)
    assert a.budget == pytest.approx(b.budget)
    assert list(a.layers) == list(b.layers) and a.deltas == b.deltas
    for name, q in a.layers.items():
        r = b.layers[name]
        assert (q.shape, q.bits) == (r.shape, r.bits) and np.float32(q.scale) == np.float32(r.scale)
        assert torch.equal(q.planes, r.planes) and torch.equal(q.signs, r.signs)
    assert set(a.floats) == set(b.floats)
    for name, t in a.floats.items():
        assert b.floats[name].dtype == t.dtype and torch.equal(b.floats[name], t)


def test_upload_round_trip(upload):
    data = wire.encode_upload(upload)
    assert isinstance(data, bytes) and data[:4] == b"FMPQ"
    back = wire.decode_upload(data)
    assert_same_upload(upload, back)
    for name, q in upload.layers.items():  # and the codes behind the planes
        assert torch.equal(back.layers[name].codes(), q.codes())
        assert torch.equal(back.layers[name].negative(), q.negative())
    assert wire.encode_upload(back) == data  # canonical: re-encoding gives the same bytes


def test_download_and_model_round_trip(upload):
    d = wire.Download(9, 6, upload.layers, upload.floats)
    back = wire.decode_download(wire.encode_download(d))
    assert (back.client_id, back.round) == (9, 6)
    assert back.assignment == {n: q.bits for n, q in upload.layers.items()}
    for name, q in upload.layers.items():
        assert torch.equal(back.layers[name].dequantize(), q.dequantize())
    state = {n: q.dequantize() for n, q in upload.layers.items()} | upload.floats
    m = wire.decode_model(wire.encode_model(wire.Model(6, state)))
    assert m.round == 6 and all(torch.equal(m.tensors[n], t) for n, t in state.items())
    h = wire.decode_model(wire.encode_model(wire.Model(6, state), dtype=torch.float16))
    for n, t in state.items():
        want = t.half() if t.is_floating_point() else t
        assert torch.equal(h.tensors[n], want)


def test_binarize_hand_computed():
    # bits 2: L = 3, s = max|W| = 1, q = round(|W| * 3): 1.5 -> 2 (half to even), 0.78 -> 1;
    # sign(0) = -1 (harmless: q = 0)
    w = torch.tensor([0.5, -1.0, 0.0, 0.26])
    q = wire.QuantizedTensor.from_float(w, 2)
    assert q.scale == 1.0 and q.bits == 2
    assert q.codes().tolist() == [2, 3, 0, 1]
    assert q.negative().tolist() == [False, True, True, False]
    assert q.dequantize().tolist() == pytest.approx([2 / 3, -1.0, 0.0, 1 / 3])
    zero = wire.QuantizedTensor.from_float(torch.zeros(5), 3)
    assert zero.scale == 0.0 and zero.dequantize().abs().sum() == 0
    with pytest.raises(ValueError, match="NaN or inf"):
        wire.QuantizedTensor.from_float(torch.tensor([1.0, float("nan")]), 4)


def test_quantized_layer_dequantizes_as_the_algorithm_states():
    gen = torch.Generator().manual_seed(1)
    for bits in range(1, 9):
        q = make_layer((3, 37), bits, gen)
        w = q.scale * torch.where(q.negative(), -1.0, 1.0) * q.codes().float() / ((1 << bits) - 1)
        torch.testing.assert_close(q.dequantize(), w, rtol=1e-6, atol=1e-7)
        assert q.planes.numel() == bits * 4 * math.ceil(111 / 32)


def test_planes_are_the_documented_bit_planes():
    """Plane 0 is the MSB, bitmaps are numpy.packbits(bitorder='little') padded to words."""
    codes = torch.tensor([5, 2, 7, 0, 1], dtype=torch.uint8)  # 3 bits
    q = wire.QuantizedTensor.from_codes(codes, torch.zeros(5, dtype=torch.bool), 3, 1.0)
    planes = q.planes.view(3, 4)
    for p in range(3):
        bits = ((codes.numpy() >> (2 - p)) & 1).astype(np.uint8)
        want = np.concatenate([np.packbits(bits, bitorder="little"), np.zeros(3, np.uint8)])
        assert planes[p].tolist() == want.tolist()


@pytest.mark.parametrize("budget", [2, 4, 6, 8])
def test_resnet20_upload_size_bound(budget):
    """At most sum n_l (N_l + 1) / 8 + 4 * (float values) + 1% + 1 KiB (docs/BENCHMARKS.md
    reports the numbers against the float32 state dict)."""
    qshapes, fshapes = layouts.cifar_resnet(20)
    gen = torch.Generator().manual_seed(0)
    layers = {n: make_layer(s, budget, gen) for n, s in qshapes.items()}
    floats = {n: (torch.zeros(s, dtype=torch.int64) if n.endswith("num_batches_tracked") else torch.randn(s, generator=gen))
              for n, s in fshapes.items()}
    data = wire.encode_upload(wire.Upload(0, 1, 500, budget, layers, {n: 0 for n in layers}, floats))
    bits_part = sum(math.prod(s) * (budget + 1) / 8 for s in qshapes.values())
    float_part = 4 * sum(math.prod(s) for n, s in fshapes.items() if not n.endswith("num_batches_tracked"))
    bound = (bits_part + float_part) * 1.01 + 1024
    assert len(data) <= bound, (len(data), bound)


def test_encode_rejects_bad_input(upload):
    with pytest.raises(ValueError, match="duplicate|both quantized and float"):
        wire.encode_upload(wire.Upload(0, 0, 1, 4.0, upload.layers, {}, {"fc.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="delta must be in 0..7"):
        wire.encode_upload(wire.Upload(0, 0, 1, 4.0, upload.layers, {"fc.weight": 9}, {}))
    with pytest.raises(ValueError, match="budget"):
        wire.encode_upload(wire.Upload(0, 0, 1, float("nan"), upload.layers, {}, {}))
    with pytest.raises(TypeError, match="cannot travel"):
        wire.encode_upload(wire.Upload(0, 0, 1, 4.0, {}, {}, {"x": torch.zeros(2, dtype=torch.float64)}))
    with pytest.raises(ValueError, match="client_id"):
        wire.encode_upload(wire.Upload(-1, 0, 1, 4.0, {}, {}, {}))
    with pytest.raises(ValueError, match="non-empty"):
        wire.encode_upload(wire.Upload(0, 0, 1, 4.0, {}, {}, {"": torch.zeros(1)}))
    with pytest.raises(ValueError, match="code .* does not fit|codes must be"):
        wire.QuantizedTensor.from_codes(torch.tensor([4], dtype=torch.uint8), torch.tensor([False]), 2, 1.0)


# ---- hostile input -------------------------------------------------------------------------
def reseal(data: bytes) -> bytes:
    """Recompute length and checksum, so a mutation gets past them to the deeper checks."""
    b = bytearray(data)
    struct.pack_into("<Q", b, 8, len(b))
    struct.pack_into("<I", b, 16, wire._crc(bytes(b[:32]), memoryview(bytes(b))[32:]))
    return bytes(b)


def with_index(data: bytes, mutate) -> bytes:
    """The payload with its (decompressed) index changed by ``mutate(bytearray)``, resealed."""
    magic, ver, kind, flags, total, crc, n, zlen, ilen = wire._HEADER.unpack_from(data)
    meta = wire._META[kind].size
    start = 32 + meta
    index = bytearray(zlib.decompress(data[start:start + zlen]))
    mutate(index, n)
    z = zlib.compress(bytes(index))
    rest = data[start + wire._align4(zlen):]
    head = wire._HEADER.pack(magic, ver, kind, flags, 0, 0, n, len(z), len(index))
    return reseal(head + data[32:start] + z + b"\0" * (wire._align4(len(z)) - len(z)) + rest)


def expect_error(data: bytes, match: str):
    with pytest.raises(wire.WireFormatError, match=match):
        wire.decode_upload(data)


def test_every_truncation_and_extension_is_rejected():
    data = wire.encode_upload(make_upload(seed=2))
    for cut in range(len(data)):
        with pytest.raises(wire.WireFormatError):
            wire.decode_upload(data[:cut])
    expect_error(data + b"\0", "length field")
    expect_error(reseal(data + b"\0\0\0\0"), "left over")


def test_header_fields_are_checked(upload):
    data = wire.encode_upload(upload)
    expect_error(b"XXXX" + data[4:], "not a fedmpq payload")
    expect_error(reseal(data[:4] + struct.pack("<H", 2) + data[6:]), "unsupported format version 2")
    expect_error(reseal(data[:6] + b"\x02" + data[7:]), "is a download, expected an upload")
    expect_error(reseal(data[:6] + b"\x09" + data[7:]), "is of kind 9, expected an upload")
    expect_error(reseal(data[:7] + b"\x01" + data[8:]), "unknown flags")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    expect_error(bytes(flipped), "checksum mismatch")
    with pytest.raises(wire.WireFormatError, match="is an upload, expected a model"):
        wire.decode_model(data)
    with pytest.raises(wire.WireFormatError, match="must be bytes"):
        wire.decode_upload("FMPQ")


def test_huge_claims_are_rejected_before_allocating(upload):
    data = wire.encode_upload(upload)

    def huge_dims(index, n):
        rec = np.frombuffer(index, dtype=wire._RECORD, count=n).copy()
        rec[0]["ndim"] = 4
        rec[0]["dims"][:4] = [2**32 - 1] * 4  # ~2^128 elements
        index[: rec.nbytes] = rec.tobytes()

    expect_error(with_index(data, huge_dims), "needs about .* bytes of data, only")

    def large_dims(index, n):  # 2^40 elements: small enough for exact counts, still too many
        rec = np.frombuffer(index, dtype=wire._RECORD, count=n).copy()
        rec[0]["ndim"] = 2
        rec[0]["dims"][:] = [2**20, 2**20] + [0] * 6
        index[: rec.nbytes] = rec.tobytes()

    expect_error(with_index(data, large_dims), "needs .* bytes of data, only")

    b = bytearray(data)
    struct.pack_into("<I", b, 20, 2**32 - 1)  # entries
    expect_error(reseal(bytes(b)), "entries exceed the limit")
    b = bytearray(data)
    struct.pack_into("<I", b, 28, 2**32 - 1)  # uncompressed index length
    expect_error(reseal(bytes(b)), "index length .* is impossible")
    b = bytearray(data)
    struct.pack_into("<I", b, 24, 2**32 - 1)  # compressed index length
    expect_error(reseal(bytes(b)), "index claims")


def with_params(data: bytes, i: int, name: str, value) -> bytes:
    """The payload with field ``name`` of quantized layer i's parameter record set, resealed."""
    _, _, kind, _, _, _, n, zlen, _ = wire._HEADER.unpack_from(data)
    at = 32 + wire._META[kind].size + wire._align4(zlen) + 8 * i
    rec = np.frombuffer(data, dtype=wire._PARAMS, count=1, offset=at).copy()
    rec[0][name] = value
    return reseal(data[:at] + rec.tobytes() + data[at + 8:])


def test_index_and_parameter_fields_are_checked(upload):
    data = wire.encode_upload(upload)

    def field(name, value, i=0):
        def m(index, n):
            rec = np.frombuffer(index, dtype=wire._RECORD, count=n).copy()
            rec[i][name] = value
            index[: rec.nbytes] = rec.tobytes()
        return m

    expect_error(with_params(data, 0, "bits", 9), "bit-width 9 outside 1..8")
    expect_error(with_params(data, 1, "bits", 0), "bit-width 0 outside 1..8")
    expect_error(with_params(data, 0, "scale", float("nan")), "scale nan")
    expect_error(with_params(data, 2, "scale", -1.0), "scale -1.0")
    expect_error(with_params(data, 0, "delta", 8), "delta 8")
    expect_error(with_params(data, 0, "reserved", 1), "reserved bytes")
    d = wire.encode_download(wire.Download(1, 1, upload.layers, upload.floats))
    with pytest.raises(wire.WireFormatError, match="delta 1 out of range"):
        wire.decode_download(with_params(d, 0, "delta", 1))
    expect_error(with_index(data, field("dtype", 9)), "unknown dtype code 9")
    expect_error(with_index(data, field("dtype", 0)), "unknown dtype code 0")
    expect_error(with_index(data, field("ndim", 9)), "9 dimensions")
    expect_error(with_index(data, field("reserved", 3)), "reserved bytes")
    # a float entry turned quantized: its parameters are missing and the data does not add up
    last = len(upload.layers) + len(upload.floats) - 1
    with pytest.raises(wire.WireFormatError):
        wire.decode_upload(with_index(data, field("dtype", 1, i=last)))

    def dup_name(index, n):  # the second name ("b.weight") becomes the first ("a.weight")
        lens = np.frombuffer(index, dtype="<u2", count=n, offset=n * 36)
        at = n * 38
        assert lens[0] == lens[1]
        index[at + lens[0]:at + 2 * lens[0]] = index[at:at + lens[0]]

    u = make_upload()
    u.layers = {"a.weight": u.layers["conv1.weight"], "b.weight": u.layers["fc.weight"]}
    u.deltas = {}
    expect_error(with_index(wire.encode_upload(u), dup_name), "duplicate name")

    def bad_utf8(index, n):
        index[n * 38] = 0xFF

    expect_error(with_index(data, bad_utf8), "not valid UTF-8")

    def bad_lengths(index, n):
        struct.pack_into("<H", index, n * 36, struct.unpack_from("<H", index, n * 36)[0] + 1)

    expect_error(with_index(data, bad_lengths), "name lengths do not add up|index length")


def test_the_index_is_the_same_for_every_upload_of_a_model():
    """It holds the layout only (the per-layer parameters sit outside it), so the server can
    recognize a known layout by its bytes; a known layout is still checked in full."""
    a, b = wire.encode_upload(make_upload(seed=0)), wire.encode_upload(make_upload(seed=0, bits={
        n: 8 for n in make_upload().layers}))
    za = a[56:56 + wire._HEADER.unpack_from(a)[7]]
    zb = b[56:56 + wire._HEADER.unpack_from(b)[7]]
    assert za == zb
    known = wire.parse(a, wire.KIND_UPLOAD)
    p = wire.parse(b, wire.KIND_UPLOAD, known)
    assert p.same_layout and p.names == known.names and p.bits.tolist() != known.bits.tolist()
    with pytest.raises(wire.WireFormatError, match="bit-width 9"):
        wire.parse(with_params(b, 1, "bits", 9), wire.KIND_UPLOAD, known)


def test_decoding_never_raises_anything_else_on_random_bytes():
    rng = np.random.default_rng(0)
    good = wire.encode_upload(make_upload())
    for i in range(300):
        blob = rng.integers(0, 256, rng.integers(0, 400), dtype=np.uint8).tobytes()
        if i % 3 == 0:
            blob = good[:32] + blob  # a valid header on junk
        for decode in (wire.decode_upload, wire.decode_download, wire.decode_model):
            with pytest.raises(wire.WireFormatError):
                decode(blob)


def _decode_or_wire_error(data: bytes):
    """Decode; a payload that decodes is used the way the server and client use it (its
    planes read by the native kernels), so fuzzing reaches the native decoding paths too."""
    known = aggregate.Aggregator()  # holds a good upload: `data` meets the known-layout path
    known.add(_good())
    try:
        known.add(data)
    except wire.WireFormatError:
        pass
    try:
        u = wire.decode_upload(data)
    except wire.WireFormatError:
        return  # anything else escapes and fails the test
    for q in u.layers.values():
        assert q.codes().shape == q.shape and q.negative().shape == q.shape
        assert q.dequantize().shape == q.shape
    agg = aggregate.Aggregator()
    agg.add(data)
    agg.result()


_GOOD = None


def _good() -> bytes:
    global _GOOD
    if _GOOD is None:
        _GOOD = wire.encode_upload(make_upload(seed=4))
    return _GOOD


@fuzz
@given(st.data())
def test_fuzz_mutated_payloads(data):
    """Truncations, bit flips, spliced and duplicated regions, overwritten header and index
    fields; each resealed half of the time so that it reaches the checks behind the checksum."""
    good = bytearray(_good())
    op = data.draw(st.sampled_from(["truncate", "flip", "splice", "duplicate", "header", "index"]))
    if op == "truncate":
        good = good[: data.draw(st.integers(0, len(good)))]
    elif op == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(good) - 1))
            good[i] ^= 1 << data.draw(st.integers(0, 7))
    elif op in ("splice", "duplicate"):
        a = data.draw(st.integers(0, len(good)))
        b = data.draw(st.integers(a, min(len(good), a + 512)))
        chunk = good[a:b] if op == "duplicate" else data.draw(st.binary(max_size=64))
        at = data.draw(st.integers(0, len(good)))
        good = good[:at] + chunk + good[at:]
    elif op == "header":
        off = data.draw(st.sampled_from([4, 6, 7, 8, 20, 24, 28, 32, 40, 48]))
        fmt = data.draw(st.sampled_from(["<B", "<H", "<I", "<Q"]))
        if off + struct.calcsize(fmt) <= len(good):
            val = data.draw(st.sampled_from([0, 1, 2, 255, 2**31, 2**32 - 1, 2**40, 2**63]))
            struct.pack_into(fmt, good, off, val % (1 << (8 * struct.calcsize(fmt))))
    else:
        pos = data.draw(st.integers(0, 400))
        val = data.draw(st.integers(0, 255))

        def m(index, n):
            if index:
                index[pos % len(index)] = val

        good = bytearray(with_index(bytes(good), m))
    blob = bytes(good)
    if op != "index" and len(blob) >= 32 and data.draw(st.booleans()):
        blob = reseal(blob)
    _decode_or_wire_error(blob)


@fuzz
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(blob):
    _decode_or_wire_error(blob)
    _decode_or_wire_error(_good()[:32] + blob)
    if len(blob) >= 32:
        _decode_or_wire_error(reseal(b"FMPQ\x01\x00\x01\x00" + blob[8:]))


@fuzz
@given(st.data())
def test_fuzz_valid_payloads_round_trip(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    layers = {}
    for i in range(data.draw(st.integers(0, 4))):
        shape = tuple(data.draw(st.lists(st.integers(0, 9), max_size=3)))
        layers[f"l{i}.weight"] = make_layer(shape, data.draw(st.integers(1, 8)), gen)
    floats = {f"f{i}": torch.randn(data.draw(st.integers(0, 7)), generator=gen) for i in range(data.draw(st.integers(0, 3)))}
    u = wire.Upload(data.draw(st.integers(0, 2**64 - 1)), data.draw(st.integers(0, 2**32 - 1)),
                    data.draw(st.integers(0, 2**64 - 1)), data.draw(st.floats(0.5, 8.0)), layers,
                    {n: data.draw(st.integers(0, 7)) for n in layers}, floats)
    assert_same_upload(u, wire.decode_upload(wire.encode_upload(u)))


def test_pack_reference_agrees_with_numpy_packbits():
    """The layout oracle against numpy's packbits (an independent implementation)."""
    rng = np.random.default_rng(3)
    for bits in range(1, 9):
        for n in (0, 1, 31, 32, 33, 257):
            codes = rng.integers(0, 1 << bits, n, dtype=np.uint8)
            planes = PR.pack_codes(torch.from_numpy(codes), bits).numpy()
            nb = 4 * math.ceil(n / 32)
            for p in range(bits):
                want = np.packbits((codes >> (bits - 1 - p)) & 1, bitorder="little")
                assert planes[p * nb:p * nb + want.size].tolist() == want.tolist()
                assert not planes[p * nb + want.size:(p + 1) * nb].any()


def test_decoding_refuses_an_upload_budget_outside_0_32(upload):
    """decode_upload checks the budget it reads (in (0, 32], finite), not only the encoder:
    a resealed payload whose budget field says 0, a negative value, 33, NaN or inf is refused."""
    data = wire.encode_upload(upload)
    at = wire._HEADER.size + 8 + 8 + 4  # client_id, num_samples, round, then the float32 budget
    assert struct.unpack_from("<f", data, at)[0] == upload.budget
    for bad in (0.0, -2.0, 33.0, float("nan"), float("inf")):
        b = bytearray(data)
        struct.pack_into("<f", b, at, bad)
        expect_error(reseal(bytes(b)), "budget")
    ok = bytearray(data)
    struct.pack_into("<f", ok, at, 32.0)  # the upper bound itself is allowed
    assert wire.decode_upload(reseal(bytes(ok))).budget == 32.0


def test_encoding_refuses_a_layer_scale_that_is_negative_or_not_finite(upload):
    """The encoder checks every quantized layer's scale (finite, >= 0) even for a
    QuantizedTensor made directly, so it never writes a payload the decoder would refuse."""
    name, q = next(iter(upload.layers.items()))
    for bad in (-1.0, float("nan"), float("inf"), 1e39):  # 1e39: finite, but inf in the float32 it travels in
        layers = dict(upload.layers, **{name: wire.QuantizedTensor(q.shape, q.bits, bad, q.planes, q.signs)})
        with pytest.raises(ValueError, match="scale must be finite and >= 0"):
            wire.encode_upload(wire.Upload(0, 0, 1, 4.0, layers, {}, {}))
        with pytest.raises(ValueError, match="scale must be finite and >= 0"):
            wire.encode_download(wire.Download(0, 0, layers, {}))
        if bad >= 0:
            with pytest.raises(ValueError, match="scale must be finite and >= 0 in float32"):
                wire.QuantizedTensor.from_codes(torch.zeros(3, dtype=torch.uint8), torch.zeros(3, dtype=torch.bool), 2,
                                                bad)


# ---- the boundaries of every documented rule (docs/FORMAT.md) ----------------------------------
def _header_field(data: bytes, at: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return reseal(bytes(b))


def test_metadata_sits_at_the_documented_offsets(upload):
    """Upload <QQIf, download <QI4x, model <I4x, each right after the 32-byte header."""
    up = wire.encode_upload(wire.Upload(2**40 + 3, 7, 2**33 + 5, 2.5, upload.layers, upload.deltas, upload.floats))
    assert struct.unpack_from("<QQIf", up, 32) == (2**40 + 3, 2**33 + 5, 7, 2.5)
    down = wire.encode_download(wire.Download(2**40 + 3, 7, upload.layers, upload.floats))
    assert struct.unpack_from("<QI4s", down, 32) == (2**40 + 3, 7, b"\0" * 4)
    model = wire.encode_model(wire.Model(7, upload.floats))
    assert struct.unpack_from("<I4s", model, 32) == (7, b"\0" * 4)


def test_padding_that_is_not_zero_is_refused(upload):
    """docs/FORMAT.md: a download's and a model's metadata end in 4 zero bytes, and the
    compressed index is padded with zero bytes; a payload with anything else there is refused."""
    down = wire.encode_download(wire.Download(3, 7, upload.layers, upload.floats))
    with pytest.raises(wire.WireFormatError, match="metadata's 4 padding bytes are not zero"):
        wire.decode_download(_header_field(down, 32 + 12, "<I", 1))
    model = wire.encode_model(wire.Model(7, upload.floats))
    with pytest.raises(wire.WireFormatError, match="metadata's 4 padding bytes are not zero"):
        wire.decode_model(_header_field(model, 32 + 4, "<I", 0xDEADBEEF))
    padded = 0
    for data, kind in ((wire.encode_upload(upload), wire.KIND_UPLOAD), (down, wire.KIND_DOWNLOAD),
                       (model, wire.KIND_MODEL), (wire.encode_model(wire.Model(7, {"w": torch.ones(1)})), wire.KIND_MODEL),
                       (wire.encode_model(wire.Model(7, {"wx": torch.ones(1)})), wire.KIND_MODEL)):
        meta = 56 if kind == wire.KIND_UPLOAD else 48 if kind == wire.KIND_DOWNLOAD else 40
        zlen = wire._HEADER.unpack_from(data)[7]
        if zlen % 4 == 0:
            continue
        padded += 1
        known = wire.parse(data, kind)
        forged = _header_field(data, meta + zlen, "<B", 0x55)
        for k in (None, known):
            with pytest.raises(wire.WireFormatError, match="index's padding bytes are not zero"):
                wire.parse(forged, kind, k)
    assert padded


def test_an_index_length_field_that_lies_is_refused_also_for_a_known_layout():
    """ilen must be exactly what the index inflates to; a server that knows the layout (the
    same compressed index bytes) still holds the header's ilen to it."""
    a = wire.encode_upload(make_upload(seed=0))
    b = wire.encode_upload(make_upload(seed=0, bits={n: 8 for n in make_upload().layers}))
    known = wire.parse(a, wire.KIND_UPLOAD)
    ilen = wire._HEADER.unpack_from(b)[8]
    forged = _header_field(b, 28, "<I", ilen + 1)
    expect_error(forged, f"index decompresses to {ilen} bytes, header says {ilen + 1}")
    with pytest.raises(wire.WireFormatError, match="header says"):
        wire.parse(forged, wire.KIND_UPLOAD, known)


def test_bytes_after_the_compressed_index_are_refused(upload):
    """The index is one complete zlib stream: bytes after its end (inside zlen) are refused."""
    data = wire.encode_upload(upload)
    magic, ver, kind, flags, _, _, n, zlen, ilen = wire._HEADER.unpack_from(data)
    start = 32 + wire._META[kind].size
    z = data[start:start + zlen] + b"\0" * 4
    rest = data[start + wire._align4(zlen):]
    head = wire._HEADER.pack(magic, ver, kind, flags, 0, 0, n, len(z), ilen)
    expect_error(reseal(head + data[32:start] + z + b"\0" * (wire._align4(len(z)) - len(z)) + rest),
                 "not one complete compressed block")


def test_name_lengths_1_to_1024(upload):
    """A name of 1024 bytes travels; 1025 is refused by the encoder and by the decoder, and an
    empty one by the decoder (its bytes given to the next name, so the lengths still add up)."""
    floats = {"x" * 1024: torch.ones(2), "y": torch.zeros(1)}
    back = wire.decode_model(wire.encode_model(wire.Model(1, floats)))
    assert list(back.tensors) == list(floats)
    with pytest.raises(ValueError, match="longer than 1024 bytes"):
        wire.encode_model(wire.Model(1, {"x" * 1025: torch.ones(2)}))
    data = wire.encode_upload(upload)

    def lengths(first, second):
        def m(index, n):
            lens = np.frombuffer(index, dtype="<u2", count=n, offset=n * 36).copy()
            total = int(lens[0]) + int(lens[1])
            lens[0], lens[1] = first(total), total - first(total)
            index[n * 36:n * 38] = lens.tobytes()
        return m

    expect_error(with_index(data, lengths(lambda t: 0, None)), r"entry 0 \(''\): empty or too long name")
    names = {"a" * 1024: torch.ones(1), "b": torch.ones(1)}
    big = wire.encode_upload(wire.Upload(0, 0, 1, 4.0, {}, {}, names))
    expect_error(with_index(big, lengths(lambda t: 1025, None)), "entry 0 .*: empty or too long name")


def test_dtype_codes_1_to_4(upload):
    data = wire.encode_upload(upload)

    def dtype(value):
        def m(index, n):
            rec = np.frombuffer(index, dtype=wire._RECORD, count=n).copy()
            rec[n - 1]["dtype"] = value
            index[: rec.nbytes] = rec.tobytes()
        return m

    expect_error(with_index(data, dtype(5)), "unknown dtype code 5")


def test_eight_dimensions_travel_nine_do_not():
    t = torch.arange(16, dtype=torch.float32).reshape(1, 2, 1, 2, 1, 1, 2, 2)
    q = wire.QuantizedTensor.from_float(t - 7.5, 3)
    back = wire.decode_upload(wire.encode_upload(wire.Upload(0, 0, 1, 4.0, {"q": q}, {}, {"t": t})))
    assert torch.equal(back.floats["t"], t) and back.layers["q"].shape == t.shape
    assert torch.equal(back.layers["q"].dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="at most 8 dimensions"):
        wire.encode_model(wire.Model(0, {"t": t.reshape(1, 1, 2, 1, 2, 1, 1, 2, 2)}))


def test_unused_dimensions_must_be_zero(upload):
    data = wire.encode_upload(upload)

    def m(index, n):
        rec = np.frombuffer(index, dtype=wire._RECORD, count=n).copy()
        rec[0]["dims"][rec[0]["ndim"]] = 3  # past ndim: must be 0
        index[: rec.nbytes] = rec.tobytes()

    expect_error(with_index(data, m), "entry 0 .*: nonzero unused dimensions")


def test_a_model_payload_holds_no_quantized_entries():
    data = wire.encode_model(wire.Model(1, {"a": torch.ones(3), "b": torch.ones(2)}))

    def m(index, n):
        rec = np.frombuffer(index, dtype=wire._RECORD, count=n).copy()
        rec[1]["dtype"] = wire.DT_QUANTIZED
        index[: rec.nbytes] = rec.tobytes()

    with pytest.raises(wire.WireFormatError, match="entry 1 .*: a model payload holds no quantized layers"):
        wire.decode_model(with_index(data, m))


def test_a_zero_scale_layer_travels():
    """s = 0 (an all-zero layer, as binarizing zeros gives) is a valid scale: >= 0, not > 0."""
    zero = wire.QuantizedTensor.from_float(torch.zeros(2, 5), 3)
    made = wire.QuantizedTensor.from_codes(torch.ones(4, dtype=torch.uint8), torch.zeros(4, dtype=torch.bool), 2, 0.0)
    assert zero.scale == 0.0 and made.scale == 0.0
    back = wire.decode_upload(wire.encode_upload(wire.Upload(0, 0, 1, 4.0, {"z": zero, "m": made}, {}, {})))
    assert back.layers["z"].scale == 0.0 and back.layers["m"].scale == 0.0
    assert not back.layers["z"].dequantize().any() and not back.layers["m"].dequantize().any()


@pytest.mark.parametrize("field, value, match", [
    ("client_id", 2**64, "client_id must be an integer in 0..2\\^64-1"),
    ("num_samples", 2**64, "num_samples must be an integer in 0..2\\^64-1"),
    ("round", 2**32, "round must be an integer in 0..2\\^32-1"),
    ("budget", 0.0, r"budget must be in \(0, 32\]"),
    ("budget", 32.5, r"budget must be in \(0, 32\]"),
    ("budget", 1e-46, r"budget must be in \(0, 32\] in float32, got 1e-46"),  # 0 in float32: the decoder refused it
])
def test_encoding_refuses_metadata_outside_its_field(upload, field, value, match):
    kw = dict(client_id=0, round=0, num_samples=1, budget=4.0)
    kw[field] = value
    with pytest.raises(ValueError, match=match):
        wire.encode_upload(wire.Upload(layers=upload.layers, deltas={}, floats={}, **kw))
    kw[field] = {"client_id": 2**64 - 1, "num_samples": 2**64 - 1, "round": 2**32 - 1, "budget": 32.0}[field]
    wire.decode_upload(wire.encode_upload(wire.Upload(layers=upload.layers, deltas={}, floats={}, **kw)))  # the limit


def test_the_encoders_name_a_payload_or_field_of_the_wrong_kind(upload):
    """encode_upload(None) and an Upload whose layers were a list were AttributeErrors on
    .deltas or .items; a delta of 2.7 was taken as 2. A NumPy integer delta still counts."""
    name = next(iter(upload.layers))
    for call, msg in [
        (lambda: wire.encode_upload(None), "expected a wire.Upload, got NoneType"),
        (lambda: wire.encode_upload(wire.Download(0, 1, {}, {})), "expected a wire.Upload, got Download"),
        (lambda: wire.encode_upload(wire.Upload(0, 0, 1, 4.0, list(upload.layers.values()), {}, {})),
         "Upload.layers must be a mapping of names, got list"),
        (lambda: wire.encode_upload(wire.Upload(0, 0, 1, 4.0, upload.layers, None, {})),
         "Upload.deltas must be a mapping of names, got NoneType"),
        (lambda: wire.encode_upload(wire.Upload(0, 0, 1, 4.0, upload.layers, {name: 2.7}, {})),
         f"{name}: delta must be an int, got float"),
        (lambda: wire.encode_download(wire.Download(0, 1, {}, [torch.zeros(1)])),
         "Download.floats must be a mapping of names, got list"),
        (lambda: wire.encode_model(wire.Model(0, None)), "Model.tensors must be a mapping of names, got NoneType"),
    ]:
        with pytest.raises(TypeError, match=msg):
            call()
    got = wire.decode_upload(wire.encode_upload(wire.Upload(0, 0, 1, 4.0, upload.layers, {name: np.int64(3)}, {})))
    assert got.deltas[name] == 3


def test_encoding_refuses_bad_deltas_dims_and_dtypes(upload):
    name = next(iter(upload.layers))
    with pytest.raises(ValueError, match="delta must be in 0..7, got -1"):
        wire.encode_upload(wire.Upload(0, 0, 1, 4.0, upload.layers, {name: -1}, {}))
    with pytest.raises(ValueError, match=r"deltas for layers that are not uploaded: \['nope'\]"):
        wire.encode_upload(wire.Upload(0, 0, 1, 4.0, upload.layers, {"nope": 1}, {}))
    with pytest.raises(ValueError, match="every dimension must be in 0..2\\^32-1"):
        wire.encode_model(wire.Model(0, {"t": torch.zeros(0, 2**32)}))
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float16"):
        wire.encode_model(wire.Model(0, {"t": torch.zeros(2)}), dtype=torch.float64)


def test_an_empty_entry_whose_other_dimensions_overflow_is_refused(upload):
    """(0, 2^32-1, 2^32-1) holds no elements and no bytes, but no tensor has that shape (its
    strides overflow int64): a WireFormatError, not torch's RuntimeError out of decode_* (the
    fp server decodes client models with decode_model) or out of Aggregator.result()."""
    def wide(i, dims):
        def m(index, n):
            rec = np.frombuffer(index, dtype=wire._RECORD, count=n).copy()
            rec[i]["ndim"] = len(dims)
            rec[i]["dims"][:] = list(dims) + [0] * (8 - len(dims))
            index[: rec.nbytes] = rec.tobytes()
        return m

    up = wire.encode_upload(make_upload())
    empty = list(make_upload().layers).index("empty.weight")
    for dims in [(0, 2**32 - 1, 2**32 - 1), (2**32 - 1, 0, 2**32 - 1, 2**32 - 1), (0, 2**25, 2**24)]:
        bad = with_index(up, wide(empty, dims))
        expect_error(bad, "too large to represent")
        with pytest.raises(wire.WireFormatError, match="too large to represent"):
            aggregate.Aggregator().add(bad)
    model = wire.encode_model(wire.Model(1, {"w": torch.zeros(0, 3), "b": torch.ones(2)}))
    with pytest.raises(wire.WireFormatError, match="too large to represent"):
        wire.decode_model(with_index(model, wide(0, (0, 2**32 - 1, 2**32 - 1))))
    # an empty entry whose other dimensions are large but representable still travels
    ok = wire.decode_model(with_index(model, wide(0, (0, 2**24, 2**24))))
    assert ok.tensors["w"].shape == (0, 2**24, 2**24)
