"""A run's results on disk and fedmpq compare."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedmpq import cli, config, results
from tests.extras import optional

SMALL = dict(dataset="digits", n_clients=3, budgets=[2, 4, 8], rounds=2, local_epochs=1, batch_size=64, alpha=0.5)


def _fake_run(path, alg, seed, accs, up=100, extra=None, **keys):
    path.mkdir()
    cfg = config.check_config(dict(alg=alg, seed=seed, **keys))
    rounds = [dict(round=i + 1, accuracy=a, bytes_up=up, **(extra[i] if extra else {})) for i, a in enumerate(accs)]
    (path / "results.json").write_text(json.dumps({"config": cfg, "rounds": rounds}))
    return str(path)


def test_compare_groups_seeds_and_reports_mean_and_spread(tmp_path, capsys):
    a0 = _fake_run(tmp_path / "a0", "fedmpq", 0, [0.1, 0.5, 0.6, 0.7])
    a1 = _fake_run(tmp_path / "a1", "fedmpq", 1, [0.2, 0.3, 0.8, 0.9], up=300)
    b0 = _fake_run(tmp_path / "b0", "aqfl", 0, [0.4, 0.4, 0.4, 0.4])
    table = results.compare([a0, a1, b0], last=2)
    rows = [r for r in table.splitlines() if r.startswith("| fedmpq") or r.startswith("| aqfl")]
    assert len(rows) == 2  # the two seeds of fedmpq are one group
    # final: mean(0.7, 0.9) = 0.8; last 2: mean(0.65, 0.85) = 0.75; best 0.9; bytes (400+1200)/2
    # trend: last 2 minus the 2 before: seed 0 0.65 - 0.3, seed 1 0.85 - 0.25, mean 0.475
    # runs that recorded no train-mode accuracy, seconds or float32 bytes get "-" there
    assert rows[0] == ("| fedmpq (digits) | 0,1 | 4 | 0.8000 (0.7000..0.9000) | 0.7500 (0.6500..0.8500) | +0.4750 "
                       "| - | - | 0.9000 | - | - | 800 | - |")
    assert rows[1] == "| aqfl (digits) | 0 | 4 | 0.4000 | 0.4000 | +0.0000 | - | - | 0.4000 | - | - | 400 | - |"
    assert table.splitlines()[1] == "|" + "---|" * 13
    assert cli.main(["compare", a0, b0, "--last", "1"]) == 0
    assert "| aqfl (digits) | 0 | 4 | 0.4000 | 0.4000 | +0.0000 |" in capsys.readouterr().out
    with pytest.raises(config.ConfigError, match="does not exist"):
        results.compare([a0, str(tmp_path / "missing")])
    with pytest.raises(config.ConfigError, match="last must be"):
        results.compare([a0], last=0)


def test_compare_counts_a_setting_and_seed_once(tmp_path, caplog):
    """The same folder twice, or a rerun of a setting and seed, would be counted as another
    seed (seeds "0,0", a narrower band): left out with a warning naming both."""
    a0 = _fake_run(tmp_path / "a0", "fedmpq", 0, [0.1, 0.5])
    again = _fake_run(tmp_path / "again", "fedmpq", 0, [0.3, 0.9])
    a1 = _fake_run(tmp_path / "a1", "fedmpq", 1, [0.2, 0.7])
    caplog.set_level("WARNING", logger="fedmpq")
    rows = [r for r in results.compare([a0, again, a1, a0], last=1).splitlines() if r.startswith("| fedmpq")]
    assert rows == ["| fedmpq (digits) | 0,1 | 2 | 0.6000 (0.5000..0.7000) | 0.6000 (0.5000..0.7000) | +0.4500 | - | - "
                    "| 0.7000 | - | - | 200 | - |"]
    assert f"{again} is the same setting and seed as {a0}: left out" in caplog.text
    assert caplog.text.count(f"{a0} is the same setting and seed as {a0}") == 1
    caplog.clear()
    assert results.bits_table([a0, again], warn=False) and caplog.text == ""  # compare said it already


def test_compare_reports_train_mode_cost_and_bytes(tmp_path):
    ex = [dict(accuracy_train_mode=t, seconds=s, quant_seconds=q, bytes_down=50, float32_bytes=600)
          for t, s, q in [(0.2, 10.0, 1.0), (0.3, 30.0, 2.0), (0.5, 20.0, 3.0)]]
    a0 = _fake_run(tmp_path / "a0", "fedmpq", 0, [0.1, 0.4, 0.6], extra=ex)
    a1 = _fake_run(tmp_path / "a1", "fedmpq", 1, [0.2, 0.4, 0.8], extra=ex[:2] + [dict(ex[2], accuracy_train_mode=0.7)])
    row = results.compare([a0, a1], last=1).splitlines()[2]
    # train mode: final (0.5, 0.7); trend: (0.6 - 0.4 + 0.8 - 0.4) / 2; median of 10,30,20,10,30,20 = 20 s;
    # quant share 12/120; float32 6*600 against (100 + 50) * 6 bytes: 4x
    assert row == ("| fedmpq (digits) | 0,1 | 3 | 0.7000 (0.6000..0.8000) | 0.7000 (0.6000..0.8000) | +0.3000 | "
                   "0.6000 (0.5000..0.7000) | 0.6000 (0.5000..0.7000) | 0.8000 | 20.0 | 10.0% | 300 | 4.0x |")
    # a run too short for the trend says so instead of comparing with nothing
    assert results.compare([a0], last=2).splitlines()[2].split(" | ")[5] == "-"


def test_bits_table_groups_clients_by_budget(tmp_path, capsys):
    ex = [dict(bits={"0": [8, 2, 2], "1": [8, 4, 2], "2": [8, 4, 4]}, mean_bits={"0": 2.1, "1": 3.0, "2": 4.2})]
    a = _fake_run(tmp_path / "a", "fedmpq", 0, [0.5], extra=ex, budgets=[2, 2, 4], n_clients=3)
    f = _fake_run(tmp_path / "f", "fp", 0, [0.6], budgets=[2, 2, 4], n_clients=3)
    rows = results.bits_table([a, f]).splitlines()[2:]
    assert rows == ["| fedmpq (digits) | 2 | 2 | 2.55 (2.10..3.00) | 8 3 2 |",
                    "| fedmpq (digits) | 4 | 1 | 4.20 | 8 4 4 |"]
    assert cli.main(["compare", a, "--bits"]) == 0
    assert "| fedmpq (digits) | 4 | 1 | 4.20 | 8 4 4 |" in capsys.readouterr().out


def test_plots_are_written_with_matplotlib(tmp_path):
    optional("matplotlib", "plots")
    res = {"config": config.check_config(dict(SMALL)),
           "rounds": [dict(round=r, accuracy=0.1 * r, bits={"0": [2, 4], "1": [8, 8]}, mean_bits={"0": 2.004, "1": 8.0})
                      for r in (1, 2, 3)]}
    results.write_results(res, tmp_path)
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and (tmp_path / "bits.png").stat().st_size > 0
    a0 = _fake_run(tmp_path / "a0", "fedmpq", 0, [0.1, 0.5])
    results.compare([a0], out=str(tmp_path / "cmp.png"))
    assert (tmp_path / "cmp.png").stat().st_size > 0


def test_compare_labels_groups_by_the_keys_they_differ_in(tmp_path):
    a = _fake_run(tmp_path / "a", "fedmpq", 0, [0.5], lr=0.1)
    b = _fake_run(tmp_path / "b", "fedmpq", 0, [0.6], lr=0.25, threads=1)
    c = _fake_run(tmp_path / "c", "fedmpq", 1, [0.7], lr=0.25, device="cpu", threads=2)  # b's setting, another seed
    rows = [r.split(" | ")[0] for r in results.compare([a, b, c]).splitlines()[2:]]
    assert rows == ["| fedmpq (digits), lr=0.1", "| fedmpq (digits), lr=0.25"]


def test_runs_from_before_a_key_group_with_runs_at_its_default(tmp_path):
    """A results file written before ``classifier`` existed is a run with the default."""
    old = _fake_run(tmp_path / "old", "fedmpq", 0, [0.5])
    saved = json.loads((tmp_path / "old" / "results.json").read_text())
    del saved["config"]["classifier"]
    (tmp_path / "old" / "results.json").write_text(json.dumps(saved))
    new = _fake_run(tmp_path / "new", "fedmpq", 1, [0.7])
    flt = _fake_run(tmp_path / "flt", "fedmpq", 2, [0.6], classifier="float")
    rows = [r.split(" | ")[:2] for r in results.compare([old, new, flt]).splitlines()[2:]]
    assert rows == [["| fedmpq (digits), classifier=quantized", "0,1"], ["| fedmpq (digits), classifier=float", "2"]]
    # and a checkpoint from before the key resumes as the default, not as a changed setting
    from fedmpq.federation import resumable
    c = config.check_config(dict(alg="fedmpq"))
    resumable({k: v for k, v in c.items() if k != "classifier"}, c, 0, tmp_path / "checkpoint.pt")
    with pytest.raises(config.ConfigError, match="classifier"):
        resumable({k: v for k, v in c.items() if k != "classifier"}, dict(c, classifier="float"), 0,
                  tmp_path / "checkpoint.pt")


def test_compare_refuses_what_is_not_a_results_file(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text("{half")
    with pytest.raises(config.ConfigError, match="is not a readable results file"):
        results.compare([str(tmp_path / "x")])


def test_compare_takes_the_rounds_every_seed_has_and_the_true_median(tmp_path):
    """A seed that ran longer is cut to the rounds the others have (its 4th round counts
    nowhere); s/round is the median of the rounds' seconds, the mean of the two middle ones
    for an even count: 1, 2, 3, 4, 10, 20 -> 3.5."""
    a0 = _fake_run(tmp_path / "a0", "fedmpq", 0, [0.1, 0.2, 0.3, 0.9],
                   extra=[dict(seconds=s) for s in (1.0, 2.0, 10.0, 99.0)])
    a1 = _fake_run(tmp_path / "a1", "fedmpq", 1, [0.2, 0.4, 0.5], extra=[dict(seconds=s) for s in (3.0, 4.0, 20.0)])
    cells = results.compare([a0, a1], last=1).splitlines()[2].split(" | ")
    assert cells[2] == "3"
    assert cells[3] == "0.4000 (0.3000..0.5000)"  # round 3 of both seeds
    assert cells[8] == "0.5000"  # best over those rounds
    assert cells[9] == "3.5"


def test_rounds_csv_holds_every_rounds_fields(tmp_path):
    """rounds.csv: one row per round with its accuracy (both evaluations), training accuracy,
    bytes and seconds; a field the round lacks is empty."""
    import csv

    rounds = [dict(round=1, accuracy=0.5, accuracy_train_mode=0.25, train_accuracy=0.75, bytes_up=10, bytes_down=20,
                   float32_bytes=300, seconds=1.5, quant_seconds=0.5),
              dict(round=2, accuracy=0.625, bytes_up=11)]
    results.write_results({"config": config.check_config(dict(SMALL)), "rounds": rounds}, tmp_path)
    rows = list(csv.DictReader((tmp_path / "rounds.csv").open()))
    assert len(rows) == 2
    assert {k: float(v) for k, v in rows[0].items()} == {k: float(v) for k, v in rounds[0].items()}
    assert rows[1]["accuracy"] == "0.625" and rows[1]["bytes_up"] == "11"
    assert rows[1]["accuracy_train_mode"] == "" and rows[1]["seconds"] == ""


def test_bits_table_reads_the_last_round(tmp_path):
    """The bits table shows the uploads of the run's last round, not an earlier one."""
    ex = [dict(bits={"0": [8, 8], "1": [8, 8]}, mean_bits={"0": 8.0, "1": 8.0}),
          dict(bits={"0": [2, 4], "1": [2, 2]}, mean_bits={"0": 3.0, "1": 2.0})]
    a = _fake_run(tmp_path / "a", "fedmpq", 0, [0.5, 0.6], extra=ex, budgets=[2, 2], n_clients=2)
    assert results.bits_table([a]).splitlines()[2:] == ["| fedmpq (digits) | 2 | 2 | 2.50 (2.00..3.00) | 2 3 |"]


def test_a_write_cut_off_leaves_the_last_whole_file(tmp_path):
    """Every file of a run's folder is replaced whole: a write that stops halfway (a kill, a
    full disk) leaves the previous file as it was, and a finished one leaves no temporary."""
    res = {"config": config.check_config(dict(SMALL)), "rounds": [dict(round=1, accuracy=0.5)]}
    results.write_results(res, tmp_path, plots=False)
    before = (tmp_path / "results.json").read_bytes()

    def half(p):
        p.write_text('{"config": ')
        raise OSError("No space left on device")
    with pytest.raises(OSError):
        results.replace_whole(tmp_path / "results.json", half)
    assert (tmp_path / "results.json").read_bytes() == before
    results.write_results(dict(res, rounds=res["rounds"] * 2), tmp_path, plots=False)
    assert len(json.loads((tmp_path / "results.json").read_text())["rounds"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # the next write took the cut-off one's place


@pytest.mark.parametrize("plot,msg", [("missing/cmp.png", "No such file or directory"),
                                      ("cmp.xyz", "Format 'xyz' is not supported"),
                                      ("a0", "Is a directory"), ("a0/", "Is a directory")])
def test_a_plot_that_cannot_be_written_gets_one_line(plot, msg, tmp_path, capsys):
    optional("matplotlib", "plots")
    a0 = _fake_run(tmp_path / "a0", "fedmpq", 0, [0.1, 0.5])
    path = f"{tmp_path}/{plot}"  # as typed: a0/ keeps its slash
    assert cli.main(["compare", a0, "--plot", path]) == 2  # was a traceback
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"fedmpq: --plot {path} cannot be written") and msg in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a0", "results.json"]  # nothing else written (a0/.png was)


def test_a_plot_is_written_where_named_whatever_its_suffix(tmp_path):
    optional("matplotlib", "plots")
    a0 = _fake_run(tmp_path / "a0", "fedmpq", 0, [0.1, 0.5])
    assert cli.main(["compare", a0, "--plot", str(tmp_path / "curves")]) == 0
    assert (tmp_path / "curves").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # was curves.png
    assert not (tmp_path / "curves.png").exists()


def test_a_plot_is_written_whole(tmp_path, monkeypatch):
    """The plot is written beside its name and renamed to it: a write that stops half-way
    (a kill, a full disk) leaves no half PNG under its name, and no temporary file. (It was
    renamed over an existing plot; an existing file is now refused: see below.)"""
    optional("matplotlib", "plots")
    import matplotlib.figure

    a0 = _fake_run(tmp_path / "a0", "fedmpq", 0, [0.1, 0.5])
    plot = tmp_path / "cmp.png"
    real_savefig = matplotlib.figure.Figure.savefig

    def half(fig, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half)
    assert cli.main(["compare", a0, "--plot", str(plot)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a0"]
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real_savefig)
    assert cli.main(["compare", a0, "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a0", "cmp.png"]


@pytest.mark.parametrize("target", ["a0/accuracy.png", "cmp.png"])
def test_a_plot_never_writes_over_an_existing_file(target, tmp_path, capsys):
    # --plot run/accuracy.png replaced the run's own plot with the comparison, unsaid
    optional("matplotlib", "plots")
    a0 = _fake_run(tmp_path / "a0", "fedmpq", 0, [0.1, 0.5])
    plot = tmp_path / target
    plot.write_bytes(b"a run's own plot")
    assert cli.main(["compare", a0, "--plot", str(plot)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the table
    assert captured.err.strip() == (f"fedmpq: --plot {plot} already exists; fedmpq compare does not write over a "
                                    f"file: give another path or remove it first"), captured.err
    assert plot.read_bytes() == b"a run's own plot"
    assert not list(tmp_path.rglob("*.tmp"))


def _edit_run(path, edit):
    res = json.loads((path / "results.json").read_text())
    edit(res)
    (path / "results.json").write_text(json.dumps(res))
    return str(path)


def _set(keys, value):
    """An edit of a results dict setting res[keys[0]][keys[1]]... to value."""
    def edit(res):
        d = res
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit,what", [
    (_set(["rounds"], "abc"), "rounds must be a list, got str"),
    (_set(["rounds"], {"a": 1}), "rounds must be a list, got dict"),
    (_set(["rounds"], [1, 2]), "round 1 must be a mapping of fields, got int"),
    (_set(["rounds", 1, "accuracy"], "0.5"), "round 2's accuracy is '0.5', not a number"),
    (_set(["rounds", 0, "accuracy"], True), "round 1's accuracy is True, not a number"),
    (lambda res: res["rounds"][0].pop("accuracy"), "round 1 has no accuracy"),
    (_set(["rounds", 0, "accuracy_train_mode"], "x"), "round 1's accuracy_train_mode is 'x', not a number"),
    (_set(["rounds", 0, "seconds"], "x"), "round 1's seconds is 'x', not a number"),
    (_set(["rounds", 1, "bits"], [8, 8]), "round 2's bits must be a mapping of clients, got list"),
    (_set(["rounds", 1, "bits"], {"a": [8, 8]}), "round 2's bits has client 'a', not a client number"),
    (_set(["rounds", 1, "bits"], {"0": "8,8"}), "round 2's bits of client 0 are '8,8', not a list of numbers"),
    (_set(["rounds", 1, "mean_bits"], {"0": "x"}), "round 2's mean_bits of client 0 is 'x', not a number"),
    (_set(["config", "budgets"], "4,4"), "config budgets is '4,4', not a list of numbers"),
])
@pytest.mark.parametrize("bits", [False, True])
def test_compare_refuses_a_results_file_of_the_wrong_shape_before_printing(edit, what, bits, tmp_path, capsys):
    # each was a traceback (AttributeError, TypeError, ValueError), --bits' after the table had printed
    ex = [dict(bits={"0": [8, 8], "1": [8, 8]}, mean_bits={"0": 8.0, "1": 8.0})] * 2
    a = _edit_run(Path(_fake_run(tmp_path / "a", "fedmpq", 0, [0.5, 0.6], extra=ex, budgets=[2, 2], n_clients=2)),
                  edit)
    assert cli.main(["compare", a] + ["--bits"] * bits) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"fedmpq: {a}/results.json is not a fedmpq results file: {what}\n"


def test_compare_reads_the_runs_fedmpq_simulate_and_flower_write(tmp_path):
    """The shape check takes what fedmpq writes: bits and mean_bits per client, null fields,
    float byte counts, no bits at all (fp)."""
    ex = [dict(bits={"0": [8, 2], "1": [4, 4]}, mean_bits={"0": 3.1, "1": 4.0}, assigned_mean_bits={"0": 2.0},
               accuracy_train_mode=None, seconds=1.5, quant_seconds=0.5, reported=[0, 1], aggregated=[0, 1],
               threads=1)]
    a = _fake_run(tmp_path / "a", "fedmpq", 0, [0.5], up=10.0, extra=ex, budgets=[2, 4], n_clients=2)
    f = _fake_run(tmp_path / "f", "fp", 0, [0.5], extra=[dict(bits={}, mean_bits={})], budgets=[2, 4], n_clients=2)
    assert len(results.compare([a, f]).splitlines()) == 4
    assert results.bits_table([a, f]).splitlines()[2:] == ["| fedmpq (digits) | 2 | 1 | 3.10 | 8 2 |",
                                                          "| fedmpq (digits) | 4 | 1 | 4.00 | 4 4 |"]


def test_compare_given_a_results_file_names_its_folder(tmp_path, capsys):
    # was "a0/results.json/results.json does not exist"
    a0 = _fake_run(tmp_path / "a0", "fedmpq", 0, [0.1, 0.5])
    given = f"{a0}/results.json"
    assert cli.main(["compare", given]) == 2
    assert capsys.readouterr().err.strip() == (f"fedmpq: {given} is a file, not a run folder: give the folder "
                                               f"holding results.json ({a0})")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").mkdir()
    with pytest.raises(config.ConfigError, match=f"{tmp_path}/b/results.json is not a file"):
        results.compare([str(tmp_path / "b")])


def test_compare_header_names_the_rounds_it_averaged(tmp_path):
    # a 1-round run's header said "mean of last 5", its value the mean of 1 round
    short = _fake_run(tmp_path / "short", "fedmpq", 0, [0.2])
    long = _fake_run(tmp_path / "long", "aqfl", 0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    header = results.compare([short]).splitlines()[0]
    assert "| mean of last 1 |" in header and "| mean of last 1, train mode |" in header
    assert "last 5" not in header
    header = results.compare([long]).splitlines()[0]
    assert "| mean of last 5 |" in header and "| mean of last 5, train mode |" in header
    header = results.compare([short, long]).splitlines()[0]  # groups of different lengths
    assert "| mean of last min(5, rounds) |" in header and "| mean of last min(5, rounds), train mode |" in header
    assert "| mean of last 3 |" in results.compare([long], last=3).splitlines()[0]


def test_a_plot_without_matplotlib_is_refused_not_skipped(tmp_path, capsys, monkeypatch):
    a0 = _fake_run(tmp_path / "a0", "fedmpq", 0, [0.1, 0.5])
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib raises ImportError
    plot = tmp_path / "cmp.png"
    assert cli.main(["compare", a0, "--plot", str(plot)]) == 2  # was status 0, the table, and no plot
    err = capsys.readouterr().err.strip()
    assert err == f'fedmpq: --plot {plot} needs matplotlib: pip install -e ".[plots]"'
    assert not plot.exists()
