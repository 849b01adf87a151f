"""The configuration's checks: a bad key or value stops before training, with one line."""
from __future__ import annotations

import pytest

from fedmpq import cli, config

SMALL = dict(dataset="digits", n_clients=3, budgets=[2, 4, 8], rounds=2, local_epochs=1, batch_size=64, alpha=0.5)


@pytest.mark.parametrize("bad,msg", [
    (dict(bogus=1), "unknown config key 'bogus'"),
    (dict(budgets=[2, 4, 9]), "every budget must be in 1..8"),
    (dict(budgets=[2, 4]), "one budget per client"),
    (dict(alpha=0.0), "alpha must be > 0"),
    (dict(alg="sgd"), "alg must be one of"),
    (dict(rounds=0), "rounds must be an integer >= 1"),
    (dict(dataset="mnist"), "dataset must be one of"),
    (dict(scale_lr="adam"), "scale_lr must be one of"),
])
def test_bad_configs_stop_before_training_with_one_line(bad, msg, capsys):
    with pytest.raises(config.ConfigError, match=msg):
        config.check_config(dict(SMALL, **bad))
    args = []
    for k, v in bad.items():
        args += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    if "bogus" in bad:
        return  # not a flag: argparse itself refuses it
    assert cli.main(["simulate", "--n-clients", "3", "--budgets", "2,4,8"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedmpq: ")
