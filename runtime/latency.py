"""Measured per-stage times kept in the bundle: ``reports/latency.json``, written by ``dmpo-edge bench``.

FLOPs say what a stage computes; its time on a given machine says what it costs there (depthwise layers at
high resolution, small regrouped batches and the host's own work make the two differ). ``bench`` records,
per machine, backend, precision and batch size, the static pipeline's backend time per stage and the
pipeline's host overhead per stage batch, so that ``calibrate --latency-budget MS`` can choose thresholds by
expected time per sample, and plots can draw time on their cost axis.

An entry is keyed by ``(machine, backend, precision, batch)``; a new measurement replaces the old one with
the same key and leaves the others. The expected time per sample that leaves at exit k is
``cumulative_ms_per_sample[k]``: the sum over stages 0..k of (stage time per batch + host overhead per stage
batch) / batch.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform

from ..errors import DmpoEdgeError

__all__ = ["LATENCY_REPORT", "machine_key", "latency_entries", "record_latency", "load_latency", "find_latency",
           "cumulative_ms"]

LATENCY_REPORT = os.path.join("reports", "latency.json")
FORMAT = "dmpo-edge-latency"


def machine_key(machine: dict | None = None) -> str:
    """What identifies "this machine" for timings: CPU model, usable cores, and the host name."""
    if machine is None:
        from .bench_measure import machine_info

        machine = machine_info()
    return f"{machine.get('cpu')} | {machine.get('usable_cores')} cores | {platform.node() or 'host'}"


def latency_entries(report: dict) -> list:
    """Latency entries from a ``dmpo-edge bench`` report (one per batch size measured with thresholds)."""
    out = []
    key = machine_key(report.get("machine"))
    bundle = report["bundle"]
    for r in report.get("results") or []:
        st, ee, b = r["static"], r["early_exit"], int(r["batch"])
        stage_ms = [float(s["time_ms_per_batch"]) for s in st["stages"]]
        host = ee.get("host_overhead_ms_per_stage_batch")
        host = max(0.0, float(host)) if host is not None else 0.0
        per_sample = [(t + host) / b for t in stage_ms]
        e = {"machine": key, "backend": report["backend"]["name"], "precision": bundle["precision"], "batch": b,
             "stage_ms_per_batch": stage_ms, "host_overhead_ms_per_stage_batch": host,
             "stage_ms_per_sample": per_sample, "cumulative_ms_per_sample": cumulative_ms(per_sample),
             "static_ms_per_batch": float(st["latency_ms"]["mean"]),
             "early_exit_ms_per_batch": float(ee["latency_ms"]["mean"]),
             "loadavg": (report.get("machine") or {}).get("loadavg"),
             "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if r.get("peer"):
            e["peer_ms_per_batch"] = float(r["peer"]["latency_ms"]["mean"])
        out.append(e)
    return out


def cumulative_ms(per_sample: list) -> list:
    out, total = [], 0.0
    for t in per_sample:
        total += float(t)
        out.append(total)
    return out


def load_latency(bundle_path: str) -> dict | None:
    """The bundle's latency report, or None when there is none; a damaged one is one clear error."""
    path = os.path.join(bundle_path, LATENCY_REPORT)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            rep = json.loads(f.read(16 << 20).decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise DmpoEdgeError(f"bundle {bundle_path}", f"{LATENCY_REPORT} cannot be read ({exc}). Delete it and measure again "
                            f"with 'dmpo-edge bench {bundle_path}'") from None
    if not isinstance(rep, dict) or rep.get("format") != FORMAT or not isinstance(rep.get("entries"), list):
        raise DmpoEdgeError(f"bundle {bundle_path}", f"{LATENCY_REPORT} is not a latency report. Delete it and measure again "
                            f"with 'dmpo-edge bench {bundle_path}'")
    return rep


def record_latency(bundle, entries: list) -> str:
    """Merge ``entries`` into the bundle's latency report (same key replaced), written atomically."""
    from ..bundle import write_json_atomic

    old = load_latency(bundle.path) or {"format": FORMAT, "entries": []}
    keys = {(e["machine"], e["backend"], e["precision"], e["batch"]) for e in entries}
    kept = [e for e in old["entries"] if (e.get("machine"), e.get("backend"), e.get("precision"), e.get("batch")) not in keys]
    rep = {"format": FORMAT, "stage_sha256": [s["sha256"] for s in bundle.stages],
           "entries": sorted(kept + entries, key=lambda e: (str(e["machine"]), str(e["backend"]), int(e["batch"])))}
    path = os.path.join(bundle.path, LATENCY_REPORT)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, rep)
    return path


def find_latency(bundle, batch: int | None = None, backend: str | None = None, where: str = "calibrate") -> dict:
    """The entry measured on this machine for the bundle's precision (and ``batch``/``backend`` when given).

    Without ``batch``: batch 1 when it was measured (the latency of one request), else the smallest batch.
    No report, or none for this machine: one clear error naming the command that writes it.
    """
    rep = load_latency(bundle.path)
    how = (f"Measure it here first: dmpo-edge bench {bundle.path} --batch {batch or 1}"
           + (f" --backend {backend}" if backend else "") + " (it writes reports/latency.json)")
    if rep is None:
        raise DmpoEdgeError(where, f"the bundle has no latency report ({LATENCY_REPORT}). {how}")
    if rep.get("stage_sha256") not in (None, [s["sha256"] for s in bundle.stages]):
        raise DmpoEdgeError(where, f"{LATENCY_REPORT} was measured on other stage graphs (the bundle was recompiled). {how}")
    key = machine_key()
    mine = [e for e in rep["entries"] if e.get("machine") == key and e.get("precision") == bundle.precision
            and (backend is None or e.get("backend") == backend)]
    if not mine:
        there = sorted({str(e.get("machine")) for e in rep["entries"]})
        raise DmpoEdgeError(where, f"{LATENCY_REPORT} has no timings for this machine ({key}); it has {there}. {how}")
    if batch is not None:
        got = [e for e in mine if int(e.get("batch", -1)) == int(batch)]
        if not got:
            raise DmpoEdgeError(where, f"{LATENCY_REPORT} has no timings at batch {batch} for this machine (measured: "
                                f"{sorted({int(e['batch']) for e in mine})}). {how}")
        return got[0]
    ones = [e for e in mine if int(e.get("batch", -1)) == 1]
    return ones[0] if ones else min(mine, key=lambda e: int(e["batch"]))
