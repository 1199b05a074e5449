"""Per-exit accuracy of the reduced-precision graphs against the FP32 graphs on held-out data."""

from __future__ import annotations

import numpy as np

__all__ = ["exit_metrics", "precision_report", "MAX_EXIT_DROP_POINTS", "loud_warnings", "budget_misses", "budget_error"]

#: the accuracy budget per exit (``compile --max-exit-drop``): an exit of a reduced-precision form that loses more
#: than this many points against FP32 on the held-out data fails the compile unless ``--accept-drop``
MAX_EXIT_DROP_POINTS = 0.5


def exit_metrics(outputs: list, labels) -> list:
    """Per exit: accuracy (when labelled) and the mean confidence."""
    res = []
    for out in outputs:
        pred = np.asarray(out["prediction"]).astype(np.int64)
        m = {"mean_confidence": float(np.mean(out["confidence"])) if len(pred) else None}
        if labels is not None:
            m["accuracy"] = float((pred == labels).mean()) if len(pred) else None
        res.append(m)
    return res


def precision_report(reference: list, variants: dict, labels, data_info: dict | None,
                     references: dict | None = None, max_exit_drop: float = MAX_EXIT_DROP_POINTS) -> dict:
    """``reference``: FP32 chain outputs; ``variants``: name -> chain outputs (e.g. 'int8', 'int8-cpu');
    ``references``: name -> how that variant was run (the faithful Q/DQ simulation, the host's kernels...).

    Each exit gets ``budget_points``: the accuracy drop in points, or, without labels, the top-1 disagreement with
    FP32 in points (an upper bound of the drop); it is what ``--max-exit-drop`` is checked against.
    """
    max_exit_drop = float(max_exit_drop)
    report = {"data": data_info, "max_exit_drop_points": max_exit_drop, "fp32": exit_metrics(reference, labels),
              "variants": {}, "measured_with": dict(references or {}), "warnings": []}
    for name, outs in variants.items():
        per_exit = []
        for k, (ref, got) in enumerate(zip(reference, outs)):
            agree = float((np.asarray(ref["prediction"]) == np.asarray(got["prediction"])).mean())
            diff = np.abs(np.asarray(ref["logits"], np.float64) - np.asarray(got["logits"], np.float64))
            e = {"exit": k, "top1_agreement": agree, "logits_max_abs_diff": float(diff.max(initial=0.0))}
            if labels is not None:
                acc = float((np.asarray(got["prediction"]).astype(np.int64) == labels).mean())
                ref_acc = float((np.asarray(ref["prediction"]).astype(np.int64) == labels).mean())
                e.update({"accuracy": acc, "fp32_accuracy": ref_acc, "drop_points": 100.0 * (ref_acc - acc)})
                e["budget_points"] = e["drop_points"]
                if e["drop_points"] > max_exit_drop + 1e-9:
                    report["warnings"].append(
                        f"{name}: exit {k} loses {e['drop_points']:.2f} accuracy points ({100 * ref_acc:.2f}% -> {100 * acc:.2f}%)"
                    )
            else:
                e["budget_points"] = 100.0 * (1.0 - agree)
                if e["budget_points"] > max_exit_drop + 1e-9:
                    report["warnings"].append(f"{name}: exit {k} disagrees with FP32 on {e['budget_points']:.2f}% of the images")
            per_exit.append(e)
        report["variants"][name] = per_exit
    report["misses"] = budget_misses(report)
    report["ok"] = not report["misses"]
    return report


def budget_misses(report: dict) -> list:
    """``[{"variant", "exit", "points"}]``: every exit of every variant over the report's per-exit budget."""
    budget = float(report.get("max_exit_drop_points", MAX_EXIT_DROP_POINTS))
    return [{"variant": name, "exit": e["exit"], "points": round(float(e["budget_points"]), 4)}
            for name, per_exit in report.get("variants", {}).items() for e in per_exit
            if e.get("budget_points") is not None and e["budget_points"] > budget + 1e-9]


def budget_error(report: dict, precision: str):
    """The DmpoEdgeError a compile that misses its budget raises (nothing written, nothing replaced)."""
    from ..errors import DmpoEdgeError

    budget = float(report["max_exit_drop_points"])
    what = "accuracy points" if all(e.get("drop_points") is not None for v in report["variants"].values() for e in v) \
        else "points (top-1 disagreement with FP32, no labels)"
    misses = ", ".join(f"{m['variant']} exit {m['exit']} {m['points']:.2f}" for m in report["misses"])
    src = (report.get("data") or {}).get("source", "the held-out data")
    hint = ("Pass --accept-drop to write the bundle anyway (its reports/sensitivity.json names the layers that cost "
            "the most), raise --max-exit-drop, or try more calibration images (--calib-count) or another --calib-method; "
            "--fp16 keeps more accuracy" if precision == "int8" else
            "Pass --accept-drop to write the bundle anyway, raise --max-exit-drop, or compile in FP32")
    missed = {m["variant"] for m in report["misses"]}
    within = [n for n in report["variants"] if n not in missed]
    met = f" ({', '.join(within)} within it at every exit)" if within else ""
    return DmpoEdgeError("compile", f"{precision} loses more than {budget:g} {what} at {misses} on {src}{met}; nothing "
                         f"was written. {hint}")


def loud_warnings(report: dict) -> list:
    """Lines to print in capitals-free but unmissable form (the CLI prints them to stderr)."""
    budget = report.get("max_exit_drop_points", MAX_EXIT_DROP_POINTS)
    return [f"WARNING precision | {w} (budget {budget:g}, accepted with --accept-drop). Check the calibration data, or "
            "keep this exit in FP32 (--precision fp16/fp32)" for w in report.get("warnings", [])]
