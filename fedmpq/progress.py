"""Progress bars for the command line (tqdm, where installed and stderr is a terminal)."""
from __future__ import annotations

import logging
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


class _BarHandler(logging.Handler):
    """Log records written above the progress bars (tqdm.write), not glued to their line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # no tqdm, or a closed stream: plain stderr, as logging would
            self.handleError(record)


def log_through_bars(logger: logging.Logger) -> None:
    """Route ``logger``'s records through tqdm (where bars can show) instead of the root's
    handler, so a round's line never sticks to a bar or leaves a stale one behind."""
    if not sys.stderr.isatty() or any(isinstance(h, _BarHandler) for h in logger.handlers):
        return
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return
    h = _BarHandler()
    h.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(h)
    logger.propagate = False
