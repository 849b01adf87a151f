"""Progress bars for the command line (tqdm, where installed and stderr is a terminal)."""
from __future__ import annotations

import sys


def progress(it, enabled: bool, desc: str, leave: bool = True):
    """``it`` wrapped in a tqdm bar, or ``it`` itself (disabled, no terminal, no tqdm)."""
    if not enabled or not sys.stderr.isatty():
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, leave=leave)
