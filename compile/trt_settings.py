"""What the TensorRT builder is asked to do, derived as plain data from the manifest (tested on the CPU).

- :func:`device_key`: ``<trt version>-<gpu name>-sm<XY>-<precision>``, the engines folder name (the runtime's
  ``find_engines`` uses the same formula; a test keeps the two equal).
- :func:`precision_plan`: strongly typed networks where the TensorRT version has them (precision lives in the
  ONNX: Q/DQ and casts); the legacy FP16/INT8 builder flags only on 10.x when strong typing is turned off, never
  on 11 (removed there), and on pre-10 versions that lack strong typing.
- :func:`stage_profiles`: one optimisation profile per stage: min 1, opt at the expected survivor count of the
  stage (from the thresholds' expected exit distribution, else max_batch), max ``max_batch``; for stage k > 0
  both ``features_in`` (batch_in) and ``keep_idx`` (batch). Optional bucket profiles.
- :func:`cache_key`: a digest of everything that makes an engine, so ``dmpo-edge build`` can skip a rebuild.
"""

from __future__ import annotations

import hashlib
import json

from packaging.version import Version

from ..engines import ENGINES_DIR, ENGINES_FORMAT, ENGINES_JSON, TIMING_CACHE, device_key, slug, sm_text
from ..errors import DmpoEdgeError

__all__ = [
    "device_key", "slug", "sm_text", "precision_plan", "expected_stage_batches", "stage_profiles", "cache_key", "parse_buckets",
    "DEFAULT_WORKSPACE_MIB", "BuildSettings", "build_settings", "ENGINES_DIR", "ENGINES_JSON", "TIMING_CACHE",
    "ENGINES_FORMAT",
]

#: 1 GiB of builder workspace: leaves room on an 8 GB Jetson (memory is shared with the CPU) for the runtime
DEFAULT_WORKSPACE_MIB = 1024


def _version(v) -> Version:
    try:
        return Version(str(v))
    except Exception:
        raise DmpoEdgeError("tensorrt", f"cannot read the TensorRT version {v!r}") from None


def precision_plan(trt_version: str, precision: str, strongly_typed: bool | None = None) -> dict:
    """``{"strongly_typed": bool, "builder_flags": [...], "note": str}`` for this TensorRT and bundle precision.

    ``strongly_typed=None`` means "whenever supported". TensorRT 11 is always strongly typed (its flag is kept
    only for API compatibility) and has no FP16/INT8 builder flags.
    """
    v = _version(trt_version)
    if precision not in ("fp32", "fp16", "int8"):
        raise DmpoEdgeError("tensorrt", f"unknown precision '{precision}'. Expected fp32, fp16 or int8")
    legacy = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]
    if v >= Version("11"):
        if strongly_typed is False:
            raise DmpoEdgeError(
                "tensorrt", f"TensorRT {trt_version} is always strongly typed; weak typing and the FP16/INT8 builder "
                "flags were removed. Drop --weakly-typed",
            )
        # the flag still exists (ignored) in 11.x; setting it keeps one code path
        return {"strongly_typed": True, "builder_flags": [], "note": "TensorRT >= 11: strongly typed by default"}
    if v >= Version("10") or (v >= Version("9") and strongly_typed is not False):
        if strongly_typed is False:
            return {"strongly_typed": False, "builder_flags": legacy,
                    "note": "TensorRT 10.x weakly typed on request: deprecated FP16/INT8 builder flags"}
        return {"strongly_typed": True, "builder_flags": [], "note": "strongly typed: precision from the ONNX casts and Q/DQ"}
    # TensorRT 8.x has no strongly typed networks: explicit Q/DQ still needs the INT8 flag, FP16 casts the FP16 flag
    return {"strongly_typed": False, "builder_flags": legacy, "note": f"TensorRT {trt_version} predates strong typing"}


def parse_buckets(text) -> list:
    """``"1,8,32"`` -> [1, 8, 32] (sorted, unique, positive)."""
    if text is None or text == "" or text == []:
        return []
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        vals = sorted({int(str(b).strip()) for b in items if str(b).strip()})
    except ValueError:
        raise DmpoEdgeError("buckets", f"--buckets {text!r} must be comma-separated integers, e.g. 1,8,32") from None
    if any(b < 1 for b in vals):
        raise DmpoEdgeError("buckets", f"--buckets {text!r} must be positive batch sizes")
    return vals


def expected_stage_batches(manifest: dict, max_batch: int | None = None) -> list:
    """Expected batch at each stage when ``max_batch`` samples enter stage 0.

    From ``thresholds.expected_exit_distribution`` (K shares: the fraction leaving at each exit; K-1 shares are
    completed with the remainder) when present; otherwise every stage expects the full batch.
    """
    K = len(manifest["stages"])
    mb = int(max_batch or manifest["max_batch"])
    th = manifest.get("thresholds") or {}
    dist = th.get("expected_exit_distribution") if isinstance(th, dict) else None
    if not isinstance(dist, (list, tuple)) or len(dist) not in (K, K - 1) or not dist:
        return [mb] * K
    try:
        shares = [max(0.0, float(d)) for d in dist]
    except (TypeError, ValueError):
        return [mb] * K
    out, left = [], 1.0
    for k in range(K):
        out.append(max(1, min(mb, int(round(mb * left)))))
        if k < len(shares):
            left = max(0.0, left - shares[k])
    return out


def _shape(spec_shape: list, batch: int, batch_in: int | None = None) -> tuple:
    dims = []
    for i, d in enumerate(spec_shape):
        if isinstance(d, int):
            dims.append(d)
        elif i == 0:
            dims.append(batch_in if (d == "batch_in" and batch_in is not None) else batch)
        else:
            raise DmpoEdgeError("tensorrt profile", f"dimension {i} of shape {spec_shape} is dynamic; only the batch axis may be")
    return tuple(dims)


def stage_profiles(manifest: dict, k: int, max_batch: int | None = None, buckets=()) -> list:
    """Optimisation profiles of stage ``k``: ``[{input name: (min, opt, max) shapes}]`` (the first is the main one)."""
    st = manifest["stages"][k]
    mb = int(max_batch or manifest["max_batch"])
    exp = expected_stage_batches(manifest, mb)
    opt = exp[k]
    opt_in = exp[k - 1] if k > 0 else opt
    profiles = []
    main = {}
    for t in st["inputs"]:
        batch_in = t["name"] != "keep_idx" and k > 0
        o = opt_in if batch_in else opt
        main[t["name"]] = (_shape(t["shape"], 1, 1), _shape(t["shape"], o, o), _shape(t["shape"], mb, mb))
    profiles.append(main)
    lo = 1
    for b in parse_buckets(buckets):
        b = min(b, mb)
        if b < lo:
            continue
        prof = {}
        for t in st["inputs"]:
            if t["name"] != "keep_idx" and k > 0:
                # the previous stage's whole batch: at least the survivors, up to max_batch
                prof[t["name"]] = (_shape(t["shape"], 1), _shape(t["shape"], max(b, opt_in)), _shape(t["shape"], mb))
            else:
                prof[t["name"]] = (_shape(t["shape"], lo), _shape(t["shape"], b), _shape(t["shape"], b))
        profiles.append(prof)
        lo = b + 1
    return profiles


def cache_key(manifest: dict, settings: dict) -> str:
    """sha256 over the stage graphs' digests and the build settings (16 hex digits)."""
    h = hashlib.sha256()
    h.update(json.dumps([s["sha256"] for s in manifest["stages"]]).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class BuildSettings(dict):
    """The whole build as data: key, precision plan, profiles per stage, workspace (bytes), cache key."""


def build_settings(manifest: dict, trt_version: str, gpu_name: str, sm, max_batch: int | None = None,
                   buckets=(), workspace_mib: int = DEFAULT_WORKSPACE_MIB, strongly_typed: bool | None = None,
                   frontend: str = "onnx") -> BuildSettings:
    precision = manifest["precision"]["mode"]
    mb = int(max_batch or manifest["max_batch"])
    if mb < 1:
        raise DmpoEdgeError("tensorrt", f"--max-batch {mb} must be at least 1")
    if int(workspace_mib) < 16:
        raise DmpoEdgeError("tensorrt", f"--workspace-mib {workspace_mib} is too small. Expected >= 16")
    plan = precision_plan(trt_version, precision, strongly_typed)
    profiles = [stage_profiles(manifest, k, mb, buckets) for k in range(len(manifest["stages"]))]
    s = BuildSettings(
        device_key=device_key(trt_version, gpu_name, sm, precision), tensorrt=str(trt_version), gpu=str(gpu_name),
        sm=sm_text(sm), precision=precision, plan=plan, max_batch=mb, buckets=parse_buckets(buckets),
        workspace_bytes=int(workspace_mib) << 20, profiles=profiles, frontend=frontend,
    )
    s["cache_key"] = cache_key(manifest, {k: v for k, v in s.items() if k != "cache_key"})
    return s
