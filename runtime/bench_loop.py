"""The interleaved timing loop: round-robin over configurations so drift hits all of them alike.

Round r runs batch r through every configuration in turn; only the inference call is timed, the
bookkeeping of each configuration runs in its untimed ``before``/``after`` hooks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import DmpoEdgeError
from .bench_args import WHERE

__all__ = ["Runner", "interleave", "batches_of"]


@dataclass
class Runner:
    """One configuration in the interleaved loop. ``call(j)`` is timed; ``before``/``after`` are not."""

    name: str
    call: Callable[[int], object]
    before: Callable[[int], None] | None = None
    after: Callable[[int, object], None] | None = None


def interleave(runners: list, num_batches: int, warmup_s: float, duration_s: float, min_iterations: int,
               clock: Callable[[], float] = time.perf_counter, settle: bool = False) -> dict:
    """Round-robin over ``runners``: round r feeds batch ``r % num_batches`` to each runner in turn.

    Warm-up rounds run until ``warmup_s`` has passed (none for 0); timed rounds run until at least
    ``min_iterations`` rounds and ``duration_s`` seconds are done. With ``settle`` each runner first makes
    one untimed call on the previous batch (outside ``before``/``after``), so that its timed call starts from
    the caches and buffers its own configuration leaves behind, as it would running alone, not from the
    previous runner's. Returns ``trace`` (name, batch index, start, end per timed call, in call order),
    ``latency_s`` per runner, ``warmup`` and ``wall_s``.
    """
    if not runners:
        raise DmpoEdgeError(WHERE, "nothing to benchmark")
    if num_batches < 1:
        raise DmpoEdgeError(WHERE, "no input batch to benchmark")
    warm_rounds = 0
    t0 = clock()
    while warmup_s > 0 and clock() - t0 < warmup_s:
        j = warm_rounds % num_batches
        for r in runners:
            if r.before:
                r.before(j)
            r.call(j)
        warm_rounds += 1
    warm_s = clock() - t0
    trace = []
    lat = {r.name: [] for r in runners}
    rounds = 0
    start = clock()
    while True:
        j = rounds % num_batches
        for r in runners:
            if settle:  # the previous batch, as in a stream: the timed call's input is not pre-warmed by it
                r.call((j - 1) % num_batches)
            if r.before:
                r.before(j)
            a = clock()
            out = r.call(j)
            b = clock()
            trace.append((r.name, j, a, b))
            lat[r.name].append(b - a)
            if r.after:
                r.after(j, out)
        rounds += 1
        if rounds >= min_iterations and clock() - start >= duration_s:
            break
    return {"trace": trace, "latency_s": lat, "rounds": rounds, "wall_s": clock() - start,
            "warmup": {"rounds": warm_rounds, "ms": warm_s * 1e3}}


def batches_of(x: np.ndarray, batch: int, labels=None) -> tuple:
    """Cut ``x`` into batches of exactly ``batch`` samples that cover every sample once, wrapping round
    the end (exits depend on the data, so every sample should count). Copies are made up front so that
    no indexing is timed."""
    n = int(x.shape[0])
    if n == 0:
        raise DmpoEdgeError(WHERE, "the data has no samples")
    nb = max(1, -(-n // batch))
    idx = [(np.arange(batch) + j * batch) % n for j in range(nb)]
    xs = [np.ascontiguousarray(x[i]) for i in idx]
    ys = None if labels is None else [np.asarray(labels)[i] for i in idx]
    return xs, ys, idx
