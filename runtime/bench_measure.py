"""Measuring ``dmpo-edge bench``: early exit against the static model at each batch size, interleaved.

For each batch size the early-exit pipeline and the static full model (every stage, no exits, same
backend, same inputs) are timed with :func:`.bench_loop.interleave`; this module drives the pipeline,
collects its per-stage counters between the timed calls and turns them into the report's figures
(latency statistics from :mod:`.bench_stats`, exits, speed-ups, efficiency breakdown, host overhead).
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field

import numpy as np

from .._lazy import installed_version
from ..errors import DmpoEdgeError
from .bench_args import WHERE
from .bench_loop import Runner, batches_of, interleave
from .bench_stats import TRTEXEC_PERCENTILES, expected_cost, ideal_speedup, summarize

__all__ = [
    "DEFAULT_WARMUP_MS", "DEFAULT_DURATION_S", "DEFAULT_ITERATIONS", "DEFAULT_SWEEP_BUDGETS", "BenchSettings",
    "bench_batch", "run_benchmark", "host_overhead", "machine_info",
]

# trtexec: --warmUp=200 (ms), --iterations=10, --duration=3 (s)
DEFAULT_WARMUP_MS = 200.0
DEFAULT_DURATION_S = 3.0
DEFAULT_ITERATIONS = 10
DEFAULT_SWEEP_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# --- settings and the benchmark -------------------------------------------------------------------
@dataclass
class BenchSettings:
    batch_sizes: list = field(default_factory=lambda: [1, 8, 32])
    warmup_ms: float = DEFAULT_WARMUP_MS
    duration_s: float = DEFAULT_DURATION_S
    iterations: int = DEFAULT_ITERATIONS
    percentiles: tuple = TRTEXEC_PERCENTILES
    # Also time a stream: each call hands `stream_batches` batches to the pipeline at once, so up to
    # max_in_flight of them overlap (what the pipeline is built for); 0 = off.
    stream_batches: int = 16
    # One untimed call before each timed one-batch call (see `interleave`): without it each configuration
    # is timed right after the other one, in the caches the other left behind.
    settle: bool = True

    def check(self) -> "BenchSettings":
        if not (self.warmup_ms >= 0 and math.isfinite(self.warmup_ms)):
            raise DmpoEdgeError(WHERE, f"--warmup {self.warmup_ms} must be >= 0 ms")
        if not (self.duration_s >= 0 and math.isfinite(self.duration_s)):
            raise DmpoEdgeError(WHERE, f"--duration {self.duration_s} must be >= 0 s")
        if int(self.iterations) < 1:
            raise DmpoEdgeError(WHERE, f"--iterations {self.iterations} must be at least 1")
        if int(self.stream_batches) < 0:
            raise DmpoEdgeError(WHERE, f"--stream {self.stream_batches} must be >= 0 (0 = no streaming run)")
        return self


# --- one batch size: early exit(s) against the static model, interleaved ---------------------------
_COUNTERS = ("samples_in", "exited", "batches", "time_s", "padded", "merged")


def _counters(pipeline) -> np.ndarray:
    return np.array([[float(s.get(c, 0.0)) for c in _COUNTERS] for s in pipeline.stats()], dtype=np.float64)


def _pop_event_timings(pipeline):
    """CUDA-event timings of the calls since the last pop, when the backend records them (TensorRT).

    Protocol: ``backend.record_timings = True`` turns recording on; ``backend.pop_event_timings()`` returns
    and clears a list of ``{"stage", "h2d_ms", "compute_ms", "d2h_ms"}``, one per ``infer`` call.
    """
    pop = getattr(getattr(pipeline, "backend", None), "pop_event_timings", None)
    return pop() if callable(pop) else None


class _Record:
    """What one runner accumulates between its timed calls."""

    def __init__(self, name, kind, num_stages, thresholds=None, meta=None):
        self.name, self.kind, self.thresholds, self.meta = name, kind, thresholds, dict(meta or {})
        self.hist = np.zeros(num_stages, np.int64)
        self.stage = np.zeros((num_stages, len(_COUNTERS)), np.float64)
        self.correct = 0
        self.labelled = 0
        self.gpu = []
        self._snap = None

    def before(self, pipeline):
        self._snap = _counters(pipeline)
        _pop_event_timings(pipeline)  # drop whatever the previous runner left

    def after(self, pipeline, res, labels):
        self.stage += _counters(pipeline) - self._snap
        self.hist += np.bincount(np.asarray(res.exit_stage, np.int64), minlength=len(self.hist))[: len(self.hist)]
        if labels is not None:
            self.correct += int((np.asarray(res.prediction) == labels).sum())
            self.labelled += int(labels.shape[0])
        ev = _pop_event_timings(pipeline)
        if ev:
            self.gpu.extend(ev)


class _PeerRecord:
    """What the peer one-graph model accumulates between its timed calls (accuracy only: it has no stages)."""

    def __init__(self):
        self.correct = 0
        self.labelled = 0

    def after(self, prediction, labels):
        if labels is not None:
            self.correct += int((np.asarray(prediction).reshape(-1) == labels).sum())
            self.labelled += int(labels.shape[0])


def _peer_summary(rec: _PeerRecord, lat_s: list, batch: int, settings: "BenchSettings") -> dict:
    n = len(lat_s)
    total_s = float(np.sum(lat_s))
    out = {"iterations": n, "throughput": batch * n / total_s if total_s > 0 else math.inf,
           "latency_ms": summarize(lat_s, percentiles=settings.percentiles)}
    if rec.labelled:
        out["accuracy"] = rec.correct / rec.labelled
    return out


def _gpu_summary(events, iterations: int):
    if not events:
        return None
    out = {}
    for key in ("h2d_ms", "compute_ms", "d2h_ms"):
        per_stage = {}
        for e in events:
            if key in e and e[key] is not None:
                per_stage.setdefault(int(e.get("stage", -1)), []).append(float(e[key]))
        out[key.replace("_ms", "")] = {
            "total_ms_per_iteration": float(sum(sum(v) for v in per_stage.values()) / max(iterations, 1)),
            "per_stage_ms_per_call": {str(k): float(np.mean(v)) for k, v in sorted(per_stage.items())},
        }
    return out


def _runner_summary(rec: _Record, lat_s: list, batch: int, settings: BenchSettings) -> dict:
    n = len(lat_s)
    total_s = float(np.sum(lat_s))
    stages = []
    for k, row in enumerate(rec.stage):
        c = dict(zip(_COUNTERS, row))
        stages.append({
            "stage": k,
            "samples_in": int(c["samples_in"]),
            "exited": int(c["exited"]),
            "batches": int(c["batches"]),
            "mean_batch": c["samples_in"] / c["batches"] if c["batches"] else 0.0,
            "time_ms_per_iteration": c["time_s"] * 1e3 / n,
            "time_ms_per_batch": c["time_s"] * 1e3 / c["batches"] if c["batches"] else 0.0,
            "padded": int(c["padded"]),
            "merged": int(c["merged"]),
        })
    backend_s = float(rec.stage[:, _COUNTERS.index("time_s")].sum())
    stage_batches = float(rec.stage[:, _COUNTERS.index("batches")].sum())
    out = {
        "iterations": n,
        "throughput": batch * n / total_s if total_s > 0 else math.inf,
        "latency_ms": summarize(lat_s, percentiles=settings.percentiles),
        "stages": stages,
        "backend_ms_per_iteration": backend_s * 1e3 / n,
        # what the pipeline adds around the backend calls: exit decisions, regrouping, bookkeeping, and the
        # worker threads' queues and wake-ups when the call goes through them (more than one batch)
        "host_overhead_ms_per_stage_batch": (total_s - backend_s) * 1e3 / stage_batches if stage_batches else None,
        "stage_batches_per_iteration": stage_batches / n,
    }
    if rec.labelled:
        out["accuracy"] = rec.correct / rec.labelled
    gpu = _gpu_summary(rec.gpu, n)
    if gpu:
        out["gpu"] = gpu
    return out


def _exit_summary(rec: _Record, cumulative_flops, expected) -> dict:
    total = int(rec.hist.sum())
    realised = (rec.hist / total).tolist() if total else [0.0] * len(rec.hist)
    out = {"histogram": rec.hist.tolist(), "samples": total, "realised": realised,
           "expected": None if expected is None else [float(v) for v in expected]}
    if expected is not None and len(expected) == len(realised):
        out["max_abs_deviation"] = float(np.max(np.abs(np.asarray(realised) - np.asarray(expected, np.float64))))
    full = float(cumulative_flops[-1])
    out["expected_cost"] = expected_cost(rec.hist, cumulative_flops) / full if total else None
    return out


def _efficiency_breakdown(ee: dict, st: dict, batch: int, ideal_flops: float) -> dict | None:
    """Split the efficiency into three factors whose product it is, to say what limits it.

    - ``flops_to_time``: the ideal speed-up from the static run's *measured* per-stage backend times
      (weighted by how many samples reached each stage) over the FLOP-based ideal. Below 1 when the early
      stages take a larger share of the time than of the FLOPs (e.g. high-resolution depthwise layers).
    - ``batch_efficiency``: that predicted early-exit backend time over the measured one. Below 1 when
      the regrouped, smaller batches of deeper stages cost more per sample than full ones.
    - ``host_factor``: the backend's share of the wall time in the early-exit run over its share in the
      static run. Below 1 when the pipeline's own per-stage work (exit decisions, regrouping, hand-offs)
      weighs more on the early-exit run, which has fewer samples per stage batch to spread it over.
    """
    n = ee["iterations"]
    static_stage = [s["time_ms_per_iteration"] for s in st["stages"]]
    reach = [s["samples_in"] / (batch * n) for s in ee["stages"]]
    predicted = float(np.dot(reach, static_stage))
    b_s, b_e = st["backend_ms_per_iteration"], ee["backend_ms_per_iteration"]
    w_s, w_e = st["latency_ms"]["mean"], ee["latency_ms"]["mean"]
    if min(predicted, b_s, b_e, w_s, w_e) <= 0:
        return None
    ideal_time = b_s / predicted
    return {
        "ideal_from_stage_times": ideal_time,
        "flops_to_time": ideal_time / ideal_flops,
        "batch_efficiency": predicted / b_e,
        "host_factor": (b_e / w_e) / (b_s / w_s),
    }


def bench_batch(pipeline, x: np.ndarray, labels, batch: int, configs: list, settings: BenchSettings,
                cumulative_flops, duration_s: float | None = None, static_first: bool = False,
                stage_batch: int | None = None, peer=None) -> dict:
    """Time every early-exit configuration in ``configs`` and the static model at one batch size.

    ``peer``: the bundle's peer one-graph model (:class:`.peer.PeerModel`, anything with ``predict(x)``),
    timed in the same rounds after the static model; each configuration's speed-up over it is reported.
    ``configs``: list of dicts ``{"name", "thresholds", "expected" (K floats or None), ...}``; extra keys
    are copied into the result. Round r runs batch r of the data through each configuration and the
    static model in turn (early exit first unless ``static_first``). With ``stage_batch`` each call
    holds ``batch`` samples that the pipeline cuts into batches of ``stage_batch`` kept in flight together.
    """
    K = pipeline.num_stages
    be = getattr(pipeline, "backend", None)
    if hasattr(be, "record_timings"):  # a GPU backend that can time H2D / compute / D2H with CUDA events
        be.record_timings = True
    xs, ys, _ = batches_of(x, batch, labels)
    static = _Record("static", "static", K)
    recs = [_Record(c["name"], "early_exit", K, c["thresholds"], c) for c in configs]

    def make(rec):
        def call(j):
            if rec.kind == "static":
                return pipeline.run_static(xs[j], batch_size=stage_batch or batch)
            return pipeline.predict(xs[j], batch_size=stage_batch or batch, thresholds=rec.thresholds)

        return Runner(rec.name, call, before=lambda j: rec.before(pipeline),
                      after=lambda j, res: rec.after(pipeline, res, None if ys is None else ys[j]))

    order = ([static] + recs) if static_first else (recs + [static])
    runners = [make(r) for r in order]
    peer_rec = _PeerRecord() if peer is not None else None
    if peer is not None:
        step = stage_batch or batch

        def peer_call(j):  # one graph, one session: a stream is its batches one after the other
            xb = xs[j]
            if step >= xb.shape[0]:
                return peer.predict(xb)["prediction"]
            return np.concatenate([peer.predict(xb[i:i + step])["prediction"] for i in range(0, xb.shape[0], step)])

        runners.append(Runner("peer", peer_call, after=lambda j, pred: peer_rec.after(pred, None if ys is None else ys[j])))
    # Streams (several batches per call) settle by themselves after their first batch; one-batch calls do not.
    loop = interleave(runners, len(xs), settings.warmup_ms / 1e3,
                      settings.duration_s if duration_s is None else duration_s, int(settings.iterations),
                      settle=bool(settings.settle) and stage_batch is None)
    lat = loop["latency_s"]
    st = _runner_summary(static, lat["static"], batch, settings)
    out = {"batch": batch, "rounds": loop["rounds"], "wall_s": loop["wall_s"], "warmup": loop["warmup"],
           "order": [r.name for r in runners], "static": st, "early_exit": []}
    pe = None
    if peer_rec is not None:
        pe = _peer_summary(peer_rec, lat["peer"], batch, settings)
        out["peer"] = pe
    for rec in recs:
        ee = _runner_summary(rec, lat[rec.name], batch, settings)
        ee["name"] = rec.name
        ee["thresholds"] = [float(t) for t in rec.thresholds]
        for key, val in rec.meta.items():
            if key not in ("name", "thresholds", "expected"):
                ee[key] = val
        ee["exits"] = _exit_summary(rec, cumulative_flops, rec.meta.get("expected"))
        ideal = ideal_speedup(rec.hist, cumulative_flops) if rec.hist.sum() else None
        realised = st["latency_ms"]["mean"] / ee["latency_ms"]["mean"]
        ee["speedup"] = {
            "realised": realised,
            "realised_median": st["latency_ms"]["median"] / ee["latency_ms"]["median"],
            "ideal": ideal,
            "efficiency": realised / ideal if ideal else None,
        }
        if ideal:
            ee["speedup"]["breakdown"] = _efficiency_breakdown(ee, st, batch, ideal)
        if pe is not None:
            ee["speedup"]["over_peer"] = pe["latency_ms"]["mean"] / ee["latency_ms"]["mean"]
            ee["speedup"]["over_peer_median"] = pe["latency_ms"]["median"] / ee["latency_ms"]["median"]
            if "accuracy" in ee and "accuracy" in pe:
                ee["accuracy_drop_vs_peer"] = pe["accuracy"] - ee["accuracy"]
        if "accuracy" in ee and "accuracy" in st:
            ee["accuracy_drop"] = st["accuracy"] - ee["accuracy"]
        out["early_exit"].append(ee)
    out["_trace"] = loop["trace"]
    return out


def run_benchmark(pipeline, x: np.ndarray, labels, settings: BenchSettings, thresholds=None, expected=None,
                  sweep: list | None = None, keep_trace: bool = False, progress=None, peer=None) -> dict:
    """The whole measurement over ``settings.batch_sizes``.

    ``thresholds`` (K-1 floats, or None to skip) is the main early-exit configuration, with ``expected``
    its expected exit distribution. ``sweep``: list of configurations ``{"name", "thresholds", "budget",
    "expected"}`` timed together with the static model in one interleaved loop per batch size, for at
    least ``duration_s`` seconds per configuration. ``progress(msg)`` is told what runs next. ``peer``:
    the peer one-graph model, timed in every loop (see :func:`bench_batch`).
    """
    settings.check()
    cum = pipeline.bundle.cumulative_flops
    report = {"results": [], "sweep": [] if sweep else None}
    for b in settings.batch_sizes:
        if b > pipeline.max_batch:
            raise DmpoEdgeError(WHERE, f"batch size {b} exceeds the bundle's max batch {pipeline.max_batch}")
        if thresholds is not None:
            if progress:
                progress(f"batch {b}: early exit vs static" + (" vs peer" if peer is not None else ""))
            r = bench_batch(pipeline, x, labels, b, [{"name": "early_exit", "thresholds": list(thresholds),
                                                      "expected": expected}], settings, cum, peer=peer)
            trace = r.pop("_trace")
            if keep_trace:
                r["trace"] = trace
            ee = r.pop("early_exit")[0]
            ee.pop("name", None)
            r["early_exit"] = ee
            if settings.stream_batches:
                if progress:
                    progress(f"batch {b}: streams of {settings.stream_batches} batches, early exit vs static")
                r["streaming"] = _streaming(pipeline, x, labels, b, thresholds, expected, settings, cum, peer)
            report["results"].append(r)
        if sweep:
            if progress:
                progress(f"batch {b}: sweep over {len(sweep)} configurations vs static")
            r = bench_batch(pipeline, x, labels, b, sweep, settings, cum,
                            duration_s=settings.duration_s * len(sweep), static_first=True, peer=peer)
            trace = r.pop("_trace")
            if keep_trace:
                r["trace"] = trace
            report["sweep"].append(r)
    return report


def _streaming(pipeline, x, labels, batch, thresholds, expected, settings, cum, peer=None) -> dict:
    """Throughput with batches in flight: each call is ``stream_batches`` batches handed over at once."""
    count = int(settings.stream_batches)
    r = bench_batch(pipeline, x, labels, count * batch, [{"name": "early_exit", "thresholds": list(thresholds),
                                                          "expected": expected}], settings, cum, stage_batch=batch,
                    peer=peer)
    r.pop("_trace")
    ee = r["early_exit"][0]
    keep = ("iterations", "throughput", "latency_ms", "stages", "backend_ms_per_iteration",
            "host_overhead_ms_per_stage_batch", "accuracy")
    out = {
        "batches_per_call": count,
        "max_in_flight": getattr(pipeline, "max_in_flight", None),
        # latency here is of a whole call (a stream of batches); the figure that matters is throughput
        "early_exit": {("call_latency_ms" if k == "latency_ms" else k): ee[k] for k in keep if k in ee} | {"exits": ee["exits"]},
        "static": {("call_latency_ms" if k == "latency_ms" else k): r["static"][k] for k in keep if k in r["static"]},
        "speedup": ee["speedup"],
    }
    if "peer" in r:
        out["peer"] = {("call_latency_ms" if k == "latency_ms" else k): v for k, v in r["peer"].items()}
    return out


# --- host overhead with a backend that does no work -----------------------------------------------
def host_overhead(bundle, batch_sizes, thresholds=None, settings: BenchSettings | None = None,
                  pipeline_options: dict | None = None) -> list:
    """What the pipeline itself costs per stage per batch: the same loop over the ``null`` backend.

    The null backend returns correctly shaped outputs without computing anything, so the latency of a
    call is the pipeline's own work: exit decisions, regrouping and bookkeeping (one batch runs in the
    caller's thread; longer calls add the workers' queues). Returned per batch size for the early-exit
    pipeline and the static path: ms per stage batch (mean latency / stage batches per call).
    """
    from ._common import as_bundle, input_shape
    from .pipeline import Pipeline

    settings = settings or BenchSettings()
    b = as_bundle(bundle)
    K = b.num_stages
    # The null backend's scores are synthetic (stage k's lie in [(k+1)/2K, (k+1)/2K + 1/2)), so the bundle's
    # thresholds mean nothing for them; 70% up each range spreads the exits over every stage (on 4 stages,
    # batch 32: 9 / 9 / 8 / 6), so every stage runs, on shrinking regrouped batches, as in a real run.
    th = thresholds if thresholds is not None else [0.35 + 0.5 * (k + 1) / K for k in range(K - 1)]
    shape = input_shape(b)
    out = []
    with Pipeline.from_bundle(b, backend="null", thresholds=th, **(pipeline_options or {})) as pipe:
        for bs in batch_sizes:
            x = np.zeros((max(bs, 1),) + tuple(shape), np.float32)
            r = bench_batch(pipe, x, None, bs, [{"name": "early_exit", "thresholds": list(th)}], settings,
                            b.cumulative_flops)
            row = {"batch": bs, "thresholds": [float(t) for t in th], "exits": r["early_exit"][0]["exits"]["realised"]}
            for name, s in (("early_exit", r["early_exit"][0]), ("static", r["static"])):
                row[name] = {
                    "iterations": s["iterations"],
                    "latency_ms": {k: s["latency_ms"][k] for k in ("mean", "median", "p99")},
                    "stage_batches_per_iteration": s["stage_batches_per_iteration"],
                    "ms_per_stage_batch": s["latency_ms"]["mean"] / s["stage_batches_per_iteration"],
                    "ms_per_stage_batch_median": s["latency_ms"]["median"] / s["stage_batches_per_iteration"],
                }
            out.append(row)
    return out


# --- machine and versions -------------------------------------------------------------------------
def machine_info() -> dict:
    """CPU model, cores and library versions (read without importing the heavy packages)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("dmpo-edge", "onnxruntime", "onnxruntime-gpu", "tensorrt", "pycuda", "cuda-python"):
        v = installed_version(dist)
        if v:
            versions[dist] = v
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "platform": platform.platform(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "versions": versions}
