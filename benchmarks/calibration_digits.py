"""Exit calibration on digits: the DMPO model against the plain multi-exit baseline.

Compiles ``out/digits_model.pt`` (DMPO) and ``out/digits_baseline.pt`` (plain multi-exit tuning) to fp32
bundles, measures every stage on digits:val and digits:test with the deployed ONNX graphs in ONNX Runtime,
fits thresholds on val (budgeted-batch sweep, budget solver at 30% and 50% of the full FLOPs) and reports
them on test. Writes:

- ``docs/img/digits_dmpo_vs_baseline.png``: both accuracy-versus-FLOPs curves, per-exit accuracies and the
  operating points;
- ``docs/img/digits_calibration_curve.png``: the DMPO bundle's ``dmpo-edge eval`` plot;
- the section "Exit calibration on digits" of ``docs/results.md`` (only the text between its markers);
- ``OUT/summary.json`` and the two bundles, the DMPO one calibrated at a 50% budget.

Run from the repository root::

    python benchmarks/calibration_digits.py [--out out/calibration_digits] [--force]
"""

from __future__ import annotations

import argparse
import os
import sys


from doc_section import replace_section  # beside this script
from dmpo_edge.bundle import Bundle, sha256_file, write_json_atomic
from dmpo_edge.calib import thresholds as th
from dmpo_edge.calib.evaluate import calibrate, evaluate, stage_outputs
from dmpo_edge.calib.plots import plot_curves, plot_evaluation
from dmpo_edge.errors import DmpoEdgeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGETS = (0.3, 0.5)
MAX_DROP = 0.01
BEGIN, END = "<!-- calibration-digits:begin -->", "<!-- calibration-digits:end -->"
MODELS = (("DMPO", "out/digits_model.pt", "tab:blue"), ("baseline", "out/digits_baseline.pt", "tab:orange"))


def compile_fp32(model: str, out: str, force: bool) -> str:
    """An fp32 bundle of ``model`` at ``out`` (reused when it was compiled from this very checkpoint, unless ``force``)."""
    if os.path.isdir(out) and not force:
        try:
            src = Bundle.load(out).manifest["model"].get("source") or {}
            if src.get("sha256") == sha256_file(model):
                print(f"reusing {out} (compiled from this {model})")
                return out
        except DmpoEdgeError:
            pass
    from dmpo_edge.compile import compile_bundle

    print(f"compiling {model} -> {out} (fp32)")
    compile_bundle(model, out, precision="fp32", force=True)
    return out


def best_under(points: list, cost: float):
    """Highest test accuracy among curve points that cost at most ``cost`` (None if none does)."""
    ok = [p for p in points if p.expected_cost <= cost + 1e-12]
    return max(ok, key=lambda p: p.accuracy) if ok else None


def study(name: str, bundle: str) -> dict:
    val = stage_outputs(bundle, "digits:val")
    test = stage_outputs(bundle, "digits:test")
    args = (val.confidence, val.correct, val.cumulative_flops)
    sweep_val = th.budgeted_batch_sweep(*args)
    # MSDNet's protocol: thresholds found on val, accuracy and FLOPs measured on test
    curve = [th.evaluate_thresholds(test.confidence, test.correct, test.cumulative_flops, p.thresholds, {"p": p.meta["p"]})
             for p in sweep_val]
    ops = {}
    for b in BUDGETS:
        key = f"budget {b:g}"
        try:
            v = th.solve_budget(*args, b, sweep_points=sweep_val)
        except DmpoEdgeError as exc:
            ops[key] = {"error": exc.message}
            continue
        t = th.evaluate_thresholds(test.confidence, test.correct, test.cumulative_flops, v.thresholds)
        ops[key] = {"val": v.to_dict(), "test": t.to_dict()}
    v = th.solve_max_drop(*args, MAX_DROP, sweep_points=sweep_val)
    t = th.evaluate_thresholds(test.confidence, test.correct, test.cumulative_flops, v.thresholds)
    ops[f"max drop {MAX_DROP:g}"] = {"val": v.to_dict(), "test": t.to_dict()}
    full = float(val.cumulative_flops[-1])
    return {
        "name": name, "bundle": bundle, "full_flops": full, "cumulative_flops": val.cumulative_flops.tolist(),
        "minimum_cost": th.minimum_cost(val.cumulative_flops),
        "exit_accuracy_val": val.exit_accuracy, "exit_accuracy_test": test.exit_accuracy,
        "curve_test": [p.to_dict() for p in curve], "curve_val": [p.to_dict() for p in sweep_val],
        "operating_points": ops, "_val": val, "_test": test, "_curve": curve,
    }


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def markdown(results: list, img: str) -> str:
    lines = [BEGIN, "## Exit calibration on digits", ""]
    lines += [
        "Reproduce: `python benchmarks/calibration_digits.py` (compiles both checkpoints to fp32 bundles, fits the",
        "thresholds on `digits:val` with the deployed ONNX stages in ONNX Runtime, reports on `digits:test`).",
        "Costs are expected FLOPs per sample as a fraction of `cumulative_flops[-1]` (every stage graph, i.e. the",
        "static pipeline); curves follow MSDNet's budgeted-batch protocol (p = 1/20 .. 39/20, thresholds from val).",
        "",
        f"![DMPO vs baseline]({img})",
        "",
        "Per-exit (anytime) accuracy on digits:test, every sample classified by exit k:",
        "",
        "| model | " + " | ".join(f"exit {k}" for k in range(len(results[0]["exit_accuracy_test"]))) + " | full MFLOPs |",
        "|---|" + "---|" * (len(results[0]["exit_accuracy_test"]) + 1),
    ]
    for r in results:
        accs = " | ".join(f"{pct(a)} @ {100 * c / r['full_flops']:.0f}%" for a, c in zip(r["exit_accuracy_test"], r["cumulative_flops"]))
        lines.append(f"| {r['name']} | {accs} | {r['full_flops'] / 1e6:.1f} |")
    lines += ["", "Operating points: thresholds solved on digits:val (where the budget holds by construction), measured on "
              "digits:test (where the realised cost can drift a little):", "",
              "| model | target | val acc | val cost | test acc | test cost | test exits (%) | ideal speed-up |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for key, op in r["operating_points"].items():
            if "error" in op:
                lines.append(f"| {r['name']} | {key} | not reachable: minimum cost {pct(r['minimum_cost'])} | | | | | |")
                continue
            v, t = op["val"], op["test"]
            dist = " / ".join(f"{100 * d:.0f}" for d in t["exit_distribution"])
            lines.append(f"| {r['name']} | {key} | {pct(v['accuracy'])} | {pct(v['expected_cost'])} | {pct(t['accuracy'])} | "
                         f"{pct(t['expected_cost'])} | {dist} | {t['speedup_ideal']:.2f}x |")
    lines += ["", "Best test accuracy on each curve at a cost cap (budgeted-batch sweep points, thresholds from val):", "",
              "| cost cap | " + " | ".join(r["name"] for r in results) + " |", "|---|" + "---|" * len(results)]
    for cap in (0.35, 0.4, 0.5, 0.6, 0.7, 0.8):
        row = []
        for r in results:
            p = best_under(r["_curve"], cap)
            row.append("n/a" if p is None else f"{pct(p.accuracy)} ({pct(p.expected_cost)})")
        lines.append(f"| {int(round(cap * 100))}% | " + " | ".join(row) + " |")
    lines += ["", "Last exit alone: " + ", ".join(f"{r['name']} {pct(r['exit_accuracy_test'][-1])}" for r in results) + "."]
    verdict = []
    for b in BUDGETS:
        key = f"budget {b:g}"
        got = [r["operating_points"][key] for r in results]
        if all("test" in g for g in got):
            verdict.append(f"at a {100 * b:.0f}% budget " + " vs ".join(
                f"{r['name']} {pct(g['test']['accuracy'])} ({pct(g['test']['expected_cost'])} FLOPs)" for r, g in zip(results, got)))
    if verdict:
        lines += ["", "**Summary.** With thresholds calibrated on val and measured on test: " + "; ".join(verdict) + "."]
    lines += [
        "", "The DMPO bundle's own `dmpo-edge eval` plot (calibrated at the 50% budget, evaluated on digits:test):", "",
        "![DMPO calibration curve](img/digits_calibration_curve.png)", "",
        "Units: the section above divides by the static model without early heads; here the denominator is the bundle's",
        "`cumulative_flops[-1]`, which includes every early head (what the static pipeline of a bundle runs), so the same",
        "thresholds read a few points cheaper here. Absolute MFLOPs agree.", "", END]
    return "\n".join(lines) + "\n"


def update_results_md(path: str, section: str) -> None:
    """Replace the text between this benchmark's markers (append the section when they are absent)."""
    replace_section(path, section, BEGIN, END)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/calibration_digits", help="where the bundles and summary.json go")
    ap.add_argument("--docs", default="docs", help="docs folder (results.md and img/)")
    ap.add_argument("--force", action="store_true", help="recompile the bundles")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    missing = [m for _, m, _ in MODELS if not os.path.isfile(m)]
    if missing:
        print(f"missing checkpoint(s): {', '.join(missing)}. Tune them first (see docs/results.md)", file=sys.stderr)
        return 2
    results = []
    for name, model, _ in MODELS:
        bundle = compile_fp32(model, os.path.join(args.out, f"digits_{name.lower()}_fp32"), args.force)
        results.append(study(name, bundle))
    img_rel = "img/digits_dmpo_vs_baseline.png"
    curves, anytime, ops = [], [], []
    for r, (_, _, color) in zip(results, MODELS):
        curves.append({"label": f"{r['name']} early exit (test)", "points": r["curve_test"], "color": color})
        anytime.append({"label": f"{r['name']} single exit k", "color": color,
                        "exits": [{"cumulative_flops": c, "accuracy": a} for c, a in zip(r["cumulative_flops"], r["exit_accuracy_test"])]})
        for key, op in r["operating_points"].items():
            if key.startswith("budget") and "test" in op:
                dmpo = r["name"] == "DMPO"
                ops.append({"label": f"{r['name']} {key} (test)", "point": op["test"], "marker": "*" if dmpo else "D",
                            "color": "tab:red" if key == f"budget {BUDGETS[0]:g}" else "tab:purple",
                            "offset": (-10, 10) if dmpo else (10, -14)})
    plot_curves(curves, os.path.join(args.docs, img_rel), operating_points=ops, anytime=anytime,
                title="digits, fp32 bundles: thresholds fit on val, measured on test")
    # the DMPO bundle keeps the 50% operating point; its eval plot goes to the docs as well
    dmpo = results[0]
    calibrate(dmpo["bundle"], outputs=dmpo["_val"], budget=0.5)
    ev = evaluate(dmpo["bundle"], outputs=dmpo["_test"])
    plot_evaluation(ev, os.path.join(args.docs, "img/digits_calibration_curve.png"), label="DMPO")
    section = markdown(results, img_rel)
    update_results_md(os.path.join(args.docs, "results.md"), section)
    summary = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "summary.json"), summary)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
