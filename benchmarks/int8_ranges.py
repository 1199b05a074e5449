"""INT8 activation ranges chosen by measurement: range method x number of calibration images, per stage.

For every stage k of a digits model, the TensorRT (Q/DQ) form of stage k alone is quantized with each range method
and calibration count (stage k calibrated on stage k-1's FP32 features of N digits:train images), then run as
TensorRT computes it (ONNX Runtime with Q/DQ simulated in float, never the host's integer kernels) with the later
stages in FP32. Its cost is the worst accuracy drop over exits k..K-1 against FP32: on digits:val for the choice, on
digits:test for the report. The chosen setting minimises the sum over stages of the worst val drop (ties: fewer
images, then the order of --methods); the result, and how compile's defaults compare, is in docs/results.md.

Writes ``OUT/int8_ranges.json`` and, with ``--docs``, the section "INT8 activation ranges" of docs/results.md
(only the text between its markers). Load average is recorded: the figures are accuracy, not time, but the run is
long on a shared machine.

Run from the repository root::

    python benchmarks/int8_ranges.py --model out/digits_model.pt [--methods entropy,max,percentile-99.9,...]
        [--counts 128,512,2048] [--out out/int8_ranges] [--docs]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- int8-ranges:begin -->", "<!-- int8-ranges:end -->"
METHODS = ("entropy", "max", "percentile-99.9", "percentile-99.99", "mse")
COUNTS = (128, 512, 2048)


def _load() -> list:
    return [round(v, 2) for v in os.getloadavg()]


def measure(model: str, methods, counts, val_count: int, test_count: int, work: str, log=print) -> dict:
    from dmpo_edge.bundle import Bundle
    from dmpo_edge.calib.datasets import load_dataset
    from dmpo_edge.compile import compile_bundle
    from dmpo_edge.compile.compiler import _Downstream, _stage_inputs
    import shutil

    from dmpo_edge.compile.int8 import _histogram_method, apply_ranges, batched_feeds, quantize_tensorrt_form
    from dmpo_edge.compile.onnxrun import SIMULATED_QDQ_NAME, run_chain

    fp32_dir = os.path.join(work, "fp32")
    if not os.path.isdir(fp32_dir):
        compile_bundle(model, fp32_dir, precision="fp32", progress=False, build="never", log=lambda m: None)
    b = Bundle.load(fp32_dir)
    K = b.num_stages
    paths = [b.stage_path(k) for k in range(K)]
    train = load_dataset("digits:train")
    counts = sorted({min(int(c), len(train)) for c in counts})
    calib_x = b.preprocess(train.take(max(counts)).images)
    val, test = load_dataset("digits:val").take(val_count), load_dataset("digits:test").take(test_count)
    xv, xt = b.preprocess(val.images), b.preprocess(test.images)
    calib_chain = run_chain(paths, calib_x, collect_inputs=True)
    scorers = {"val": _Downstream(paths, run_chain(paths, xv, collect_inputs=True), xv, val.labels),
               "test": _Downstream(paths, run_chain(paths, xt, collect_inputs=True), xt, test.labels)}
    rows = []
    for count in counts:
        # a nested, fixed subset: the first `count` of the largest calibration set
        for method in methods:
            for k in range(K):
                t0 = time.perf_counter()
                feeds = batched_feeds({n: v[:count] for n, v in _stage_inputs(calib_chain, k, calib_x).items()}, 32)
                dst = os.path.join(work, f"s{k}.{method}.{count}.onnx")
                if _histogram_method(method):
                    # what quantize_tensorrt_form does, without quantizing the max graph again
                    base = os.path.join(work, f"s{k}.max.{count}.base.onnx")
                    if not os.path.isfile(base):
                        quantize_tensorrt_form(paths[k], base, feeds, (), "max")
                    shutil.copyfile(base, dst)
                    apply_ranges(dst, paths[k], feeds, method)
                    tool = "modelopt max + histogram ranges"
                else:
                    tool = quantize_tensorrt_form(paths[k], dst, feeds, (), method)
                    if method == "max":
                        shutil.copyfile(dst, os.path.join(work, f"s{k}.max.{count}.base.onnx"))
                row = {"stage": k, "method": method, "count": count, "tool": tool}
                for split, score in scorers.items():
                    res = score(k, dst, simulate_qdq=True)
                    row[f"{split}_worst_drop_points"] = round(res["drop_points"], 3)
                    row[f"{split}_exit_drop_points"] = [round(d, 3) for d in res["exit_drop_points"]]
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                os.remove(dst)
                log(f"stage {k} {method:>16} {count:>5} images: worst drop val {row['val_worst_drop_points']:+.2f} "
                    f"test {row['test_worst_drop_points']:+.2f} points ({row['seconds']} s, load {_load()[0]})")
    table = {}
    for r in rows:
        t = table.setdefault((r["method"], r["count"]), {"method": r["method"], "count": r["count"], "val": [], "test": []})
        t["val"].append(r["val_worst_drop_points"])
        t["test"].append(r["test_worst_drop_points"])
    summary = [dict(t, val_sum=round(sum(t["val"]), 3), test_sum=round(sum(t["test"]), 3)) for t in table.values()]
    order = {m: i for i, m in enumerate(methods)}
    best = min(summary, key=lambda t: (t["val_sum"], t["count"], order[t["method"]]))
    return {"model": os.path.basename(model), "stages": K, "reference": SIMULATED_QDQ_NAME,
            "val": {"source": "digits:val", "count": len(val)}, "test": {"source": "digits:test", "count": len(test)},
            "calibration": "digits:train", "counts": counts, "methods": list(methods), "rows": rows,
            "summary": summary, "chosen": {"method": best["method"], "count": best["count"]}}


def markdown(res: dict, load_before, load_after) -> str:
    K = res["stages"]
    lines = [
        f"Measured with `python benchmarks/int8_ranges.py` on {res['model']} ({K} stages): stage k alone in INT8 (the "
        f"TensorRT Q/DQ form, run as TensorRT computes it: {res['reference']}), later stages FP32; cost = worst "
        f"accuracy drop over exits k..{K - 1} in points, on {res['val']['source']} ({res['val']['count']} images, "
        f"for the choice) and {res['test']['source']} ({res['test']['count']} images, reported). Calibration: the "
        f"first N of a fixed {res['calibration']} subset. Load average {load_before} before, {load_after} after "
        "(2 shared cores; accuracy figures do not depend on it).", "",
        "| method | images | " + " | ".join(f"stage {k} val / test" for k in range(K)) + " | sum val / test |",
        "|---|---:|" + "---:|" * (K + 1),
    ]
    for t in sorted(res["summary"], key=lambda t: (t["count"], res["methods"].index(t["method"]))):
        cells = " | ".join(f"{v:+.2f} / {w:+.2f}" for v, w in zip(t["val"], t["test"]))
        mark = " **(chosen)**" if (t["method"], t["count"]) == (res["chosen"]["method"], res["chosen"]["count"]) else ""
        lines.append(f"| {t['method']}{mark} | {t['count']} | {cells} | {t['val_sum']:+.2f} / {t['test_sum']:+.2f} |")
    lines += ["", f"Chosen on val: **{res['chosen']['method']}** with **{res['chosen']['count']}** calibration images "
              "(lowest summed worst-exit drop; ties go to fewer images). ModelOpt 0.47's ONNX INT8 quantizer calibrates "
              "with entropy or max only; percentile and MSE ranges are set from |x| histograms over the same "
              "calibration images on top of the max graph (`dmpo_edge.compile.int8.apply_ranges`)."]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    path = os.path.join(ROOT, "docs", "results.md")
    with open(path) as f:
        doc = f.read()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n## INT8 activation ranges\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="out/digits_model.pt")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--counts", default=",".join(str(c) for c in COUNTS))
    ap.add_argument("--val-count", type=int, default=1000)
    ap.add_argument("--test-count", type=int, default=1000)
    ap.add_argument("--out", default="out/int8_ranges")
    ap.add_argument("--docs", action="store_true", help="update the section in docs/results.md")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="int8-ranges-", dir=args.out) as work:
        res = measure(args.model, [m for m in args.methods.split(",") if m], [int(c) for c in args.counts.split(",") if c],
                      args.val_count, args.test_count, work)
    load_after = _load()
    res["load_average"] = {"before": load_before, "after": load_after}
    with open(os.path.join(args.out, "int8_ranges.json"), "w") as f:
        json.dump(res, f, indent=1)
    text = markdown(res, load_before, load_after)
    print(text)
    if args.docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
