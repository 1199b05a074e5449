"""Build one TensorRT engine per stage on the target: ``dmpo-edge build BUNDLE``.

Parse ``stage_k.onnx`` (the precision is already in the graph: Q/DQ or casts), create a strongly typed network
where TensorRT has them, add the optimisation profiles derived in :mod:`dmpo_edge.compile.trt_settings`, cap the
workspace, share a persisted timing cache between the stages and builds, and write

    engines/<trt version>-<gpu>-sm<XY>-<precision>/stage_k.engine, timing.cache, engines.json

atomically (a temp folder renamed into place). Written against the TensorRT 10.x / 11.x Python API:
``Builder.create_network``, ``OnnxParser``, ``IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``,
``create_optimization_profile().set_shape``, ``create_timing_cache`` / ``set_timing_cache``,
``build_serialized_network``. tensorrt is imported lazily through :func:`dmpo_edge._lazy.require`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from .._lazy import available, require
from ..bundle import Bundle, replace_directory, sha256_file, write_json_atomic
from ..locking import swap_lock, writer_lock
from ..engines import read_engines_json
from ..errors import DmpoEdgeError
from .trt_settings import (
    DEFAULT_WORKSPACE_MIB, ENGINES_DIR, ENGINES_FORMAT, ENGINES_JSON, TIMING_CACHE, build_settings,
)

if TYPE_CHECKING:  # the TensorRT objects typed for mypy (tensorrt-stubs, tests/test_trt_api_conformance.py)
    import tensorrt

__all__ = ["tensorrt_ready", "gpu_info", "build_engines", "read_engines_json", "engines_record"]


def gpu_info(index: int = 0) -> dict:
    """``{"gpu": name, "sm": "87"}`` of CUDA device ``index`` via torch, cuda-python or pycuda (whichever imports)."""
    if available("torch"):
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > index:
            major, minor = torch.cuda.get_device_capability(index)
            return {"gpu": torch.cuda.get_device_name(index), "sm": f"{major}{minor}"}
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            cudart = None
    if cudart is not None:
        err, props = cudart.cudaGetDeviceProperties(index)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return {"gpu": name.split("\x00")[0], "sm": f"{props.major}{props.minor}"}
    if available("pycuda.driver"):
        import pycuda.driver as drv

        drv.init()
        dev = drv.Device(index)
        major, minor = dev.compute_capability()
        return {"gpu": dev.name(), "sm": f"{major}{minor}"}
    raise DmpoEdgeError("build", "no CUDA GPU found (torch.cuda, cuda-python and pycuda see none). Build on the target GPU")


def tensorrt_ready() -> tuple:
    """(True, "") when TensorRT imports and a CUDA GPU answers; else (False, why). Never raises."""
    if not available("tensorrt"):
        return False, "TensorRT is not installed"
    try:
        gpu_info()
    except Exception as exc:  # no driver, no device, broken CUDA: this is not a target
        return False, f"no usable CUDA GPU ({getattr(exc, 'message', exc)})"
    return True, ""


def _logger(trt, verbose: bool):
    return trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)


def _network_flags(trt, plan: dict) -> int:
    from packaging.version import Version

    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if Version(trt.__version__) < Version("10") and hasattr(creation, "EXPLICIT_BATCH"):
        flags |= 1 << int(creation.EXPLICIT_BATCH)  # 8.x/9.x default to implicit batch; 10 ignores it, 11 removed it
    if plan["strongly_typed"] and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return flags


def _parse(trt, builder: tensorrt.Builder, plan: dict, onnx_path: str, logger, k: int):
    network = builder.create_network(_network_flags(trt, plan))
    parser: tensorrt.OnnxParser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(onnx_path)
    if not ok:
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise DmpoEdgeError(f"build stage {k}", "TensorRT's ONNX parser rejects the graph: " + " | ".join(errs[:3]))
    return network, parser


def _config(trt, builder: tensorrt.Builder, settings: dict, k: int, cache_blob: bytes | None, log=None):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings["workspace_bytes"]))
    for flag in settings["plan"]["builder_flags"]:
        # only reached on TensorRT < 11 with weak typing (precision_plan never returns flags for 11)
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for prof in settings["profiles"][k]:
        opt_profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in prof.items():
            # trt.Dims explicitly: the stubs type these parameters as Dims (pybind also converts tuples)
            opt_profile.set_shape(name, trt.Dims(list(mn)), trt.Dims(list(opt)), trt.Dims(list(mx)))
        config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(cache_blob or b"")
    # False: the persisted cache was made by another TensorRT version or GPU (ignore_mismatch=False refuses it,
    # as it should: mismatched timings mislead the tactic choice). Start from an empty cache instead.
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        if cache_blob:
            (log or (lambda m: print(m, file=sys.stderr)))(
                f"build stage {k}: the saved timing cache does not match this TensorRT / GPU; starting a new one")
            cache = config.create_timing_cache(b"")
        if not cache_blob or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise DmpoEdgeError(f"build stage {k}", "TensorRT refused the timing cache (see its log above). "
                                "Delete the engines folder's timing.cache and build again")
    return config, cache


def engines_record(settings: dict, bundle: Bundle, engines: list, timing_cache: str | None) -> dict:
    return {
        "format": ENGINES_FORMAT, "version": 1, "device_key": settings["device_key"], "tensorrt": settings["tensorrt"],
        "gpu": settings["gpu"], "sm": settings["sm"], "precision": settings["precision"], "frontend": settings["frontend"],
        "cache_key": settings["cache_key"], "built_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"strongly_typed": settings["plan"]["strongly_typed"], "builder_flags": settings["plan"]["builder_flags"],
                     "plan_note": settings["plan"]["note"], "max_batch": settings["max_batch"], "buckets": settings["buckets"],
                     "workspace_bytes": settings["workspace_bytes"]},
        "timing_cache": timing_cache, "bundle_stage_sha256": [s["sha256"] for s in bundle.stages], "engines": engines,
    }


def _profiles_json(profiles: list) -> list:
    return [{name: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for name, v in p.items()} for p in profiles]


def build_engines(bundle_path: str, *args, **kwargs) -> str:
    """See :func:`_build_engines`; holds the bundle's writer lock throughout (a compile or calibrate of the same
    bundle is refused meanwhile; an outer compile that already holds it builds straight on)."""
    with writer_lock(bundle_path, f"build {bundle_path}", "build"):
        return _build_engines(bundle_path, *args, **kwargs)


def _build_engines(bundle_path: str, max_batch: int | None = None, buckets=(), workspace_mib: int = DEFAULT_WORKSPACE_MIB,
                  strongly_typed: bool | None = None, force: bool = False, frontend: str = "onnx", verbose: bool = False,
                  checkpoint: str | None = None, log=None) -> str:
    """Build every stage's engine for this GPU; returns the engines folder. Skips an up-to-date build unless ``force``."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    bundle = Bundle.load(bundle_path)
    trt = require("tensorrt", "building TensorRT engines")
    info = gpu_info()
    settings = build_settings(bundle.manifest, trt.__version__, info["gpu"], info["sm"], max_batch, buckets, workspace_mib,
                              strongly_typed, frontend)
    root = os.path.join(bundle.path, ENGINES_DIR)
    final = os.path.join(root, settings["device_key"])
    old = read_engines_json(final) if os.path.isdir(final) else None
    if old and old.get("cache_key") == settings["cache_key"] and not force:
        log(f"engines: up to date in {final} (pass --force to rebuild)")
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{settings['device_key']}.tmp-", dir=root)
    try:
        cache_src = os.path.join(final, TIMING_CACHE)
        cache_blob = None
        if os.path.isfile(cache_src):  # the previous build's timing cache makes a rebuild fast
            with open(cache_src, "rb") as f:
                cache_blob = f.read()
            want = (old or {}).get("timing_cache_sha256")
            if not want or hashlib.sha256(cache_blob).hexdigest() != want:  # unverified bytes never reach the builder
                log(f"engines: ignoring {cache_src} (no matching sha256 in {ENGINES_JSON}); timing from scratch")
                cache_blob = None
        if frontend == "torch-tensorrt":
            from .torchtrt import build_torch_tensorrt_engines

            engines = build_torch_tensorrt_engines(bundle, settings, tmp, checkpoint, log)
            timing_cache = None
        else:
            engines, cache_blob = _build_onnx(trt, bundle, settings, tmp, cache_blob, verbose, log)
            timing_cache = None
            if cache_blob:
                with open(os.path.join(tmp, TIMING_CACHE), "wb") as f:
                    f.write(cache_blob)
                timing_cache = TIMING_CACHE
        record = engines_record(settings, bundle, engines, timing_cache)
        if timing_cache:
            record["timing_cache_sha256"] = sha256_file(os.path.join(tmp, timing_cache))
        write_json_atomic(os.path.join(tmp, ENGINES_JSON), record)
        with swap_lock(bundle.path, shared=False, where=f"build {bundle.path}"):
            bundle.check_unchanged()  # engines built from graphs that another writer replaced are not installed
            replace_directory(tmp, final)  # atomic swap where the filesystem has one: a kill leaves old or new engines
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"engines: {len(bundle.stages)} stage engine(s) for {settings['device_key']} in {final}")
    return final


def _build_onnx(trt, bundle: Bundle, settings: dict, out_dir: str, cache_blob, verbose: bool, log):
    logger = _logger(trt, verbose)
    builder: tensorrt.Builder = trt.Builder(logger)
    engines = []
    it = range(bundle.num_stages)
    if available("tqdm"):
        from tqdm.auto import tqdm

        it = tqdm(it, desc="build", unit="stage", file=sys.stderr)
    for k in it:
        t0 = time.perf_counter()
        onnx_path = bundle.stage_path(k)  # the portable form (symmetric Q/DQ), never the CPU variant
        network, _parser = _parse(trt, builder, settings["plan"], onnx_path, logger, k)
        config, cache = _config(trt, builder, settings, k, cache_blob, log)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise DmpoEdgeError(
                f"build stage {k}", "TensorRT could not build the engine (see its log above; try --workspace-mib larger "
                "or --max-batch smaller)",
            )
        name = f"stage_{k}.engine"
        path = os.path.join(out_dir, name)
        with open(path, "wb") as f:
            f.write(memoryview(blob))
        cache_blob = bytes(memoryview(cache.serialize()))
        engines.append({"stage": k, "file": name, "sha256": sha256_file(path), "onnx_sha256": bundle.stages[k]["sha256"],
                        "profiles": _profiles_json(settings["profiles"][k]), "build_s": round(time.perf_counter() - t0, 2)})
    return engines, cache_blob
