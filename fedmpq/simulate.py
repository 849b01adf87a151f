"""``fedmpq simulate``: a whole federation in one process, client and server talking only
through wire payloads (bytes). :func:`run` is the in-process transport of
:func:`fedmpq.federation.federate` (the round loop, checkpoints and results): it trains the
sampled clients one after another. Configuration: :mod:`fedmpq.config`."""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Optional

from . import client as client_mod
from .config import DEFAULTS, check_config, load_data, model_builder, resolve_device, train_config
from .federation import federate, resumed_config
from .progress import progress as _progress
from .trainers import share_cores

log = logging.getLogger("fedmpq")
# One run at a time per process: a run seeds torch's global generator and sets torch's
# thread count, both process-wide, so two runs on two threads changed each other's results.
_RUNNING = threading.Lock()


def run(cfg: Dict[str, Any], out: Optional[str] = None, resume: bool = False, progress: bool = True,
        ready: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """Run the federation ``cfg`` in this process; returns the results dict (and writes it
    with checkpoints to ``out``). ``resume``: continue from ``out``'s checkpoint; the keys
    ``cfg`` leaves out take the run's own values (a key added since the run was saved, the
    value it ran with), as ``fedmpq simulate --resume`` does. ``ready``:
    called once every check has passed (config, device, data, results folder, checkpoint),
    before any training.

    One client trains at a time, with the config's ``threads`` as torch's thread count for
    the run (restored afterwards); without it, the cores this process may use divided among
    the fedmpq runs training on this machine now (:mod:`fedmpq.trainers`), counted every round.

    One run per process at a time: a second, from another thread while one runs, raises
    RuntimeError (a run seeds torch's global generator and sets torch's thread count, which
    are the process's: two runs side by side each got results other than its own config's).
    Run federations side by side in separate processes."""
    if not _RUNNING.acquire(blocking=False):
        raise RuntimeError("fedmpq.simulate.run is already running in this process (another thread): a run "
                           "seeds torch's global generator and sets its thread count, which two runs would share; "
                           "run federations side by side in separate processes")
    try:
        return _run(cfg, out, resume, progress, ready)
    finally:
        _RUNNING.release()


def _run(cfg, out, resume, progress, ready) -> Dict[str, Any]:
    if resume and out is not None and not set(DEFAULTS) <= set(cfg):
        cfg = resumed_config(out, cfg)  # not today's defaults (memory_format's was contiguous)
    c = check_config(cfg)
    resolve_device(c)  # no CUDA here: one line before the data loads
    ds, parts = load_data(c)  # MissingDatasetError before any training
    build = model_builder(c, ds)
    tcfg = train_config(c)

    trained_with = []  # the thread count the last round's clients trained with: what it records

    def local(r: int, downloads: Dict[int, bytes]):
        trained_with[:] = [threads_now()]  # counted again every round
        uploads, train_acc, quant = {}, {}, 0.0
        for k in _progress(sorted(downloads), progress, f"round {r} clients", leave=False):
            idx = parts[k]
            try:
                res = client_mod.client_update(downloads[k], ds.train_x[idx], ds.train_y[idx], build, tcfg, k, r,
                                               c["budgets"][k])
            except Exception as e:  # a failing client is left out of the round, with the reason
                log.warning("round %d: client %d failed and is left out: %s", r, k, e)
                continue
            uploads[k] = res.upload
            train_acc[k] = res.train_accuracy
            quant += res.quant_seconds
        return uploads, train_acc, quant

    # the setting, else this process's cores shared with the runs training beside it now
    with share_cores(c["threads"]) as threads_now:
        return federate(c, ds, {k: len(p) for k, p in enumerate(parts)}, dict(enumerate(c["budgets"])), local,
                        out=out, resume=resume, progress=progress, ready=ready,
                        threads=lambda: trained_with[0] if trained_with else threads_now())
