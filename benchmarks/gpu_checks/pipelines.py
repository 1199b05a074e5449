"""Pipeline checks: the CPU reference and pipeline, and the runtime's Pipeline on the GPU through torch
(:mod:`.torch_backend`, the engines' stand-in) and through ONNX Runtime's CUDA provider where it is installed."""

from __future__ import annotations

import numpy as np

from .bundles import load_inputs
from .reference import (
    PRECISION_TOL, cmp_detail, compare_exits, early_exit_reference, ort_backend, run_pipeline, spread_thresholds,
    stage_parity, static_run, timing, timing_text,
)

__all__ = ["step_cpu_reference", "step_cpu_pipeline", "step_torch_parity", "step_torch_pipeline", "step_ort_cuda"]


def step_cpu_reference(ctx) -> dict:
    a = ctx.args
    b = ctx.bundle
    ctx.x, ctx.labels, src = load_inputs(b, a.samples)
    ctx.cpu_static = static_run(b, ctx.x, ctx.batch, ort_backend(b, a.threads))
    conf = [s["confidence"] for s in ctx.cpu_static]
    if a.thresholds == "spread" or (a.thresholds == "manifest" and b.thresholds is None):
        ctx.thresholds = spread_thresholds(conf, ctx.band)
        how = "spread (every exit takes a share)"
    elif a.thresholds == "manifest":
        ctx.thresholds = [float(t) for t in b.thresholds]
        how = "the bundle's calibrated thresholds"
    else:
        ctx.thresholds = [float(t) for t in a.thresholds.split(",")]
        how = "given"
    ctx.reference = early_exit_reference(ctx.cpu_static, ctx.thresholds)
    acc = None
    if ctx.labels is not None and [str(c) for c in b.classes] == [str(i) for i in range(10)]:
        acc = [float(np.mean(s["prediction"] == ctx.labels)) for s in ctx.cpu_static]
    return {"ok": None, "inputs": src, "samples": int(ctx.x.shape[0]), "thresholds": ctx.thresholds, "thresholds_from": how,
            "stage_accuracy": acc, "reference_exit_distribution": np.bincount(ctx.reference["exit_stage"], minlength=b.num_stages) / ctx.x.shape[0],
            "detail": f"{ctx.x.shape[0]} {src} inputs, thresholds " + ", ".join(f"{t:.4f}" for t in ctx.thresholds) + f" ({how})"}


def step_cpu_pipeline(ctx) -> dict:
    a = ctx.args
    run = run_pipeline(ctx.bundle, "ort", ctx.thresholds, ctx.x, ctx.batch, repeats=a.repeats, max_in_flight=a.in_flight,
                       backend_options={"providers": ["CPUExecutionProvider"], "threads": a.threads})
    ctx.cpu_pipe = run["results"]
    conf = [s["confidence"] for s in ctx.cpu_static]
    c = compare_exits(ctx.reference, ctx.cpu_pipe, ctx.thresholds, conf, None, ctx.band,
                      ref_logits=[s["logits"] for s in ctx.cpu_static])
    c.update(timing(ctx, run))
    c["detail"] = cmp_detail(c, timing_text(c)) + " (vs the numpy reference)"
    return c




def _torch_backend(ctx):
    from .torch_backend import TorchStageBackend

    return TorchStageBackend(ctx.bundle, ctx.checkpoint, device=ctx.torch_device)


def step_torch_parity(ctx) -> dict:
    be = _torch_backend(ctx)
    ctx.torch_static = static_run(ctx.bundle, ctx.x, ctx.batch, be)
    r = stage_parity(ctx.cpu_static, ctx.torch_static, PRECISION_TOL["fp32"][2])
    r["detail"] = f"every stage on {ctx.x.shape[0]} samples vs ONNX Runtime CPU: " + r["detail"]
    return r


def step_torch_pipeline(ctx, variant: str) -> dict:
    a = ctx.args
    opts = {"default": {}, "refill": {"refill": True, "max_in_flight": a.in_flight + 1},
            "buckets": {"buckets": "pow2"},
            "buckets+refill": {"buckets": "pow2", "refill": True, "max_in_flight": a.in_flight + 1}}[variant]
    kw = {"max_in_flight": a.in_flight}
    kw.update(opts)
    run = run_pipeline(ctx.bundle, _torch_backend(ctx), ctx.thresholds, ctx.x, ctx.batch, repeats=a.repeats,
                       static=variant == "default", **kw)
    got_conf = [s["confidence"] for s in ctx.torch_static] if ctx.torch_static else None
    c = compare_exits(ctx.cpu_pipe_dict(), run["results"], ctx.thresholds, [s["confidence"] for s in ctx.cpu_static],
                      got_conf, ctx.band, ref_logits=[s["logits"] for s in ctx.cpu_static])
    c.update(timing(ctx, run))
    merged = sum(s.get("merged", 0) for s in run["stats"])
    padded = sum(s.get("padded", 0) for s in run["stats"])
    flight = f"{kw['max_in_flight']} batches of {ctx.batch} in flight"
    if "refill" in variant:
        flight += f", refill merged {merged} groups"
    if "buckets" in variant:
        flight += f", pow2 buckets padded {padded} rows"
    c["detail"] = cmp_detail(c, timing_text(c)) + f" ({flight}; vs the CPU pipeline)"
    return c


def step_ort_cuda(ctx) -> dict:
    a = ctx.args
    run = run_pipeline(ctx.bundle, "ort", ctx.thresholds, ctx.x, ctx.batch, repeats=a.repeats, max_in_flight=a.in_flight,
                       backend_options={"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]})
    c = compare_exits(ctx.cpu_pipe_dict(), run["results"], ctx.thresholds, [s["confidence"] for s in ctx.cpu_static], None,
                      ctx.band, ref_logits=[s["logits"] for s in ctx.cpu_static])
    c.update(timing(ctx, run))
    c["detail"] = cmp_detail(c, timing_text(c)) + " (IOBinding keeps features on the device; vs the CPU pipeline)"
    return c
