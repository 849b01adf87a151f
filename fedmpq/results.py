"""A run's results on disk (``results.json``, ``rounds.csv``, plots) and the comparison of
several runs (``fedmpq compare``). The results dict is :mod:`fedmpq.federation`'s."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import EXECUTION_KEYS, ConfigError


def write_results(results: Dict[str, Any], outdir: Path) -> None:
    """results.json, rounds.csv and (with matplotlib) the plots."""
    (outdir / "results.json").write_text(json.dumps(results, indent=1))
    cols = ["round", "accuracy", "accuracy_train_mode", "train_accuracy", "bytes_up", "bytes_down", "float32_bytes", "seconds", "quant_seconds"]
    lines = [",".join(cols)] + [",".join("" if r.get(k) is None else str(r[k]) for k in cols) for r in results["rounds"]]
    (outdir / "rounds.csv").write_text("\n".join(lines) + "\n")
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
    fig.savefig(outdir / "accuracy.png", dpi=120)
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
        fig.savefig(outdir / "bits.png", dpi=120)
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


def compare(dirs: List[str], out: Optional[str] = None, last: int = 5) -> str:
    """Compare several runs: runs whose configurations differ only in the seed form one group.

    Returns a Markdown table, one row per group: algorithm, seeds, rounds, the final accuracy
    (mean, and min..max over seeds), the mean accuracy over the ``last`` rounds (the same
    statistics), the best round, and the bytes uploaded per run. With ``out`` and matplotlib,
    writes the accuracy curves to that PNG: each group's mean over seeds with its min..max band.
    Raises :class:`ConfigError` for a folder without ``results.json`` or a run with no rounds."""
    if last < 1:
        raise ConfigError(f"last must be >= 1, got {last}")
    groups: Dict[str, List[Any]] = {}
    for d in dirs:
        p = Path(d) / "results.json"
        if not p.is_file():
            raise ConfigError(f"{p} does not exist")
        try:
            res = json.loads(p.read_text())
        except (ValueError, OSError) as e:
            raise ConfigError(f"{p} is not a readable results file ({type(e).__name__})") from None
        if not isinstance(res, dict) or not isinstance(res.get("config"), dict):
            raise ConfigError(f"{p} is not a fedmpq results file (no config)")
        if not res.get("rounds"):
            raise ConfigError(f"{p} has no rounds")
        groups.setdefault(_group_key(res["config"]), []).append((d, res))

    def stat(xs: List[float]) -> str:
        return f"{sum(xs) / len(xs):.4f} ({min(xs):.4f}..{max(xs):.4f})" if len(xs) > 1 else f"{xs[0]:.4f}"

    rows, curves = [], []
    labels = _labels([runs[0][1]["config"] for runs in groups.values()])
    for runs, label in zip(groups.values(), labels):
        n = min(len(res["rounds"]) for _, res in runs)  # rounds every seed has
        accs = [[r["accuracy"] for r in res["rounds"][:n]] for _, res in runs]
        k = min(last, n)
        rows.append(f"| {label} | {','.join(str(res['config']['seed']) for _, res in runs)} | {n} | "
                    f"{stat([a[-1] for a in accs])} | {stat([sum(a[-k:]) / k for a in accs])} | "
                    f"{max(max(a) for a in accs):.4f} | {sum(sum(r['bytes_up'] for r in res['rounds'][:n]) for _, res in runs) // len(runs)} |")
        curves.append((label, accs))
    table = (f"| runs | seeds | rounds | final accuracy | mean of last {last} | best | bytes up per run |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    if out:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return table
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
        fig.savefig(out, dpi=120)
        plt.close(fig)
    return table
