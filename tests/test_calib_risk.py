"""Risk-controlled exit calibration: the binomial tail and bound, the Learn-then-Test construction, how often
its promise holds on fresh data drawn from a known population, and the calibrate command's record."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from dmpo_edge.calib import risk
from dmpo_edge.calib import thresholds as th
from dmpo_edge.errors import DmpoEdgeError

f32 = np.float32


def test_binomial_tail_and_bound_match_exact_sums():
    for n, k, p in [(300, 0, 0.01), (300, 3, 0.01), (50, 10, 0.3), (1000, 7, 0.004)]:
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert risk.binom_cdf(k, n, p) == pytest.approx(exact, rel=1e-9)
    # zero losses: the bound solves (1 - r)^n = delta
    assert risk.binom_upper_bound(0, 300, 0.1) == pytest.approx(1 - 0.1 ** (1 / 300), rel=1e-9)
    ub = risk.binom_upper_bound(3, 300, 0.1)
    assert risk.binom_cdf(3, 300, ub) == pytest.approx(0.1, rel=1e-6)
    assert risk.binom_cdf(-1, 10, 0.5) == 0.0 and risk.binom_cdf(10, 10, 0.5) == 1.0


def _population(n, seed):
    """Early-exit outputs with the usual structure: later exits more accurate, confidence tracks correctness."""
    rng = np.random.default_rng(seed)
    k_stages = 4
    z = np.linspace(0.2, 2.5, k_stages)[:, None] - rng.normal(size=n)[None, :] + rng.normal(scale=0.7, size=(k_stages, n))
    correct = rng.random((k_stages, n)) < 1 / (1 + np.exp(-2.5 * z))
    conf = (1 / (1 + np.exp(-(1.5 * z + rng.normal(scale=0.6, size=(k_stages, n)))))).astype(f32)
    return conf, correct, np.array([0.3, 0.5, 0.7, 1.0])


def test_disagreement_loss_bounds_the_drop():
    conf, correct, flops = _population(2000, 0)
    t = [0.8, 0.7, 0.6]
    loss = risk.disagreement_losses(conf, correct, t)
    pt = th.evaluate_thresholds(conf, correct, flops, t)
    drop = correct[-1].mean() - pt.accuracy
    assert 0 < drop <= loss.mean()
    assert not risk.disagreement_losses(conf, correct, [th.NEVER_EXIT] * 3).any()  # the full model never loses


@pytest.mark.slow
@pytest.mark.parametrize("path", ["shared", "split"])
def test_promise_holds_on_the_population_at_least_as_often_as_stated(path):
    """Draw validation splits from a large population whose risk is known; the certified thresholds'
    population drop must exceed the target in at most delta of the draws (plus Monte Carlo slack), while the
    plain solver, which fits the split, breaks the same promise far more often."""
    conf, correct, flops = _population(200_000, 1)
    rng = np.random.default_rng(2)
    max_drop, confidence, n, draws = 0.02, 0.8, 400, 60
    final = correct[-1].mean()
    broken, naive_broken, saved = 0, 0, []
    for _ in range(draws):
        idx = rng.choice(conf.shape[1], n, replace=False)
        pt = risk.risk_controlled_max_drop(conf[:, idx], correct[:, idx], flops, max_drop, confidence, path=path)
        pop = th.evaluate_thresholds(conf, correct, flops, pt.thresholds)
        broken += final - pop.accuracy > max_drop
        saved.append(1 - pop.expected_cost)
        r = pt.meta["risk"]
        assert r["full_model_only"] or r["upper_bound"] <= max_drop
        naive = th.solve_max_drop(conf[:, idx], correct[:, idx], flops, max_drop)
        naive_broken += final - th.evaluate_thresholds(conf, correct, flops, naive.thresholds).accuracy > max_drop
    delta = 1 - confidence
    assert broken / draws <= delta + 2.5 * math.sqrt(delta * (1 - delta) / draws)
    assert naive_broken > broken
    assert np.mean(saved) > 0.05  # it is not the trivial "never exit early" answer


def test_a_split_too_small_to_prove_anything_keeps_the_full_model():
    conf, correct, flops = _population(60, 3)
    pt = risk.risk_controlled_max_drop(conf, correct, flops, 0.01, 0.9)
    r = pt.meta["risk"]
    assert r["full_model_only"] and r["upper_bound"] == 0.0
    assert pt.exit_counts.tolist() == [0, 0, 0, 60] and pt.expected_cost == 1.0
    # (0.99)^60 > 0.1: even zero losses on 60 samples cannot show a risk below 1%
    assert r["points_tested"] == 1 and r["stopped_at_p_value"] > 0.1


def test_bad_risk_arguments_are_one_clear_error():
    conf, correct, flops = _population(100, 4)
    for kw, msg in [({"confidence_level": 1.0}, "confidence"), ({"confidence_level": 0.0}, "confidence"),
                    ({"path": "zigzag"}, "risk path"), ({"path": "split", "path_fraction": 1.5}, "path fraction")]:
        args = {"confidence_level": 0.9, **kw}
        with pytest.raises(DmpoEdgeError, match=msg):
            risk.risk_controlled_max_drop(conf, correct, flops, 0.01, **args)
    with pytest.raises(DmpoEdgeError, match="max drop"):
        risk.risk_controlled_max_drop(conf, correct, flops, 0.0, 0.9)


# --- the calibrate command ------------------------------------------------------------------------------------
def test_cli_records_method_confidence_and_bound(toy_bundle, tmp_path, capsys):
    import shutil

    from dmpo_edge.bundle import Bundle
    from dmpo_edge.calib.evaluate import StageOutputs, calibrate
    from dmpo_edge.cli import main

    from dmpo_edge.policies import max_softmax

    path = str(tmp_path / "b")
    shutil.copytree(toy_bundle(num_stages=4, classes=10).path, path)
    b = Bundle.load(path)
    n = 3000
    score, correct, _ = _population(n, 5)
    # logits whose max-softmax is the population's score (mapped into (0.1, 1)), on the label when right
    target = 0.1 + 0.9 * score.astype(np.float64)
    lift = np.log(9 * target / (1 - target + 1e-12))
    logits = np.zeros((4, n, 10), f32)
    pred = np.where(correct, 0, 1)
    np.put_along_axis(logits, pred[..., None], lift[..., None].astype(f32), axis=2)
    conf = np.stack([max_softmax(logits[k]) for k in range(4)])
    out = StageOutputs(confidence=conf, prediction=pred.astype(np.int64), logits=logits, labels=np.zeros(n, np.int64),
                       cumulative_flops=np.asarray(b.cumulative_flops, np.float64), policy="max_softmax",
                       data={"source": "synthetic", "size": n, "fingerprint": "synthetic"})
    rep = calibrate(path, outputs=out, max_drop=0.02, confidence=0.9, plot=False)
    rec = Bundle.load(path).manifest["thresholds"]
    assert rec["method"] == "max_drop_risk" and rec["target"] == 0.02
    assert rec["risk"]["confidence"] == 0.9 and 0 < rec["risk"]["upper_bound"] <= 0.02
    with open(os.path.join(path, "reports", "calibration.json")) as f:
        assert json.load(f)["thresholds"]["risk"] == rec["risk"]
    assert rep["chosen"]["risk"]["losses"] == rec["risk"]["losses"]
    with pytest.raises(DmpoEdgeError, match="--confidence goes with --max-drop"):
        calibrate(path, outputs=out, budget=0.5, confidence=0.9, plot=False)
    rc = main(["calibrate", path, "--val", "digits:val", "--budget", "0.5", "--confidence", "0.9", "--quiet"])
    assert rc == 2 and "--confidence goes with --max-drop" in capsys.readouterr().err
