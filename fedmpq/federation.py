"""The server's round loop, whatever carries the payloads (:func:`federate`): sample the
clients, make their downloads, let a transport train them, aggregate, evaluate, record the
round and checkpoint it. :mod:`fedmpq.simulate` carries the payloads in this process,
:mod:`fedmpq.flower` over Flower; both hand :func:`federate` a :data:`Transport`.

Results: ``results.json`` (``{"config": {...}, "rounds": [{"round", "accuracy",
"accuracy_train_mode", "train_accuracy", "bytes_up", "bytes_down", "float32_bytes", "bits":
{client: [per layer]}, "mean_bits": {client: x}, "assigned_mean_bits": {client: x},
"seconds", "quant_seconds", "reported"}, ...]}``); ``bits``/``mean_bits``: what each client
uploaded (after its precision reduction); ``assigned_mean_bits``: the mean bit-width each
client is given for the next round (after reassignment; empty for ``fp``);
``quant_seconds``: the round's quantization work (binarize and encode the downloads,
decode, the bit-plane optimizer, precision reduction and encode on the clients,
aggregation). :func:`fedmpq.results.write_results` writes them with ``rounds.csv`` and plots.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import data as data_mod
from . import server as server_mod
from .config import ConfigError, model_builder
from .progress import progress as _progress
from .results import write_results

log = logging.getLogger("fedmpq")

# A transport trains the sampled clients of one round: (round, {client: download bytes}) ->
# ({client: upload bytes}, [train accuracy per reporter], client-side quantization seconds).
# A client that fails is left out of the uploads (the transport logs why).
Transport = Callable[[int, Dict[int, bytes]], Tuple[Dict[int, bytes], List[float], float]]


def sample_clients(c: Dict[str, Any], round_: int) -> List[int]:
    """The clients sampled in ``round_`` (seeded by the config's seed and the round)."""
    g = torch.Generator().manual_seed(c["seed"] * 1_000_003 + round_)
    m = max(1, round(c["sampling_rate"] * c["n_clients"]))
    return sorted(torch.randperm(c["n_clients"], generator=g)[:m].tolist())


def federate(c: Dict[str, Any], ds: data_mod.Dataset, num_samples: Dict[int, int], budgets: Dict[int, float],
             transport: Transport, out: Optional[str] = None, resume: bool = False,
             progress: bool = True) -> Dict[str, Any]:
    """The server's round loop, whatever carries the payloads: sample, prepare the downloads,
    let ``transport`` train the clients, aggregate, evaluate on ``ds``'s test set, record the
    round and checkpoint it. ``num_samples``/``budgets``: |D_k| and beta_k of every client
    0..n_clients-1. Used by :func:`fedmpq.simulate.run` (in-process) and by the Flower app."""
    torch.manual_seed(c["seed"])  # the global model's initialization
    build = model_builder(c, ds)
    srv = server_mod.Server(c["alg"], build, budgets=budgets, num_samples=num_samples, seed=c["seed"])
    results: Dict[str, Any] = {"config": c, "rounds": []}
    start = 1
    outdir = Path(out) if out else None
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
        ck = outdir / "checkpoint.pt"
        if resume and ck.exists():
            state = torch.load(ck, weights_only=True)
            if state["config"] != json.loads(json.dumps(c)):
                raise ConfigError(f"{ck} was written with another configuration")
            srv.load_state(state["server"])
            results["rounds"] = json.loads(state["rounds"])
            start = len(results["rounds"]) + 1
    rounds = range(start, c["rounds"] + 1)
    bar = _progress(rounds, progress, "rounds")
    for r in bar:
        t0 = time.perf_counter()
        sampled = sample_clients(c, r)
        td = time.perf_counter()
        downloads = srv.downloads(r, sampled)  # binarize + encode
        td = time.perf_counter() - td
        uploads, train_acc, quant = transport(r, downloads)
        uploads = dict(sorted(uploads.items()))  # aggregate in client order, whatever order replies came in
        report = srv.aggregate(r, uploads)
        acc = srv.evaluate(ds.test_x, ds.test_y)
        row = dict(round=r, accuracy=acc, accuracy_train_mode=srv.evaluate_train_mode(ds.test_x, ds.test_y, seed=r),
                   train_accuracy=(sum(train_acc) / len(train_acc)) if train_acc else None,
                   bytes_up=sum(len(u) for u in uploads.values()), bytes_down=sum(len(d) for d in downloads.values()),
                   float32_bytes=srv.float32_bytes() * (len(uploads) + len(downloads)),
                   bits={str(k): v for k, v in report["bits"].items()},
                   mean_bits={str(k): v for k, v in report["mean_bits"].items()},
                   assigned_mean_bits={str(k): v for k, v in report.get("assigned_mean_bits", {}).items()},
                   reported=sorted(uploads), seconds=time.perf_counter() - t0,
                   quant_seconds=quant + report["seconds"] + td)
        results["rounds"].append(row)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(acc=f"{acc:.3f}")
        log.info("round %d: accuracy %.4f, up %d B, down %d B, %.1f s", r, acc, row["bytes_up"], row["bytes_down"],
                 row["seconds"])
        if outdir is not None:
            tmp = outdir / "checkpoint.pt.tmp"
            torch.save({"config": json.loads(json.dumps(c)), "server": srv.state(),
                        "rounds": json.dumps(results["rounds"])}, tmp)
            os.replace(tmp, outdir / "checkpoint.pt")  # atomic: a kill never leaves half a checkpoint
            write_results(results, outdir)
    return results
