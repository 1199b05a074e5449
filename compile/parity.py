"""Parity of the exported FP32 stage graphs with the torch stages, on real (preprocessed) images.

Stage k is fed what it gets in deployment: stage k-1's torch features and a ``keep_idx`` that drops and
reorders rows (so the in-graph gather is checked too). Relative error = max |onnx - torch| / max |torch|.
"""

from __future__ import annotations

import numpy as np

from .._lazy import require
from ..errors import DmpoEdgeError
from .onnxrun import session

__all__ = ["stage_parity", "PARITY_TOL", "survivor_rows"]

PARITY_TOL = 1e-4


def survivor_rows(n: int) -> np.ndarray:
    """A keep_idx that exercises the gather: every other row, in reverse order (at least one row)."""
    rows = np.arange(n - 1, -1, -2, dtype=np.int32)
    return rows if rows.size else np.zeros(1, np.int32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")  # NaN compares false everywhere: it must read as a failure, never as 0.0 error
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-6)
    return float(np.abs(a - b).max(initial=0.0) / scale)


def stage_parity(stage_modules: list, paths: list, x: np.ndarray, batch_size: int = 32, tol: float = PARITY_TOL,
                 raise_on_fail: bool = True) -> dict:
    """Compare every stage graph in ``paths`` with its torch module on images ``x``; returns the report dict."""
    torch = require("torch", "parity checks")
    report = {"tolerance": tol, "metric": "max|onnx - torch| / max|torch|", "samples": int(x.shape[0]), "stages": []}
    sessions = [session(p) for p in paths]
    feats_all = None
    for k, (mod, sess) in enumerate(zip(stage_modules, sessions)):
        out_names = [o.name for o in sess.get_outputs()]
        errs = {n: 0.0 for n in out_names if n != "prediction"}
        agree, total = 0, 0
        next_feats = []
        n = x.shape[0] if k == 0 else feats_all.shape[0]
        for lo in range(0, n, batch_size):
            if k == 0:
                xb = x[lo: lo + batch_size]
                args, rows = (torch.from_numpy(xb),), None
                feeds = {sess.get_inputs()[0].name: xb}
            else:
                f = feats_all[lo: lo + batch_size]
                rows = survivor_rows(f.shape[0])
                args = (torch.from_numpy(f), torch.from_numpy(np.arange(f.shape[0], dtype=np.int32)))
                fname = [i.name for i in sess.get_inputs() if i.name != "keep_idx"][0]
                feeds = {fname: f, "keep_idx": rows}
            with torch.no_grad():
                # every op is per-sample, so stage(features[rows]) == stage(features)[rows]: one torch run gives
                # both the reference for the gathered graph run and the full features the next stage needs
                ref_named = dict(zip(mod.io.outputs, [t.numpy() for t in mod(*args)]))
            got = sess.run(None, feeds)
            for name, g in zip(out_names, got):
                r = ref_named[name] if rows is None else ref_named[name][rows]
                if name == "prediction":
                    agree += int((g == r).sum())
                    total += int(r.size)
                else:
                    errs[name] = max(errs[name], _rel(g, r))
            next_feats.append(ref_named.get("features"))
        feats_all = None if next_feats[0] is None else np.concatenate(next_feats)
        entry = {"stage": k, "relative_error": errs, "prediction_agreement": agree / max(total, 1),
                 "max_relative_error": max(errs.values()) if errs else 0.0}
        entry["ok"] = entry["max_relative_error"] <= tol
        report["stages"].append(entry)
    report["ok"] = all(e["ok"] for e in report["stages"])
    if raise_on_fail and not report["ok"]:
        bad = [e for e in report["stages"] if not e["ok"]][0]
        name = max(bad["relative_error"], key=bad["relative_error"].get)
        raise DmpoEdgeError(
            f"parity stage {bad['stage']}",
            f"FP32 graph output '{name}' differs from torch by relative error {bad['relative_error'][name]:.2e} "
            f"> {tol:.0e}. The export changed the model's numerics; try --exporter torchscript or report the model",
        )
    return report
