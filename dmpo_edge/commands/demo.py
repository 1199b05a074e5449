"""``dmpo-edge demo``: the whole job on the bundled digits (or Fashion-MNIST), one command, composed of the other commands.

tune (or reuse a cached ``model.pt``) -> ``compile --int8`` calibrated on a training subset -> ``calibrate``
on the validation split -> the early-exit pipeline on the held-out split -> ``eval`` -> ``bench`` against the
static model. Every figure in the closing summary is read from the JSON that ``eval`` and ``bench`` write for
the same bundle, so it matches what those commands print when run by hand (the commands are shown).
"""

from __future__ import annotations

import json
import os
import sys
import time

__all__ = ["add_arguments", "run", "summary_table", "DEMO_DATA"]

#: data sets the demo knows: spec -> default number of training images (None: all of the train split)
DEMO_DATA = {"digits": None, "fashion-mnist": 5000}


def add_arguments(p) -> None:
    from .options import add_backend, add_quiet

    p.add_argument("--data", default="digits", choices=tuple(DEMO_DATA),
                   help="digits (bundled with scikit-learn) or fashion-mnist (apt-get install dataset-fashion-mnist); "
                        "tuned on :train, thresholds on :val, everything reported on :test (default digits)")
    p.add_argument("--train-count", type=int, default=None, metavar="N",
                   help="training images (stratified subset; default all for digits, 5000 for fashion-mnist)")
    p.add_argument("--workdir", default="dmpo-demo", help="where model.pt, the bundle and the reports go (default ./dmpo-demo)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone to tune (default efficientnet_lite0, ImageNet-pretrained)")
    p.add_argument("--epochs", type=int, default=None, help="tuning epochs (default: the tune command's)")
    p.add_argument("--precision", default="int8", choices=("fp32", "fp16", "int8"), help="bundle precision (default int8)")
    p.add_argument("--calib-count", type=int, default=256, help="training images used for INT8 calibration (default 256)")
    p.add_argument("--max-drop", type=float, default=0.01, help="accuracy drop allowed by the exit thresholds (default 0.01)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the benchmark (default 32)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per benchmark configuration (default 3, trtexec's)")
    p.add_argument("--retune", action="store_true", help="tune again even when workdir/model.pt exists")
    p.add_argument("--model", metavar="MODEL.PT", help="use this checkpoint (tuned on --data) instead of tuning one")
    add_backend(p)
    p.add_argument("--exporter", default=None, choices=("dynamo", "torchscript"), help="torch.onnx exporter for compile")
    add_quiet(p)


def _step(title: str, argv: list) -> None:
    """Run one dmpo-edge command in-process, printing it so the user can repeat it by hand."""
    from ..cli import main
    from ..errors import DmpoEdgeError

    print(f"\n== {title}\n$ dmpo-edge {' '.join(argv)}", flush=True)
    t = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise DmpoEdgeError("demo", f"step '{title}' failed (exit code {code}); the line above says why")
    print(f"   ({time.perf_counter() - t:.1f} s)", flush=True)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def summary_table(ev: dict, bench: dict, realised: dict) -> str:
    """The closing table: per-exit accuracy, exit distribution, accuracy and cost against the static model, speed-ups.

    The static model is what bench times as the baseline: the same bundle's stages run to the final exit, every
    sample, no early exits; its accuracy is the final exit's, its cost 100% of the FLOPs."""
    exits = ev["exits"]
    op = ev["operating_point"] or {}
    dist = op.get("exit_distribution") or [None] * len(exits)
    cum = ev["cumulative_flops"]
    full = cum[-1]
    lines = [
        "exit  accuracy (alone)  exits here  cumulative MFLOPs  % of full",
    ]
    for k, e in enumerate(exits):
        lines.append(f"{k:>4}  {_pct(e['accuracy']):>16}  {_pct(dist[k]):>10}  {cum[k] / 1e6:17.2f}  {100 * cum[k] / full:8.1f}%")
    res = (bench.get("results") or [{}])[0]
    ee = res.get("early_exit") or {}
    sp = ee.get("speedup") or {}
    final = ev["final_accuracy"]
    lines += [
        "",
        f"early-exit accuracy (eval, test split)  {_pct(op.get('accuracy'))}   final exit alone {_pct(final)}   "
        f"difference {100 * ((op.get('accuracy') or 0) - final):+.1f} points",
        f"against the static model               early exit {_pct(op.get('accuracy'))} at {_pct(op.get('expected_cost'))} "
        f"of its FLOPs; static model (every stage, final exit) {_pct(final)} at 100.0%",
        f"pipeline run on the test split         {_pct(realised['accuracy'])}   exits {realised['histogram']}",
        f"expected cost                          {_pct(op.get('expected_cost'))} of the full model's FLOPs "
        f"({(op.get('expected_cost') or 0) * full / 1e6:.2f} of {full / 1e6:.2f} MFLOPs)",
        f"bench batch {res.get('batch', '?')} ({bench['backend']['name']})          realised speed-up "
        f"{sp.get('realised', float('nan')):.2f}x   ideal {sp.get('ideal', float('nan')):.2f}x   "
        f"efficiency {sp.get('efficiency', float('nan')):.2f}",
    ]
    return "\n".join(lines)


def run(args) -> int:
    from ..bundle import Bundle
    from ..calib.datasets import load_dataset
    from ..errors import DmpoEdgeError
    from ..runtime.pipeline import Pipeline

    from .options import checked_backend

    checked_backend(args.backend, where="demo")  # a typo fails now, not after tuning and compiling
    t0 = time.perf_counter()
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    data = args.data
    model = os.path.join(work, "model.pt" if data == "digits" else f"{data}_model.pt")
    bundle = os.path.join(work, f"{data}_{args.precision}")
    train_count = args.train_count if args.train_count is not None else DEMO_DATA[data]
    quiet = ["--quiet"] if args.quiet else []

    if args.model:
        if not os.path.isfile(args.model):
            raise DmpoEdgeError("demo", f"--model '{args.model}' does not exist. Expected a model.pt written by 'dmpo-edge tune'")
        model = os.path.abspath(args.model)
        print(f"== using {model}")
    elif os.path.isfile(model) and not args.retune:
        print(f"== reusing {model} (pass --retune to tune again)")
    else:
        argv = ["tune", "--data", data, "--backbone", args.backbone, "-o", model] + quiet
        if args.epochs:
            argv += ["--epochs", str(args.epochs)]
        if train_count:
            argv += ["--train-count", str(train_count)]
        _step(f"tune DMPO on {data}:train (validation on {data}:val)", argv)
    _step(f"compile --{args.precision} calibrated on {data}:train",
          ["compile", model, "--precision", args.precision, "--calib", f"{data}:train", "--calib-count", str(args.calib_count),
           "--holdout", f"{data}:val", "-o", bundle, "--force", "--accept-drop"]  # the demo shows a budget miss, loudly
          + (["--exporter", args.exporter] if args.exporter else []))
    _step(f"exit thresholds on {data}:val within {100 * args.max_drop:g} point(s) of the final exit",
          ["calibrate", bundle, "--val", f"{data}:val", "--max-drop", str(args.max_drop), "--backend", args.backend] + quiet)

    print(f"\n== the early-exit pipeline on the held-out {data}:test", flush=True)
    test = load_dataset(f"{data}:test")
    b = Bundle.load(bundle)
    x = b.preprocess(test.images)
    with Pipeline.from_bundle(b, backend=args.backend) as pipe:
        res = pipe.predict(x)
        backend_name = type(pipe.backend).__name__
    if len(res) != len(test):
        raise DmpoEdgeError("demo", f"the pipeline returned {len(res)} results for {len(test)} images")
    hist = [int((res.exit_stage == k).sum()) for k in range(b.num_stages)]
    realised = {"accuracy": float((res.prediction == test.labels).mean()), "histogram": hist}
    print(f"{len(res)} images on {backend_name}: accuracy {_pct(realised['accuracy'])}, exits per stage {hist}")

    ev_json, ev_png = os.path.join(work, "eval.json"), os.path.join(work, "eval.png")
    _step(f"per-exit accuracy and accuracy versus FLOPs on {data}:test",
          ["eval", bundle, "--data", f"{data}:test", "--json", ev_json, "--plot", ev_png, "--backend", args.backend] + quiet)
    bench_json = os.path.join(work, "bench.json")
    _step(f"latency against the static model, batch {args.batch}",
          ["bench", bundle, "--data", f"{data}:test", "--batch", str(args.batch), "--duration", str(args.duration),
           "--backend", args.backend, "--json", bench_json] + quiet)

    with open(ev_json) as f:
        ev = json.load(f)
    with open(bench_json) as f:
        bench = json.load(f)
    op = ev.get("operating_point") or {}
    if op.get("exit_distribution"):
        expect = [round(d * len(test)) for d in op["exit_distribution"]]
        if expect != hist:  # the pipeline and eval run the same graphs with the same thresholds
            print(f"dmpo-edge: warning: pipeline exits {hist} differ from eval's {expect}", file=sys.stderr)
    print(f"\n== summary ({b.precision} bundle {bundle})")
    print(summary_table(ev, bench, realised))
    print(f"\nplots: {ev_png}, {os.path.join(bundle, 'reports', 'calibration.png')}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0
