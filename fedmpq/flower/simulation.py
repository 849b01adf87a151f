"""Flower's in-process simulation of a FedMPQ federation: the ServerApp and ClientApp of
this package on ``n_clients`` virtual SuperNodes (Ray), configured like ``fedmpq simulate``.
``fedmpq flower`` on the command line."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from ..config import ConfigError, available_cores, check_config, load_data, resolve_device, resolve_threads
from . import client_app, server_app


def check(c: Dict[str, Any], cpus: Optional[int] = None) -> int:
    """Everything that can stop a run before Flower starts: the dataset, the device, the CPUs.
    Returns Ray's CPU count. Raises :class:`fedmpq.config.ConfigError` (or
    :class:`fedmpq.data.MissingDatasetError`)."""
    resolve_device(c)
    load_data(c)
    cpus = available_cores() if cpus is None else cpus
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise ConfigError(f"cpus must be an integer >= 1, got {cpus!r}")
    threads = resolve_threads(c)
    if threads > cpus:
        raise ConfigError(f"threads={threads} per client does not fit in cpus={cpus}: give --cpus >= {threads} "
                          f"or --threads <= {cpus}")
    return cpus


def run(cfg: Dict[str, Any], out: Optional[str] = None, cpus: Optional[int] = None,
        round_timeout: float = 600.0) -> Dict[str, Any]:
    """Run the federation ``cfg`` (``fedmpq simulate``'s keys) through Flower's simulation
    engine; returns the results dict (also in ``out``/results.json when given).

    ``cpus``: Ray's CPUs (default: the cores this process may use); each client takes
    ``threads`` of them (default: as ``fedmpq simulate``, every core), so ``cpus // threads``
    clients train at once. With the same threads both give the same results.
    ``round_timeout``: seconds a round's replies may take, and the nodes' first answer
    (which starts their workers). Raises
    :class:`fedmpq.config.ConfigError` for a bad config before Flower starts."""
    c = check_config(cfg)
    cpus = check(c, cpus)
    threads = resolve_threads(c)
    from flwr.simulation import run_simulation

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        outdir = out or tmp
        rc = {**{k: _flat(k, v) for k, v in c.items()}, "out": str(outdir), "round_timeout": float(round_timeout),
              # the first query starts the virtual nodes' workers (each imports torch): on a
              # loaded machine that takes as long as a round may, not the deployment's 120 s
              "node_timeout": float(round_timeout), "threads": threads}
        with _workers_see_this_process_gpus(resolve_device(c).type == "cuda"):
            run_simulation(server_app=server_app.make_app(rc), client_app=client_app.make_app(rc),
                           num_supernodes=c["n_clients"],
                           backend_config={"init_args": {"num_cpus": cpus, "num_gpus": 0},
                                           "client_resources": {"num_cpus": threads, "num_gpus": 0.0}})
        p = Path(outdir) / "results.json"
        if not p.is_file():
            raise RuntimeError("the Flower run wrote no results (see its log above)")
        return json.loads(p.read_text())


# Read by each Ray worker (inherited from this process when Flower starts Ray here).
_NOSET = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


@contextlib.contextmanager
def _workers_see_this_process_gpus(gpu: bool):
    """On a CUDA run, Ray's workers keep this process's CUDA_VISIBLE_DEVICES.

    Ray sets CUDA_VISIBLE_DEVICES="" in a worker that asked for no GPU, so every ClientApp
    would refuse ``--device cuda``; one that asked for GPUs sees only those Ray picked, as
    cuda:0.., so ``cuda:N`` would name another card than in ``fedmpq simulate``. Clients are
    scheduled by CPUs (``threads`` each) and share the card(s), as in ``fedmpq simulate``."""
    if not gpu:
        yield
        return
    before = os.environ.get(_NOSET)
    os.environ[_NOSET] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_NOSET, None)
        else:
            os.environ[_NOSET] = before


def _flat(key: str, v: Any) -> Any:
    # Flower's config values are scalars: lists as comma strings, no None.
    if key == "budgets":
        return ",".join(str(b) for b in v)
    if v is None:
        return "iid" if key == "alpha" else "none" if key in ("train_samples", "threads") else ""
    return v
