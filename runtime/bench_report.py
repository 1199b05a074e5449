"""The text report that ``dmpo-edge bench`` prints (the JSON report holds everything)."""

from __future__ import annotations

import math

from ..policies import format_thresholds
from .bench_stats import TRTEXEC_PERCENTILES

__all__ = ["threads_text", "format_report"]


def _fmt_ms(v) -> str:
    return f"{v:9.3f}" if v is not None and math.isfinite(v) else f"{'-':>9}"


def _f3(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _lat_cols(percentiles) -> list:
    return ["min", "mean", "median"] + [f"p{p:g}" for p in percentiles] + ["max"]


def _lat_row(label: str, s: dict, cols) -> str:
    return f"  {label:<12}{s['throughput']:>12.1f}/s" + "".join(_fmt_ms(s["latency_ms"].get(c)) for c in cols)


def _dist(v) -> str:
    return "-" if v is None else " ".join(f"{x:.3f}" for x in v)


def threads_text(detail: dict) -> str:
    """``"1 thread(s) per stage session (2 for one batch in the calling thread, stage calls >= 64 MFLOPs)"``."""
    if not detail.get("threads"):
        return ""
    text = f"{detail['threads']} thread(s) per stage session"
    if detail.get("exclusive_threads"):
        text += (f" ({detail['exclusive_threads']} for one batch in the calling thread, stage calls >= "
                 f"{detail.get('exclusive_min_mflops') or 0:g} MFLOPs)")
    return text


def _backend_line(be: dict) -> str:
    d = be.get("detail") or {}
    parts = [p for p in (", ".join(d.get("providers") or []), threads_text(d), " ".join(d.get("files") or [])) if p]
    pipe = be.get("pipeline") or {}
    if pipe:
        parts.append("pipeline " + ", ".join(f"{k}={v}" for k, v in pipe.items()))
    return f"backend: {be['name']}" + (f" ({'; '.join(parts)})" if parts else "")


def format_report(report: dict) -> str:
    """The human-readable summary that ``dmpo-edge bench`` prints (the JSON holds everything)."""
    s = report["settings"]
    pcts = tuple(s.get("percentiles", TRTEXEC_PERCENTILES))
    cols = _lat_cols(pcts)
    head = f"  {'':<12}{'throughput':>14}" + "".join(f"{c:>9}" for c in cols) + "  (latency per batch, ms)"
    b = report["bundle"]
    lines = [
        f"=== dmpo-edge bench: {b['path']} ({b['precision']}, {b['num_stages']} stages, max batch {b['max_batch']}) ===",
        _backend_line(report["backend"]),
        f"data: {report['data']['source']} ({report['data']['samples']} samples"
        + (", labelled)" if report["data"]["labelled"] else ", unlabelled)"),
        f"thresholds: {format_thresholds(report['thresholds']['values'])} ({report['thresholds']['source']})"
        if report.get("thresholds") else "thresholds: none (sweep only)",
        f"warm-up {s['warmup_ms']:g} ms, then >= {s['iterations']} iterations and >= {s['duration_s']:g} s per batch size; "
        + ("early exit, static and peer interleaved" if report.get("peer") else "early exit and static interleaved")
        + (", one untimed settle call before each timed one-batch call" if s.get("settle") else "")
        + "; percentiles as trtexec",
    ]
    pr = report.get("peer")
    if pr:
        lines.append(f"peer: {pr['file']} (one graph, no early exits; {pr['settings']})")
    m = report.get("machine") or {}
    if m:
        load = m.get("loadavg")
        lines.append(f"machine: {m.get('cpu')} ({m.get('usable_cores')} usable of {m.get('cores')} cores)"
                     + (f", load average {' '.join(f'{v:.2f}' for v in load)}" if load else ""))
    for r in report.get("results") or []:
        ee, st = r["early_exit"], r["static"]
        lines += ["", f"batch {r['batch']}  ({r['rounds']} rounds in {r['wall_s']:.2f} s, warm-up {r['warmup']['rounds']} rounds)", head,
                  _lat_row("early exit", ee, cols), _lat_row("static", st, cols)]
        pe = r.get("peer")
        if pe:
            lines.append(_lat_row("peer", pe, cols))
        stg = " | ".join(f"{x['stage']}: {x['time_ms_per_iteration']:.3f} ms, {x['samples_in'] / ee['iterations']:.1f} in"
                         for x in ee["stages"])
        lines.append(f"  stages (early exit, per iteration): {stg}")
        ex = ee["exits"]
        dev = f" (max deviation {ex['max_abs_deviation']:.3f})" if "max_abs_deviation" in ex else ""
        lines.append(f"  exits: realised {_dist(ex['realised'])} over {ex['samples']} samples | expected {_dist(ex['expected'])}{dev}")
        sp = ee["speedup"]
        eff = "-" if sp["efficiency"] is None else f"{sp['efficiency']:.3f}"
        if "over_peer" in sp:
            acc = ""
            if "accuracy_drop_vs_peer" in ee:
                acc = f", accuracy {ee['accuracy']:.4f} vs {pe['accuracy']:.4f} (drop {100 * ee['accuracy_drop_vs_peer']:.2f} points)"
            lines.append(f"  speed-up over the peer (one graph): {sp['over_peer']:.3f}x (median {sp['over_peer_median']:.3f}x){acc}")
        lines.append(f"  speed-up: realised {sp['realised']:.3f}x (median {sp['realised_median']:.3f}x), "
                     f"ideal {sp['ideal']:.3f}x, efficiency {eff}")
        if "accuracy" in ee:
            lines.append(f"  accuracy on the bench data: early exit {ee['accuracy']:.4f}, static {st['accuracy']:.4f} "
                         f"(drop {100 * ee['accuracy_drop']:.2f} points)")
        bd = sp.get("breakdown")
        if bd:
            lines.append(f"  efficiency = flops-to-time {bd['flops_to_time']:.3f} x batch efficiency {bd['batch_efficiency']:.3f} "
                         f"x host factor {bd['host_factor']:.3f} (ideal from measured stage times {bd['ideal_from_stage_times']:.3f}x)")
        sm = r.get("streaming")
        if sm:
            ssp = sm["speedup"]
            lines.append(f"  streaming ({sm['batches_per_call']} batches per call, {sm['max_in_flight']} in flight): early exit "
                         f"{sm['early_exit']['throughput']:.1f}/s, static {sm['static']['throughput']:.1f}/s"
                         + (f", peer {sm['peer']['throughput']:.1f}/s ({ssp['over_peer']:.3f}x)" if "peer" in sm else "")
                         + f", realised {ssp['realised']:.3f}x, efficiency {_f3(ssp['efficiency'])}")
        ov = ee.get("host_overhead_ms_per_stage_batch")
        if ov is not None:
            lines.append(f"  pipeline overhead around the backend: {ov:.3f} ms per stage batch "
                         f"({ee['stage_batches_per_iteration']:.2f} stage batches per iteration)")
        if "gpu" in ee:
            g = ee["gpu"]
            lines.append("  GPU (CUDA events, per iteration): " + ", ".join(
                f"{k} {v['total_ms_per_iteration']:.3f} ms" for k, v in g.items()))
    for r in report.get("sweep") or []:
        st = r["static"]
        pe = r.get("peer")
        lines += ["", f"sweep, batch {r['batch']}  ({r['rounds']} rounds in {r['wall_s']:.2f} s); static: "
                  f"{st['throughput']:.1f}/s, mean {st['latency_ms']['mean']:.3f} ms"
                  + (f"; peer: {pe['throughput']:.1f}/s, mean {pe['latency_ms']['mean']:.3f} ms" if pe else ""),
                  f"  {'budget':>6} {'cost':>6} {'thr/s':>10} {'mean ms':>9} {'p99 ms':>9} {'peer':>6} {'real':>6} {'ideal':>6} "
                  f"{'eff':>6} {'acc':>7}  exits / thresholds"]
        for ee in r["early_exit"]:
            sp = ee["speedup"]
            acc = f"{ee['accuracy']:.4f}" if "accuracy" in ee else "-"
            bud = f"{ee['budget']:.2f}" if ee.get("budget") is not None else "-"
            cost = ee["exits"]["expected_cost"]
            lines.append(
                f"  {bud:>6} {cost:6.3f} {ee['throughput']:10.1f} {ee['latency_ms']['mean']:9.3f} "
                f"{ee['latency_ms'].get('p99', math.nan):9.3f} {sp.get('over_peer', math.nan):6.3f} {sp['realised']:6.3f} {sp['ideal']:6.3f} "
                f"{sp['efficiency']:6.3f} {acc:>7}  [{_dist(ee['exits']['realised'])}] / "
                f"[{' '.join(f'{t:.4g}' for t in ee['thresholds'])}]")
    ho = report.get("host_overhead")
    if ho:
        lines += ["", "host overhead (null backend, no inference):"]
        for row in ho:
            e, s2 = row["early_exit"], row["static"]
            lines.append(f"  batch {row['batch']:>4}: early exit {e['ms_per_stage_batch']:.3f} ms per stage batch "
                         f"({e['stage_batches_per_iteration']:.2f} per call), static {s2['ms_per_stage_batch']:.3f} ms")
    for w in report.get("warnings") or []:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
