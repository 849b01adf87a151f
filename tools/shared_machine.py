"""Several federations on one machine: K default ``fedmpq simulate`` runs started together
against the same K run one after another, for each K given. The target (issue 15): K runs at
once finish no later than the same K in a row (each run's threads at its default, or
``--threads``).

    python tools/shared_machine.py --k 1,2,4 --rounds 5

Prints a Markdown table (K, wall time in a row, wall time at once, their ratio) for
docs/BENCHMARKS.md. Every run is a separate process with its own results folder; a run that
fails stops the tool with its output.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cmd(out: Path, rounds: int, threads, seed: int):
    cmd = [sys.executable, "-m", "fedmpq", "simulate", "-q", "--out", str(out), "--rounds", str(rounds),
           "--seed", str(seed)]
    return cmd + (["--threads", str(threads)] if threads else [])


def _run_all(cmds, together: bool) -> float:
    t0 = time.perf_counter()
    if together:
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in cmds]
    else:
        procs = []
        for c in cmds:
            procs.append(subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            procs[-1].wait()
    for p, c in zip(procs, cmds):
        out = p.communicate()[0]
        if p.returncode:
            sys.exit(f"{' '.join(c)} failed:\n{out.decode(errors='replace')}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", default="1,2,4", help="comma-separated numbers of runs (default 1,2,4)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per run (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="threads per run (default: fedmpq's own default)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    load = os.getloadavg()[0]
    rows = []
    for k in (int(x) for x in args.k.split(",")):
        cmds = [_cmd(tmp / f"k{k}_seq{i}", args.rounds, args.threads, i) for i in range(k)]
        seq = _run_all(cmds, together=False)
        cmds = [_cmd(tmp / f"k{k}_par{i}", args.rounds, args.threads, i) for i in range(k)]
        par = _run_all(cmds, together=True)
        rows.append((k, seq, par))
        print(f"K={k}: in a row {seq:.1f} s, at once {par:.1f} s", flush=True)
    cores = len(os.sched_getaffinity(0))
    print(f"\n{args.rounds}-round default federations, {cores} cores, threads "
          f"{args.threads or 'default'}; load average before: {load:.2f}")
    print("| K runs | in a row (s) | at once (s) | at once / in a row |")
    print("|---|---|---|---|")
    for k, seq, par in rows:
        print(f"| {k} | {seq:.1f} | {par:.1f} | {par / seq:.2f} |")


if __name__ == "__main__":
    main()
