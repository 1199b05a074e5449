"""Latency statistics in trtexec's vocabulary, and the early-exit cost model.

Percentiles follow trtexec (``samples/common/sampleReporting.cpp``, ``findPercentile``), not numpy's
interpolation: sort the timings ascending, drop ``exclude = int((1 - p / 100) * n)`` from the top and
report the largest remaining one, ``sorted[max(n - 1 - exclude, 0)]``. The arithmetic is float32, as in
the C++ (``float percentile``), which matters at the edges: with n = 10, p90 excludes one timing (in
float64 it would exclude none). The median is the middle timing, or the mean of the two middle ones.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import DmpoEdgeError

__all__ = [
    "TRTEXEC_PERCENTILES", "percentile", "median", "summarize", "simulate_exits", "first_exits", "exit_histogram",
    "expected_cost", "ideal_speedup", "thresholds_for_budget",
]

# trtexec's defaults: --percentile=90,95,99
TRTEXEC_PERCENTILES = (90.0, 95.0, 99.0)


def _sorted(values) -> np.ndarray:
    a = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    if a.size and not np.all(np.isfinite(a)):
        raise DmpoEdgeError("bench statistics", "a timing is NaN or infinite. Expected finite durations")
    return a


def percentile(values, p: float) -> float:
    """trtexec's percentile of ``values`` (any order): ``sorted[max(n - 1 - int((1 - p/100) * n), 0)]``."""
    if not 0.0 <= float(p) <= 100.0:
        raise DmpoEdgeError("bench statistics", f"percentile {p} is not in [0, 100]")
    a = _sorted(values)
    n = a.size
    if n == 0:
        return math.inf  # what trtexec reports for an empty trace
    one = np.float32(1.0)
    exclude = int((one - np.float32(p) / np.float32(100.0)) * np.float32(n))
    return float(a[max(n - 1 - exclude, 0)])


def median(values) -> float:
    a = _sorted(values)
    n = a.size
    if n == 0:
        return math.inf
    m = n // 2
    return float(a[m]) if n % 2 else float((a[m - 1] + a[m]) / 2.0)


def summarize(durations_s, scale: float = 1e3, percentiles=TRTEXEC_PERCENTILES) -> dict:
    """min / mean / median / pXX / max of durations given in seconds, reported in ms (``scale``=1e3).

    ``cv_percent`` is trtexec's coefficient of variance (std / mean in percent, population std).
    """
    a = _sorted(durations_s) * scale
    n = int(a.size)
    if n == 0:
        return {"count": 0}
    mean = float(a.mean())
    out = {"count": n, "min": float(a[0]), "mean": mean, "median": median(a)}
    for p in percentiles:
        out[f"p{p:g}"] = percentile(a, p)
    out["max"] = float(a[-1])
    out["cv_percent"] = float(a.std() / mean * 100.0) if mean > 0 else math.inf
    return out


def simulate_exits(confidence: np.ndarray, thresholds) -> np.ndarray:
    """Exit stage per sample from the every-stage confidences [K, N] and K-1 thresholds.

    A sample leaves at the first stage k < K-1 with ``confidence[k] >= thresholds[k]``; the last exit takes
    everyone left. The same rule as the pipeline's, applied on the host for planning (sweep, expectations).
    """
    conf = np.asarray(confidence, dtype=np.float32)
    K = conf.shape[0]
    th = np.asarray(thresholds, dtype=np.float32).reshape(-1)
    if th.size != K - 1:
        raise DmpoEdgeError("bench", f"{th.size} thresholds for {K} stages. Expected {K - 1} (one per early exit)")
    return first_exits(conf, th, dtype=np.int32)


def first_exits(confidence: np.ndarray, thresholds: np.ndarray, dtype=np.int64) -> np.ndarray:
    """The exit rule itself, on checked inputs: confidences [K, N] and K-1 thresholds, compared in the
    dtypes given (callers choose float32 or float64 thresholds); exit stage per sample as ``dtype``."""
    K, n = confidence.shape
    exit_stage = np.full(n, K - 1, dtype=dtype)
    alive = np.ones(n, dtype=bool)
    for k in range(K - 1):
        leave = alive & (confidence[k] >= thresholds[k])
        exit_stage[leave] = k
        alive &= ~leave
    return exit_stage


def exit_histogram(exit_stage, num_stages: int) -> list:
    return np.bincount(np.asarray(exit_stage, dtype=np.int64).reshape(-1), minlength=num_stages)[:num_stages].tolist()


def expected_cost(distribution, cumulative_flops) -> float:
    """Expected per-sample FLOPs when a fraction ``distribution[k]`` leaves at exit k."""
    d = np.asarray(distribution, dtype=np.float64)
    c = np.asarray(cumulative_flops, dtype=np.float64)
    if d.shape != c.shape:
        raise DmpoEdgeError("bench", f"exit distribution has {d.size} entries for {c.size} stages")
    total = d.sum()
    if total <= 0:
        raise DmpoEdgeError("bench", "the exit distribution is empty (no sample was counted)")
    return float((d / total) @ c)


def ideal_speedup(distribution, cumulative_flops) -> float:
    """Full-model FLOPs over expected FLOPs (docs/architecture.md, "The performance model"). The full model runs every stage and every
    exit head, which is ``cumulative_flops[-1]`` (cumulative FLOPs count the trunk and all heads up to k)."""
    return float(cumulative_flops[-1]) / expected_cost(distribution, cumulative_flops)


def thresholds_for_budget(confidence: np.ndarray, cumulative_flops, budget: float, iters: int = 60) -> tuple:
    """Thresholds whose expected cost on these confidences is at most ``budget`` x the full model's.

    A fallback planner when no calibrated solver is at hand (labels are not needed, only cost): every
    exit k gets the same quantile level q of its own confidences, ``thresholds[k] = quantile(conf[k], q)``,
    and q is bisected, since a higher q means higher thresholds, fewer early exits, more cost.
    Returns ``(thresholds, realised_cost_fraction)``; a budget below the cost of exit 0 gives everyone exit 0.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    K = conf.shape[0]
    if K < 2:
        return [], 1.0
    if not 0.0 < float(budget) <= 1.0 + 1e-9:
        raise DmpoEdgeError("bench", f"budget {budget} must be in (0, 1] (a fraction of the full model's FLOPs)")
    c = np.asarray(cumulative_flops, dtype=np.float64)
    full = c[-1]

    def plan(q: float):
        if q >= 1.0:  # nobody exits early: thresholds just above every observed score
            th = [float(np.nextafter(np.float32(conf[k].max()), np.float32(np.inf))) for k in range(K - 1)]
        else:
            th = [float(np.float32(np.quantile(conf[k], q))) for k in range(K - 1)]
        hist = exit_histogram(simulate_exits(conf, th), K)
        return th, expected_cost(hist, c) / full

    lo, hi = 0.0, 1.0
    best = plan(hi)
    if best[1] <= budget:
        return best  # a budget of the full model needs no early exit at all
    for _ in range(iters):
        mid = (lo + hi) / 2.0
        th, cost = plan(mid)
        if cost <= budget:
            lo, best = mid, (th, cost)
        else:
            hi = mid
    if best[1] > budget:  # unreachable budget: the cheapest plan
        best = plan(0.0)
    return best
