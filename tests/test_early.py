"""tests/early.py, the suite's own machinery for slow children: a job's value or exception
reaches every test that takes it, a job nobody started runs where it is asked for, a job that
needs another on the runner's thread runs it there (no deadlock), a key belongs to one module,
and the session's end kills the children still running. Each test has a Runner of its own,
not the session's."""
from __future__ import annotations

import signal
import sys
import threading
import time

import pytest

from tests import early


def test_a_jobs_value_or_exception_reaches_every_test_that_takes_it():
    runner, runs = early.Runner(), []

    @early.job("test_early:value")
    def _value():
        runs.append(threading.current_thread().name)
        return runner.run([sys.executable, "-c", "print('from the child')"], timeout=60)

    @early.job("test_early:error")
    def _error():
        raise ValueError("the job's own error")

    @early.job("test_early:skip")
    def _skip():
        pytest.skip("the job's reason")

    runner.start(["test_early:value", "test_early:error", "test_early:skip"])
    res = runner.result("test_early:value")
    assert res.returncode == 0 and res.stdout == "from the child\n"
    assert runner.result("test_early:value") is res and runs == ["tests.early"]  # once, on the runner
    for _ in range(2):
        with pytest.raises(ValueError, match="the job's own error"):
            runner.result("test_early:error")
        with pytest.raises(pytest.skip.Exception, match="the job's reason"):
            runner.result("test_early:skip")


def test_a_job_nobody_started_runs_where_it_is_asked_for_and_one_job_may_take_another():
    runner, seen = early.Runner(), []

    @early.job("test_early:inline")
    def _inline():
        seen.append(threading.current_thread() is threading.main_thread())
        return 7

    assert runner.result("test_early:inline") == 7 and seen == [True]

    # "outer" runs first on the runner and takes "inner", queued after it on the same thread
    calls = []

    @early.job("test_early:inner")
    def _inner():
        calls.append("inner")
        return 5

    @early.job("test_early:outer")
    def _outer():
        calls.append("outer")
        return runner.result("test_early:inner") + 1

    runner.start(["test_early:outer", "test_early:inner"])
    assert runner.result("test_early:outer") == 6 and runner.result("test_early:inner") == 5
    assert calls == ["outer", "inner"]
    with pytest.raises(KeyError, match="no early job 'test_early:unknown'"):
        runner.result("test_early:unknown")


def test_a_key_belongs_to_one_module():
    early.job("test_early:owned")(lambda: 1)
    early.job("test_early:owned")(lambda: 2)  # the same module again (a re-import) may
    with pytest.raises(ValueError, match="'test_early:owned' is registered by tests.test_early and by elsewhere"):
        exec("early.job('test_early:owned')(lambda: 3)", {"early": early, "__name__": "elsewhere"})


def test_the_sessions_end_kills_the_children_still_running():
    runner = early.Runner()

    @early.job("test_early:sleeper")
    def _sleeper():
        return runner.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=120)

    @early.job("test_early:after")
    def _after():
        return "ran"

    t0 = time.monotonic()
    thread = runner.start(["test_early:sleeper", "test_early:after"])
    while not runner._live:
        assert time.monotonic() - t0 < 30, "the child did not start"
        time.sleep(0.01)
    runner.stop()
    res = runner.result("test_early:sleeper")
    assert res.returncode == -signal.SIGKILL and time.monotonic() - t0 < 30
    with pytest.raises(RuntimeError, match="the test session has ended"):
        runner.run([sys.executable, "-c", "pass"], timeout=10)
    thread.join(30)
    assert not thread.is_alive() and "test_early:after" not in runner._state  # not begun after the stop


def test_a_jobs_children_get_the_environment_of_the_sessions_start_not_a_running_tests(monkeypatch):
    """os.environ is the process's: a job started while a test had set a variable (the trainer
    registry's folder of tests/fedmpq, say) passed it to its children, and a federation child
    on the stand-in device registered as a trainer beside test_flower's runs, which then
    trained with half the threads."""
    runner, go = early.Runner(), threading.Event()

    @early.job("test_early:env")
    def _env():
        go.wait(30)
        return runner.run([sys.executable, "-c", "import os; print(os.environ.get('FEDMPQ_EARLY_PROBE'))"],
                          timeout=60).stdout.strip()

    monkeypatch.delenv("FEDMPQ_EARLY_PROBE", raising=False)
    runner.start(["test_early:env"])
    monkeypatch.setenv("FEDMPQ_EARLY_PROBE", "a test's own")  # a test's setting, after the start
    go.set()
    assert runner.result("test_early:env") == "None"
    assert runner.environ().get("FEDMPQ_EARLY_PROBE") is None
