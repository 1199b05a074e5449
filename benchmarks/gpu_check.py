"""GPU verification kit: one run that proves the GPU paths of dmpo-edge on whatever CUDA machine is at hand.

What it does, top to bottom (each step is one row of the table printed at the end):

1. environment: GPU, driver-side packages (torch, cuda-python, pycuda, TensorRT, ONNX Runtime), nvcc;
2. pycuda: when it is missing and a CUDA toolkit (nvcc + cuda.h) is there, it is built from the source
   distribution carried in the kit (``out/gpu_kit``, see ``benchmarks/gpu_kit.sh``) into a temporary folder;
   otherwise the device layer runs on cuda-python;
3. the bundle: ``--bundle``, ``--model`` (compiled here), the kit's, or a tiny ViT trained for a few steps on
   digits and compiled here;
4. the CPU reference: every stage on every input with ONNX Runtime on the CPU, exit thresholds chosen so that
   every exit takes a share, and the early-exit pipeline on the CPU (checked against the numpy reference);
5. the device layer (``dmpo_edge.runtime.device``, pycuda and cuda-python): page-locked buffers, async copies on
   two streams ordered by an event, the layer's own CUDA graph capture / instantiate / launch on a real stream
   (copies and the survivor gather captured once, replayed with new data), its timing events against the wall
   clock, the ``keep_idx`` survivor gather run on the device (torch ``index_select`` on the layer's own memory and
   stream; a TensorRT Gather engine where TensorRT is installed) and the TensorRT backend's refill copies, all
   bit for bit against numpy;
6. the early-exit pipeline on the GPU with several batches in flight, through the runtime's own Pipeline, on a
   torch-on-CUDA stage backend (``gpu_checks/torch_backend.py``; it stands in for the engines where TensorRT is
   missing): every sample's exit stage and class against the CPU pipeline's (identical except for samples whose
   confidence lies within ``--band`` of a threshold: those are listed);
7. NVIDIA's lean TensorRT runtime (two wheels carried in the kit) imported and a ``Runtime`` created on the GPU;
   where the full TensorRT imports: engines built with ``dmpo_edge.compile.build_engines`` for the fp32 bundle and the
   kit's fp16 / int8 bundles, per-stage parity with ONNX Runtime, the pipeline comparison, and per-stage engine
   timings against the static model (every stage on every sample).

The checks live in ``benchmarks/gpu_checks/`` (one module per job: report, kit, bundles, reference, device,
regroup, pipelines, engines); this script is the driver.

``--dry-run`` runs every step that needs no CUDA on the CPU (the torch backend on the CPU device, a host-memory
device layer) so that the comparison logic, the table and the JSON are tested here (tests/test_gpu_check.py).

Run from the repository root::

    python benchmarks/gpu_check.py                          # on the GPU machine; uses out/gpu_kit/ when present
    python benchmarks/gpu_check.py --bundle B --model M.pt   # a given fp32 bundle and its checkpoint
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc   # the CPU self-test

Results: ``<out>/gpu_check.json`` (everything) and ``<out>/gpu_check.txt`` (the table, also printed last).
``<out>`` is ``--out``, else ``$DMPO_GPU_CHECK_OUT``, else ``$OUT``, else ``./gpu_check_out``.
Exit code: 0 when no check failed, 1 when one did, 2 when there is nothing to run on (no CUDA device without
``--dry-run``, bad arguments).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the gpu_checks package beside this script

from gpu_checks.checkout import bootstrap_imports  # noqa: E402

bootstrap_imports()  # before anything imports dmpo_edge

from dmpo_edge._lazy import available, installed_version, require  # noqa: E402
from dmpo_edge.errors import DmpoEdgeError  # noqa: E402
from gpu_checks.bundles import resolve_bundle  # noqa: E402
from gpu_checks.context import Ctx  # noqa: E402
from gpu_checks.device import device_impls, step_device_layer  # noqa: E402
from gpu_checks.engines import step_lean_runtime, step_trt  # noqa: E402
from gpu_checks.environment import environment, probe_cuda  # noqa: E402
from gpu_checks.kit import DEFAULT_KIT, add_site, install_pycuda, prepare_kit, pycuda_plan  # noqa: E402
from gpu_checks.pipelines import (  # noqa: E402
    step_cpu_pipeline, step_cpu_reference, step_ort_cuda, step_torch_parity, step_torch_pipeline,
)
from gpu_checks.reference import DEFAULT_BAND  # noqa: E402
from gpu_checks.report import FAIL, FORMAT, INFO, SKIP, Report, jsonable, one_line  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------
def default_out() -> str:
    return os.environ.get("DMPO_GPU_CHECK_OUT") or os.environ.get("OUT") or os.path.join(os.getcwd(), "gpu_check_out")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU self-test: every step that needs no CUDA (torch backend on the CPU)")
    p.add_argument("--out", default=None, help="results folder (default $DMPO_GPU_CHECK_OUT, $OUT, ./gpu_check_out)")
    p.add_argument("--bundle", help="an fp32 bundle to check (with --model: the checkpoint it was compiled from)")
    p.add_argument("--model", help="a checkpoint (model.pt): compiled to an fp32 bundle here unless --bundle is given")
    p.add_argument("--kit", default=DEFAULT_KIT, help="the kit folder from benchmarks/gpu_kit.sh (default out/gpu_kit)")
    p.add_argument("--no-kit", action="store_true", help="ignore the kit's bundles (pycuda sdist and wheels are still used)")
    p.add_argument("--samples", type=int, default=None, help="inputs (digits, repeated as needed; default 1024, dry run 160)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 48, dry run 24; at most the bundle's max batch)")
    p.add_argument("--in-flight", type=int, default=3, help="batches in flight in the pipeline (default 3)")
    p.add_argument("--thresholds", default="spread", help="'spread' (default: every exit takes a share), 'manifest', or K-1 floats")
    p.add_argument("--band", type=float, default=DEFAULT_BAND, help="confidence distance to a threshold within which fp32 "
                   "disagreements are listed rather than failed (default 1e-4)")
    p.add_argument("--precisions", default="fp32,fp16,int8", help="TensorRT bundles to build and check (default fp32,fp16,int8)")
    p.add_argument("--device-impl", default="all", choices=("all", "pycuda", "cuda-python"), help="device layers to check")
    p.add_argument("--install-pycuda", default="auto", choices=("auto", "never"), help="build pycuda from the kit's sdist when missing")
    p.add_argument("--pycuda-timeout", type=float, default=300.0, help="seconds allowed for building pycuda (default 300)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps of the tiny ViT (default 60, dry run 25)")
    p.add_argument("--max-batch", type=int, default=None, help="max batch of bundles compiled here (default 64, dry run 32)")
    p.add_argument("--exporter", default=None, choices=("auto", "dynamo", "torchscript"),
                   help="ONNX exporter for bundles compiled here (default auto; dry run torchscript, the faster one)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of each pipeline run (default 5, dry run 0)")
    p.add_argument("--engine-reps", type=int, default=20, help="timed runs of each stage engine (default 20)")
    p.add_argument("--copy-mib", type=int, default=None, help="MiB moved by the copy check (default 64, dry run 4)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads (default all cores, dry run 1)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds after which remaining checks are skipped (default 480)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work folder (bundles, engines)")
    p.add_argument("--prepare-kit", metavar="DIR", help="write the kit's checkpoint and bundles into DIR and exit (gpu_kit.sh)")
    a = p.parse_args(argv)
    dry = a.dry_run
    a.samples = a.samples or (160 if dry else 1024)
    a.batch = a.batch or (24 if dry else 48)
    a.train_steps = a.train_steps if a.train_steps is not None else (25 if dry else 60)
    a.max_batch = a.max_batch or (32 if dry else 64)
    a.exporter = a.exporter or ("torchscript" if dry else "auto")
    a.repeats = a.repeats if a.repeats is not None else (0 if dry else 5)
    a.copy_mib = a.copy_mib or (4 if dry else 64)
    a.threads = a.threads or (1 if dry else max(1, os.cpu_count() or 1))
    if a.samples < 1 or a.batch < 1 or a.in_flight < 1:
        p.error("--samples, --batch and --in-flight must be positive")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.dry_run or args.prepare_kit:
        # 2-core CI machines: one torch thread avoids oversubscription between torch and ONNX Runtime
        if available("torch"):
            require("torch").set_num_threads(1)
    if args.prepare_kit:
        return prepare_kit(args)
    out = os.path.abspath(args.out or default_out())
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dmpo-gpu-check-")
    site = os.path.join(tempfile.gettempdir(), f"dmpo-gpu-check-site-py{sys.version_info[0]}{sys.version_info[1]}")
    os.makedirs(site, exist_ok=True)
    add_site(site)  # pycuda / wheels built by an earlier run are reused
    report = Report(args.budget)
    cuda = probe_cuda()
    if not cuda["present"] and not args.dry_run:
        print("gpu check | no CUDA device visible (torch.cuda, pycuda and cuda-python see none). "
              "Run on a GPU machine, or use --dry-run for the CPU self-test", file=sys.stderr)
        return 2
    ctx = Ctx(args, report, work, site, cuda)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    env = environment(args, cuda)
    gpu = f"{cuda['gpu']} sm{cuda['sm']}" if cuda.get("gpu") else ("CUDA via the device layer" if cuda["present"] else "no GPU")
    report.add("environment", "environment", "-", INFO,
               f"{'DRY RUN (CPU), ' if args.dry_run else ''}{gpu}; torch {env['packages']['torch']}, TensorRT "
               f"{env.get('tensorrt') or '-'}, ORT {env['packages']['onnxruntime'] or env['packages']['onnxruntime-gpu'] or '-'}, "
               f"cuda-python {env['packages']['cuda-python'] or env['packages']['cuda-bindings'] or '-'}, "
               f"pycuda {env['packages']['pycuda'] or '-'}"
               + (f"; kit {env['kit']['bytes'] / 2**20:.1f} MiB" if env.get("kit") else "; no kit"), env)
    try:
        # ---- pycuda -------------------------------------------------------------------------------------
        if available("pycuda.driver"):
            report.add("pycuda", "pycuda", "-", INFO, f"pycuda {installed_version('pycuda')} imports")
        else:
            skip = (f"dry run: {pycuda_plan(args.kit)}" if args.dry_run else
                    "--install-pycuda never" if args.install_pycuda == "never" else None)
            report.run("pycuda", "pycuda from the kit sdist", "-", lambda: install_pycuda(args.kit, site, args.pycuda_timeout),
                       skip=skip)
        # ---- bundle and CPU reference ------------------------------------------------------------------
        res = report.run("bundle", "bundle", "-", lambda: resolve_bundle(ctx))
        if not res or not res.get("ok"):
            raise _Abort("no bundle to check")
        ctx.batch = min(args.batch, ctx.bundle.max_batch)
        res = report.run("cpu_reference", "CPU reference (all stages)", "ort/cpu", lambda: step_cpu_reference(ctx))
        if res is None or res.get("ok") is False:
            raise _Abort("no CPU reference")
        res = report.run("cpu_pipeline", "early-exit pipeline", "ort/cpu", lambda: step_cpu_pipeline(ctx))
        if res is None or ctx.cpu_pipe is None:
            raise _Abort("no CPU pipeline results")
        # ---- device layer --------------------------------------------------------------------------------
        impls = device_impls(ctx)
        if not impls:
            report.add("device_layer", "device layer", "-", FAIL, "neither pycuda nor cuda-python imports: the TensorRT "
                       "backend has no device layer. pip install cuda-python (or build pycuda)")
        for impl in impls:
            step_device_layer(ctx, impl)
        # ---- GPU pipeline through torch (the engines' stand-in) ------------------------------------------
        tb = f"torch/{ctx.torch_device}"
        skip = None
        if not available("torch"):
            skip = "torch is not installed"
        elif not args.dry_run and not cuda["torch_cuda"]:
            skip = "torch has no CUDA here"
        elif not ctx.checkpoint:
            skip = "no checkpoint for the bundle (pass --model)"
        report.run("torch_parity", "stage parity (all stages)", tb, lambda: step_torch_parity(ctx), skip=skip)
        for variant in ("default", "refill", "buckets", "buckets+refill"):
            report.run(f"torch_pipeline_{variant}", f"early-exit pipeline ({variant})", tb,
                       lambda variant=variant: step_torch_pipeline(ctx, variant), skip=skip)
        if "CUDAExecutionProvider" in (env.get("ort_providers") or []) and not args.dry_run:
            report.run("ort_cuda_pipeline", "early-exit pipeline", "ort/cuda", lambda: step_ort_cuda(ctx))
        # ---- TensorRT ------------------------------------------------------------------------------------
        lean_skip = (None if available("tensorrt_lean_bindings") or os.path.isdir(os.path.join(args.kit, "wheels")) else
                     "tensorrt_lean_bindings is not installed and there is no kit (pip install tensorrt-lean-cu13-libs "
                     "tensorrt-lean-cu13-bindings, or benchmarks/gpu_kit.sh)")
        report.run("trt_lean_runtime", "TensorRT lean runtime (kit wheels)", "trt-lean", lambda: step_lean_runtime(ctx),
                   skip=lean_skip)
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        trt_skip = ("dry run (no CUDA)" if args.dry_run and available("tensorrt") else
                    None if available("tensorrt") else "TensorRT is not installed")
        if trt_skip:
            for prec in precisions:
                report.add(f"trt_{prec}", f"TensorRT {prec}: engines, parity, pipeline, timing", "trt", SKIP, trt_skip)
        else:
            for prec in precisions:
                try:
                    step_trt(ctx, prec)
                except Exception as exc:
                    report.add(f"trt_{prec}", f"TensorRT {prec}", "trt", FAIL, one_line(exc),
                               {"traceback": traceback.format_exc(limit=8)})
    except _Abort as exc:
        report.add("aborted", "remaining checks", "-", SKIP, f"not run: {exc}")
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    summary = report.summary()
    doc = {
        "format": FORMAT, "version": 1, "dry_run": bool(args.dry_run), "started_utc": started,
        "seconds": round(report.elapsed(), 1), "summary": summary, "environment": env,
        "settings": {k: v for k, v in vars(args).items()}, "thresholds": ctx.thresholds, "band": args.band,
        "checks": report.checks, "table": [list(r) for r in report.rows], "extra": ctx.extra,
        "work_dir": work if args.keep_work else None,
    }
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(jsonable(doc), f, indent=2)
    table = report.table()
    with open(os.path.join(out, "gpu_check.txt"), "w") as f:
        f.write(table + "\n")
    print(f"results: {os.path.join(out, 'gpu_check.json')}\n")
    print(table)
    return 0 if summary["ok"] else 1


class _Abort(Exception):
    pass


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DmpoEdgeError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(2)