"""Slow child processes, started when collection ends, on one thread beside the suite.

A few tests spend most of their time waiting for a child process: Triton compiling every
kernel for sm_90, the stand-in CUDA device's build and its children, the allocator's
page-fault counts. The suite runs its in-process tests on one core; those children need
no result of theirs, so they can run on another core meanwhile. A test names its children
with the marker ``@pytest.mark.early("key", ...)``; once collection ends (tests/conftest.py)
one thread runs the jobs of the tests collected, in their order, one at a time, and the test
takes its job's outcome with :func:`result`, which waits for it, or runs it there and then
when it was not started (a job another job needs, a test run without the hook). A job that
raised (``pytest.skip`` included) raises the same in every test that takes it.

    @early.job("mymodule:child")
    def _child():
        return early.run([sys.executable, "child.py"], timeout=300)

    @pytest.mark.early("mymodule:child")
    def test_child():
        res = early.result("mymodule:child")
"""
from __future__ import annotations

import subprocess
import sys
import threading
from typing import Callable, Dict, Iterable, List

_jobs: Dict[str, Callable[[], object]] = {}
_owner: Dict[str, str] = {}  # key -> the module that registered it
_state: Dict[str, "_Outcome"] = {}
_lock = threading.Lock()
_live: List[subprocess.Popen] = []
_stopped = False


class _Outcome:
    def __init__(self):
        self.claimed = False
        self.done = threading.Event()
        self.value: object = None
        self.error: BaseException | None = None


def job(key: str):
    """Registers the decorated callable (no arguments) as job ``key``; a key is one module's."""
    module = sys._getframe(1).f_globals.get("__name__")

    def register(fn: Callable[[], object]):
        if _owner.setdefault(key, module) != module:
            raise ValueError(f"early job {key!r} is registered by {_owner[key]} and by {module}")
        _jobs[key] = fn
        return fn
    return register


def run(args, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)``,
    with the process known to :func:`stop` while it runs."""
    with _lock:
        if _stopped:
            raise RuntimeError("the test session has ended")
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        _live.append(p)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        p.kill()
        p.communicate()
        raise
    finally:
        with _lock:
            _live.remove(p)
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def _claim(key: str) -> "_Outcome | None":
    """The key's outcome, claimed for the caller to run (None: someone else runs or ran it)."""
    with _lock:
        out = _state.setdefault(key, _Outcome())
        if out.claimed:
            return None
        out.claimed = True
        return out


def _execute(key: str, out: _Outcome) -> None:
    try:
        if key not in _jobs:
            raise KeyError(f"no early job {key!r} (tests/early.py: register it with @early.job)")
        out.value = _jobs[key]()
    except BaseException as e:  # noqa: BLE001 -- handed to the test that takes the result
        out.error = e
    finally:
        out.done.set()


def start(keys: Iterable[str]) -> None:
    """Runs the jobs ``keys`` in this order, one at a time, on a daemon thread."""
    keys = list(dict.fromkeys(keys))
    if not keys:
        return

    def work():
        for key in keys:
            if _stopped:
                return
            out = _claim(key)
            if out is not None:
                _execute(key, out)

    threading.Thread(target=work, name="tests.early", daemon=True).start()


def result(key: str):
    """Job ``key``'s return value (raises what it raised), run here if nobody has begun it."""
    out = _claim(key)
    if out is not None:
        _execute(key, out)
    out = _state[key]
    out.done.wait()
    if out.error is not None:
        raise out.error
    return out.value


def stop() -> None:
    """At the session's end: no job starts any more, and the children running are killed."""
    global _stopped
    with _lock:
        _stopped = True
        for p in _live:
            p.kill()
