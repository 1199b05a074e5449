"""The CPU reference and the comparisons every GPU result is held to.

Exit stage and class are compared sample by sample with the CPU pipeline; a disagreement counts unless the
sample's confidence lies within a band of a threshold (or its two top logits tie to that precision), where the
graph does not decide the exit to that precision. Tolerances per bundle precision are below.
"""

from __future__ import annotations

import time

import numpy as np

from dmpo_edge.bundle import Bundle

__all__ = ["DEFAULT_BAND", "PRECISION_TOL", "TRT_TOL", "spread_thresholds", "early_exit_reference", "compare_exits",
           "cmp_detail", "stage_parity", "ideal_speedup", "run_pipeline", "ort_backend", "static_run", "timing",
           "timing_text"]

PASS, FAIL, SKIP, INFO = "pass", "FAIL", "skip", "info"
#: exit stage and class must agree except where a confidence is this close to a threshold (fp32 paths)
DEFAULT_BAND = 1e-4
#: per bundle precision: (band around thresholds, share of samples allowed to differ beyond it, logits tolerance)
PRECISION_TOL = {"fp32": (1e-4, 0.0, 1e-3), "fp16": (5e-3, 0.01, 5e-2), "int8": (3e-2, 0.02, 0.5)}
#: TensorRT engines of an fp32 bundle: the builder's TF32 flag is on by default on Ampere and later, so FP32 layers
#: may run in TF32 (10-bit mantissa): looser than torch / ONNX Runtime FP32 and stated as such in the JSON
TRT_TOL = dict(PRECISION_TOL, fp32=(1e-3, 0.005, 1e-2))


def spread_thresholds(conf: list, band: float) -> list:
    """K-1 thresholds that make every exit take about an equal share, each placed mid-way in the widest gap
    between neighbouring confidences near that share, so that few samples sit within ``band`` of a threshold."""
    K = len(conf)
    alive = np.ones(conf[0].shape[0], bool)
    out = []
    for k in range(K - 1):
        c = np.sort(conf[k][alive].astype(np.float64))
        if c.size < 2:
            out.append(float("inf"))
            continue
        share = 1.0 / (K - k)
        target = int(round((1.0 - share) * c.size))
        lo, hi = max(1, target - max(2, c.size // 20)), min(c.size - 1, target + max(2, c.size // 20))
        gaps = c[lo:hi + 1] - c[lo - 1:hi]
        i = lo + int(np.argmax(gaps))
        thr = float((c[i - 1] + c[i]) / 2.0)
        out.append(thr)
        alive &= conf[k] < thr
    return out


def early_exit_reference(static: list, thresholds: list) -> dict:
    """numpy: exit at the first stage k < K-1 whose confidence >= thresholds[k]; the last stage takes the rest."""
    K = len(static)
    n = static[0]["confidence"].shape[0]
    exit_stage = np.full(n, K - 1, np.int32)
    done = np.zeros(n, bool)
    for k, t in enumerate(thresholds):
        now = ~done & (static[k]["confidence"].astype(np.float64) >= t)
        exit_stage[now] = k
        done |= now
    rows = np.arange(n)
    conf = np.stack([s["confidence"] for s in static])[exit_stage, rows]
    pred = np.stack([s["prediction"] for s in static])[exit_stage, rows].astype(np.int64)
    return {"exit_stage": exit_stage, "prediction": pred, "confidence": conf}


def compare_exits(ref: dict, got, thresholds: list, ref_conf: list, got_conf: list | None, band: float,
                  max_share: float = 0.0, ref_logits: list | None = None) -> dict:
    """Sample-by-sample exit stage and class; disagreements within ``band`` of a threshold are listed, not failed.

    ``ref``/``got``: dicts or Results with ``exit_stage``, ``prediction``, ``confidence``. ``ref_conf``/``got_conf``:
    per-stage confidences of every sample (static runs) to tell which samples sit near a threshold.
    """
    g = lambda r, k: np.asarray(r[k] if isinstance(r, dict) else getattr(r, k))  # noqa: E731
    e_ref, e_got = g(ref, "exit_stage"), g(got, "exit_stage")
    p_ref, p_got = g(ref, "prediction").astype(np.int64), g(got, "prediction").astype(np.int64)
    n = e_ref.shape[0]
    K = len(ref_conf)
    near = np.zeros(n, bool)
    decided = np.maximum(e_ref, e_got)
    for k in range(K - 1):
        for conf in (ref_conf[k], got_conf[k] if got_conf is not None else None):
            if conf is not None:
                near |= (decided >= k) & (np.abs(conf.astype(np.float64) - thresholds[k]) <= band)
    exit_mis = e_ref != e_got
    pred_mis = (p_ref != p_got) & ~exit_mis
    # Two top logits closer than the band: the class is not defined by the graph to that precision.
    tie = np.zeros(n, bool)
    if ref_logits is not None:
        lg = np.stack(ref_logits)[e_ref, np.arange(n)]
        top2 = np.sort(lg, axis=1)[:, -2:]
        tie = (top2[:, 1] - top2[:, 0]) <= band * np.maximum(1.0, np.abs(top2[:, 1]))
    explained = near | (pred_mis & tie)
    bad = (exit_mis | pred_mis) & ~explained
    share = float(bad.mean()) if n else 0.0
    ok = share <= max_share if max_share > 0 else not bad.any()

    def listing(mask, limit=40):
        idx = np.flatnonzero(mask)[:limit]
        return [{"sample": int(i), "exit_ref": int(e_ref[i]), "exit_got": int(e_got[i]), "class_ref": int(p_ref[i]),
                 "class_got": int(p_got[i]),
                 "conf_ref": [round(float(ref_conf[k][i]), 7) for k in range(K - 1)],
                 "conf_got": None if got_conf is None else [round(float(got_conf[k][i]), 7) for k in range(K - 1)]}
                for i in idx]

    counts = np.bincount(e_got, minlength=K)
    return {
        "ok": bool(ok), "samples": int(n), "exit_mismatches": int(exit_mis.sum()), "class_mismatches": int(pred_mis.sum()),
        "unexplained": int(bad.sum()), "unexplained_share": round(share, 5), "allowed_share": max_share,
        "near_threshold": int((near & (exit_mis | pred_mis)).sum()), "near_threshold_samples": int(near.sum()),
        "near_tie": int((pred_mis & tie).sum()), "band": band,
        "exit_distribution": [round(float(c) / max(1, n), 4) for c in counts],
        "mismatch_list": listing(bad), "near_threshold_list": listing(near & (exit_mis | pred_mis)),
    }


def cmp_detail(c: dict, extra: str = "") -> str:
    dist = "/".join(f"{100 * v:.0f}" for v in c["exit_distribution"])
    return (f"{c['samples']} samples, exits {dist}%: {c['unexplained']} mismatches, "
            f"{c['near_threshold']} within {c['band']:g} of a threshold, {c['near_tie']} near ties{extra}")


def stage_parity(ref: list, got: list, tol: float) -> dict:
    """Per stage: max |logits| difference, max |confidence| difference, class agreement."""
    per = []
    ok = True
    for k, (r, g) in enumerate(zip(ref, got)):
        dl = float(np.max(np.abs(r["logits"].astype(np.float64) - g["logits"]))) if r["logits"].size else 0.0
        dc = float(np.max(np.abs(r["confidence"].astype(np.float64) - g["confidence"]))) if r["confidence"].size else 0.0
        agree = float(np.mean(r["prediction"] == g["prediction"])) if r["prediction"].size else 1.0
        scale = float(np.max(np.abs(r["logits"]))) if r["logits"].size else 1.0
        good = dl <= tol * max(1.0, scale)
        ok = ok and good
        per.append({"stage": k, "max_abs_logits": dl, "max_abs_confidence": dc, "class_agreement": agree,
                    "logit_scale": scale, "ok": bool(good)})
    worst = max(p["max_abs_logits"] for p in per)
    return {"ok": bool(ok), "tolerance": tol, "stages": per,
            "detail": f"max |d logits| {worst:.2e} (tol {tol:g} x scale), class agreement "
                      + "/".join(f"{100 * p['class_agreement']:.1f}" for p in per) + "%"}


def ideal_speedup(bundle: Bundle, exit_stage: np.ndarray) -> float:
    cum = np.array([float(s["cumulative_flops"]) for s in bundle.stages])
    return float(cum[-1] / np.mean(cum[np.asarray(exit_stage)])) if exit_stage.size and cum[-1] > 0 else float("nan")


def run_pipeline(bundle, backend, thresholds, x, batch: int, repeats: int, max_in_flight: int = 3, buckets=None,
                 refill: bool = False, backend_options=None, static: bool = True) -> dict:
    """The runtime's Pipeline on ``backend`` (a name/class or an instance): results, stats and timings."""
    from dmpo_edge.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(bundle, backend=backend, thresholds=thresholds, max_in_flight=max_in_flight, buckets=buckets,
                              refill=refill, backend_options=backend_options) as p:
        res = p.predict(x, batch_size=batch)  # also the warm-up
        stats = p.stats()
        t_exit, t_static = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            p.predict(x, batch_size=batch)
            t_exit.append(time.perf_counter() - t)
            if static:
                t = time.perf_counter()
                p.run_static(x, batch_size=batch)
                t_static.append(time.perf_counter() - t)
    out = {"results": res, "stats": stats, "batch": batch, "max_in_flight": max_in_flight, "buckets": buckets, "refill": refill}
    if t_exit:
        out["early_exit_ms"] = 1e3 * float(np.median(t_exit))
    if t_static:
        out["static_ms"] = 1e3 * float(np.median(t_static))
        out["realised_speedup"] = out["static_ms"] / out["early_exit_ms"] if out["early_exit_ms"] > 0 else None
    return out


def ort_backend(bundle, threads: int, variant=None):
    from dmpo_edge.runtime.backends import OrtBackend

    return OrtBackend(bundle, providers=["CPUExecutionProvider"], threads=threads, variant=variant, spinning=False)


def static_run(bundle, x, batch: int, backend) -> list:
    from dmpo_edge.runtime.static import run_all_stages

    return run_all_stages(bundle, x, batch_size=batch, backend=backend)




def timing(ctx, run) -> dict:
    out = {k: run[k] for k in ("early_exit_ms", "static_ms", "realised_speedup", "stats", "batch", "max_in_flight",
                               "buckets", "refill") if k in run}
    out["ideal_speedup"] = ideal_speedup(ctx.bundle, np.asarray(run["results"].exit_stage))
    return out


def timing_text(c: dict) -> str:
    if c.get("early_exit_ms") is None:
        return ""
    s = f"; {c['early_exit_ms']:.1f} ms early exit"
    if c.get("static_ms") is not None:
        s += f" vs {c['static_ms']:.1f} ms static (x{c['realised_speedup']:.2f}, ideal x{c['ideal_speedup']:.2f})"
    return s
