"""Thresholds by time: ``calibrate --latency-budget MS``, and per-exit payoff (does an exit pay for its head?).

Both use the cost of each exit in the unit that matters on the target. For the latency budget that is the
measured time per sample to reach and evaluate exit k on this machine (``reports/latency.json``, written by
``dmpo-edge bench``); the threshold solver is the FLOP-budget one run on those cumulative times instead of
cumulative FLOPs, and the chosen point is then reported in both units.

Payoff of an early exit k at given thresholds: its *share* (samples leaving there), what it *saves* (the
cost those samples would have spent further on, had exit k not been there: re-simulated with the same
thresholds for the other exits) against what its *head costs* every sample that reaches it. ``net`` is
saving minus head cost: an exit with ``net <= 0`` does not pay and can be left out with
``dmpo-edge compile --exits``.
"""

from __future__ import annotations

import numpy as np

from ..errors import DmpoEdgeError
from ..runtime.bench_stats import first_exits

__all__ = ["latency_costs", "solve_latency_budget", "exit_payoff", "head_costs"]


def latency_costs(bundle, batch: int | None = None, backend: str | None = None) -> tuple:
    """(cumulative ms per sample to reach and evaluate each exit, the latency entry used) on this machine."""
    from ..runtime.latency import find_latency

    entry = find_latency(bundle, batch=batch, backend=backend)
    cum = [float(v) for v in entry["cumulative_ms_per_sample"]]
    if len(cum) != bundle.num_stages or any(not np.isfinite(v) or v < 0 for v in cum):
        raise DmpoEdgeError("calibrate", "reports/latency.json does not match the bundle's stages. Measure again: "
                            f"dmpo-edge bench {bundle.path} --batch {entry.get('batch', 1)}")
    return cum, entry


def solve_latency_budget(bundle, confidence, correct, cumulative_flops, budget_ms: float, batch: int | None = None,
                         backend: str | None = None, sweep_points=None) -> tuple:
    """Best validation accuracy with expected time per sample <= ``budget_ms``: (point in FLOPs, time record)."""
    from . import thresholds as th

    cum_ms, entry = latency_costs(bundle, batch, backend)
    cheapest = min(cum_ms)
    if not budget_ms >= cheapest:
        raise DmpoEdgeError(
            "calibrate", f"--latency-budget {budget_ms:g} ms is below the cheapest point, {cheapest:.4f} ms per sample "
            f"(every sample leaving at exit 0, batch {entry['batch']}, measured on this machine). Use at least {cheapest:.4f}")
    frac = min(1.0, float(budget_ms) / cum_ms[-1])
    timed = th.solve_budget(confidence, correct, np.asarray(cum_ms, np.float64), frac)
    point = th.evaluate_thresholds(confidence, correct, cumulative_flops, timed.thresholds)
    dist = np.asarray(point.exit_distribution, np.float64)
    record = {"budget_ms": float(budget_ms), "batch": int(entry["batch"]), "backend": entry["backend"],
              "machine": entry["machine"], "measured": entry.get("measured"),
              "cumulative_ms_per_sample": cum_ms, "expected_ms_per_sample": float(dist @ np.asarray(cum_ms)),
              "static_ms_per_sample": cum_ms[-1]}
    return point, record


def head_costs(bundle) -> list | None:
    """Per-stage cost of the exit head alone (FLOPs per sample), from the manifest; None for older bundles."""
    heads = [st.get("head_flops") for st in bundle.stages]
    if any(not isinstance(h, (int, float)) for h in heads):
        return None
    return [float(h) for h in heads]


def exit_payoff(confidence, correct, cumulative_cost, head_cost, thresholds) -> list:
    """Per early exit: share, saving, head cost and net, in the units of ``cumulative_cost`` per sample.

    ``cumulative_cost[k]``: cost to reach and evaluate exit k (trunk and every head up to k);
    ``head_cost[k]``: exit k's head alone. Also the accuracy change if the exit were left out.
    """
    conf = np.asarray(confidence, np.float64)
    corr = np.asarray(correct, bool)
    cum = np.asarray(cumulative_cost, np.float64)
    heads = np.asarray(head_cost, np.float64)
    th = np.asarray(thresholds, np.float64)
    K, n = conf.shape
    rows = np.arange(n)
    ex = first_exits(conf, th)
    base_cost = float(cum[ex].mean())
    base_acc = float(corr[ex, rows].mean())
    out = []
    for k in range(K - 1):
        t2 = th.copy()
        t2[k] = np.inf  # nobody leaves at k ...
        cum2 = cum.copy()
        cum2[k:] -= heads[k]  # ... and nobody pays for its head
        ex2 = first_exits(conf, t2)
        without = float(cum2[ex2].mean())
        reach = float((ex >= k).mean())
        head = reach * float(heads[k])
        net = without - base_cost
        out.append({"exit": k, "share": float((ex == k).mean()), "reach": reach, "head_cost": head,
                    "saving": net + head, "net": net, "pays": bool(net > 0),
                    "accuracy_change_without": float(corr[ex2, rows].mean()) - base_acc})
    return out
