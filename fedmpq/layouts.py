"""State-dict layouts (names and shapes) of the paper's CIFAR ResNets, split into what FedMPQ
quantizes and what stays float (ALGORITHM.md, "Setting": every 3x3 conv and the final linear
layer are quantized; BatchNorm, 1x1 shortcut convs and biases stay float).

They size payloads and drive benchmarks without building a model; the models of
``fedmpq.nn`` must produce exactly these state-dict names and shapes.
"""
from __future__ import annotations

from typing import Dict, Tuple

Shape = Tuple[int, ...]


def _bn(prefix: str, c: int, out: Dict[str, Shape]) -> None:
    for k in ("weight", "bias", "running_mean", "running_var"):
        out[f"{prefix}.{k}"] = (c,)
    out[f"{prefix}.num_batches_tracked"] = ()


def cifar_resnet(depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> Tuple[Dict[str, Shape], Dict[str, Shape]]:
    """(quantized, float) state-dict shapes of a CIFAR ResNet of ``depth`` = 6k + 2
    (20, 44, ...): 16/32/64 channels, 3 stages of k basic blocks, 1x1-conv + BN shortcuts
    where the shape changes. The float dict includes int64 ``num_batches_tracked`` (shape ())."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6k + 2 >= 8, got {depth}")
    blocks = (depth - 2) // 6
    q: Dict[str, Shape] = {"conv1.weight": (16, in_channels, 3, 3)}
    f: Dict[str, Shape] = {}
    _bn("bn1", 16, f)
    cin = 16
    for stage, cout in enumerate((16, 32, 64), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            q[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
            _bn(f"{p}.bn1", cout, f)
            q[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            _bn(f"{p}.bn2", cout, f)
            if cin != cout:
                f[f"{p}.shortcut.0.weight"] = (cout, cin, 1, 1)
                _bn(f"{p}.shortcut.1", cout, f)
            cin = cout
    q["linear.weight"] = (num_classes, 64)
    f["linear.bias"] = (num_classes,)
    return q, f
