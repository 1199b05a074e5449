"""``dmpo-edge calibrate BUNDLE --val DATA (--budget X | --max-drop Y [--confidence C] | --sweep [--pick-budget X])``.

Re-thresholds a bundle without recompiling: runs the deployed stages on the labelled held-out split,
chooses the thresholds and records them in the manifest, with ``reports/calibration.json`` and
``reports/calibration.png`` beside it (each written atomically).
"""

from __future__ import annotations

from ..policies import format_thresholds

__all__ = ["add_arguments", "run"]


def add_arguments(p) -> None:
    from .options import add_backend, add_batch_size, add_bundle, add_data, add_json_report, add_quiet

    add_bundle(p)
    add_data(p, "--val", what="labelled held-out split", split="val", required=True)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--budget", type=float, metavar="X",
                      help="the most accurate thresholds on the validation split (exact search) with expected cost "
                           "<= X of the full model's FLOPs (e.g. 0.4)")
    mode.add_argument("--max-drop", type=float, metavar="Y",
                      help="the cheapest thresholds on the validation split (exact search) within Y accuracy "
                           "(fraction, 0.01 = 1 point) of the last exit; on new data the drop can be larger, "
                           "see --confidence")
    p.add_argument("--confidence", type=float, metavar="C",
                   help="with --max-drop: risk-controlled thresholds whose accuracy drop against the last exit on new "
                        "data from the same distribution stays within Y with probability >= C (e.g. 0.9), given the "
                        "validation size (Learn then Test, binomial bound); prints the bound")
    p.add_argument("--risk-path", choices=("shared", "split"), default="shared",
                   help="with --confidence: candidates tested in order: 'shared' one threshold for every exit on a "
                        "fixed grid, all samples tested (default); 'split' the budgeted-batch sweep fit on half of "
                        "the split, tested on the other half")
    mode.add_argument("--sweep", action="store_true",
                      help="MSDNet budgeted-batch sweep; records the best point under --pick-budget (default: the "
                           "cheapest point with the sweep's best accuracy)")
    mode.add_argument("--latency-budget", type=float, metavar="MS",
                      help="best validation accuracy with expected time per sample <= MS milliseconds, from the per-stage "
                           "times 'dmpo-edge bench' measured on this machine (reports/latency.json)")
    p.add_argument("--latency-batch", type=int, metavar="B",
                   help="with --latency-budget: the batch size whose timings to use (default 1 when measured, else the "
                        "smallest measured)")
    p.add_argument("--cost-axis", default="flops", choices=("flops", "time"),
                   help="cost axis of reports/calibration.png: expected FLOPs (default) or expected ms per sample from "
                        "this machine's measured per-stage times")
    p.add_argument("--pick-budget", type=float, metavar="X", help="with --sweep: the cost cap for the recorded point")
    add_batch_size(p, what="stage batch size while measuring")
    add_backend(p)
    add_json_report(p, what="calibration report")
    add_quiet(p)


def write_report(path: str, report: dict) -> None:
    """Write a JSON report atomically, creating its folder; an unwritable place is one clear error."""
    import os

    from ..bundle import write_json_atomic
    from ..errors import DmpoEdgeError

    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json_atomic(path, report)
    except OSError as exc:
        raise DmpoEdgeError("report", f"cannot write '{path}' ({exc}). Expected a writable path") from None


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:5.1f}%"


def print_point(label: str, pt: dict) -> None:
    dist = " / ".join(f"{100 * d:.0f}" for d in pt["exit_distribution"])
    print(f"{label}: accuracy {_pct(pt['accuracy'])}  cost {_pct(pt['expected_cost'])} of full FLOPs "
          f"({pt['expected_flops'] / 1e6:.3f} MFLOPs/sample, ideal speed-up {pt['speedup_ideal']:.2f}x)  "
          f"exits % [{dist}]")


def print_curve(points: list, title: str) -> None:
    print(title)
    print("      p   accuracy   cost   MFLOPs  exit distribution (%)")
    for pt in sorted(points, key=lambda q: q["expected_cost"]):
        p = pt.get("p")
        dist = " ".join(f"{100 * d:4.0f}" for d in pt["exit_distribution"])
        print(f"  {'' if p is None else format(p, '5.2f'):>5}   {_pct(pt['accuracy'])}  {_pct(pt['expected_cost'])}  "
              f"{pt['expected_flops'] / 1e6:7.3f}  {dist}")


def print_exits(exits: list) -> None:
    print("per-exit (anytime) accuracy:")
    for e in exits:
        print(f"  exit {e['exit']}: {_pct(e['accuracy'])}  at {_pct(e['cost'])} of full FLOPs ({e['cumulative_flops'] / 1e6:.3f} MFLOPs)")


def print_time_and_payoff(report: dict) -> None:
    """Expected time per sample (when measured on this machine) and whether each early exit pays for its head."""
    lat = report.get("latency")
    if lat:
        print(f"time (measured here, batch {lat['batch']}, {lat['backend']}): {lat['expected_ms_per_sample']:.4f} ms per "
              f"sample expected, static pipeline {lat['static_ms_per_sample']:.4f} ms")
    pay = report.get("exit_payoff") or {}
    unit, rows = ("ms/sample", pay["ms_per_sample"]) if "ms_per_sample" in pay else ("% of full FLOPs", pay.get("flops_fraction"))
    if not rows:
        return
    scale = 1.0 if unit == "ms/sample" else 100.0
    print(f"exits that pay (at these thresholds; {unit}): share, saving by its leavers, its head's cost to all who reach it")
    for e in rows:
        verdict = "pays" if e["pays"] else "does not pay: leave it out with compile --exits"
        print(f"  exit {e['exit']}: takes {100 * e['share']:5.1f}%  saves {scale * e['saving']:.4f}  head costs "
              f"{scale * e['head_cost']:.4f}  net {scale * e['net']:+.4f}  ({verdict}; accuracy without it "
              f"{100 * e['accuracy_change_without']:+.2f} points)")


def print_risk(risk: dict) -> None:
    """The promise in words: what holds, with which probability, and the bound that backs it."""
    conf, drop = risk["confidence"], risk["max_drop"]
    print(f"risk control ({risk['path']} path, {risk['points_tested']} of {risk['path_points']} candidates tested on "
          f"{risk['tested_samples']} samples, {risk['points_certified']} certified):")
    if risk["full_model_only"]:
        print(f"  no early-exit point could be certified: with {risk['tested_samples']} samples a drop <= {100 * drop:.2f} "
              f"points at {100 * conf:g}% confidence is not provable; every sample runs to the last exit. Give a larger --val "
              f"split or a looser --max-drop / --confidence")
        return
    print(f"  with probability >= {100 * conf:g}% over the validation draw, the accuracy drop against the last exit on new "
          f"data is <= {100 * drop:.2f} points")
    print(f"  bound: P(early exit wrong, last exit right) <= {100 * risk['upper_bound']:.2f}% ({100 * conf:g}% upper "
          f"confidence bound; {risk['losses']} of {risk['tested_samples']} samples)")


def run(args) -> int:
    from ..bundle import Bundle
    from ..calib.evaluate import CALIBRATION_PLOT, CALIBRATION_REPORT, calibrate

    from .options import checked_backend

    bundle = Bundle.load(args.bundle)
    backend = checked_backend(args.backend, bundle, where="calibrate")
    report = calibrate(bundle, args.val, budget=args.budget, max_drop=args.max_drop, sweep_only=args.sweep,
                       pick_budget=args.pick_budget, confidence=args.confidence, risk_path=args.risk_path,
                       batch_size=args.batch_size, backend=backend,
                       progress=not args.quiet, latency_budget_ms=args.latency_budget, latency_batch=args.latency_batch,
                       cost_axis=args.cost_axis)
    split = report["split"]
    print(f"calibrated {bundle.path} ({report['precision']}, policy {report['policy']}) on {split['source']} "
          f"({split['size']} samples, backend {backend})")
    print_exits(report["exits"])
    print_curve(report["sweep"], "budgeted-batch sweep (validation):")
    rec = report["thresholds"]
    target = rec["target"] if rec["target"] is not None else "none: the cheapest sweep point with the best accuracy"
    print(f"method {rec['method']}, target {target}")
    print("thresholds: " + format_thresholds(rec["values"]))
    print_point("validation", report["chosen"])
    if rec.get("search") == "heuristic":
        gap = rec.get("gap", float("nan"))
        within = (f"{100 * gap:.2f} accuracy points" if rec["method"] == "budget"
                  else f"{gap / 1e6:.4g} MFLOPs per sample")
        print(f"search: stopped at its work limit (heuristic, not proven optimal); the optimum is at most {within} better")
    risk = rec.get("risk")
    if risk:
        print_risk(risk)
    print_time_and_payoff(report)
    print(f"wrote {CALIBRATION_REPORT}, {CALIBRATION_PLOT} and the manifest's thresholds")
    if args.json:
        write_report(args.json, report)
        print(f"wrote {args.json}")
    return 0
