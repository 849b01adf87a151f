"""What one round of local training does to each quantized layer, under each scale rule,
from the same starting point: a run's checkpoint (the global model and bit assignments
after its last round) or a config's round 1.

    python tools/round_anatomy.py runs/resnet20_a0.1/fedmpq_s0 --clients 0,2,5,8
    python tools/round_anatomy.py --config configs/fashion_mnist_resnet20_aqfl_a0.1.json

For every chosen client it builds the download the server would send next round, trains it
once with ``scale_lr lsq`` and once with ``scale_lr sgd`` (the same batches: the seeds do
not depend on the rule), and reports per layer, over the clients (median, min..max):

* the scale at the end over the scale at the start, the smallest value it took relative to
  the start (per step, read before every forward), and the clients whose scale crossed zero;
* the share of weights whose sign flipped and whose code changed;
* the share of codes at the limit 2^N - 1 at the start and at the end (the project clamps
  there every step; the authors' re-quantization does not, ALGORITHM.md).

Used for docs/RESULTS.md (ResNet-20: "Why the scale rule decides the ordering"). It trains
only, on one thread by default; the server does not aggregate.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import fedmpq_kernels as fk
from _study import initial_server, read_run
from fedmpq import client as client_mod
from fedmpq import config, nn as qn


def _state(layer) -> dict:
    n = layer.numel
    return dict(codes=layer.codes.detach().clone(), neg=fk.unpack_codes(layer.sign.detach().cpu(), 1, n).bool(),
                scale=float(layer.scale.detach()), bits=layer.bits)


def _fmt(xs, pct=False) -> str:
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3g}")
    if not xs:
        return "-"
    return f"{f(statistics.median(xs))} ({f(min(xs))}..{f(max(xs))})" if len(xs) > 1 else f(xs[0])


def trace(c, ds, parts, srv, round_, clients, rule):
    """Per client and layer: the statistics above, training ``clients`` from ``srv``'s state."""
    build = config.model_builder(c, ds)
    tcfg = config.train_config({**c, "scale_lr": rule})
    rows, totals = {}, []
    real = client_mod.train_local

    def traced(model, x, y, cfg, client_id, r, quantized):
        layers = qn.bit_layers(model)
        before = {name: _state(layer) for name, layer in layers}
        path = {name: [] for name, _ in layers}
        hooks = [layer.register_forward_pre_hook(lambda m, a, name=name: path[name].append(float(m.scale.detach())))
                 for name, layer in layers]
        try:
            out = real(model, x, y, cfg, client_id, r, quantized)
        finally:
            for h in hooks:
                h.remove()
        for name, layer in layers:
            a, b = before[name], _state(layer)
            top = 2 ** a["bits"] - 1
            s0 = a["scale"]
            p = path[name] + [b["scale"]]
            rows.setdefault((name, a["bits"]), []).append(dict(
                n=layer.numel, bits=a["bits"], ratio=b["scale"] / s0 if s0 else float("nan"),
                low=min(p) / s0 if s0 else float("nan"), crossed=any((v > 0) != (s0 > 0) for v in p),
                flips=float((a["neg"] != b["neg"]).float().mean()), moved=float((a["codes"] != b["codes"]).float().mean()),
                sat0=float((a["codes"] == top).float().mean()), sat1=float((b["codes"] == top).float().mean())))
        totals.append(sum(float((layer.codes == 2 ** layer.bits - 1).sum()) for _, layer in layers)
                      / sum(layer.numel for _, layer in layers))
        return out

    client_mod.train_local = traced
    try:
        downloads = srv.downloads(round_, clients)
        for k in clients:
            client_mod.client_update(downloads[k], ds.train_x[parts[k]], ds.train_y[parts[k]], build, tcfg, k, round_,
                                     c["budgets"][k])
    finally:
        client_mod.train_local = real
    return rows, totals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("run", nargs="?", help="a run folder with checkpoint.pt: trace the round after its last")
    src.add_argument("--config", help="a config file: trace round 1 from the initial model")
    ap.add_argument("--clients", default="0,2,5,8", help="comma-separated client ids (default: one per budget "
                                                           "of the paper's list)")
    ap.add_argument("--rules", default="lsq,sgd", help="scale rules to compare (default: lsq,sgd)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.run:
        state, c, done = read_run(args.run)
        round_ = done + 1
    else:
        state, c, round_ = None, config.check_config(config.load_config_file(args.config)), 1
    if c["alg"] == "fp":
        print("fp has no quantized layers to trace", file=sys.stderr)
        return 2
    ds, parts = config.load_data(c)
    clients = [int(v) for v in args.clients.split(",")]
    if any(not 0 <= k < c["n_clients"] for k in clients):
        print(f"--clients must be in 0..{c['n_clients'] - 1}", file=sys.stderr)
        return 2
    srv = initial_server(c, ds, parts)
    if state is not None:
        srv.load_state(state["server"])
    print(f"{c['alg']}, {c['model']} on {c['dataset']}, alpha {c['alpha']}, seed {c['seed']}: round {round_}, "
          f"clients {clients} (budgets {[c['budgets'][k] for k in clients]}); median (min..max) over clients\n")
    for rule in args.rules.split(","):
        rows, totals = trace(c, ds, parts, srv, round_, clients, rule)
        print(f"scale_lr {rule}\n")
        print("| layer | weights | bits (clients) | s_end/s_start | min s/s_start | crossed 0 | sign flips % | codes moved % "
              "| at limit, start % | at limit, end % |\n|" + "---|" * 10)
        order = list(dict.fromkeys(n for n, _ in rows))
        for (name, bits), rs in sorted(rows.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):  # layer order, and per layer the clients' bit-widths in order
            print(f"| {name} | {rs[0]['n']} | {bits} ({len(rs)}) | {_fmt([r['ratio'] for r in rs])} | "
                  f"{_fmt([r['low'] for r in rs])} | {sum(r['crossed'] for r in rs)}/{len(rs)} | "
                  f"{_fmt([r['flips'] for r in rs], True)} | {_fmt([r['moved'] for r in rs], True)} | "
                  f"{_fmt([r['sat0'] for r in rs], True)} | {_fmt([r['sat1'] for r in rs], True)} |")
        print(f"\nall layers, share of weights at the limit at the end, per client: "
              f"{', '.join(f'{k}: {100 * v:.1f} %' for k, v in zip(clients, totals))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
