"""``dmpo-edge bench``: trtexec-style latency of the early-exit pipeline against the static model, same run.

For each batch size the early-exit pipeline and the static full model (every stage, no exits, same
backend, same inputs) are timed *interleaved*: round r runs batch r through the pipeline, then the same
batch through the static model, so clock, thermal and neighbour drift hits both. Only the inference call
is timed; bookkeeping (exit histograms, counters, accuracy) runs between the timed calls.

trtexec's defaults and vocabulary: warm-up 200 ms, then at least 10 iterations and at least 3 s;
throughput in samples/s; latency min / mean / median / p90 / p95 / p99 / max with trtexec's percentile
(see :mod:`.bench_stats`). On top: per-stage time and samples, the exit histogram against the manifest's
expected distribution, the realised speed-up (static / early exit), the ideal speed-up (full FLOPs /
expected FLOPs under the realised exits) and their ratio, the efficiency.

Numpy only here; data sets and threshold solvers are the command's business (this module takes arrays).
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .._lazy import installed_version, require
from ..errors import DmpoEdgeError
from ..policies import format_thresholds
from .bench_stats import TRTEXEC_PERCENTILES, expected_cost, ideal_speedup, summarize

__all__ = [
    "DEFAULT_WARMUP_MS", "DEFAULT_DURATION_S", "DEFAULT_ITERATIONS", "DEFAULT_SWEEP_BUDGETS",
    "parse_batch_list", "parse_float_list", "parse_thresholds", "Runner", "interleave", "BenchSettings", "threads_text",
    "batches_of", "bench_batch", "run_benchmark", "host_overhead", "format_report", "plot_sweep", "machine_info",
]

# trtexec: --warmUp=200 (ms), --iterations=10, --duration=3 (s)
DEFAULT_WARMUP_MS = 200.0
DEFAULT_DURATION_S = 3.0
DEFAULT_ITERATIONS = 10
DEFAULT_SWEEP_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
WHERE = "bench"


# --- argument lists -------------------------------------------------------------------------------
def parse_batch_list(text, max_batch: int | None = None) -> list:
    """``"1,8,32"`` -> ``[1, 8, 32]``; positive, distinct, at most the bundle's ``max_batch``."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise DmpoEdgeError(WHERE, f"--batch {text!r} is malformed. Expected comma-separated positive integers, e.g. 1,8,32")
    out = []
    for t in items:
        try:
            b = int(t)
        except ValueError:
            raise DmpoEdgeError(WHERE, f"--batch entry {t!r} is not an integer. Expected e.g. 1,8,32") from None
        if b < 1:
            raise DmpoEdgeError(WHERE, f"--batch entry {b} must be at least 1")
        if b in out:
            raise DmpoEdgeError(WHERE, f"--batch lists {b} twice")
        out.append(b)
    if max_batch is not None:
        over = [b for b in out if b > max_batch]
        if over:
            raise DmpoEdgeError(
                WHERE, f"batch size(s) {over} exceed the bundle's max batch {max_batch}. Use --batch up to {max_batch} "
                "or recompile with a larger --max-batch")
    return out


def parse_float_list(text, what: str, where: str = WHERE) -> list:
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise DmpoEdgeError(where, f"{what} {text!r} is malformed. Expected comma-separated numbers")
    out = []
    for t in items:
        try:
            v = float(t)
        except ValueError:
            raise DmpoEdgeError(where, f"{what} entry {t!r} is not a number") from None
        if not math.isfinite(v):
            raise DmpoEdgeError(where, f"{what} entry {t!r} is not finite")
        out.append(v)
    return out


def parse_thresholds(text, num_stages: int) -> list:
    """``"0.9,0.8"`` -> K-1 floats (one per early exit; the last exit takes everyone)."""
    vals = parse_float_list(text, "--thresholds")
    if len(vals) != num_stages - 1:
        raise DmpoEdgeError(
            WHERE, f"--thresholds has {len(vals)} value(s) but the bundle has {num_stages} stages. "
            f"Expected {num_stages - 1} (one per early exit; the last exit takes everyone)")
    return vals


# --- the interleaved loop -------------------------------------------------------------------------
@dataclass
class Runner:
    """One configuration in the interleaved loop. ``call(j)`` is timed; ``before``/``after`` are not."""

    name: str
    call: Callable[[int], object]
    before: Callable[[int], None] | None = None
    after: Callable[[int, object], None] | None = None


def interleave(runners: list, num_batches: int, warmup_s: float, duration_s: float, min_iterations: int,
               clock: Callable[[], float] = time.perf_counter, settle: bool = False) -> dict:
    """Round-robin over ``runners``: round r feeds batch ``r % num_batches`` to each runner in turn.

    Warm-up rounds run until ``warmup_s`` has passed (none for 0); timed rounds run until at least
    ``min_iterations`` rounds and ``duration_s`` seconds are done. With ``settle`` each runner first makes
    one untimed call on the previous batch (outside ``before``/``after``), so that its timed call starts from
    the caches and buffers its own configuration leaves behind, as it would running alone, not from the
    previous runner's. Returns ``trace`` (name, batch index, start, end per timed call, in call order),
    ``latency_s`` per runner, ``warmup`` and ``wall_s``.
    """
    if not runners:
        raise DmpoEdgeError(WHERE, "nothing to benchmark")
    if num_batches < 1:
        raise DmpoEdgeError(WHERE, "no input batch to benchmark")
    warm_rounds = 0
    t0 = clock()
    while warmup_s > 0 and clock() - t0 < warmup_s:
        j = warm_rounds % num_batches
        for r in runners:
            if r.before:
                r.before(j)
            r.call(j)
        warm_rounds += 1
    warm_s = clock() - t0
    trace = []
    lat = {r.name: [] for r in runners}
    rounds = 0
    start = clock()
    while True:
        j = rounds % num_batches
        for r in runners:
            if settle:  # the previous batch, as in a stream: the timed call's input is not pre-warmed by it
                r.call((j - 1) % num_batches)
            if r.before:
                r.before(j)
            a = clock()
            out = r.call(j)
            b = clock()
            trace.append((r.name, j, a, b))
            lat[r.name].append(b - a)
            if r.after:
                r.after(j, out)
        rounds += 1
        if rounds >= min_iterations and clock() - start >= duration_s:
            break
    return {"trace": trace, "latency_s": lat, "rounds": rounds, "wall_s": clock() - start,
            "warmup": {"rounds": warm_rounds, "ms": warm_s * 1e3}}


def batches_of(x: np.ndarray, batch: int, labels=None) -> tuple:
    """Cut ``x`` into batches of exactly ``batch`` samples that cover every sample once, wrapping round
    the end (exits depend on the data, so every sample should count). Copies are made up front so that
    no indexing is timed."""
    n = int(x.shape[0])
    if n == 0:
        raise DmpoEdgeError(WHERE, "the data has no samples")
    nb = max(1, -(-n // batch))
    idx = [(np.arange(batch) + j * batch) % n for j in range(nb)]
    xs = [np.ascontiguousarray(x[i]) for i in idx]
    ys = None if labels is None else [np.asarray(labels)[i] for i in idx]
    return xs, ys, idx


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
                stage_batch: int | None = None) -> dict:
    """Time every early-exit configuration in ``configs`` and the static model at one batch size.

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
    # Streams (several batches per call) settle by themselves after their first batch; one-batch calls do not.
    loop = interleave([make(r) for r in order], len(xs), settings.warmup_ms / 1e3,
                      settings.duration_s if duration_s is None else duration_s, int(settings.iterations),
                      settle=bool(settings.settle) and stage_batch is None)
    lat = loop["latency_s"]
    st = _runner_summary(static, lat["static"], batch, settings)
    out = {"batch": batch, "rounds": loop["rounds"], "wall_s": loop["wall_s"], "warmup": loop["warmup"],
           "order": [r.name for r in order], "static": st, "early_exit": []}
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
        if "accuracy" in ee and "accuracy" in st:
            ee["accuracy_drop"] = st["accuracy"] - ee["accuracy"]
        out["early_exit"].append(ee)
    out["_trace"] = loop["trace"]
    return out


def run_benchmark(pipeline, x: np.ndarray, labels, settings: BenchSettings, thresholds=None, expected=None,
                  sweep: list | None = None, keep_trace: bool = False, progress=None) -> dict:
    """The whole measurement over ``settings.batch_sizes``.

    ``thresholds`` (K-1 floats, or None to skip) is the main early-exit configuration, with ``expected``
    its expected exit distribution. ``sweep``: list of configurations ``{"name", "thresholds", "budget",
    "expected"}`` timed together with the static model in one interleaved loop per batch size, for at
    least ``duration_s`` seconds per configuration. ``progress(msg)`` is told what runs next.
    """
    settings.check()
    cum = pipeline.bundle.cumulative_flops
    report = {"results": [], "sweep": [] if sweep else None}
    for b in settings.batch_sizes:
        if b > pipeline.max_batch:
            raise DmpoEdgeError(WHERE, f"batch size {b} exceeds the bundle's max batch {pipeline.max_batch}")
        if thresholds is not None:
            if progress:
                progress(f"batch {b}: early exit vs static")
            r = bench_batch(pipeline, x, labels, b, [{"name": "early_exit", "thresholds": list(thresholds),
                                                      "expected": expected}], settings, cum)
            trace = r.pop("_trace")
            if keep_trace:
                r["trace"] = trace
            ee = r.pop("early_exit")[0]
            ee.pop("name", None)
            r["early_exit"] = ee
            if settings.stream_batches:
                if progress:
                    progress(f"batch {b}: streams of {settings.stream_batches} batches, early exit vs static")
                r["streaming"] = _streaming(pipeline, x, labels, b, thresholds, expected, settings, cum)
            report["results"].append(r)
        if sweep:
            if progress:
                progress(f"batch {b}: sweep over {len(sweep)} configurations vs static")
            r = bench_batch(pipeline, x, labels, b, sweep, settings, cum,
                            duration_s=settings.duration_s * len(sweep), static_first=True)
            trace = r.pop("_trace")
            if keep_trace:
                r["trace"] = trace
            report["sweep"].append(r)
    return report


def _streaming(pipeline, x, labels, batch, thresholds, expected, settings, cum) -> dict:
    """Throughput with batches in flight: each call is ``stream_batches`` batches handed over at once."""
    count = int(settings.stream_batches)
    r = bench_batch(pipeline, x, labels, count * batch, [{"name": "early_exit", "thresholds": list(thresholds),
                                                          "expected": expected}], settings, cum, stage_batch=batch)
    r.pop("_trace")
    ee = r["early_exit"][0]
    keep = ("iterations", "throughput", "latency_ms", "stages", "backend_ms_per_iteration",
            "host_overhead_ms_per_stage_batch", "accuracy")
    return {
        "batches_per_call": count,
        "max_in_flight": getattr(pipeline, "max_in_flight", None),
        # latency here is of a whole call (a stream of batches); the figure that matters is throughput
        "early_exit": {("call_latency_ms" if k == "latency_ms" else k): ee[k] for k in keep if k in ee} | {"exits": ee["exits"]},
        "static": {("call_latency_ms" if k == "latency_ms" else k): r["static"][k] for k in keep if k in r["static"]},
        "speedup": ee["speedup"],
    }


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


# --- text report and plot -------------------------------------------------------------------------
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
        "early exit and static interleaved"
        + (", one untimed settle call before each timed one-batch call" if s.get("settle") else "")
        + "; percentiles as trtexec",
    ]
    m = report.get("machine") or {}
    if m:
        lines.append(f"machine: {m.get('cpu')} ({m.get('usable_cores')} usable of {m.get('cores')} cores)")
    for r in report.get("results") or []:
        ee, st = r["early_exit"], r["static"]
        lines += ["", f"batch {r['batch']}  ({r['rounds']} rounds in {r['wall_s']:.2f} s, warm-up {r['warmup']['rounds']} rounds)", head,
                  _lat_row("early exit", ee, cols), _lat_row("static", st, cols)]
        stg = " | ".join(f"{x['stage']}: {x['time_ms_per_iteration']:.3f} ms, {x['samples_in'] / ee['iterations']:.1f} in"
                         for x in ee["stages"])
        lines.append(f"  stages (early exit, per iteration): {stg}")
        ex = ee["exits"]
        dev = f" (max deviation {ex['max_abs_deviation']:.3f})" if "max_abs_deviation" in ex else ""
        lines.append(f"  exits: realised {_dist(ex['realised'])} over {ex['samples']} samples | expected {_dist(ex['expected'])}{dev}")
        sp = ee["speedup"]
        eff = "-" if sp["efficiency"] is None else f"{sp['efficiency']:.3f}"
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
                         f"{sm['early_exit']['throughput']:.1f}/s, static {sm['static']['throughput']:.1f}/s, realised "
                         f"{ssp['realised']:.3f}x, efficiency {_f3(ssp['efficiency'])}")
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
        lines += ["", f"sweep, batch {r['batch']}  ({r['rounds']} rounds in {r['wall_s']:.2f} s); static: "
                  f"{st['throughput']:.1f}/s, mean {st['latency_ms']['mean']:.3f} ms",
                  f"  {'budget':>6} {'cost':>6} {'thr/s':>10} {'mean ms':>9} {'p99 ms':>9} {'real':>6} {'ideal':>6} "
                  f"{'eff':>6} {'acc':>7}  exits / thresholds"]
        for ee in r["early_exit"]:
            sp = ee["speedup"]
            acc = f"{ee['accuracy']:.4f}" if "accuracy" in ee else "-"
            bud = f"{ee['budget']:.2f}" if ee.get("budget") is not None else "-"
            cost = ee["exits"]["expected_cost"]
            lines.append(
                f"  {bud:>6} {cost:6.3f} {ee['throughput']:10.1f} {ee['latency_ms']['mean']:9.3f} "
                f"{ee['latency_ms'].get('p99', math.nan):9.3f} {sp['realised']:6.3f} {sp['ideal']:6.3f} "
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


def plot_sweep(report: dict, path: str) -> str:
    """Latency and speed-up across the sweep, one line per batch size (PNG, Agg backend)."""
    require("matplotlib", "the sweep plot").use("Agg")
    plt = require("matplotlib.pyplot", "the sweep plot")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in report.get("sweep") or []:
        pts = sorted(r["early_exit"], key=lambda e: e["exits"]["expected_cost"])
        cost = [e["exits"]["expected_cost"] for e in pts]
        line, = ax1.plot(cost, [e["throughput"] for e in pts], "o-", label=f"early exit, batch {r['batch']}")
        ax1.axhline(r["static"]["throughput"], color=line.get_color(), ls="--", lw=1, label=f"static, batch {r['batch']}")
        ax2.plot(cost, [e["speedup"]["realised"] for e in pts], "o-", color=line.get_color(), label=f"realised, batch {r['batch']}")
        ax2.plot(cost, [e["speedup"]["ideal"] for e in pts], "x:", color=line.get_color(), label=f"ideal, batch {r['batch']}")
    ax1.set_xlabel("realised cost (fraction of full-model FLOPs)")
    ax1.set_ylabel("throughput (samples/s)")
    ax1.set_title("throughput across the threshold sweep")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set_xlabel("realised cost (fraction of full-model FLOPs)")
    ax2.set_ylabel("speed-up over the static model")
    ax2.set_title("realised vs ideal speed-up")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
