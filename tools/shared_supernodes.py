"""SuperNodes side by side on this machine: K SuperNodes (fedmpq's warm SuperExec) on
127.0.0.1 train ResNet-20 on a CIFAR-10-shaped stand-in (tools/synthetic_cifar.py), all at
once each round; prints the median round time from the run's ``results.json``.

    python tools/shared_supernodes.py --nodes 4 --rounds 2                # no threads in the node configs
    python tools/shared_supernodes.py --nodes 4 --rounds 2 --threads 2    # each node told 2 threads

Without ``--threads`` each node's client shares the cores with the fedmpq processes training
beside it (``fedmpq.trainers.share_cores``); ``--threads T`` gives every node T (T = the
cores is what a node took by default before 2026-12-07). Used for docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=400, help="training samples per client (default 400)")
    ap.add_argument("--epochs", type=int, default=3, help="local epochs (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="each node's threads (default: none given, shared)")
    args = ap.parse_args()
    for name in ("nodes", "rounds", "samples", "epochs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.threads < 0:
        ap.error("--threads must be at least 1 (or 0: none given)")

    import synthetic_cifar

    from fedmpq.flower.local import LocalFederation

    work = Path(tempfile.mkdtemp(prefix="fedmpq-supernodes-"))
    data = work / "data"
    synthetic_cifar.write(data, train=args.samples * args.nodes, test=200)
    out = work / "run"
    (work / "logs").mkdir()
    budgets = ",".join(["4"] * args.nodes)
    rc = (f"alg='fedmpq' dataset='cifar10' model='resnet20' data-dir='{data}' alpha='iid' batch-size=32 "
          f"rounds={args.rounds} n-clients={args.nodes} budgets='{budgets}' local-epochs={args.epochs} "
          f"train-samples={args.samples * args.nodes} out='{out}'")
    with LocalFederation(args.nodes, home=work / "flwr_home", log_dir=work / "logs", threads=args.threads) as fed:
        fed.flwr_run(ROOT / "flower", rc).wait(timeout=3600)
    if not (out / "results.json").exists():
        sys.exit(f"the run wrote no results: see the logs in {work / 'logs'}")
    rounds = [r["seconds"] for r in json.loads((out / "results.json").read_text())["rounds"]]
    shutil.rmtree(work, ignore_errors=True)  # kept, with its logs, only when the run failed
    print(f"{args.nodes} SuperNodes, threads {args.threads or 'none given (shared)'}: median round "
          f"{statistics.median(rounds):.2f} s; rounds {', '.join(f'{t:.2f}' for t in rounds)}")


if __name__ == "__main__":
    main()
