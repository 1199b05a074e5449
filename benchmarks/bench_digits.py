"""Latency of a DMPO bundle on the CPU backend (ONNX Runtime), fp32 and int8, reproducibly: digits (default) or
Fashion-MNIST (``--data fashion-mnist``; needs Debian's ``dataset-fashion-mnist``).

1. the model: ``out/digits_model.pt`` (``out/fashion_mnist_model.pt``) when it is there, else a fresh
   ``dmpo-edge tune --data digits:train`` (``--data fashion-mnist --epochs 3``: the whole training set, 9 minutes
   on two idle cores, docs/results.md);
2. the bundles: ``compile_bundle`` to fp32 and int8 under ``OUT/`` (reused when they load and were compiled
   from this very model - the manifest's ``model.source.sha256`` - unless --force; a retrained model is
   picked up by recompiling);
3. the thresholds: ``dmpo-edge calibrate --val SET:val --max-drop 0.01`` (at most 1 point below the
   last exit's accuracy on the validation split);
4. ``dmpo-edge bench`` on SET:test, batch 1, 8, 32, early exit against the static pipeline and the peer
   one-graph model (what users would run instead) interleaved, plus the threshold sweep at batch 32 and the
   host overhead with the null backend;
5. INT8 against FP32: both bundles' early-exit pipelines timed interleaved in one process, per batch size;
6. the results, with the machine and the versions, between the data set's markers in ``docs/benchmarks.md``.

Run from the repository root::

    python benchmarks/bench_digits.py [--data digits|fashion-mnist] [--out DIR] [--duration 3] [--force] [--no-docs]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import os
import sys

from doc_section import replace_section  # beside this script
from dmpo_edge.bundle import Bundle, sha256_file
from dmpo_edge.cli import main as cli
from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.runtime.bench import threads_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
# per data set: where its model lives, how it is tuned when absent, its section of docs/benchmarks.md
SETS = {
    "digits": {"model": os.path.join(ROOT, "out", "digits_model.pt"), "tune": ["--data", "digits:train"],
               "slug": "digits", "heading": "## Results: digits on the CPU\n\n"},
    "fashion-mnist": {"model": os.path.join(ROOT, "out", "fashion_mnist_model.pt"),
                      "tune": ["--data", "fashion-mnist", "--epochs", "3"],
                      "slug": "fashion_mnist", "heading": "## Results: Fashion-MNIST on the CPU\n\n"},
}
SET = "digits"  # the one this run measures (main sets it)


def _markers() -> tuple:
    tag = "bench-" + SET
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
PRECISIONS = ("fp32", "int8")
BATCHES = "1,8,32"
MAX_DROP = 0.01
TARGET_EFFICIENCY = 0.85  # at batch 32
TARGET_OVERHEAD_MS = 0.5  # per stage per batch
TARGET_OVER_PEER = 2.5  # speed-up over the peer one-graph model, batch 1 and 32


def _run(argv: list) -> None:
    print("$ dmpo-edge " + " ".join(argv), flush=True)
    code = cli(argv)
    if code:
        raise SystemExit(f"dmpo-edge {argv[0]} failed (exit {code})")


def ensure_model(force: bool) -> str:
    model = SETS[SET]["model"]
    if os.path.isfile(model) and not force:
        print(f"reusing {os.path.relpath(model, ROOT)}")
        return model
    os.makedirs(os.path.dirname(model), exist_ok=True)
    _run(["tune"] + SETS[SET]["tune"] + ["-o", model])
    return model


def _built_from(b: Bundle, model: str) -> bool:
    """Whether the bundle was compiled from this model file (a retrained model replaces it in place)."""
    src = (b.manifest.get("model") or {}).get("source") or {}
    if src.get("sha256"):
        return src["sha256"] == sha256_file(model)
    return os.path.getmtime(model) <= os.path.getmtime(os.path.join(b.path, "manifest.json"))


def ensure_bundle(model: str, path: str, precision: str, force: bool) -> Bundle:
    """A calibrated bundle at ``path`` (compiled and calibrated here unless a good one is there)."""
    if os.path.isdir(path) and not force:
        try:
            b = Bundle.load(path)
            if b.thresholds is not None and b.precision == precision:
                if _built_from(b, model):
                    print(f"reusing {os.path.relpath(path, ROOT)}")
                    return b
                print(f"{os.path.relpath(path, ROOT)} was compiled from another {os.path.relpath(model, ROOT)}: recompiling")
        except DmpoEdgeError:
            pass
    from dmpo_edge.compile import compile_bundle

    kw = {"precision": precision, "force": True}
    from dmpo_edge.compile.compiler import compile_model

    # compile_bundle passes its keyword options on to compile_model
    params = {**inspect.signature(compile_model).parameters, **inspect.signature(compile_bundle).parameters}
    if precision == "int8" and "calib" in params:
        kw["calib"] = f"{SET}:train"  # INT8 ranges from the training split, never the bench (test) split
        if "holdout" in params:  # accuracy of each candidate form judged on the validation split, never the test split
            kw["holdout"] = f"{SET}:val"
        if "accept_drop" in params:  # a budget miss is reported in the bundle, and the benchmark still runs
            kw["accept_drop"] = True
    if "accept_drop" in params:
        kw["accept_drop"] = True  # a benchmark measures the bundle; the accuracy budget is compile's to report
    print(f"compiling {os.path.relpath(model, ROOT)} -> {os.path.relpath(path, ROOT)} ({precision})", flush=True)
    compile_bundle(model, path, **kw)
    _run(["calibrate", path, "--val", f"{SET}:val", "--max-drop", str(MAX_DROP), "--quiet"])
    return Bundle.load(path)


def bench(path: str, out_json: str, duration: float, extra: list) -> dict:
    _run(["bench", path, "--backend", "ort", "--data", f"{SET}:test", "--duration", str(duration),
          "--json", out_json, "--quiet"] + extra)
    with open(out_json) as f:
        return json.load(f)


def int8_against_fp32(paths: dict, batches: list, duration: float) -> list:
    """Both bundles' early-exit pipelines on the same SET:test batches, interleaved in one process."""
    import numpy as np

    from dmpo_edge.calib.datasets import load_dataset
    from dmpo_edge.runtime.bench import Runner, batches_of, interleave, machine_info
    from dmpo_edge.runtime.bench_stats import summarize
    from dmpo_edge.runtime.pipeline import Pipeline

    bundles = {p: Bundle.load(path) for p, path in paths.items()}
    ds = load_dataset(f"{SET}:test")
    pipes = {p: Pipeline.from_bundle(b, backend="ort") for p, b in bundles.items()}
    rows = []
    try:
        for batch in batches:
            runners = []
            for p, pipe in pipes.items():
                x = bundles[p].preprocess(ds.images).astype(np.float32)
                xs, _, _ = batches_of(x, batch)
                runners.append(Runner(p, (lambda pp, xx: lambda j: pp.predict(xx[j], batch_size=batch))(pipe, xs)))
            load = machine_info()["loadavg"]
            loop = interleave(runners, -(-len(ds) // batch), 0.2, duration, 10, settle=True)
            lat = {p: summarize(v) for p, v in loop["latency_s"].items()}
            rows.append({"batch": batch, "rounds": loop["rounds"], "loadavg": load,
                         "mean_ms": {p: v["mean"] for p, v in lat.items()},
                         "median_ms": {p: v["median"] for p, v in lat.items()}})
    finally:
        for pipe in pipes.values():
            pipe.close()
    return rows


# --- markdown ------------------------------------------------------------------------------------
def _f(v, fmt=".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _peer_table(reports: dict) -> list:
    rows = ["| precision | batch | early exit samples/s | peer samples/s | **speed-up over the peer** (mean / median) | "
            "over the static pipeline | EE acc | peer acc | drop vs peer (points) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for prec, rep in reports.items():
        for r in rep["results"]:
            ee, pe = r["early_exit"], r.get("peer")
            if not pe:
                continue
            sp = ee["speedup"]
            drop = ee.get("accuracy_drop_vs_peer")
            rows.append(f"| {prec} | {r['batch']} | {ee['throughput']:.0f} | {pe['throughput']:.0f} | "
                        f"**{sp['over_peer']:.2f}x** / {sp['over_peer_median']:.2f}x | {sp['realised']:.2f}x | "
                        f"{_f(ee.get('accuracy'), '.4f')} | {_f(pe.get('accuracy'), '.4f')} | "
                        f"{'-' if drop is None else format(100 * drop, '.2f')} |")
    return rows


def _int8_table(rows: list) -> list:
    out = ["| batch | fp32 early exit mean / median ms | int8 early exit mean / median ms | int8 speed-up over fp32 (mean) | "
           "load average (1 min) |", "|---:|---|---|---:|---:|"]
    for r in rows:
        m, md = r["mean_ms"], r["median_ms"]
        out.append(f"| {r['batch']} | {m['fp32']:.3f} / {md['fp32']:.3f} | {m['int8']:.3f} / {md['int8']:.3f} | "
                   f"**{m['fp32'] / m['int8']:.2f}x** | {_f((r.get('loadavg') or [None])[0], '.2f')} |")
    return out


def _main_table(reports: dict) -> list:
    rows = ["| precision | batch | early exit samples/s | static samples/s | EE mean / median / p99 ms | "
            "static mean / median / p99 ms | realised | ideal | efficiency | streaming efficiency | EE acc | static acc | "
            "exits (realised) |",
            "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for prec, rep in reports.items():
        for r in rep["results"]:
            ee, st = r["early_exit"], r["static"]
            le, ls = ee["latency_ms"], st["latency_ms"]
            sp = ee["speedup"]
            rows.append(
                f"| {prec} | {r['batch']} | {ee['throughput']:.0f} | {st['throughput']:.0f} | "
                f"{le['mean']:.3f} / {le['median']:.3f} / {le['p99']:.3f} | {ls['mean']:.3f} / {ls['median']:.3f} / {ls['p99']:.3f} | "
                f"{sp['realised']:.3f} | {sp['ideal']:.3f} | **{_f(sp['efficiency'])}** | {_f(_stream_eff(r))} | "
                f"{_f(ee.get('accuracy'), '.4f')} | "
                f"{_f(st.get('accuracy'), '.4f')} | {' / '.join(f'{v:.2f}' for v in ee['exits']['realised'])} |")
    return rows


def _stream_eff(r: dict):
    sm = r.get("streaming")
    return None if not sm else sm["speedup"]["efficiency"]


def _breakdown_table(reports: dict) -> list:
    rows = ["| precision | batch | efficiency | = flops-to-time | x batch efficiency | x host factor | ideal from stage times |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for prec, rep in reports.items():
        for r in rep["results"]:
            sp = r["early_exit"]["speedup"]
            bd = sp.get("breakdown")
            if bd:
                rows.append(f"| {prec} | {r['batch']} | {_f(sp['efficiency'])} | {bd['flops_to_time']:.3f} | "
                            f"{bd['batch_efficiency']:.3f} | {bd['host_factor']:.3f} | {bd['ideal_from_stage_times']:.3f} |")
    return rows


def _stage_table(reports: dict) -> list:
    rows = ["| precision | batch | run | " + " | ".join(f"stage {k} ms (samples in)" for k in range(_stages(reports)))
            + " | backend ms | pipeline overhead ms / stage batch |",
            "|---|---:|---|" + "---:|" * _stages(reports) + "---:|---:|"]
    for prec, rep in reports.items():
        for r in rep["results"]:
            for name in ("early_exit", "static"):
                s = r[name]
                cells = " | ".join(f"{x['time_ms_per_iteration']:.3f} ({x['samples_in'] / s['iterations']:.1f})" for x in s["stages"])
                rows.append(f"| {prec} | {r['batch']} | {name.replace('_', ' ')} | {cells} | {s['backend_ms_per_iteration']:.3f} | "
                            f"{_f(s['host_overhead_ms_per_stage_batch'])} |")
    return rows


def _stages(reports: dict) -> int:
    return next(iter(reports.values()))["bundle"]["num_stages"]


def _sweep_table(sweeps: dict) -> list:
    rows = ["| precision | budget | realised cost | samples/s | mean ms | p99 ms | realised | ideal | efficiency | accuracy | exits |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for prec, rep in sweeps.items():
        for r in rep["sweep"]:
            st = r["static"]
            rows.append(f"| {prec} | static | 1.000 | {st['throughput']:.0f} | {st['latency_ms']['mean']:.3f} | "
                        f"{st['latency_ms']['p99']:.3f} | 1 | 1 | - | {_f(st.get('accuracy'), '.4f')} | all at the last exit |")
            for ee in r["early_exit"]:
                sp = ee["speedup"]
                rows.append(
                    f"| {prec} | {ee['budget']:g} | {ee['exits']['expected_cost']:.3f} | {ee['throughput']:.0f} | "
                    f"{ee['latency_ms']['mean']:.3f} | {ee['latency_ms']['p99']:.3f} | {sp['realised']:.3f} | {sp['ideal']:.3f} | "
                    f"{_f(sp['efficiency'])} | {_f(ee.get('accuracy'), '.4f')} | {' / '.join(f'{v:.2f}' for v in ee['exits']['realised'])} |")
    return rows


def _overhead_table(reports: dict) -> list:
    rows = ["| precision | batch | early exit ms / stage batch | stage batches per call | exits | static ms / stage batch |",
            "|---|---:|---:|---:|---|---:|"]
    for prec, rep in reports.items():
        for r in rep.get("host_overhead") or []:
            e, s = r["early_exit"], r["static"]
            rows.append(f"| {prec} | {r['batch']} | {e['ms_per_stage_batch']:.3f} | {e['stage_batches_per_iteration']:.2f} | "
                        f"{' / '.join(f'{v:.2f}' for v in r.get('exits') or [])} | {s['ms_per_stage_batch']:.3f} |")
    return rows


def _verdicts(reports: dict, int8_rows: list | None = None) -> list:
    out = []
    for prec, rep in reports.items():
        for r in rep["results"]:
            sp = r["early_exit"]["speedup"]
            if r["batch"] in (1, 32) and "over_peer" in sp:
                out.append(f"- {prec}, batch {r['batch']}: speed-up over the peer one-graph model {sp['over_peer']:.2f}x "
                           f"(target >= {TARGET_OVER_PEER}x): " + ("**met**" if sp["over_peer"] >= TARGET_OVER_PEER else "**missed**"))
        r32 = next((r for r in rep["results"] if r["batch"] == 32), None)
        if r32:
            eff = r32["early_exit"]["speedup"]["efficiency"]
            out.append(f"- {prec}, batch 32: efficiency {eff:.3f} with one batch per call (target >= {TARGET_EFFICIENCY}): "
                       + ("**met**" if eff >= TARGET_EFFICIENCY else "**missed**"))
            se = _stream_eff(r32)
            if se is not None:
                out.append(f"- {prec}, batch 32: efficiency {se:.3f} streaming (batches in flight): "
                           + ("**met**" if se >= TARGET_EFFICIENCY else "**missed**"))
        ov = [r["early_exit"]["ms_per_stage_batch"] for r in rep.get("host_overhead") or []]
        if ov:
            worst = max(ov)
            out.append(f"- {prec}: host overhead at most {worst:.3f} ms per stage per batch (target < {TARGET_OVERHEAD_MS} ms): "
                       + ("**met**" if worst < TARGET_OVERHEAD_MS else "**missed**"))
    for r in int8_rows or []:
        ratio = r["mean_ms"]["fp32"] / r["mean_ms"]["int8"]
        out.append(f"- int8 against fp32, batch {r['batch']} (interleaved, one process): {ratio:.2f}x (target >= 1): "
                   + ("**met**" if ratio >= 1.0 else "**missed**"))
    return out


def render(reports: dict, sweeps: dict, plots: dict, int8_rows: list | None = None) -> str:
    first = next(iter(reports.values()))
    m = first["machine"]
    v = m["versions"]
    th = {p: r["thresholds"] for p, r in reports.items()}
    begin, end = _markers()
    lines = [
        begin,
        f"_Generated by `python benchmarks/bench_digits.py{'' if SET == 'digits' else ' --data ' + SET}` on {_dt.date.today().isoformat()}._",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable by this process), {m['platform']}; "
        f"load average (1, 5, 15 min) at the start of the fp32 run {', '.join(f'{x:.2f}' for x in (m.get('loadavg') or []))}"
        + (" (more runnable jobs than cores: other work shared the CPU, read the figures as indicative)"
           if (m.get("loadavg") or [0])[0] > (m.get("usable_cores") or 1) else ""),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- backend: ONNX Runtime CPU (" + "; ".join(f"{p}: {' '.join(r['backend']['detail'].get('files') or [])}"
                                                for p, r in reports.items()) + "), "
        f"intra-op threads: {threads_text(first['backend']['detail'])}; pipeline "
        + ", ".join(f"{k}={val}" for k, val in first["backend"]["pipeline"].items()),
        f"- data: {first['data']['source']} ({first['data']['samples']} images); warm-up {first['settings']['warmup_ms']:g} ms, "
        f">= {first['settings']['iterations']} iterations and >= {first['settings']['duration_s']:g} s per batch size, "
        "early exit, static and peer interleaved"
        + (", each timed one-batch call after one untimed settle call of its own configuration (on the previous batch)"
           if first["settings"].get("settle") else ""),
    ]
    for p, t in th.items():
        lines.append(f"- {p} thresholds: {', '.join(f'{x:.4g}' for x in t['values'])} ({t['source']})")
    peer = next((r.get("peer") for r in reports.values() if r.get("peer")), None)
    if peer:
        lines.append(f"- peer: the bundle's one-graph static model ({peer['settings']}), timed in the same rounds")
    lines += ["", "### Early exit against the peer one-graph model (what users would run instead)", ""] + _peer_table(reports)
    if int8_rows:
        lines += ["", "### INT8 against FP32 (both early-exit pipelines interleaved in one process)", ""] + _int8_table(int8_rows)
    lines += ["", "### Early exit against the static model", ""] + _main_table(reports)
    lines += ["", "### What limits the efficiency (one batch per call; the factors multiply to it)", ""] + _breakdown_table(reports)
    lines += ["", "### Per stage (ms per iteration, mean samples entering)", ""] + _stage_table(reports)
    if sweeps:
        lines += ["", "### Threshold sweep at batch 32", ""] + _sweep_table(sweeps)
        for p, png in plots.items():
            lines += ["", f"![{p} sweep]({os.path.relpath(png, os.path.dirname(DOC))})"]
    lines += ["", "### Host overhead (null backend: the pipeline without inference)", ""] + _overhead_table(reports)
    lines += ["", "### Targets", ""] + _verdicts(reports, int8_rows)
    lines.append(end)
    return "\n".join(lines)


def write_doc(section: str) -> None:
    replace_section(DOC, section, *_markers(), new_file="# Benchmarks\n", heading=SETS[SET]["heading"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=sorted(SETS), default="digits",
                    help="the data set: its model, splits (train: INT8 ranges, val: held-out and thresholds, test: bench) "
                         "and section of docs/benchmarks.md")
    ap.add_argument("--out", default=None, help="bundles and reports (default out/bench_digits, out/bench_fashion_mnist)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per batch size (trtexec's default 3)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--force", action="store_true", help="recompile and recalibrate the bundles")
    ap.add_argument("--retune", action="store_true", help="tune a new model even if the data set's model exists")
    ap.add_argument("--model", help="benchmark this model.pt (tuned on the data set) instead of the one under out/")
    args = ap.parse_args(argv)
    global SET
    SET = args.data
    args.out = args.out or os.path.join(ROOT, "out", "bench_" + SETS[SET]["slug"])
    os.makedirs(args.out, exist_ok=True)
    model = os.path.abspath(args.model) if args.model else ensure_model(args.retune)
    reports, sweeps, plots = {}, {}, {}
    for prec in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        path = os.path.join(args.out, f"{SETS[SET]['slug']}_{prec}")
        ensure_bundle(model, path, prec, args.force)
        reports[prec] = bench(path, os.path.join(args.out, f"bench_{prec}.json"), args.duration,
                              ["--batch", BATCHES, "--host-overhead"])
        if not args.no_sweep:
            png = os.path.join(ROOT, "docs", "img", f"bench_{SETS[SET]['slug']}_sweep_{prec}.png")
            # a shorter window per budget point: 8 points x duration would make the sweep the long pole
            sweeps[prec] = bench(path, os.path.join(args.out, f"sweep_{prec}.json"), max(0.5, args.duration / 3),
                                 ["--batch", "32", "--sweep", "--plot", png])
            plots[prec] = png
    int8_rows = None
    if set(reports) >= {"fp32", "int8"}:
        print("int8 against fp32, interleaved", flush=True)
        int8_rows = int8_against_fp32({p: os.path.join(args.out, f"{SETS[SET]['slug']}_{p}") for p in ("fp32", "int8")},
                                      [int(b) for b in BATCHES.split(",")], args.duration)
        with open(os.path.join(args.out, "int8_vs_fp32.json"), "w") as f:
            json.dump(int8_rows, f, indent=1)
    section = render(reports, sweeps, plots, int8_rows)
    print(section)
    if not args.no_docs:
        write_doc(section)
        print(f"updated {os.path.relpath(DOC, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
