"""How should ONNX Runtime's CPU threads be split between stage sessions? Side by side, one run.

    python benchmarks/ort_threads.py                          # out/bench_digits/digits_fp32 (or the first bundle found)
    python benchmarks/ort_threads.py --bundle out/bench_digits/digits_int8 --rounds 8

Configurations (spinning is off wherever it can be turned off: with several sessions alive, an idle
session's spinning pool burns the cores another stage needs):

- ``per-session 1/2``: every stage session gets cores / 2 intra-op threads (the pipeline's default
  with two batches in flight);
- ``per-session all``: every stage session gets all cores;
- ``global pool``: one process-wide pool of all cores shared by the stage sessions
  (``onnxruntime.set_global_thread_pool_sizes`` + ``SessionOptions.use_per_session_threads = False``).
  Its size can be set once per process and its spinning cannot be turned off from Python.

Two workloads, timed with real stage graphs and real images (digits:test):

- ``one batch``: a batch through every stage in one thread, one stage after the other: the
  caller-thread path of ``Pipeline.predict`` / ``run_static`` (one batch, nothing else in flight);
- ``two in flight``: two threads, each pushing its own batches through every stage, so two stages
  run at once: the in-flight workers of ``submit`` / streaming.

The global pool is process-wide, so every configuration runs in its own process; the processes
alternate round by round (A B C A B C ...) so that drift on a shared machine hits all of them alike.
The figure is the median over rounds of each round's median call time.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("per-session 1/2", "per-session all", "global pool")


def _find_bundle():
    for name in ("bench_digits/digits_fp32", "bench_digits/digits_int8", "digits_fp32"):
        p = os.path.join(ROOT, "out", name)
        if os.path.isfile(os.path.join(p, "manifest.json")):
            return p
    found = sorted(glob.glob(os.path.join(ROOT, "out", "**", "manifest.json"), recursive=True))
    return os.path.dirname(found[0]) if found else None


def _sessions(bundle, config: str, cores: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if config == "global pool":
        ort.set_global_thread_pool_sizes(cores, 1)
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = max(1, cores // 2) if config == "per-session 1/2" else cores
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    variant = "cpu" if any("cpu" in (s.get("variants") or {}) for s in bundle.stages) else None
    return [ort.InferenceSession(bundle.stage_path(k, variant), so, providers=["CPUExecutionProvider"])
            for k in range(bundle.num_stages)]


def _all_stages(sessions, feat_names, xb):
    keep = np.arange(xb.shape[0], dtype=np.int32)
    feats = None
    for k, s in enumerate(sessions):
        feeds = {"input": xb} if k == 0 else {feat_names[k]: feats, "keep_idx": keep}
        out = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
        feats = out.get("features")


def child(args) -> int:
    """One configuration, one round: time both workloads, print one JSON line."""
    from dmpo_edge.bundle import Bundle
    from dmpo_edge.calib.datasets import load_dataset

    bundle = Bundle.load(args.bundle)
    cores = len(os.sched_getaffinity(0))
    sessions = _sessions(bundle, args.child, cores)
    feat_names = [None] + [next(i.name for i in s.get_inputs() if i.name != "keep_idx") for s in sessions[1:]]
    x = bundle.preprocess(load_dataset("digits:test").images[:64]).astype(np.float32)
    out = {"config": args.child, "one batch": {}, "two in flight": {}}
    for bs in args.batch:
        xb = np.ascontiguousarray(x[:bs])
        for _ in range(3):
            _all_stages(sessions, feat_names, xb)
        t = []
        t_end = time.perf_counter() + args.seconds
        while time.perf_counter() < t_end or len(t) < 5:
            a = time.perf_counter()
            _all_stages(sessions, feat_names, xb)
            t.append(time.perf_counter() - a)
        out["one batch"][bs] = float(np.median(t) * 1e3)
        # two threads, each its own batch through every stage: ms per batch = wall / batches done
        count = [0, 0]
        stop = threading.Event()

        def loop(i):
            while not stop.is_set():
                _all_stages(sessions, feat_names, xb)
                count[i] += 1

        ths = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
        a = time.perf_counter()
        for th in ths:
            th.start()
        time.sleep(args.seconds)
        stop.set()
        for th in ths:
            th.join()
        out["two in flight"][bs] = float((time.perf_counter() - a) * 1e3 / max(1, sum(count)))
    print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="per workload and batch size in each round")
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batch = [int(b) for b in str(args.batch).split(",")]
    args.bundle = args.bundle or _find_bundle()
    if args.bundle is None:
        raise SystemExit("no bundle found: pass --bundle (python benchmarks/bench_digits.py makes the digits ones)")
    if args.child:
        return child(args)
    cores = len(os.sched_getaffinity(0))
    print(f"bundle {args.bundle}, {cores} usable cores, {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}",
          flush=True)
    runs = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        for c in CONFIGS:
            cmd = [sys.executable, os.path.abspath(__file__), "--bundle", args.bundle, "--batch",
                   ",".join(map(str, args.batch)), "--seconds", str(args.seconds), "--child", c]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[c].append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"  round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"\nmedian ms per batch over {args.rounds} rounds (lower is better)")
    print(f"{'configuration':<18}" + "".join(f"{'one batch b=' + str(b):>16}" for b in args.batch)
          + "".join(f"{'2 in flight b=' + str(b):>18}" for b in args.batch))
    for c in CONFIGS:
        one = [np.median([x["one batch"][str(b)] for x in runs[c]]) for b in args.batch]
        two = [np.median([x["two in flight"][str(b)] for x in runs[c]]) for b in args.batch]
        print(f"{c:<18}" + "".join(f"{v:16.3f}" for v in one) + "".join(f"{v:18.3f}" for v in two))
    return 0


if __name__ == "__main__":
    sys.exit(main())
