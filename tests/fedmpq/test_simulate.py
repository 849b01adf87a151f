"""fedmpq simulate (the in-process transport over the federation's round loop): a small
federation end to end for every algorithm, failing clients, and resuming a run killed with
SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fedmpq import cli, config, simulate

SMALL = dict(dataset="digits", n_clients=3, budgets=[2, 4, 8], rounds=2, local_epochs=1, batch_size=64, alpha=0.5)


@pytest.mark.parametrize("alg", ["fedmpq", "aqfl", "fp8", "fp"])
def test_a_small_federation_runs_and_writes_its_results(alg, tmp_path):
    res = simulate.run(dict(SMALL, alg=alg), out=str(tmp_path), progress=False)
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    for r in res["rounds"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["reported"] == [0, 1, 2]
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        if alg == "fp":
            assert r["bits"] == {} and r["assigned_mean_bits"] == {}
        else:
            assigned = {int(k): v for k, v in r["assigned_mean_bits"].items()}
            budgets = [8, 8, 8] if alg == "fp8" else [2, 4, 8]
            assert sorted(assigned) == [0, 1, 2]
            for k, b in enumerate(budgets):  # reassignment ends at or above the budget, never above 8
                assert (assigned[k] == b) if alg != "fedmpq" else (b <= assigned[k] <= 8)
            assert r["bytes_up"] < r["float32_bytes"] / 2  # packed: N + 1 bits per weight
            assert set(r["bits"]) == {"0", "1", "2"}
            if alg == "fp8":
                assert all(b == 8 for bits in r["bits"].values() for b in bits)
            if alg == "aqfl":
                assert all(all(b == budget for b in r["bits"][str(k)]) for k, budget in enumerate([2, 4, 8]))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["alg"] == alg and len(saved["rounds"]) == 2
    assert (tmp_path / "rounds.csv").read_text().count("\n") == 3


def test_a_float_classifier_travels_and_averages_as_float(monkeypatch, tmp_path):
    """classifier=float: the clients' classifier is a float layer, sent as float32 and averaged
    as such (the unweighted mean of the uploads, the authors' rule); the rest is the quantized
    federation."""
    from fedmpq import client as client_mod
    from fedmpq import wire
    ups = []
    real = client_mod.client_update

    def spy(*a, **kw):
        r = real(*a, **kw)
        ups.append(wire.decode_upload(r.upload))
        return r

    monkeypatch.setattr(client_mod, "client_update", spy)
    res = simulate.run(dict(SMALL, rounds=1, classifier="float"), out=str(tmp_path), progress=False)
    monkeypatch.undo()
    r = res["rounds"][0]
    assert res["config"]["classifier"] == "float" and r["reported"] == [0, 1, 2]
    assert all(len(bits) == 3 for bits in r["bits"].values())  # conv1..conv3; no classifier bits
    assert len(ups) == 3
    for up in ups:
        assert "linear.weight" in up.floats and "linear.weight" not in up.layers
        assert up.floats["linear.weight"].dtype == torch.float32
    mean = sum(u.floats["linear.weight"].double() for u in ups) / 3
    glob = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["server"]["global_state"]["linear.weight"]
    torch.testing.assert_close(glob, mean.float(), rtol=1e-6, atol=1e-7)
    default = simulate.run(dict(SMALL, rounds=1), progress=False)["rounds"][0]
    assert all(len(bits) == 4 for bits in default["bits"].values())


def test_the_same_seed_gives_the_same_run():
    a = simulate.run(dict(SMALL, rounds=1), progress=False)
    b = simulate.run(dict(SMALL, rounds=1), progress=False)
    assert a["rounds"][0]["accuracy"] == b["rounds"][0]["accuracy"]
    assert a["rounds"][0]["bits"] == b["rounds"][0]["bits"]


def test_a_second_run_in_the_same_process_at_once_is_refused(monkeypatch):
    """Two runs on two threads of one process each got results other than their own config's
    (a run seeds torch's global generator and sets torch's thread count: process-wide). A
    second run while one is going raises, naming the way out; one after the other is fine
    (the lock is released on the way out, on error too)."""
    import threading

    inside, leave = threading.Event(), threading.Event()
    real = simulate.federate

    def held(*a, **k):
        inside.set()
        leave.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(simulate, "federate", held)
    first = threading.Thread(target=lambda: simulate.run(dict(SMALL, rounds=1), progress=False))
    first.start()
    try:
        assert inside.wait(60)
        with pytest.raises(RuntimeError, match="already running in this process .* separate processes"):
            simulate.run(dict(SMALL, rounds=1), progress=False)
    finally:
        leave.set()
        first.join(120)
    assert not first.is_alive()
    with pytest.raises(config.ConfigError):
        simulate.run(dict(SMALL, rounds=0), progress=False)  # refused by its config: the lock is released
    monkeypatch.setattr(simulate, "federate", real)
    assert simulate.run(dict(SMALL, rounds=1), progress=False)["rounds"]


def test_a_failing_or_malformed_client_is_left_out(monkeypatch, caplog):
    from fedmpq import client as client_mod

    real = client_mod.client_update

    accs = {}

    def flaky(download, x, y, build, cfg, k, r, budget):
        if k == 1:
            raise RuntimeError("out of memory")
        res = real(download, x, y, build, cfg, k, r, budget)
        accs[k] = res.train_accuracy
        if k == 2:
            res.upload = res.upload[:-5]  # a truncated payload
            res.train_accuracy = 1.0  # what it says of itself counts for nothing either
        return res

    monkeypatch.setattr(client_mod, "client_update", flaky)
    res = simulate.run(dict(SMALL, rounds=1), progress=False)
    row = res["rounds"][0]
    assert row["reported"] == [0, 2] and row["aggregated"] == [0]  # 1 failed; 2 sent bytes that do not decode
    assert set(row["bits"]) == {"0"}
    assert "client 1 failed" in caplog.text and "client 2 is left out" in caplog.text
    # the round's train accuracy is the aggregated clients' (client 2's model was not used)
    assert row["train_accuracy"] == accs[0] != 1.0


def test_a_round_nobody_reports_keeps_the_model(monkeypatch, caplog):
    from fedmpq import client as client_mod

    def broken(*a, **k):
        raise RuntimeError("network down")

    monkeypatch.setattr(client_mod, "client_update", broken)
    res = simulate.run(dict(SMALL, rounds=1), progress=False)
    assert res["rounds"][0]["reported"] == [] and "no client reported" in caplog.text


def test_resume_after_sigkill_ends_with_the_uninterrupted_model(tmp_path):
    cfg = dict(SMALL, rounds=4)
    whole = tmp_path / "whole"
    simulate.run(cfg, out=str(whole), progress=False)
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "fedmpq", "simulate", "--out", str(killed), "-q"]
    for k, v in cfg.items():
        args += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # kill it once two rounds are checkpointed, mid-run
            rj = killed / "results.json"
            if rj.exists() and len(json.loads(rj.read_text() or "{}").get("rounds", [])) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = len(json.loads((killed / "results.json").read_text())["rounds"])
    assert 2 <= done < 4, "the run was to be killed mid-way"
    assert cli.main(["simulate", "--resume", str(killed), "-q"]) == 0
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["server"]["assignments"] == b["server"]["assignments"]
    for k, v in a["server"]["global_state"].items():
        assert torch.equal(v, b["server"]["global_state"][k]), k
    ra = json.loads((whole / "results.json").read_text())["rounds"]
    rb = json.loads((killed / "results.json").read_text())["rounds"]
    assert [r["accuracy"] for r in ra] == [r["accuracy"] for r in rb]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("alg", ["fedmpq", "fp"])
def test_a_federation_on_cuda_sends_payloads_of_the_cpu_layout(alg, tmp_path):
    gpu = simulate.run(dict(SMALL, alg=alg, rounds=1, device="cuda"), progress=False)
    cpu = simulate.run(dict(SMALL, alg=alg, rounds=1), progress=False)
    for key in ("bytes_up", "bytes_down", "reported", "aggregated"):
        assert gpu["rounds"][0][key] == cpu["rounds"][0][key], key
    assert abs(gpu["rounds"][0]["accuracy"] - cpu["rounds"][0]["accuracy"]) < 0.1


def test_client_sampling_takes_the_rate_of_the_clients_anew_each_round():
    """sample_clients: round(rate * n_clients) distinct clients (at least one), sorted, the
    same for the same seed and round, and drawn anew each round (not one fixed subset)."""
    from fedmpq.federation import sample_clients

    c = config.check_config(dict(SMALL, n_clients=10, budgets=4, sampling_rate=0.3))
    draws = [sample_clients(c, r) for r in range(1, 21)]
    for d in draws:
        assert len(d) == 3 and len(set(d)) == 3 and d == sorted(d) and all(0 <= k < 10 for k in d)
    assert draws == [sample_clients(c, r) for r in range(1, 21)]  # reproducible
    assert len({tuple(d) for d in draws}) > 1  # a new draw each round
    assert len({k for d in draws for k in d}) > 3  # over the rounds, more clients than one draw's
    assert sample_clients(dict(c, sampling_rate=1.0), 5) == list(range(10))
    # a rate that rounds to no client still samples one
    tiny = config.check_config(dict(SMALL, n_clients=10, budgets=4, sampling_rate=0.01))
    assert all(len(sample_clients(tiny, r)) == 1 for r in range(1, 6))


def test_resume_without_a_checkpoint_is_refused_and_the_folder_kept(tmp_path):
    """simulate.run(..., resume=True) on a folder without checkpoint.pt started a fresh run over
    its results.json; the command line checked first, the Python API did not."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"rounds": [1]}')
    with pytest.raises(config.ConfigError, match="nothing to resume: .*checkpoint.pt does not exist"):
        simulate.run(dict(SMALL, rounds=1), out=str(out), resume=True, progress=False)
    assert (out / "results.json").read_text() == '{"rounds": [1]}'
    with pytest.raises(config.ConfigError, match="resume needs the results folder"):
        simulate.run(dict(SMALL, rounds=1), resume=True, progress=False)


def test_a_checkpoint_whose_state_does_not_fit_the_run_is_refused_before_training(tmp_path):
    """A checkpoint whose server state lacks an entry, holds another shape or assigns other
    clients or widths (an older version's model, an edited file) went into the round loop: a
    KeyError or torch's size mismatch traceback after every client of a round had failed; rounds
    that are not JSON were a JSONDecodeError. Each is a ConfigError naming the file and what does
    not fit, before any training, and the run's files are kept."""
    out = tmp_path / "run"
    c = dict(SMALL, alg="aqfl", rounds=1)
    simulate.run(c, out=str(out), progress=False)
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    results = (out / "results.json").read_bytes()
    first = next(iter(good["server"]["global_state"]))

    def edited(edit):
        ck = torch.load(out / "checkpoint.pt", weights_only=True)
        edit(ck)
        return ck
    cases = [(lambda ck: ck["server"]["global_state"].pop(first), f"missing \\['{first}'\\]"),
             (lambda ck: ck["server"]["global_state"].__setitem__(first, torch.zeros(2)), f"{first}: expected"),
             (lambda ck: ck.__setitem__("server", {}), "lacks global_state or assignments"),
             (lambda ck: ck["server"].__setitem__("assignments", {"0": [2]}), "assignments are for clients"),
             (lambda ck: ck["server"]["assignments"].__setitem__("0", [9] * 99), "widths in 1..8"),
             (lambda ck: ck.__setitem__("rounds", "[1, "), "rounds are not a JSON list"),
             # edited rows were a traceback mid-resume after results.json was written over with them
             (lambda ck: ck.__setitem__("rounds", "[1]"), "its row 1 is not round 1's record"),
             (lambda ck: ck.__setitem__("rounds", json.dumps([{"round": 1}])), "row 1 is not round 1's record"),
             (lambda ck: ck.__setitem__("rounds", json.dumps([dict(json.loads(ck["rounds"])[0], round=10)])),
              "row 1 is not round 1's record"),
             # rows of fewer rounds than the model has had (a row dropped): it went on silently
             (lambda ck: ck.__setitem__("round", 2), "its model has had 2 rounds, its rows record 1"),
             # NaN stopped the next round's binarization with a traceback; inf or a negative
             # variance left every upload out of every round, and the run ended "successfully"
             (lambda ck: ck["server"]["global_state"][first].view(-1).__setitem__(0, float("nan")),
              f"{first} holds NaN or inf"),
             (lambda ck: ck["server"]["global_state"]["bn1.running_var"].__setitem__(0, -1.0),
              "bn1.running_var holds a negative value"),
             # "4444" was read as [4, 4, 4, 4], 4.7 as 4 and True as 1
             (lambda ck: ck["server"]["assignments"].__setitem__("0", "4444"), "not lists of integers"),
             (lambda ck: ck["server"]["assignments"].__setitem__(
                 "0", [4.7] + ck["server"]["assignments"]["0"][1:]), "not lists of integers"),
             (lambda ck: ck["server"]["assignments"].__setitem__(
                 "0", [True] + ck["server"]["assignments"]["0"][1:]), "not lists of integers")]
    for edit, msg in cases:
        torch.save(edited(edit), out / "checkpoint.pt")
        with pytest.raises(config.ConfigError, match=msg):
            simulate.run(dict(c, rounds=2), out=str(out), resume=True, progress=False)
        assert (out / "results.json").read_bytes() == results
        torch.save(good, out / "checkpoint.pt")
    assert len(simulate.run(dict(c, rounds=2), out=str(out), resume=True, progress=False)["rounds"]) == 2


def test_a_checkpoint_of_another_run_or_an_older_one_is_refused(tmp_path, capsys):
    """Another run's checkpoint (seed 7), or this run's of fewer rounds, copied into a run's
    folder: --resume took it and wrote its results over that run's results.json, exit 0. It
    is refused now, one line, the folder's files kept; a checkpoint one round ahead of
    results.json (a kill between the two) still resumes."""
    from test_cli import _args

    base, other, four = tmp_path / "base", tmp_path / "other", tmp_path / "four"
    flags = _args(dict(SMALL, rounds=2))
    assert cli.main(["simulate", "-q", "--out", str(base)] + flags) == 0
    assert cli.main(["simulate", "-q", "--out", str(other), "--seed", "7"] + flags) == 0
    assert cli.main(["simulate", "-q", "--out", str(four)] + _args(dict(SMALL, rounds=4))) == 0
    capsys.readouterr()
    for folder, ckpt, why in ((base, other / "checkpoint.pt", "its seed is 7, results.json's 0"),
                              (four, base / "checkpoint.pt", "it holds 2 rounds, results.json 4")):
        kept = {f: (folder / f).read_bytes() for f in ("results.json", "rounds.csv")}
        own = (folder / "checkpoint.pt").read_bytes()
        (folder / "checkpoint.pt").write_bytes(ckpt.read_bytes())
        assert cli.main(["simulate", "-q", "--resume", str(folder), "--rounds", "5"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is not the checkpoint of the run in {folder / 'results.json'}: {why}" in err
        assert all((folder / f).read_bytes() == b for f, b in kept.items())
        (folder / "checkpoint.pt").write_bytes(own)
    assert cli.main(["simulate", "-q", "--resume", str(base), "--rounds", "3"]) == 0


def test_ending_a_run_sooner_is_recorded_in_its_checkpoint_and_the_lock_follows_no_link(tmp_path, capsys):
    """--resume --rounds 1 on a run stopped after 1 of 4 rounds rewrote results.json's rounds
    but not the checkpoint's, and a later plain --resume ran on to 4. The lock file, a
    symbolic link, had the run's pid written into the file it pointed to."""
    from test_cli import stopped_after_one

    out = tmp_path / "run"
    stopped_after_one(out, 4)
    assert cli.main(["simulate", "-q", "--resume", str(out), "--rounds", "1"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["rounds"] == 1
    assert cli.main(["simulate", "-q", "--resume", str(out)]) == 0
    assert len(json.loads((out / "results.json").read_text())["rounds"]) == 1
    victim = tmp_path / "precious.txt"
    victim.write_text("precious data")
    (out / ".fedmpq.lock").unlink()
    (out / ".fedmpq.lock").symlink_to(victim)
    capsys.readouterr()
    assert cli.main(["simulate", "-q", "--resume", str(out), "--rounds", "2"]) == 2
    assert "its lock file .fedmpq.lock cannot be opened" in capsys.readouterr().err
    assert victim.read_text() == "precious data"


def test_the_api_resumes_a_run_with_the_keys_its_config_leaves_out_as_the_run_had_them(tmp_path):
    """simulate.run(cfg, out, resume=True) filled the keys ``cfg`` left out with today's
    defaults, not the run's: a run saved before memory_format existed (it ran contiguous)
    resumed as ``auto`` (channels-last on the CPU from 16x16 up), recorded so, while
    ``fedmpq simulate --resume`` resumed it contiguous. Both now complete a resumed config
    from the checkpoint's, and a config of the changed keys alone resumes the run."""
    out = tmp_path / "run"
    simulate.run(dict(SMALL, rounds=1, lr=0.05, memory_format="contiguous"), out=str(out), progress=False)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["config"]["memory_format"]  # as an older version wrote it
    torch.save(state, out / "checkpoint.pt")
    res = json.loads((out / "results.json").read_text())
    del res["config"]["memory_format"]
    (out / "results.json").write_text(json.dumps(res))
    got = simulate.run(dict(SMALL, rounds=2, lr=0.05), out=str(out), resume=True, progress=False)
    assert got["config"]["memory_format"] == "contiguous" and len(got["rounds"]) == 2
    got = simulate.run({"rounds": 3}, out=str(out), resume=True, progress=False)  # lr, the split: the run's
    assert got["config"]["lr"] == 0.05 and got["config"]["memory_format"] == "contiguous"
    assert len(got["rounds"]) == 3
    # a key the config gives still wins, and one that may not change is still refused
    got = simulate.run({"rounds": 3, "memory_format": "auto"}, out=str(out), resume=True, progress=False)
    assert got["config"]["memory_format"] == "auto"
    with pytest.raises(config.ConfigError, match="lr=0.1"):
        simulate.run({"rounds": 4, "lr": 0.1}, out=str(out), resume=True, progress=False)
