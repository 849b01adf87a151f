"""``fedmpq simulate``: a whole federation in one process, client and server talking only
through wire payloads (bytes), with a checkpoint after every round.

The configuration (YAML or JSON, each key also a flag) holds the paper's keys; see
:data:`DEFAULTS`. Results: ``results.json`` (``{"config": {...}, "rounds": [{"round",
"accuracy", "accuracy_train_mode", "train_accuracy", "bytes_up", "bytes_down", "float32_bytes", "bits": {client:
[per layer]}, "mean_bits": {client: x}, "assigned_mean_bits": {client: x}, "seconds", "quant_seconds",
"reported"}, ...]}``; ``bits``/``mean_bits``: what each client uploaded (after its precision
reduction); ``assigned_mean_bits``: the mean bit-width each client is given for the next
round (after reassignment; empty for ``fp``);
``quant_seconds``: the round's quantization work: binarize and encode the downloads, decode,
the bit-plane optimizer, precision reduction and encode on the clients, aggregation),
``rounds.csv`` and, where matplotlib is installed, ``accuracy.png`` and ``bits.png``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import client as client_mod
from . import data as data_mod
from . import nn as qn
from . import server as server_mod

log = logging.getLogger("fedmpq")

PAPER_BUDGETS = [2, 2, 4, 4, 4, 6, 6, 6, 8, 8]
DEFAULTS: Dict[str, Any] = dict(
    alg="fedmpq", dataset="digits", data_dir=None, model="small_cnn", alpha=0.5, n_clients=10,
    budgets=PAPER_BUDGETS, rounds=30, local_epochs=5, batch_size=32, lr=0.1, momentum=0.9, weight_decay=5e-4,
    **{"lambda": 1e-3}, threshold=2.0, sampling_rate=1.0, act_bits=4, scale_lr="lsq", seed=0,
)
ALGS = client_mod.ALGORITHMS


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


def model_builder(c: Dict[str, Any], ds: data_mod.Dataset):
    """``build(quantized, bits=8, act_bits=None)`` for the config's model on ``ds``'s inputs."""
    kw = dict(num_classes=ds.num_classes, in_channels=ds.in_channels)
    if c["model"] == "small_cnn":
        kw["image_size"] = ds.image_size

    def build(quantized: bool, bits=8, act_bits: Optional[int] = None):
        if quantized:
            return qn.build(c["model"], quantized=True, bits=bits, act_bits=act_bits or c["act_bits"], **kw)
        return qn.build(c["model"], quantized=False, act_bits=act_bits, **kw)

    return build


# A transport trains the sampled clients of one round: (round, {client: download bytes}) ->
# ({client: upload bytes}, [train accuracy per reporter], client-side quantization seconds).
# A client that fails is left out of the uploads (the transport logs why).
Transport = Callable[[int, Dict[int, bytes]], Tuple[Dict[int, bytes], List[float], float]]


def run(cfg: Dict[str, Any], out: Optional[str] = None, resume: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Run a federation in this process (see the module docstring); returns the results dict."""
    c = check_config(cfg)
    ds = data_mod.load(c["dataset"], c["data_dir"])  # MissingDatasetError before any training
    parts = data_mod.partition(ds.train_y, c["n_clients"], c["alpha"], c["seed"])
    build = model_builder(c, ds)
    tcfg = train_config(c)

    def local(r: int, downloads: Dict[int, bytes]):
        uploads, train_acc, quant = {}, [], 0.0
        for k in _progress(sorted(downloads), progress, f"round {r} clients", leave=False):
            idx = parts[k]
            try:
                res = client_mod.client_update(downloads[k], ds.train_x[idx], ds.train_y[idx], build, tcfg, k, r,
                                               c["budgets"][k])
            except Exception as e:  # a failing client is left out of the round, with the reason
                log.warning("round %d: client %d failed and is left out: %s", r, k, e)
                continue
            uploads[k] = res.upload
            train_acc.append(res.train_accuracy)
            quant += res.quant_seconds
        return uploads, train_acc, quant

    return federate(c, ds, {k: len(p) for k, p in enumerate(parts)}, dict(enumerate(c["budgets"])), local,
                    out=out, resume=resume, progress=progress)


def train_config(c: Dict[str, Any]) -> client_mod.TrainConfig:
    """The clients' :class:`fedmpq.client.TrainConfig` of a checked configuration."""
    return client_mod.TrainConfig(alg=c["alg"], lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"],
                                  lam=c["lambda"], threshold=c["threshold"], local_epochs=c["local_epochs"],
                                  scale_lr=c["scale_lr"], batch_size=c["batch_size"], seed=c["seed"])


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
    0..n_clients-1. Used by :func:`run` (in-process) and by the Flower app."""
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


def _progress(it, enabled: bool, desc: str, leave: bool = True):
    if not enabled or not sys.stderr.isatty():
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, leave=leave)


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


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file with config keys")
    p.add_argument("--out", help="results folder (results.json, rounds.csv, plots, checkpoint)")
    p.add_argument("-q", "--quiet", action="store_true")
    for k, v in DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        kw: Dict[str, Any] = dict(dest=k, default=argparse.SUPPRESS)  # absent: not in args at all
        if k == "budgets":
            kw["type"] = parse_budgets
        elif k == "alpha":
            kw["type"] = parse_alpha
        elif not (isinstance(v, bool) or v is None):
            kw["type"] = type(v)
        p.add_argument(flag, **kw)


def _flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The config keys given as flags (absent flags are not in ``args``)."""
    return {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}


def _flag_config(args: argparse.Namespace) -> Dict[str, Any]:
    cfg: Dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    cfg.update(_flags(args))
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("simulate", "compare", "flower", "-h", "--help"):
        argv = ["simulate"] + argv  # `fedmpq` alone runs the built-in default federation
    ap = argparse.ArgumentParser(prog="fedmpq", description="FedMPQ: mixed-precision quantized federated learning")
    sub = ap.add_subparsers(dest="cmd")
    sim = sub.add_parser("simulate", help="run a federation in one process")
    _config_flags(sim)
    sim.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    fl = sub.add_parser("flower", help="run the same federation through Flower's simulation engine "
                                       "(needs the flower extra)")
    _config_flags(fl)
    fl.add_argument("--cpus", type=int, default=1, help="CPUs for Flower's Ray workers (default 1)")
    cmp_ = sub.add_parser("compare", help="compare the results of several runs")
    cmp_.add_argument("dirs", nargs="+")
    cmp_.add_argument("--plot", help="write the accuracy curves (mean and min..max over seeds) to this PNG")
    cmp_.add_argument("--last", type=int, default=5, help="average the accuracy over this many last rounds")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.cmd == "compare":
            print(compare(args.dirs, args.plot, args.last))
            return 0
        if args.cmd == "flower":
            try:
                from .flower import simulation as flower_sim
            except ImportError as e:
                raise ConfigError(f"fedmpq flower needs Flower: pip install -e \".[flower]\" ({e})") from None
            if args.cpus < 1:
                raise ConfigError(f"cpus must be >= 1, got {args.cpus}")
            cfg = check_config(_flag_config(args))
            data_mod.load(cfg["dataset"], cfg["data_dir"])  # a missing dataset stops here, not in Flower
            res = flower_sim.run(cfg, out=args.out, cpus=args.cpus)
        else:
            if args.resume:
                ck = Path(args.resume) / "checkpoint.pt"
                if not ck.exists():
                    raise ConfigError(f"nothing to resume: {ck} does not exist")
                cfg = torch.load(ck, weights_only=True)["config"]
                cfg.update(_flags(args))
                out = args.resume
            else:
                cfg = _flag_config(args)
                out = args.out
            cfg = check_config(cfg)
            if not args.quiet:
                logging.getLogger("fedmpq").setLevel(logging.INFO)
            res = run(cfg, out=out, resume=bool(args.resume), progress=not args.quiet)
        last = res["rounds"][-1] if res["rounds"] else None
        if last:
            print(f"final accuracy {last['accuracy']:.4f} after {last['round']} rounds"
                  + (f"; results in {args.out or getattr(args, 'resume', None)}" if (args.out or getattr(args, "resume", None)) else ""))
        return 0
    except (ConfigError, data_mod.MissingDatasetError) as e:
        print(f"fedmpq: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
