"""The FedMPQ ``ServerApp``: the round loop of ``fedmpq simulate`` (:func:`fedmpq.federation.federate`:
the same sampling, downloads, aggregation, bit reassignment, evaluation, ``results.json``
and checkpoints) with Flower carrying the payloads: one train message per sampled node,
holding that client's own download (its layers at its bit assignment) as bytes.

Flower's built-in strategies send one message to all nodes and aggregate arrays; FedMPQ
needs a different payload per client and its own aggregation, so the loop talks to the
``Grid`` directly, as the strategies themselves do inside.

A node that is offline, raises, does not answer within ``round-timeout`` seconds, or
replies without an upload is left out of that round with a logged reason; an upload that
does not decode is left out by the server's aggregation. The run goes on with the rest. A
SuperNode that comes back (restarted, under a new node id) takes its client up again from
the next round on.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

import fedmpq_kernels as fk

from .. import data as data_mod
from .. import federation
from .config import from_run_config, normalized

log = logging.getLogger("fedmpq")


def wait_for_nodes(grid: Grid, n: int, timeout: float, poll: float = 0.5) -> List[int]:
    """The ids of the connected nodes once at least ``n`` are; ``TimeoutError`` after
    ``timeout`` seconds. (Flower's own ``sample_nodes`` waits without a limit.)"""
    deadline = time.monotonic() + timeout
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= n:
            return ids
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(ids)} of the {n} nodes the run needs connected within {timeout:g} s")
        time.sleep(poll)


def _ask_nodes(grid: Grid, ids: List[int], n_clients: int, timeout: float) -> List[Tuple[int, int, Any, int]]:
    """Ask nodes ``ids`` which client they are: (node id, client, budget, samples) of every
    valid answer, in reply order; a node that fails or answers badly is logged and left out."""
    msgs = [Message(RecordDict({}), dst_node_id=nid, message_type=MessageType.QUERY + ".info") for nid in ids]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    node_of_msg = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}  # see grid_transport
    found = []
    for rep in replies:
        nid = rep.metadata.src_node_id
        if rep.has_error():
            nid = node_of_msg.get(rep.metadata.reply_to_message_id, nid)
            log.warning("node %d could not say which client it is: %s", nid, rep.error.reason)
            continue
        try:
            rec = rep.content["info"]
            k, b, d = rec["client"], float(rec["budget"]), rec["num_samples"]
            if isinstance(k, bool) or not isinstance(k, int) or isinstance(d, bool) or not isinstance(d, int):
                raise TypeError(f"client {k!r} and num_samples {d!r} must be integers")
            if not (0 <= k < n_clients and fk.MIN_BITS <= b <= fk.MAX_BITS and d >= 1):
                raise ValueError(f"client {k} must be in 0..{n_clients - 1}, budget {b} in "
                                 f"{fk.MIN_BITS}..{fk.MAX_BITS} and num_samples {d} >= 1")
        except (KeyError, TypeError, ValueError) as e:
            log.warning("node %d said which client it is in a reply that is left out: %s", nid, e)
            continue
        found.append((nid, k, int(b) if b.is_integer() else b, d))
    return found


def identify_nodes(grid: Grid, ids: List[int], n_clients: int, timeout: float, poll: float = 0.5,
                   asked: Optional[set] = None) -> Tuple[Dict[int, int], Dict[int, float], Dict[int, int]]:
    """Ask every node which client it is: ({client: node id}, {client: budget}, {client:
    samples}). Nodes ``ids`` first; while a client is missing, a node that connects later
    (a SuperNode started late, or restarted under a new node id while its old id is still
    listed) is asked too, until ``timeout`` seconds have passed. Every node asked is added to
    ``asked`` when given, and none is asked twice. Raises ``RuntimeError`` when the nodes do
    not cover clients 0..n_clients-1 exactly once (naming the gap or the duplicate)."""
    deadline = time.monotonic() + timeout
    node_of, budgets, samples = {}, {}, {}
    seen = set()
    new = list(ids)
    while True:
        seen.update(new)
        if new:
            for nid, k, b, d in _ask_nodes(grid, new, n_clients, max(deadline - time.monotonic(), poll)):
                if k in node_of:
                    raise RuntimeError(f"nodes {node_of[k]} and {nid} both say they are client {k} (partition-id)")
                node_of[k], budgets[k], samples[k] = nid, b, d
        missing = sorted(set(range(n_clients)) - set(node_of))
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(poll)
        new = sorted(set(grid.get_node_ids()) - seen)
    if asked is not None:
        asked.update(seen)
    if missing:
        raise RuntimeError(f"no node is client {missing[0]} (of 0..{n_clients - 1}); {len(node_of)} of the "
                           f"{len(seen)} nodes asked identified themselves as clients within node-timeout {timeout:g} s "
                           "(a node that failed to answer is named above)")
    return node_of, budgets, samples


def grid_transport(grid: Grid, node_of: Dict[int, int], timeout: float,
                   clients: Optional[Mapping[int, Tuple[Any, int]]] = None,
                   ask_timeout: float = 120.0, asked: Sequence[int] = ()) -> federation.Transport:
    """A :data:`fedmpq.federation.Transport` over Flower: one train message per sampled client
    to its node, the replies' upload bytes back.

    ``clients`` ({client: (budget, samples)}, as the nodes first said): when given, a node that
    connects later (a SuperNode restarted, which Flower gives a new node id) is asked which
    client it is, within ``ask_timeout`` seconds, before the round's messages go out; one that
    is a known client with the same budget and samples takes that client over from its old
    node. A node is asked once (``asked``: the nodes asked before the run)."""
    node_of = dict(node_of)
    client_of = {nid: k for k, nid in node_of.items()}
    asked_nodes = set(client_of) | set(asked)

    def rejoin(r: int, online: set) -> None:
        new = sorted(online - asked_nodes)
        if not new or clients is None:
            return
        asked_nodes.update(new)
        for nid, k, b, d in _ask_nodes(grid, new, len(clients), ask_timeout):
            if k not in clients or (b, d) != tuple(clients[k]):
                log.warning("round %d: node %d says it is client %d with budget %s and %d samples, but the run has "
                            "%s; not used", r, nid, k, b, d, clients.get(k, "no such client"))
                continue
            old = node_of[k]
            log.warning("round %d: client %d is on node %d now (was node %d%s)", r, k, nid, old,
                        ", still listed" if old in online else "")
            client_of.pop(old, None)
            node_of[k], client_of[nid] = nid, k

    def train(r: int, downloads: Dict[int, bytes]):
        online = set(grid.get_node_ids())
        rejoin(r, online)
        msgs = []
        for k, blob in sorted(downloads.items()):
            if node_of[k] not in online:
                log.warning("round %d: the node of client %d is offline; left out", r, k)
                continue
            content = RecordDict({"fedmpq": ConfigRecord({"download": blob, "round": r, "client": k})})
            msgs.append(Message(content, dst_node_id=node_of[k], message_type=MessageType.TRAIN, group_id=str(r)))
        asked = {client_of[m.metadata.dst_node_id] for m in msgs}
        uploads, acc_of, quant, answered = {}, {}, 0.0, set()
        replies = list(grid.send_and_receive(msgs, timeout=timeout))
        # The SuperLink answers itself, from its own node id, for a node that went offline or a
        # reply that expired: such an error names our message (ids are set when pushed).
        client_of_msg = {m.metadata.message_id: client_of[m.metadata.dst_node_id] for m in msgs}
        for rep in replies:
            k = client_of.get(rep.metadata.src_node_id)
            if k is None and rep.has_error():
                k = client_of_msg.get(rep.metadata.reply_to_message_id)
            if k is None or k not in asked:
                continue
            answered.add(k)
            if rep.has_error():
                log.warning("round %d: client %d failed and is left out: %s", r, k, rep.error.reason)
                continue
            try:
                up = rep.content["fedmpq"]["upload"]
                m = rep.content["metrics"]
                if not isinstance(up, bytes):
                    raise TypeError("upload is not bytes")
                acc, qs = float(m["train_accuracy"]), float(m["quant_seconds"])
                if not (0 <= acc <= 1 and 0 <= qs < math.inf):  # NaN fails too: it would be the round's
                    raise ValueError(f"train_accuracy {acc} outside 0..1 or quant_seconds {qs} not finite >= 0")
            except (KeyError, TypeError, ValueError) as e:
                log.warning("round %d: client %d replied without an upload and is left out: %s", r, k, e)
                continue
            uploads[k] = up
            acc_of[k] = acc
            quant += qs
        for k in sorted(asked - answered):
            log.warning("round %d: client %d did not reply within %g s and is left out", r, k, timeout)
        # in client order: replies arrive in any order, and float sums depend on it
        return dict(sorted(uploads.items())), dict(sorted(acc_of.items())), quant

    return train


def _log_to_stderr() -> None:
    # fedmpq's round lines only (the root logger at INFO would also print every HTTP request);
    # through the root's handlers where somebody configured them, else a handler of its own.
    if not logging.getLogger().handlers and not any(getattr(h, "_fedmpq", False) for h in log.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        h._fedmpq = True  # type: ignore[attr-defined]
        log.addHandler(h)
    log.setLevel(logging.INFO)


def make_app(run_config: Optional[Mapping[str, Any]] = None) -> ServerApp:
    """A ServerApp running the federation its run config describes (:mod:`fedmpq.flower.config`);
    ``run_config`` entries override Flower's (``run_simulation`` passes none)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_to_stderr()
        c, opts = from_run_config({**normalized(context.run_config), **normalized(run_config or {})})
        federation.prepare_out(opts["out"] or None)  # a folder holding a run: refused before the nodes are waited for
        ds = data_mod.load(c["dataset"], c["data_dir"])  # the server's held-out test set
        ids = wait_for_nodes(grid, c["n_clients"], opts["node_timeout"])
        asked: set = set()
        node_of, budgets, samples = identify_nodes(grid, ids, c["n_clients"], opts["node_timeout"], asked=asked)
        c = dict(c, budgets=[budgets[k] for k in range(c["n_clients"])])  # the nodes' own budgets
        transport = grid_transport(grid, node_of, opts["round_timeout"],
                                   clients={k: (budgets[k], samples[k]) for k in node_of}, ask_timeout=opts["node_timeout"],
                                   asked=sorted(asked))
        res = federation.federate(c, ds, samples, budgets, transport,
                                out=opts["out"] or None, progress=False,
                                threads=c["threads"])  # the run's; a node's own node config may differ
        last = res["rounds"][-1] if res["rounds"] else None
        if federation.trained_nothing(res):
            log.error("no client's upload was aggregated in any of the %d rounds: the global model is untrained "
                      "(the rounds' warnings say why)", len(res["rounds"]))
        elif last:
            log.info("final accuracy %.4f after %d rounds%s", last["accuracy"], last["round"],
                     f"; results in {opts['out']}" if opts["out"] else "")

    return app


app = make_app()  # what `flwr run` loads (flower/pyproject.toml)
