"""How the global model's quantized weights are spread, per layer group, after a run: for
each run folder's checkpoint (the global model after its last round) and for the model the
run started from (its seed's initialization), per group of layers (each ResNet stage, and
every other layer on its own; min..max over a group's layers):

* rms/max: rms(W) / max|W|, 0.58 for a uniform spread, 1 for a sign-times-scale matrix;
* the share of weights with |W| >= max|W|/2 (a 1-bit upload keeps exactly these);
* the share with |W| >= 0.9 max|W| (saturated, as docs/RESULTS.md counts it).

    python tools/weight_stats.py runs/r20/fedmpq_s0 runs/r20/aqfl_s0

Used for docs/RESULTS.md (ResNet-20: classifier drift and stage-3 shrinkage). Reads only.
"""
from __future__ import annotations

import argparse
import sys

from _study import group, initial_server, read_run
from fedmpq import config


def _stats(state: dict) -> dict:
    """Per group: lists of (rms/max, share >= max/2, share >= 0.9 max), one per layer."""
    out: dict = {}
    for name, w in state.items():
        if not name.endswith(".weight") or w.dim() < 2:  # BatchNorm and biases are not quantized
            continue
        w = w.detach().double().abs().flatten()
        top = float(w.max())
        if top == 0:
            continue
        row = (float(w.pow(2).mean().sqrt()) / top, float((w >= top / 2).double().mean()),
               float((w >= 0.9 * top).double().mean()))
        out.setdefault(group(name), []).append(row)
    return out


def _rng(xs, pct=False) -> str:
    f = (lambda v: f"{100 * v:.1f} %") if pct else (lambda v: f"{v:.2f}")
    lo, hi = min(xs), max(xs)
    return f(lo) if f(lo) == f(hi) else f"{f(lo)}..{f(hi)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders holding checkpoint.pt")
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        state, c, done = read_run(run)
        label = f"{c['alg']} seed {c['seed']}, scale_lr {c['scale_lr']}"
        if c["classifier"] == "float":
            label += ", float classifier"
        srv = initial_server(c, *config.load_data(c))
        rows.append((f"{label}: initialization", _stats(srv.global_state)))
        rows.append((f"{label}: after round {done}", _stats(state["server"]["global_state"])))
    groups = list(dict.fromkeys(g for _, st in rows for g in st))
    for title, k, pct in (("rms/max", 0, False), ("share of weights with |W| >= max/2", 1, True),
                          ("share of weights with |W| >= 0.9 max", 2, True)):
        print(f"{title} (min..max over a group's layers)\n")
        print("| global model | " + " | ".join(groups) + " |\n|" + "---|" * (len(groups) + 1))
        for label, st in rows:
            print(f"| {label} | " + " | ".join(_rng([r[k] for r in st[g]], pct) if g in st else "-" for g in groups)
                  + " |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
