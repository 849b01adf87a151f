"""fedmpq.heap: a training process keeps freed memory in its heap, so a tensor allocated again
finds its pages mapped (no fresh page faults); the user's own allocator settings stand."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fedmpq import cli, heap
from fedmpq.config import ConfigError
from tests import early

# glibc's own allocator: not another C library, and none preloaded (the sanitizer run's ASan
# answers mallopt with 0, so the setting is not made there)
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or bool(os.environ.get("LD_PRELOAD")),
                           reason="glibc's own allocator only")

# Faults of a 64 MiB float tensor (16,384 pages of 4 KiB) allocated after a larger one was
# freed (larger: an aligned block asks for a little more than its size, so a freed block of
# exactly its size may not hold it, and the heap grows instead)
FAULTS = """
import resource, sys, torch
from fedmpq import heap
applied = heap.keep_freed_memory() if sys.argv[1] == "keep" else None
torch.empty(9 << 21).fill_(1.0)  # 72 MiB allocated, written and freed
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(1 << 24).fill_(2.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _child(script: str, *args: str, base=None, **env) -> str:
    """``script``'s output, run in a child with no allocator setting in its environment but
    ``env``; the rest is ``base``'s (default os.environ)."""
    e = {k: v for k, v in (os.environ if base is None else base).items()
         if not k.startswith("MALLOC_") and k not in (heap.ENV, "GLIBC_TUNABLES")}
    e.update(env)
    res = early.run([sys.executable, "-c", script, *args], env=e, timeout=300)
    if res.returncode != 0:
        raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)
    return res.stdout


# (mode, environment) of each count test_freed_memory_is_reused_not_faulted_in_again takes
FAULT_CASES = [("keep", {}), ("none", {}), ("keep", {"FEDMPQ_MALLOC": "system"}),
               ("keep", {"MALLOC_MMAP_THRESHOLD_": "65536"}), ("keep", {"MALLOC_ARENA_MAX": "2"}),
               ("keep", {"MALLOC_CONF": "narenas:2"}), ("keep", {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})]


@early.job("heap:faults")
def _all_faults() -> dict:
    """(applied, page faults) per FAULT_CASES entry, each in a child, beside the suite (tests/early.py)."""
    counts = {}
    for mode, env in FAULT_CASES:
        applied, faults = _child(FAULTS, mode, base=early.environ(), **env).split()
        counts[mode, tuple(env.items())] = applied, int(faults)
    return counts


def _faults(mode: str, **env):
    return early.result("heap:faults")[mode, tuple(env.items())]


@glibc
@pytest.mark.early("heap:faults")
def test_freed_memory_is_reused_not_faulted_in_again():
    assert _faults("keep")[0] == "True"
    assert _faults("keep")[1] < 1000
    assert _faults("none")[1] > 16000  # glibc's own: the block went back to the kernel
    # the user's choice stands: FEDMPQ_MALLOC=system, or their own glibc setting
    assert _faults("keep", FEDMPQ_MALLOC="system") == ("False", pytest.approx(16384, rel=0.05))
    assert _faults("keep", MALLOC_MMAP_THRESHOLD_="65536")[0] == "False"
    assert _faults("keep", MALLOC_ARENA_MAX="2")[0] == "False"  # glibc's name without the underscore
    assert _faults("keep", MALLOC_CONF="narenas:2")[0] == "True"  # jemalloc's, not glibc's
    assert _faults("keep", GLIBC_TUNABLES="glibc.malloc.tcache_count=0")[0] == "False"


def _clean(monkeypatch):
    """No allocator setting in the environment, and the ones set here gone after the test."""
    for k in {k for k in os.environ if k.startswith("MALLOC_")} | {"GLIBC_TUNABLES", heap.ENV, *heap.CHILD_ENV}:
        monkeypatch.setenv(k, "")  # recorded, so the test's own settings are undone too
        monkeypatch.delenv(k)


INHERIT = """
import os, subprocess, sys
from fedmpq import heap
print(heap.keep_freed_memory(), heap.keep_freed_memory())  # the second: applied already
child = "import os; print(os.environ['MALLOC_MMAP_MAX_'], os.environ['MALLOC_TRIM_THRESHOLD_'])"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
"""


@glibc
def test_the_processes_it_starts_inherit_it():
    # in a child: mallopt cannot be undone, and this process keeps glibc's own (conftest)
    out = _child(INHERIT)
    assert out.split() == ["True", "True", "0", str(256 << 20)]


def test_another_libc_or_a_bad_setting(monkeypatch):
    monkeypatch.setattr(heap, "_applied", False)
    _clean(monkeypatch)
    monkeypatch.setenv(heap.ENV, "fast")
    with pytest.raises(ConfigError, match="FEDMPQ_MALLOC='fast': it takes keep .* or system"):
        heap.keep_freed_memory()
    monkeypatch.setenv(heap.ENV, "")  # set but empty: the default, keep
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))  # musl, macOS: nothing to set
    assert heap.keep_freed_memory() is False
    assert not any(k in os.environ for k in heap.CHILD_ENV)


@pytest.mark.parametrize("argv,called", [(["simulate", "--rounds", "0"], True), (["flower", "--rounds", "0"], True),
                                         (["compare", "nowhere"], False)])
def test_the_command_applies_it_where_it_trains(monkeypatch, argv, called):
    seen = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: seen.append(1))
    cli.main(argv)  # each stops at its first check (rounds 0; no such folder), after the heap's
    assert bool(seen) is called


def test_a_bad_setting_is_one_line_from_the_command(monkeypatch, capsys):
    monkeypatch.setattr(heap, "_applied", False)
    monkeypatch.setenv(heap.ENV, "fast")
    assert cli.main(["simulate", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmpq: FEDMPQ_MALLOC='fast'") and err.count("\n") == 1, err


@pytest.mark.parametrize("answers,calls", [((0,), [(-4, 0)]),  # ASan's: nothing set
                                           ((1, 0), [(-4, 0), (-1, 256 << 20), (-4, 65536)])])  # not half set
def test_a_refused_setting_leaves_glibc_as_it_was(monkeypatch, answers, calls):
    import ctypes

    seen, it = [], iter(answers)

    class Libc:
        class mallopt:  # noqa: N801 (ctypes' function: argtypes, restype, call)
            def __new__(cls, cmd, value):
                seen.append((cmd, value))
                return next(it, 1)

    monkeypatch.setattr(heap, "_applied", False)
    _clean(monkeypatch)
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("glibc", "2.36"))
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc)
    assert heap.keep_freed_memory() is False
    assert seen == calls
    assert not any(k in os.environ for k in heap.CHILD_ENV)
