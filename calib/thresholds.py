"""Exit thresholds from per-stage confidences: budgeted batch (MSDNet) and the exact budget and accuracy solvers.

Pure numpy (the exact search lives in :mod:`dmpo_edge.calib.search`, the risk-controlled variant in
:mod:`dmpo_edge.calib.risk`). Everything works on three arrays measured on a labelled held-out split with the *deployed*
stages (see :mod:`dmpo_edge.calib.evaluate`):

- ``confidence`` (K x N): the exit score of every stage for every sample (all stages run, no exits);
- ``correct`` (K x N, bool): whether stage k's prediction is right for sample i;
- ``cumulative_flops`` (K): per-sample FLOPs to reach and evaluate exit k (the manifest's ``cumulative_flops``).

A sample leaves at the first early exit k with ``confidence[k] >= thresholds[k]``; the last exit takes
everyone, so a threshold vector has K-1 entries. Costs are fractions of ``cumulative_flops[-1]``: the FLOPs
of running every stage graph, which is exactly what the static full-model pipeline of a bundle executes
(each stage graph evaluates its exit head, so this is trunk + all exit heads; a bare backbone + final head
would be slightly cheaper, so speed-ups against that are a little lower than ``speedup_ideal``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import DmpoEdgeError
from ..policies import NEVER_EXIT
from ..runtime.bench_stats import first_exits
from .search import DEFAULT_MAX_CELLS, exact_search, flops_sum

__all__ = [
    "NEVER_EXIT", "SWEEP_P", "MIN_SAMPLES_PER_EXIT", "OperatingPoint", "assign_exits", "evaluate_thresholds",
    "geometric_exit_distribution", "exit_quotas", "budgeted_batch_thresholds", "budgeted_batch_sweep",
    "minimum_cost", "solve_budget", "solve_max_drop", "pareto_front", "check_calibration_arrays",
]


# The sweep of MSDNet's dynamic_evaluate: p = 1/20 ... 39/20; exit k gets a share proportional to p^k.
SWEEP_P = tuple(j / 20.0 for j in range(1, 40))

# A quota per exit needs samples to be drawn from; below this many per exit the thresholds are noise.
MIN_SAMPLES_PER_EXIT = 10


@dataclass
class OperatingPoint:
    """What a threshold vector does on a labelled split."""

    thresholds: np.ndarray  # K-1 float64
    exit_counts: np.ndarray  # K int64
    correct_counts: np.ndarray  # K int64: right answers among the samples that left at exit k
    num_samples: int
    expected_flops: float  # per sample
    expected_cost: float  # fraction of cumulative_flops[-1]
    meta: dict = field(default_factory=dict)  # e.g. {"p": 0.5} for a budgeted-batch sweep point

    @property
    def accuracy(self) -> float:
        return float(self.correct_counts.sum()) / self.num_samples

    @property
    def exit_distribution(self) -> list:
        return [float(c) / self.num_samples for c in self.exit_counts]

    @property
    def speedup_ideal(self) -> float:
        return float("inf") if self.expected_cost <= 0 else 1.0 / self.expected_cost

    def to_dict(self) -> dict:
        exit_acc = [None if n == 0 else float(c) / float(n) for c, n in zip(self.correct_counts, self.exit_counts)]
        return {
            "thresholds": [float(t) for t in self.thresholds],
            "accuracy": self.accuracy,
            "expected_cost": float(self.expected_cost),
            "expected_flops": float(self.expected_flops),
            "speedup_ideal": float(self.speedup_ideal),
            "exit_distribution": self.exit_distribution,
            "exit_counts": [int(c) for c in self.exit_counts],
            "exit_accuracy": exit_acc,
            "num_samples": int(self.num_samples),
            **self.meta,
        }


# --- checks --------------------------------------------------------------------------------------------------
def check_calibration_arrays(confidence, correct, cumulative_flops, min_per_exit: int = MIN_SAMPLES_PER_EXIT):
    """Validate and normalise the three inputs; raise :class:`DmpoEdgeError` for a split too small to calibrate."""
    conf = np.asarray(confidence)
    if conf.ndim != 2:
        raise DmpoEdgeError("calibration", f"confidence must be K x N (stages x samples), found shape {conf.shape}")
    k, n = conf.shape
    corr = np.asarray(correct, dtype=bool)
    if corr.shape != conf.shape:
        raise DmpoEdgeError("calibration", f"correct has shape {corr.shape}, expected {conf.shape} like confidence")
    flops = np.asarray(cumulative_flops, dtype=np.float64)
    if flops.shape != (k,):
        raise DmpoEdgeError("calibration", f"cumulative_flops lists {flops.size} stages, the outputs have {k}")
    if not np.all(np.isfinite(flops)) or np.any(np.diff(flops) < 0) or flops[0] <= 0:
        raise DmpoEdgeError(
            "calibration", f"cumulative_flops {flops.tolist()} must be finite, positive and non-decreasing. Recompile the bundle"
        )
    need = max(1, min_per_exit) * k
    if n < need:
        raise DmpoEdgeError(
            "calibration",
            f"the validation split has {n} labelled sample(s); the budgeted-batch protocol needs at least "
            f"{min_per_exit} per exit, i.e. {need} for this {k}-exit bundle. Give a larger --val split",
        )
    if conf.dtype.kind != "f":
        conf = conf.astype(np.float64)
    return conf, corr, flops


def _as_thresholds(thresholds, k: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.shape != (k - 1,):
        raise DmpoEdgeError("thresholds", f"expected {k - 1} thresholds (one per early exit), found {t.size}")
    if np.any(np.isnan(t)):
        raise DmpoEdgeError("thresholds", "a threshold is NaN. Expected numbers")
    return t


# --- applying thresholds -------------------------------------------------------------------------------------
def assign_exits(confidence, thresholds) -> np.ndarray:
    """Exit stage of every sample: the first k < K-1 with ``confidence[k] >= thresholds[k]``, else K-1."""
    conf = np.asarray(confidence)
    # float32 confidences compare exactly against float64 thresholds taken from them.
    return first_exits(conf, _as_thresholds(thresholds, conf.shape[0]))


def _point(exit_stage, correct, flops, thresholds, meta=None) -> OperatingPoint:
    k, n = correct.shape
    counts = np.bincount(exit_stage, minlength=k).astype(np.int64)
    right = np.bincount(exit_stage, weights=correct[exit_stage, np.arange(n)], minlength=k).astype(np.int64)
    # summed exit by exit like the exact search does, so a budget it meets is met here bit for bit
    expected_flops = flops_sum([int(c) for c in counts], flops) / n
    return OperatingPoint(
        thresholds=np.asarray(thresholds, np.float64).copy(), exit_counts=counts, correct_counts=right,
        num_samples=n, expected_flops=expected_flops, expected_cost=expected_flops / float(flops[-1]), meta=dict(meta or {}),
    )


def evaluate_thresholds(confidence, correct, cumulative_flops, thresholds, meta=None) -> OperatingPoint:
    """Accuracy, exit distribution and expected cost of ``thresholds`` on a labelled split."""
    conf = np.asarray(confidence)
    corr = np.asarray(correct, dtype=bool)
    flops = np.asarray(cumulative_flops, dtype=np.float64)
    return _point(assign_exits(conf, thresholds), corr, flops, _as_thresholds(thresholds, conf.shape[0]), meta)


# --- budgeted batch (MSDNet) ---------------------------------------------------------------------------------
def geometric_exit_distribution(p: float, num_exits: int) -> np.ndarray:
    """Target share of samples per exit: ``p^k`` for k = 1..K, normalised (MSDNet's dynamic_evaluate)."""
    if not (p > 0 and math.isfinite(p)):
        raise DmpoEdgeError("budgeted batch", f"p = {p} must be a positive number")
    w = np.power(float(p), np.arange(1, num_exits + 1, dtype=np.float64))
    return w / w.sum()


def exit_quotas(num_samples: int, probs) -> np.ndarray:
    """``floor(N * probs_k)`` as in the reference; the 1e-9 keeps an exact integer (300 * 1/3) from rounding down."""
    return np.floor(num_samples * np.asarray(probs, np.float64) + 1e-9).astype(np.int64)


def budgeted_batch_thresholds(confidence, probs) -> tuple[np.ndarray, np.ndarray]:
    """MSDNet's budgeted-batch thresholds for a target exit distribution ``probs`` (K shares).

    Follows ``Tester.dynamic_eval_find_threshold`` of the MSDNet reference code (Huang et al., ICLR 2018;
    kalviny/MSDNet-PyTorch, adaptive_inference.py): for each early exit k, the quota is
    ``n_k = floor(N * probs[k])``; walking the samples that have not exited yet in descending order of
    their stage-k confidence, ``T_k`` is the confidence of the n_k-th one; every remaining sample with
    ``confidence >= T_k`` then exits (so ties at ``T_k`` all leave and the count can exceed the quota).
    A zero quota, or one larger than the number of samples still in flight, never reaches ``count == n_k``
    in the reference loop and leaves ``T_k`` at its "nobody exits" initial value (1e8 there,
    :data:`NEVER_EXIT` here). The last exit takes everyone (-1e8 there; implicit here).

    Returns ``(thresholds (K-1), quotas (K-1))``.
    """
    conf = np.asarray(confidence)
    k_stages, n = conf.shape
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (k_stages,):
        raise DmpoEdgeError("budgeted batch", f"expected {k_stages} exit shares, found {probs.size}")
    quotas = exit_quotas(n, probs[: k_stages - 1])
    thresholds = np.full(k_stages - 1, NEVER_EXIT, dtype=np.float64)
    remaining = np.ones(n, dtype=bool)
    for k in range(k_stages - 1):
        q = int(quotas[k])
        c = conf[k, remaining]
        if 1 <= q <= c.size:
            # the q-th largest remaining confidence (with multiplicity) is what the reference loop stops at
            thresholds[k] = float(np.partition(c, c.size - q)[c.size - q])
        remaining &= ~(conf[k] >= thresholds[k])
    return thresholds, quotas


def budgeted_batch_sweep(confidence, correct, cumulative_flops, ps=SWEEP_P, check: bool = True) -> list:
    """One :class:`OperatingPoint` per ``p`` of the sweep (MSDNet: p = 1/20 .. 39/20), thresholds fit on this split."""
    if check:
        confidence, correct, cumulative_flops = check_calibration_arrays(confidence, correct, cumulative_flops)
    conf = np.asarray(confidence)
    corr = np.asarray(correct, dtype=bool)
    flops = np.asarray(cumulative_flops, dtype=np.float64)
    points = []
    for p in ps:
        probs = geometric_exit_distribution(p, conf.shape[0])
        t, quotas = budgeted_batch_thresholds(conf, probs)
        meta = {"method": "budgeted_batch", "p": float(p), "target_distribution": probs.tolist(),
                "quotas": [int(q) for q in quotas]}
        points.append(evaluate_thresholds(conf, corr, flops, t, meta))
    return points


def pareto_front(points: list) -> list:
    """Points not beaten by another (cheaper or equal cost and higher accuracy), sorted by cost."""
    pts = sorted(points, key=lambda p: (p.expected_cost, -p.accuracy))
    front, best = [], -1.0
    for p in pts:
        if p.accuracy > best:
            front.append(p)
            best = p.accuracy
    return front


# --- solvers ---------------------------------------------------------------------------------------------------
def minimum_cost(cumulative_flops, num_samples: int | None = None) -> float:
    """Cost fraction when everyone leaves at the first exit.

    With ``num_samples`` it is computed with exactly the arithmetic of :func:`evaluate_thresholds` on that many
    samples (``(n * f0) / n`` can differ from ``f0`` in the last bit), so ``budget >= minimum_cost(f, n)``
    guarantees that "everyone leaves at exit 0" meets the budget.
    """
    flops = np.asarray(cumulative_flops, dtype=np.float64)
    if num_samples is None:
        return float(flops[0]) / float(flops[-1])
    counts = [num_samples] + [0] * (flops.size - 1)
    return (flops_sum(counts, flops) / num_samples) / float(flops[-1])


def _exit_order(conf_k: np.ndarray, idx: np.ndarray):
    """Remaining samples sorted by descending confidence and, per option j, the threshold letting the top j leave.

    Options are the ends of tie groups (a threshold cannot separate equal confidences) plus j = 0 (nobody).
    """
    c = conf_k[idx]
    order = np.argsort(-c, kind="stable")
    cs = c[order]
    ends = np.flatnonzero(np.r_[cs[1:] != cs[:-1], True]) + 1 if cs.size else np.zeros(0, np.int64)
    js = np.r_[0, ends].astype(np.int64)
    thr = np.r_[NEVER_EXIT, cs[ends - 1]] if cs.size else np.array([NEVER_EXIT])
    return idx[order], js, thr.astype(np.float64)


def _coordinate_options(conf, corr, flops, t, k):
    """Every (threshold, correct count, FLOPs sum) reachable by changing only ``t[k]``."""
    k_stages, n = conf.shape
    exit_stage = assign_exits(conf, t)
    before = exit_stage < k
    base_correct = int(corr[exit_stage[before], np.flatnonzero(before)].sum())
    base_cost = float(flops[exit_stage[before]].sum())
    idx = np.flatnonzero(~before)
    # where each remaining sample goes if it does not leave at k (later thresholds fixed)
    t_skip = t.copy()
    t_skip[k] = NEVER_EXIT
    down = assign_exits(conf, t_skip)
    order, js, thr = _exit_order(conf[k], idx)
    stay_correct = corr[k, order].astype(np.int64)
    go_correct = corr[down[order], order].astype(np.int64)
    go_cost = flops[down[order]]
    cs_stay = np.r_[0, np.cumsum(stay_correct)]
    cs_go = np.r_[0, np.cumsum(go_correct)]
    cs_go_cost = np.r_[0.0, np.cumsum(go_cost)]
    n_correct = base_correct + cs_stay[js] + (cs_go[-1] - cs_go[js])
    cost = base_cost + js * flops[k] + (cs_go_cost[-1] - cs_go_cost[js])
    return thr, n_correct, cost


def _descend(conf, corr, flops, t0, feasible, key, max_rounds: int = 20) -> np.ndarray:
    """Coordinate descent over per-exit thresholds taken from the observed confidences.

    ``feasible(n_correct, cost_sum) -> bool array`` and ``key(n_correct, cost_sum) -> (primary, secondary)``
    arrays, higher is better. A move is taken only when it is feasible and strictly better (any feasible move
    beats an infeasible start, which is how a start over the target is pulled under it), so the walk ends.
    """
    t = np.asarray(t0, np.float64).copy()
    k_stages, n = conf.shape
    for _ in range(max_rounds):
        moved = False
        for k in range(k_stages - 1):
            thr, n_correct, cost = _coordinate_options(conf, corr, flops, t, k)
            ok = np.flatnonzero(feasible(n_correct, cost))
            if ok.size == 0:
                continue
            primary, secondary = key(n_correct[ok], cost[ok])
            best = ok[np.lexsort((secondary, primary))[-1]]
            ex = assign_exits(conf, t)
            cur_nc, cur_cost = np.array([corr[ex, np.arange(n)].sum()]), np.array([flops[ex].sum()])
            cur_p, cur_s = key(cur_nc, cur_cost)
            bp, bs = key(n_correct[best : best + 1], cost[best : best + 1])
            better = not feasible(cur_nc, cur_cost)[0] or (bp[0], bs[0]) > (cur_p[0], cur_s[0])
            if better and thr[best] != t[k]:
                t[k] = thr[best]
                moved = True
        if not moved:
            break
    return t


def _starts(conf, corr, flops, sweep_points):
    k_stages = conf.shape[0]
    first = np.full(k_stages - 1, -NEVER_EXIT)  # everyone leaves at exit 0
    last = np.full(k_stages - 1, NEVER_EXIT)  # everyone runs the whole model
    return [first, last] + [p.thresholds for p in sweep_points]


def _start_points(conf, corr, flops, sweep_points, feasible, key):
    """Known-good threshold vectors for the exact search to prune with: the sweep, the extremes, and one
    coordinate descent from the best of them."""
    starts = _starts(conf, corr, flops, sweep_points)
    n = conf.shape[1]

    def score(t):
        ex = assign_exits(conf, t)
        nc, cost = np.array([corr[ex, np.arange(n)].sum()]), np.array([flops[ex].sum()])
        return (bool(feasible(nc, cost)[0]),) + tuple(float(v[0]) for v in key(nc, cost))

    best = max(starts, key=score)
    return starts + [_descend(conf, corr, flops, best, feasible, key)]


def _search_meta(res, n: int, mode: str) -> dict:
    """What the search proved: ``optimal`` and, when it stopped early, the gap to the bound."""
    meta = {"search": "exact" if res.optimal else "heuristic", "optimal": bool(res.optimal),
            "search_cells": int(res.cells)}
    if mode == "budget":
        meta["accuracy_bound"] = float(res.bound) / n
        meta["gap"] = (float(res.bound) - res.correct) / n  # accuracy points any point could still gain
    else:
        meta["cost_sum_bound"] = float(res.bound)
        meta["gap"] = float(res.cost_sum - res.bound) / n  # FLOPs per sample any point could still save
    return meta


def solve_budget(confidence, correct, cumulative_flops, budget: float, sweep_points=None,
                 max_cells: int = DEFAULT_MAX_CELLS) -> OperatingPoint:
    """The most accurate thresholds on this split with expected cost <= ``budget`` (fraction of ``cumulative_flops[-1]``).

    Exact: a branch-and-bound search over the observed confidences (:mod:`dmpo_edge.calib.search`) returns the
    true optimum on the split (ties in accuracy go to the cheaper point). Should the search reach ``max_cells``
    grid evaluations (far beyond the models' 3-5 exits and a few thousand samples), it returns the best point
    found with ``meta["search"] == "heuristic"`` and the accuracy gap to the bound in ``meta["gap"]``.
    The returned point is re-evaluated; its expected cost on this split is <= ``budget``.
    """
    conf, corr, flops = check_calibration_arrays(confidence, correct, cumulative_flops)
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise DmpoEdgeError("budget", f"budget {budget!r} must be a positive fraction of the full model's FLOPs, e.g. 0.4")
    n = conf.shape[1]
    lo = minimum_cost(flops, n)
    if budget < lo:
        raise DmpoEdgeError(
            "budget",
            f"budget {budget:.4g} is below the cheapest possible cost: everyone leaving at the first exit costs "
            f"{lo:.4g} of the full model's FLOPs (minimum achievable). Use --budget {math.ceil(lo * 1000) / 1000:.3f} or more",
        )
    full = float(flops[-1])
    if sweep_points is None:
        sweep_points = budgeted_batch_sweep(conf, corr, flops, check=False)

    def feasible(nc, cost):
        # FLOP sums summed in another order may differ in the last bit; the exact search re-checks every candidate
        return (np.asarray(cost) / n) / full <= budget * (1.0 + 1e-12)

    def key(nc, cost):
        return np.asarray(nc, np.float64), -np.asarray(cost, np.float64)

    starts = _start_points(conf, corr, flops, sweep_points, feasible, key)
    res = exact_search(conf, corr, flops, "budget", limit=float(budget), incumbents=starts, max_cells=max_cells)
    best = evaluate_thresholds(conf, corr, flops, res.thresholds)
    if not best.expected_cost <= budget:  # cannot happen: exit 0 for all is feasible once budget >= minimum cost
        raise DmpoEdgeError("budget", f"no thresholds meet the budget {budget:.4g} on this split")
    best.meta.update({"method": "budget", "target": float(budget), **_search_meta(res, n, "budget")})
    return best


def solve_max_drop(confidence, correct, cumulative_flops, max_drop: float, sweep_points=None,
                   max_cells: int = DEFAULT_MAX_CELLS) -> OperatingPoint:
    """The cheapest thresholds on this split whose accuracy is at least the last exit's minus ``max_drop`` (a fraction).

    Exact like :func:`solve_budget` (ties in cost go to the more accurate point). The drop holds on *this* split;
    on new data it can be larger; :mod:`dmpo_edge.calib.risk` gives a guarantee with a stated confidence.
    """
    conf, corr, flops = check_calibration_arrays(confidence, correct, cumulative_flops)
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and 0 <= max_drop < 1):
        raise DmpoEdgeError("max drop", f"max drop {max_drop!r} must be an accuracy fraction in [0, 1), e.g. 0.01 for 1 point")
    n = conf.shape[1]
    final_correct = int(corr[-1].sum())
    need = math.ceil(final_correct - max_drop * n - 1e-9)
    if sweep_points is None:
        sweep_points = budgeted_batch_sweep(conf, corr, flops, check=False)

    def feasible(nc, cost):
        return np.asarray(nc) >= need

    def key(nc, cost):
        return -np.asarray(cost, np.float64), np.asarray(nc, np.float64)

    # "all run to the end" (among the starts) always meets the target, so the search always has a point
    starts = _start_points(conf, corr, flops, sweep_points, feasible, key)
    res = exact_search(conf, corr, flops, "max_drop", need=int(need), incumbents=starts, max_cells=max_cells)
    best = evaluate_thresholds(conf, corr, flops, res.thresholds)
    best.meta.update({
        "method": "max_drop", "target": float(max_drop), "final_exit_accuracy": final_correct / n,
        "target_accuracy": need / n, **_search_meta(res, n, "max_drop"),
    })
    return best
