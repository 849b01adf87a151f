"""The machine-local registry of training runs that the default thread count divides by."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

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
        (tmp_path / "4000000").mkdir()  # a foreign entry, counted every round: ignored, the run goes on
        small = dict(n_clients=3, budgets=[2, 4, 8], rounds=1, local_epochs=1, batch_size=64)
        res = simulate.run(small, progress=False)
        want = max(1, config.available_cores() // 4)
        assert res["threads"] == want and res["rounds"][0]["threads"] == want
        # a setting is a setting, and the run is registered all the same: the runs beside it count it
        from fedmpq import client as client_mod

        real_batches, registered = client_mod._batches, []

        def batches(*a, **k):
            registered.append((tmp_path / str(os.getpid())).exists())
            return real_batches(*a, **k)

        monkeypatch.setattr(client_mod, "_batches", batches)
        res = simulate.run(dict(small, threads=3), progress=False)
        assert res["rounds"][0]["threads"] == 3 and registered == [True] * 3
        assert not (tmp_path / str(os.getpid())).exists()
    finally:
        for p in others:
            p.kill()
            p.wait()


def test_a_round_records_the_threads_its_clients_trained_with(tmp_path, monkeypatch):
    """A run that starts beside the training mid-round changes the count only from the next
    round on, and the round's record is the count its clients trained with (it was the count
    after the round: 3 here, for a round trained on 4 threads)."""
    from fedmpq import client as client_mod

    monkeypatch.setattr("fedmpq.trainers._folder", lambda: tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))  # 12 cores to share
    others = []

    def sleeper():  # a run beside this one: a live process, registered
        others.append(_sleeper())
        (tmp_path / str(others[-1].pid)).touch()

    real_batches, seen = client_mod._batches, []

    def batches(*a, **k):  # a client's epoch: one run more starts beside it
        seen.append(torch.get_num_threads())
        sleeper()
        return real_batches(*a, **k)

    monkeypatch.setattr(client_mod, "_batches", batches)
    try:
        sleeper(), sleeper()
        res = simulate.run(dict(n_clients=1, budgets=[4], rounds=2, local_epochs=1, batch_size=64), progress=False)
        assert seen == [4, 3]  # 12 cores / (2 + 1) runs, then / (3 + 1)
        assert res["threads"] == 4 and [r["threads"] for r in res["rounds"]] == [4, 3]
    finally:
        for p in others:
            p.kill()
            p.wait()


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])


def _start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat, read apart from the code under test."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[19])


def test_a_foreign_or_corrupt_entry_is_ignored_and_never_stops_the_run(tmp_path, monkeypatch):
    other, garbled, piped = _sleeper(), _sleeper(), _sleeper()
    try:
        (tmp_path / str(other.pid)).touch()  # an older version's entry: counted while its pid lives
        (tmp_path / str(garbled.pid)).write_bytes(b"\x00\xffnot a start time")
        (tmp_path / "4000000").mkdir()  # a folder named like a (dead) pid
        (tmp_path / "4000000" / "x").touch()
        (tmp_path / "99999999999999999999").touch()  # no pid_t: os.kill would overflow
        (tmp_path / "2147483648").touch()
        # a FIFO named like a live pid: must not block the round (a child of this test, not the
        # parent process: under a shell that exited, that is init, pid 1, the link's name below)
        os.mkfifo(tmp_path / str(piped.pid))
        (tmp_path / "target").write_text("")
        os.symlink(tmp_path / "target", tmp_path / "1")  # the code writes no links
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        (tmp_path / dead).touch()
        real_unlink, real_listdir = os.unlink, os.listdir

        def unremovable(path, *a, **k):
            if os.path.basename(path) == dead:
                raise PermissionError(13, "Permission denied", path)
            return real_unlink(path, *a, **k)

        monkeypatch.setattr(os, "unlink", unremovable)
        # an entry listed, then gone before it is read
        monkeypatch.setattr(os, "listdir", lambda p: real_listdir(p) + ["4000001"])
        with Registry(tmp_path) as reg:
            assert reg.count() == 2  # this run and `other`; the rest is not counted
            assert reg.count() == 2
        assert (tmp_path / "4000000").is_dir() and (tmp_path / dead).exists()
        assert (tmp_path / "target").read_text() == ""
    finally:
        for p in (other, garbled, piped):
            p.kill()
            p.wait()


def test_only_positive_pid_names_are_entries(tmp_path):
    names = ["0", "-1", "+0", " 1", "1 ", "01", "1_0", "\u0661"]  # int() takes each; "\u0661" is Arabic 1
    for name in names:
        (tmp_path / name).touch()
    with Registry(tmp_path) as reg:
        assert reg.count() == 1
    assert all((tmp_path / name).exists() for name in names)  # not ours: ignored, not removed


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="start times come from Linux's /proc")
def test_an_entry_counts_only_while_its_pid_is_the_process_that_wrote_it(tmp_path):
    reused, other = _sleeper(), _sleeper()
    try:
        # a killed run's entry whose pid the kernel has given to an unrelated process since
        (tmp_path / str(reused.pid)).write_text(f"{_start_time(reused.pid) - 1}\n")
        (tmp_path / str(other.pid)).write_text(f"{_start_time(other.pid)}\n")  # a live run's
        with Registry(tmp_path) as reg:
            mine = tmp_path / str(os.getpid())
            assert mine.read_text() == f"{_start_time(os.getpid())}\n"
            assert reg.count() == 2  # this run and `other`
            assert not (tmp_path / str(reused.pid)).exists()
            assert (tmp_path / str(other.pid)).exists()
            mine.unlink()  # removed under the run: the next count puts it back
            assert reg.count() == 2 and mine.read_text() == f"{_start_time(os.getpid())}\n"
    finally:
        for p in (reused, other):
            p.kill()
            p.wait()


def test_an_unusable_registry_folder_shares_nothing_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedmpq")
    (tmp_path / "a-file").write_text("")
    with Registry(tmp_path / "a-file" / "x") as reg:  # cannot be made
        assert reg.count() == 1 and reg.count() == 1
    assert caplog.text.count("cannot register with the fedmpq runs") == 1
    caplog.clear()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")  # not a folder of this user's own
    with Registry(tmp_path / "link") as reg:
        assert reg.count() == 1
    assert not list((tmp_path / "elsewhere").iterdir())
    assert caplog.text.count("cannot register") == 1
    caplog.clear()
    with Registry(tmp_path / "gone") as reg:  # the folder removed mid-run
        (tmp_path / "gone" / str(os.getpid())).unlink()
        (tmp_path / "gone").rmdir()
        assert reg.count() == 1 and reg.count() == 1
    assert caplog.text.count("cannot register") == 1
