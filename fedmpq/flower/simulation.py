"""Flower's in-process simulation of a FedMPQ federation: the ServerApp and ClientApp of
this package on ``n_clients`` virtual SuperNodes (Ray), configured like ``fedmpq simulate``.
``fedmpq flower`` on the command line."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from ..config import check_config
from . import client_app, server_app


def run(cfg: Dict[str, Any], out: Optional[str] = None, cpus: int = 1, round_timeout: float = 600.0) -> Dict[str, Any]:
    """Run the federation ``cfg`` (``fedmpq simulate``'s keys) through Flower's simulation
    engine; returns the results dict (also in ``out``/results.json when given).

    ``cpus``: Ray's CPUs, one client at a time each. Raises
    :class:`fedmpq.config.ConfigError` for a bad config before Flower starts."""
    c = check_config(cfg)
    from flwr.simulation import run_simulation

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        outdir = out or tmp
        rc = {**{k: _flat(k, v) for k, v in c.items()}, "out": str(outdir), "round_timeout": float(round_timeout)}
        run_simulation(server_app=server_app.make_app(rc), client_app=client_app.make_app(rc),
                       num_supernodes=c["n_clients"],
                       backend_config={"init_args": {"num_cpus": cpus, "num_gpus": 0},
                                       "client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
        p = Path(outdir) / "results.json"
        if not p.is_file():
            raise RuntimeError("the Flower run wrote no results (see its log above)")
        return json.loads(p.read_text())


def _flat(key: str, v: Any) -> Any:
    # Flower's config values are scalars: lists as comma strings, no None.
    if key == "budgets":
        return ",".join(str(b) for b in v)
    if v is None:
        return "iid" if key == "alpha" else ""
    return v
