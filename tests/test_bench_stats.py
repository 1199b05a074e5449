"""Bench statistics against hand-computed values (trtexec's percentile definition) and the cost model."""

import math

import numpy as np
import pytest

from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.runtime.bench import parse_batch_list, parse_thresholds
from dmpo_edge.runtime.bench_stats import (
    exit_histogram, expected_cost, ideal_speedup, median, percentile, simulate_exits, summarize, thresholds_for_budget,
)


def test_percentile_follows_trtexec_not_numpy():
    # trtexec: sorted[max(n - 1 - int((1 - p/100) * n), 0)] in float32.
    ten = [7, 3, 10, 1, 5, 9, 2, 8, 6, 4]  # 1..10, shuffled
    # p90, n=10: (1 - 0.9f) * 10 = 1.0000002 -> exclude 1 -> sorted[8] = 9 (float64 would exclude 0 -> 10)
    assert percentile(ten, 90) == 9.0
    assert percentile(ten, 95) == 10.0  # 0.5 -> exclude 0
    assert percentile(ten, 99) == 10.0
    assert percentile(ten, 50) == 5.0  # exclude 5 -> sorted[4]
    hundred = np.arange(100, 0, -1)  # 100..1
    assert percentile(hundred, 90) == 90.0  # exclude 10 -> sorted[89]
    assert percentile(hundred, 95) == 95.0  # exclude 5 -> sorted[94]
    # 1 - 0.99f = 0.00999999 -> * 100 = 0.999999 -> exclude 0: p99 of 100 timings is the max in trtexec
    assert percentile(hundred, 99) == 100.0
    assert np.percentile(np.arange(1, 101), 99) != 100.0  # numpy interpolates: a different definition
    twenty = np.arange(1, 21)
    assert (percentile(twenty, 90), percentile(twenty, 95), percentile(twenty, 99)) == (18.0, 19.0, 20.0)
    assert percentile([4.0], 99) == 4.0 and percentile([4.0], 0) == 4.0
    assert percentile([], 90) == math.inf
    with pytest.raises(DmpoEdgeError):
        percentile(ten, 101)


def test_median_and_summary_by_hand():
    assert median([3, 1, 2]) == 2.0
    assert median([4, 1, 3, 2]) == 2.5
    s = summarize([0.004, 0.001, 0.003, 0.002])  # seconds -> ms
    assert s["count"] == 4
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(4.0)
    assert s["mean"] == pytest.approx(2.5) and s["median"] == pytest.approx(2.5)
    # n=4: p90 excludes int(0.4) = 0 -> max
    assert s["p90"] == pytest.approx(4.0) and s["p99"] == pytest.approx(4.0)
    # population std of 1,2,3,4 = sqrt(1.25); cv = std / mean in percent
    assert s["cv_percent"] == pytest.approx(math.sqrt(1.25) / 2.5 * 100)
    assert summarize([]) == {"count": 0}


def test_exit_rule_histogram_and_speedups_by_hand():
    conf = np.array([[0.95, 0.2, 0.5, 0.9],  # stage 0
                     [0.10, 0.85, 0.6, 0.1],  # stage 1
                     [0.30, 0.30, 0.3, 0.3]], np.float32)
    ex = simulate_exits(conf, [0.9, 0.8])
    assert ex.tolist() == [0, 1, 2, 0]  # >= is inclusive (0.9 leaves at 0.9)
    hist = exit_histogram(ex, 3)
    assert hist == [2, 1, 1] and sum(hist) == 4
    cum = [1.0, 2.0, 4.0]
    assert expected_cost(hist, cum) == pytest.approx((2 * 1 + 1 * 2 + 1 * 4) / 4)
    assert ideal_speedup(hist, cum) == pytest.approx(4.0 / 2.0)
    assert ideal_speedup([0, 0, 5], cum) == pytest.approx(1.0)  # nobody exits early: no gain
    with pytest.raises(DmpoEdgeError):
        simulate_exits(conf, [0.9])


def test_quantile_budget_planner_meets_the_budget():
    rng = np.random.default_rng(0)
    conf = np.sort(rng.uniform(0.2, 1.0, size=(3, 500)), axis=0).astype(np.float32)  # deeper = surer
    cum = [1.0, 2.0, 4.0]
    costs = []
    for budget in (0.3, 0.5, 0.7, 0.9):
        th, cost = thresholds_for_budget(conf, cum, budget)
        hist = exit_histogram(simulate_exits(conf, th), 3)
        assert cost == pytest.approx(expected_cost(hist, cum) / 4.0)
        assert cost <= budget + 1e-9
        costs.append(cost)
    assert costs == sorted(costs) and costs[-1] > 0.8  # a looser budget is used, not wasted
    th, cost = thresholds_for_budget(conf, cum, 1.0)
    assert cost == pytest.approx(1.0)  # the full budget needs no early exit
    th, cost = thresholds_for_budget(conf, cum, 0.1)  # below exit 0's cost: everyone at exit 0
    assert cost == pytest.approx(0.25)


@pytest.mark.parametrize("text", ["", "1,,8", "a", "1.5", "0", "-4", "8,8"])
def test_malformed_batch_lists(text):
    with pytest.raises(DmpoEdgeError) as e:
        parse_batch_list(text, 64)
    assert "--batch" in str(e.value)


def test_batch_list_and_max_batch():
    assert parse_batch_list(" 1, 8,32", 32) == [1, 8, 32]
    with pytest.raises(DmpoEdgeError, match="max batch 16"):
        parse_batch_list("1,8,32", 16)


@pytest.mark.parametrize("text,match", [("0.9", "Expected 2"), ("0.9,0.8,0.7", "Expected 2"), ("0.9,x", "not a number"),
                                        ("0.9,nan", "not finite"), ("0.9,", "malformed")])
def test_malformed_thresholds(text, match):
    with pytest.raises(DmpoEdgeError, match=match):
        parse_thresholds(text, 3)
    assert parse_thresholds("0.9, 0.8", 3) == [0.9, 0.8]
