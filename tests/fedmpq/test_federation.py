"""The round loop's pacing of the plots (fedmpq/federation.py's PlotPacer): drawn in at most a
share of the run's time, after the first and the last round, and after an interrupted run
showing every round results.json holds. The results folders: one of its own for every run."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading

import pytest

from fedmpq import cli
from fedmpq import client as client_mod
from fedmpq import federation, simulate
from fedmpq import server as server_mod

SMALL = dict(dataset="digits", n_clients=2, budgets=[2, 4], rounds=4, local_epochs=1, batch_size=64, alpha=0.5)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def recorder(monkeypatch, clock=None, cost=0.0):
    """Replaces the plots with a record of how many rounds each drawing saw (each drawing
    takes ``cost`` seconds of ``clock``)."""
    drawn = []

    def write_plots(results, outdir):
        drawn.append(len(results["rounds"]))
        if clock is not None:
            clock.t += cost
    monkeypatch.setattr(federation, "write_plots", write_plots)
    return drawn


def test_plots_take_at_most_their_share_of_the_time(monkeypatch, tmp_path):
    clock = FakeClock()
    drawn = recorder(monkeypatch, clock, cost=1.0)
    results = {"rounds": []}
    pacer = federation.PlotPacer(results, tmp_path, share=0.1, clock=clock)
    for r in range(1, 31):  # 3-second rounds, a 1-second drawing: 10 s between drawings
        clock.t += 3.0
        results["rounds"].append({"round": r})
        pacer.round_done(last=r == 30)
    # round 1 ends at 3 s, its drawing at 4 s: the next is due at 14 s, after round 5 (16 s)
    assert drawn[:3] == [1, 5, 9]
    assert drawn[-1] == 30 and not pacer.stale
    assert all(b - a == 4 for a, b in zip(drawn, drawn[1:-1]))  # 4 rounds + a drawing = 13 s >= 10
    assert (len(drawn) - 1) * 1.0 <= 0.1 * clock.t  # the share (the last round's drawing aside)
    pacer.flush()
    assert drawn[-1] == 30 and len(drawn) == len(set(drawn))  # nothing stale: no drawing more


def test_slow_rounds_are_drawn_every_round(monkeypatch, tmp_path):
    clock = FakeClock()
    drawn = recorder(monkeypatch, clock, cost=0.15)
    results = {"rounds": []}
    pacer = federation.PlotPacer(results, tmp_path, clock=clock)
    for r in range(1, 6):
        clock.t += 60.0  # a ResNet-20 round
        results["rounds"].append({"round": r})
        pacer.round_done(last=False)
    assert drawn == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_a_share_out_of_range_is_refused(share, tmp_path):
    with pytest.raises(ValueError, match="share"):
        federation.PlotPacer({"rounds": []}, tmp_path, share=share)


def test_a_run_draws_its_first_and_last_round(monkeypatch, tmp_path):
    drawn = recorder(monkeypatch)
    monkeypatch.setattr(federation.PlotPacer, "SHARE", 1e-12)  # after the first, nothing is due
    simulate.run(dict(SMALL), out=str(tmp_path), progress=False)
    assert drawn == [1, 4]
    assert len(json.loads((tmp_path / "results.json").read_text())["rounds"]) == 4


def test_an_interrupted_run_leaves_plots_of_every_round_it_recorded(monkeypatch, tmp_path):
    """Ctrl-C during the third round's training: results.json holds two rounds, and so do the
    plots, though the second round's drawing was not due."""
    drawn = recorder(monkeypatch)
    monkeypatch.setattr(federation.PlotPacer, "SHARE", 1e-12)
    real, calls = client_mod.client_update, []

    def update(*a, **kw):
        calls.append(1)
        if len(calls) > 2 * 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(client_mod, "client_update", update)
    with pytest.raises(KeyboardInterrupt):
        simulate.run(dict(SMALL, sampling_rate=1.0), out=str(tmp_path), progress=False)
    assert len(json.loads((tmp_path / "results.json").read_text())["rounds"]) == 2
    assert drawn == [1, 2]


def test_a_server_error_leaves_plots_of_every_round_it_recorded(monkeypatch, tmp_path):
    drawn = recorder(monkeypatch)
    monkeypatch.setattr(federation.PlotPacer, "SHARE", 1e-12)
    real = server_mod.Server.aggregate

    def aggregate(self, r, uploads):
        if r == 4:
            raise RuntimeError("out of memory")
        return real(self, r, uploads)
    monkeypatch.setattr(server_mod.Server, "aggregate", aggregate)
    with pytest.raises(RuntimeError, match="out of memory"):
        simulate.run(dict(SMALL), out=str(tmp_path), progress=False)
    assert len(json.loads((tmp_path / "results.json").read_text())["rounds"]) == 3
    assert drawn == [1, 3]


def test_a_failing_drawing_does_not_hide_the_error_that_stopped_the_run(monkeypatch, tmp_path, caplog):
    def write_plots(results, outdir):
        if len(results["rounds"]) > 1:
            raise OSError("disk full")
    monkeypatch.setattr(federation, "write_plots", write_plots)
    results = {"rounds": [{"round": 1}]}
    pacer = federation.PlotPacer(results, tmp_path, share=1e-12)
    pacer.round_done(last=False)
    results["rounds"].append({"round": 2})
    pacer.round_done(last=False)  # not due
    assert pacer.stale
    caplog.set_level(logging.INFO, logger="fedmpq")
    pacer.flush()  # logs, does not raise
    assert "could not be brought up to date: OSError: disk full" in caplog.text


def test_runs_claiming_a_folder_at_once_each_get_their_own(tmp_path):
    base = str(tmp_path / "runs" / "20261206-120000")
    got, start = [], threading.Barrier(8)

    def claim():
        start.wait()
        got.append(federation.claim_new_folder(base)[0])
    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted([base] + [f"{base}-{k}" for k in range(2, 9)])


def test_a_claimed_folder_is_released_only_while_empty(tmp_path):
    name, made = federation.claim_new_folder(str(tmp_path / "a" / "b" / "run"))
    assert made == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "run"]
    federation.release_folder(made)
    assert not (tmp_path / "a").exists()  # everything it made, nothing more
    name, made = federation.claim_new_folder(str(tmp_path / "a" / "run"))
    (tmp_path / "a" / "run" / "results.json").write_text("{}")
    federation.release_folder(made)
    assert (tmp_path / "a" / "run" / "results.json").is_file()


def test_a_folder_that_cannot_be_made_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(federation.ConfigError, match="cannot be made.*give --out"):
        federation.claim_new_folder(str(tmp_path / "file" / "run"))


def _hold_the_lock(folder):
    """Another process holding ``folder``'s run lock, as a running fedmpq run does."""
    code = ("import sys, time; from pathlib import Path; from fedmpq.federation import FolderLock; "
            "lock = FolderLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_folder_another_run_is_writing_is_refused_until_it_ends(tmp_path, capsys):
    """Two runs given the same --out side by side: both would pass the checks before either
    wrote; the one that comes second is refused at once, naming the holder; once the holder
    is killed (SIGKILL: the kernel drops the lock), the folder is free again."""
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold_the_lock(out)
    try:
        argv = ["simulate", "-q", "--out", str(out), "--dataset", "digits", "--n-clients", "2", "--budgets", "2,4",
                "--rounds", "1", "--local-epochs", "1"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"is being written by another fedmpq run right now (process {holder.pid})" in err
        assert err.count("\n") == 1 and not (out / "results.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert cli.main(argv) == 0  # no stale lock
    holder = _hold_the_lock(out)  # a resume while the folder is held: refused too
    try:
        assert cli.main(["simulate", "-q", "--resume", str(out), "--rounds", "2"]) == 2
        assert "being written by another fedmpq run" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert cli.main(["simulate", "-q", "--resume", str(out), "--rounds", "2"]) == 0
    assert len(json.loads((out / "results.json").read_text())["rounds"]) == 2


def test_a_run_releases_its_folder_when_it_ends_or_fails(monkeypatch, tmp_path):
    simulate.run(dict(SMALL, rounds=1), out=str(tmp_path / "a"), progress=False)
    federation.FolderLock(tmp_path / "a").release()  # free again
    monkeypatch.setattr(server_mod.Server, "aggregate", lambda self, r, u: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        simulate.run(dict(SMALL, rounds=1), out=str(tmp_path / "b"), progress=False)
    federation.FolderLock(tmp_path / "b").release()


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(monkeypatch, tmp_path, caplog):
    def no_locks(fd, op):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(federation.fcntl, "flock", no_locks)
    lock = federation.FolderLock(tmp_path)
    lock.release()
    assert "cannot be locked (No locks available)" in caplog.text


def test_the_plots_never_show_a_round_results_json_lacks(monkeypatch, tmp_path):
    """The third round's results.json cannot be written (a full disk): the error stops the
    run, and the plots drawn on the way out show the two rounds results.json holds."""
    drawn = recorder(monkeypatch)
    monkeypatch.setattr(federation.PlotPacer, "SHARE", 1e-12)
    real = federation.write_results

    def write_results(results, outdir, plots=True):
        if len(results["rounds"]) == 3:
            raise OSError(28, "No space left on device")
        real(results, outdir, plots)
    monkeypatch.setattr(federation, "write_results", write_results)
    with pytest.raises(OSError, match="No space"):
        simulate.run(dict(SMALL), out=str(tmp_path), progress=False)
    assert len(json.loads((tmp_path / "results.json").read_text())["rounds"]) == 2
    assert drawn == [1, 2]


def test_a_claim_survives_another_run_removing_the_empty_parent(monkeypatch, tmp_path):
    """Another run that stopped early removes the empty runs/ folder it made between this
    claim's two mkdirs: the claim makes it again instead of failing."""
    import pathlib

    real, raced = pathlib.Path.mkdir, []

    def mkdir(self, *a, **kw):
        if self.name == "20261206-120000" and not raced:
            raced.append(1)
            self.parent.rmdir()  # the other run's release_folder, just now
        return real(self, *a, **kw)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    name, made = federation.claim_new_folder(str(tmp_path / "runs" / "20261206-120000"))
    assert raced and name.endswith("runs/20261206-120000") and (tmp_path / "runs" / "20261206-120000").is_dir()
    assert made == [tmp_path / "runs", tmp_path / "runs" / "20261206-120000"]


def test_a_lock_file_that_cannot_be_opened_is_one_clear_error(tmp_path):
    (tmp_path / federation.LOCK_NAME).mkdir()
    with pytest.raises(federation.ConfigError, match="lock file .fedmpq.lock cannot be opened"):
        federation.FolderLock(tmp_path)


def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_last(tmp_path, monkeypatch):
    """A process kill never left half a checkpoint, but a power loss could leave an empty one
    (renamed before its data were on disk): each round's checkpoint is synced, then renamed,
    then its folder synced; the other files, made again from it on --resume, are not."""
    import os as os_mod

    from fedmpq import simulate

    synced = []
    real = os_mod.fsync

    def fsync(fd):
        synced.append(os_mod.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os_mod, "fsync", fsync)
    out = tmp_path / "run"
    simulate.run(dict(SMALL, rounds=2), out=str(out), progress=False)
    assert synced == [str(out / "checkpoint.pt.tmp"), str(out)] * 2
