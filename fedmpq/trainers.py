"""Federations that train on this machine at the same time, so each can take its share of
the cores: every ``fedmpq simulate`` (while it runs) and every SuperNode's client (while it
trains) registers itself (a file named by its pid, holding its start time where Linux's
/proc gives it, in a folder of this user's), and with no ``threads`` setting gives torch
``cores // (live registered trainers)`` threads, counted again every round (a client: every
local epoch; a trainer that ends hands its cores back; :func:`share_cores`). Several
processes each taking every core slow down many times over: their parallel regions wait on
threads the others have descheduled (docs/BENCHMARKS.md)."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from . import config

log = logging.getLogger("fedmpq")

# Entries are named as str(os.getpid()) writes them. int() also takes "0", "-1", "+0", " 1",
# which os.kill reads as this process group, every process, or init: alive forever.
_ENTRY = re.compile(r"[1-9][0-9]*")
_PID_MAX = 2**31 - 1  # pid_t: a larger name is no process (and would overflow os.kill)
_RECORD = re.compile(rb"([0-9]{1,20})\n?")  # the start time, as _write writes it
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # the code writes no links: a link is no entry


def _folder() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"fedmpq-trainers-{os.getuid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _started(pid: int) -> Optional[int]:
    """Process ``pid``'s start time in clock ticks since boot (field 22 of Linux's
    /proc/<pid>/stat), or None where it cannot be read (no such process, no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read()
        # field 2, the command name, may hold spaces and ")": fields 3.. follow its last ")"
        return int(line.rpartition(b")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _recorded(path: str) -> Optional[int]:
    """The start time the entry at ``path`` records; None for an empty one (older versions,
    and where there is no /proc, write none). Raises OSError or ValueError where ``path`` is no
    entry: gone, unreadable, not a regular file, a link, other content."""
    # O_NONBLOCK: a FIFO of that name would otherwise block the round in open()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        text = os.read(fd, 64)
    finally:
        os.close(fd)
    if not text:
        return None
    m = _RECORD.fullmatch(text)
    if m is None:
        raise ValueError(f"{path} holds no start time")
    return int(m.group(1))


class Registry:
    """``with Registry() as reg: reg.count()``: this process is one of the runs while inside.
    Registration is best effort: where the folder cannot be used (not writable, not a folder,
    not this user's), the count is 1, with one warning."""

    def __init__(self, folder: Optional[Path] = None):
        self.folder = Path(folder) if folder else _folder()
        self.mine: Optional[Path] = None
        self._start: Optional[int] = None
        self._warned = False

    def _warn(self, e: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("cannot register with the fedmpq runs on this machine (%s): this run does not "
                        "share the cores with them", e)

    def _write(self) -> None:
        # O_NOFOLLOW: truncating would otherwise write through a link planted under our name
        fd = os.open(self.mine, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o600)
        try:
            os.write(fd, b"" if self._start is None else b"%d\n" % self._start)
        finally:
            os.close(fd)

    def __enter__(self) -> "Registry":
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.folder)
            # another user's folder (or a link, in a shared /tmp) could plant entries, or have
            # count() remove files elsewhere
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                raise NotADirectoryError(f"{self.folder} is not a folder of this user's")
            self.mine = self.folder / str(os.getpid())
            self._start = _started(os.getpid())  # tells this run from a later process given its pid
            self._write()
        except OSError as e:
            self.mine = None
            self._warn(e)
        return self

    def count(self) -> int:
        """Live registered runs, this one included. An entry counts while its pid lives and,
        where it records a start time, that process started then; entries of runs that are
        gone (pid dead or now another process's) are removed where possible. Names other
        than a positive pid's, and entries that cannot be read, are ignored."""
        if self.mine is None:
            return 1
        try:
            names = os.listdir(self.folder)
        except OSError as e:
            self._warn(e)
            return 1
        me, seen, others = self.mine.name, False, 0
        for name in names:
            if name == me:
                seen = True
                continue
            if not _ENTRY.fullmatch(name) or int(name) > _PID_MAX:
                continue
            path = os.path.join(self.folder, name)
            try:
                recorded = _recorded(path)
            except (OSError, ValueError):
                continue
            pid = int(name)
            started = None if recorded is None else _started(pid)
            if (_alive(pid) if started is None else started == recorded):
                others += 1
            else:
                try:
                    os.unlink(path)
                except OSError:  # gone already, or not ours to remove: not counted either way
                    pass
        if not seen:
            # removed under us (a cleaner of the folder, or a run that read it mid-rewrite
            # after a pid reuse): put it back so the others keep counting this run
            try:
                self._write()
            except OSError:
                pass
        return others + 1

    def __exit__(self, *exc) -> None:
        if self.mine is not None:
            try:
                self.mine.unlink(missing_ok=True)
            except OSError:  # the run is over either way; the next count() drops it once dead
                pass


@contextlib.contextmanager
def share_cores(threads: Optional[int]) -> Iterator[Callable[[], int]]:
    """torch's thread count for one training process while inside, restored on exit:
    ``threads`` when set; else the cores this process may use (its CPU affinity) divided among
    the fedmpq processes training on this machine. Registered (:class:`Registry`) while
    inside either way, so the runs beside it count it. Yields a function that counts again,
    sets the count and returns it: call it between epochs, since processes that start
    training together (the SuperNodes of a round) each count only those registered before
    it at the start."""
    before = torch.get_num_threads()

    with Registry() as reg:
        def now() -> int:
            n = threads if threads is not None else max(1, config.available_cores() // reg.count())
            if n != torch.get_num_threads():
                torch.set_num_threads(n)
            return n

        try:
            now()
            yield now
        finally:
            torch.set_num_threads(before)
