"""The study tools under tools/ that docs/RESULTS.md quotes: their arithmetic on hand-made
states (the tools are scripts, loaded from their files)."""
import importlib.util
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    if str(ROOT / "tools") not in sys.path:  # as `python tools/x.py` runs them: their shared _study
        sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_weight_stats_groups_and_shares():
    ws = _load("weight_stats")
    state = {
        "conv1.weight": torch.tensor([[1.0, -0.5, 0.25, 0.0]]),
        "bn1.weight": torch.ones(4),  # 1-d: not a quantized weight
        "layer3.2.conv2.weight": torch.tensor([[[-2.0, 2.0], [1.0, 0.9]]]),
        "layer3.0.conv1.weight": torch.zeros(2, 2),  # all zero: no max to divide by, left out
        "linear.weight": torch.tensor([[3.0, -3.0, 3.0, -3.0]]),
    }
    st = ws._stats(state)
    assert set(st) == {"conv1", "layer3", "linear"}
    rms, half, sat = st["conv1"][0]
    assert math.isclose(rms, math.sqrt((1 + 0.25 + 0.0625) / 4), rel_tol=1e-6)
    assert (half, sat) == (0.5, 0.25)
    rms, half, sat = st["layer3"][0]
    assert math.isclose(rms, math.sqrt((4 + 4 + 1 + 0.81) / 4) / 2, rel_tol=1e-6)
    assert (half, sat) == (0.75, 0.5)
    assert st["linear"] == [(1.0, 1.0, 1.0)]  # sign times scale
    assert ws._rng([0.25, 0.5], pct=True) == "25.0 %..50.0 %" and ws._rng([0.211, 0.214]) == "0.21"


def test_authors_code_parse_reads_their_round_lines(tmp_path):
    """Their log counts rounds from 0 and prints percent; client lines and other text are
    not rounds."""
    ac = _load("authors_code")
    log = tmp_path / "run.log"
    log.write_text(
        " | Global Training Round : 1 |\n"
        "Client 2 Training Top 1 Acc at global round 0 : 70.2\n"
        "Top 1 accuracy: 10.050000190734863, Top 5 accuracy: 51.17  at global round 0.\n"
        "[8.0, 6.0, 1.0]\n"
        "Top 1 accuracy: 23.5, Top 5 accuracy: 60.8  at global round 1.\n"
    )
    out = tmp_path / "rounds.csv"
    assert ac.parse(str(log), str(out)) == 2
    lines = out.read_text().splitlines()
    assert lines[0] == "round,accuracy_train_mode"
    assert [(int(r), round(float(a), 6)) for r, a in (x.split(",") for x in lines[1:])] == [(1, 0.1005), (2, 0.235)]


def test_authors_code_last_bits_follow_the_rounds_client_order():
    """Their lists come in the order the clients trained in that round; an unfinished last
    round is skipped."""
    ac = _load("authors_code")
    text = (
        " | Global Training Round : 1 |\n"
        "Client 1 Training Top 1 Acc at global round 0 : 50.0\n"
        "Client 0 Training Top 1 Acc at global round 0 : 60.0\n"
        "Top 1 accuracy: 10.0, Top 5 accuracy: 50.0  at global round 0.\n"
        "[8.0, 1.0, 2.0]\n"
        "[8.0, 8.0, 8.0]\n"
        "\n | Global Training Round : 2 |\n"
        "Client 0 Training Top 1 Acc at global round 1 : 70.0\n"
    )
    assert ac.last_bits(text) == {0: [8, 8, 8], 1: [8, 1, 2]}
    assert ac.last_bits("no rounds") == {}


def test_synthetic_cifar_loads_as_cifar10(tmp_path):
    """The stand-in has CIFAR-10's layout: the project's own loader reads it, every image and
    label accounted for (13 training images over five batches: 3, 3, 3, 2, 2)."""
    from fedmpq import data

    sc = _load("synthetic_cifar")
    folder = sc.write(tmp_path, train=13, test=4)
    assert sorted(p.name for p in folder.iterdir()) == [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    assert [len(data.read_cifar_batch(folder / f"data_batch_{i}")[1]) for i in range(1, 6)] == [3, 3, 3, 2, 2]
    ds = data.load("cifar10", tmp_path)
    assert tuple(ds.train_x.shape) == (13, 3, 32, 32) and tuple(ds.test_x.shape) == (4, 3, 32, 32)
    assert ds.num_classes == 10 and int(ds.train_y.max()) < 10
