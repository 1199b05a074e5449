"""Risk-controlled exit thresholds: an accuracy-drop promise that holds on new data with a stated confidence.

``solve_max_drop`` meets ``--max-drop`` on the validation split it was fit on; on new data the drop is
larger (it picked the cheapest point that just passes, so it rides the split's luck). This module follows
Learn then Test (Angelopoulos, Bates, Candes, Jordan, Lei, 2021):

- loss per sample ``L_i(t) = 1[the early-exit answer is wrong and the final exit's answer is right]``.
  The accuracy drop against the final exit is ``E[final right] - E[exit right] = E[L] - E[exit right, final
  wrong] <= E[L] =: R(t)``, so ``R(t) <= max_drop`` implies the promised drop. L is 0/1, so the number of
  losses on n independent samples is binomial and its tail is an exact, valid p-value for
  ``H_t: R(t) > max_drop`` (tighter than the Hoeffding-Bentkus bound, which LTT uses for general bounded losses);
- the candidates form a path fixed before the tested samples are looked at, ordered from the full model
  (R = 0 exactly, nothing to test) towards cheaper thresholds; fixed-sequence testing rejects ``H_t`` along
  the path at level ``delta = 1 - confidence`` and stops at the first it cannot reject. Every rejected point
  then has ``R(t) <= max_drop`` simultaneously with probability >= ``confidence`` over the draw of the
  validation split, and the cheapest of them is returned;
- the path must not depend on the tested samples (choosing thresholds on them and testing them there is
  what made the plain solver over-promise). ``path="shared"``: one threshold for every exit on a fixed grid
  of the policy's [0, 1] range, all samples tested; ``path="split"``: a seeded part of the split
  (``path_fraction``) fits the budgeted-batch sweep, whose points, most expensive first, are tested on the rest.

The printed bound is the one-sided Clopper-Pearson upper confidence bound on ``R`` at the chosen point (a
pointwise figure: it is <= ``max_drop`` exactly when that point's test passed). The guarantee itself is the
target: every certified point, the chosen one included, has ``R <= max_drop`` with the stated probability.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import DmpoEdgeError
from ..policies import NEVER_EXIT

__all__ = ["RISK_PATHS", "binom_cdf", "binom_upper_bound", "shared_grid", "disagreement_losses", "risk_controlled_max_drop"]

RISK_PATHS = ("shared", "split")
LOSS = "1[early exit wrong and final exit right] (bounds the accuracy drop against the final exit)"


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (exact up to float rounding for the n of a validation split)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1, dtype=np.float64)
    log_comb = np.r_[0.0, np.cumsum(np.log(n - i[1:] + 1) - np.log(i[1:]))]
    logs = log_comb + i * math.log(p) + (n - i) * math.log1p(-p)
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def binom_upper_bound(k: int, n: int, delta: float) -> float:
    """One-sided Clopper-Pearson bound: the largest r with P(Binomial(n, r) <= k) >= delta (so R <= r w.p. 1 - delta)."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(100):  # bisection to float precision
        mid = 0.5 * (lo + hi)
        if binom_cdf(k, n, mid) >= delta:
            lo = mid
        else:
            hi = mid
    return hi


def shared_grid() -> np.ndarray:
    """A fixed, data-independent grid of exit thresholds on [0, 1], descending, dense near 1 where softmax saturates."""
    g = np.r_[np.linspace(0.0, 1.0, 1001), 1.0 - np.logspace(-7, -3, 161)]
    return np.unique(g)[::-1]


def disagreement_losses(conf, corr, thresholds) -> np.ndarray:
    """Per-sample loss: 1 where the sample's exit answers wrong while the final exit answers right."""
    from .thresholds import assign_exits

    ex = assign_exits(conf, thresholds)
    n = conf.shape[1]
    return (~corr[ex, np.arange(n)]) & corr[-1]


def _fixed_sequence(conf, corr, flops, path, max_drop, delta):
    """Test the path in order on (conf, corr); the certified points (the full model first) and each test's record."""
    from .thresholds import assign_exits
    from .search import flops_sum

    k_stages, n = conf.shape
    certified, tested = [], 0
    last_p = None
    for t in path:
        t = np.asarray(t, np.float64)
        losses = int(disagreement_losses(conf, corr, t).sum())
        full_model = bool(np.all(t >= NEVER_EXIT))
        if full_model:
            p = 0.0  # R = 0 exactly: nobody leaves early
        else:
            tested += 1
            p = binom_cdf(losses, n, max_drop)
            last_p = p
            if p > delta:
                break
        counts = np.bincount(assign_exits(conf, t), minlength=k_stages)
        certified.append((flops_sum([int(c) for c in counts], flops), losses, t, p))
    return certified, tested, last_p


def risk_controlled_max_drop(confidence, correct, cumulative_flops, max_drop: float, confidence_level: float,
                             path: str = "shared", path_fraction: float = 0.5, seed: int = 0):
    """Cheapest thresholds whose accuracy drop against the final exit is <= ``max_drop`` on new data from the
    split's distribution, with probability >= ``confidence_level`` over the draw of the split.

    Returns an :class:`~dmpo_edge.calib.thresholds.OperatingPoint` evaluated on the whole split, with the
    guarantee in ``meta["risk"]``.
    """
    from . import thresholds as th

    conf, corr, flops = th.check_calibration_arrays(confidence, correct, cumulative_flops)
    if isinstance(confidence_level, bool) or not isinstance(confidence_level, (int, float)) \
            or not math.isfinite(confidence_level) or not 0 < confidence_level < 1:
        raise DmpoEdgeError("calibration", f"confidence {confidence_level!r} is out of range. Expected a probability in (0, 1), e.g. 0.9")
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and 0 < max_drop < 1):
        raise DmpoEdgeError("calibration", f"max drop {max_drop!r} with --confidence must be in (0, 1), e.g. 0.01 for 1 point")
    if path not in RISK_PATHS:
        raise DmpoEdgeError("calibration", f"unknown risk path '{path}'. Expected one of {', '.join(RISK_PATHS)}")
    delta = 1.0 - float(confidence_level)
    k_stages, n = conf.shape
    never = np.full(k_stages - 1, NEVER_EXIT)
    if path == "shared":
        test_idx = np.arange(n)
        candidates = [never] + [np.full(k_stages - 1, s) for s in shared_grid()]
        path_info = {"path": "shared", "path_note": "one threshold for every exit on a fixed grid of [0, 1] (1,162 values)"}
    else:
        if not 0 < path_fraction < 1:
            raise DmpoEdgeError("calibration", f"path fraction {path_fraction!r} must be in (0, 1), e.g. 0.5")
        perm = np.random.default_rng(seed).permutation(n)
        cut = int(round(path_fraction * n))
        fit_idx, test_idx = np.sort(perm[:cut]), np.sort(perm[cut:])
        if fit_idx.size < th.MIN_SAMPLES_PER_EXIT * k_stages or test_idx.size == 0:
            raise DmpoEdgeError(
                "calibration", f"the validation split ({n} samples) is too small to split for the risk path "
                f"(needs {th.MIN_SAMPLES_PER_EXIT * k_stages} to fit it plus samples to test). Use --risk-path shared",
            )
        sweep = th.budgeted_batch_sweep(conf[:, fit_idx], corr[:, fit_idx], flops, check=False)
        sweep.sort(key=lambda p: (-p.expected_cost, p.meta["p"]))
        candidates = [never] + [p.thresholds for p in sweep]
        path_info = {"path": "split", "path_fraction": float(path_fraction), "seed": int(seed),
                     "path_note": f"budgeted-batch sweep fit on {fit_idx.size} samples, tested on the other {test_idx.size}"}
    c_t, k_t = conf[:, test_idx], corr[:, test_idx]
    certified, tested, last_p = _fixed_sequence(c_t, k_t, flops, candidates, float(max_drop), delta)
    m = test_idx.size
    cost_sum, losses, t, p = min(certified, key=lambda c: (c[0], c[1]))
    point = th.evaluate_thresholds(conf, corr, flops, t)
    full_only = bool(np.all(t >= NEVER_EXIT))
    # the full model's risk is exactly 0 (nobody leaves early); any other point gets its confidence bound
    bound = 0.0 if full_only else binom_upper_bound(losses, m, delta)
    final_acc = float(corr[-1].mean())
    point.meta.update({
        "method": "max_drop_risk", "target": float(max_drop), "final_exit_accuracy": final_acc,
        "risk": {
            "confidence": float(confidence_level), "delta": delta, "max_drop": float(max_drop), "loss": LOSS,
            "test": "Learn then Test: exact binomial tail p-values, fixed-sequence testing along the path",
            **path_info, "tested_samples": int(m), "path_points": len(candidates), "points_tested": int(tested),
            "points_certified": len(certified), "losses": int(losses), "p_value": float(p),
            "stopped_at_p_value": None if last_p is None or last_p <= delta else float(last_p),
            "upper_bound": float(bound), "full_model_only": full_only,
            "validation_drop": final_acc - point.accuracy,
        },
    })
    return point
