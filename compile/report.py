"""Per-exit accuracy of the reduced-precision graphs against the FP32 graphs on held-out data."""

from __future__ import annotations

import numpy as np

__all__ = ["exit_metrics", "precision_report", "MAX_EXIT_DROP_POINTS", "loud_warnings"]

#: an exit that loses more than this many accuracy points to FP16/INT8 is reported loudly
MAX_EXIT_DROP_POINTS = 1.0


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


def precision_report(reference: list, variants: dict, labels, data_info: dict | None) -> dict:
    """``reference``: FP32 chain outputs; ``variants``: name -> chain outputs (e.g. 'int8', 'int8-cpu')."""
    report = {"data": data_info, "max_exit_drop_points": MAX_EXIT_DROP_POINTS, "fp32": exit_metrics(reference, labels),
              "variants": {}, "warnings": []}
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
                if e["drop_points"] > MAX_EXIT_DROP_POINTS:
                    report["warnings"].append(
                        f"{name}: exit {k} loses {e['drop_points']:.2f} accuracy points ({100 * ref_acc:.2f}% -> {100 * acc:.2f}%)"
                    )
            per_exit.append(e)
        report["variants"][name] = per_exit
    report["ok"] = not report["warnings"]
    return report


def loud_warnings(report: dict) -> list:
    """Lines to print in capitals-free but unmissable form (the CLI prints them to stderr)."""
    return [f"WARNING precision | {w}. Check the calibration data, or keep this exit in FP32 (--precision fp16/fp32)"
            for w in report.get("warnings", [])]
