"""A federation's configuration: the keys, their defaults and meaning (:data:`DEFAULTS`,
:data:`HELP`), their checks (:func:`check_config`), config files, and the wiring from a
checked config to the model and the clients' training settings.

The same keys serve ``fedmpq simulate`` and ``fedmpq flower`` (each also a flag), config
files (YAML or JSON) and the Flower app's run config (:mod:`fedmpq.flower.config`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from . import client as client_mod
from . import data as data_mod
from . import nn as qn

PAPER_BUDGETS = [2, 2, 4, 4, 4, 6, 6, 6, 8, 8]
DEFAULTS: Dict[str, Any] = dict(
    alg="fedmpq", dataset="digits", data_dir=None, model="small_cnn", alpha=0.5, n_clients=10,
    budgets=PAPER_BUDGETS, rounds=30, local_epochs=5, batch_size=32, lr=0.1, momentum=0.9, weight_decay=5e-4,
    **{"lambda": 1e-3}, threshold=2.0, sampling_rate=1.0, act_bits=4, scale_lr="lsq", seed=0,
)
ALGS = client_mod.ALGORITHMS

# One line per key for --help and the docs: what it is and what it may be (the default is
# added from DEFAULTS).
HELP: Dict[str, str] = {
    "alg": f"algorithm: {', '.join(ALGS)} (fp = float FedAvg; fp8 = every layer at 8 bits)",
    "dataset": f"dataset: {', '.join(data_mod.DATASETS)}",
    "data_dir": "folder of the dataset's files (none: the dataset's default location)",
    "model": f"model: {', '.join(qn.models.MODELS)}",
    "alpha": "Dirichlet concentration of the non-iid split, a number > 0, or iid",
    "n_clients": "number of clients, an integer >= 1",
    "budgets": "average-bit budget per client, comma-separated numbers in 1..8 (one per client, or one for all)",
    "rounds": "federation rounds, an integer >= 1",
    "local_epochs": "local epochs per round, an integer >= 1",
    "batch_size": "local batch size, an integer >= 1",
    "lr": "learning rate, a number > 0",
    "momentum": "SGD and bit-plane momentum, in [0, 1)",
    "weight_decay": "weight decay of fp's SGD, a number >= 0 (the bit-plane optimizer has none)",
    "lambda": "group-lasso weight on the bit planes, a number >= 0",
    "threshold": "precision reduction threshold theta in percent, a number >= 0",
    "sampling_rate": "fraction of clients sampled per round, in (0, 1]",
    "act_bits": "activation bits on the clients: 1..8 or 16",
    "scale_lr": f"scale learning-rate rule: {', '.join(client_mod.SCALE_LR_RULES)} "
                "(lsq: lr/sqrt(n(2^N-1)) per layer; sgd: lr, the authors')",
    "seed": "seed of the split, the model's initialization, sampling and training, an integer >= 0",
}
assert set(HELP) == set(DEFAULTS)


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the problem."""


def check_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Complete ``cfg`` with :data:`DEFAULTS` and check every key; raises :class:`ConfigError`."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r} (known: {', '.join(DEFAULTS)})")
    c = dict(DEFAULTS)
    c.update({k: v for k, v in cfg.items() if v is not None or k == "alpha"})
    if c["alg"] not in ALGS:
        raise ConfigError(f"alg must be one of {', '.join(ALGS)}, got {c['alg']!r}")
    if c["dataset"] not in data_mod.DATASETS:
        raise ConfigError(f"dataset must be one of {', '.join(data_mod.DATASETS)}, got {c['dataset']!r}")
    if c["model"] not in qn.models.MODELS:
        raise ConfigError(f"model must be one of {', '.join(qn.models.MODELS)}, got {c['model']!r}")
    for key in ("n_clients", "rounds", "local_epochs", "batch_size"):
        if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {c[key]!r}")
    if c["alpha"] is not None and not (isinstance(c["alpha"], (int, float)) and c["alpha"] > 0):
        raise ConfigError(f"alpha must be > 0 (or null for iid), got {c['alpha']!r}")
    budgets = c["budgets"]
    if isinstance(budgets, (int, float)):
        budgets = [budgets] * c["n_clients"]
    if not isinstance(budgets, list) or len(budgets) != c["n_clients"]:
        raise ConfigError(f"budgets must list one budget per client ({c['n_clients']}), got {budgets!r}")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 1 <= b <= 8:
            raise ConfigError(f"every budget must be in 1..8, got {b!r}")
    c["budgets"] = list(budgets)
    for key in ("lr", "lambda", "threshold", "weight_decay"):
        if not isinstance(c[key], (int, float)) or c[key] < 0 or not math.isfinite(c[key]):
            raise ConfigError(f"{key} must be a finite number >= 0, got {c[key]!r}")
    if c["lr"] <= 0:
        raise ConfigError(f"lr must be > 0, got {c['lr']!r}")
    if not 0 <= c["momentum"] < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {c['momentum']!r}")
    if not 0 < c["sampling_rate"] <= 1:
        raise ConfigError(f"sampling_rate must be in (0, 1], got {c['sampling_rate']!r}")
    if c["scale_lr"] not in client_mod.SCALE_LR_RULES:
        raise ConfigError(f"scale_lr must be one of {', '.join(client_mod.SCALE_LR_RULES)}, got {c['scale_lr']!r}")
    if c["act_bits"] not in (1, 2, 3, 4, 5, 6, 7, 8, 16):
        raise ConfigError(f"act_bits must be 1..8 or 16, got {c['act_bits']!r}")
    return c


def load_config_file(path: str) -> Dict[str, Any]:
    """A YAML (``.yaml``/``.yml``, needs PyYAML) or JSON config file as a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ConfigError("a YAML config needs PyYAML (pip install pyyaml); or use JSON") from e
        cfg = yaml.safe_load(text)
    else:
        cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return cfg


def parse_budgets(text: str) -> List[Any]:
    """``"2,4,8"`` -> ``[2, 4, 8]`` (``"2.5"`` stays a float); raises :class:`ConfigError`."""
    try:
        return [float(b) if "." in b else int(b) for b in text.replace(" ", "").split(",") if b]
    except ValueError:
        raise ConfigError(f"budgets must be comma-separated numbers, got {text!r}") from None


def parse_alpha(text: str) -> Optional[float]:
    """``"iid"``/``"none"`` (or empty) -> None (no Dirichlet split), else the number; raises
    :class:`ConfigError`."""
    if text.strip().lower() in ("iid", "none", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"alpha must be a number or iid, got {text!r}") from None


def model_builder(c: Dict[str, Any], ds: data_mod.Dataset) -> Callable[..., Any]:
    """``build(quantized, bits=8, act_bits=None)`` for the config's model on ``ds``'s inputs."""
    kw = dict(num_classes=ds.num_classes, in_channels=ds.in_channels)
    if c["model"] == "small_cnn":
        kw["image_size"] = ds.image_size

    def build(quantized: bool, bits=8, act_bits: Optional[int] = None):
        if quantized:
            return qn.build(c["model"], quantized=True, bits=bits, act_bits=act_bits or c["act_bits"], **kw)
        return qn.build(c["model"], quantized=False, act_bits=act_bits, **kw)

    return build


def train_config(c: Dict[str, Any]) -> client_mod.TrainConfig:
    """The clients' :class:`fedmpq.client.TrainConfig` of a checked configuration."""
    return client_mod.TrainConfig(alg=c["alg"], lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"],
                                  lam=c["lambda"], threshold=c["threshold"], local_epochs=c["local_epochs"],
                                  scale_lr=c["scale_lr"], batch_size=c["batch_size"], seed=c["seed"])
