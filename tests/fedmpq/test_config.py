"""The configuration's checks: a bad key or value stops before training, with one line."""
from __future__ import annotations

import json

import pytest

from fedmpq import cli, config
from tests.extras import optional

SMALL = dict(dataset="digits", n_clients=3, budgets=[2, 4, 8], rounds=2, local_epochs=1, batch_size=64, alpha=0.5)


@pytest.mark.parametrize("bad,msg", [
    (dict(bogus=1), "unknown config key 'bogus'"),
    (dict(budgets=[2, 4, 9]), "every budget must be in 1..8"),
    (dict(budgets=[2, 4]), "one budget per client"),
    (dict(alpha=0.0), "alpha must be a finite number > 0"),
    (dict(alg="sgd"), "alg must be one of"),
    (dict(rounds=0), "rounds must be an integer >= 1"),
    (dict(n_clients=10 ** 10, budgets=4), "n_clients must be an integer in 1..100000"),  # was out of memory
    (dict(dataset="mnist"), "dataset must be one of"),
    (dict(scale_lr="adam"), "scale_lr must be one of"),
    (dict(momentum="0.9"), "momentum must be a number in \\[0, 1\\)"),
    (dict(sampling_rate="1"), "sampling_rate must be a number in \\(0, 1\\]"),
    (dict(sampling_rate=0), "sampling_rate must be a number in \\(0, 1\\]"),
    (dict(sampling_rate=1.5), "sampling_rate must be a number in \\(0, 1\\]"),
    (dict(momentum=1), "momentum must be a number in \\[0, 1\\)"),
    (dict(lr=0), "lr must be a finite number > 0"),
    # float32 holds them as inf, 0 and 1: the bit-plane kernels refused them at the first step
    (dict(lr=1e39), "lr must be a finite number > 0 that float32 holds"),
    (dict(lr=1e-46), "lr must be a finite number > 0 that float32 holds"),
    (dict(momentum=0.99999999), r"momentum must be a number in \[0, 1\) \(below 1 - 2\*\*-25"),
    (dict(seed=-5), "seed must be an integer >= 0"),
    (dict(seed=1.5), "seed must be an integer >= 0"),
    (dict(alpha=float("inf")), "alpha must be a finite number > 0"),
    (dict(alpha=True), "alpha must be a finite number > 0"),
    (dict(budgets=[2, 4, float("nan")]), "every budget must be in 1..8"),
    (dict(train_samples=0), "train_samples must be an integer >= 1"),
    (dict(threads=0), "threads must be an integer in 1..4096"),
    (dict(threads=4294967297), "threads must be an integer in 1..4096, or null for the default, got 4294967297"),
    (dict(device="gpu"), "device must be cpu, cuda or cuda:N"),
    (dict(cuda_graph="yes"), "cuda_graph must be true or false"),
    (dict(cuda_graph=1), "cuda_graph must be true or false"),
    (dict(cuda_graph=True), "cuda_graph needs a CUDA device .* got device cpu"),
    (dict(aggregation="max"), "aggregation must be one of mean, median, trimmed_mean"),
    (dict(act_bits=True), "act_bits must be 1..8 or 16"),
    (dict(classifier="fp32"), "classifier must be one of quantized, float"),
    (dict(classifier=False), "classifier must be one of quantized, float"),
])
def test_bad_configs_stop_before_training_with_one_line(bad, msg, capsys):
    with pytest.raises(config.ConfigError, match=msg):
        config.check_config(dict(SMALL, **bad))
    args = []
    for k, v in bad.items():
        args += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    choice_keys = ("alg", "dataset", "scale_lr", "device", "aggregation", "classifier")
    if "bogus" in bad or any(isinstance(v, (str, bool)) for v in bad.values()) and not any(
            k in bad and isinstance(bad[k], str) for k in choice_keys):
        return  # a JSON-only mistake (a string or bool where a number belongs): the flag parses its text
    assert cli.main(["simulate", "--n-clients", "3", "--budgets", "2,4,8"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedmpq: ")


@pytest.mark.parametrize("flag,value,names", [
    ("--seed", "abc", "seed"), ("--seed", "1.5", "seed"), ("--seed", "-5", "seed must be an integer >= 0"),
    ("--alpha", "inf", "alpha must be a finite number > 0"), ("--budgets", "nan,4,8", "budgets: average-bit budget per client"),
    ("--budgets", "2,x,8", "budgets"), ("--rounds", "two", "rounds"), ("--lr", "fast", "lr"),
    ("--threads", "many", "threads"), ("--train-samples", "0", "train_samples must be an integer >= 1"),
    ("--cuda-graph", "maybe", "cuda_graph"), ("--cuda-graph", "true", "cuda_graph needs a CUDA device"),
])
def test_a_bad_flag_gets_one_line_naming_it(flag, value, names, capsys, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["simulate", "--n-clients", "3", "--budgets", "2,4,8", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedmpq: ") and names in err, err
    assert "parse_" not in err and "Traceback" not in err
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("name,content,msg", [
    ("bad.yaml", b"alg: [fedmpq\n", "is not valid YAML at line"),
    ("empty.json", b"", "is not valid JSON"),
    ("latin1.json", '{"alg": "fédmpq"}'.encode("latin-1"), "is not UTF-8 text"),
    ("list.json", b"[1, 2]", "must hold a mapping of config keys, got list"),
    ("momentum.json", b'{"momentum": "0.9"}', "momentum must be a number"),
    ("alpha.json", b'{"alpha": true}', "alpha must be a finite number > 0"),
    ("seed.json", b'{"seed": -5}', "seed must be an integer >= 0"),
    ("null.json", b'{"lr": null}', "lr must not be null (leave the key out for its default, 0.1)"),  # ran with 0.1
    ("blank.yaml", b"rounds: 2\nbudgets:\n", "budgets must not be null"),
])
def test_a_bad_config_file_gets_one_line_naming_it(name, content, msg, tmp_path, capsys):
    if name.endswith(".yaml"):
        optional("yaml", "plots")  # PyYAML comes with the plots extra
    f = tmp_path / name
    f.write_bytes(content)
    out = tmp_path / "run"
    assert cli.main(["simulate", "--config", str(f), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and msg in err, err
    assert not out.exists()


def test_a_config_path_that_is_a_directory_says_so(tmp_path, capsys):
    assert cli.main(["simulate", "--config", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"fedmpq: config file {tmp_path} is a directory"


def test_the_help_describes_every_option_with_its_default(capsys):
    assert cli.main(["simulate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for k, v in config.DEFAULTS.items():
        assert f"--{k.replace('_', '-')} {k.upper()} {' '.join(config.HELP[k].split())}" in text, k
    assert "(default: fedmpq)" in text and "(default: 2,2,4,4,4,6,6,6,8,8)" in text


@pytest.mark.parametrize("text,value", [("true", True), ("False", False), ("on", True), ("0", False), ("YES", True)])
def test_cuda_graph_flag_reads_true_and_false(text, value):
    assert config.parse_bool("cuda_graph")(text) is value
    ns = cli._Parser()
    cli._config_flags(ns)
    assert ns.parse_args(["--cuda-graph", text]).cuda_graph is value
    c = config.check_config(dict(SMALL, device="cuda", cuda_graph=value))  # checked, not resolved: no GPU needed
    assert c["cuda_graph"] is value and config.train_config(c).cuda_graph is value
    assert "cuda_graph" in config.EXECUTION_KEYS  # the same experiment with and without


@pytest.mark.parametrize("fmt,device,size,want", [
    ("auto", "cpu", 32, True), ("auto", "cpu", 28, True), ("auto", "cpu", 16, True), ("auto", "cpu", 8, False),
    ("auto", "cuda", 32, False), ("auto", "cuda:1", 32, False), ("channels_last", "cuda", 8, True),
    ("contiguous", "cpu", 32, False)])
def test_memory_format_picks_the_models_layout(fmt, device, size, want):
    """auto: channels-last on the CPU from 16x16 images up (the 8x8 digits' steps are slower
    so), contiguous on CUDA; the model builder gives the models that layout."""
    from fedmpq.data import load

    c = config.check_config(dict(SMALL, memory_format=fmt, device=device))  # checked, not resolved: no GPU needed
    assert config.channels_last(c, size) is want
    digits = load("digits")
    build = config.model_builder(c, digits)
    assert build(quantized=True, bits=4).channels_last is config.channels_last(c, digits.image_size)
    assert build(quantized=False).channels_last is config.channels_last(c, digits.image_size)
    assert "memory_format" in config.EXECUTION_KEYS  # how fast, not what: the same experiment
    ns = cli._Parser()
    cli._config_flags(ns)
    assert ns.parse_args(["--memory-format", fmt]).memory_format == fmt


@pytest.mark.parametrize("bad", ["channels-last", "NHWC", "", True, None])
def test_memory_format_refuses_what_it_does_not_know(bad):
    with pytest.raises(config.ConfigError, match="memory_format"):
        config.check_config(dict(SMALL, memory_format=bad))


def test_a_config_saved_before_memory_format_ran_contiguous():
    """A run saved before the key existed ran contiguous: with_defaults gives it that, not the
    new runs' auto."""
    assert config.DEFAULTS["memory_format"] == "auto"
    saved = {k: v for k, v in config.check_config(dict(SMALL)).items() if k != "memory_format"}
    assert config.with_defaults(saved)["memory_format"] == "contiguous"
    assert config.with_defaults(dict(saved, memory_format="auto"))["memory_format"] == "auto"


@pytest.mark.parametrize("visible, named", [("", True), (None, False), ("0", False)])
def test_no_cuda_names_an_empty_cuda_visible_devices(visible, named, monkeypatch):
    # An empty CUDA_VISIBLE_DEVICES (what Ray gives a worker that asked for no GPU) is why a
    # GPU machine's ClientApp sees none: the refusal says so and how to undo it.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(config.ConfigError, match="sees no CUDA device") as e:
        config.resolve_device(config.check_config({**SMALL, "device": "cuda"}))
    assert ("CUDA_VISIBLE_DEVICES is empty" in str(e.value)) == named
    assert "\n" not in str(e.value)


def test_one_budget_for_all_clients():
    """A single number as budgets is every client's budget (one list entry per client)."""
    assert config.check_config(dict(SMALL, budgets=4))["budgets"] == [4, 4, 4]
    assert config.check_config(dict(SMALL, budgets=2.5))["budgets"] == [2.5, 2.5, 2.5]
    # the flag's and Flower's form: "4" parses to [4], which is one for all as well
    assert config.check_config(dict(SMALL, budgets=config.parse_budgets("4")))["budgets"] == [4, 4, 4]
    with pytest.raises(config.ConfigError, match="one budget per client"):
        config.check_config(dict(SMALL, budgets=[2, 4]))


def test_budgets_from_1_to_8_inclusive_and_no_bools():
    assert config.check_config(dict(SMALL, budgets=[1, 4.5, 8]))["budgets"] == [1, 4.5, 8]
    for bad in ([0.99, 4, 8], [True, 4, 8]):
        with pytest.raises(config.ConfigError, match="every budget must be in 1..8"):
            config.check_config(dict(SMALL, budgets=bad))


@pytest.mark.parametrize("key", ["lambda", "threshold", "weight_decay"])
def test_zero_is_a_valid_lambda_threshold_and_weight_decay(key):
    """lambda = 0: no regularizer; threshold = 0: prune only empty planes; weight decay 0."""
    assert config.check_config(dict(SMALL, **{key: 0}))[key] == 0
    rule = "a percent in \\[0, 100\\)" if key == "threshold" else "a finite number >= 0"
    with pytest.raises(config.ConfigError, match=f"{key} must be {rule}"):
        config.check_config(dict(SMALL, **{key: -0.1}))


@pytest.mark.parametrize("key, bad, rule", [
    # float32 holds them as inf: every bit-plane step skipped silently (lambda), torch's refusal
    # in every client naming no key (weight_decay)
    ("lambda", 1e39, "a finite number >= 0 that float32 holds"),
    ("weight_decay", 1e39, "a finite number >= 0 that float32 holds"),
    # from 100 % up every plane is at or below the threshold: every layer pruned to 1 bit, unsaid
    ("threshold", 100, r"a percent in \[0, 100\)"),
    ("threshold", 1e300, r"a percent in \[0, 100\)"),
])
def test_values_that_trained_nothing_silently_are_refused(key, bad, rule):
    with pytest.raises(config.ConfigError, match=f"{key} must be {rule}"):
        config.check_config(dict(SMALL, **{key: bad}))
    assert config.check_config(dict(SMALL, **{key: 99.5 if key == "threshold" else 3.4e38}))[key] > 0


def test_momentum_zero_is_valid_and_negative_is_not():
    assert config.check_config(dict(SMALL, momentum=0))["momentum"] == 0
    with pytest.raises(config.ConfigError, match=r"momentum must be a number in \[0, 1\)"):
        config.check_config(dict(SMALL, momentum=-0.1))


@pytest.mark.parametrize("bad, msg", [
    (dict(seed=2**63), "seed must be an integer >= 0"),
    (dict(seed=2**32), "seed must be an integer >= 0, at most 4294967295"),
    (dict(device="cpux"), "device must be cpu, cuda or cuda:N"),
    (dict(device="cuda:0x"), "device must be cpu, cuda or cuda:N"),
    (dict(data_dir=5), "data_dir must be a folder path"),
])
def test_more_bad_values_are_refused(bad, msg):
    with pytest.raises(config.ConfigError, match=msg):
        config.check_config(dict(SMALL, **bad))


def test_alpha_none_is_an_iid_split_not_the_default():
    assert config.check_config(dict(SMALL, alpha=None))["alpha"] is None
    assert config.check_config({k: v for k, v in SMALL.items() if k != "alpha"})["alpha"] == 0.5


def test_the_defaults_are_the_papers():
    """ALGORITHM.md: lambda 1e-3, theta 2.0 %, momentum 0.9, 4-bit activations on clients, the
    authors' unweighted mean, budgets [2,2,4,4,4,6,6,6,8,8] over 10 clients."""
    d = config.DEFAULTS
    assert (d["lambda"], d["threshold"], d["momentum"], d["act_bits"], d["aggregation"]) == (1e-3, 2.0, 0.9, 4, "mean")
    assert d["budgets"] == [2, 2, 4, 4, 4, 6, 6, 6, 8, 8] and d["n_clients"] == 10
    t = config.train_config(config.check_config({}))
    assert (t.lam, t.threshold, t.momentum) == (1e-3, 2.0, 0.9)


def test_train_config_takes_every_key_from_its_own_config_key():
    c = config.check_config(dict(SMALL, alg="aqfl", lr=0.05, momentum=0.5, weight_decay=1e-3, threshold=7.0,
                                 local_epochs=3, batch_size=16, seed=4, scale_lr="sgd", **{"lambda": 3e-3}))
    t = config.train_config(c)
    assert (t.alg, t.lr, t.momentum, t.weight_decay, t.lam, t.threshold) == ("aqfl", 0.05, 0.5, 1e-3, 3e-3, 7.0)
    assert (t.local_epochs, t.batch_size, t.seed, t.scale_lr, t.device, t.cuda_graph) == (3, 16, 4, "sgd", "cpu", False)


def test_a_yaml_config_reads_exponents_without_a_dot_as_numbers(tmp_path):
    # PyYAML's YAML 1.1 took lambda: 1e-3 (the default's own spelling) for a string, and the run was refused
    optional("yaml", "plots")
    f = tmp_path / "c.yaml"
    f.write_text("lambda: 1e-3\nweight_decay: 5E-4\nlr: 1.0e-1\nthreshold: 2\nalg: fedmpq\n")
    cfg = config.load_config_file(str(f))
    assert cfg == {"lambda": 1e-3, "weight_decay": 5e-4, "lr": 0.1, "threshold": 2, "alg": "fedmpq"}
    assert config.check_config(cfg)["lambda"] == 1e-3


@pytest.mark.parametrize("text,budgets", [("2,4,8", [2, 4, 8]), ("4", [4, 4, 4]), (" 2, 2.5 ,8", [2, 2.5, 8])])
def test_a_config_file_takes_budgets_as_the_flag_does(text, budgets):
    # a file's "budgets": "2,4,8" was refused as 'budgets must list one budget per client (3)'
    assert config.check_config(dict(SMALL, budgets=text))["budgets"] == budgets


def test_budgets_text_that_is_not_numbers_is_named():
    with pytest.raises(config.ConfigError, match="budgets must be comma-separated numbers, got '2,x,8'"):
        config.check_config(dict(SMALL, budgets="2,x,8"))


def test_a_whole_float_act_bits_is_recorded_as_an_integer(tmp_path):
    # a file's act_bits 4.0 was kept as 4.0: fedmpq compare showed it apart from the same run at 4
    c = config.check_config(dict(SMALL, act_bits=4.0))
    assert c["act_bits"] == 4 and type(c["act_bits"]) is int
    with pytest.raises(config.ConfigError, match="act_bits must be 1..8 or 16"):
        config.check_config(dict(SMALL, act_bits=4.5))


def test_whole_float_budgets_are_recorded_as_integers():
    # budgets 4.0 and 4 are one setting (fedmpq compare groups by the recorded config)
    for given in ([2.0, 4.0, 8], "2.0,4,8.0", [2, 4, 8]):
        c = config.check_config(dict(SMALL, budgets=given))
        assert c["budgets"] == [2, 4, 8] and all(type(b) is int for b in c["budgets"])
    assert config.check_config(dict(SMALL, budgets=[2.5, 4, 8.0]))["budgets"] == [2.5, 4, 8]


def test_the_largest_seed_runs_and_a_larger_one_stops_before_training(tmp_path, capsys):
    from fedmpq import cli, federation

    c = config.check_config(dict(SMALL, seed=config.MAX_SEED, sampling_rate=0.5))
    assert len(federation.sample_clients(c, 10**6)) == 2  # its sampling seed fits torch's
    out = tmp_path / "o"
    # 2^63 - 1 passed the check, then the first round's sampling ended in a traceback (exit 1)
    assert cli.main(["simulate", "-q", "--seed", str(2**63 - 1), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"fedmpq: seed must be an integer >= 0, at most {config.MAX_SEED}, got {2**63 - 1}\n"
    assert not out.exists()


def test_whole_number_float_keys_are_recorded_as_floats(tmp_path):
    # a file's "sampling_rate": 1 and the default (or the flag's) 1.0 are one setting: fedmpq
    # compare groups by the recorded config, and showed them as two (sampling_rate=1 and =1.0)
    from fedmpq import results

    keys = dict(alpha=1, sampling_rate=1, lr=1, momentum=0, threshold=2, weight_decay=0, **{"lambda": 0})
    (tmp_path / "c.json").write_text(json.dumps(keys))
    c = config.check_config(config.load_config_file(str(tmp_path / "c.json")))
    assert all(type(c[k]) is float and c[k] == v for k, v in keys.items())
    same = config.check_config({k: float(v) for k, v in keys.items()})
    assert results._group_key(c) == results._group_key(same)
    assert results._group_key(config.check_config(dict(sampling_rate=1))) == results._group_key(config.check_config({}))


@pytest.mark.parametrize("keys,says", [
    # every class on a client or two: 70-odd of 100 clients get nothing, in draw after draw
    (dict(alpha=0.01, n_clients=100), "each of the first 20 draws left"),
    # more clients than 10 samples each allow
    (dict(alpha=0.5, n_clients=200), "n_clients=200 clients of at least 10 samples each need 2000"),
    # a subset of the training set: raising it is advice too (20 clients: 5 to 11 short per
    # draw, all 1000 drawn; 30 left 17 on average and stops after 20 draws)
    (dict(alpha=0.01, n_clients=20, train_samples=500), "none of 1000 draws did"),
])
def test_a_split_that_cannot_be_made_names_the_keys_that_change_it(keys, says, tmp_path, capsys):
    """It named min_size, which no config key or flag sets ("raise alpha, or lower min_size
    or n_clients"), after a minute of silent draws where the clients were thousands."""
    c = config.check_config(dict(SMALL, budgets=4, **keys))
    with pytest.raises(config.ConfigError, match=says) as e:
        config.load_data(c)
    msg = str(e.value)
    assert "min_size" not in msg and "--n-clients" in msg
    assert ("--alpha" in msg) == ("alpha" in keys and keys["n_clients"] * 10 <= 1438)
    assert ("--train-samples" in msg) == ("train_samples" in keys)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in keys.items()]
    assert cli.main(["simulate", "-q", "--budgets", "4", "--out", str(tmp_path / "o")] + args) == 2
    assert capsys.readouterr().err == f"fedmpq: {msg}\n"
    assert not (tmp_path / "o").exists()


# Flags of a run that ends in seconds, should a refusal below regress into a run
TINY = ["--rounds", "1", "--local-epochs", "1", "--train-samples", "100", "--threads", "1"]


@pytest.mark.parametrize("text", ["2.5 4", "4 4", "2,4 8"])
def test_budgets_with_a_space_inside_a_number_are_refused(text, tmp_path, capsys):
    # "2.5 4" ran as the single budget 2.54 (and "4 4" was refused as 44, a value nobody typed)
    with pytest.raises(config.ConfigError, match="budgets must be comma-separated numbers, got .* holds a space"):
        config.parse_budgets(text)
    with pytest.raises(config.ConfigError, match="holds a space"):  # a config file's string too
        config.check_config(dict(SMALL, n_clients=2, budgets=text))
    out = tmp_path / "run"
    assert cli.main(["simulate", "-q", "--n-clients", "2", "--budgets", text, "--out", str(out)] + TINY) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and repr(text) in err and "comma-separated" in err, err
    assert not out.exists()
    assert config.parse_budgets(" 2 , 4,\t8 ") == [2, 4, 8]  # spaces beside a comma stay allowed


@pytest.mark.parametrize("text", ["4,,8", "4,8,", ",4", " , "])
def test_an_empty_place_in_the_budgets_is_refused(text):
    """"4,,8" was read as 4,8: a budget left out (n_clients 2 then ran with budgets the
    user had not typed)."""
    with pytest.raises(config.ConfigError, match="an empty place in the list"):
        config.parse_budgets(text)


def test_an_empty_alpha_is_refused_not_taken_for_iid(tmp_path, capsys):
    # --alpha "$A" with A unset ran an iid split, another experiment than the default Dirichlet(0.5)
    for text in ("", "  "):
        with pytest.raises(config.ConfigError, match="alpha must be a number or iid"):
            config.parse_alpha(text)
        with pytest.raises(config.ConfigError, match="alpha must be a finite number > 0"):
            config.check_config(dict(SMALL, alpha=text))  # a config file's "alpha": ""
    out = tmp_path / "run"
    assert cli.main(["simulate", "-q", "--alpha", "", "--out", str(out), "--n-clients", "3", "--budgets", "4"] + TINY) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "alpha" in err and not out.exists(), err
    for word in ("iid", "None", "null"):  # the explicit words still mean iid
        assert config.parse_alpha(word) is None and config.check_config(dict(SMALL, alpha=word))["alpha"] is None


@pytest.mark.parametrize("device", ["cuda:007", "cuda:00", "cuda:99999999999999999999", "cuda:\u0663", "cuda:128",
                                    "cuda:9999"])
def test_a_device_torch_would_refuse_or_wrap_is_refused_in_one_line(device, tmp_path, capsys):
    # torch raised "Invalid device string" (a traceback from resolve_device), or kept the index in
    # 8 bits (cuda:9999 became cuda:15)
    with pytest.raises(config.ConfigError, match="device must be cpu, cuda or cuda:N"):
        config.check_config(dict(SMALL, device=device))
    assert config.check_config(dict(SMALL, device="cuda:127"))["device"] == "cuda:127"
    assert config.check_config(dict(SMALL, device="cuda:10"))["device"] == "cuda:10"
    for cmd in ("simulate", "flower"):
        if cmd == "flower":
            optional("flwr", "flower")  # fedmpq flower without Flower stops before the config
        assert cli.main([cmd, "--device", device, "--n-clients", "3", "--budgets", "4", "--out",
                         str(tmp_path / cmd)] + TINY) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "device must be cpu, cuda or cuda:N" in err and repr(device) in err, (cmd, err)
        assert not (tmp_path / cmd).exists()


def test_resolve_device_turns_what_torch_refuses_into_one_line():
    # what slips past check_config (a config not checked by it) is still not a traceback
    with pytest.raises(config.ConfigError, match="device must be cpu, cuda or cuda:N, got 'cuda:007'"):
        config.resolve_device(dict(device="cuda:007"))


@pytest.mark.parametrize("name", ["c.YAML", "c.Yml", "c.yml"])
def test_a_yaml_suffix_in_any_case_is_read_as_yaml(name, tmp_path):
    optional("yaml", "plots")
    f = tmp_path / name
    f.write_text("rounds: 1\nn_clients: 2\n")
    assert config.load_config_file(str(f)) == {"rounds": 1, "n_clients": 2}  # was "not valid JSON"
    j = tmp_path / "c.JSON"
    j.write_text('{"rounds": 1}')
    assert config.load_config_file(str(j)) == {"rounds": 1}


@pytest.mark.parametrize("name", ["c.toml", "c.txt", "c.cfg"])
def test_a_config_file_of_another_suffix_is_refused_by_its_suffix(name, tmp_path, capsys):
    f = tmp_path / name
    f.write_text("rounds = 1\n")
    out = tmp_path / "run"
    assert cli.main(["simulate", "--config", str(f), "--out", str(out)] + TINY) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedmpq: config file {f}: config files must be YAML (.yaml/.yml) or JSON (.json), "
                   f"got suffix {f.suffix!r}"), err
    assert not out.exists()


def test_a_config_file_without_a_suffix_is_read_as_json_and_says_so(tmp_path):
    f = tmp_path / "settings"  # also what --config <(...) gives: /dev/fd/63
    f.write_text('{"rounds": 1}')
    assert config.load_config_file(str(f)) == {"rounds": 1}
    f.write_text("rounds: 1\n")
    with pytest.raises(config.ConfigError, match="is not valid JSON .*without a suffix is read as JSON"):
        config.load_config_file(str(f))


@pytest.mark.parametrize("name,content,line", [
    ("dup.json", '{"n_clients": 2, "rounds": 1, "rounds": 2}', ""),
    ("nested.json", '{"budgets": [4], "rounds": 1, "extra": {"a": 1, "a": 2}}', ""),
    ("dup.yaml", "rounds: 1\nn_clients: 2\nrounds: 2\n", " (line 3)"),
])
def test_a_key_given_twice_in_a_config_file_is_refused_by_name(name, content, line, tmp_path, capsys):
    # json and PyYAML kept the last one unsaid: rounds 1 then rounds 2 ran 2 rounds
    if name.endswith(".yaml"):
        optional("yaml", "plots")
    f = tmp_path / name
    f.write_text(content)
    key = "a" if name == "nested.json" else "rounds"
    with pytest.raises(config.ConfigError) as e:
        config.load_config_file(str(f))
    assert str(e.value) == f"config file {f}: key {key!r} given twice{line}"
    out = tmp_path / "run"
    assert cli.main(["simulate", "--config", str(f), "--out", str(out)] + TINY) == 2
    assert capsys.readouterr().err.strip() == f"fedmpq: config file {f}: key {key!r} given twice{line}"
    assert not out.exists()


def test_a_yaml_merge_key_may_still_be_overridden(tmp_path):
    optional("yaml", "plots")
    f = tmp_path / "m.yaml"
    f.write_text("base: &b {a: 1, c: 3}\nx:\n  <<: *b\n  a: 2\n")
    assert config.load_config_file(str(f)) == {"base": {"a": 1, "c": 3}, "x": {"a": 2, "c": 3}}


@pytest.mark.parametrize("where", ["flag", "file"])
def test_a_data_dir_for_digits_is_refused_not_ignored(where, tmp_path, capsys):
    # digits ships with scikit-learn: --data-dir /typo was accepted, recorded and ignored
    with pytest.raises(config.ConfigError, match="data_dir is read only for fashion-mnist, cifar10, cifar100; "
                                                 "dataset digits ships with scikit-learn"):
        config.check_config(dict(SMALL, data_dir="/nonexistent/typo"))
    out = tmp_path / "run"
    argv = ["simulate", "-q", "--out", str(out), "--n-clients", "3", "--budgets", "4"] + TINY
    if where == "flag":
        argv += ["--data-dir", "/nonexistent/typo"]
    else:
        f = tmp_path / "c.json"
        f.write_text(json.dumps({"data_dir": "/nonexistent/typo"}))
        argv += ["--config", str(f)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'/nonexistent/typo'" in err and "digits" in err, err
    assert not out.exists()
    for none in (None, "", "none"):  # no folder given is fine (Flower's data-dir = "")
        assert config.check_config(dict(SMALL, data_dir=none))["data_dir"] is None
    assert config.check_config(dict(SMALL, dataset="cifar10", data_dir="/d"))["data_dir"] == "/d"
