"""The FedMPQ ``ClientApp``: a node's train handler decodes the server's download, trains
with :func:`fedmpq.client.client_update` and replies with the upload bytes, unchanged.

Which client a node is comes from its node config: ``partition-id`` (its part of the
seeded Dirichlet/iid split of the dataset, the same split ``fedmpq simulate`` makes) and
``num-partitions`` (must equal the run's ``n_clients``); ``budget`` (optional) overrides the
run's ``budgets[partition-id]``; ``device``, ``cuda-graph`` and ``threads`` (optional) are this
machine's: where the node trains, whether its steps replay from a CUDA graph, and with how
many threads (without it, the cores the node's process may use divided among the fedmpq
processes training on this machine, SuperNodes and ``fedmpq simulate`` runs, counted at the
start of every local epoch: :func:`fedmpq.trainers.share_cores`). Flower's simulation sets
the first two itself; a SuperNode gets them with
``--node-config "partition-id=0 num-partitions=3 budget=4 threads=1"``.

Messages (record names are the protocol):
- ``query.info`` -> ``info``: ``{"client", "budget", "num_samples"}``.
- ``train``: ``fedmpq``: ``{"download": bytes, "round", "client"}`` -> ``fedmpq``:
  ``{"upload": bytes, "client"}`` and ``metrics``: ``{"train_accuracy", "train_loss",
  "seconds", "quant_seconds"}``.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any, Dict, Mapping, Optional, Tuple

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fedmpq_kernels as fk

from .. import client as client_mod
from .. import config as config_mod
from ..trainers import share_cores
from .config import from_run_config, normalized

log = logging.getLogger("fedmpq")


@functools.lru_cache(maxsize=2)
def _data(key: str):
    # Cached per process: Flower's simulation keeps its workers, so a node loads its data once.
    return config_mod.load_data(json.loads(key))


def _whole(node_config: Mapping[str, Any], key: str) -> int:
    # An integer, or its digits as a string (Flower's legacy simulation passes "0"); 1.5 or
    # true would otherwise pass int() as another client.
    v = node_config[key]
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"the node config's {key} must be an integer, got {v!r}")
    return v


# The node-config keys this ClientApp reads. Others are left alone (one SuperNode's node config
# may serve other apps too), but said once each: a typo (budjet=2) would silently take the run's.
NODE_KEYS = frozenset({"partition-id", "num-partitions", "budget", "device", "threads", "cuda-graph", "cuda_graph"})
_said_unknown: set = set()


def node_client(node_config: Mapping[str, Any], c: Dict[str, Any]) -> Tuple[int, float, Dict[str, Any]]:
    """(client id, budget, the node's config) of a node from its node config; raises
    ``ValueError`` naming the problem (missing, non-integer or out-of-range partition-id, num-partitions
    other than n_clients, a budget outside 1..8, a bad device, cuda-graph or threads). The node
    config's ``device``, ``cuda-graph`` and ``threads`` (this machine's) override the run's."""
    if "partition-id" not in node_config:
        raise ValueError("the node config has no partition-id (flower-supernode --node-config "
                         "\"partition-id=0 num-partitions=N\")")
    unknown = sorted(set(node_config) - NODE_KEYS - _said_unknown)
    if unknown:
        _said_unknown.update(unknown)
        log.warning("the node config's %s %s not read by fedmpq (it reads %s)", ", ".join(unknown),
                    "is" if len(unknown) == 1 else "are", ", ".join(sorted(NODE_KEYS - {"cuda_graph"})))
    k = _whole(node_config, "partition-id")
    n = _whole(node_config, "num-partitions") if "num-partitions" in node_config else c["n_clients"]
    if n != c["n_clients"]:
        raise ValueError(f"the node config says num-partitions={n}, the run has n_clients={c['n_clients']}")
    if not 0 <= k < n:
        raise ValueError(f"partition-id {k} is outside 0..{n - 1}")
    budget = node_config.get("budget", c["budgets"][k])
    if (isinstance(budget, bool) or not isinstance(budget, (int, float))
            or not fk.MIN_BITS <= budget <= fk.MAX_BITS):
        raise ValueError(f"the node's budget must be in {fk.MIN_BITS}..{fk.MAX_BITS}, got {budget!r}")
    if "cuda-graph" in node_config and "cuda_graph" in node_config:  # one of them was silently taken
        raise ValueError(f"the node config gives cuda-graph={node_config['cuda-graph']!r} and "
                         f"cuda_graph={node_config['cuda_graph']!r}: give one")
    own = {key.replace("-", "_"): node_config[key] for key in ("device", "threads", "cuda-graph", "cuda_graph")
           if key in node_config}
    if isinstance(own.get("threads"), str):
        own["threads"] = config_mod.parse_optional_int("threads")(own["threads"])
    if isinstance(own.get("cuda_graph"), str):
        own["cuda_graph"] = config_mod.parse_bool("cuda_graph")(own["cuda_graph"])
    return k, budget, config_mod.check_config({**c, **own})


def _setup(context: Context, overrides: Optional[Mapping[str, Any]]):
    c, _ = from_run_config({**normalized(context.run_config), **normalized(overrides or {})})
    k, budget, c = node_client(context.node_config, c)
    # The data depend on every key but how the node runs (data_dir stays: it says where they come from).
    how = set(config_mod.EXECUTION_KEYS) - {"data_dir"}
    ds, parts = _data(json.dumps({key: v for key, v in c.items() if key not in how}, sort_keys=True))
    return c, k, budget, ds, parts[k]


def node_info(context: Context, run_config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The ``info`` reply's record: ``{"client", "budget", "num_samples"}`` of this node. A
    device the node cannot use raises here, at the run's start, naming it: it passed, and
    then every train message of the run failed on it."""
    c, k, budget, _, idx = _setup(context, run_config)
    config_mod.resolve_device(c)
    return {"client": k, "budget": float(budget), "num_samples": int(len(idx))}


def make_app(run_config: Optional[Mapping[str, Any]] = None) -> ClientApp:
    """A ClientApp for the run config's federation; ``run_config`` entries override Flower's."""
    app = ClientApp()

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        """Tell the server which client this node is, its budget and its number of samples."""
        return Message(RecordDict({"info": ConfigRecord(node_info(context, run_config))}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """One round of this client: download bytes in, upload bytes out."""
        c, k, budget, ds, idx = _setup(context, run_config)
        config_mod.resolve_device(c)
        rec = msg.content["fedmpq"]
        if int(rec["client"]) != k:
            raise ValueError(f"a download for client {rec['client']} reached the node of client {k}")
        download = rec["download"]
        if not isinstance(download, bytes):
            raise ValueError("the train message carries no download bytes")
        # this process trains one client at a time: the node's threads, else this machine's cores
        # shared with the fedmpq processes training beside it (other SuperNodes, runs), counted
        # again every epoch
        with share_cores(c["threads"]) as threads_now:
            res = client_mod.client_update(download, ds.train_x[idx], ds.train_y[idx], config_mod.model_builder(c, ds),
                                           config_mod.train_config(c), k, int(rec["round"]), budget,
                                           on_epoch=threads_now)
        return Message(RecordDict({
            "fedmpq": ConfigRecord({"upload": res.upload, "client": k}),
            "metrics": MetricRecord({"train_accuracy": res.train_accuracy, "train_loss": res.train_loss,
                                     "seconds": res.seconds, "quant_seconds": res.quant_seconds}),
        }), reply_to=msg)

    return app


app = make_app()  # what `flwr run` loads (flower/pyproject.toml)
