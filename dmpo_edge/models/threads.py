"""How many CPU threads tuning should use: the cores this process may run on, less what others keep busy.

torch defaults to one thread per core. When other processes already keep those cores busy, every parallel
region waits for its slowest thread, which has to share a core: on two shared cores a step ran 10-20x
slower than with one thread. So the default is the free cores (usable cores minus the 1-minute load
average, rounded), at least one; ``--threads`` overrides it.
"""

from __future__ import annotations

import os

__all__ = ["free_cpu_threads"]


def free_cpu_threads() -> tuple:
    """``(threads, reason)``, e.g. ``(1, "2 cores, load 1.9")``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores, f"{cores} cores, load unknown"
    threads = max(1, min(cores, int(cores - load + 0.5)))
    return threads, f"{cores} cores, load {load:.1f}"
