"""How many CPU threads tuning should use: the cores this process may run on, less what others keep busy.

torch defaults to one thread per core. When other processes already keep those cores busy, every parallel
region waits for its slowest thread, which has to share a core: on two shared cores a step ran 10-20x
slower than with one thread. So the default is the free cores, at least one; ``--threads`` overrides it.

"Busy" is measured now, from ``/proc/stat`` over a short window, on the cores this process may use. The
1-minute load average is only the fallback (and is logged next to it): it trails by a minute, so right after
another job ends it still reports the cores busy and would halve the threads of a run on an idle machine.
"""

from __future__ import annotations

import os
import time

__all__ = ["free_cpu_threads", "busy_cores"]


def _cpu_times(path: str, cores: set) -> tuple:
    """(busy, total) jiffies summed over the ``cpuN`` lines of ``/proc/stat`` for the given cores."""
    busy = total = 0
    with open(path) as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
                continue
            ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def busy_cores(cores: set, window: float = 0.25, path: str = "/proc/stat"):
    """How many of ``cores`` other processes keep busy right now (``None`` where ``/proc/stat`` is absent)."""
    try:
        b0, t0 = _cpu_times(path, cores)
        time.sleep(window)
        b1, t1 = _cpu_times(path, cores)
    except (OSError, ValueError):
        return None
    if t1 <= t0:
        return None
    return len(cores) * (b1 - b0) / (t1 - t0)


def free_cpu_threads() -> tuple:
    """``(threads, reason)``, e.g. ``(1, "2 cores, 1.0 busy now, load 1.9")``."""
    try:
        cores = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = set(range(os.cpu_count() or 1))
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    busy = busy_cores(cores)
    n = len(cores)
    taken = busy if busy is not None else load
    if taken is None:
        return n, f"{n} cores, load unknown"
    threads = max(1, min(n, int(n - taken + 0.5)))
    parts = [f"{n} cores"]
    if busy is not None:
        parts.append(f"{busy:.1f} busy now")
    if load is not None:
        parts.append(f"load {load:.1f}")
    return threads, ", ".join(parts)
