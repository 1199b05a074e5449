"""Exit-threshold algorithms (pure numpy): hand-computed cases, the MSDNet protocol re-implemented
independently (loops, exact fractions), and properties of the budget and accuracy solvers."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmpo_edge.calib import thresholds as th
from dmpo_edge.errors import DmpoEdgeError

f32 = np.float32
NEVER = th.NEVER_EXIT


# --- an independent, loop-based MSDNet budgeted-batch reference --------------------------------------------------
def msdnet_reference(conf, j_over_20):
    """Straight transcription of the protocol with exact fractions: p = j/20, probs_k = p^k / sum, floor quotas,
    walk the samples in descending confidence skipping the exited ones, stop at count == quota."""
    k_stages, n = len(conf), len(conf[0])
    p = Fraction(j_over_20, 20)
    w = [p ** k for k in range(1, k_stages + 1)]
    probs = [x / sum(w) for x in w]
    filtered = [0] * n
    thresholds = [None] * (k_stages - 1)  # None = "never reached the quota" (1e8 in the reference)
    for k in range(k_stages - 1):
        order = sorted(range(n), key=lambda i: conf[k][i], reverse=True)
        out_n = math.floor(n * probs[k])
        count = 0
        for i in order:
            if filtered[i] == 0:
                count += 1
                if count == out_n:
                    thresholds[k] = conf[k][i]
                    break
        for i in range(n):
            if thresholds[k] is not None and conf[k][i] >= thresholds[k]:
                filtered[i] += 1
    exits = []
    for i in range(n):
        stage = k_stages - 1
        for k in range(k_stages - 1):
            if thresholds[k] is not None and conf[k][i] >= thresholds[k]:
                stage = k
                break
        exits.append(stage)
    return thresholds, exits


# --- hand-computed cases ---------------------------------------------------------------------------------------
def test_budgeted_batch_by_hand_skips_samples_that_already_left():
    conf = np.array([
        [0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.50],
        [0.99, 0.98, 0.97, 0.60, 0.90, 0.50, 0.80, 0.40, 0.70, 0.30],
        [0.10] * 10,
    ], dtype=f32)
    t, quotas = th.budgeted_batch_thresholds(conf, [0.3, 0.3, 0.4])
    # quota 3 at exit 0 -> the 3rd best is 0.85. At exit 1 samples 0-2 (0.99, 0.98, 0.97) have left already, so the
    # 3rd best of the remaining (0.6, 0.9, 0.5, 0.8, 0.4, 0.7, 0.3) is 0.7, not 0.97.
    assert quotas.tolist() == [3, 3]
    assert t.tolist() == [float(f32(0.85)), float(f32(0.70))]
    exits = th.assign_exits(conf, t)
    assert exits.tolist() == [0, 0, 0, 2, 1, 2, 1, 2, 1, 2]
    assert np.bincount(exits, minlength=3).tolist() == [3, 3, 4]  # the last exit takes everyone else


def test_ties_at_the_threshold_all_leave_like_the_reference():
    conf = np.array([[0.9, 0.8, 0.8, 0.8, 0.5, 0.4] + [0.1] * 14, [0.2] * 20], dtype=f32)
    # quota floor(20 * 0.1) = 2: the 2nd best is 0.8, and `>=` lets all three 0.8s go (4 > 2, as in the reference)
    t, quotas = th.budgeted_batch_thresholds(conf, [0.1, 0.9])
    assert quotas.tolist() == [2]
    assert t.tolist() == [float(f32(0.8))]
    assert np.bincount(th.assign_exits(conf, t), minlength=2).tolist() == [4, 16]


def test_zero_quota_and_unreachable_quota_mean_nobody_leaves():
    conf = np.array([[0.9] * 4 + [0.1] * 6, [0.5 + 0.01 * i for i in range(10)], [0.3] * 10], dtype=f32)
    # exit 0: quota floor(10 * 0.2) = 2 -> T = 0.9, but the four tied 0.9s leave; exit 1: quota 7 > 6 remaining,
    # so the reference loop never reaches count == 7 and the threshold stays at "never".
    t, quotas = th.budgeted_batch_thresholds(conf, [0.2, 0.7, 0.1])
    assert quotas.tolist() == [2, 7]
    assert t.tolist() == [float(f32(0.9)), NEVER]
    assert np.bincount(th.assign_exits(conf, t), minlength=3).tolist() == [4, 0, 6]
    # a zero quota (floor(10 * 0.05) = 0) never matches count == 0 either
    t0, q0 = th.budgeted_batch_thresholds(conf, [0.05, 0.05, 0.9])
    assert q0.tolist() == [0, 0] and t0.tolist() == [NEVER, NEVER]
    assert np.bincount(th.assign_exits(conf, t0), minlength=3).tolist() == [0, 0, 10]


def test_last_exit_accepts_everyone_even_at_minus_infinity_confidence():
    conf = np.array([[0.9, 0.2, 0.1], [-np.inf, -np.inf, 0.0]], dtype=f32)
    exits = th.assign_exits(conf, [0.5])
    assert exits.tolist() == [0, 1, 1]
    pt = th.evaluate_thresholds(conf, np.ones((2, 3), bool), [1.0, 4.0], [0.5])
    assert pt.exit_counts.sum() == 3 and pt.expected_flops == pytest.approx((1 + 4 + 4) / 3)


def test_geometric_distribution_and_sweep_grid_follow_msdnet():
    probs = th.geometric_exit_distribution(0.5, 3)
    np.testing.assert_allclose(probs, np.array([0.5, 0.25, 0.125]) / 0.875)
    assert th.SWEEP_P[0] == 0.05 and th.SWEEP_P[-1] == pytest.approx(1.95) and len(th.SWEEP_P) == 39
    assert th.exit_quotas(300, [1 / 3, 1 / 3]).tolist() == [100, 100]  # no float rounding down of exact integers


def _two_exit_case():
    n = 20
    conf = np.array([[(n - i) / n for i in range(n)], [0.5] * n], dtype=f32)  # sample i is the i-th most confident
    correct = np.array([[i < 12 for i in range(n)], [True] * n])
    return conf, correct, [1.0, 2.0]  # exit 0 costs half of the full model


def test_budget_solver_by_hand():
    conf, correct, flops = _two_exit_case()
    # cost with the top j leaving at exit 0: (j * 1 + (20 - j) * 2) / 20 / 2 = (40 - j) / 40 <= 0.75  =>  j >= 10;
    # samples 0-11 are right at exit 0, so j = 10, 11, 12 all keep 100%; the cheapest is j = 12: T = conf[11] = 9/20.
    pt = th.solve_budget(conf, correct, flops, 0.75)
    assert pt.thresholds.tolist() == [float(f32(9 / 20))]
    assert pt.accuracy == 1.0 and pt.expected_cost == pytest.approx(28 / 40)
    assert pt.exit_counts.tolist() == [12, 8]


def test_accuracy_solver_by_hand():
    conf, correct, flops = _two_exit_case()
    # right answers with the top j leaving: min(j, 12) + (20 - j); >= 18 (final 100% minus 10 points) allows j <= 14;
    # the cheapest is j = 14: T = conf[13] = 7/20, cost (40 - 14) / 40.
    pt = th.solve_max_drop(conf, correct, flops, 0.10)
    assert pt.thresholds.tolist() == [float(f32(7 / 20))]
    assert pt.accuracy == pytest.approx(0.9) and pt.expected_cost == pytest.approx(26 / 40)
    assert th.solve_max_drop(conf, correct, flops, 0.0).thresholds.tolist() == [float(f32(9 / 20))]


def test_budget_below_the_cheapest_cost_names_the_minimum():
    conf, correct, flops = _two_exit_case()
    with pytest.raises(DmpoEdgeError, match=r"minimum achievable") as e:
        th.solve_budget(conf, correct, flops, 0.49)
    assert "0.5" in str(e.value)
    pt = th.solve_budget(conf, correct, flops, 0.5)  # exactly the minimum: everyone leaves at exit 0
    assert pt.exit_counts.tolist() == [20, 0] and pt.expected_cost == 0.5


def test_budget_at_exactly_the_minimum_is_met_despite_float_rounding():
    # (98 * f0) / 98 > f0 in floating point for this f0: the minimum is computed the way costs are evaluated
    rng = np.random.default_rng(5)
    n, flops = 98, np.array([2.875909520871794, 4.5, 5.0, 6.0])
    assert (n * flops[0]) / n / flops[-1] > flops[0] / flops[-1]
    conf = rng.random((4, n)).astype(f32)
    correct = rng.random((4, n)) < 0.7
    lo = th.minimum_cost(flops, n)
    pt = th.solve_budget(conf, correct, flops, lo)
    assert pt.expected_cost <= lo and pt.exit_counts[0] == n


def test_tiny_or_empty_split_says_how_many_samples_are_needed():
    conf, correct, flops = _two_exit_case()
    with pytest.raises(DmpoEdgeError, match=r"at least 10 per exit, i\.e\. 20"):
        th.solve_budget(conf[:, :19], correct[:, :19], flops, 0.8)
    with pytest.raises(DmpoEdgeError, match=r"has 0 labelled"):
        th.budgeted_batch_sweep(np.zeros((3, 0), f32), np.zeros((3, 0), bool), [1.0, 2.0, 3.0])


# --- the protocol against the independent re-implementation ----------------------------------------------------
@pytest.mark.parametrize("seed,k_stages,n,decimals", [(0, 3, 97, None), (1, 4, 200, 2), (2, 2, 31, 1), (3, 5, 150, 2)])
def test_budgeted_batch_matches_loop_reference_over_the_sweep(seed, k_stages, n, decimals):
    rng = np.random.default_rng(seed)
    conf = rng.random((k_stages, n))
    if decimals is not None:
        conf = np.round(conf, decimals)  # many ties
    conf = conf.astype(f32)
    as_lists = [[float(v) for v in row] for row in conf]
    for j in range(1, 40):
        t, _ = th.budgeted_batch_thresholds(conf, th.geometric_exit_distribution(j / 20, k_stages))
        ref_t, ref_exits = msdnet_reference(as_lists, j)
        assert t.tolist() == [NEVER if r is None else r for r in ref_t], f"p = {j}/20"
        assert th.assign_exits(conf, t).tolist() == ref_exits


def test_exit_counts_equal_quotas_when_confidences_are_distinct():
    rng = np.random.default_rng(7)
    k_stages, n = 4, 500
    conf = np.stack([rng.permutation(n) for _ in range(k_stages)]).astype(f32) / n  # distinct per stage
    correct = rng.random((k_stages, n)) < 0.8
    for pt in th.budgeted_batch_sweep(conf, correct, [1.0, 2.0, 3.0, 4.0]):
        quotas = pt.meta["quotas"]
        assert pt.exit_counts[:-1].tolist() == quotas, pt.meta["p"]
        assert pt.exit_counts[-1] == n - sum(quotas)


# --- solver properties ---------------------------------------------------------------------------------------
@st.composite
def calibration_problem(draw):
    k_stages = draw(st.integers(2, 4))
    n = draw(st.integers(10 * k_stages, 10 * k_stages + 40))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    decimals = draw(st.sampled_from([1, 2, 6]))
    conf = np.round(rng.random((k_stages, n)), decimals).astype(f32)
    acc = np.sort(rng.uniform(0.3, 1.0, k_stages))
    correct = rng.random((k_stages, n)) < acc[:, None]
    flops = np.cumsum(rng.uniform(0.1, 3.0, k_stages))
    lo = th.minimum_cost(flops, n)
    budget = min(1.0, max(lo, draw(st.floats(0.0, 1.0)) * (1.0 - lo) + lo))
    return conf, correct, flops, float(budget)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calibration_problem())
def test_budget_solver_never_exceeds_the_target_and_beats_the_sweep(problem):
    conf, correct, flops, budget = problem
    sweep = th.budgeted_batch_sweep(conf, correct, flops)
    pt = th.solve_budget(conf, correct, flops, budget, sweep_points=sweep)
    again = th.evaluate_thresholds(conf, correct, flops, pt.thresholds)  # independent of the solver's bookkeeping
    assert again.expected_cost <= budget
    assert again.accuracy == pt.accuracy and again.exit_counts.tolist() == pt.exit_counts.tolist()
    feasible = [p.accuracy for p in sweep if p.expected_cost <= budget]
    assert pt.accuracy >= max(feasible, default=0.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calibration_problem(), st.sampled_from([0.0, 0.01, 0.05, 0.2]))
def test_accuracy_solver_stays_within_the_drop(problem, drop):
    conf, correct, flops, _ = problem
    pt = th.solve_max_drop(conf, correct, flops, drop)
    again = th.evaluate_thresholds(conf, correct, flops, pt.thresholds)
    n = conf.shape[1]
    assert int(again.correct_counts.sum()) >= math.ceil(int(correct[-1].sum()) - drop * n - 1e-9)
    assert again.expected_cost <= 1.0 + 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_two_exit_solvers_are_exact_against_brute_force(seed):
    # With one early exit: compare with every threshold the data allows.
    rng = np.random.default_rng(seed)
    n = 40
    conf = np.round(rng.random((2, n)), 1).astype(f32)
    correct = rng.random((2, n)) < np.array([[0.6], [0.9]])
    flops = [1.0, 3.0]
    cands = [NEVER] + sorted({float(v) for v in conf[0]})
    pts = [th.evaluate_thresholds(conf, correct, flops, [c]) for c in cands]
    for budget in (0.4, 0.55, 0.7, 0.9):
        best = max((p for p in pts if p.expected_cost <= budget), key=lambda p: (p.accuracy, -p.expected_cost))
        got = th.solve_budget(conf, correct, flops, budget)
        assert (got.accuracy, got.expected_cost) == (best.accuracy, best.expected_cost)
    for drop in (0.0, 0.05, 0.1):
        need = math.ceil(int(correct[1].sum()) - drop * n - 1e-9) / n
        best = min((p for p in pts if p.accuracy >= need - 1e-12), key=lambda p: (p.expected_cost, -p.accuracy))
        got = th.solve_max_drop(conf, correct, flops, drop)
        assert (got.accuracy, got.expected_cost) == (best.accuracy, best.expected_cost)


def _brute_force(conf, correct, flops):
    """Every combination of distinct thresholds per early exit, plus both sentinels ("never" and "always")."""
    cands = [[NEVER, -NEVER] + sorted({float(v) for v in conf[k]}) for k in range(conf.shape[0] - 1)]
    return [th.evaluate_thresholds(conf, correct, flops, t) for t in itertools.product(*cands)]


def _small_problem(seed, k_stages, n, levels):
    rng = np.random.default_rng(seed)
    conf = (np.floor(rng.random((k_stages, n)) * levels) / levels).astype(f32)  # few levels: many ties
    acc = np.sort(rng.uniform(0.3, 1.0, k_stages))
    correct = rng.random((k_stages, n)) < acc[:, None]
    flops = np.cumsum(rng.uniform(0.1, 3.0, k_stages))
    if seed % 3 == 0:
        flops[1] = flops[0]  # an exit that costs nothing extra
    return conf, correct, flops


@pytest.mark.parametrize("seed,k_stages,n,levels", [
    (0, 3, 30, 10), (1, 3, 30, 4), (2, 4, 40, 6), (3, 4, 45, 5), (4, 5, 50, 3), (5, 3, 40, 40), (6, 4, 40, 12),
])
def test_solvers_match_brute_force(seed, k_stages, n, levels):
    conf, correct, flops = _small_problem(seed, k_stages, n, levels)
    pts = _brute_force(conf, correct, flops)
    lo = th.minimum_cost(flops, n)
    for budget in sorted({lo, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0}):
        if budget < lo:
            continue
        best = max((p for p in pts if p.expected_cost <= budget), key=lambda p: (int(p.correct_counts.sum()), -p.expected_cost))
        got = th.solve_budget(conf, correct, flops, budget)
        assert got.meta["search"] == "exact" and got.meta["gap"] == 0
        assert (got.accuracy, got.expected_cost) == (best.accuracy, best.expected_cost), budget
        assert got.expected_cost <= budget
    for drop in (0.0, 0.03, 0.1, 0.25):
        need = math.ceil(int(correct[-1].sum()) - drop * n - 1e-9)
        best = min((p for p in pts if int(p.correct_counts.sum()) >= need), key=lambda p: (p.expected_cost, -p.accuracy))
        got = th.solve_max_drop(conf, correct, flops, drop)
        assert got.meta["search"] == "exact"
        assert (got.accuracy, got.expected_cost) == (best.accuracy, best.expected_cost), drop


def test_solvers_find_what_a_local_search_misses():
    # The coordinate descent that preceded the exact search stalls on problems like this one; the exact search
    # must reach the brute-force optimum on every seed.
    misses = 0
    for seed in range(12):
        conf, correct, flops = _small_problem(100 + seed, 3, 30, 8)
        pts = _brute_force(conf, correct, flops)
        for budget in (0.5, 0.7):
            if budget < th.minimum_cost(flops, 30):
                continue
            best = max(int(p.correct_counts.sum()) for p in pts if p.expected_cost <= budget)
            got = th.solve_budget(conf, correct, flops, budget)
            misses += int(got.correct_counts.sum()) != best
    assert misses == 0


def test_work_limit_reports_a_heuristic_point_and_its_gap():
    rng = np.random.default_rng(0)
    k_stages, n = 4, 400
    z = rng.normal(size=(k_stages, n)) + np.linspace(0, 2, k_stages)[:, None]
    correct = rng.random((k_stages, n)) < 1 / (1 + np.exp(-2 * z))
    conf = (1 / (1 + np.exp(-z - rng.normal(scale=0.5, size=z.shape)))).astype(f32)
    flops = [0.3, 0.5, 0.7, 1.0]
    exact = th.solve_budget(conf, correct, flops, 0.5)
    capped = th.solve_budget(conf, correct, flops, 0.5, max_cells=1)
    assert exact.meta["search"] == "exact" and exact.meta["gap"] == 0
    assert capped.meta["search_cells"] <= exact.meta["search_cells"]
    assert capped.expected_cost <= 0.5 and capped.accuracy <= exact.accuracy
    if capped.meta["search"] == "heuristic":  # it stopped before proving its point optimal: the gap bounds the loss
        assert capped.meta["gap"] > 0 and capped.accuracy + capped.meta["gap"] >= exact.accuracy - 1e-12
    else:
        assert capped.accuracy == exact.accuracy


def test_pareto_front_is_monotone():
    rng = np.random.default_rng(3)
    conf = rng.random((3, 60)).astype(f32)
    correct = rng.random((3, 60)) < np.array([[0.5], [0.7], [0.9]])
    front = th.pareto_front(th.budgeted_batch_sweep(conf, correct, [1.0, 2.0, 3.0]))
    costs = [p.expected_cost for p in front]
    accs = [p.accuracy for p in front]
    assert costs == sorted(costs) and accs == sorted(accs) and len(set(accs)) == len(accs)
