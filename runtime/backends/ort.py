"""ONNX Runtime backend: the CPU default that runs anywhere, and the CUDA execution provider when present.

On the CPU the stage's ``variants.cpu`` graph is preferred (the form that is fast in ONNX Runtime, e.g.
U8 activations); on a GPU provider the portable ``stage_k.onnx`` runs and IOBinding keeps the stage's
``features`` on the device, so the next stage gathers its survivors there (the ``keep_idx`` input).
The TensorRT execution provider is opt-in (``providers=["TensorrtExecutionProvider", ...]``): it
rebuilds engines when a session is created; the native ``trt`` backend uses engines built once by
``dmpo-edge build``.
"""

from __future__ import annotations

import os

import numpy as np

from ..._lazy import require
from ...errors import DmpoEdgeError
from .._common import FINAL_OUTPUTS, stage_features_input, tensor_spec
from .base import Backend

__all__ = ["OrtBackend", "default_providers"]

_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider")


def default_providers() -> list:
    ort = require("onnxruntime", "running stage graphs with ONNX Runtime")
    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail] or ["CPUExecutionProvider"]


def _default_threads() -> int:
    # All cores for one session; several stages in flight share them (ORT releases the GIL).
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class OrtBackend(Backend):
    """Stage graphs in ONNX Runtime sessions, one per stage.

    ``providers``: ONNX Runtime execution providers (default: CUDA when available, then CPU).
    ``threads``: intra-op threads per session (default: the cores this process may use).
    ``variant``: which stage file to run: ``"cpu"`` (the manifest's cpu variant, when present),
    ``"default"`` (``stage_k.onnx``) or ``None`` = cpu variant on the CPU provider, portable file otherwise.
    """

    name = "ort"

    def __init__(self, bundle, providers=None, threads: int | None = None, variant: str | None = None,
                 spinning: bool | None = None):
        super().__init__(bundle)
        self._providers_req = list(providers) if providers else None
        self.threads = int(threads) if threads else _default_threads()
        self.variant = variant
        self.spinning = spinning
        self.sessions = []
        self.providers = []
        self.files = []
        self.on_device = False

    def _activate_impl(self) -> None:
        ort = require("onnxruntime", "running stage graphs with ONNX Runtime")
        providers = self._providers_req or default_providers()
        avail = ort.get_available_providers()
        missing = [p if isinstance(p, str) else p[0] for p in providers if (p if isinstance(p, str) else p[0]) not in avail]
        if missing:
            raise DmpoEdgeError("ort backend", f"execution provider(s) {missing} are not available here (available: {avail}). "
                                "Install the matching onnxruntime build or leave providers unset")
        names = [p if isinstance(p, str) else p[0] for p in providers]
        self.on_device = any(n in _GPU_PROVIDERS for n in names)
        variant = self.variant if self.variant is not None else (None if self.on_device else "cpu")
        if variant == "default":
            variant = None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.spinning is not None:
            # Spinning workers burn cores that another in-flight stage could use; off when several batches overlap.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        self.sessions, self.files, self._feat_in = [], [], []
        for k in range(self.num_stages):
            path = self.bundle.stage_path(k, variant)
            try:
                sess = ort.InferenceSession(path, sess_options=opts, providers=providers)
            except Exception as exc:  # ORT raises its own exception types for bad graphs
                raise DmpoEdgeError(f"ort backend stage {k}", f"ONNX Runtime cannot load '{os.path.basename(path)}' ({exc}). "
                                    "Recompile the bundle with 'dmpo-edge compile'") from None
            self._check_io(k, sess)
            self.sessions.append(sess)
            self.files.append(path)
        self.providers = self.sessions[0].get_providers() if self.sessions else []
        self.on_device = any(p in _GPU_PROVIDERS for p in self.providers)
        self._out_names = [[o.name for o in s.get_outputs()] for s in self.sessions]

    def _check_io(self, k: int, sess) -> None:
        ins = [i.name for i in sess.get_inputs()]
        outs = {o.name for o in sess.get_outputs()}
        want_out = set(FINAL_OUTPUTS) | ({"features"} if k < self.num_stages - 1 else set())
        ok_in = ins == ["input"] if k == 0 else (len(ins) == 2 and "keep_idx" in ins)
        if not ok_in or not want_out <= outs:
            want_in = "input" if k == 0 else "the previous stage's features and keep_idx"
            raise DmpoEdgeError(f"ort backend stage {k}", f"graph inputs {sorted(ins)} / outputs {sorted(outs)} do not follow the "
                                f"stage contract (inputs: {want_in}; outputs {sorted(want_out)}). Recompile the bundle")
        self._feat_in.append(None if k == 0 else stage_features_input(self.bundle, k, ins))

    def _deactivate_impl(self) -> None:
        self.sessions = []

    def _feed_dtype(self, k: int, name: str):
        spec = tensor_spec(self.bundle, k, name)
        return np.dtype(spec["dtype"]) if spec else None

    def _infer_impl(self, k: int, feeds: dict, keep_features: bool) -> dict:
        sess = self.sessions[k]
        if k == 0:
            x = feeds["input"]
            dt = self._feed_dtype(0, "input") or np.float32
            host = {"input": np.ascontiguousarray(x, dtype=dt)}
        else:
            host = {"keep_idx": np.ascontiguousarray(feeds["keep_idx"], dtype=np.int32)}
        if not self.on_device:
            if k > 0:
                f = feeds["features"]
                host[self._feat_in[k]] = f.numpy() if hasattr(f, "numpy") and not isinstance(f, np.ndarray) else f
            outs = sess.run(None, host)
            return dict(zip(self._out_names[k], outs))
        return self._infer_iobinding(k, sess, host, feeds, keep_features)

    def _infer_iobinding(self, k, sess, host, feeds, keep_features):
        binding = sess.io_binding()
        for name, arr in host.items():
            binding.bind_cpu_input(name, arr)
        if k > 0:
            f = feeds["features"]
            if isinstance(f, np.ndarray):
                binding.bind_cpu_input(self._feat_in[k], f)
            else:
                binding.bind_ortvalue_input(self._feat_in[k], f)
        dev = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        for name in self._out_names[k]:
            binding.bind_output(name, dev if (name == "features" and keep_features) else "cpu")
        sess.run_with_iobinding(binding)
        res = {}
        for name, val in zip(self._out_names[k], binding.get_outputs()):
            res[name] = val if (name == "features" and keep_features) else val.numpy()
        return res

    def features_to_host(self, features):
        return features if isinstance(features, np.ndarray) else features.numpy()
