"""Slow child processes, started when collection ends, on one thread beside the suite.

A few tests spend most of their time waiting for a child process: Triton compiling every
kernel for sm_90, the stand-in CUDA device's build and its children, the allocator's
page-fault counts. The suite runs its in-process tests on one core; those children need
no result of theirs, so they can run on another core meanwhile. A test names its children
with the marker ``@pytest.mark.early("key", ...)``; once collection ends (tests/conftest.py)
one thread runs the jobs of the tests collected, in their order, one at a time, and the test
takes its job's outcome with :func:`result`, which waits for it, or runs it there and then
when it was not started (a job another job needs, a test run without the hook). A job that
raised (``pytest.skip`` included) raises the same in every test that takes it. The children
get the environment as collection left it (:func:`environ`), not the one of whichever test
runs in the main thread meanwhile.

:func:`in_child` does the same for a whole test that spends its time waiting (a Flower
deployment's round timeout) or compiling (inductor's first build): the test runs in a pytest
child started early, and in the suite it takes that child's outcome (passed, failed with the
child's report, or skipped).

    @early.job("mymodule:child")
    def _child():
        return early.run([sys.executable, "child.py"], timeout=300)

    @pytest.mark.early("mymodule:child")
    def test_child():
        res = early.result("mymodule:child")
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, Iterable, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = "FEDMPQ_TEST_EARLY_CHILD"  # set in in_child's pytest child: the test runs there, for real

_jobs: Dict[str, Callable[[], object]] = {}
_owner: Dict[str, str] = {}  # key -> the module that registered it


def job(key: str):
    """Registers the decorated callable (no arguments) as job ``key``; a key is one module's."""
    module = sys._getframe(1).f_globals.get("__name__")

    def register(fn: Callable[[], object]):
        if _owner.setdefault(key, module) != module:
            raise ValueError(f"early job {key!r} is registered by {_owner[key]} and by {module}")
        _jobs[key] = fn
        return fn
    return register


class _Outcome:
    def __init__(self):
        self.claimed = False
        self.done = threading.Event()
        self.value: object = None
        self.error: BaseException | None = None


class Runner:
    """The registered jobs' outcomes and the children running, for one session (the module's
    functions are those of its one ``RUNNER``; tests/test_early.py makes its own)."""

    def __init__(self):
        self._state: Dict[str, _Outcome] = {}
        self._lock = threading.Lock()
        self._live: List[subprocess.Popen] = []
        self._stopped = False
        self._environ: Dict[str, str] | None = None

    def environ(self) -> Dict[str, str]:
        """A copy of the environment as :meth:`start` first found it (before any test ran), or
        as it is now before that. A job runs while some test runs in the main thread, and
        os.environ is the process's: a test's monkeypatched variables (its own trainer
        registry's folder, say) must not reach the job's children."""
        return dict(os.environ if self._environ is None else self._environ)

    def run(self, args, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)``,
        with the process known to :meth:`stop` while it runs; ``env`` defaults to
        :meth:`environ`, not to the environment of the test running at the time."""
        kwargs.setdefault("env", self.environ())
        with self._lock:
            if self._stopped:
                raise RuntimeError("the test session has ended")
            p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
            self._live.append(p)
        try:
            out, err = p.communicate(timeout=timeout)
        except BaseException:
            p.kill()
            p.communicate()
            raise
        finally:
            with self._lock:
                self._live.remove(p)
        return subprocess.CompletedProcess(args, p.returncode, out, err)

    def _claim(self, key: str) -> "_Outcome | None":
        """The key's outcome, claimed for the caller to run (None: someone else runs or ran it)."""
        with self._lock:
            out = self._state.setdefault(key, _Outcome())
            if out.claimed:
                return None
            out.claimed = True
            return out

    @staticmethod
    def _execute(key: str, out: _Outcome) -> None:
        try:
            if key not in _jobs:
                raise KeyError(f"no early job {key!r} (tests/early.py: register it with @early.job)")
            out.value = _jobs[key]()
        except BaseException as e:  # noqa: BLE001 -- handed to the test that takes the result
            out.error = e
        finally:
            out.done.set()

    def start(self, keys: Iterable[str]) -> "threading.Thread | None":
        """Runs the jobs ``keys`` in this order, one at a time, on a daemon thread (returned;
        None when there are none)."""
        if self._environ is None:
            self._environ = dict(os.environ)
        keys = list(dict.fromkeys(keys))
        if not keys:
            return None

        def work():
            for key in keys:
                if self._stopped:
                    return
                out = self._claim(key)
                if out is not None:
                    self._execute(key, out)

        thread = threading.Thread(target=work, name="tests.early", daemon=True)
        thread.start()
        return thread

    def result(self, key: str):
        """Job ``key``'s return value (raises what it raised), run here if nobody has begun it."""
        out = self._claim(key)
        if out is not None:
            self._execute(key, out)
        out = self._state[key]
        out.done.wait()
        if out.error is not None:
            raise out.error
        return out.value

    def stop(self) -> None:
        """At the session's end: no job starts any more, and the children running are killed."""
        with self._lock:
            self._stopped = True
            for p in self._live:
                p.kill()


RUNNER = Runner()
run, start, result, stop, environ = RUNNER.run, RUNNER.start, RUNNER.result, RUNNER.stop, RUNNER.environ


def in_child(test):
    """Decorator (innermost, on the ``def``): the test runs, every parametrization at once, in
    a pytest child that an ``early`` job starts when collection ends; in the suite it passes,
    fails with the child's report or skips with the child's reason. In that child (``CHILD``
    set) the test is left as it is; the child has one OpenMP thread, so that it and the suite
    beside it do not spin for each other's cores (a test that needs more sets its own)."""
    if os.environ.get(CHILD) == "1":
        return test
    path = Path(sys.modules[test.__module__].__file__).resolve().relative_to(ROOT).as_posix()
    key = f"child:{path}::{test.__name__}"

    @job(key)
    def _child():
        with tempfile.TemporaryDirectory(prefix="fedmpq-early-") as tmp:
            xml = Path(tmp) / "junit.xml"
            res = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                       f"{path}::{test.__name__}"], timeout=900, cwd=ROOT,
                      env={**environ(), CHILD: "1", "OMP_NUM_THREADS": "1"})
            cases = {}  # test name (with its parametrization) -> (outcome, the report's text)
            for case in ET.parse(xml).iter("testcase") if xml.exists() else ():
                bad = next((e for e in case if e.tag in ("failure", "error")), None)
                skip = case.find("skipped")
                if bad is not None:
                    cases[case.get("name")] = ("failed", bad.text or bad.get("message", ""))
                elif skip is not None:
                    cases[case.get("name")] = ("skipped", skip.get("message", ""))
                else:
                    cases[case.get("name")] = ("passed", "")
            return res, cases

    @functools.wraps(test)
    def from_child(*args, **kwargs):
        name = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0].split("::")[-1]
        res, cases = result(key)
        outcome, text = cases.get(name, (None, ""))
        if outcome == "skipped":
            pytest.skip(f"in its child process: {text}")
        if outcome != "passed":
            pytest.fail(f"{name}, run in a child process (tests/early.py), "
                        + (f"failed:\n{text}" if outcome else f"did not report (exit status {res.returncode}):\n"
                           + (res.stdout + res.stderr)[-6000:]), pytrace=False)

    return pytest.mark.early(key)(from_child)
