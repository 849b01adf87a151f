"""The machine-local registry of training runs that the default thread count divides by."""
from __future__ import annotations

import os
import subprocess
import sys

from fedmpq import config, simulate
from fedmpq.trainers import Registry


def test_the_registry_counts_live_runs_and_drops_dead_ones(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / str(other.pid)).touch()
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (tmp_path / dead.stdout.strip()).touch()
        (tmp_path / "not-a-pid").touch()
        with Registry(tmp_path) as reg:
            assert (tmp_path / str(os.getpid())).exists()
            assert reg.count() == 2  # this run and the sleeping one
            assert not (tmp_path / dead.stdout.strip()).exists()
        assert not (tmp_path / str(os.getpid())).exists()
    finally:
        other.kill()
        other.wait()
    (tmp_path / "a-file").write_text("")
    with Registry(tmp_path / "a-file" / "x") as reg:  # cannot register: counts itself only
        assert reg.count() == 1


def test_default_threads_share_the_cores_with_runs_beside_it(tmp_path, monkeypatch):
    monkeypatch.setattr("fedmpq.trainers._folder", lambda: tmp_path)
    others = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    try:
        for p in others:
            (tmp_path / str(p.pid)).touch()
        small = dict(n_clients=3, budgets=[2, 4, 8], rounds=1, local_epochs=1, batch_size=64)
        res = simulate.run(small, progress=False)
        want = max(1, config.available_cores() // 4)
        assert res["threads"] == want and res["rounds"][0]["threads"] == want
        res = simulate.run(dict(small, threads=3), progress=False)  # a setting is a setting
        assert res["rounds"][0]["threads"] == 3
    finally:
        for p in others:
            p.kill()
            p.wait()
