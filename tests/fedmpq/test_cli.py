"""The fedmpq command: flags over config files, a missing dataset."""
from __future__ import annotations

import json

import pytest

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


def _args(cfg):
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return out


def test_bare_runs_write_to_a_dated_folder_and_say_where(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(_args(dict(SMALL, rounds=1))) == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "results.json").is_file()
    captured = capsys.readouterr()
    where = f"runs/{runs[0].name}"
    assert f"results in {where}" in captured.err and f"results in {where}" in captured.out


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch, capsys):
    """Two bare runs side by side (a shared machine) must not write over each other: the
    second of a second gets runs/<date>-<time>-2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "runs/20261206-120000")
    for seed in (1, 2):
        assert cli.main(_args(dict(SMALL, rounds=1, seed=seed)) + ["-q"]) == 0
    assert "results in runs/20261206-120000-2" in capsys.readouterr().out
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["20261206-120000", "20261206-120000-2"]
    seeds = [json.loads((tmp_path / "runs" / r / "results.json").read_text())["config"]["seed"] for r in runs]
    assert seeds == [1, 2]


def test_an_out_folder_holding_a_run_is_not_written_over(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=1))) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    capsys.readouterr()
    for argv in (["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=1, seed=5)),
                 ["simulate", "--out", str(out)] + _args(dict(SMALL, rounds=2))):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "already holds a run (results.json and checkpoint.pt)" in err and f"--resume {out}" in err, err
        assert err.count("\n") == 1
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing written over
    (out / "checkpoint.pt").unlink()  # results.json alone is a run too
    assert cli.main(["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=1))) == 2
    assert "already holds a run (results.json)" in capsys.readouterr().err
    assert cli.main(["simulate", "-q", "--resume", str(tmp_path / "run")]) == 2  # no checkpoint: nothing to resume
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["simulate", "-q", "--out", str(empty)] + _args(dict(SMALL, rounds=1))) == 0  # an empty folder is fine


def test_an_out_folder_holding_a_file_a_run_writes_is_not_written_over(tmp_path, capsys):
    """A user's own rounds.csv or plot in the folder (no results.json, no checkpoint.pt) was
    overwritten by the run's; other files are left alone and do not stop a run."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "rounds.csv").write_text("my own table\n")
    (out / "accuracy.png").write_bytes(b"my plot")
    assert cli.main(["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=1))) == 2
    err = capsys.readouterr().err
    assert "already holds rounds.csv and accuracy.png, which a run writes there" in err and err.count("\n") == 1, err
    assert (out / "rounds.csv").read_text() == "my own table\n" and (out / "accuracy.png").read_bytes() == b"my plot"
    (out / "rounds.csv").unlink()
    (out / "accuracy.png").unlink()
    (out / "notes.txt").write_text("kept")
    assert cli.main(["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=1))) == 0
    assert (out / "notes.txt").read_text() == "kept" and (out / "results.json").is_file()


def test_resume_extends_a_finished_run_and_refuses_other_changes(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["simulate", "-q", "--out", str(run)] + _args(dict(SMALL, rounds=2))) == 0
    assert cli.main(["simulate", "-q", "--resume", str(run), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "lr=0.1" in err and "lr=0.5" in err and err.count("\n") == 1
    assert cli.main(["simulate", "-q", "--resume", str(run), "--out", str(tmp_path / "other")]) == 2
    assert "leave out --out" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert cli.main(["simulate", "-q", "--resume", str(run), "--rounds", "1"]) == 2
    assert "already holds 2 rounds" in capsys.readouterr().err
    changed = tmp_path / "changed.json"  # a config file cannot change a resumed run either
    changed.write_text(json.dumps({"alg": "aqfl", "rounds": 3}))
    assert cli.main(["simulate", "-q", "--resume", str(run), "--config", str(changed)]) == 2
    assert "leave out --config" in capsys.readouterr().err
    assert len(json.loads((run / "results.json").read_text())["rounds"]) == 2
    assert cli.main(["simulate", "-q", "--resume", str(run), "--rounds", "3", "--threads", "1"]) == 0
    whole = tmp_path / "whole"
    assert cli.main(["simulate", "-q", "--out", str(whole), "--threads", "1"] + _args(dict(SMALL, rounds=3))) == 0
    a = json.loads((run / "results.json").read_text())
    b = json.loads((whole / "results.json").read_text())
    assert [r["round"] for r in a["rounds"]] == [1, 2, 3] and a["threads"] == 1
    assert [r["accuracy"] for r in a["rounds"]][2] == [r["accuracy"] for r in b["rounds"]][2]


@pytest.mark.parametrize("content,msg", [
    (None, "truncated or corrupted"),  # half of a real checkpoint
    (b"\x80\x02random bytes, not a zip" * 10, "is not a fedmpq checkpoint"),
    # a pickle that would run a command: refused, and torch's warning about its protocol (two
    # lines before the error) not shown
    (b"\x80\x04\x951\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x06config\x94\x8c\x05posix\x94\x8c\x06system"
     b"\x94\x93\x94\x8c\necho pwned\x94\x85\x94R\x94s.", "is not a fedmpq checkpoint"),
], ids=["half", "random", "command-pickle"])
def test_a_bad_checkpoint_is_named_without_unsafe_advice(content, msg, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["simulate", "-q", "--out", str(run)] + _args(dict(SMALL, rounds=1))) == 0
    ck = run / "checkpoint.pt"
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2] if content is None else content)
    import warnings
    with warnings.catch_warnings(record=True) as said:  # a command's stderr would show them
        warnings.simplefilter("always")
        assert cli.main(["simulate", "-q", "--resume", str(run)]) == 2
    assert not said, [str(w.message) for w in said]
    err = capsys.readouterr().err
    assert str(ck) in err and msg in err and err.count("\n") == 1
    assert "weights_only" not in err and "Traceback" not in err


def test_a_checkpoint_with_a_flipped_bit_is_refused_not_resumed(tmp_path, capsys):
    """torch.load never checks the CRC-32 that torch.save writes per record: one bit flipped
    in a weight's bytes loaded as another weight, and the run resumed from it. The resume now
    stops with one line naming the file and the record; the run's files are left as they
    were."""
    import zipfile

    run = tmp_path / "run"
    assert cli.main(["simulate", "-q", "--out", str(run)] + _args(dict(SMALL, rounds=1))) == 0
    ck = run / "checkpoint.pt"
    data = bytearray(ck.read_bytes())
    with zipfile.ZipFile(ck) as z:  # the largest tensor record: a weight's bytes
        rec = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        body = z.read(rec)
    at = bytes(data).find(body)
    assert at >= 0
    at += len(body) // 2
    data[at] ^= 0x04
    ck.write_bytes(bytes(data))
    results = (run / "results.json").read_bytes()
    assert cli.main(["simulate", "-q", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(ck) in err and "is damaged" in err and rec.filename in err and err.count("\n") == 1, err
    assert ck.read_bytes() == bytes(data) and (run / "results.json").read_bytes() == results


def test_a_bad_out_folder_stops_before_training(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    for out, msg in ((afile, "is a file"), (afile / "below", "lies under a file"), ("/proc/fedmpq-x", "cannot be")):
        assert cli.main(["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=1))) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert afile.read_text() == "x"


def test_cuda_where_there_is_none_stops_with_one_line(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["simulate", "-q", "--device", "cuda", "--out", str(tmp_path / "o")] + _args(SMALL)) == 2
    err = capsys.readouterr().err
    assert "sees no CUDA device" in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_threads_and_train_samples_are_applied_and_recorded(tmp_path, monkeypatch):
    import torch

    from fedmpq import client as client_mod

    seen = []
    real = client_mod.client_update

    def spy(download, x, y, *a, **k):
        seen.append((torch.get_num_threads(), len(y)))
        return real(download, x, y, *a, **k)

    monkeypatch.setattr(client_mod, "client_update", spy)
    before = torch.get_num_threads()
    out = tmp_path / "o"
    assert cli.main(["simulate", "-q", "--out", str(out), "--threads", "1", "--train-samples", "300"]
                    + _args(dict(SMALL, rounds=1))) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["threads"] == 1 and res["config"]["train_samples"] == 300
    assert {t for t, _ in seen} == {1} and sum(n for _, n in seen) == 300
    assert torch.get_num_threads() == before  # restored after the run


def test_a_run_stopped_by_a_check_says_one_line_and_no_results_folder(tmp_path, capsys, monkeypatch):
    """Without -q too: the "results in" line comes only once nothing can stop the run before
    training, so a stopped run prints its reason alone, not a folder that holds nothing."""
    import torch

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert cli.main(["simulate", "-q", "--out", str(run)] + _args(dict(SMALL, rounds=1))) == 0
    capsys.readouterr()
    afile = tmp_path / "file"
    afile.write_text("x")
    cases = [(["--dataset", "cifar10", "--data-dir", str(tmp_path)], str(tmp_path)),
             (["--out", str(afile)] + _args(SMALL), "is a file"),
             (["--resume", str(run), "--lr", "0.5"], "lr=0.5")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"] + _args(SMALL), "sees no CUDA device"))
    for argv, msg in cases:
        assert cli.main(["simulate"] + argv) == 2, argv
        captured = capsys.readouterr()
        assert msg in captured.err and captured.err.count("\n") == 1, (argv, captured.err)
        assert "results in" not in captured.err + captured.out, argv
    assert not (tmp_path / "runs").exists()  # no dated folder was made for the stopped runs


def test_resume_accepts_as_many_rounds_as_are_done_but_not_fewer(tmp_path):
    """A resumed run may keep ``rounds`` equal to the rounds already done (nothing left to
    run) or raise it; only fewer is refused."""
    from fedmpq import config
    from fedmpq.federation import resumable

    c = config.check_config(dict(SMALL, rounds=2))
    resumable(c, dict(c), 2, tmp_path / "checkpoint.pt")  # rounds == done: accepted
    resumable(c, dict(c, rounds=5), 2, tmp_path / "checkpoint.pt")
    with pytest.raises(config.ConfigError, match="already holds 2 rounds"):
        resumable(c, dict(c, rounds=1), 2, tmp_path / "checkpoint.pt")


def test_a_config_file_takes_the_words_the_flags_take_for_none(tmp_path):
    """alpha "iid", train_samples, threads and data_dir "none" (any case) in a config file, as
    on the command line: an iid split, the whole training set, the default threads, the
    dataset's default location; --data-dir none too."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(dict(SMALL, rounds=1, alpha="iid", train_samples="none", threads="None",
                                   data_dir="none")))
    assert cli.main(["simulate", "--config", str(cfg), "-q", "--out", str(tmp_path / "o")]) == 0
    saved = json.loads((tmp_path / "o" / "results.json").read_text())["config"]
    assert (saved["alpha"], saved["train_samples"], saved["threads"], saved["data_dir"]) == (None, None, None, None)
    assert cli.main(["simulate", "-q", "--out", str(tmp_path / "p"), "--data-dir", "none"] +
                    _args(dict(SMALL, rounds=1))) == 0
    assert json.loads((tmp_path / "p" / "results.json").read_text())["config"]["data_dir"] is None


def test_fedmpq_flower_has_no_quiet_flag(capsys):
    """Its round lines come from the ServerApp and it draws no bars: a -q would do nothing."""
    assert cli.main(["flower", "-q"]) == 2
    assert "unrecognized arguments: -q" in capsys.readouterr().err


@pytest.mark.parametrize("python", [(3, 10, 13), (3, 11, 7)])
def test_fedmpq_flower_without_flower_says_what_to_install_or_which_python(python, tmp_path, monkeypatch, capsys):
    """Without flwr: the extra to install, or on Python 3.10 (where no flwr >= 1.42 installs)
    that Flower needs 3.11 and simulate runs without it; nothing is written."""
    import sys

    monkeypatch.setitem(sys.modules, "fedmpq.flower.simulation", None)  # its import raises ImportError
    monkeypatch.setattr(sys, "version_info", python)
    assert cli.main(["flower", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    if python < (3, 11):
        assert "needs Flower 1.42 or newer, which needs Python 3.11 or newer; this is Python 3.10" in err
        assert "fedmpq simulate runs the same federation" in err and "pip install" not in err
    else:
        assert 'fedmpq flower needs Flower: pip install -e ".[flower]"' in err and "Python 3.11" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stopped_run_says_where_its_rounds_are_and_how_to_go_on(stop, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM, as a scheduler sends) in the third round: one line, no traceback,
    the shell's status for the signal, and --resume finishes the run."""
    import signal

    from fedmpq import client as client_mod
    real, calls = client_mod.client_update, []

    def update(*a, **kw):
        calls.append(1)
        if len(calls) == 2 * 3 + 1:
            raise KeyboardInterrupt if stop == "ctrl-c" else cli.Stopped(signal.SIGTERM)
        return real(*a, **kw)
    monkeypatch.setattr(client_mod, "client_update", update)
    out = tmp_path / "run"
    argv = ["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=4, sampling_rate=1.0))
    assert cli.main(argv) == (130 if stop == "ctrl-c" else 143)
    err = capsys.readouterr().err
    name = "Ctrl-C" if stop == "ctrl-c" else "SIGTERM"
    assert err == (f"fedmpq: stopped by {name} after 2 of 4 rounds; the results so far are in {out}; "
                   f"continue with: fedmpq simulate --resume {out}\n")
    monkeypatch.setattr(client_mod, "client_update", real)
    assert cli.main(["simulate", "-q", "--resume", str(out)]) == 0
    assert len(json.loads((out / "results.json").read_text())["rounds"]) == 4


def test_a_run_stopped_before_its_first_round_leaves_no_folder(tmp_path, monkeypatch, capsys):
    from fedmpq import client as client_mod

    def update(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(client_mod, "client_update", update)
    monkeypatch.chdir(tmp_path)
    assert cli.main(_args(dict(SMALL, rounds=2)) + ["-q"]) == 130
    assert capsys.readouterr().err == "fedmpq: stopped by Ctrl-C before the first round ended\n"
    assert not (tmp_path / "runs").exists()  # the dated folder (and its lock file) went with it


def _started(out, p, timeout=120):
    """Waits until the run in ``out`` has written and drawn its first round."""
    import time

    deadline = time.monotonic() + timeout
    while not (out / "bits.png").exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be stopped"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_the_command_dies_by_the_signal_that_stopped_it(sig, tmp_path):
    """A real signal to a running fedmpq after its first round: the handler is installed,
    one line, no traceback, and the process ends by that signal (what shells and
    schedulers look for), not with an exit status."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "fedmpq", "simulate", "-q", "--out", str(out)]
                         + _args(dict(SMALL, rounds=200)), stderr=subprocess.PIPE, text=True)
    try:
        _started(out, p)
        p.send_signal(getattr(signal, sig))
        err = p.communicate(timeout=120)[1]
    finally:
        p.kill()
    assert p.returncode == -getattr(signal, sig), err
    name = "Ctrl-C" if sig == "SIGINT" else "SIGTERM"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"fedmpq: stopped by {name} after ") and "of 200 rounds" in last, err
    assert "Traceback" not in err


def test_ctrl_c_stops_a_shell_loop_of_runs(tmp_path):
    """Ctrl-C in a terminal (SIGINT to the whole process group) during the first of three
    runs in a bash loop ends the loop, as it would for any program: bash goes on after a
    child that merely exited 130."""
    import os
    import signal
    import subprocess
    import sys

    argv = " ".join(_args(dict(SMALL, rounds=200)))
    script = (f'for s in 1 2 3; do "{sys.executable}" -m fedmpq simulate -q --out "{tmp_path}/run$s" '
              f'--seed $s {argv}; echo "run $s ended"; done')
    p = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         start_new_session=True)
    try:
        _started(tmp_path / "run1", p)
        os.killpg(p.pid, signal.SIGINT)
        out = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert "run 2" not in out and not (tmp_path / "run2").exists(), out
    assert p.returncode in (130, -signal.SIGINT)


# A child that runs the command as its console script (or python -m) does, with a real signal
# sent to itself the moment `module` starts to import.
_SIGNAL_AT_IMPORT = """
import os, signal, sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.{sig})
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv[0] = "fedmpq"
{entry}
"""
_ENTRIES = {"script": "from fedmpq.cli import main\nsys.exit(main())",  # what pip's fedmpq script runs
            "python -m": "import runpy\nrunpy.run_module('fedmpq', run_name='__main__', alter_sys=True)"}


@pytest.mark.parametrize("entry,module,sig", [("script", "torch", "SIGINT"), ("python -m", "torch", "SIGINT"),
                                              ("script", "fedmpq.config", "SIGINT"), ("script", "torch", "SIGTERM")])
def test_a_signal_while_the_command_starts_is_one_line_too(entry, module, sig, tmp_path):
    """Ctrl-C in the first seconds, while torch and fedmpq are imported (before the flags are
    even parsed): the one line of any stopped run, no traceback, and the process ends by the
    signal. It printed a traceback of the import: the console script imports fedmpq.cli before
    it calls main."""
    import signal
    import subprocess
    import sys

    code = _SIGNAL_AT_IMPORT.format(module=module, sig=sig, entry=_ENTRIES[entry])
    p = subprocess.run([sys.executable, "-c", code, "simulate", "-q", "--out", str(tmp_path / "run")]
                       + _args(dict(SMALL, rounds=1)), capture_output=True, text=True, timeout=300)
    name = "Ctrl-C" if sig == "SIGINT" else "SIGTERM"
    assert p.stderr == f"fedmpq: stopped by {name} before the first round ended\n", p.stderr
    assert p.returncode == -getattr(signal, sig)
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_the_flags_are_built_returns_130_in_process(monkeypatch, capsys):
    """cli.main(argv) in-process: a Ctrl-C before the flags are parsed returns 130 with the
    same line, as one during the run does."""
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_config_flags", interrupted)
    try:
        status = cli.main(["simulate", "-q"])
    except KeyboardInterrupt:  # raised on, it would end the whole pytest session
        pytest.fail("the Ctrl-C came out of main")
    assert status == 130
    assert capsys.readouterr().err == "fedmpq: stopped by Ctrl-C before the first round ended\n"


def test_the_sigterm_handler_is_put_back(tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["simulate", "-q", "--out", str(tmp_path / "r")] + _args(dict(SMALL, rounds=1))) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def _fake_run(path, seed=0):
    from fedmpq import config

    path.mkdir()
    cfg = config.check_config(dict(SMALL, seed=seed))
    rounds = [dict(round=1, accuracy=0.5, bits={"0": [8, 2, 2]}, mean_bits={"0": 2.1})]
    (path / "results.json").write_text(json.dumps({"config": cfg, "rounds": rounds}))
    return str(path)


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stopped_compare_says_one_line_and_keeps_the_table_it_printed(stop, tmp_path, monkeypatch, capsys):
    """Ctrl-C in fedmpq compare raised on (a traceback) and SIGTERM killed it unsaid: both
    say one line and return simulate's status; with --bits, the comparison printed before
    the stop stays printed."""
    import signal

    from fedmpq import results

    run = _fake_run(tmp_path / "a")

    def stopped(*a, **kw):
        raise KeyboardInterrupt if stop == "ctrl-c" else cli.Stopped(signal.SIGTERM)
    monkeypatch.setattr(results, "bits_table", stopped)
    try:
        status = cli.main(["compare", run, "--bits"])
    except KeyboardInterrupt:  # raised on, it would end the whole pytest session
        pytest.fail("the Ctrl-C came out of main")
    assert status == (130 if stop == "ctrl-c" else 143)
    captured = capsys.readouterr()
    assert captured.err == f"fedmpq: compare stopped by {'Ctrl-C' if stop == 'ctrl-c' else 'SIGTERM'}\n"
    assert captured.out.startswith("| runs | seeds | rounds | final accuracy") and "| 0.5000 |" in captured.out


def test_the_compare_command_dies_by_the_signal_with_one_line(tmp_path):
    """A real SIGINT to `fedmpq compare` as it starts (torch's import): one line, no
    traceback, and the process ends by the signal, as fedmpq simulate does."""
    import signal
    import subprocess
    import sys

    run = _fake_run(tmp_path / "a")
    code = _SIGNAL_AT_IMPORT.format(module="torch", sig="SIGINT", entry=_ENTRIES["script"])
    p = subprocess.run([sys.executable, "-c", code, "compare", run], capture_output=True, text=True, timeout=300)
    assert p.stderr == "fedmpq: compare stopped by Ctrl-C\n", p.stderr
    assert p.returncode == -signal.SIGINT


def test_a_stopped_extension_says_how_many_rounds_to_resume_to(tmp_path, monkeypatch, capsys):
    """--resume --rounds 3 of a 1-round run, stopped in round 2: the checkpoint still says 1
    round, so the advice carries --rounds 3."""
    from fedmpq import client as client_mod
    out = tmp_path / "run"
    assert cli.main(["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=1))) == 0
    capsys.readouterr()

    def update(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(client_mod, "client_update", update)
    assert cli.main(["simulate", "-q", "--resume", str(out), "--rounds", "3"]) == 130
    assert capsys.readouterr().err == (f"fedmpq: stopped by Ctrl-C after 1 of 3 rounds; the results so far are in "
                                       f"{out}; continue with: fedmpq simulate --resume {out} --rounds 3\n")


def test_the_command_stopped_before_its_first_round_leaves_no_folder(tmp_path):
    """The command dies by the signal without running main's cleanup; the dated folder it
    made (holding only its lock file) is removed before."""
    import signal
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "fedmpq", "simulate"] + _args(dict(SMALL, rounds=3, local_epochs=200)),
                         cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert "fedmpq: results in runs/" in p.stderr.readline()  # said once training starts
        p.send_signal(signal.SIGINT)
        err = p.stderr.read()
        p.wait(timeout=120)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGINT, err
    assert err.strip().splitlines()[-1] == "fedmpq: stopped by Ctrl-C before the first round ended", err
    assert not (tmp_path / "runs").exists()


def test_a_resume_with_nothing_left_brings_the_results_to_the_checkpoint(tmp_path, capsys):
    """Killed between the last round's checkpoint and its results.json: the checkpoint holds
    every round, results.json one fewer. --resume has no round left to run, and still leaves
    results.json (and rounds.csv) holding every round."""
    out = tmp_path / "run"
    assert cli.main(["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=2))) == 0
    full = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(dict(full, rounds=full["rounds"][:1])))
    (out / "rounds.csv").write_text("round\n1\n")
    assert cli.main(["simulate", "-q", "--resume", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["rounds"] == full["rounds"]
    assert (out / "rounds.csv").read_text().count("\n") == 3


@pytest.mark.parametrize("argv", [["simulate", "--resume", ""], ["simulate", "--config", ""],
                                  ["simulate", "--out", ""], ["compare", ""], ["compare", "x", "--plot", ""]])
def test_an_empty_path_is_refused_not_taken_for_no_flag(argv, tmp_path, monkeypatch, capsys):
    # `--resume "$DIR"` with DIR unset started a new default run of 30 rounds
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv + ["-q"] * (argv[0] == "simulate")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "empty path" in err, err
    assert not (tmp_path / "runs").exists()


def test_resume_takes_its_own_folder_as_out_however_it_is_spelled(tmp_path, monkeypatch, capsys):
    # --resume run --out /abs/run was refused as another folder ("leave out --out")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["simulate", "-q", "--out", "run"] + _args(dict(SMALL, rounds=1))) == 0
    assert cli.main(["simulate", "-q", "--resume", "run", "--out", str(tmp_path / "run"), "--rounds", "2"]) == 0
    assert len(json.loads((tmp_path / "run" / "results.json").read_text())["rounds"]) == 2


@pytest.mark.parametrize("name", ["checkpoint.pt", "results.json", "rounds.csv.tmp", "checkpoint.pt.tmp", "bits.png"])
def test_a_folder_where_a_run_writes_a_file_is_refused_before_training(name, tmp_path, monkeypatch, capsys):
    # a folder checkpoint.pt/ passed the "holds a run" check (is_file), round 1 trained, then the
    # rename onto it failed with IsADirectoryError and left checkpoint.pt.tmp behind
    from fedmpq import client as client_mod

    def update(*a, **kw):
        raise AssertionError("trained before the folder was refused")
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    monkeypatch.setattr(client_mod, "client_update", update)
    assert cli.main(["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=1))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out} holds {name}, which is not a file" in err, err
    assert sorted(p.name for p in out.iterdir()) == sorted([name, ".fedmpq.lock"])


def test_a_resumed_run_refuses_a_folder_where_it_writes_a_file(tmp_path, monkeypatch, capsys):
    from fedmpq import client as client_mod

    out = tmp_path / "run"
    assert cli.main(["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=1))) == 0
    (out / "results.json.tmp").mkdir()
    capsys.readouterr()

    def update(*a, **kw):
        raise AssertionError("trained before the folder was refused")
    monkeypatch.setattr(client_mod, "client_update", update)
    assert cli.main(["simulate", "-q", "--resume", str(out), "--rounds", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out} holds results.json.tmp, which is not a file" in err, err
    assert len(json.loads((out / "results.json").read_text())["rounds"]) == 1


def stopped_after_one(out, total: int) -> None:
    """A 1-round run in ``out`` whose checkpoint says ``total`` rounds: as if a run of
    ``total`` rounds had been stopped after its first."""
    import torch

    assert cli.main(["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=1))) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["config"]["rounds"] = total
    torch.save(state, out / "checkpoint.pt")


def test_resume_may_lower_the_rounds_to_no_fewer_than_are_done(tmp_path, capsys):
    """--resume's help said flags may "raise rounds"; a stopped 3-round run resumed with
    --rounds 2 ends at 2, its config saying 2 (documented now, not refused)."""
    out = tmp_path / "run"
    stopped_after_one(out, 3)
    assert cli.main(["simulate", "-q", "--resume", str(out), "--rounds", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["rounds"] == 2 and [r["round"] for r in res["rounds"]] == [1, 2]
    capsys.readouterr()
    assert cli.main(["simulate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "flags may change rounds (raise it to extend the run, or lower it to end sooner, not below the rounds done" \
        in text, text


def test_the_readme_documents_the_flags_of_each_command(capsys):
    """compare --last and simulate -q/--quiet were in --help only."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for flag in ("--last", "--plot", "--bits", "-q", "--quiet", "--resume", "--config", "--out", "--cpus"):
        assert f"{flag} " in readme or f"`{flag}`" in readme, flag


@pytest.mark.parametrize("argv, hint", [(["compar", "c1"], "did you mean compare?"), (["simulat", "--rounds", "1"],
                                         "did you mean simulate?"), (["help"], "did you mean --help?"), (["x"], "")])
def test_a_mistyped_command_is_named_not_taken_for_simulate_flags(argv, hint, capsys, tmp_path, monkeypatch):
    """simulate takes no positional argument, so a first word is a command: `fedmpq compar c1`
    said "unrecognized arguments: compar c1", as if a simulate run had been meant. Nothing runs."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedmpq: unknown command {argv[0]!r}") and hint in err and err.count("\n") == 1
    assert "the commands are simulate, compare, flower" in err and not any(tmp_path.iterdir())


def test_a_run_in_which_no_client_was_ever_aggregated_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    """Every client failing in every round (a node's device missing, say) ended with "final
    accuracy 0.10" and status 0: an untrained model reported as a result. One line and status 1
    now; the results are written; a run where some round aggregated ends as before."""
    from fedmpq import client as client_mod
    real = client_mod.client_update

    def broken(*a, **k):
        raise RuntimeError("network down")
    monkeypatch.setattr(client_mod, "client_update", broken)
    out = tmp_path / "run"
    assert cli.main(["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=2))) == 1
    captured = capsys.readouterr()
    assert "final accuracy" not in captured.out
    assert captured.err.splitlines()[-1] == (f"fedmpq: no client's upload was aggregated in any of the 2 rounds: the "
                                             f"global model is untrained (the warnings above say why); results in {out}")
    assert [r["aggregated"] for r in json.loads((out / "results.json").read_text())["rounds"]] == [[], []]
    calls = []

    def first_round_only(*a, **k):
        calls.append(1)
        return real(*a, **k) if len(calls) <= 3 else broken()
    monkeypatch.setattr(client_mod, "client_update", first_round_only)
    assert cli.main(["simulate", "-q", "--out", str(tmp_path / "some")] + _args(dict(SMALL, rounds=2))) == 0
    assert "final accuracy" in capsys.readouterr().out


def test_a_signal_after_the_last_round_says_the_run_is_whole(tmp_path):
    """Ctrl-C just after the last round was written said "stopped after 4 of 4 rounds; continue
    with: fedmpq simulate --resume": there is nothing to continue. It says the run is whole."""
    import signal

    out = tmp_path / "run"
    assert cli.main(["simulate", "-q", "--out", str(out)] + _args(dict(SMALL, rounds=2))) == 0
    line = cli._stopped_line(signal.SIGINT, str(out), 2, resumable=True)
    assert line == f"fedmpq: stopped by Ctrl-C after its last round (2 of 2): the run is whole; results in {out}"
    assert "--resume" in cli._stopped_line(signal.SIGINT, str(out), 3, resumable=True)  # an extension stopped early


def test_a_run_saved_before_memory_format_resumes_as_it_ran(tmp_path):
    """A checkpoint whose config has no memory_format (written before the key) resumes
    contiguous, as it ran, and ends with the uninterrupted contiguous run's model; a flag may
    still change it (an execution key)."""
    import torch

    run, whole = tmp_path / "run", tmp_path / "whole"
    assert cli.main(["simulate", "-q", "--out", str(run), "--memory-format", "contiguous"]
                    + _args(dict(SMALL, rounds=1))) == 0
    ck = run / "checkpoint.pt"
    state = torch.load(ck, weights_only=True)
    del state["config"]["memory_format"]  # as an older version wrote it
    torch.save(state, ck)
    res = json.loads((run / "results.json").read_text())
    del res["config"]["memory_format"]
    (run / "results.json").write_text(json.dumps(res))
    assert cli.main(["simulate", "-q", "--resume", str(run), "--rounds", "2"]) == 0
    assert cli.main(["simulate", "-q", "--out", str(whole), "--memory-format", "contiguous"]
                    + _args(dict(SMALL, rounds=2))) == 0
    a = json.loads((run / "results.json").read_text())
    b = json.loads((whole / "results.json").read_text())
    assert a["config"]["memory_format"] == "contiguous"
    assert [r["accuracy"] for r in a["rounds"]] == [r["accuracy"] for r in b["rounds"]]
    assert cli.main(["simulate", "-q", "--resume", str(run), "--rounds", "3", "--memory-format", "auto"]) == 0
    assert json.loads((run / "results.json").read_text())["config"]["memory_format"] == "auto"
