"""``model.pt`` -> bundle: split, export, simplify, check parity, set precision, check ops, report, write.

One piece at over 500 lines on purpose: :func:`compile_model` is one transaction (one scratch folder, one progress
bar, one :func:`~dmpo_edge.bundle.atomic_directory`), and the precision plan below it (``_apply_precision``,
``_Downstream``, ``_int8``) steers that transaction's FP32 chains and scratch files between the modules that do the
graph work (export, fp16, int8, report). Should the plan grow further, it moves to a module of its own.

Python API::

    from dmpo_edge.compile import compile_bundle
    bundle = compile_bundle("out/model.pt", "out/bundle_int8", precision="int8", calib="digits:train")

Everything happens inside :func:`dmpo_edge.bundle.atomic_directory`: the bundle appears complete or not at all,
and an existing output is refused unless ``force``.
"""

from __future__ import annotations

import datetime as _dt
import errno
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from .._lazy import available, require
from ..bundle import REGROUP_KEEP_IDX, SCHEMA_VERSION, Bundle, atomic_directory, sha256_file, write_json_atomic
from ..errors import DmpoEdgeError
from ..locking import writer_lock
from ..policies import POLICIES
from ..preprocess import Preprocess
from .data import load_compile_data
from .export import DEFAULT_OPSET, check_model, export_stage, simplify
from .graph import (
    drop_output, ensure_node_names, exit_head_nodes, io_specs, is_second_order_head, load_model, opset_of, save_model,
)
from .onnxrun import HOST_KERNELS, SIMULATED_QDQ_NAME, run_chain
from .opcheck import check_tensorrt_ops
from .parity import PARITY_TOL, stage_parity
from .report import MAX_EXIT_DROP_POINTS, budget_error, loud_warnings, precision_report
from .stages import FEATURES, FEATURES_IN, split_stages

__all__ = ["compile_bundle", "compile_model", "check_finite_weights", "tool_versions", "PRECISIONS", "stage_flops"]

PRECISIONS = ("fp32", "fp16", "int8")
PARITY_IMAGES = 64
#: a stage whose INT8 form loses more than the budget (``max_exit_drop``) at its exit or a later one (held-out data,
#: the other stages FP32) is requantized with its most sensitive layers kept FP32, and the best form is kept; a
#: CPU-form candidate over the budget is not chosen when another keeps within it
INT8_DROP_POINTS = MAX_EXIT_DROP_POINTS
CPU_TIMING_BATCH = 32
CPU_DROP_POINTS = MAX_EXIT_DROP_POINTS


def tool_versions() -> dict:
    """Versions of the packages that shaped the graphs (recorded in the manifest's precision provenance)."""
    from importlib import metadata

    out = {}
    for mod, dist in (("torch", "torch"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("modelopt", "nvidia-modelopt"),
                      ("onnxsim", "onnxsim"), ("onnxslim", "onnxslim"), ("onnxconverter_common", "onnxconverter-common"),
                      ("dmpo_edge", "dmpo-edge")):
        try:
            out[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[mod] = None
    return out


def stage_flops(stage_modules: list, example) -> list:
    """Per-sample FLOPs of each stage module (trunk part + exit head), for models without recorded metrics."""
    torch = require("torch", "counting FLOPs")
    from torch.utils.flop_counter import FlopCounterMode

    flops = []
    x = example[:1]
    with torch.no_grad():
        for k, mod in enumerate(stage_modules):
            args = (x,) if k == 0 else (x, torch.zeros(1, dtype=torch.int32))
            with FlopCounterMode(display=False) as counter:
                outs = mod(*args)
            flops.append(float(counter.get_total_flops()))
            if k < len(stage_modules) - 1:
                x = outs[0]
    return flops


def _progress(total: int, enabled: bool):
    if enabled and available("tqdm"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="compile", unit="step", file=sys.stderr, leave=True, dynamic_ncols=True)

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    return _Null()


def _check_args(precision, exit_policy, max_batch, calib_count, out_dir, force, max_exit_drop=MAX_EXIT_DROP_POINTS):
    if precision not in PRECISIONS:
        raise DmpoEdgeError("compile", f"unknown precision '{precision}'. Expected one of {', '.join(PRECISIONS)}")
    if exit_policy not in POLICIES:
        raise DmpoEdgeError("compile", f"unknown exit policy '{exit_policy}'. Expected one of {', '.join(POLICIES)}")
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not 1 <= max_batch <= 1 << 16:
        raise DmpoEdgeError("compile", f"--max-batch {max_batch!r} must be an integer in 1..65536")
    if not isinstance(calib_count, int) or calib_count < 1:
        raise DmpoEdgeError("compile", f"--calib-count {calib_count!r} must be a positive integer")
    if (isinstance(max_exit_drop, bool) or not isinstance(max_exit_drop, (int, float))
            or not 0.0 <= float(max_exit_drop) <= 100.0):
        raise DmpoEdgeError("compile", f"--max-exit-drop {max_exit_drop!r} must be a number of accuracy points in 0..100")
    if os.path.exists(out_dir) and not force:
        raise DmpoEdgeError("compile", f"output '{os.path.abspath(out_dir)}' already exists. Pass --force to replace it or choose another -o")


def _random_images(pre: Preprocess, n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    h, w = pre.size
    return pre([rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for _ in range(n)])


def _stage_inputs(chain_out: list, k: int, x: np.ndarray) -> dict:
    """Stage k's feeds on a dataset, from an FP32 chain run (keep_idx = arange: every row survives)."""
    if k == 0:
        return {"input": x}
    feats = chain_out[k]["input"]
    return {FEATURES_IN: feats, "keep_idx": np.arange(feats.shape[0], dtype=np.int32)}


def compile_model(model, meta: dict, out_dir: str, *args, **kwargs) -> Bundle:
    """Compile an in-memory :class:`EarlyExitModel` with its checkpoint ``meta`` into a bundle at ``out_dir``
    (options: :func:`_compile_model`). Holds the output's writer lock throughout, so a second ``compile`` or a
    ``calibrate`` of the same bundle is refused until it is done; a full disk is one clear error."""
    with writer_lock(out_dir, "compile", "compile"):
        try:
            return _compile_model(model, meta, out_dir, *args, **kwargs)
        except OSError as exc:
            what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            name = f" writing '{exc.filename}'" if exc.filename else ""
            raise DmpoEdgeError("compile", f"{what}{name}. Nothing was replaced: free space (or fix the folder) "
                                "and compile again") from None


def check_finite_weights(model) -> None:
    """NaN / Inf weights make every output NaN, and NaN compares false: parity would read 0.0 error. Refuse them."""
    torch = require("torch", "compiling a model")
    for name, t in list(model.state_dict().items()):
        if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise DmpoEdgeError("compile", f"weight '{name}' has {bad} NaN/Inf value(s) of {t.numel()}. The "
                                    "checkpoint is damaged or training diverged; retrain or pick an earlier checkpoint")


def _compile_model(model, meta: dict, out_dir: str, precision: str = "fp32", calib: str | None = None, calib_count: int = 256,
                  holdout: str | None = None, max_batch: int = 64, exit_policy: str = "max_softmax", force: bool = False,
                  opset: int = DEFAULT_OPSET, exporter: str = "auto", calib_method: str = "entropy", fp16_tool: str = "auto",
                  int8_tool: str = "auto", cpu_format: str = "auto", parity_tol: float = PARITY_TOL, build: str = "auto",
                  name: str | None = None, source: dict | None = None, progress: bool = True, build_options: dict | None = None,
                  holdout_count: int = 1000, log=None, max_exit_drop: float = MAX_EXIT_DROP_POINTS,
                   accept_drop: bool = False, sensitivity: bool | None = None) -> Bundle:
    """The work of :func:`compile_model`, under its writer lock.

    ``max_exit_drop``: accuracy points an FP16/INT8 form may lose at any exit (held-out data; the TensorRT form
    judged as TensorRT computes it, the CPU form with this host's kernels); a miss raises :class:`DmpoEdgeError`
    and writes nothing, unless ``accept_drop``. ``sensitivity``: write the INT8 layer-wise sensitivity report
    always (True), never (False), or when an accepted INT8 bundle misses the budget (None, the default).
    """
    t_start = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    _check_args(precision, exit_policy, max_batch, calib_count, out_dir, force, max_exit_drop)
    max_exit_drop = float(max_exit_drop)
    torch = require("torch", "compiling a model")
    check_finite_weights(model)
    K = int(model.num_stages)
    classes = [str(c) for c in meta.get("classes") or []]
    cfg = dict(meta.get("config") or getattr(model, "config", {}) or {})
    num_classes = int(cfg.get("num_classes") or len(classes))
    if not classes:
        classes = [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise DmpoEdgeError("compile", f"the checkpoint lists {len(classes)} classes for a model with {num_classes} outputs")
    pre = Preprocess.from_dict(meta.get("preprocess") or {})
    data = load_compile_data(pre, classes, calib, calib_count, holdout, need_calib=precision == "int8",
                             holdout_count=holdout_count)
    timings = {}

    steps = 2 * K + 3 + (1 if precision == "int8" else 0)  # export, parity, precision, cpu form, report, write
    bar = _progress(steps, progress)
    scratch = tempfile.mkdtemp(prefix="dmpo-compile-")
    try:
        with atomic_directory(out_dir, force=force, where="compile") as bundle_dir:
            # ---- split + export + simplify ------------------------------------------------------------
            t0 = time.perf_counter()
            model.eval()
            if callable(getattr(model, "merged", None)):
                # LoRA folded into plain layers: identical outputs, fewer nodes for the quantizer and TensorRT
                model = model.merged()
            modules = split_stages(model, exit_policy, probe=True)
            parity_x = (data.holdout_x if data.holdout_x is not None else data.calib_x)
            parity_src = (data.holdout_info or data.calib_info or {}).get("source", "random images")
            if parity_x is None:
                parity_x = _random_images(pre, PARITY_IMAGES)
            parity_x = parity_x[:PARITY_IMAGES]
            fp32_dir = os.path.join(scratch, "fp32")
            os.makedirs(fp32_dir)
            fp32_paths, heads, exporters, simplifiers = [], [], [], []
            x_t = torch.from_numpy(parity_x[: min(4, len(parity_x))])
            feats = None
            for k, mod in enumerate(modules):
                bar.set_postfix_str(f"export stage {k}")
                if k == 0:
                    args = (x_t,)
                else:
                    args = (feats, torch.tensor(np.arange(feats.shape[0] - 1, -1, -1), dtype=torch.int32))
                with torch.no_grad():
                    outs = mod(*args)
                path = os.path.join(fp32_dir, f"stage_{k}.onnx")
                exporters.append(export_stage(mod, args, path, opset=opset, exporter=exporter))
                simplifiers.append(simplify(path))
                m = ensure_node_names(load_model(path))  # the precision tools select nodes by name
                head = exit_head_nodes(m, mod.io.trunk_output)
                heads.append({"nodes": sorted(head), "second_order": is_second_order_head(m, head)})
                if mod.io.last:
                    drop_output(m, mod.io.trunk_output)
                check_model(m, where=f"stage {k}")
                save_model(m, path)
                fp32_paths.append(path)
                feats = outs[0]
                bar.update()
            timings["export_s"] = time.perf_counter() - t0

            # ---- parity with torch ----------------------------------------------------------------------
            t0 = time.perf_counter()
            bar.set_postfix_str("parity")
            parity = stage_parity(modules, fp32_paths, parity_x, tol=parity_tol)
            parity["inputs"] = parity_src
            bar.update()
            timings["parity_s"] = time.perf_counter() - t0

            # ---- FP32 chain on calibration and held-out data ---------------------------------------------
            t0 = time.perf_counter()
            calib_chain = run_chain(fp32_paths, data.calib_x, collect_inputs=True) if data.calib_x is not None else None
            hold_chain = run_chain(fp32_paths, data.holdout_x, collect_inputs=True) if data.holdout_x is not None else None
            timings["fp32_chain_s"] = time.perf_counter() - t0

            # ---- precision -------------------------------------------------------------------------------
            t0 = time.perf_counter()
            stage_files, cpu_files, prec = _apply_precision(
                precision, K, fp32_paths, heads, scratch, calib_chain, hold_chain, data, opset, calib_method,
                fp16_tool, int8_tool, cpu_format, bar, max_exit_drop,
            )
            timings["precision_s"] = time.perf_counter() - t0

            # ---- TensorRT op check -----------------------------------------------------------------------
            bar.set_postfix_str("TensorRT op check")
            for k, p in enumerate(stage_files):
                check_tensorrt_ops(load_model(p), k, what=f"{precision} stage graph")

            # ---- precision report ------------------------------------------------------------------------
            t0 = time.perf_counter()
            bar.set_postfix_str("accuracy report")
            reports = {"parity": "reports/parity.json"}
            prec_report = None
            if precision != "fp32" and hold_chain is not None:
                # the TensorRT form as TensorRT computes it; the CPU form with the kernels that will run it
                variants = {precision: run_chain(stage_files, data.holdout_x, simulate_qdq=precision == "int8")}
                references = {precision: SIMULATED_QDQ_NAME if precision == "int8" else "onnxruntime CPU"}
                if cpu_files:
                    variants[f"{precision}-cpu"] = run_chain(cpu_files, data.holdout_x)
                    references[f"{precision}-cpu"] = f"{HOST_KERNELS} ({prec['cpu_variant']['target_isa']['isa']})"
                prec_report = precision_report(hold_chain, variants, data.holdout_y, data.holdout_info, references,
                                               max_exit_drop)
                reports["precision"] = "reports/precision.json"
                if prec_report["misses"] and not accept_drop:
                    raise budget_error(prec_report, precision)
                prec["budget"] = {"max_exit_drop_points": max_exit_drop, "ok": prec_report["ok"],
                                  "accepted_misses": prec_report["misses"]}
                if precision == "int8" and (sensitivity or (sensitivity is None and prec_report["misses"])):
                    bar.set_postfix_str("int8 sensitivity")
                    t_sens = time.perf_counter()
                    sens = _sensitivity(fp32_paths, stage_files, cpu_files, prec, prec_report, hold_chain, data, scratch,
                                        max_exit_drop, "asked for (--sensitivity)" if sensitivity else
                                        "the INT8 bundle misses its accuracy budget (accepted with --accept-drop)")
                    os.makedirs(os.path.join(bundle_dir, "reports"), exist_ok=True)
                    write_json_atomic(os.path.join(bundle_dir, "reports", "sensitivity.json"), sens)
                    reports["sensitivity"] = "reports/sensitivity.json"
                    timings["sensitivity_s"] = time.perf_counter() - t_sens
            elif precision != "fp32":
                prec["budget"] = {"max_exit_drop_points": max_exit_drop, "ok": None,
                                  "why": "not checked: no held-out data"}
                log(f"precision budget not checked: no held-out data (pass --holdout) for the {precision} accuracy report")
            bar.update()
            timings["report_s"] = time.perf_counter() - t0

            # ---- write the bundle ------------------------------------------------------------------------
            bar.set_postfix_str("write bundle")
            flops = _flops(meta, modules, parity_x, K)
            os.makedirs(os.path.join(bundle_dir, "reports"), exist_ok=True)
            stages = []
            cum = 0.0
            for k in range(K):
                fname = f"stage_{k}.onnx"
                shutil.copyfile(stage_files[k], os.path.join(bundle_dir, fname))
                ins, outs_ = io_specs(load_model(stage_files[k]))
                cum += flops[k]
                entry = {"index": k, "file": fname, "sha256": sha256_file(os.path.join(bundle_dir, fname)),
                         "inputs": ins, "outputs": outs_, "flops": float(flops[k]),
                         "cumulative_flops": float(meta_cum(meta, k, cum))}
                entry["opset"] = opset_of(load_model(stage_files[k]))
                if cpu_files:
                    cname = f"stage_{k}.cpu.onnx"
                    shutil.copyfile(cpu_files[k], os.path.join(bundle_dir, cname))
                    fmt = prec["cpu_variant"]["per_stage"][k]["format"]
                    entry["variants"] = {"cpu": {"file": cname, "sha256": sha256_file(os.path.join(bundle_dir, cname)),
                                                 "format": fmt}}
                stages.append(entry)
            prec.update({
                "exporter": sorted(set(exporters)), "simplifier": sorted(set(simplifiers)), "opset": opset,
                "tools": tool_versions(),
            })
            manifest = {
                "format": "dmpo-edge-bundle", "schema_version": SCHEMA_VERSION,
                "model": {"name": name or cfg.get("name") or cfg.get("backbone") or "model", "backbone": cfg.get("backbone"),
                          "classes": classes, "num_classes": num_classes, "config": cfg, "source": source or {}},
                "preprocess": pre.to_dict(), "precision": prec, "regroup": REGROUP_KEEP_IDX, "max_batch": int(max_batch),
                "exit_policy": exit_policy, "stages": stages, "thresholds": None,
                "metrics": dict(meta.get("metrics") or {}), "reports": reports,
                "created": {"utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            "compile_s": None},
            }
            write_json_atomic(os.path.join(bundle_dir, "reports", "parity.json"), parity)
            if prec_report is not None:
                write_json_atomic(os.path.join(bundle_dir, "reports", "precision.json"), prec_report)
            timings["total_s"] = time.perf_counter() - t_start
            manifest["created"]["compile_s"] = round(timings["total_s"], 2)
            manifest["created"]["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
            write_json_atomic(os.path.join(bundle_dir, "manifest.json"), manifest)
            Bundle.load(bundle_dir)  # the bundle must verify before it replaces anything
            bar.update()
    finally:
        bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    for line in loud_warnings(prec_report or {}):
        log(line)
    bundle = Bundle.load(out_dir)
    _maybe_build(bundle, build, build_options or {}, log)
    return bundle


def meta_cum(meta: dict, k: int, running: float) -> float:
    """Cumulative FLOPs to exit k: the checkpoint's record when it has one, else the running sum."""
    cum = (meta.get("metrics") or {}).get("cumulative_flops")
    if isinstance(cum, list) and len(cum) > k and isinstance(cum[k], (int, float)):
        return float(cum[k])
    return running


def _flops(meta: dict, modules, x, K) -> list:
    m = meta.get("metrics") or {}
    sf = m.get("stage_flops")
    if isinstance(sf, list) and len(sf) == K and all(isinstance(v, (int, float)) for v in sf):
        return [float(v) for v in sf]
    torch = require("torch", "counting FLOPs")
    return stage_flops(modules, torch.from_numpy(x[:1]))


def _apply_precision(precision, K, fp32_paths, heads, scratch, calib_chain, hold_chain, data, opset, calib_method,
                     fp16_tool, int8_tool, cpu_format, bar, max_exit_drop=MAX_EXIT_DROP_POINTS):
    """Per-stage precision conversion; returns (stage files, cpu variant files or None, precision record)."""
    if precision == "fp32":
        for _ in range(K):
            bar.update()
        return list(fp32_paths), None, {"mode": "fp32", "method": "FP32 graphs as exported (no conversion)"}
    if precision == "fp16":
        from .fp16 import convert_fp16
        from .int8 import batched_feeds

        out_dir = os.path.join(scratch, "fp16")
        os.makedirs(out_dir)
        paths, per_stage = [], []
        chain = calib_chain or hold_chain
        x = data.calib_x if calib_chain is not None else data.holdout_x
        for k in range(K):
            bar.set_postfix_str(f"fp16 stage {k}")
            feeds = []
            if chain is not None:
                feeds = batched_feeds({n: v[:128] for n, v in _stage_inputs(chain, k, x).items()}, 32)
            dst = os.path.join(out_dir, f"stage_{k}.onnx")
            last = k == K - 1
            rec = convert_fp16(fp32_paths[k], dst, heads[k]["nodes"], heads[k]["second_order"], feeds,
                               features_in=FEATURES_IN if k > 0 else None, features_out=None if last else FEATURES,
                               opset=opset, tool=fp16_tool)
            check_model(dst, where=f"fp16 stage {k}")
            rec["stage"] = k
            per_stage.append(rec)
            paths.append(dst)
            bar.update()
        tools = sorted({r["tool"] for r in per_stage})
        return paths, None, {
            "mode": "fp16", "method": "mixed precision with explicit casts (strongly typed); exit scores and "
            "second-order exit heads in FP32; features between stages in FP16",
            "tool": tools[0] if len(tools) == 1 else tools, "per_stage": per_stage,
            "calibration": data.calib_info, "holdout": data.holdout_info,
        }
    return _int8(K, fp32_paths, heads, scratch, calib_chain, hold_chain, data, calib_method, int8_tool, cpu_format, bar,
                 max_exit_drop)


class _Downstream:
    """Scores a candidate graph for stage k in place: stage k replaced, stages after it FP32, on held-out data.

    The score is the worst accuracy loss (points) over exits k..K-1 against the FP32 chain (1 - agreement when
    the held-out data has no labels): a stage's error also reaches every later exit through its features.
    ``simulate_qdq``: run the candidate as TensorRT computes it (the TensorRT form); else with this host's
    integer kernels (the CPU form).
    """

    def __init__(self, fp32_paths, hold_chain, x, labels):
        from .onnxrun import session

        self.fp32 = [session(p) for p in fp32_paths]
        self.chain, self.x, self.y = hold_chain, x, labels
        self.ref_acc = None if labels is None else [
            float((np.asarray(c["prediction"]).astype(np.int64) == labels).mean()) for c in hold_chain]

    def __call__(self, k: int, path: str, simulate_qdq: bool = False) -> dict:
        from .int8 import batched_feeds
        from .onnxrun import input_feeds, session

        sessions = [session(path, simulate_qdq=simulate_qdq)] + self.fp32[k + 1:]
        preds = [[] for _ in sessions]
        for f in batched_feeds(_stage_inputs(self.chain, k, self.x), 64):
            feeds = f
            for j, sess in enumerate(sessions):
                out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
                preds[j].append(out["prediction"])
                if "features" in out:
                    feeds = input_feeds(self.fp32[k + j + 1], k + j + 1, out["features"]) if k + j + 1 < len(self.fp32) else None
        drops, accs = [], []
        for j, p in enumerate(preds):
            p = np.concatenate(p).astype(np.int64)
            agree = float((p == np.asarray(self.chain[k + j]["prediction"])).mean())
            if self.y is not None:
                acc = float((p == self.y).mean())
                accs.append(acc)
                drops.append(100.0 * (self.ref_acc[k + j] - acc))
            else:
                drops.append(100.0 * (1.0 - agree))
        return {"drop_points": max(drops), "exit_accuracy": accs or None, "stage_exit_drop_points": drops[0],
                "exit_drop_points": drops}


def _int8(K, fp32_paths, heads, scratch, calib_chain, hold_chain, data, calib_method, int8_tool, cpu_format, bar,
          max_exit_drop=MAX_EXIT_DROP_POINTS):
    from ..cpu_isa import detect
    from .int8 import (
        CPU_FORMATS, CPU_WEIGHT_SCHEMES, batched_feeds, cpu_weight_schemes, image_layer_nodes, quantize_cpu_form,
        quantize_tensorrt_form, time_sessions,
    )

    out_dir = os.path.join(scratch, "int8")
    os.makedirs(out_dir)
    score = _Downstream(fp32_paths, hold_chain, data.holdout_x, data.holdout_y) if hold_chain is not None else None
    stems = [image_layer_nodes(load_model(fp32_paths[0]))] + [[] for _ in range(K - 1)]
    paths, per_stage = [], []
    excludes = []
    for k in range(K):
        bar.set_postfix_str(f"int8 stage {k}")
        feeds = batched_feeds(_stage_inputs(calib_chain, k, data.calib_x), 32)
        # What may stay FP32 when INT8 costs accuracy, tried in this order (fewest FP32 layers first): the
        # second-order exit head (covariance / square root), the layer that reads the image, both.
        options = [("none", [])]
        if heads[k]["second_order"]:
            options.append(("exit head", list(heads[k]["nodes"])))
        if stems[k]:
            options.append(("image layer", list(stems[k])))
            if heads[k]["second_order"]:
                options.append(("image layer + exit head", list(stems[k]) + list(heads[k]["nodes"])))
        rec = {"stage": k, "second_order_head": heads[k]["second_order"], "candidates": {}}
        best = None
        tool = int8_tool
        for i, (label, exclude) in enumerate(options):
            dst = os.path.join(out_dir, f"stage_{k}.{i}.onnx")
            tool = quantize_tensorrt_form(fp32_paths[k], dst, feeds, exclude, calib_method, tool)
            if score is None:
                best = (label, exclude, dst, None)
                break
            res = score(k, dst, simulate_qdq=True)
            rec["candidates"][label] = res
            if best is None or res["drop_points"] < best[3]["drop_points"] - 1e-9:
                best = (label, exclude, dst, res)
            if best[3]["drop_points"] <= max_exit_drop:
                break
        label, exclude, dst, _ = best
        rec.update({"tool": tool, "kept_fp32": label, "fp32_nodes": len(exclude),
                    "head": "fp32" if "exit head" in label else "int8"})
        excludes.append(exclude)
        per_stage.append(rec)
        paths.append(dst)
        bar.update()

    # ---- the ONNX Runtime CPU form: U8 activations; weights as this CPU's kernels take them without saturating
    # (int8.cpu_weight_schemes). Per stage QDQ or QOperator x weight scheme: the fastest one that stays within the
    # budget (stage k replaced, later stages FP32, held-out data), measured here with this host's kernels.
    formats = list(CPU_FORMATS) if cpu_format == "auto" else [cpu_format]
    if any(f not in CPU_FORMATS for f in formats):
        raise DmpoEdgeError("int8", f"unknown --cpu-format '{cpu_format}'. Expected auto, QDQ or QOperator")
    cpu_files, cpu_stages = [], []
    host_isa = detect()
    schemes = cpu_weight_schemes(host_isa)
    for k in range(K):
        bar.set_postfix_str(f"int8 cpu form stage {k}")
        feeds = batched_feeds(_stage_inputs(calib_chain, k, data.calib_x), 32)
        timing_feeds = batched_feeds(_stage_inputs(calib_chain, k, data.calib_x), CPU_TIMING_BATCH)[0]
        keep_fp32 = sorted(set(excludes[k]) | set(stems[k]))
        made, rec = {}, {"stage": k, "fp32_nodes": len(keep_fp32), "candidates": {}}
        # candidates "FORMAT:WEIGHTS", e.g. "QDQ:u8": the formats asked for x the weight schemes this CPU can run
        # without saturating (one scheme on VNNI / Arm, two on x86 without VNNI)
        for fmt in formats:
            for w in schemes:
                key = f"{fmt}:{w}"
                dst = os.path.join(scratch, "int8", f"stage_{k}.{fmt}.{w}.cpu.onnx")
                try:
                    quantize_cpu_form(fp32_paths[k], dst, feeds, keep_fp32, fmt, calib_method, w)
                    made[key] = dst
                except Exception as exc:  # a form ORT cannot produce for this graph is skipped; another may work
                    rec["candidates"][key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        ms = time_sessions({**made, "fp32": fp32_paths[k], "tensorrt_form": paths[k]}, timing_feeds)
        rec["fp32_ms"] = round(ms["fp32"], 3)
        rec["tensorrt_form_ms"] = round(ms["tensorrt_form"], 3)
        for fmt, dst in made.items():
            c = {"ms": round(ms[fmt], 3)}
            if score is not None:
                c.update(score(k, dst))
            rec["candidates"][fmt] = c
        ok = {f: c for f, c in rec["candidates"].items() if "ms" in c and c.get("drop_points", 0.0) <= max_exit_drop}
        if ok:
            chosen = min(ok, key=lambda f: ok[f]["ms"])
        elif made:
            chosen = min(made, key=lambda f: rec["candidates"][f].get("drop_points", 0.0))
        else:
            chosen = None
        rec["choice"] = chosen or "tensorrt_form"
        rec["format"], _, rec["weights"] = (chosen or "tensorrt_form").partition(":")
        cpu_files.append(made[chosen] if chosen else paths[k])
        cpu_stages.append(rec)
    bar.update()
    formats_used = sorted({r["format"] for r in cpu_stages})
    totals = {"fp32": sum(r["fp32_ms"] for r in cpu_stages),
              "cpu_variant": sum(r["candidates"].get(r["choice"], {}).get("ms", r["tensorrt_form_ms"]) for r in cpu_stages),
              "tensorrt_form": sum(r["tensorrt_form_ms"] for r in cpu_stages)}
    used = sorted({r["weights"] for r in cpu_stages if r["weights"]})
    cpu_record = {"format": formats_used[0] if len(formats_used) == 1 else formats_used,
                  "activations": "uint8 asymmetric (per tensor)",
                  "weights": "; ".join(f"{w}: {CPU_WEIGHT_SCHEMES[w]}" for w in used),
                  "weight_scheme": used[0] if len(used) == 1 else used, "weight_schemes_tried": list(schemes),
                  "target_isa": dict(host_isa), "measured_with": HOST_KERNELS,
                  "fp32_layers": "the layer that reads the image, and whatever the TensorRT form kept in FP32",
                  "tool": "onnxruntime.quantization.quantize_static", "timing_batch": CPU_TIMING_BATCH,
                  "timings_ms": {k: round(v, 3) for k, v in totals.items()}, "per_stage": cpu_stages}
    tools = sorted({r["tool"] for r in per_stage})
    return paths, cpu_files, {
        "mode": "int8",
        "method": "explicit Q/DQ: symmetric INT8 activations (per tensor) and weights (per channel), calibrated on the "
                  "target dataset; stage k calibrated on stage k-1's FP32 features",
        "tool": tools[0] if len(tools) == 1 else tools,
        "calibration": dict(data.calib_info, method=calib_method), "holdout": data.holdout_info,
        "per_stage": per_stage,
        "cpu_variant": cpu_record,
    }


def _sensitivity(fp32_paths, stage_files, cpu_files, prec, report, hold_chain, data, scratch, budget, why) -> dict:
    """Layer-wise sensitivity of the TensorRT form (faithful reference) and, where it misses the budget or was
    asked for, of the CPU form's QDQ stages (this host's kernels; QOperator stages cannot be taken apart)."""
    from .sensitivity import sensitivity_report, stage_sensitivity

    score = _Downstream(fp32_paths, hold_chain, data.holdout_x, data.holdout_y)
    K = len(fp32_paths)
    forms = {"int8": {"measured_with": SIMULATED_QDQ_NAME, "stages": [
        stage_sensitivity(k, fp32_paths[k], stage_files[k], score, scratch, simulate_qdq=True) for k in range(K)]}}
    if cpu_files:
        fmts = [r["format"] for r in prec["cpu_variant"]["per_stage"]]
        forms["int8-cpu"] = {"measured_with": report["measured_with"].get("int8-cpu", HOST_KERNELS), "stages": [
            stage_sensitivity(k, fp32_paths[k], cpu_files[k], score, scratch, simulate_qdq=False) if fmts[k] == "QDQ"
            else [] for k in range(K)]}
    return sensitivity_report(forms, data.holdout_info, budget, why)


def _maybe_build(bundle: Bundle, build: str, options: dict, log) -> None:
    """Build TensorRT engines now when this machine is a target (TensorRT + GPU); else say where it happens."""
    if build == "never":
        return
    from .trt_builder import tensorrt_ready

    ready, why = tensorrt_ready()
    if ready:
        from .trt_builder import build_engines

        build_engines(bundle.path, log=log, **options)
        return
    if build == "always":
        raise DmpoEdgeError("build", f"cannot build TensorRT engines here ({why}). Run 'dmpo-edge build {bundle.path}' on the target")
    log(f"engines: none built here ({why}); build them on the target with `dmpo-edge build {bundle.path}`")


def compile_bundle(checkpoint_path: str, out_dir: str, precision: str = "fp32", calib: str | None = None,
                   calib_count: int = 256, holdout: str | None = None, max_batch: int = 64,
                   exit_policy: str = "max_softmax", force: bool = False, allow_pickle: bool = False, **kwargs) -> Bundle:
    """``model.pt`` -> verified :class:`Bundle` at ``out_dir`` (see :func:`compile_model` for the options)."""
    _check_args(precision, exit_policy, max_batch, calib_count, out_dir, force,
                kwargs.get("max_exit_drop", MAX_EXIT_DROP_POINTS))
    from ..models import load_checkpoint

    model, meta = load_checkpoint(checkpoint_path, allow_pickle=allow_pickle)
    source = {"file": os.path.basename(str(checkpoint_path)), "sha256": sha256_file(str(checkpoint_path))}
    kwargs.setdefault("name", os.path.splitext(os.path.basename(str(checkpoint_path)))[0])
    return compile_model(model, meta, out_dir, precision=precision, calib=calib, calib_count=calib_count, holdout=holdout,
                         max_batch=max_batch, exit_policy=exit_policy, force=force, source=source, **kwargs)
