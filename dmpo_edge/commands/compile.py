"""``dmpo-edge compile MODEL.pt -o BUNDLE [--fp16 | --int8 --calib DATA]``: model.pt -> a bundle.

Splits the model into per-stage ONNX graphs with a dynamic batch, simplifies them, checks parity with torch,
converts them to FP16 or INT8 (explicit Q/DQ calibrated on the target data), checks that TensorRT can take
every op, and writes the bundle atomically. Where TensorRT and a GPU are present it also builds the engines;
elsewhere it says in one line that they are built on the target with ``dmpo-edge build``.
"""

from __future__ import annotations

__all__ = ["add_arguments", "run"]


def add_arguments(p) -> None:
    from .options import add_allow_pickle, add_data, add_quiet, add_trt_builder

    p.add_argument("model", metavar="MODEL.pt", help="checkpoint written by 'dmpo-edge tune' (or save_checkpoint)")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle folder to write")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                      help="mixed FP16 (covariance / square-root heads and exit scores stay FP32)")
    prec.add_argument("--int8", dest="precision", action="store_const", const="int8",
                      help="INT8 with explicit Q/DQ calibrated on --calib")
    prec.add_argument("--precision", dest="precision", choices=("fp32", "fp16", "int8"), help="default fp32")
    add_data(p, "--calib", what="calibration images", split="train", labelled=False)
    p.add_argument("--calib-count", type=int, default=256, metavar="N", help="calibration images to use (default 256)")
    p.add_argument("--calib-method", default="entropy",
                   choices=("entropy", "max", "percentile", "percentile-99.9", "percentile-99.99", "mse"),
                   help="INT8 activation range method of the TensorRT form (default entropy; percentile = 99.99; "
                        "compared in docs/results.md)")
    p.add_argument("--holdout", metavar="DATA", help="labelled held-out data for parity and the accuracy report "
                   "(default: the :val split for digits, fashion-mnist and idx:DIR calibration, else unused calibration images)")
    p.add_argument("--holdout-count", type=int, default=1000, metavar="N", help="held-out images to use (default 1000)")
    p.add_argument("--max-exit-drop", type=float, default=0.5, metavar="POINTS",
                   help="accuracy points FP16/INT8 may lose at any exit on the held-out data (default 0.5; the TensorRT "
                        "form judged as TensorRT computes it, the CPU form with this CPU's kernels); more fails the compile")
    p.add_argument("--accept-drop", action="store_true",
                   help="write the bundle even when an exit loses more than --max-exit-drop (reported loudly)")
    p.add_argument("--sensitivity", action="store_true", default=None,
                   help="INT8: write reports/sensitivity.json (accuracy drop per exit with one layer quantized at a time); "
                        "written anyway when an accepted INT8 bundle misses the budget")
    p.add_argument("--exit-policy", default="max_softmax", choices=("max_softmax", "entropy", "margin"),
                   help="exit score computed in the graphs (default max_softmax)")
    p.add_argument("--exits", metavar="E0,E1,...",
                   help="keep only these exits of the model, e.g. 0,1,3 (increasing, with the last exit); the trunk of a "
                        "left-out exit is merged into the next stage. Default: every exit. 'dmpo-edge calibrate' reports "
                        "which exits pay for their heads")
    p.add_argument("--max-batch", type=int, default=64, metavar="N", help="largest batch a stage takes (default 64)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset to export (default 18; >= 17)")
    p.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "torchscript"),
                   help="torch.onnx exporter (default auto: dynamo, then torchscript)")
    p.add_argument("--cpu-format", default="auto", choices=("auto", "QDQ", "QOperator"),
                   help="INT8 ONNX Runtime CPU form (default auto: the faster one, measured)")
    p.add_argument("--fp16-tool", default="auto", choices=("auto", "modelopt-autocast", "onnxconverter-common"))
    p.add_argument("--int8-tool", default="auto", choices=("auto", "modelopt", "onnxruntime"))
    p.add_argument("--build", default="auto", choices=("auto", "never", "always"),
                   help="build TensorRT engines now (auto: when TensorRT and a GPU are present)")
    add_trt_builder(p)
    add_allow_pickle(p)
    add_quiet(p)


def _print_summary(bundle, seconds: float) -> None:
    import json
    import os

    m = bundle.manifest
    prec = m["precision"]
    print(f"bundle {bundle.path}: {bundle.num_stages} stages, {prec['mode']}, exit policy {m['exit_policy']}, "
          f"max batch {m['max_batch']}, compiled in {seconds:.1f} s")
    with open(os.path.join(bundle.path, "reports", "parity.json")) as f:
        par = json.load(f)
    errs = " / ".join(f"{e['max_relative_error']:.1e}" for e in par["stages"])
    print(f"parity (fp32 graphs vs torch, {par['samples']} images of {par.get('inputs')}): max relative error per stage {errs}"
          f" (tolerance {par['tolerance']:.0e})")
    ex = m.get("exits") or {}
    if ex and len(ex.get("kept", [])) != ex.get("model_exits"):
        print(f"exits kept: {','.join(map(str, ex['kept']))} of the model's 0..{ex['model_exits'] - 1} "
              "(trunk of the others merged into the next stage)")
    peer = m.get("peer")
    if peer:
        cpu_form = (peer.get("variants") or {}).get("cpu", {}).get("file")
        print(f"peer one-graph model: {peer['file']}" + (f" and {cpu_form}" if cpu_form else "")
              + f" ({peer['precision']['mode']}"
              + (f", CPU form {peer['precision']['cpu_format']}" if peer["precision"].get("cpu_format") else "")
              + "; agreement with the last exit "
              f"{100 * par.get('peer', {}).get('agreement_with_last_exit', float('nan')):.1f}%)")
    rep = os.path.join(bundle.path, "reports", "precision.json")
    if os.path.isfile(rep):
        with open(rep) as f:
            r = json.load(f)
        data = (r.get("data") or {}).get("source")
        for name, how in (r.get("measured_with") or {}).items():
            print(f"{name} measured with {how}")
        if r["fp32"] and r["fp32"][0].get("accuracy") is not None:
            print(f"accuracy per exit on {data} (%): fp32 " + " / ".join(f"{100 * e['accuracy']:.2f}" for e in r["fp32"]))
        for name, per_exit in r["variants"].items():
            if per_exit and per_exit[0].get("accuracy") is not None:
                print(f"{'':>{len('accuracy per exit on ' + str(data) + ' (%): ')}}{name} "
                      + " / ".join(f"{100 * e['accuracy']:.2f}" for e in per_exit)
                      + "   agreement " + " / ".join(f"{100 * e['top1_agreement']:.1f}" for e in per_exit))
            else:
                print(f"top-1 agreement with fp32 per exit ({name}, %): "
                      + " / ".join(f"{100 * e['top1_agreement']:.1f}" for e in per_exit))
        budget = prec.get("budget") or {}
        if budget.get("ok") is not None:
            worst = max((e.get("budget_points", 0.0) for v in r["variants"].values() for e in v), default=0.0)
            print(f"accuracy budget: at most {budget['max_exit_drop_points']:g} points per exit, worst {worst:.2f}: "
                  + ("met" if budget["ok"] else "MISSED, accepted (--accept-drop)"))
    cpu = prec.get("cpu_variant")
    if cpu and cpu.get("format"):
        t = cpu.get("timings_ms", {})
        isa = (cpu.get("target_isa") or {}).get("isa", "?")
        ws = cpu.get("weight_scheme")
        names = {"s8-7bit": "7-bit S8", "u8": "U8", "s8": "S8"}
        weights = "/".join(names.get(w, str(w)) for w in (ws if isinstance(ws, list) else [ws])) + " weights"
        print(f"cpu variant: {cpu['format']} (U8 activations, {weights}, for {isa}); ONNX Runtime here, all stages, batch "
              f"{cpu['timing_batch']}: {t.get('cpu_variant', 0):.1f} ms vs fp32 {t.get('fp32', 0):.1f} ms "
              f"(TensorRT form in ONNX Runtime {t.get('tensorrt_form', 0):.1f} ms)")
        per = [r.get("format") for r in cpu.get("per_stage") or []]
        if per:
            print("cpu form per stage, fastest here within the budget: " + " / ".join(map(str, per)))


def run(args) -> int:
    import time

    from ..compile import compile_bundle

    t0 = time.perf_counter()
    build_options = {"buckets": args.buckets or (), "workspace_mib": args.workspace_mib, "frontend": args.frontend,
                     "checkpoint": args.model if args.frontend == "torch-tensorrt" else None}
    bundle = compile_bundle(
        args.model, args.output, precision=args.precision or "fp32", calib=args.calib, calib_count=args.calib_count,
        holdout=args.holdout, holdout_count=args.holdout_count, max_batch=args.max_batch, exit_policy=args.exit_policy,
        force=args.force, allow_pickle=args.allow_pickle, opset=args.opset, exporter=args.exporter,
        calib_method=args.calib_method,
        fp16_tool=args.fp16_tool, int8_tool=args.int8_tool, cpu_format=args.cpu_format, build=args.build,
        progress=not args.quiet, build_options=build_options, max_exit_drop=args.max_exit_drop,
        accept_drop=args.accept_drop, sensitivity=args.sensitivity, exits=args.exits,
    )
    _print_summary(bundle, time.perf_counter() - t0)
    return 0
