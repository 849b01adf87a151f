"""The wire format and server aggregation on ResNet-20 (CIFAR, 0.27 M weights), 4 bits.

Groups:
* ``encode`` / ``decode``: one upload (``fedmpq``) against the float32 state dict through
  ``torch.save`` / ``torch.load(weights_only=True)`` (the torch way) and safetensors where it
  is installed. extra_info holds each payload's size in bytes.
* ``aggregate``: K = 10 and 100 uploads, from bytes to the mean (``fedmpq``: check, decode,
  de-quantize and accumulate with :class:`fedmpq.aggregate.Aggregator`) against summing K
  float32 state dicts already in memory with torch (``float_sum``: the floor a float server
  pays after deserializing; the target is fedmpq no slower than that), and against the naive
  path (``decode_dequantize_sum``: decode, de-quantize every layer to a float tensor, add).
  ``fedmpq_median`` / ``fedmpq_trimmed_mean``: the robust rules (every upload de-quantized
  and kept, then a coordinate-wise sort), against the streamed mean.
  uploads/s = K / median.

Every implementation of a group records the same ``bytes``: the float32 model's (K of them for
``aggregate``), not what each reads or writes (a 4-bit upload is about an eighth of that). The
GB/s column of these groups is therefore models per second in float32 bytes, comparable
within a group; the payloads' own sizes are in ``payload_bytes``.
"""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from fedmpq import aggregate, layouts, wire

BITS = 4


def _upload(seed: int, bits: int = BITS) -> wire.Upload:
    qshapes, fshapes = layouts.cifar_resnet(20)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, shape in qshapes.items():
        w = torch.randn(shape, generator=g)
        layers[name] = wire.QuantizedTensor.from_float(w, bits)
    floats = {n: (torch.tensor(100, dtype=torch.int64) if n.endswith("num_batches_tracked") else torch.randn(s, generator=g))
              for n, s in fshapes.items()}
    for n, t in floats.items():
        if n.endswith("running_var"):
            t.abs_()  # a variance: the server refuses a negative one
    return wire.Upload(seed, 1, 500, float(bits), layers, {n: 0 for n in layers}, floats)


def _state(u: wire.Upload):
    sd = {n: q.dequantize() for n, q in u.layers.items()}
    sd.update(u.floats)
    return sd


@pytest.fixture(scope="module")
def payloads():
    ups = [_upload(s) for s in range(10)]
    return ups, [wire.encode_upload(u) for u in ups], [_state(u) for u in ups]


def _safetensors():
    try:
        import safetensors.torch as st

        return st
    except ImportError:
        return None


def _record(benchmark, op, k, impl, nbytes, size=None, anchor="torch.save"):
    benchmark.extra_info.update(group_key=(op, k, f"resnet20-{BITS}bit", "cpu"), name=impl, bytes=nbytes, torch_anchor=anchor)
    if size is not None:
        benchmark.extra_info["payload_bytes"] = size
    benchmark.group = f"{op} {k} resnet20"


def _model_bytes(sd) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


@pytest.mark.parametrize("impl", ["fedmpq", "torch.save", "safetensors"])
def bench_encode(benchmark, impl, payloads):
    ups, datas, states = payloads
    u, sd = ups[0], states[0]
    if impl == "fedmpq":
        fn = lambda: wire.encode_upload(u)  # noqa: E731
    elif impl == "torch.save":
        def fn():
            b = io.BytesIO()
            torch.save(sd, b)
            return b.getvalue()
    else:
        st = _safetensors()
        if st is None:
            pytest.skip("safetensors is not installed")
        fn = lambda: st.save(sd)  # noqa: E731
    size = len(fn())
    _record(benchmark, "encode", 1, impl, _model_bytes(sd), size)
    benchmark(fn)


@pytest.mark.parametrize("impl", ["fedmpq", "torch.save", "safetensors"])
def bench_decode(benchmark, impl, payloads):
    ups, datas, states = payloads
    sd = states[0]
    if impl == "fedmpq":
        data = datas[0]
        fn = lambda: wire.decode_upload(data)  # noqa: E731
    elif impl == "torch.save":
        b = io.BytesIO()
        torch.save(sd, b)
        data = b.getvalue()
        fn = lambda: torch.load(io.BytesIO(data), weights_only=True)  # noqa: E731
    else:
        st = _safetensors()
        if st is None:
            pytest.skip("safetensors is not installed")
        data = st.save(sd)
        fn = lambda: st.load(data)  # noqa: E731
    _record(benchmark, "decode", 1, impl, _model_bytes(sd), len(data))
    benchmark(fn)


@pytest.mark.parametrize("k", [10, 100])
@pytest.mark.parametrize("impl", ["fedmpq", "fedmpq_median", "fedmpq_trimmed_mean", "float_sum",
                                  "decode_dequantize_sum"])
def bench_aggregate(benchmark, impl, k, payloads):
    ups, datas, states = payloads
    # k clients: an aggregate takes one upload per client
    datas = [datas[i] if i < len(datas) else wire.encode_upload(dataclasses.replace(ups[i % len(ups)], client_id=i))
             for i in range(k)]
    states = [states[i % len(states)] for i in range(k)]
    if impl.startswith("fedmpq"):
        rule = impl[len("fedmpq_"):] or "mean"
        # as the server does it: every upload held to the model's layout
        layout = aggregate.model_layout({n: t for n, t in states[0].items()}, ups[0].layers)
        assigned = {n: BITS for n in ups[0].layers}  # and to the bit-widths it was sent

        def fn():
            agg = aggregate.Aggregator(rule=rule, expected=layout)
            for d in datas:
                agg.add(d, assigned=assigned, may_prune=True)
            return agg.result()
    elif impl == "float_sum":
        def fn():
            acc = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in states[0].items()}
            for sd in states:
                for n, t in sd.items():
                    acc[n].add_(t)
            return {n: a / k for n, a in acc.items()}
    else:
        def fn():
            acc = None
            for d in datas:
                u = wire.decode_upload(d)
                sd = {n: q.dequantize() for n, q in u.layers.items()}
                sd.update({n: t.float() for n, t in u.floats.items()})
                if acc is None:
                    acc = {n: torch.zeros_like(t) for n, t in sd.items()}
                for n, t in sd.items():
                    acc[n].add_(t)
            return {n: a / k for n, a in acc.items()}
    _record(benchmark, "aggregate", k, impl, k * _model_bytes(states[0]), anchor="float_sum")
    benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info["uploads_per_s"] = k / stats.stats.median
