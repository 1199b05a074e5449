"""``dmpo-edge bench BUNDLE``: trtexec-style latency of the early-exit pipeline against the static model.

Composes library calls only: the data set (:mod:`dmpo_edge.calib.datasets`), the threshold solver
(:mod:`dmpo_edge.calib.thresholds`) and the measurement (:mod:`dmpo_edge.runtime.bench`).
"""

from __future__ import annotations

import os
import sys

__all__ = ["add_arguments", "run"]

DIGIT_CLASSES = [str(i) for i in range(10)]
RANDOM_SAMPLES = 512


def add_arguments(p) -> None:
    from ..runtime.bench import DEFAULT_DURATION_S, DEFAULT_ITERATIONS, DEFAULT_SWEEP_BUDGETS, DEFAULT_WARMUP_MS
    from .options import add_backend, add_bundle, add_data, add_in_flight, add_json_report, add_quiet, add_thresholds

    add_bundle(p)
    add_backend(p)
    p.add_argument("--batch", default=None, metavar="B1,B2,...",
                   help="batch sizes (default 1,8,32, capped at the bundle's max batch)")
    p.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_MS, metavar="MS",
                   help=f"warm-up time per batch size in ms (default {DEFAULT_WARMUP_MS:g}, as trtexec)")
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, metavar="S",
                   help=f"minimum timed seconds per batch size (default {DEFAULT_DURATION_S:g}, as trtexec; "
                        "per configuration in a sweep)")
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, metavar="N",
                   help=f"minimum timed iterations per configuration (default {DEFAULT_ITERATIONS}, as trtexec)")
    data = p.add_mutually_exclusive_group()
    add_data(data, what="images to feed", labelled=False,
             note="Default digits:test when the bundle's classes are the digits 0-9")
    data.add_argument("--random", action="store_true",
                      help="random inputs instead of images (exits on noise mean nothing: latency only)")
    p.add_argument("--samples", type=int, metavar="N", help="use a fixed random subset of N images (default all)")
    th = p.add_mutually_exclusive_group()
    th.add_argument("--budget", type=float, metavar="X",
                    help="thresholds with the highest cost <= X of the full model's FLOPs on the bench data "
                         "(budgeted-batch points of the calibration sweep, label-free)")
    add_thresholds(th)
    p.add_argument("--sweep", nargs="?", const=",".join(f"{b:g}" for b in DEFAULT_SWEEP_BUDGETS), metavar="BUDGETS",
                   help="also time the operating point of each budget (default 0.3,0.4,...,1.0) against the static "
                        "model -> table + PNG")
    p.add_argument("--plot", metavar="PNG", help="where the sweep plot goes (default: beside --json, else bench_sweep.png)")
    p.add_argument("--host-overhead", action="store_true",
                   help="also measure the pipeline's own cost per stage per batch with the null backend (no inference)")
    p.add_argument("--stream", type=int, default=16, metavar="N",
                   help="also time streams of N batches handed over at once, so batches overlap in the pipeline "
                        "(throughput with batches in flight; default 16, 0 = off)")
    p.add_argument("--no-settle", action="store_true",
                   help="no untimed settle call before each timed one-batch call (each configuration is then timed "
                        "in the caches the other one left behind)")
    add_in_flight(p)
    p.add_argument("--buckets", metavar="pow2|B1,B2,...", help="pipeline: pad stage batches up to these sizes")
    p.add_argument("--refill", action="store_true", help="pipeline: merge shrunken stage batches")
    p.add_argument("--threads", type=int, metavar="N",
                   help="ONNX Runtime intra-op threads per stage session (default: usable cores / batches in flight, "
                        "spinning off)")
    add_json_report(p, what="full report")
    add_quiet(p)


def _say(args, msg: str) -> None:
    if not args.quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _check_backend(name: str, bundle):
    from .options import checked_backend

    return checked_backend(name, bundle, where="bench")


def _batch_sizes(args, bundle) -> list:
    from ..runtime.bench import parse_batch_list

    if args.batch is not None:
        return parse_batch_list(args.batch, bundle.max_batch)
    sizes = [b for b in (1, 8, 32) if b <= bundle.max_batch]
    return sizes or [bundle.max_batch]


def _load_data(args, bundle) -> tuple:
    """-> (x float32 N x 3 x H x W, labels as bundle class indices or None, data record, warnings)."""
    import numpy as np

    from ..errors import DmpoEdgeError
    from ..runtime._common import input_shape

    notes = []
    if args.random:
        n = args.samples or RANDOM_SAMPLES
        x = np.random.default_rng(0).standard_normal((n,) + tuple(input_shape(bundle))).astype(np.float32)
        notes.append("--random: the inputs are noise and exits on noise mean nothing: the exit histogram, speed-ups "
                     "and efficiency describe noise, not your data. Use --data for real figures (latency is still valid)")
        return x, None, {"source": "random normal(0, 1)", "samples": n, "labelled": False}, notes
    spec = args.data
    if spec is None:
        if list(bundle.classes) != DIGIT_CLASSES:
            shown = ", ".join(bundle.classes[:6]) + (" ..." if len(bundle.classes) > 6 else "")
            raise DmpoEdgeError(
                "bench", f"the bundle's classes ({shown}) are not the digits, so the default data digits:test does not fit. "
                "Pass --data FOLDER (images, one sub-folder per class) or --random for a latency-only run")
        spec = "digits:test"
    from ..calib.datasets import load_dataset

    ds = load_dataset(spec, labelled=False)
    if args.samples:
        ds = ds.take(int(args.samples))
    labels = None
    if ds.labels is not None:
        index = {c: i for i, c in enumerate(bundle.classes)}
        if all(c in index for c in ds.classes):
            labels = np.array([index[c] for c in ds.classes], np.int64)[np.asarray(ds.labels, np.int64)]
        else:
            notes.append(f"the classes of '{ds.source}' are not the bundle's; accuracy is not reported")
    pre = bundle.preprocess
    x = np.concatenate([pre(ds.images[s:s + 512]) for s in range(0, len(ds), 512)]).astype(np.float32)
    return x, labels, {"source": ds.source, "samples": int(x.shape[0]), "labelled": labels is not None,
                       "fingerprint": ds.fingerprint()}, notes


def _stage_confidences(pipeline, x):
    """Every stage's confidence (K x N) on the bench data, through the pipeline's backend."""
    import numpy as np

    from ..runtime.static import run_all_stages

    outs = run_all_stages(pipeline.bundle, x, batch_size=pipeline.max_batch, backend=pipeline.backend)
    return np.stack([o["confidence"] for o in outs]).astype(np.float32)


def _solve(conf, flops, budget: float) -> tuple:
    """(thresholds, planned exit distribution, how) whose cost on the bench data is the highest within ``budget``.

    Label-free on purpose: the bench data is usually the test split, and fitting thresholds to its labels
    (``calib.thresholds.solve_budget`` maximises accuracy) would make the reported accuracy optimistic; it
    also treats the budget as a cap, so on digits every budget above 0.39 gave the same point. Candidates
    are the budgeted-batch points of the calibration sweep (MSDNet's p = 1/20 .. 39/20, from
    ``dmpo_edge.calib.thresholds``), equal confidence quantiles per exit, and the two extremes.
    """
    import numpy as np

    from ..calib import thresholds as cth
    from ..runtime.bench_stats import exit_histogram, expected_cost, simulate_exits, thresholds_for_budget

    K = conf.shape[0]
    full = float(flops[-1])
    cands = [([-cth.NEVER_EXIT] * (K - 1), "everyone at exit 0"), ([cth.NEVER_EXIT] * (K - 1), "no early exit")]
    for p in cth.SWEEP_P:
        th, _ = cth.budgeted_batch_thresholds(conf, cth.geometric_exit_distribution(p, K))
        cands.append(([float(t) for t in th], f"budgeted batch p={p:g}"))
    cands.append((thresholds_for_budget(conf, flops, float(budget))[0], "equal confidence quantiles per exit"))
    best = None
    for th, how in cands:
        hist = np.asarray(exit_histogram(simulate_exits(conf, th), K), np.float64)
        cost = expected_cost(hist, flops) / full
        if cost <= budget + 1e-9 and (best is None or cost > best[0] + 1e-12):
            best = (cost, th, (hist / hist.sum()).tolist(), how)
    return best[1], best[2], best[3]


def run(args) -> int:
    from ..bundle import Bundle, write_json_atomic
    from ..errors import DmpoEdgeError
    from ..runtime import bench as rb
    from ..runtime.pipeline import Pipeline

    bundle = Bundle.load(args.bundle)
    backend = _check_backend(args.backend, bundle)
    settings = rb.BenchSettings(batch_sizes=_batch_sizes(args, bundle), warmup_ms=args.warmup,
                                duration_s=args.duration, iterations=args.iterations,
                                stream_batches=args.stream, settle=not args.no_settle).check()
    K = bundle.num_stages
    if args.samples is not None and args.samples < 1:
        raise DmpoEdgeError("bench", f"--samples {args.samples} must be at least 1")
    budgets = None
    if args.sweep is not None:
        budgets = rb.parse_float_list(args.sweep, "--sweep")
        bad = [b for b in budgets if not 0 < b <= 1]
        if bad:
            raise DmpoEdgeError("bench", f"--sweep budgets {bad} are out of range. Expected fractions in (0, 1]")
    if args.budget is not None and not 0 < args.budget <= 1:
        raise DmpoEdgeError("bench", f"--budget {args.budget} is out of range. Expected a fraction in (0, 1]")
    if K < 2 and (args.sweep or args.budget is not None or args.thresholds):
        raise DmpoEdgeError("bench", "the bundle has a single stage: there are no early exits to set")

    # thresholds: explicit, solved for a budget, or the manifest's (calibrated) ones
    thresholds, source, expected = None, None, None
    if args.thresholds is not None:
        thresholds, source = rb.parse_thresholds(args.thresholds, K), "--thresholds"
    elif args.budget is None:
        thresholds = bundle.thresholds
        rec = bundle.manifest.get("thresholds") or {}
        source = f"manifest ({rec.get('method')}, target {rec.get('target')})"
        expected = rec.get("expected_exit_distribution")
        if thresholds is None and budgets is None and K > 1:
            raise DmpoEdgeError(
                f"bundle {bundle.path}", "has no exit thresholds. Calibrate it first: dmpo-edge calibrate "
                f"{args.bundle} --val digits:val --max-drop 0.01 (or a labelled folder for --val), "
                "or pass --thresholds T0,T1,... or --budget X")
    if thresholds is None and K == 1:
        thresholds = []

    x, labels, data, notes = _load_data(args, bundle)
    for n in notes:
        print(f"dmpo-edge: warning: {n}", file=sys.stderr)

    options = {"max_in_flight": args.max_in_flight, "refill": args.refill}
    if args.buckets:
        options["buckets"] = args.buckets if args.buckets == "pow2" else rb.parse_batch_list(args.buckets)
    backend_options = {"threads": args.threads} if (args.threads and backend == "ort") else None
    _say(args, f"loading {bundle.path} on the {backend} backend")
    pipe = Pipeline.from_bundle(bundle, backend=backend, thresholds=thresholds or ([0.0] * (K - 1)),
                                backend_options=backend_options, **options)
    sweep_cfgs = None
    th_record = None
    machine = rb.machine_info()  # before the run: the load average says how busy the machine was
    with pipe:
        if args.budget is not None or budgets:
            _say(args, "every stage on the bench data (confidences for the budget solver)")
            conf = _stage_confidences(pipe, x)
            flops = bundle.cumulative_flops
            from ..calib.thresholds import minimum_cost

            lo = minimum_cost(flops)
            if args.budget is not None:
                if args.budget < lo:
                    raise DmpoEdgeError("bench", f"--budget {args.budget:g} is below the cheapest possible cost {lo:.3f} "
                                        f"(everyone leaving at exit 0). Use --budget {lo:.3f} or more")
                thresholds, expected, method = _solve(conf, flops, args.budget)
                source = f"budget {args.budget:g}: {method} on the bench data (label-free)"
            if budgets:
                sweep_cfgs = []
                for bud in budgets:
                    if bud < lo:
                        notes.append(f"sweep budget {bud:g} is below the cheapest possible cost {lo:.3f} (all leave at exit 0); skipped")
                        continue
                    th, dist, method = _solve(conf, flops, bud)
                    sweep_cfgs.append({"name": f"budget {bud:g}", "thresholds": th, "budget": bud, "expected": dist,
                                       "solver": method})
                if not sweep_cfgs:
                    raise DmpoEdgeError("bench", f"every --sweep budget is below the cheapest possible cost {lo:.3f}")
        if thresholds is not None:
            th_record = {"values": [float(t) for t in thresholds], "source": source}
        be = pipe.backend
        detail = {"class": type(be).__name__, "providers": list(getattr(be, "providers", []) or []),
                  "threads": getattr(be, "threads", None),
                  # ONNX Runtime: the all-core sessions of one-batch calls in the calling thread, when there are any
                  "exclusive_threads": getattr(be, "exclusive_threads", None) if getattr(be, "wide_sessions", None) else None,
                  "exclusive_min_mflops": getattr(be, "exclusive_min_mflops", None) if getattr(be, "wide_sessions", None) else None,
                  "files": [os.path.relpath(f, bundle.path) for f in (getattr(be, "files", []) or [])]}
        result = rb.run_benchmark(pipe, x, labels, settings, thresholds=thresholds, expected=expected,
                                  sweep=sweep_cfgs, progress=lambda m: _say(args, m))
    report = {
        "tool": "dmpo-edge bench",
        "bundle": {"path": bundle.path, "name": bundle.manifest["model"].get("name"), "precision": bundle.precision,
                   "num_stages": K, "max_batch": bundle.max_batch, "exit_policy": bundle.manifest.get("exit_policy"),
                   "cumulative_flops": bundle.cumulative_flops},
        "backend": {"name": backend, "detail": detail, "pipeline": {k: v for k, v in options.items()}},
        "settings": {"batch_sizes": settings.batch_sizes, "warmup_ms": settings.warmup_ms,
                     "duration_s": settings.duration_s, "iterations": settings.iterations,
                     "percentiles": list(settings.percentiles),
                     "percentile_definition": "trtexec: sorted[max(n - 1 - int((1 - p/100) * n), 0)] (float32)",
                     "interleaved": True, "settle": settings.settle},
        "data": data,
        "thresholds": th_record,
        "machine": {**machine, "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        **result,
        "warnings": notes,
    }
    if args.host_overhead:
        _say(args, "host overhead with the null backend")
        report["host_overhead"] = rb.host_overhead(bundle, settings.batch_sizes, None, settings, pipeline_options=options)
    print(rb.format_report(report))
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    if report.get("sweep"):
        png = args.plot or (os.path.splitext(args.json)[0] + ".sweep.png" if args.json else "bench_sweep.png")
        rb.plot_sweep(report, png)
        print(f"wrote {png}")
    return 0
