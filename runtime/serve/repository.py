"""``dmpo-edge export-triton BUNDLE REPO/``: a standard Triton model repository for a bundle.

    REPO/<name>/config.pbtxt        Python backend, dynamic batching, instance groups
    REPO/<name>/1/model.py          imports dmpo_edge.runtime.serve.triton_model (the pipeline)
    REPO/<name>/1/bundle/           the verified bundle, copied (checksums verified again at load)

KIND_GPU with the TensorRT backend where the bundle holds engines (built on this device type with
``dmpo-edge build``), KIND_CPU with ONNX Runtime otherwise. The repository is written beside its final
place and renamed in, so a failed export never leaves half a repository where a good one was.
"""

from __future__ import annotations

import os
import shutil

from ...bundle import Bundle, atomic_directory
from ...engines import ENGINES_DIR, read_engines_json
from ...errors import DmpoEdgeError
from .._common import input_shape
from . import IMAGE, INPUT, MODEL_NAME

__all__ = ["export_triton", "config_pbtxt", "MODEL_PY"]

MODEL_PY = '''"""Triton Python-backend model for a dmpo-edge early-exit bundle (written by dmpo-edge export-triton).

Needs dmpo-edge in the server's Python: pip install 'dmpo-edge[runtime]' (plus TensorRT and pycuda or
cuda-python for KIND_GPU). The bundle sits beside this file; its checksums are verified at load.
"""

from dmpo_edge.runtime.serve.triton_model import TritonPythonModel  # noqa: F401
'''


def _engines_present(bundle: Bundle) -> list:
    root = os.path.join(bundle.path, ENGINES_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if read_engines_json(os.path.join(root, d)) is not None)


def config_pbtxt(bundle: Bundle, name: str, kind: str, backend: str, max_batch: int, max_queue_delay_us: int,
                 instances: int, thresholds=None) -> str:
    dims = ", ".join(str(d) for d in input_shape(bundle))
    thr = "" if thresholds is None else ",".join(repr(float(t)) for t in thresholds)
    params = {"bundle": "bundle", "backend": backend, "thresholds": thr, "max_in_flight": "2"}
    param_text = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
    return f'''# Triton model configuration written by dmpo-edge export-triton for bundle "{bundle.manifest["model"].get("name", "")}".
# Send exactly one of "{INPUT}" (preprocessed FP32 images) or "{IMAGE}" (JPEG / PNG bytes) per request.
name: "{name}"
backend: "python"
max_batch_size: {int(max_batch)}
input [
  {{ name: "{INPUT}" data_type: TYPE_FP32 dims: [ {dims} ] optional: true }},
  {{ name: "{IMAGE}" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "prediction" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "class_name" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "confidence" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "exit_stage" data_type: TYPE_INT32 dims: [ 1 ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {int(max_queue_delay_us)}
}}
instance_group [
  {{ count: {int(instances)} kind: {kind} }}
]
# thresholds: comma-separated, one per early exit; empty = the bundle's calibrated ones.
parameters [
{param_text}
]
'''


def export_triton(bundle_path, repo: str, *, name: str = MODEL_NAME, backend: str = "auto", max_batch=None,
                  max_queue_delay_us: int = 2000, instances: int = 2, thresholds=None, force: bool = False) -> dict:
    """Write the repository; return what was chosen (kind, backend, engines, paths)."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9._-]+", name or ""):
        raise DmpoEdgeError("export-triton", f"model name {name!r}: letters, digits, '.', '_' and '-' only")
    if int(instances) < 1:
        raise DmpoEdgeError("export-triton", f"--instances {instances} must be at least 1")
    bundle = Bundle.load(str(bundle_path), verify=True)
    max_batch = int(max_batch or bundle.max_batch)
    if not 1 <= max_batch <= bundle.max_batch:
        raise DmpoEdgeError("export-triton", f"--max-batch {max_batch} must be between 1 and the bundle's max batch {bundle.max_batch}")
    if thresholds is not None:
        from ..pipeline import _check_thresholds

        thresholds = _check_thresholds(thresholds, bundle.num_stages, where="export-triton --thresholds")
    engines = _engines_present(bundle)
    if backend == "auto":
        backend = "trt" if engines else "ort"
    if backend == "trt" and not engines:
        raise DmpoEdgeError("export-triton", f"bundle {bundle.path} has no TensorRT engines. Build them on the "
                            "target with 'dmpo-edge build BUNDLE', or export with --backend ort")
    if backend not in ("ort", "trt"):
        raise DmpoEdgeError("export-triton", f"--backend {backend!r}: expected auto, ort or trt")
    kind = "KIND_GPU" if backend == "trt" else "KIND_CPU"
    repo = os.path.abspath(str(repo))
    if os.path.isdir(repo) and os.listdir(repo) and not force:
        raise DmpoEdgeError("export-triton", f"'{repo}' exists and is not empty. Pass --force to replace it")
    with atomic_directory(repo, force=True, where="export-triton") as tmp:
        version = os.path.join(tmp, name, "1")
        os.makedirs(version)
        shutil.copytree(bundle.path, os.path.join(version, "bundle"),
                        ignore=shutil.ignore_patterns(".*.tmp-*", ".*.old-*"))
        with open(os.path.join(version, "model.py"), "w") as f:
            f.write(MODEL_PY)
        with open(os.path.join(tmp, name, "config.pbtxt"), "w") as f:
            f.write(config_pbtxt(bundle, name, kind, backend, max_batch, max_queue_delay_us, instances, thresholds))
        Bundle.load(os.path.join(version, "bundle"), verify=True)  # the copy is what Triton will load
    return {"repository": repo, "model": name, "kind": kind, "backend": backend, "engines": engines,
            "max_batch": max_batch, "instances": int(instances)}
