"""Write a CIFAR-10-shaped stand-in: random pixels and labels in the "python version" layout
(``cifar-10-batches-py/data_batch_1..5, test_batch``) that ``fedmpq.data`` reads.

    python tools/synthetic_cifar.py /tmp/cifar            # 50,000 + 10,000 images, as CIFAR-10
    fedmpq simulate --config configs/cifar10_fedmpq_a0.1.json --data-dir /tmp/cifar --device cuda

For timing a round of the paper's CIFAR-10 setting where the real files cannot be brought
(the GPU check's machine has no internet): the same shapes, the same number of samples, so
the same number of steps per round. The accuracy of such a run means nothing.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np


def write(folder, train: int = 50_000, test: int = 10_000, seed: int = 0) -> Path:
    """Write the six batches under ``folder/cifar-10-batches-py`` (``train`` images split over
    five batches, ``test`` in one); returns that folder."""
    if train < 5 or test < 1:
        raise ValueError(f"need at least 5 training images (one per batch) and 1 test image, got {train}, {test}")
    out = Path(folder) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [train // 5 + (i < train % 5) for i in range(5)]
    for name, n in [(f"data_batch_{i + 1}", s) for i, s in enumerate(sizes)] + [("test_batch", test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        (out / name).write_bytes(pickle.dumps(batch, protocol=2))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="where to write cifar-10-batches-py/")
    p.add_argument("--train", type=int, default=50_000, help="training images (default: 50000)")
    p.add_argument("--test", type=int, default=10_000, help="test images (default: 10000)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        print(write(a.folder, a.train, a.test, a.seed))
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
