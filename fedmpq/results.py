"""A run's results on disk (``results.json``, ``rounds.csv``, plots) and the comparison of
several runs (``fedmpq compare``). The results dict is :mod:`fedmpq.federation`'s."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import ConfigError


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
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["round"] for r in rs], [r["accuracy"] for r in rs], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("global test accuracy")
    ax.set_title(f"{results['config']['alg']} on {results['config']['dataset']}")
    fig.tight_layout()
    fig.savefig(outdir / "accuracy.png", dpi=120)
    plt.close(fig)
    clients = sorted({k for r in rs for k in r["bits"]}, key=int)
    if clients and rs and rs[-1]["bits"]:
        nl = len(next(iter(rs[-1]["bits"].values())))
        grid = [[sum(r["bits"].get(k, [0] * nl)) / nl for r in rs] for k in clients]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=1, vmax=8)
        ax.set_xlabel("round")
        ax.set_ylabel("client")
        ax.set_title("mean bits per layer")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(outdir / "bits.png", dpi=120)
        plt.close(fig)


def _group_key(cfg: Dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in cfg.items() if k != "seed"}, sort_keys=True)


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
        res = json.loads(p.read_text())
        if not res.get("rounds"):
            raise ConfigError(f"{p} has no rounds")
        groups.setdefault(_group_key(res["config"]), []).append((d, res))

    def stat(xs: List[float]) -> str:
        return f"{sum(xs) / len(xs):.4f} ({min(xs):.4f}..{max(xs):.4f})" if len(xs) > 1 else f"{xs[0]:.4f}"

    rows, curves = [], []
    for runs in groups.values():
        cfg = runs[0][1]["config"]
        n = min(len(res["rounds"]) for _, res in runs)  # rounds every seed has
        accs = [[r["accuracy"] for r in res["rounds"][:n]] for _, res in runs]
        k = min(last, n)
        label = f"{cfg['alg']} ({cfg['dataset']})"
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
