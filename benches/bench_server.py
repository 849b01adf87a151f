"""The server's share of a round: ResNet-20 (CIFAR-10 shapes), 10 clients at the paper's
budgets (2, 2, 4, 4, 4, 6, 6, 6, 8, 8 bits), on the CPU, where the server runs whatever the
clients' device (docs/DESIGN.md, "Threads and devices").

Groups (``server`` ...):
* ``downloads``: :meth:`fedmpq.server.Server.downloads` for the 10 clients: every quantized
  layer binarized at each client's bit-widths and encoded (``fedmpq``), against the float
  server's downloads, one float32 model encoded (``fp``, the anchor).
* ``aggregate``: :meth:`fedmpq.server.Server.aggregate` of the 10 uploads: checked,
  decoded, de-quantized and accumulated, then every client's bit-widths reassigned for the
  next round (``fedmpq``), against the float server's mean of 10 float32 models (``fp``).

The uploads are the downloads as clients would send them back untrained (the same sizes and
bit-widths as after training; what training changes, the values, costs the server nothing).
docs/BENCHMARKS.md puts these beside a GPU round's seconds to choose the server's device.
"""
from __future__ import annotations

import pytest
import torch

from fedmpq import client as client_mod
from fedmpq import nn as qn
from fedmpq import server as server_mod
from fedmpq import wire

BUDGETS = [2, 2, 4, 4, 4, 6, 6, 6, 8, 8]
CLIENTS = list(range(len(BUDGETS)))


def _build(quantized: bool, bits=8, act_bits=None):
    if quantized:
        return qn.build("resnet20", quantized=True, bits=bits, act_bits=act_bits or 4, num_classes=10, in_channels=3)
    return qn.build("resnet20", quantized=False, act_bits=act_bits, num_classes=10, in_channels=3)


def _server(alg: str) -> server_mod.Server:
    return server_mod.Server(alg, _build, budgets=dict(enumerate(BUDGETS)), num_samples={k: 5000 for k in CLIENTS})


def _uploads(alg: str, downloads):
    """Each client's download sent back as its upload, untrained."""
    ups = {}
    for k, data in downloads.items():
        if alg == "fp":
            ups[k] = data  # a float client uploads a Model, as it downloads one
            continue
        d = wire.decode_download(data)
        model = _build(quantized=True, bits=1)
        client_mod.load_download(model, d)
        deltas = {f"{n}.weight": 0 for n, _ in qn.bit_layers(model)}
        ups[k] = wire.encode_upload(client_mod.make_upload(model, k, 1, 5000, BUDGETS[k], deltas))
    return ups


@pytest.fixture(scope="module")
def servers():
    # The server's work is serial: one thread, as the clients training beside it take the
    # rest; the session's thread count is restored for the benchmarks after these.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for alg in ("fedmpq", "fp"):
            srv = _server(alg)
            out[alg] = (srv, _uploads(alg, srv.downloads(1, CLIENTS)))
        yield out
    finally:
        torch.set_num_threads(before)


def _record(benchmark, op: str, impl: str, nbytes: int) -> None:
    """``nbytes``: the payloads written (downloads) or read (aggregate): GB/s counts over them."""
    benchmark.extra_info.update(group_key=(f"server {op}", len(CLIENTS), "resnet20", "cpu"), name=impl, bytes=nbytes,
                                torch_anchor="fp")
    benchmark.group = f"server {op} resnet20"


@pytest.mark.parametrize("impl", ["fedmpq", "fp"])
def bench_server_downloads(benchmark, impl, servers):
    srv, uploads = servers[impl]
    # bytes written: fp encodes one model and hands the same bytes to every client
    _record(benchmark, "downloads", impl, sum(len(d) for d in {id(d): d for d in srv.downloads(1, CLIENTS).values()}.values()))
    out = benchmark(srv.downloads, 1, CLIENTS)
    assert sorted(out) == CLIENTS


@pytest.mark.parametrize("impl", ["fedmpq", "fp"])
def bench_server_aggregate(benchmark, impl, servers):
    srv, uploads = servers[impl]
    state = srv.state()
    _record(benchmark, "aggregate", impl, sum(map(len, uploads.values())))

    def run():
        srv.load_state(state)  # every round starts from the same model and bit-widths
        return srv.aggregate(1, uploads)

    report = benchmark(run)
    assert report["reported"] == CLIENTS
