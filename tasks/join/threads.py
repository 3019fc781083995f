"""How many threads one kernel call may use (one place, read at call time).

A Dask worker sets MODEAUDIT_THREADS to its share of the cores; without it a
kernel uses every core this process may run on.
"""
from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def compute_threads() -> int:
    """Threads for one kernel call: $MODEAUDIT_THREADS, else the usable cores."""
    env = os.environ.get("MODEAUDIT_THREADS")
    return max(1, int(env)) if env else usable_cores()
