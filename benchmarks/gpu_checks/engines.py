"""TensorRT checks: engines built for this GPU per precision, their parity with ONNX Runtime, per-stage timings,
and the TensorRT backend's early-exit pipeline (default, refill, CUDA graphs) against the CPU pipeline; and,
on any GPU machine, NVIDIA's lean TensorRT runtime (carried in the kit as two wheels) imported and a ``Runtime``
created on the GPU."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

from dmpo_edge._lazy import available
from dmpo_edge.bundle import Bundle
from dmpo_edge.errors import DmpoEdgeError

from .bundles import precision_bundle
from .reference import TRT_TOL, cmp_detail, compare_exits, ort_backend, run_pipeline, stage_parity, static_run, timing, timing_text
from .report import SKIP

__all__ = ["step_trt", "step_lean_runtime", "LEAN_WHEELS"]

#: the lean TensorRT runtime's wheels (module, distribution), installed from the kit where they are missing
LEAN_WHEELS = (("tensorrt_lean_libs", "tensorrt_lean_cu13_libs"), ("tensorrt_lean_bindings", "tensorrt_lean_cu13_bindings"))
#: the CUDA major the carried lean wheels are built for (cu13): an older driver cannot run them
LEAN_CUDA_MAJOR = 13


def _driver_cuda_major():
    """The CUDA version the driver supports (major), from cuda-python; None when unknown."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        if available(name):
            import importlib

            err, v = importlib.import_module(name).cudaDriverGetVersion()
            return int(v) // 1000 if int(err) == 0 and v else None
    return None


def step_lean_runtime(ctx) -> dict:
    """``import tensorrt_lean_bindings`` (from the kit's wheels when missing) and ``trt.Runtime`` on the GPU.

    A logger of our own collects TensorRT's messages: the binding returns a Runtime object even when TensorRT
    could not initialise CUDA, and says so only in the log. The dry run imports and introspects only."""
    from .kit import ensure_from_kit

    how = []
    for module, dist in LEAN_WHEELS:
        how.append(f"{dist}: {ensure_from_kit(module, dist, ctx.args.kit, ctx.site)}")
    import tensorrt_lean_bindings as trt

    out = {"tensorrt_lean": trt.__version__, "installed": how, "cuda_major_needed": LEAN_CUDA_MAJOR}
    api = [n for n in ("Runtime", "ICudaEngine", "IExecutionContext", "TensorIOMode", "ExecutionContextAllocationStrategy")
           if not hasattr(trt, n)]
    if api:
        return dict(out, ok=False, detail=f"TensorRT {trt.__version__} lean bindings lack {', '.join(api)}")
    if ctx.args.dry_run:
        return dict(out, ok=None, detail=f"dry run: TensorRT {trt.__version__} lean runtime bindings import "
                    "(Runtime not created: no GPU)")
    driver = _driver_cuda_major()
    out["driver_cuda_major"] = driver
    if driver is not None and driver < LEAN_CUDA_MAJOR:
        return dict(out, ok=None, detail=f"TensorRT {trt.__version__} lean (cu{LEAN_CUDA_MAJOR}) imports; the driver "
                    f"supports CUDA {driver} only, so no Runtime (carry the cu12 lean wheels for this machine)")

    class Collect(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages = []

        def log(self, severity, msg):
            self.messages.append((str(severity), str(msg)))

    logger = Collect()
    runtime = trt.Runtime(logger)
    errors = [m for sev, m in logger.messages if "ERROR" in sev]
    out["log"] = logger.messages[-10:]
    ok = runtime is not None and not errors
    engine = runtime.deserialize_cuda_engine(b"not an engine") if ok else None
    return dict(out, ok=ok and engine is None,
                detail=(f"TensorRT {trt.__version__} lean runtime: Runtime created on the GPU, a corrupt plan refused "
                        "cleanly" if ok and engine is None else
                        f"TensorRT {trt.__version__} lean runtime: {errors[0] if errors else 'no Runtime'}"))


def _engine_stage_timing(be, bundle, x, batch: int, reps: int) -> list:
    """Median ms of each stage engine at ``batch``, input upload and the three small downloads included
    (every sample survives: keep_idx = arange; features stay on the device between stages)."""
    xb = x[:batch]
    keep = np.arange(xb.shape[0], dtype=np.int32)
    out_ms = []
    feats = None
    for k in range(bundle.num_stages):
        feeds = {"input": xb} if k == 0 else {"features": feats, "keep_idx": keep}
        times, last = [], None
        for _ in range(reps + 2):  # two warm-up runs
            t = time.perf_counter()
            res = be.infer(k, feeds, keep_features=True)
            times.append(time.perf_counter() - t)
            if last is not None:
                be.release(last)
            last = res.get("features")
        if feats is not None:
            be.release(feats)
        feats = last
        out_ms.append(1e3 * float(np.median(times[2:])))
    if feats is not None:
        be.release(feats)
    return out_ms


def step_trt(ctx, precision: str) -> None:
    rep = ctx.report
    a = ctx.args
    key = f"trt_{precision}"
    try:
        src = precision_bundle(ctx, precision)
    except DmpoEdgeError as exc:
        rep.add(f"{key}_bundle", f"TensorRT {precision}: bundle", "trt", SKIP, f"cannot make the {precision} bundle here: {exc}")
        return
    if src is None:
        rep.add(f"{key}_bundle", f"TensorRT {precision}: bundle", "trt", SKIP, f"no {precision} bundle in the kit and no checkpoint")
        return
    path = os.path.join(ctx.work, f"trt_bundle_{precision}")
    shutil.copytree(src, path, ignore=shutil.ignore_patterns("engines"), dirs_exist_ok=False)
    bundle = Bundle.load(path)
    band, share, tol = TRT_TOL[bundle.precision]

    def build():
        from dmpo_edge.compile import build_engines

        t = time.perf_counter()
        d = build_engines(path, force=True, log=lambda m: print(m, file=sys.stderr))
        with open(os.path.join(d, "engines.json")) as f:
            meta = json.load(f)
        return {"ok": True, "engines": d, "device_key": meta.get("device_key"),
                "build_s": round(time.perf_counter() - t, 1), "settings": meta.get("settings"),
                "detail": f"{bundle.num_stages} engines for {meta.get('device_key')} in {time.perf_counter() - t:.0f} s"}

    built = rep.run(f"{key}_build", f"TensorRT {precision}: build engines", "trt", build)
    if not built or not built.get("ok"):
        return
    from dmpo_edge.runtime.backends.trt import TrtBackend

    impl = "pycuda" if available("pycuda.driver") else "cuda-python"
    ort_ref = static_run(bundle, ctx.x, ctx.batch, ort_backend(bundle, a.threads, variant="default"))
    trt_static = {}

    def parity():
        with TrtBackend(bundle, device=impl) as be:
            trt_static["out"] = static_run(bundle, ctx.x, ctx.batch, be)
            ms = _engine_stage_timing(be, bundle, ctx.x, ctx.batch, a.engine_reps)
        r = stage_parity(ort_ref, trt_static["out"], tol)
        r["stage_ms"] = ms
        r["detail"] = (f"vs ONNX Runtime CPU on the same graphs: {r['detail']}; per-stage engine ms at batch {ctx.batch}: "
                       + " + ".join(f"{v:.2f}" for v in ms) + f" = {sum(ms):.2f}")
        return r

    rep.run(f"{key}_parity", f"TensorRT {precision}: stage parity + timing", f"trt/{impl}", parity)

    cpu = run_pipeline(bundle, "ort", ctx.thresholds, ctx.x, ctx.batch, repeats=0, max_in_flight=a.in_flight,
                       backend_options={"providers": ["CPUExecutionProvider"], "threads": a.threads, "variant": "default"},
                       static=False)["results"]
    impls = [impl] + (["cuda-python"] if precision == "fp32" and impl == "pycuda" and
                      (available("cuda.bindings.runtime") or available("cuda.cudart")) else [])
    for dev_impl in impls:
        for variant, extra in (("default", {}), ("refill", {"refill": True, "max_in_flight": a.in_flight + 1}),
                               ("graphs", {"buckets": "pow2"})):
            def pipe(dev_impl=dev_impl, variant=variant, extra=extra):
                kw = {"max_in_flight": a.in_flight}
                kw.update(extra)
                # graphs: pow2 batch buckets, one CUDA graph per (stage, bucket shape, bound buffers)
                be = TrtBackend(bundle, device=dev_impl, features_buffers=kw["max_in_flight"] + 2,
                                cuda_graphs=True if variant == "graphs" else None)
                run = run_pipeline(bundle, be, ctx.thresholds, ctx.x, ctx.batch, repeats=a.repeats,
                                   static=variant == "default", **kw)
                got_conf = [s["confidence"] for s in trt_static["out"]] if trt_static.get("out") else None
                c = compare_exits({"exit_stage": cpu.exit_stage, "prediction": cpu.prediction, "confidence": cpu.confidence},
                                  run["results"], ctx.thresholds, [s["confidence"] for s in ort_ref], got_conf, band,
                                  max_share=share, ref_logits=[s["logits"] for s in ort_ref])
                c.update(timing(ctx, run))
                gs = ""
                if variant == "graphs":
                    c["graph_stats"] = be.graph_stats()
                    gs = ("; graphs: {captured} captured, {launched} launches, {enqueued} enqueues, "
                          "{capture_failed} failed captures").format(**c["graph_stats"])
                    if c["graph_stats"]["launched"] == 0 and c["graph_stats"]["capture_failed"] == 0:
                        c["ok"] = False  # graphs were asked for and never ran
                c["detail"] = (cmp_detail(c, timing_text(c)) + f" ({kw['max_in_flight']} in flight, {variant}; "
                               f"vs ORT CPU pipeline{gs})")
                return c

            rep.run(f"{key}_pipeline_{dev_impl}_{variant}", f"TensorRT {precision}: early-exit pipeline", f"trt/{dev_impl}", pipe)
