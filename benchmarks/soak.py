"""Soak: many frames through the streaming pipeline with batches in flight; every frame accounted for, no
deadlock, resident memory flat after warm-up.

    python benchmarks/soak.py                        # 100,000 frames, generated toy bundle
    python benchmarks/soak.py --frames 5000          # the size the test suite runs
    python benchmarks/soak.py --bundle out/digits_int8 --frames 20000
    python benchmarks/soak.py --mixed --rounds 400   # bad files and dying sources among good frames

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


# ---- mixed-fault soak -------------------------------------------------------------------------------------------

class FailingSource(FrameSource):
    """A live source that delivers ``good`` frames and then dies (a camera unplugged, a pipeline that errors)."""

    uri = "failing camera"

    def __init__(self, pool, good: int):
        super().__init__()
        self.pool, self.good = pool, good

    def read(self):
        from dmpo_edge.errors import DmpoEdgeError

        if self._index >= self.good:
            raise DmpoEdgeError(f"source {self.uri}", f"stopped after {self._index} frame(s) (device disconnected)")
        return self._frame(self.pool[self._index % len(self.pool)])


def _bad_files(folder: str, size: int) -> list:
    """One of each kind of file a folder source meets in the field and must report, not crash or hang on."""
    import struct
    import zlib

    from PIL import Image

    def put(name, data):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        return name

    buf = __import__("io").BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    names = [put("b_truncated.png", png[: len(png) // 2]), put("b_random.png", os.urandom(300)), put("b_empty.jpg", b""),
             put("b_text.jpg", b"not an image\n" * 10), put("b_bomb.png", bomb)]
    os.mkfifo(os.path.join(folder, "b_fifo.png"))
    names.append("b_fifo.png")
    if os.path.exists("/dev/zero"):
        os.symlink("/dev/zero", os.path.join(folder, "b_device.png"))
        names.append("b_device.png")
    return names


def mixed_soak(bundle, rounds: int = 400, good_per_round: int = 24, dead_after: int = 5, batch: int = 8,
               in_flight: int = 3, warmup_rounds: int | None = None, log=None) -> dict:
    """Folders of good images mixed with every kind of bad file, and sources that die mid-stream, round after round
    through one pipeline. Every good frame must come back exactly once, every bad file be reported exactly once
    (``skipped``), every dead source end in exactly one error after its frames, and memory stay flat."""
    from PIL import Image

    from dmpo_edge.errors import DmpoEdgeError
    from dmpo_edge.runtime.pipeline import Pipeline

    log = log or (lambda msg: None)
    warmup_rounds = max(1, rounds // 5) if warmup_rounds is None else warmup_rounds
    tmp = tempfile.mkdtemp(prefix="dmpo-mixed-soak-")
    folder = os.path.join(tmp, "frames")
    os.makedirs(folder)
    pool = GeneratedSource(good_per_round).pool
    for i in range(good_per_round):
        Image.fromarray(pool[i % len(pool)]).save(os.path.join(folder, f"g_{i:03d}.png"))
    bad = _bad_files(folder, 8)
    os.makedirs(os.path.join(folder, "b_folder.png"))  # a folder named like an image: not a file, not listed
    pipe = Pipeline.from_bundle(bundle, backend="ort", thresholds=spread_thresholds(bundle, pool), max_in_flight=in_flight,
                                backend_options={"threads": 1})
    fig = {"rounds": rounds, "good_files": good_per_round, "bad_files": len(bad), "bad_kinds": sorted(bad),
           "dead_after": dead_after, "good_frames": 0, "results": 0, "duplicates": 0, "missing": 0,
           "bad_reported": 0, "bad_misreported": 0, "dead_sources": 0, "dead_errors": 0, "unexpected_errors": []}
    rss = []
    t0 = time.perf_counter()
    try:
        for rnd in range(rounds):
            # a folder: good frames interleaved (sorted names) with bad files, skip-bad on
            s = Stream(None, folder, pipeline=pipe, batch=batch, max_wait_ms=2.0, realtime=False, skip_bad=True)
            names = []
            try:
                names = [r.name for r in s]
            except DmpoEdgeError as exc:
                fig["unexpected_errors"].append(str(exc))
            fig["good_frames"] += good_per_round
            fig["results"] += len(names)
            fig["duplicates"] += len(names) - len(set(names))
            fig["missing"] += good_per_round - len(set(names) & {f"g_{i:03d}.png" for i in range(good_per_round)})
            skipped = sorted(os.path.basename(p) for p in s.summary().get("skipped", []))
            fig["bad_reported"] += len(skipped)
            fig["bad_misreported"] += int(skipped != sorted(bad))
            # a live source that dies after a few frames: its frames, then exactly one error
            s = Stream(None, FailingSource(pool, dead_after), pipeline=pipe, batch=batch, max_wait_ms=2.0, realtime=False)
            got, errors = 0, 0
            try:
                for _ in s:
                    got += 1
            except DmpoEdgeError:
                errors += 1
            fig["dead_sources"] += 1
            fig["good_frames"] += dead_after
            fig["results"] += got
            fig["missing"] += dead_after - got
            fig["dead_errors"] += errors
            if rnd + 1 == warmup_rounds or (rnd + 1 > warmup_rounds and (rnd + 1) % max(1, rounds // 10) == 0) \
                    or rnd + 1 == rounds:
                gc.collect()
                rss.append((rnd + 1, rss_bytes()))
                log(f"  round {rnd + 1:>5}: {fig['results']} results, {fig['bad_reported']} bad files reported, "
                    f"{fig['dead_errors']} dead sources reported, rss {rss[-1][1] / 2**20:.1f} MiB")
    finally:
        pipe.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    base = next((b for r, b in rss if r >= warmup_rounds), rss[0][1])
    fig.update({"elapsed_s": round(time.perf_counter() - t0, 2), "warmup_rounds": warmup_rounds,
                "rss_warm_mib": round(base / 2**20, 2), "rss_end_mib": round(rss[-1][1] / 2**20, 2),
                "rss_growth_pct": round(100.0 * (rss[-1][1] - base) / base, 2),
                "rss_samples_mib": [(r, round(b / 2**20, 2)) for r, b in rss]})
    return fig


def check_mixed(fig: dict, max_growth_pct: float = 5.0) -> list:
    bad = []
    if fig["results"] != fig["good_frames"] or fig["missing"] or fig["duplicates"]:
        bad.append(f"{fig['good_frames']} good frames, {fig['results']} results ({fig['missing']} missing, "
                   f"{fig['duplicates']} duplicated)")
    if fig["bad_reported"] != fig["rounds"] * fig["bad_files"] or fig["bad_misreported"]:
        bad.append(f"{fig['bad_reported']} bad-file reports for {fig['rounds'] * fig['bad_files']} bad files "
                   f"({fig['bad_misreported']} rounds reported the wrong files)")
    if fig["dead_errors"] != fig["dead_sources"]:
        bad.append(f"{fig['dead_errors']} errors for {fig['dead_sources']} dead sources")
    if fig["unexpected_errors"]:
        bad.append(f"{len(fig['unexpected_errors'])} unexpected errors, first: {fig['unexpected_errors'][0]}")
    if fig["rss_growth_pct"] > max_growth_pct:
        bad.append(f"resident memory grew {fig['rss_growth_pct']}% after warm-up (limit {max_growth_pct}%)")
    return bad


def main_mixed(args) -> int:
    with tempfile.TemporaryDirectory(prefix="dmpo-soak-") as tmp:
        bundle = args.bundle or _toy_bundle(os.path.join(tmp, "toy"))
        print(f"mixed-fault soak: {args.rounds} rounds through {bundle}", flush=True)
        fig = mixed_soak(bundle, rounds=args.rounds, batch=args.batch, in_flight=args.in_flight,
                         log=lambda m: print(m, flush=True))
    bad = check_mixed(fig, args.max_growth)
    print(f"good frames: {fig['good_frames']}, results: {fig['results']} ({fig['missing']} missing, {fig['duplicates']} "
          f"duplicated); bad files: {fig['rounds'] * fig['bad_files']} ({', '.join(fig['bad_kinds'])} each round), "
          f"reported {fig['bad_reported']}; dead sources: {fig['dead_sources']}, errors {fig['dead_errors']}")
    print(f"time: {fig['elapsed_s']} s; rss: {fig['rss_warm_mib']} MiB after {fig['warmup_rounds']} warm-up rounds, "
          f"{fig['rss_end_mib']} MiB at the end (growth {fig['rss_growth_pct']}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)
    print("mixed soak: " + ("PASS" if not bad else "FAIL: " + "; ".join(bad)))
    return 0 if not bad else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="bundle folder (default: a generated 3-stage toy bundle)")
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--in-flight", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=None, help="frames before the memory baseline (default min(frames/5, 5000))")
    ap.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth after warm-up, percent")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--mixed", action="store_true", help="the mixed-fault soak: bad files and dying sources among good frames")
    ap.add_argument("--rounds", type=int, default=400, help="with --mixed: rounds (each a folder of 24 good images and "
                    "7 bad files, then a source that dies after 5 frames)")
    args = ap.parse_args(argv)
    if args.mixed:
        return main_mixed(args)
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
