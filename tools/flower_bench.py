"""Flower against ``fedmpq simulate``: the same federation run in-process, through Flower's
simulation engine and (``--deployment``) through a SuperLink and one SuperNode per client on
127.0.0.1; the median round time of each from its ``results.json``, and the bytes Flower puts
on the wire per round for fedmpq's packed payloads against float32 FedAvg (``fp``).

    python tools/flower_bench.py --rounds 5 --deployment

Wire bytes: each train message and reply as Flower 1.42 sends it, the serialized objects it
is split into (message, record dict, records) measured with Flower's own ``deflate``, HTTP
headers not counted. Used for docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wire_bytes(payload: int, upload: bool) -> int:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    if upload:
        rd = RecordDict({"fedmpq": ConfigRecord({"upload": b"\0" * payload, "client": 7}),
                         "metrics": MetricRecord({"train_accuracy": 0.5, "train_loss": 0.5, "seconds": 1.0,
                                                  "quant_seconds": 0.1})})
    else:
        rd = RecordDict({"fedmpq": ConfigRecord({"download": b"\0" * payload, "round": 3, "client": 7})})
    return sum(len(o.deflate()) for o in get_all_nested_objects(rd).values())


def _median_round(res) -> float:
    return statistics.median(r["seconds"] for r in res["rounds"])


def _deployment(cfg, out: Path, warm: bool) -> dict:
    from fedmpq.flower.local import LocalFederation

    n = cfg["n_clients"]
    budgets = ",".join(map(str, cfg["budgets"]))
    rc = (f"alg='{cfg['alg']}' rounds={cfg['rounds']} n-clients={n} budgets='{budgets}' "
          f"local-epochs={cfg['local_epochs']} out='{out}'")
    with LocalFederation(n, home=Path(tempfile.mkdtemp()), warm=warm) as fed:
        fed.flwr_run(ROOT / "flower", rc).wait(timeout=3600)
    return json.loads((out / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--deployment", action="store_true", help="also run a SuperLink and SuperNodes on 127.0.0.1")
    ap.add_argument("--algs", default="fedmpq,fp", help="comma-separated algorithms (default fedmpq,fp)")
    ap.add_argument("--skip-simulations", action="store_true", help="only the deployment (with --deployment)")
    ap.add_argument("--cold", action="store_true", help="also the deployment as Flower runs it by default: a fresh "
                                                        "ClientApp process per message")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedmpq import config, simulate
    from fedmpq.flower import simulation

    tmp = Path(tempfile.mkdtemp())
    rows = []
    for alg in args.algs.split(","):
        cfg = config.check_config(dict(alg=alg, rounds=args.rounds))
        runs = {}
        if not args.skip_simulations:
            runs["fedmpq simulate"] = simulate.run(cfg, out=str(tmp / f"sim_{alg}"), progress=False)
            runs["Flower simulation"] = simulation.run(cfg, out=str(tmp / f"flower_{alg}"))
        if args.deployment:
            runs["Flower deployment, warm SuperExec"] = _deployment(cfg, tmp / f"deploy_{alg}", warm=True)
            if args.cold:
                runs["Flower deployment, a process per message"] = _deployment(cfg, tmp / f"cold_{alg}", warm=False)
        for how, res in runs.items():
            last = res["rounds"][-1]
            n_up, n_down = len(last["reported"]), len(last["bits"]) or len(last["reported"])
            up, down = last["bytes_up"], last["bytes_down"]
            wire = n_up * _wire_bytes(up // max(n_up, 1), True) + n_down * _wire_bytes(down // max(n_down, 1), False)
            rows.append((alg, how, _median_round(res), up + down, wire, last["float32_bytes"]))
            print(f"{alg}, {how}: rounds {[round(r['seconds'], 2) for r in res['rounds']]} s", flush=True)
    print(f"digits, {cfg['n_clients']} clients, {args.rounds} rounds; {sys.platform}, torch threads "
          f"{__import__('torch').get_num_threads()}")
    print("| alg | how | median round (s) | payload bytes per round | on Flower's wire | float32 equivalent |")
    print("|---|---|---|---|---|---|")
    for alg, how, sec, payload, wire, f32 in rows:
        print(f"| {alg} | {how} | {sec:.3f} | {payload:,} | {wire:,} | {f32:,} |")


if __name__ == "__main__":
    main()
