"""``python benches/payload_sizes.py``: upload and download bytes of ResNet-20 (CIFAR-10) at
the paper's budgets [2, 2, 4, 4, 4, 6, 6, 6, 8, 8] (round 1: every layer at the client's
budget), against its float32 state dict (what a float FedAvg sends) and against the bound
sum n_l (N_l + 1) / 8 + 4 * (float values) + 1 % + 1 KiB. Prints a Markdown table
(docs/BENCHMARKS.md quotes it)."""
from __future__ import annotations

import io
import math

import torch

from fedmpq import layouts, wire


def main() -> None:
    qshapes, fshapes = layouts.cifar_resnet(20)
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(s, generator=g) for n, s in qshapes.items()}
    floats = {n: (torch.tensor(100) if n.endswith("num_batches_tracked") else torch.randn(s, generator=g))
              for n, s in fshapes.items()}
    state = {**weights, **floats}
    f32 = len(wire.encode_model(wire.Model(1, state)))
    buf = io.BytesIO()
    torch.save(state, buf)
    nq = sum(math.prod(s) for s in qshapes.values())
    nf = sum(math.prod(s) for n, s in fshapes.items() if not n.endswith("num_batches_tracked"))
    print(f"ResNet-20: {nq} quantized weights in {len(qshapes)} layers, {nf} float values in "
          f"{len(fshapes)} tensors; float32 state dict: {f32} bytes as a fedmpq model payload, "
          f"{len(buf.getvalue())} bytes through torch.save\n")
    print("| budget (bits) | upload bytes | download bytes | bound | upload / float32 |")
    print("|---|---|---|---|---|")
    for b in sorted(set([2, 2, 4, 4, 4, 6, 6, 6, 8, 8])):
        layers = {n: wire.QuantizedTensor.from_float(w, b) for n, w in weights.items()}
        up = len(wire.encode_upload(wire.Upload(0, 1, 5000, float(b), layers, {n: 0 for n in layers}, floats)))
        down = len(wire.encode_download(wire.Download(0, 2, layers, floats)))
        bound = (nq * (b + 1) / 8 + 4 * nf) * 1.01 + 1024
        print(f"| {b} | {up} | {down} | {bound:.0f} | {up / f32:.3f} |")


if __name__ == "__main__":
    main()
