"""The Flower app's configuration: Flower's run config (``[tool.flwr.app.config]``,
``flwr run --run-config``) holds the same keys as ``fedmpq simulate``, plus the app's own keys
below. The app reads a key with ``-`` or ``_``; ``flwr run --run-config`` takes only the
spelling of flower/pyproject.toml (``n-clients=3``: the SuperLink refuses a key the app's
config does not list). Flower's values are scalars only, so ``budgets`` is a
comma-separated string (``"2,2,4,4,4,6,6,6,8,8"``), ``alpha`` may be ``"iid"`` and an empty (or
``"none"``) ``data_dir`` means the dataset's default location."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

from .. import config as config_mod
from ..config import ConfigError

# The app's own keys: where results go ("" = nowhere), how long a round and the wait for the
# nodes may take (seconds).
APP_DEFAULTS: Dict[str, Any] = {"out": "", "round_timeout": 600.0, "node_timeout": 120.0}


def _value(key: str, v: Any) -> Any:
    if key == "budgets" and isinstance(v, str):
        return config_mod.parse_budgets(v)
    if key == "alpha" and isinstance(v, str):
        return config_mod.parse_alpha(v)
    if key == "data_dir" and isinstance(v, str):
        return config_mod.parse_optional_path(v)
    if key == "cuda_graph" and isinstance(v, str):
        return config_mod.parse_bool(key)(v)
    if key in ("train_samples", "threads") and isinstance(v, str):
        return config_mod.parse_optional_int(key)(v)
    return v


def normalized(run_config: Mapping[str, Any]) -> Dict[str, Any]:
    """One source's run config with every key spelled with ``_``; ``ConfigError`` for a key
    given in both spellings with different values (``n-clients=3`` and ``n_clients=4``: the
    last was taken, silently). Sources are normalized apart, then merged: a later source
    (``fedmpq flower``'s own keys) overrides an earlier one (the app's pyproject) by name."""
    out: Dict[str, Any] = {}
    for k, v in dict(run_config).items():
        key = k.replace("-", "_")
        if key in out and out[key] != v:
            raise ConfigError(f"the run config gives {key.replace('_', '-')} twice ({k}={v!r} and another "
                              f"spelling ={out[key]!r}): give one")
        out[key] = v
    return out


def from_run_config(run_config: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the federation's checked config, the app's settings) from a Flower run config.

    Raises :class:`fedmpq.config.ConfigError` naming the first bad or unknown key."""
    raw = normalized(run_config)
    app = dict(APP_DEFAULTS)
    for k in APP_DEFAULTS:
        if k in raw:
            app[k] = raw.pop(k)
    for k in ("round_timeout", "node_timeout"):
        if isinstance(app[k], bool) or not isinstance(app[k], (int, float)) or not app[k] > 0:
            raise ConfigError(f"{k.replace('_', '-')} must be a number of seconds > 0, got {app[k]!r}")
    if not isinstance(app["out"], str):
        raise ConfigError(f"out must be a folder path (a string), got {app['out']!r}")
    return config_mod.check_config({k: _value(k, v) for k, v in raw.items()}), app
