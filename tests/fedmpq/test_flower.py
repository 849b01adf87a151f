"""The Flower app: its configuration, the node/client mapping, the Grid transport's handling of
failing, silent and malformed nodes (against a stand-in Grid), Flower's in-process simulation
against ``fedmpq simulate``, and a real deployment on 127.0.0.1 (a SuperLink and three
SuperNodes as processes, one killed mid-run)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

try:
    import flwr  # noqa: F401
except ImportError:
    if os.environ.get("FEDMPQ_REQUIRE_FLOWER") == "1":  # CI: a missing extra is a failure, not a skip
        raise
    pytest.skip("the flower extra is not installed (pip install -e \".[flower]\")", allow_module_level=True)

from fedmpq import cli, config as config_mod, results, simulate  # noqa: E402
from fedmpq.flower import client_app, config, server_app  # noqa: E402
from tests import early  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(dataset="digits", n_clients=3, budgets=[2, 4, 8], rounds=2, local_epochs=1, batch_size=64, alpha=0.5)


@pytest.fixture(autouse=True)
def _flower_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))


# --- configuration -------------------------------------------------------------------------

def test_a_later_source_overrides_a_key_in_either_spelling():
    """pyproject's n-clients, fedmpq flower's n_clients: the later source wins by name (each
    source is checked for a key given twice on its own); the same value twice is no conflict."""
    merged = {**config.normalized({"n-clients": 3, "budgets": "4"}), **config.normalized({"n_clients": 4})}
    assert config.from_run_config(merged)[0]["n_clients"] == 4
    assert config.from_run_config({"n-clients": 3, "n_clients": 3, "budgets": "4"})[0]["n_clients"] == 3


def test_run_config_takes_simulate_keys_flower_style():
    c, app = config.from_run_config({"n-clients": 3, "budgets": "2, 4,8", "alpha": "iid", "data-dir": "",
                                     "round-timeout": 5, "out": "/tmp/x"})
    assert c == config_mod.check_config(dict(n_clients=3, budgets=[2, 4, 8], alpha=None))
    assert app == {"out": "/tmp/x", "round_timeout": 5, "node_timeout": 120.0}


@pytest.mark.parametrize("bad,msg", [
    ({"bogus": 1}, "unknown config key 'bogus'"),
    ({"budgets": "2,x,8", "n-clients": 3}, "budgets must be comma-separated numbers"),
    ({"budgets": "2,4,9", "n-clients": 3}, "every budget must be in 1..8"),
    ({"round-timeout": 0}, "round-timeout must be a number of seconds > 0"),
    ({"node-timeout": "soon"}, "node-timeout must be a number of seconds > 0"),
    ({"out": 3}, "out must be a folder path"),
    # one of the two spellings was taken, silently
    ({"n-clients": 3, "n_clients": 4}, r"gives n-clients twice \(n_clients=4 and another spelling =3\): give one"),
])
def test_bad_run_configs_are_refused_by_name(bad, msg):
    with pytest.raises(config_mod.ConfigError, match=msg):
        config.from_run_config(bad)


def test_the_apps_pyproject_holds_simulates_defaults():
    import tomllib

    table = tomllib.loads((ROOT / "flower" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # every key written out, not filled in by check_config
    assert {k.replace("-", "_") for k in table} == set(config_mod.DEFAULTS) | set(config.APP_DEFAULTS)
    c, app = config.from_run_config(table)
    assert c == config_mod.check_config({})
    assert app == config.APP_DEFAULTS


@pytest.mark.parametrize("node,expect", [
    ({"partition-id": 1, "num-partitions": 3}, (1, 4)),
    ({"partition-id": 2, "num-partitions": 3, "budget": 3.5}, (2, 3.5)),
    ({"partition-id": 0}, (0, 2)),
    ({}, "no partition-id"),
    ({"partition-id": 1, "num-partitions": 4}, "num-partitions=4, the run has n_clients=3"),
    ({"partition-id": 3, "num-partitions": 3}, "partition-id 3 is outside 0..2"),
    ({"partition-id": 0, "budget": 9}, "budget must be in 1..8"),
    ({"partition-id": "1", "num-partitions": "3"}, (1, 4)),  # digits as a string, as Flower's legacy proxy gives them
    ({"partition-id": 1.5}, "partition-id must be an integer, got 1.5"),  # not client 1
    ({"partition-id": True}, "partition-id must be an integer, got True"),
    ({"partition-id": -0.5}, "partition-id must be an integer, got -0.5"),  # not client 0
    ({"partition-id": "abc"}, "partition-id must be an integer, got 'abc'"),
    ({"partition-id": 0, "num-partitions": 3.9}, "num-partitions must be an integer, got 3.9"),
    ({"partition-id": 0, "threads": 0}, "threads must be an integer in 1..4096"),
    ({"partition-id": 0, "device": "gpu"}, "device must be cpu, cuda or cuda:N"),
    ({"partition-id": 0, "cuda-graph": "perhaps"}, "cuda_graph must be true or false"),
    ({"partition-id": 0, "cuda-graph": "true"}, "cuda_graph needs a CUDA device"),
    # one of the two was taken, silently
    ({"partition-id": 0, "cuda-graph": "false", "cuda_graph": True}, "gives cuda-graph='false' and cuda_graph=True: give one"),
])
def test_a_node_config_names_its_client_and_budget(node, expect):
    """...and its own device and threads, which override the run's."""
    c = config_mod.check_config(SMALL)
    if isinstance(expect, str):
        with pytest.raises(ValueError, match=expect):
            client_app.node_client(node, c)
    else:
        k, budget, own = client_app.node_client(node, c)
        assert (k, budget) == expect and own == c


def test_a_node_config_key_fedmpq_does_not_read_is_said_once(caplog, monkeypatch):
    """A typo (budjet=2) silently took the run's budget: such keys are left alone (a SuperNode's
    node config may serve other apps) but said, once per key."""
    monkeypatch.setattr(client_app, "_said_unknown", set())
    c = config_mod.check_config(SMALL)
    with caplog.at_level(logging.WARNING, logger="fedmpq"):
        for _ in range(2):
            k, budget, _ = client_app.node_client({"partition-id": 1, "budjet": 2, "other-app": "x"}, c)
        client_app.node_client({"partition-id": 0, "budget": 4}, c)
    assert (k, budget) == (1, c["budgets"][1])
    said = [r.getMessage() for r in caplog.records if r.name == "fedmpq"]
    assert len(said) == 1 and said[0].startswith("the node config's budjet, other-app are not read by fedmpq"), said
    assert "budget" in said[0] and "partition-id" in said[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_node_whose_device_is_missing_says_so_when_asked_who_it_is():
    """A node config's device=cuda on a machine without one answered the server's info query,
    then failed every train message of the run: it fails the query now, naming the device."""
    ctx = SimpleNamespace(run_config={}, node_config={"partition-id": 0, "num-partitions": 3, "device": "cuda"})
    with pytest.raises(config_mod.ConfigError, match="device cuda was asked for"):
        client_app.node_info(ctx, SMALL)
    ctx.node_config["device"] = "cpu"
    assert client_app.node_info(ctx, SMALL)["client"] == 0


def test_a_node_config_sets_its_own_threads():
    c = config_mod.check_config(SMALL)
    _, _, own = client_app.node_client({"partition-id": 0, "threads": "2", "device": "cpu"}, c)
    assert own["threads"] == 2 and config_mod.resolve_threads(own) == 2
    _, _, own = client_app.node_client({"partition-id": 0, "device": "cuda", "cuda-graph": "true"}, c)
    assert own["device"] == "cuda" and own["cuda_graph"] is True


# --- the transport against a stand-in Grid -------------------------------------------------------

class _Msg:
    """Stands in for flwr's Message (which needs a running app to be built)."""

    def __init__(self, content, dst_node_id, message_type, group_id=None):
        self.content, self.metadata = content, SimpleNamespace(dst_node_id=dst_node_id, src_node_id=dst_node_id,
                                                               message_id=f"msg-{id(self)}")
        self.message_type = message_type

    def has_error(self):
        return False


class _Reply:
    def __init__(self, src, content=None, error=None, reply_to=None):
        self.metadata = SimpleNamespace(src_node_id=src, reply_to_message_id=reply_to)
        self._content, self._error = content, error

    @property
    def content(self):
        if self._content is None:
            raise ValueError("no content")
        return self._content

    @property
    def error(self):
        return self._error

    def has_error(self):
        return self._error is not None


class _Grid:
    def __init__(self, online, answer):
        self.online, self.answer, self.sent = online, answer, []

    def get_node_ids(self):
        return list(self.online)

    def send_and_receive(self, msgs, timeout=None):
        self.sent = list(msgs)
        return [r for m in self.sent if (r := self.answer(m)) is not None]


def test_the_transport_leaves_out_failing_silent_malformed_and_offline_nodes(monkeypatch, caplog):
    monkeypatch.setattr(server_app, "Message", _Msg)
    node_of = {0: 100, 1: 101, 2: 102, 3: 103, 4: 104}

    def answer(m):
        nid, rec = m.metadata.dst_node_id, m.content["fedmpq"]
        up = {"fedmpq": {"upload": b"UP" + rec["download"], "client": rec["client"]},
              "metrics": {"train_accuracy": 0.5 + rec["client"] / 10, "quant_seconds": 0.25}}
        if nid == 101:
            return _Reply(nid, error=SimpleNamespace(code=2, reason="boom in the ClientApp"))
        if nid == 102:
            return None  # never answers
        if nid == 103:
            return _Reply(nid, content={"fedmpq": {"client": 3}, "metrics": {}})
        return _Reply(nid, content=up)

    grid = _Grid(online=[100, 101, 102, 103], answer=answer)  # 104 is offline
    caplog.set_level(logging.WARNING, logger="fedmpq")
    train = server_app.grid_transport(grid, node_of, timeout=7)
    uploads, acc, quant = train(3, {k: bytes([k]) for k in range(5)})
    assert uploads == {0: b"UP\x00"} and acc == {0: 0.5} and quant == 0.25
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [100, 101, 102, 103]
    assert all(m.content["fedmpq"]["round"] == 3 for m in grid.sent)
    log = caplog.text
    assert "client 1 failed and is left out: boom in the ClientApp" in log
    assert "client 2 did not reply within 7 s" in log
    assert "client 3 replied without an upload" in log
    assert "the node of client 4 is offline" in log


def test_a_restarted_supernode_takes_its_client_up_again(monkeypatch, caplog):
    """Flower gives a restarted SuperNode a new node id: before a round, a node not seen
    before is asked which client it is (once); a known client with the same budget and
    samples moves to it. A node that claims other samples, or fails to answer, is not used,
    and neither is asked again."""
    monkeypatch.setattr(server_app, "Message", _Msg)
    caplog.set_level(logging.WARNING, logger="fedmpq")
    who = {100: 0, 101: 1, 201: 1, 202: 2, 203: 0}  # 202 claims client 2 with other samples; 203 errs
    asked = []

    def answer(m):
        nid = m.metadata.dst_node_id
        if m.message_type.endswith(".info"):
            asked.append(nid)
            if nid == 203:
                return _Reply(nid, error=SimpleNamespace(code=2, reason="no data here"))
            return _Reply(nid, content={"info": {"client": who[nid], "budget": 4.0, "num_samples": 10 + (nid == 202)}})
        k = m.content["fedmpq"]["client"]
        return _Reply(nid, content={"fedmpq": {"upload": bytes([k, nid % 256]), "client": k},
                                    "metrics": {"train_accuracy": 0.5, "quant_seconds": 0.25}})

    grid = _Grid([100, 101, 102, 99], answer)  # 99: asked before the run, never a client
    clients = {0: (4, 10), 1: (4, 10), 2: (4, 10)}
    train = server_app.grid_transport(grid, {0: 100, 1: 101, 2: 102}, timeout=7, clients=clients, asked=[99])
    downloads = {0: b"d0", 1: b"d1", 2: b"d2"}
    assert train(1, downloads)[0] == {0: bytes([0, 100]), 1: bytes([1, 101]), 2: bytes([2, 102])}
    assert asked == []
    grid.online = [100, 102, 99, 201, 202, 203]  # 101 died; 201 is client 1 again
    uploads, _, _ = train(2, downloads)
    assert uploads == {0: bytes([0, 100]), 1: bytes([1, 201]), 2: bytes([2, 102])}
    assert sorted(asked) == [201, 202, 203]
    log = caplog.text
    assert "round 2: client 1 is on node 201 now (was node 101)" in log
    assert "node 202 says it is client 2 with budget 4 and 11 samples, but the run has (4, 10); not used" in log
    assert "node 203 could not say which client it is: no data here" in log
    train(3, downloads)
    assert sorted(asked) == [201, 202, 203]  # nobody asked twice
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [100, 102, 201]


def test_an_error_the_superlink_sends_for_an_offline_node_names_its_client(monkeypatch, caplog):
    """When a node goes offline (or its reply expires) the SuperLink answers its message
    itself, from its own node id (flwr's create_message_error_unavailable_res_message): the
    client is left out with that reason, not as one that "did not reply within" the timeout."""
    monkeypatch.setattr(server_app, "Message", _Msg)
    caplog.set_level(logging.WARNING, logger="fedmpq")
    node_of = {0: 100, 1: 101}

    def answer(m):
        nid, k = m.metadata.dst_node_id, m.content["fedmpq"]["client"]
        if nid == 101:
            return _Reply(1, error=SimpleNamespace(code=3, reason="the node is unavailable"),
                          reply_to=m.metadata.message_id)
        return _Reply(nid, content={"fedmpq": {"upload": bytes([k]), "client": k},
                                    "metrics": {"train_accuracy": 0.5, "quant_seconds": 0.25}})

    train = server_app.grid_transport(_Grid([100, 101], answer), node_of, timeout=7)
    uploads, _, _ = train(2, {0: b"d0", 1: b"d1"})
    assert uploads == {0: b"\x00"}
    assert "client 1 failed and is left out: the node is unavailable" in caplog.text
    assert "did not reply" not in caplog.text
    # the same when the nodes are asked which client they are: the node is named, not the SuperLink
    caplog.clear()
    info = {"info": {"client": 0, "budget": 4.0, "num_samples": 10}}
    grid = _Grid([100, 101], lambda m: _Reply(100, content=info) if m.metadata.dst_node_id == 100 else _Reply(
        1, error=SimpleNamespace(code=3, reason="the node is unavailable"), reply_to=m.metadata.message_id))
    with pytest.raises(RuntimeError, match="no node is client 1"):
        server_app.identify_nodes(grid, [100, 101], 2, 0.2, poll=0.05)
    assert "node 101 could not say which client it is: the node is unavailable" in caplog.text


def test_nodes_that_do_not_cover_the_clients_are_refused(monkeypatch):
    monkeypatch.setattr(server_app, "Message", _Msg)

    def grid_of(clients):
        info = {100 + i: k for i, k in enumerate(clients)}
        return _Grid(list(info), lambda m: _Reply(m.metadata.dst_node_id, content={"info": {
            "client": info[m.metadata.dst_node_id], "budget": 4.0, "num_samples": 10}}))

    node_of, budgets, samples = server_app.identify_nodes(grid_of([2, 0, 1]), [100, 101, 102], 3, 5)
    assert node_of == {2: 100, 0: 101, 1: 102} and budgets == {0: 4, 1: 4, 2: 4} and samples[0] == 10
    with pytest.raises(RuntimeError, match="both say they are client 0"):
        server_app.identify_nodes(grid_of([0, 0, 1]), [100, 101, 102], 3, 5)
    with pytest.raises(RuntimeError, match="no node is client 2"):
        server_app.identify_nodes(grid_of([0, 1]), [100, 101], 3, 0.2, poll=0.05)
    with pytest.raises(TimeoutError, match="only 2 of the 3 nodes"):
        server_app.wait_for_nodes(grid_of([0, 1]), 3, timeout=0.2, poll=0.05)


def test_a_node_that_says_which_client_it_is_in_a_bad_reply_is_left_out(monkeypatch, caplog):
    """A malformed info reply (no field, a budget out of 1..8, no samples, a client out of
    range, a float client id) leaves that node unidentified with the reason logged: the
    server stops at "no node is client k" instead of failing on the reply or starting with
    a client it cannot weight."""
    monkeypatch.setattr(server_app, "Message", _Msg)
    caplog.set_level(logging.WARNING, logger="fedmpq")
    good = {"client": 0, "budget": 4.0, "num_samples": 10}
    for bad, why in [({"client": 1}, "budget"), (dict(good, client=1, budget=9.0), "budget 9.0 in 1..8"),
                     (dict(good, client=1, budget="x"), "could not convert"),
                     (dict(good, client=1, num_samples=0), "num_samples 0 >= 1"),
                     (dict(good, client=7), "client 7 must be in 0..1"),
                     (dict(good, client=1.0), "must be integers")]:
        info = {100: good, 101: bad}
        grid = _Grid([100, 101], lambda m: _Reply(m.metadata.dst_node_id, content={"info": info[m.metadata.dst_node_id]}))
        caplog.clear()
        with pytest.raises(RuntimeError, match="no node is client 1"):
            server_app.identify_nodes(grid, [100, 101], 2, 0.2, poll=0.05)
        assert "node 101 said which client it is in a reply that is left out" in caplog.text and why in caplog.text, bad


def test_a_node_that_connects_while_the_clients_are_identified_is_asked_too(monkeypatch, caplog):
    """The nodes listed when enough had connected are asked first; one of them may be a
    SuperNode's old id, still listed after a restart, that never answers, while the restarted
    node (a new id) connects a moment later. It was never asked, and the run stopped with "no
    node is client 1". Now nodes that connect later are asked while a client is missing, within
    node-timeout, each once; every node asked is reported so the rounds do not ask it again."""
    monkeypatch.setattr(server_app, "Message", _Msg)
    caplog.set_level(logging.WARNING, logger="fedmpq")
    who = {100: 0, 102: 1}
    calls = []

    def answer(m):
        nid = m.metadata.dst_node_id
        calls.append(nid)
        if nid == 101:  # the stale id: the SuperLink answers for it
            return _Reply(1, error=SimpleNamespace(code=3, reason="the node is unavailable"), reply_to=m.metadata.message_id)
        return _Reply(nid, content={"info": {"client": who[nid], "budget": 4.0, "num_samples": 10}})

    class Late(_Grid):
        polls = 0

        def get_node_ids(self):  # node 102 connects at the second look
            self.polls += 1
            return [100, 101, 102] if self.polls >= 2 else [100, 101]

    asked = set()
    node_of, budgets, _ = server_app.identify_nodes(Late([100, 101], answer), [100, 101], 2, 5, poll=0.01, asked=asked)
    assert node_of == {0: 100, 1: 102} and budgets == {0: 4, 1: 4}
    assert sorted(calls) == [100, 101, 102] and asked == {100, 101, 102}  # each asked once
    assert "node 101 could not say which client it is" in caplog.text
    # a client still missing at node-timeout: the same error as before, naming how many were asked
    calls.clear()
    with pytest.raises(RuntimeError, match=r"no node is client 1 .*1 of the 2 nodes asked"):
        server_app.identify_nodes(_Grid([100, 101], answer), [100, 101], 2, 0.2, poll=0.05)
    assert sorted(calls) == [100, 101]


# --- the ClientApp's handlers, called as Flower calls them -------------------------------------

def test_a_node_answers_for_its_own_client_and_refuses_another_clients_download(monkeypatch):
    """A node says which client it is (its partition, budget, samples) and trains only the
    downloads addressed to that client. Under ``fp`` the download is the same float model for
    everyone and names no client, so the message's client is the only thing that tells a
    misrouted download: node 0 refuses client 1's, node 1 trains it and answers as client 1;
    a message without download bytes is refused by name."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmpq import server as server_mod, wire
    from fedmpq.flower import simulation

    for attr in ("_run_id", "_node_id", "_task_id"):  # what a running app sets; Message reads them
        monkeypatch.setattr(TaskIdentity, attr, 1)
    c = config_mod.check_config(dict(SMALL, alg="fp"))
    app = client_app.make_app({k: simulation._flat(k, v) for k, v in c.items()})  # as simulation.run hands it over
    ds, parts = config_mod.load_data(c)
    server = server_mod.Server("fp", config_mod.model_builder(c, ds), dict(enumerate(c["budgets"])),
                               {k: len(p) for k, p in enumerate(parts)})
    download = server.downloads(1, [1])[1]

    def node(k):
        return Context(run_id=1, node_id=10 + k, node_config={"partition-id": k, "num-partitions": 3},
                       state=RecordDict(), run_config={})

    def call(k, message_type, content):
        return app(Message(RecordDict(content), dst_node_id=10 + k, message_type=message_type), node(k))

    info = call(0, "query.info", {}).content["info"]
    assert (info["client"], info["budget"], info["num_samples"]) == (0, 2.0, len(parts[0]))
    train = {"fedmpq": ConfigRecord({"download": download, "round": 1, "client": 1})}
    with pytest.raises(ValueError, match="a download for client 1 reached the node of client 0"):
        call(0, "train", train)
    reply = call(1, "train", train).content["fedmpq"]
    assert reply["client"] == 1
    trained = wire.decode_model(reply["upload"])  # fp: a float model, trained from the download's
    assert trained.round == 1 and trained.tensors.keys() == server.global_state.keys()
    assert any(not torch.equal(trained.tensors[k], v) for k, v in server.global_state.items())
    with pytest.raises(ValueError, match="the train message carries no download bytes"):
        call(1, "train", {"fedmpq": ConfigRecord({"download": "not bytes", "round": 1, "client": 1})})


def test_a_node_without_threads_shares_the_cores_with_the_trainers_beside_it_every_epoch(monkeypatch, tmp_path):
    """SuperNodes side by side, none given ``threads``: each trains on the cores divided among
    the fedmpq processes training on the machine (registered in fedmpq.trainers' folder),
    counted again before every local epoch (nodes that start together see each other only
    from then); its entry is there while it trains, and torch's count is restored after. A
    node's own ``threads`` is used as it is, registered all the same (the trainers beside it
    count it)."""
    import subprocess
    import sys

    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmpq import client as client_mod, server as server_mod
    from fedmpq.flower import simulation

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    monkeypatch.setattr("fedmpq.trainers._folder", lambda: tmp_path)
    monkeypatch.setattr(config_mod, "available_cores", lambda: 12)
    c = config_mod.check_config(dict(SMALL, local_epochs=2))
    app = client_app.make_app({k: simulation._flat(k, v) for k, v in c.items()})
    ds, parts = config_mod.load_data(c)
    server = server_mod.Server("fedmpq", config_mod.model_builder(c, ds), dict(enumerate(c["budgets"])),
                               {k: len(p) for k, p in enumerate(parts)})
    train = {"fedmpq": ConfigRecord({"download": server.downloads(1, [0])[0], "round": 1, "client": 0})}
    sleepers, seen = [], []
    real_batches = client_mod._batches

    def sleeper():
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        sleepers.append(p)
        (tmp_path / str(p.pid)).write_text("")  # an entry without a start time: counted while alive
        return p

    def batches(*a, **k):  # each epoch's start: the threads it trains with, and one trainer more
        seen.append((torch.get_num_threads(), (tmp_path / str(os.getpid())).exists()))
        sleeper()
        return real_batches(*a, **k)

    monkeypatch.setattr(client_mod, "_batches", batches)
    before = torch.get_num_threads()
    try:
        sleeper(), sleeper()
        for node_config, want in (({}, [(4, True), (3, True)]), ({"threads": 2}, [(2, True), (2, True)])):
            seen.clear()
            ctx = Context(run_id=1, node_id=10, node_config={"partition-id": 0, "num-partitions": 3, **node_config},
                          state=RecordDict(), run_config={})
            assert app(Message(RecordDict(train), dst_node_id=10, message_type="train"), ctx).content["fedmpq"]
            assert seen == want  # 12 cores / (2 others + this one), then / (3 others + this one)
            assert torch.get_num_threads() == before and not (tmp_path / str(os.getpid())).exists()
            for p in sleepers[2:]:  # the ones the epochs added (waited for: a zombie's pid is alive)
                p.kill()
                p.wait()
            del sleepers[2:]
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


# --- Flower's in-process simulation against fedmpq simulate --------------------------------------

def test_flower_simulation_gives_the_same_model_as_fedmpq_simulate(tmp_path):
    from fedmpq.flower import simulation

    # No thread setting: by default both train each client with the same thread count (the
    # cores this process may use), so torch's CPU reductions add up the same way.
    a = simulation.run(SMALL, out=str(tmp_path / "flower"), round_timeout=300)
    b = simulate.run(SMALL, out=str(tmp_path / "sim"), progress=False)
    assert a["threads"] == b["threads"] == config_mod.resolve_threads(config_mod.check_config(SMALL))
    keys = ("accuracy", "bytes_up", "bytes_down", "bits", "assigned_mean_bits", "reported")
    assert [{k: r[k] for k in keys} for r in a["rounds"]] == [{k: r[k] for k in keys} for r in b["rounds"]]
    ga = torch.load(tmp_path / "flower" / "checkpoint.pt", weights_only=True)["server"]
    gb = torch.load(tmp_path / "sim" / "checkpoint.pt", weights_only=True)["server"]
    assert ga["assignments"] == gb["assignments"]
    for k, v in gb["global_state"].items():
        assert torch.equal(ga["global_state"][k], v), k
    assert results.compare([str(tmp_path / "flower"), str(tmp_path / "sim")]).count("| fedmpq (digits) |") == 1


def _ray_worker_sees():
    """CUDA_VISIBLE_DEVICES in a Ray worker that asked for no GPU, as Flower's workers do."""
    import ray

    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, logging_level="ERROR")
    try:
        @ray.remote(num_cpus=1, num_gpus=0)
        def visible():
            return os.environ.get("CUDA_VISIBLE_DEVICES")

        return ray.get(visible.remote(), timeout=120)
    finally:
        ray.shutdown()


def test_a_cuda_runs_ray_workers_see_this_process_gpus(monkeypatch):
    # Ray hides every GPU from a worker that asked for none, which every ClientApp of a
    # `fedmpq flower --device cuda` run would then refuse; on a CUDA run its workers keep this
    # process's view, so cuda:N names the same card as in `fedmpq simulate`. Checked with
    # Ray itself (no GPU needed: the variable is what Ray hands its workers).
    from fedmpq.flower import simulation

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv(simulation._NOSET, raising=False)
    with simulation._workers_see_this_process_gpus(False):
        assert _ray_worker_sees() == ""  # Ray's default, which the CUDA run must undo
    with simulation._workers_see_this_process_gpus(True):
        assert _ray_worker_sees() == "0,1"
    assert simulation._NOSET not in os.environ  # this process is left as it was


@pytest.mark.parametrize("device, noset", [("cuda:1", "1"), ("cpu", None)])
def test_fedmpq_flower_starts_ray_with_the_gpus_kept_only_on_a_cuda_run(monkeypatch, tmp_path, device, noset):
    import flwr.simulation

    from fedmpq.flower import simulation

    monkeypatch.delenv(simulation._NOSET, raising=False)
    monkeypatch.setattr(simulation, "resolve_device", lambda c: torch.device(c["device"]))  # no GPU here
    seen = {}

    def fake_run_simulation(server_app, client_app, num_supernodes, backend_config):
        seen["env"] = os.environ.get(simulation._NOSET)
        (tmp_path / "results.json").write_text(json.dumps({"rounds": []}))

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    simulation.run({**SMALL, "device": device}, out=str(tmp_path))
    assert seen["env"] == noset
    assert simulation._NOSET not in os.environ


# --- a deployment on 127.0.0.1 ------------------------------------------------------------------

def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _rounds(out: Path) -> list:
    try:  # the file may be half written while the server writes it
        return json.loads((out / "results.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def test_a_local_deployments_node_config_gives_the_threads_asked_or_none(tmp_path, monkeypatch):
    """LocalFederation gives each SuperNode ``threads`` in its node config: the cores split
    evenly by default, the count asked, or (0) none, so each node's client shares the cores
    with the trainers beside it."""
    from fedmpq.flower import local

    monkeypatch.setattr(local, "available_cores", lambda: 8)
    for threads, want in ((None, " threads=2"), (3, " threads=3"), (0, "")):
        fed = local.LocalFederation(4, home=tmp_path, warm=False, threads=threads)
        fed.nodes, cmds = [None] * 4, []
        monkeypatch.setattr(fed, "spawn", lambda cmd, name: cmds.append(cmd))
        fed.start_node(1)
        assert cmds[0][cmds[0].index("--node-config") + 1] == "partition-id=1 num-partitions=4" + want
    with pytest.raises(ValueError, match="threads must be an integer >= 0"):
        local.LocalFederation(4, home=tmp_path, threads=-1)


@pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="Flower's command-line tools are missing")
@early.in_child  # beside the suite: most of its 80 s is round 2's wait for the dead node
def test_a_deployment_goes_on_when_a_supernode_dies_and_takes_it_back_when_it_returns(tmp_path):
    from fedmpq.flower.local import LocalFederation

    out = tmp_path / "results"
    with LocalFederation(3, home=tmp_path / "flwr_home", log_dir=tmp_path, env={"OMP_NUM_THREADS": "1"}) as fed:
        # round-timeout: round 1's replies include each SuperNode's start-up, which took more
        # than 25 s at times on a busy 2-core machine, and round 3's the restarted one's (6 s
        # quiet); round 2 waits this long for the dead node. The test runs in a child beside
        # the suite (tests/early.py), so the wait costs the suite nothing and the margin is wide.
        run_cfg = (f"rounds=3 n-clients=3 budgets='2,4,8' local-epochs=1 batch-size=64 round-timeout=60.0 "
                   f"out='{out}'")
        flwr_run = fed.flwr_run(ROOT / "flower", run_cfg)
        # Kill client 2's SuperNode (its whole process group) once round 1 is recorded, and start
        # it again at once: round 2 has begun with the dead node; the new one (a new node id) is
        # up before round 3.
        try:
            _wait(lambda: len(_rounds(out)) >= 1, 240, "round 1")
            fed.kill_node(2)
            fed.start_node(2, name="supernode2-restarted")
            _wait(lambda: len(_rounds(out)) == 3, 360, "round 3")
        except AssertionError as e:
            raise AssertionError(f"{e}; the processes' logs end with:\n{fed.logs()[-3000:]}") from None
        flwr_run.wait(timeout=60)
        rounds = json.loads((out / "results.json").read_text())["rounds"]
        assert [r["reported"] for r in rounds] == [[0, 1, 2], [0, 1], [0, 1, 2]], fed.logs()[-3000:]
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in rounds)
        logs = fed.logs()
        # silent until round-timeout, or answered for by the SuperLink once it sees the node gone
        assert "client 2 did not reply" in logs or "client 2 failed and is left out" in logs
        assert "round 3: client 2 is on node" in logs


def test_fedmpq_flower_refuses_a_bad_config_before_flower_starts(capsys, tmp_path):
    assert cli.main(["flower", "--n-clients", "3", "--budgets", "2,4,9"]) == 2
    assert capsys.readouterr().err.strip() == "fedmpq: every budget must be in 1..8, got 9"
    assert cli.main(["flower", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path)]) == 2
    assert "fashion-mnist" in capsys.readouterr().err
    assert cli.main(["flower", "--cpus", "0"]) == 2
    capsys.readouterr()
    assert cli.main(["flower", "--cpus", "abc"]) == 2  # one line, not a KeyError from the flag's help text
    assert capsys.readouterr().err.strip() == ("fedmpq: argument --cpus: 'abc' is not allowed; cpus: CPUs Ray may "
                                               "use, an integer >= 1 (see fedmpq flower --help)")


def test_fedmpq_flower_takes_a_round_timeout(capsys, tmp_path, monkeypatch):
    """The round timeout was fixed at 600 s: ten ResNet-20 clients training one after another on
    a CPU outlast it, and were left out of every round. --round-timeout reaches the run."""
    from fedmpq.flower import simulation

    seen = {}

    def fake_run(cfg, out=None, cpus=None, round_timeout=600.0):
        seen["round_timeout"] = round_timeout
        return {"rounds": [{"round": 1, "accuracy": 0.5, "aggregated": [0]}]}
    monkeypatch.setattr(simulation, "run", fake_run)
    assert cli.main(["flower", "--round-timeout", "3600", "--out", str(tmp_path / "a")]) == 0
    assert seen["round_timeout"] == 3600.0
    assert cli.main(["flower", "--out", str(tmp_path / "b")]) == 0 and seen["round_timeout"] == 600.0
    capsys.readouterr()
    for bad in ("0", "-5", "nan", "inf", "x"):
        assert cli.main(["flower", "--round-timeout", bad]) == 2
        assert capsys.readouterr().err.strip() == (f"fedmpq: argument --round-timeout: {bad!r} is not allowed; "
                                                   "round_timeout: seconds, a number > 0 (see fedmpq flower --help)")


def test_the_transport_returns_the_asked_clients_in_order_and_sums_their_quant_seconds(monkeypatch):
    """Replies arrive in any order and a node may answer what it was not asked this round: the
    uploads and accuracies come back in client order, from the asked clients only, and the
    quantization seconds are summed over them."""
    monkeypatch.setattr(server_app, "Message", _Msg)
    node_of = {0: 100, 1: 101, 2: 102}

    def reply(nid, k):
        return _Reply(nid, content={"fedmpq": {"upload": bytes([k]), "client": k},
                                    "metrics": {"train_accuracy": k / 10, "quant_seconds": 0.25 * (k + 1)}})

    class Shuffled(_Grid):
        def send_and_receive(self, msgs, timeout=None):
            self.sent = list(msgs)
            return [reply(m.metadata.dst_node_id, m.content["fedmpq"]["client"]) for m in reversed(self.sent)] + [
                reply(101, 1)]  # client 1 was not sampled this round

    train = server_app.grid_transport(Shuffled([100, 101, 102], None), node_of, timeout=7)
    uploads, acc, quant = train(2, {2: b"d2", 0: b"d0"})
    assert list(uploads.items()) == [(0, b"\x00"), (2, b"\x02")]
    assert acc == {0: 0.0, 2: 0.2} and quant == pytest.approx(0.25 + 0.75)


@pytest.mark.parametrize("metrics", [{"train_accuracy": float("nan"), "quant_seconds": 0.5},
                                     {"train_accuracy": 7.0, "quant_seconds": 0.5},
                                     {"train_accuracy": 0.5, "quant_seconds": float("inf")},
                                     {"train_accuracy": 0.5, "quant_seconds": -1.0}])
def test_a_reply_with_impossible_metrics_is_left_out(monkeypatch, caplog, metrics):
    """A NaN or out-of-range train accuracy, or quantization seconds that are not finite and
    >= 0, would become the round's mean train accuracy and quant_seconds (NaN, which is not
    even JSON, in results.json): that reply is left out, with its reason, like one without
    metrics."""
    monkeypatch.setattr(server_app, "Message", _Msg)
    caplog.set_level(logging.WARNING, logger="fedmpq")
    node_of = {0: 100, 1: 101}

    def answer(m):
        k = m.content["fedmpq"]["client"]
        good = {"train_accuracy": 0.25, "quant_seconds": 0.5}
        return _Reply(m.metadata.dst_node_id, content={"fedmpq": {"upload": bytes([k]), "client": k},
                                                       "metrics": metrics if k == 1 else good})

    train = server_app.grid_transport(_Grid([100, 101], answer), node_of, timeout=7)
    uploads, acc, quant = train(1, {0: b"d0", 1: b"d1"})
    assert uploads == {0: b"\x00"} and acc == {0: 0.25} and quant == 0.5
    assert "client 1 replied without an upload and is left out" in caplog.text


def test_the_server_starts_once_enough_nodes_are_up_and_keeps_whole_budgets_whole(monkeypatch):
    """wait_for_nodes returns as soon as n nodes are connected (exactly n is enough); a budget
    reported as 4.0 is the integer 4, as the run's own budgets are, and 3.5 stays 3.5."""
    monkeypatch.setattr(server_app, "Message", _Msg)
    grid = _Grid([102, 100, 101], lambda m: _Reply(m.metadata.dst_node_id, content={"info": {
        "client": m.metadata.dst_node_id - 100, "budget": 3.5 if m.metadata.dst_node_id == 101 else 4.0,
        "num_samples": 10}}))
    assert server_app.wait_for_nodes(grid, 3, timeout=5, poll=0.01) == [100, 101, 102]
    _, budgets, _ = server_app.identify_nodes(grid, [100, 101, 102], 3, 5)
    assert budgets == {0: 4, 1: 3.5, 2: 4} and type(budgets[0]) is int and type(budgets[1]) is float


@pytest.mark.parametrize("sig", ["SIGINT"])
def test_fedmpq_flower_stops_at_once_on_ctrl_c(sig, tmp_path):
    """Flower's ServerApp thread (not a daemon) would wait out the round's 600 s timeout
    for replies that never come after Ctrl-C: the command leaves at once instead, with its
    one line and the signal's status, the rounds done kept. (SIGTERM is Ray's under
    ``fedmpq flower``: its driver's C++ handler replaces ours and aborts the process.)"""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "fedmpq", "flower", "--out", str(out), "--rounds", "200",
                          "--n-clients", "3", "--budgets", "2,4,8", "--local-epochs", "1", "--cpus", "2"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "bits.png").exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert p.poll() is None, "the run ended before it could be stopped"
        p.send_signal(getattr(signal, sig))
        stopped = time.monotonic()
        err = p.communicate(timeout=60)[1]
    finally:
        p.kill()
    assert time.monotonic() - stopped < 60  # not the round timeout
    assert p.returncode == -getattr(signal, sig), err[-2000:]  # died by it, as the command does
    last = err.strip().splitlines()[-1]
    name = "Ctrl-C" if sig == "SIGINT" else "SIGTERM"
    assert last.startswith(f"fedmpq: stopped by {name} after ") and f"of 200 rounds; the results so far are in {out}" in last
    done = len(json.loads((out / "results.json").read_text())["rounds"])
    assert f"after {done} of 200" in last or f"after {done - 1} of 200" in last  # a round may end on the way out


def test_the_server_app_refuses_an_out_holding_a_run_before_waiting_for_nodes(tmp_path):
    """A second `flwr run` with the same out: refused at once (the grid is never asked for
    nodes), not after the nodes connected and the data loaded."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    app = server_app.make_app({"out": str(out), "n-clients": 3, "budgets": "2,4,8"})

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the grid was used ({name}) before the folder was checked")
    with pytest.raises(config_mod.ConfigError, match="already holds a run"):
        app._main(Untouchable(), SimpleNamespace(run_config={}))
    assert (out / "results.json").read_text() == "{}"


def test_the_warm_superexec_says_why_a_clientapp_failed(tmp_path):
    """The forked ClientApp child swallowed every error but SystemExit: it exited 1 with
    nothing on stderr, so a node's failure could not be told. The traceback is printed now."""
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(
        "import os\n"
        "from types import SimpleNamespace\n"
        "import flwr.supernode.runtime.run_clientapp as rc\n"
        "from flwr.supercore.constant import TaskType\n"
        "from fedmpq.flower import superexec\n"
        "def boom(**kw):\n"
        "    raise RuntimeError('the ClientApp failed: THE REASON')\n"
        "rc.run_clientapp = boom\n"
        "spec = SimpleNamespace(task_type=TaskType.CLIENT_APP, runtime_dependency_install=False, suppress_output=False,\n"
        "                       runtime_api_address='127.0.0.1:1', token='t', insecure=True, root_certificates_path=None,\n"
        "                       parent_pid=os.getpid())\n"
        "superexec.ForkExecutor().launch(spec)\n"
        "_, status = os.wait()\n"
        "print('child exit', os.waitstatus_to_exitcode(status))\n")
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(tmp_path / "flwr"))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert "child exit 1" in done.stdout
    assert "RuntimeError: the ClientApp failed: THE REASON" in done.stderr
