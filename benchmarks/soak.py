"""Soak: many frames through the streaming pipeline with batches in flight; every frame accounted for, no
deadlock, resident memory flat after warm-up.

    python benchmarks/soak.py                        # 100,000 frames, generated toy bundle
    python benchmarks/soak.py --frames 5000          # the size the test suite runs
    python benchmarks/soak.py --bundle out/digits_int8 --frames 20000

A generated source hands out frames (uint8 images of a few sizes, so preprocessing resizes) as fast as
the stream takes them; the stream preprocesses, micro-batches and submits them to the early-exit
pipeline (``--in-flight`` batches in flight, exits and regrouping on). The script checks that every frame
index comes back exactly once and in order, that the stream never stalls for ``--stall-s`` seconds
(a watchdog dumps every thread's stack and fails), and prints the resident set size (RSS, from
``/proc/self/statm``) after warm-up and at the end. Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

from dmpo_edge.runtime.sources import FrameSource
from dmpo_edge.runtime.stream import Stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
__all__ = ["GeneratedSource", "rss_bytes", "soak", "main"]


def rss_bytes() -> int:
    """Resident set size of this process (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class GeneratedSource(FrameSource):
    """``frames`` synthetic frames from a small pool of random images (sizes vary, so resizing runs)."""

    uri = "generated"

    def __init__(self, frames: int, seed: int = 0, sizes=((12, 16), (8, 8), (20, 10), (9, 7)), per_size: int = 16):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.pool = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for _ in range(per_size) for h, w in sizes]
        self.frames = int(frames)
        self.expected_frames = self.frames

    def read(self):
        if self._index >= self.frames:
            return None
        return self._frame(self.pool[self._index % len(self.pool)])


def _toy_bundle(path: str) -> str:
    spec = importlib.util.spec_from_file_location("_toy_conftest", os.path.join(ROOT, "tests", "conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write_toy_bundle(path, num_stages=3, classes=4, seed=0, hidden=16, size=8, thresholds=[0.5, 0.5])
    return path


def spread_thresholds(bundle, pool) -> list:
    """Thresholds at the median exit score of the pool at each early exit: every stage sees traffic."""
    from dmpo_edge.bundle import Bundle
    from dmpo_edge.runtime.static import run_all_stages

    b = Bundle.load(bundle) if isinstance(bundle, str) else bundle
    outs = run_all_stages(b, b.preprocess(pool), backend="ort")
    return [float(np.median(o["confidence"])) for o in outs[:-1]]


def soak(bundle, frames: int = 100_000, batch: int = 8, in_flight: int = 3, warmup: int | None = None,
         stall_s: float = 60.0, samples: int = 20, backend: str = "ort", refill: bool = True, thresholds="spread",
         log=None) -> dict:
    """Stream ``frames`` generated frames through ``bundle``; return the figures (see the module doc).

    ``thresholds``: ``"spread"`` (medians of the pool's exit scores, so every stage works), None (the
    bundle's) or K-1 floats.
    """
    log = log or (lambda msg: None)
    warmup = min(frames // 5, 5000) if warmup is None else warmup
    src = GeneratedSource(frames)
    if isinstance(thresholds, str):
        thresholds = spread_thresholds(bundle, src.pool)
    s = Stream(bundle, src, batch=batch, max_wait_ms=2.0, realtime=False, max_in_flight=in_flight, backend=backend,
               thresholds=thresholds, pipeline_options={"refill": refill, "backend_options": {"threads": 1}})
    progress = {"n": 0, "t": time.perf_counter()}
    stop = threading.Event()
    stalled = []

    def watchdog():
        while not stop.wait(1.0):
            if time.perf_counter() - progress["t"] > stall_s:
                stalled.append(progress["n"])
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                os._exit(3)  # a deadlock cannot be unwound from here: fail loudly with the stacks

    wd = threading.Thread(target=watchdog, daemon=True, name="soak-watchdog")
    wd.start()
    next_index, out_of_order, rss = 0, 0, []
    every = max(1, (frames - warmup) // samples)
    t0 = time.perf_counter()
    try:
        for r in s:
            if r.index != next_index:
                out_of_order += 1
            next_index = r.index + 1
            progress["n"] += 1
            progress["t"] = time.perf_counter()
            n = progress["n"]
            if n == warmup or (n > warmup and (n - warmup) % every == 0) or n == frames:
                gc.collect()
                rss.append((n, rss_bytes()))
                log(f"  {n:>7} frames  rss {rss[-1][1] / 2**20:7.1f} MiB  {n / (time.perf_counter() - t0):7.0f} fps")
    finally:
        stop.set()
    elapsed = time.perf_counter() - t0
    summ = s.summary()
    base = next((b for n, b in rss if n >= warmup), rss[0][1] if rss else 0)
    end = rss[-1][1] if rss else 0
    return {
        "frames": frames, "classified": progress["n"], "frames_read": summ["frames_read"],
        "frames_dropped": summ["frames_dropped"], "out_of_order": out_of_order, "last_index": next_index - 1,
        "exit_counts": summ["exit_counts"], "thresholds": summ["thresholds"], "elapsed_s": round(elapsed, 2), "fps": round(progress["n"] / elapsed, 1),
        "batch": batch, "in_flight": in_flight, "warmup_frames": warmup,
        "rss_warm_mib": round(base / 2**20, 2), "rss_end_mib": round(end / 2**20, 2),
        "rss_peak_mib": round(max(b for _, b in rss) / 2**20, 2) if rss else None,
        "rss_growth_pct": round(100.0 * (end - base) / base, 2) if base else None,
        "rss_samples_mib": [(n, round(b / 2**20, 2)) for n, b in rss],
        "stalled": bool(stalled),
    }


def check(fig: dict, max_growth_pct: float = 5.0) -> list:
    """The failed checks, as sentences (empty when the soak passed)."""
    bad = []
    if fig["classified"] != fig["frames"] or fig["frames_read"] != fig["frames"] or fig["last_index"] != fig["frames"] - 1:
        bad.append(f"frames lost: {fig['frames']} generated, {fig['frames_read']} read, {fig['classified']} classified")
    if fig["frames_dropped"]:
        bad.append(f"{fig['frames_dropped']} frames dropped in lossless mode")
    if fig["out_of_order"]:
        bad.append(f"{fig['out_of_order']} frames came back out of order")
    if sum(fig["exit_counts"]) != fig["frames"]:
        bad.append(f"exit counts {fig['exit_counts']} do not add up to {fig['frames']}")
    if fig["rss_growth_pct"] is not None and fig["rss_growth_pct"] > max_growth_pct:
        bad.append(f"resident memory grew {fig['rss_growth_pct']}% after warm-up (limit {max_growth_pct}%)")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="bundle folder (default: a generated 3-stage toy bundle)")
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--in-flight", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=None, help="frames before the memory baseline (default min(frames/5, 5000))")
    ap.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth after warm-up, percent")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dmpo-soak-") as tmp:
        bundle = args.bundle or _toy_bundle(os.path.join(tmp, "toy"))
        print(f"soak: {args.frames} frames through {bundle} (batch {args.batch}, {args.in_flight} in flight)", flush=True)
        fig = soak(bundle, args.frames, args.batch, args.in_flight, args.warmup, log=lambda m: print(m, flush=True))
    bad = check(fig, args.max_growth)
    print(f"frames: {fig['frames']} generated, {fig['frames_read']} read, {fig['classified']} classified in order, "
          f"{fig['frames_dropped']} dropped; exits per stage {fig['exit_counts']}")
    print(f"time: {fig['elapsed_s']} s, {fig['fps']} frames/s")
    print(f"rss: {fig['rss_warm_mib']} MiB after {fig['warmup_frames']} warm-up frames, {fig['rss_end_mib']} MiB at the end "
          f"(growth {fig['rss_growth_pct']}%, peak {fig['rss_peak_mib']} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)
    print("soak: " + ("PASS" if not bad else "FAIL: " + "; ".join(bad)))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
