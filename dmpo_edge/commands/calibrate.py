"""``dmpo-edge calibrate BUNDLE --val DATA (--budget X | --max-drop Y | --sweep [--pick-budget X])``.

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
                      help="best validation accuracy with expected cost <= X of the full model's FLOPs (e.g. 0.4)")
    mode.add_argument("--max-drop", type=float, metavar="Y",
                      help="cheapest thresholds within Y accuracy (fraction, 0.01 = 1 point) of the last exit")
    mode.add_argument("--sweep", action="store_true",
                      help="MSDNet budgeted-batch sweep; records the best point under --pick-budget (default: the "
                           "cheapest point with the sweep's best accuracy)")
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


def run(args) -> int:
    from ..bundle import Bundle
    from ..calib.evaluate import CALIBRATION_PLOT, CALIBRATION_REPORT, calibrate

    from .options import checked_backend

    bundle = Bundle.load(args.bundle)
    backend = checked_backend(args.backend, bundle, where="calibrate")
    report = calibrate(bundle, args.val, budget=args.budget, max_drop=args.max_drop, sweep_only=args.sweep,
                       pick_budget=args.pick_budget, batch_size=args.batch_size, backend=backend,
                       progress=not args.quiet)
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
    print(f"wrote {CALIBRATION_REPORT}, {CALIBRATION_PLOT} and the manifest's thresholds")
    if args.json:
        write_report(args.json, report)
        print(f"wrote {args.json}")
    return 0
