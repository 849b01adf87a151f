"""A run's results on disk (``results.json``, ``rounds.csv``, plots) and the comparison of
several runs (``fedmpq compare``). The results dict is :mod:`fedmpq.federation`'s."""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .config import EXECUTION_KEYS, ConfigError, with_defaults

log = logging.getLogger("fedmpq")


def replace_whole(path: Path, write: Callable[[Path], None], durable: bool = False) -> None:
    """``write(tmp)``, then ``tmp`` renamed to ``path`` (``os.replace``, atomic): a kill or an
    error mid-write leaves the last whole file, never half of one. Every file of a run's
    folder is written this way. ``durable``: the data reach the disk before the rename, and
    the rename before the return (``fsync`` of the file and its folder), so a power loss too
    leaves the last whole file, not an empty one (the checkpoint: the other files are made
    again from it on ``--resume``; ~0.2 ms a round here)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    if durable:
        _fsync(tmp)
    os.replace(tmp, path)
    if durable:
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a folder some file systems do not sync (or a system without it): the rename stands
        pass
    finally:
        os.close(fd)


def write_results(results: Dict[str, Any], outdir: Path, plots: bool = True) -> None:
    """results.json and rounds.csv, each replaced whole; with ``plots``, the plots too
    (:func:`write_plots`)."""
    replace_whole(outdir / "results.json", lambda p: p.write_text(json.dumps(results, indent=1)))
    cols = ["round", "accuracy", "accuracy_train_mode", "train_accuracy", "bytes_up", "bytes_down", "float32_bytes",
            "seconds", "quant_seconds"]
    lines = [",".join(cols)] + [",".join("" if r.get(k) is None else str(r[k]) for k in cols) for r in results["rounds"]]
    replace_whole(outdir / "rounds.csv", lambda p: p.write_text("\n".join(lines) + "\n"))
    if plots:
        write_plots(results, outdir)


def write_plots(results: Dict[str, Any], outdir: Path) -> None:
    """accuracy.png and bits.png (mean bits per client over rounds); nothing without
    matplotlib. About 0.15 s on 2 CPU cores, whatever the rounds: :func:`fedmpq.federation.federate`
    paces it (:class:`fedmpq.federation.PlotPacer`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rs = results["rounds"]
    xs = [r["round"] for r in rs]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs, [r["accuracy"] for r in rs], marker="o")
    _round_ticks(ax, xs)
    ax.set_xlabel("round")
    ax.set_ylabel("global test accuracy")
    ax.set_title(f"{results['config']['alg']} on {results['config']['dataset']}")
    fig.tight_layout()
    replace_whole(outdir / "accuracy.png", lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    clients = sorted({k for r in rs for k in r.get("mean_bits", {})}, key=int)
    if clients:
        # results.json's mean_bits: each client's upload, weighted by layer size (a plain mean
        # over layers would show a budget-2 client's small 8-bit layers as 5.5 bits)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for k in clients:
            pts = [(r["round"], r["mean_bits"][k]) for r in rs if k in r.get("mean_bits", {})]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"client {k}")
        _round_ticks(ax, xs)
        ax.set_xlabel("round")
        ax.set_ylabel("mean bits per weight (uploaded)")
        ax.set_ylim(0.5, 8.5)
        if len(clients) <= 12:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        replace_whole(outdir / "bits.png", lambda p: fig.savefig(p, dpi=120, format="png"))
        plt.close(fig)


def _round_ticks(ax, xs: List[int]) -> None:
    """Whole rounds on the x axis, starting at round 1."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(left=1 if not xs else min(1, xs[0]) - 0.2, right=(max(xs) if xs else 1) + 0.2)


def _group_key(cfg: Dict[str, Any]) -> str:
    # runs that differ only in the seed or in where/how fast they ran are one setting
    return json.dumps({k: v for k, v in cfg.items() if k != "seed" and k not in EXECUTION_KEYS}, sort_keys=True)


def _labels(cfgs: List[Dict[str, Any]]) -> List[str]:
    """``alg (dataset)``, plus every other key in which the groups differ (``, lr=0.25``), so
    two groups never share a label."""
    keys = sorted({k for c in cfgs for k in c} - {"alg", "dataset", "seed", *EXECUTION_KEYS})
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in cfgs}) > 1]
    return [f"{c['alg']} ({c['dataset']})" + "".join(f", {k}={_text(c.get(k))}" for k in differ) for c in cfgs]


def _text(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _median(xs: List[float]) -> float:
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


# The per-round fields compare reads as numbers (accuracy is required; the others may be
# missing or null in a run that did not record them)
_ROUND_NUMBERS = ("accuracy", "accuracy_train_mode", "seconds", "quant_seconds", "bytes_up", "bytes_down",
                  "float32_bytes")


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _shape_problem(res: Dict[str, Any]) -> Optional[str]:
    """What in a results dict compare and bits_table cannot read, or None. Checked whole
    before anything is printed: a wrong field was a traceback, after the table for --bits."""
    rounds = res["rounds"]
    if not isinstance(rounds, list):
        return f"rounds must be a list, got {type(rounds).__name__}"
    for i, r in enumerate(rounds):
        if not isinstance(r, dict):
            return f"round {i + 1} must be a mapping of fields, got {type(r).__name__}"
        for key in _ROUND_NUMBERS:
            if key == "accuracy" and key not in r:
                return f"round {i + 1} has no accuracy"
            v = r.get(key)
            if (v is not None or key == "accuracy") and not _is_number(v):
                return f"round {i + 1}'s {key} is {v!r}, not a number"
        for key in ("bits", "mean_bits"):
            per_client = r.get(key, {})
            if not isinstance(per_client, dict):
                return f"round {i + 1}'s {key} must be a mapping of clients, got {type(per_client).__name__}"
            for client, v in per_client.items():
                if not (client.isascii() and client.isdigit()):
                    return f"round {i + 1}'s {key} has client {client!r}, not a client number"
                if key == "bits" and not (isinstance(v, list) and all(map(_is_number, v))):
                    return f"round {i + 1}'s bits of client {client} are {v!r}, not a list of numbers"
                if key == "mean_bits" and v is not None and not _is_number(v):
                    return f"round {i + 1}'s mean_bits of client {client} is {v!r}, not a number"
    budgets = res["config"].get("budgets")
    if budgets is not None and not (isinstance(budgets, list) and all(map(_is_number, budgets))):
        return f"config budgets is {budgets!r}, not a list of numbers"
    return None


def _load(dirs: List[str], warn: bool = True) -> Dict[str, List[Any]]:
    """results.json of each folder, grouped by setting (runs that differ only in the seed); a
    run of a setting and seed already loaded is left out, with a warning. Every file is
    checked whole first: :class:`ConfigError` ("... is not a fedmpq results file: ...")."""
    groups: Dict[str, List[Any]] = {}
    for d in dirs:
        if Path(d).is_file():  # was "d/results.json does not exist"
            raise ConfigError(f"{d} is a file, not a run folder: give the folder holding results.json "
                              f"({Path(d).parent})")
        p = Path(d) / "results.json"
        if not p.is_file():
            raise ConfigError(f"{p} is not a file" if p.exists() else f"{p} does not exist")
        try:
            res = json.loads(p.read_text())
        except (ValueError, OSError) as e:
            raise ConfigError(f"{p} is not a readable results file ({type(e).__name__})") from None
        if not isinstance(res, dict) or not isinstance(res.get("config"), dict):
            raise ConfigError(f"{p} is not a fedmpq results file (no config)")
        if not res.get("rounds"):
            raise ConfigError(f"{p} has no rounds")
        problem = _shape_problem(res)
        if problem is not None:
            raise ConfigError(f"{p} is not a fedmpq results file: {problem}")
        res["config"] = with_defaults(res["config"])  # runs from before a key group with its default
        runs = groups.setdefault(_group_key(res["config"]), [])
        twin = next((e for e, r in runs if r["config"].get("seed") == res["config"].get("seed")), None)
        if twin is not None:  # a rerun (or the folder given twice) is not another seed
            if warn:
                log.warning("%s is the same setting and seed as %s: left out of the comparison", d, twin)
            continue
        runs.append((d, res))
    return groups


def compare(dirs: List[str], out: Optional[str] = None, last: int = 5) -> str:
    """Compare several runs: runs whose configurations differ only in the seed form one group.

    Returns a Markdown table, one row per group, over the rounds every seed of the group has:
    the final accuracy and the mean accuracy over the ``last`` rounds (mean over seeds, and
    min..max), both evaluations (eval mode with the aggregated BatchNorm statistics, and
    ``train mode``, the authors'); ``trend``: the mean of the ``last`` rounds minus the mean of
    the ``last`` rounds before them (near 0 when the curve has levelled off; ``-`` when the
    run is shorter than 2·``last`` rounds); the best round; the median seconds per round and
    the share of it spent on quantization work (``quant_seconds``); bytes uploaded per run and
    how many times fewer bytes both ways take than float32 (``-`` where a run did not record
    it). With ``out``, writes the accuracy curves to that PNG: each group's mean over seeds with
    its min..max band; never over an existing file. The header names the rounds averaged:
    ``min(last, rounds)`` where a group has fewer than ``last``.
    Raises :class:`ConfigError` for a folder without ``results.json``, a run with no rounds or
    a results file of the wrong shape, and for an ``out`` that exists, needs matplotlib, or
    cannot be written."""
    if last < 1:
        raise ConfigError(f"last must be >= 1, got {last}")
    if out:
        _refuse_an_existing_plot(out)  # before the table: nothing printed, nothing written
    groups = _load(dirs)

    def stat(xs: List[float]) -> str:
        return f"{sum(xs) / len(xs):.4f} ({min(xs):.4f}..{max(xs):.4f})" if len(xs) > 1 else f"{xs[0]:.4f}"

    def column(runs, n, key):  # per seed, the rounds' values; None when a round lacks them
        cols = [[r.get(key) for r in res["rounds"][:n]] for _, res in runs]
        return None if any(v is None for c in cols for v in c) else cols

    rows, curves, averaged = [], [], set()
    labels = _labels([runs[0][1]["config"] for runs in groups.values()])
    for runs, label in zip(groups.values(), labels):
        n = min(len(res["rounds"]) for _, res in runs)  # rounds every seed has
        accs = column(runs, n, "accuracy")
        if accs is None:
            raise ConfigError(f"{runs[0][0]}: a round without an accuracy")
        k = min(last, n)
        averaged.add(k)
        cells = [label, ",".join(str(res["config"]["seed"]) for _, res in runs), str(n),
                 stat([a[-1] for a in accs]), stat([sum(a[-k:]) / k for a in accs])]
        cells.append(f"{sum(sum(a[-k:]) / k - sum(a[-2 * k:-k]) / k for a in accs) / len(accs):+.4f}"
                     if n >= 2 * k else "-")
        tm = column(runs, n, "accuracy_train_mode")
        cells += [stat([a[-1] for a in tm]), stat([sum(a[-k:]) / k for a in tm])] if tm else ["-", "-"]
        cells.append(f"{max(max(a) for a in accs):.4f}")
        secs, quant = column(runs, n, "seconds"), column(runs, n, "quant_seconds")
        cells.append(f"{_median([s for c in secs for s in c]):.1f}" if secs else "-")
        cells.append(f"{sum(map(sum, quant)) / sum(map(sum, secs)):.1%}" if secs and quant and sum(map(sum, secs)) > 0
                     else "-")
        ups, downs, f32 = column(runs, n, "bytes_up"), column(runs, n, "bytes_down"), column(runs, n, "float32_bytes")
        cells.append(str(sum(map(sum, ups)) // len(runs)) if ups else "-")
        both = sum(map(sum, ups)) + sum(map(sum, downs)) if ups and downs else 0
        cells.append(f"{sum(map(sum, f32)) / both:.1f}x" if f32 and both else "-")
        rows.append("| " + " | ".join(cells) + " |")
        curves.append((label, accs))
    # the rounds actually averaged: a run shorter than --last is averaged over all of its rounds
    mean = f"mean of last {averaged.pop()}" if len(averaged) == 1 else f"mean of last min({last}, rounds)"
    table = (f"| runs | seeds | rounds | final accuracy | {mean} | trend | final, train mode | "
             f"{mean}, train mode | best | s/round | quant share | bytes up per run | "
             "float32 / bytes |\n|" + "---|" * 13 + "\n" + "\n".join(rows))
    if out:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # not a table alone and status 0: the asked-for plot would be missing unsaid
            raise ConfigError(f"--plot {out} needs matplotlib: pip install -e \".[plots]\"") from None
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for label, accs in curves:
            xs = list(range(1, len(accs[0]) + 1))
            cols = list(zip(*accs))
            ax.plot(xs, [sum(c) / len(c) for c in cols], label=f"{label}, {len(accs)} seed(s)")
            if len(accs) > 1:
                ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], alpha=0.2)
        ax.set_xlabel("round")
        ax.set_ylabel("global test accuracy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out)
        tmp = path.with_name(path.name + ".tmp")
        try:
            # the file named, as named (without a suffix matplotlib would write out + ".png" instead,
            # unsaid: --plot runs/ became runs/.png), and whole: written beside it, then renamed
            # to its name, so a kill mid-write leaves no half PNG
            fig.savefig(tmp, dpi=120, format=path.suffix[1:] or "png")
            _refuse_an_existing_plot(out)  # again: one may have appeared while the runs were read
            os.replace(tmp, path)
        except ConfigError:
            raise
        except (OSError, ValueError) as e:  # a missing folder, an extension matplotlib has no format for
            raise ConfigError(f"--plot {out} cannot be written: {e.strerror if isinstance(e, OSError) else e}") from None
        finally:
            plt.close(fig)
            try:
                tmp.unlink(missing_ok=True)  # what a failed write or rename left
            except OSError:
                pass
    return table


def _refuse_an_existing_plot(out: str) -> None:
    """--plot never writes over a file: a run's own accuracy.png or bits.png (``--plot
    run/accuracy.png``) was replaced by the comparison, unsaid. A folder falls through to the
    write's own "Is a directory"."""
    path = Path(out)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ConfigError(f"--plot {out} already exists; fedmpq compare does not write over a file: "
                          f"give another path or remove it first")


def bits_table(dirs: List[str], warn: bool = True) -> str:
    """The bit-widths clients trained with in their last round, per budget: a Markdown table,
    one row per setting and budget, with the size-weighted mean bits per weight (mean over the
    clients of that budget and the seeds, and min..max) and each layer's bits in model order
    (the mean over those clients, to one decimal where they differ). These are the bits of the
    uploads of the last round: the server's reassignment from the round before, less what
    precision reduction dropped. Runs without per-client bits (``fp``) are left out, and so is a
    second run of a setting and seed (with a warning, unless ``warn`` is False)."""
    groups = _load(dirs, warn)
    labels = _labels([runs[0][1]["config"] for runs in groups.values()])
    rows = []
    for runs, label in zip(groups.values(), labels):
        per_budget: Dict[float, List[Any]] = {}
        for _, res in runs:
            budgets = res["config"].get("budgets") or []
            last_round = res["rounds"][-1]
            for client, bits in sorted(last_round.get("bits", {}).items(), key=lambda kv: int(kv[0])):
                if int(client) < len(budgets):
                    per_budget.setdefault(float(budgets[int(client)]), []).append(
                        (bits, last_round.get("mean_bits", {}).get(client)))
        for budget in sorted(per_budget):
            got = per_budget[budget]
            layers = [sum(c) / len(c) for c in zip(*(b for b, _ in got))]
            means = [m for _, m in got if m is not None]
            mean = (f"{sum(means) / len(means):.2f}" + (f" ({min(means):.2f}..{max(means):.2f})" if len(means) > 1 else "")
                    if means else "-")
            rows.append(f"| {label} | {budget:g} | {len(got)} | {mean} | "
                        + " ".join(f"{v:.0f}" if v == int(v) else f"{v:.1f}" for v in layers) + " |")
    return ("| runs | budget | clients x seeds | mean bits per weight | bits per layer (model order) |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows))
