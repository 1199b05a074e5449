"""The check report: one row per check in the table printed last, every number behind it in the JSON.

:meth:`Report.run` never lets one broken check stop the others: an exception becomes a ``FAIL`` row with its
first line, and the traceback goes to the JSON.
"""

from __future__ import annotations

import math
import sys
import time
import traceback

import numpy as np

__all__ = ["FORMAT", "PASS", "FAIL", "SKIP", "INFO", "Report", "one_line", "jsonable"]

FORMAT = "dmpo-edge-gpu-check"
PASS, FAIL, SKIP, INFO = "pass", "FAIL", "skip", "info"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


class Report:
    """Runs checks, never lets one stop the others, and keeps the rows of the final table."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = float(budget_s)
        self.rows = []
        self.checks = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, key: str, check: str, backend: str, status: str, detail: str, data: dict | None = None) -> None:
        rec = dict(data or {})
        rec.update({"check": check, "backend": backend, "status": status, "detail": detail})
        self.checks[key] = jsonable(rec)
        self.rows.append((check, backend, status, detail))
        print(f"[{self.elapsed():6.1f}s] {status:<4} {check} ({backend}): {detail}", file=sys.stderr, flush=True)

    def run(self, key: str, check: str, backend: str, fn, skip: str | None = None):
        """``fn()`` returns a dict with ``ok`` (True / False / None = information only) and ``detail``."""
        if skip is None and self.elapsed() > self.budget_s:
            skip = f"time budget of {self.budget_s:.0f} s spent"
        if skip:
            self.add(key, check, backend, SKIP, skip, {"skipped": skip})
            return None
        t = time.perf_counter()
        try:
            res = dict(fn())
        except Exception as exc:  # one broken path must not hide the others
            res = {"ok": False, "detail": one_line(exc), "traceback": traceback.format_exc(limit=8)}
        res["seconds"] = round(time.perf_counter() - t, 3)
        ok = res.get("ok")
        status = INFO if ok is None else (PASS if ok else FAIL)
        self.add(key, check, backend, status, str(res.get("detail", "")), res)
        return res

    def summary(self) -> dict:
        st = [r[2] for r in self.rows]
        return {"passed": st.count(PASS), "failed": st.count(FAIL), "skipped": st.count(SKIP), "info": st.count(INFO),
                "ok": FAIL not in st}

    def table(self) -> str:
        heads = ("check", "backend", "result", "detail")
        rows = [heads] + [(c, b, s, d if len(d) <= 140 else d[:137] + "...") for c, b, s, d in self.rows]
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}" for r in rows]
        lines.insert(1, "-" * min(160, sum(w) + 6 + max(len(r[3]) for r in rows)))
        s = self.summary()
        lines.append(f"\n{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped ({self.elapsed():.0f} s)")
        return "\n".join(lines)
