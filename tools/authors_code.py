"""Run the authors' own FedMPQ code on this project's data, for a side-by-side column.

The authors' repository (github CityChan/Federated-Mixed-Precision-Quantization) has no
license: nothing of it is in this one. Fetch a checkout yourself and point ``--src`` at it.
This tool changes none of its files; it adapts the run around them:

* device: their ``.cuda()`` calls become no-ops (``Tensor.cuda`` and ``Module.cuda``
  return self), so their code runs on the CPU;
* data: their ``get_dataloaders_Dirichlet`` is replaced by loaders over this project's
  data and split (``fedmpq.config.build``'s own calls: the fixed ``train_samples``
  subset and the Dirichlet partition for the seed), grey repeated to 3 channels so that
  their ResNet-20 stays unchanged; train batches of 64 shuffled, test batches of 500;
* imports they make but this path does not use (``torchvision``, ``ipdb``) are stubbed.

Everything else is theirs: their model, optimizer, bit-width reassignment, aggregation
(an unweighted mean), round-1 start (each client from its own random initialization) and
evaluation (the global model in train mode: BatchNorm on each test batch's statistics).

    python tools/authors_code.py run --src PATH --alg FedMPQ --alpha 0.1 --seed 0 --rounds 40 > run.log
    python tools/authors_code.py parse run.log rounds.csv

``parse`` writes ``round,accuracy_train_mode`` (0..1) from their log's per-round line, and
prints the bits per layer that their last round assigned to each client (their layer order:
stem, the 18 convs of stages 1-3, the classifier, as fedmpq's).
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
import types

_ROUND = re.compile(r"Top 1 accuracy: ([0-9.]+), Top 5 accuracy: [0-9.]+\s+at global round (\d+)\.")
_CLIENT = re.compile(r"^Client (\d+) Training Top 1 Acc", re.M)
_BITS = re.compile(r"^\[((?:\d+\.0, )*\d+\.0)\]$", re.M)


def run(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fedmpq import data

    sys.path.insert(0, args.src)
    tv = types.ModuleType("torchvision")
    tv.datasets, tv.transforms = types.ModuleType("torchvision.datasets"), types.ModuleType("torchvision.transforms")
    tv.datasets.ImageFolder = object
    sys.modules.update({"torchvision": tv, "torchvision.datasets": tv.datasets,
                        "torchvision.transforms": tv.transforms, "ipdb": types.ModuleType("ipdb")})
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    import trainer  # theirs, from --src

    ds = data.subset(data.load("fashion-mnist", None), args.train_samples)
    parts = data.partition(ds.train_y, args.clients, args.alpha, args.seed)

    def rgb(x):
        return x.expand(-1, 3, -1, -1).contiguous()

    def loaders(n_clients, alpha, rand_seed, dataset, batch_size):
        train = [DataLoader(TensorDataset(rgb(ds.train_x[p]), ds.train_y[p]), batch_size=64, shuffle=True) for p in parts]
        return train, DataLoader(TensorDataset(rgb(ds.test_x), ds.test_y), batch_size=500, shuffle=False)

    trainer.get_dataloaders_Dirichlet = loaders
    torch.manual_seed(args.seed)
    trainer.train({
        "alpha": args.alpha, "dataset": "CIFAR10", "alg": args.alg, "n_classes": 10, "batch_size": 64,
        "n_clients": args.clients, "local_epochs": 1, "epochs": args.rounds, "thre": 2.0, "lambda": 0.001,
        "sampling_rate": 1.0, "lr": 0.1, "momentum": 0.9, "schedule": [150, 225], "gamma": 0.1,
        "weight_decay": 5e-4, "budgets": [2, 2, 4, 4, 4, 6, 6, 6, 8, 8], "seed": [args.seed], "device": "0",
    })


def parse(log: str, out: str) -> int:
    """Their per-round global accuracy (percent, rounds counted from 0) as round (from 1)
    and accuracy_train_mode (0..1); returns the number of rounds."""
    with open(log) as f:
        rows = [(int(m.group(2)) + 1, float(m.group(1)) / 100) for m in _ROUND.finditer(f.read())]
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "accuracy_train_mode"])
        w.writerows(rows)
    return len(rows)


def last_bits(text: str) -> dict:
    """{client: [bits per layer]} of the last finished round: their trainer prints one list
    per client after the round's accuracy line, in the order the clients trained that round
    (shuffled every round), which the round's "Client k Training" lines give."""
    blocks = text.split("| Global Training Round :")
    for block in reversed(blocks[1:]):
        order = [int(c) for c in _CLIENT.findall(block)]
        tail = block.split("Top 1 accuracy:", 1)
        if len(tail) < 2:
            continue  # the round did not finish
        lists = [[int(float(b)) for b in m.split(", ")] for m in _BITS.findall(tail[1])]
        if len(lists) != len(order):
            raise ValueError(f"{len(lists)} bit lists for {len(order)} clients in the last round")
        return dict(sorted(zip(order, lists)))
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run their code (log on stdout)")
    r.add_argument("--src", required=True, help="a checkout of the authors' repository")
    r.add_argument("--alg", default="FedMPQ", choices=["FedMPQ", "AQFL", "FP"])
    r.add_argument("--alpha", type=float, default=0.1)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--rounds", type=int, default=40)
    r.add_argument("--clients", type=int, default=10)
    r.add_argument("--train-samples", type=int, default=20000)
    p = sub.add_parser("parse", help="their log -> round,accuracy_train_mode CSV")
    p.add_argument("log")
    p.add_argument("out")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args)
    else:
        print(f"{parse(args.log, args.out)} rounds -> {args.out}")
        with open(args.log) as f:
            for client, bits in last_bits(f.read()).items():
                print(f"client {client}: {' '.join(map(str, bits))}")


if __name__ == "__main__":
    main()
