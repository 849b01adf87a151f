"""What the study tools (round_anatomy, weight_stats, unclamped_upload) share: a run's
checkpoint read back into the server the federation had, and the layer groups they report."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fedmpq import config, server as server_mod
from fedmpq.federation import read_checkpoint


def read_run(run):
    """(checkpoint state, checked config, rounds done) of the run folder ``run``."""
    state = read_checkpoint(Path(run) / "checkpoint.pt")
    return state, config.check_config(state["config"]), len(json.loads(state["rounds"]))


def initial_server(c, ds, parts) -> server_mod.Server:
    """The server of config ``c`` as the federation builds it: the seed's initial global model."""
    torch.manual_seed(c["seed"])  # the global model's initialization, as the federation does
    return server_mod.Server(c["alg"], config.model_builder(c, ds), budgets=dict(enumerate(c["budgets"])),
                             num_samples={k: len(p) for k, p in enumerate(parts)}, seed=c["seed"],
                             rule=c["aggregation"])


def group(name: str) -> str:
    """A ResNet stage (``layer2``) for its layers, else the layer's own name (a state key's
    ``.weight`` is left out)."""
    return name.split(".")[0] if name.startswith("layer") else name.removesuffix(".weight")
