"""Per-stage precision chosen by measurement: time every candidate form of a stage on the compile machine and keep
the fastest one whose accuracy stays within the budget.

INT8 is not faster everywhere: on a CPU without VNNI, stage 0 of an EfficientNet (high-resolution depthwise
blocks on few channels) gains nothing from ONNX Runtime's U8 kernels and pays for the extra quantize /
dequantize work, while the deep stages run much faster. So each stage's candidates (FP32, INT8 Q/DQ, INT8 with
U8 activations in QDQ or QOperator form, FP16 where the target runs it faster) are timed here, interleaved so
that a busy machine slows all alike, at batch 1 and at the calibration batch, and the fastest candidate within
the accuracy budget is kept; FP32 is always a candidate, which is what makes an INT8 bundle never slower than
the FP32 one on the machine it was compiled on. The manifest records every candidate, its timings and the choice.
"""

from __future__ import annotations

import math
import time

__all__ = ["time_forms", "choose_form", "TIMING_BATCHES"]

#: one request and a calibration-size batch: the two regimes early exit runs stages in
TIMING_BATCHES = (1, 32)


def _slice(feeds: dict, n: int) -> dict:
    out = {}
    for name, v in feeds.items():
        if name == "keep_idx":
            import numpy as np

            out[name] = np.arange(min(n, v.shape[0]), dtype=v.dtype)
        else:
            out[name] = v[:n]
    return out


def time_forms(paths: dict, feeds: dict, batches=TIMING_BATCHES, repeats: int = 7, threads: int | None = None) -> dict:
    """Best-of-``repeats`` ms per form and batch size: ``{form: {batch: ms}}``; forms interleaved every round."""
    from .onnxrun import session

    sessions = {name: session(p, threads) for name, p in paths.items()}
    out = {name: {} for name in paths}
    for b in batches:
        f = _slice(feeds, b)
        if next(iter(f.values())).shape[0] < b:
            continue
        best = {name: math.inf for name in paths}
        for sess in sessions.values():  # first run allocates; not timed
            sess.run(None, f)
        for _ in range(repeats):
            for name, sess in sessions.items():
                t = time.perf_counter()
                sess.run(None, f)
                best[name] = min(best[name], (time.perf_counter() - t) * 1e3)
        for name in paths:
            out[name][int(b)] = round(best[name], 4)
    return out


def choose_form(timings: dict, drops: dict, budget_points: float, reference: str = "fp32") -> tuple:
    """(chosen form, why): the fastest form within ``budget_points`` accuracy loss (``drops[form]``, points).

    Speed is the mean over the timed batch sizes of time relative to ``reference`` (so batch 1 and batch 32
    weigh alike); the reference itself is always admissible, so the choice is never slower than it where it
    was measured. A form without timings (it failed to build) is never chosen.
    """
    ref = timings.get(reference) or {}

    def rel(form):
        t = timings.get(form) or {}
        common = [b for b in t if b in ref and ref[b] > 0]
        if not common:
            return math.inf
        return sum(t[b] / ref[b] for b in common) / len(common)

    ok = [f for f in timings if timings[f] and (f == reference or drops.get(f, math.inf) <= budget_points)]
    if not ok:
        return reference, "no candidate was timed; the reference form is kept"
    best = min(ok, key=lambda f: (rel(f), f != reference))
    r = rel(best)
    if best == reference:
        return best, "no lower-precision form was faster here within the accuracy budget"
    return best, f"{1 / r:.2f}x the speed of {reference} here (mean over batch sizes {sorted(ref)}), within the budget"
