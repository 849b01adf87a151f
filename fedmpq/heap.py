"""The C heap of a ``fedmpq`` process that trains: freed memory kept for the next step.

glibc hands a freed block of 128 KB or more back to the kernel (each one mmap'd, and the
heap's free top trimmed past a threshold), so every step's activations, gradients and outputs
fault their pages in again, zero-filled: about 4 million page faults in a ResNet-20 round on
Fashion-MNIST, 11 % of its time (docs/BENCHMARKS.md). Kept in the heap, they are reused, as
torch's caching allocator reuses GPU memory. The cost is a higher peak of resident memory (a
ResNet-20 round: about 1.15 GB against 0.85). The ``fedmpq`` command (simulate, flower) applies
it; the library alone never changes the process's allocator."""
from __future__ import annotations

import ctypes
import os
import platform

from .config import ConfigError

ENV = "FEDMPQ_MALLOC"  # keep (the default) or system: glibc's own behaviour
# glibc's mallopt parameters (malloc.h), and the same settings as the environment variables
# that glibc reads at a process's start, for the processes this one starts (Ray's workers
# under fedmpq flower; Ray passes GLIBC_TUNABLES on only to its first colon)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_MMAP_MAX = 65536  # glibc's
TRIM_THRESHOLD = 256 << 20  # once this much is free at the heap's top, glibc gives it back
CHILD_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
# glibc's environment names of its malloc tunables (not jemalloc's MALLOC_CONF): a user's own
USERS_ENV = ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_CHECK_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
             "MALLOC_PERTURB_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")
_applied = False


def keep_freed_memory() -> bool:
    """Keep freed memory in this process's heap and in the processes it starts: glibc's
    ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, 256 MiB)`` now, and the same
    as ``MALLOC_MMAP_MAX_`` and ``MALLOC_TRIM_THRESHOLD_`` in the environment its children
    inherit. Returns whether it applied (False where the C library is not glibc, where
    ``FEDMPQ_MALLOC=system``, or where the environment already sets a ``glibc.malloc``
    tunable or one of glibc's ``MALLOC_*`` variables: the user's choice stands). Once
    applied, a later call returns True and sets nothing again. Raises :class:`ConfigError`
    for another ``FEDMPQ_MALLOC`` value."""
    global _applied
    if _applied:
        return True
    choice = os.environ.get(ENV) or "keep"  # set but empty: unset
    if choice not in ("keep", "system"):
        raise ConfigError(f"{ENV}={choice!r}: it takes keep (freed memory kept in the heap for the next step, "
                          "the default) or system (glibc's own behaviour)")
    users = "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(k in os.environ for k in USERS_ENV)
    if choice == "system" or users or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a static or unusual build: glibc's defaults stay
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(_M_MMAP_MAX, 0):  # ASan's answer: nothing set
        return False
    if not mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)  # not half of it
        return False
    os.environ.update(CHILD_ENV)
    _applied = True
    return True
