"""How far clients move the quantized layers' weights in a round: for each round of a
``fedmpq simulate`` config, the mean over clients of ||W_upload - W_download|| / ||W_download||
and of their cosine similarity, per layer, decoded from the wire payloads themselves.

    python tools/client_drift.py configs/fashion_mnist_fp8_a0.1.json --rounds 4

Used for docs/RESULTS.md ("Why the quantized algorithms trail fp"). For ``fp`` it reads the
float conv and linear weights of the same layers.
"""
from __future__ import annotations

import argparse

import torch

from fedmpq import client as client_mod
from fedmpq import config, simulate, wire


def _weights(blob: bytes, kind: str, names=None):
    if kind == "fp":
        t = wire.decode_model(blob).tensors
        return {k: t[k].float() for k in names}
    d = (wire.decode_download if kind == "down" else wire.decode_upload)(blob)
    return {k: q.dequantize() for k, q in d.layers.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = {**config.load_config_file(args.config), "rounds": args.rounds, "seed": args.seed}
    fp = cfg.get("alg") == "fp"
    stats = []
    update = client_mod.client_update
    names = None

    def traced(download, x, y, build, tcfg, k, r, budget):
        nonlocal names
        res = update(download, x, y, build, tcfg, k, r, budget)
        if names is None:  # the quantized model's layer names are the float weights to compare in fp
            from fedmpq import nn as qn
            names = [f"{n}.weight" for n, _ in qn.bit_layers(build(quantized=True, bits=8))]
        a = _weights(download, "fp" if fp else "down", names)
        b = _weights(res.upload, "fp" if fp else "up", names)
        stats.append((r, {n: (float((b[n] - a[n]).norm() / a[n].norm()),
                              float(torch.nn.functional.cosine_similarity(b[n].flatten(), a[n].flatten(), dim=0)))
                          for n in a}, res.train_loss))
        return res

    client_mod.client_update = traced
    res = simulate.run(cfg, out=None, progress=False)
    print(f"{cfg['alg']}: per round, mean over clients of |dW|/|W| (cosine) per quantized layer")
    for r in range(1, args.rounds + 1):
        rows = [s for s in stats if s[0] == r]
        cells = ", ".join(f"{n.removesuffix('.weight')} {sum(s[1][n][0] for s in rows) / len(rows):.3f} "
                          f"({sum(s[1][n][1] for s in rows) / len(rows):.3f})" for n in rows[0][1])
        print(f"round {r}: accuracy {res['rounds'][r - 1]['accuracy']:.3f}, local loss "
              f"{sum(s[2] for s in rows) / len(rows):.3f}; {cells}")


if __name__ == "__main__":
    main()
