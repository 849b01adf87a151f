"""Federations that train on this machine at the same time, so each can take its share of
the cores: every ``fedmpq simulate`` registers itself (a file named by its pid in a folder
of this user's) while it runs, and with no ``threads`` setting gives torch
``cores // (live registered runs)`` threads, counted again every round (a run that ends
hands its cores back). Several processes each taking every core slow down many times over:
their parallel regions wait on threads the others have descheduled (docs/BENCHMARKS.md)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional


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


class Registry:
    """``with Registry() as reg: reg.count()``: this process is one of the runs while inside.
    Registration is best effort: where the folder cannot be written, the count is 1."""

    def __init__(self, folder: Optional[Path] = None):
        self.folder = Path(folder) if folder else _folder()
        self.mine: Optional[Path] = None

    def __enter__(self) -> "Registry":
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.mine = self.folder / str(os.getpid())
            self.mine.touch()
        except OSError:
            self.mine = None
        return self

    def count(self) -> int:
        """Live registered runs, this one included (stale entries of dead runs removed)."""
        if self.mine is None:
            return 1
        n = 0
        try:
            entries = list(self.folder.iterdir())
        except OSError:
            return 1
        for p in entries:
            try:
                pid = int(p.name)
            except ValueError:
                continue
            if _alive(pid):
                n += 1
            else:
                p.unlink(missing_ok=True)
        return max(n, 1)

    def __exit__(self, *exc) -> None:
        if self.mine is not None:
            self.mine.unlink(missing_ok=True)
