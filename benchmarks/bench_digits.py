"""Latency of the digits DMPO bundle on the CPU backend (ONNX Runtime), fp32 and int8, reproducibly.

1. the model: ``out/digits_model.pt`` when it is there, else a fresh ``dmpo-edge tune`` on digits:train;
2. the bundles: ``compile_bundle`` to fp32 and int8 under ``OUT/`` (reused when they load and were compiled
   from this very model - the manifest's ``model.source.sha256`` - unless --force; a retrained model is
   picked up by recompiling);
3. the thresholds: ``dmpo-edge calibrate --val digits:val --max-drop 0.01`` (at most 1 point below the
   last exit's accuracy on the validation split);
4. ``dmpo-edge bench`` on digits:test, batch 1, 8, 32, early exit against the static model interleaved,
   plus the threshold sweep at batch 32 and the host overhead with the null backend;
5. the results, with the machine and the versions, between the markers of ``docs/benchmarks.md``.

Run from the repository root::

    python benchmarks/bench_digits.py [--out out/bench_digits] [--duration 3] [--force] [--no-docs]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import os
import sys

from dmpo_edge.bundle import Bundle, sha256_file
from dmpo_edge.cli import main as cli
from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.runtime.bench import threads_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "out", "digits_model.pt")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- bench-digits:begin -->", "<!-- bench-digits:end -->"
PRECISIONS = ("fp32", "int8")
BATCHES = "1,8,32"
MAX_DROP = 0.01
TARGET_EFFICIENCY = 0.85  # at batch 32
TARGET_OVERHEAD_MS = 0.5  # per stage per batch


def _run(argv: list) -> None:
    print("$ dmpo-edge " + " ".join(argv), flush=True)
    code = cli(argv)
    if code:
        raise SystemExit(f"dmpo-edge {argv[0]} failed (exit {code})")


def ensure_model(force: bool) -> str:
    if os.path.isfile(MODEL) and not force:
        print(f"reusing {os.path.relpath(MODEL, ROOT)}")
        return MODEL
    os.makedirs(os.path.dirname(MODEL), exist_ok=True)
    _run(["tune", "--data", "digits:train", "-o", MODEL])
    return MODEL


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
    params = inspect.signature(compile_bundle).parameters
    if precision == "int8" and "calib" in params:
        kw["calib"] = "digits:train"  # INT8 ranges from the training split, never the bench (test) split
    if "accept_drop" in params:
        kw["accept_drop"] = True  # a benchmark measures the bundle; the accuracy budget is compile's to report
    print(f"compiling {os.path.relpath(model, ROOT)} -> {os.path.relpath(path, ROOT)} ({precision})", flush=True)
    compile_bundle(model, path, **kw)
    _run(["calibrate", path, "--val", "digits:val", "--max-drop", str(MAX_DROP), "--quiet"])
    return Bundle.load(path)


def bench(path: str, out_json: str, duration: float, extra: list) -> dict:
    _run(["bench", path, "--backend", "ort", "--data", "digits:test", "--duration", str(duration),
          "--json", out_json, "--quiet"] + extra)
    with open(out_json) as f:
        return json.load(f)


# --- markdown ------------------------------------------------------------------------------------
def _f(v, fmt=".3f") -> str:
    return "-" if v is None else format(v, fmt)


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


def _verdicts(reports: dict) -> list:
    out = []
    for prec, rep in reports.items():
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
    return out


def render(reports: dict, sweeps: dict, plots: dict) -> str:
    first = next(iter(reports.values()))
    m = first["machine"]
    v = m["versions"]
    th = {p: r["thresholds"] for p, r in reports.items()}
    lines = [
        BEGIN,
        f"_Generated by `python benchmarks/bench_digits.py` on {_dt.date.today().isoformat()}._",
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
        "early exit and static interleaved"
        + (", each timed one-batch call after one untimed settle call of its own configuration (on the previous batch)"
           if first["settings"].get("settle") else ""),
    ]
    for p, t in th.items():
        lines.append(f"- {p} thresholds: {', '.join(f'{x:.4g}' for x in t['values'])} ({t['source']})")
    lines += ["", "### Early exit against the static model", ""] + _main_table(reports)
    lines += ["", "### What limits the efficiency (one batch per call; the factors multiply to it)", ""] + _breakdown_table(reports)
    lines += ["", "### Per stage (ms per iteration, mean samples entering)", ""] + _stage_table(reports)
    if sweeps:
        lines += ["", "### Threshold sweep at batch 32", ""] + _sweep_table(sweeps)
        for p, png in plots.items():
            lines += ["", f"![{p} sweep]({os.path.relpath(png, os.path.dirname(DOC))})"]
    lines += ["", "### Host overhead (null backend: the pipeline without inference)", ""] + _overhead_table(reports)
    lines += ["", "### Targets", ""] + _verdicts(reports)
    lines.append(END)
    return "\n".join(lines)


def write_doc(section: str) -> None:
    text = open(DOC).read() if os.path.isfile(DOC) else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Results: digits on the CPU\n\n" + section + "\n"
    tmp = DOC + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, DOC)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench_digits"))
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per batch size (trtexec's default 3)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--force", action="store_true", help="recompile and recalibrate the bundles")
    ap.add_argument("--retune", action="store_true", help="tune a new model even if out/digits_model.pt exists")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model = ensure_model(args.retune)
    reports, sweeps, plots = {}, {}, {}
    for prec in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        path = os.path.join(args.out, f"digits_{prec}")
        ensure_bundle(model, path, prec, args.force)
        reports[prec] = bench(path, os.path.join(args.out, f"bench_{prec}.json"), args.duration,
                              ["--batch", BATCHES, "--host-overhead"])
        if not args.no_sweep:
            png = os.path.join(ROOT, "docs", "img", f"bench_digits_sweep_{prec}.png")
            # a shorter window per budget point: 8 points x duration would make the sweep the long pole
            sweeps[prec] = bench(path, os.path.join(args.out, f"sweep_{prec}.json"), max(0.5, args.duration / 3),
                                 ["--batch", "32", "--sweep", "--plot", png])
            plots[prec] = png
    section = render(reports, sweeps, plots)
    print(section)
    if not args.no_docs:
        write_doc(section)
        print(f"updated {os.path.relpath(DOC, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
