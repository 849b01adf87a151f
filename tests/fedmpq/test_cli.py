"""The fedmpq command: flags over config files, a missing dataset."""
from __future__ import annotations

import json

from fedmpq import cli

SMALL = dict(dataset="digits", n_clients=3, budgets=[2, 4, 8], rounds=2, local_epochs=1, batch_size=64, alpha=0.5)


def test_a_missing_dataset_says_where_it_looked(tmp_path, capsys):
    assert cli.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "-q"]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_flags_override_the_config_file_and_alpha_iid_reaches_the_run(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(dict(SMALL, rounds=5, alpha=0.3)))
    assert cli.main(["simulate", "--config", str(cfg), "--rounds", "1", "--alpha", "iid", "-q",
                          "--out", str(tmp_path / "o")]) == 0
    saved = json.loads((tmp_path / "o" / "results.json").read_text())["config"]
    assert saved["alpha"] is None and saved["rounds"] == 1 and saved["budgets"] == [2, 4, 8]
