"""Does the runtime's scheduling pay off on the CPU backend? In-flight batches, buckets, refill.

    python benchmarks/runtime_shapes.py                      # out/digits_fp32 (or the first out/digits_* bundle)
    python benchmarks/runtime_shapes.py --bundle out/digits_int8 --batch 32 --samples 1024
    python benchmarks/runtime_shapes.py --toy                # a generated MLP bundle (no compile needed)

Every configuration classifies the same samples with the same thresholds on the ONNX Runtime CPU
backend; the figure is the median throughput over ``--repeats`` timed runs (after one warm-up run),
interleaved round-robin so that drift on a shared machine hits every configuration alike.

- ``one-at-a-time``: a plain loop, each batch through its stages before the next starts (no threads),
  with ONNX Runtime on all cores (``threads=all``) and on one (``threads=1``); the faster is the baseline;
- ``in-flight=1``: the pipeline with one batch in flight (its thread hand-offs, no overlap);
- ``in-flight=N``: N batches in flight: the exit decision of one overlaps work on the next;
- ``+buckets``: survivors padded to the next power of two; ``+refill``: shrunken groups merged;
- ``static``: every stage on every sample (the baseline of the speed-up).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np

from dmpo_edge.bundle import Bundle
from dmpo_edge.runtime.backends import OrtBackend
from dmpo_edge.runtime.pipeline import Pipeline
from dmpo_edge.runtime.static import run_all_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toy_bundle(path: str, hidden: int, stages: int):
    spec = importlib.util.spec_from_file_location("_toy_conftest", os.path.join(ROOT, "tests", "conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_toy_bundle(path, num_stages=stages, classes=10, seed=0, hidden=hidden, size=32, max_batch=64)


def _find_bundle():
    for name in ("digits_fp32", "digits_int8", "digits_fp16"):
        p = os.path.join(ROOT, "out", name)
        if os.path.isfile(os.path.join(p, "manifest.json")):
            return p
    found = sorted(glob.glob(os.path.join(ROOT, "out", "*", "manifest.json")))
    return os.path.dirname(found[0]) if found else None


def _inputs(bundle: Bundle, n: int) -> np.ndarray:
    try:  # the digits test split when the bundle is a digits bundle: realistic exits
        from dmpo_edge.calib.datasets import load_dataset

        if bundle.classes == [str(i) for i in range(10)] or "digits" in bundle.manifest["model"].get("name", ""):
            ds = load_dataset("digits:test")
            imgs = [ds.images[i % len(ds.images)] for i in range(n)]
            return bundle.preprocess(imgs)
    except Exception:
        pass
    h, w = bundle.preprocess.size
    return np.random.default_rng(0).normal(size=(n, 3, h, w)).astype(np.float32)


def _thresholds(bundle: Bundle, x: np.ndarray, exit_fraction: float, how: str = "bundle") -> list:
    """The bundle's thresholds, else ones that let about ``exit_fraction`` of the arrivals leave at each early exit."""
    if how not in ("bundle", "quantile"):
        return [float(t) for t in how.split(",")]
    if how == "bundle" and bundle.thresholds is not None:
        return bundle.thresholds
    outs = run_all_stages(bundle, x[:512])
    alive = np.ones(min(512, x.shape[0]), bool)
    thr = []
    for k in range(bundle.num_stages - 1):
        conf = outs[k]["confidence"][alive]
        t = float(np.quantile(conf, 1 - exit_fraction)) if conf.size else 1.0
        thr.append(t)
        alive &= outs[k]["confidence"] < t
    return thr


def one_at_a_time(backend, x: np.ndarray, bs: int, thr: list) -> np.ndarray:
    """The naive loop: batch by batch, stage by stage, survivors gathered in-graph, no overlap."""
    K = backend.num_stages
    pred = np.empty(x.shape[0], np.int64)
    for s in range(0, x.shape[0], bs):
        xb = x[s:s + bs]
        rows = np.arange(xb.shape[0])
        feats, keep = None, None
        for k in range(K):
            out = backend.infer(k, {"input": xb} if k == 0 else {"features": feats, "keep_idx": keep}, keep_features=True)
            conf = out["confidence"]
            ex = np.ones(conf.shape[0], bool) if k == K - 1 else conf >= thr[k]
            pred[s + rows[ex]] = out["prediction"][ex]
            keep = np.flatnonzero(~ex).astype(np.int32)
            rows = rows[~ex]
            if k > 0:
                backend.release(feats)
            if not keep.size:
                backend.release(out.get("features"))
                break
            feats = out.get("features")
    return pred


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--toy", action="store_true", help="benchmark a generated MLP bundle")
    ap.add_argument("--toy-hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    ap.add_argument("--exit-fraction", type=float, default=0.5,
                    help="with --thresholds quantile (or a bundle without thresholds): the share of arrivals leaving at each early exit")
    ap.add_argument("--thresholds", default="bundle", help="'bundle', 'quantile' or comma-separated values")
    args = ap.parse_args(argv)

    tmp = None
    path = args.bundle or (None if args.toy else _find_bundle())
    if path is None:
        tmp = tempfile.mkdtemp(prefix="dmpo-shapes-")
        path = os.path.join(tmp, "toy")
        _toy_bundle(path, args.toy_hidden, 4)
    bundle = Bundle.load(path)
    x = _inputs(bundle, args.samples)
    thr = _thresholds(bundle, x, args.exit_fraction, args.thresholds)
    bs = min(args.batch, bundle.max_batch)
    # No spinning anywhere: an idle session's spinning thread pool would steal the cores of whichever
    # configuration runs next in the round-robin, and bias the comparison.
    opts = {"threads": args.threads, "spinning": False} if args.threads else {"spinning": False}
    print(f"bundle {path} ({bundle.num_stages} stages, {bundle.precision}), {x.shape[0]} samples, batch {bs}, "
          f"thresholds {[round(t, 4) for t in thr]}, {os.cpu_count()} cpus")

    configs = {
        "in-flight=1": dict(max_in_flight=1),
        "in-flight=2": dict(max_in_flight=2),
        "in-flight=4": dict(max_in_flight=4),
        "in-flight=2 +buckets": dict(max_in_flight=2, buckets="pow2"),
        "in-flight=2 +refill": dict(max_in_flight=2, refill=True),
        "in-flight=4 +refill": dict(max_in_flight=4, refill=True),
        "in-flight=2 +refill +buckets": dict(max_in_flight=2, refill=True, buckets="pow2"),
    }
    pipes = {name: Pipeline.from_bundle(bundle, backend="ort", thresholds=thr, backend_options=opts, **kw)
             for name, kw in configs.items()}
    seq_all = OrtBackend(bundle, **opts).activate()
    seq_one = OrtBackend(bundle, threads=1, spinning=False).activate()
    runs = {"one-at-a-time threads=all": lambda: one_at_a_time(seq_all, x, bs, thr),
            "one-at-a-time threads=1": lambda: one_at_a_time(seq_one, x, bs, thr)}
    for name, p in pipes.items():
        runs[name] = (lambda p=p: p.predict(x, batch_size=bs).prediction)
    static = pipes["in-flight=2"]
    runs["static (in-flight=2)"] = lambda: static.run_static(x, batch_size=bs).prediction
    ref = None
    times = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for r in range(args.repeats + 1):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            pred = fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r > 0:
                times[name].append(dt)
                cpu[name].append(dc)
            if name != "static (in-flight=2)":
                if ref is None:
                    ref = pred
                assert np.array_equal(pred, ref), f"{name} disagrees with the others"
    r = pipes["in-flight=2"].predict(x, batch_size=bs)
    dist = np.bincount(r.exit_stage, minlength=bundle.num_stages) / max(1, x.shape[0])
    print(f"exit distribution: {[round(float(d), 3) for d in dist]}  (ORT threads per session in the pipelines: "
          f"{pipes['in-flight=2'].backend.threads} with 2 in flight)")
    base = min(min(times["one-at-a-time threads=all"]), min(times["one-at-a-time threads=1"]))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus (other processes share them: wall-clock "
          "figures favour configurations with more busy threads; CPU-seconds do not)")
    print(f"{'configuration':<32s} {'samples/s':>10s} {'best ms':>10s} {'vs best one-at-a-time':>22s} {'cpu s':>7s} "
          f"{'samples/cpu-s':>14s}")
    for name, ts in times.items():
        med = min(ts)
        c = min(cpu[name])
        print(f"{name:<32s} {x.shape[0] / med:10.1f} {med * 1000:10.1f} {base / med:21.2f}x {c:7.2f} {x.shape[0] / c:14.1f}")
    for p in pipes.values():
        p.close()
    seq_all.deactivate()
    seq_one.deactivate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
