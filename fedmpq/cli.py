"""The ``fedmpq`` command: ``simulate`` (in this process, :mod:`fedmpq.simulate`), ``flower``
(Flower's simulation engine, :mod:`fedmpq.flower.simulation`) and ``compare``
(:func:`fedmpq.results.compare`). ``fedmpq`` alone runs the built-in default federation."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import data as data_mod
from . import simulate
from .config import DEFAULTS, ConfigError, check_config, load_config_file, parse_alpha, parse_budgets
from .results import compare


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
            res = simulate.run(cfg, out=out, resume=bool(args.resume), progress=not args.quiet)
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
