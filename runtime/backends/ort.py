"""ONNX Runtime backend: the CPU default that runs anywhere, and the CUDA execution provider when present.

On the CPU the stage's ``variants.cpu`` graph is preferred (the form that is fast in ONNX Runtime, e.g.
U8 activations); on a GPU provider the portable ``stage_k.onnx`` runs and IOBinding keeps the stage's
``features`` on the device, so the next stage gathers its survivors there (the ``keep_idx`` input).
The TensorRT execution provider is opt-in (``providers=["TensorrtExecutionProvider", ...]``): it
rebuilds engines when a session is created; the native ``trt`` backend uses engines built once by
``dmpo-edge build``.

Threads on the CPU: each stage session has its own intra-op pool of ``threads``. Stages that run at the
same time (batches in flight) share the cores, so the pipeline gives each session cores / batches in
flight. A call made inside :meth:`exclusive` (the pipeline's one-batch caller-thread path: nothing else
runs) may instead take a second set of sessions with ``exclusive_threads`` (all cores) when it holds at
least ``exclusive_min_mflops`` of work (rows x the stage's per-sample FLOPs from the manifest); below
that, splitting an operator across threads costs more than it saves. Measured side by side on the
2-core reference host (``benchmarks/ort_threads.py``, docs/benchmarks.md): all cores made one batch of
32 through the digits stages 35% faster and one sample 27% slower; one process-wide pool shared by the
sessions was faster still when the machine was idle, but its spinning cannot be turned off from Python
and it ran 2-4x slower than per-session pools when other processes shared the cores. The second set of
sessions holds a second copy of the stage weights in memory; an explicit ``threads`` in the pipeline's
``backend_options`` builds one set only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

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
    ``spinning``: whether idle intra-op threads spin (None: ONNX Runtime's default, on).
    ``exclusive_threads``: intra-op threads of a second set of sessions for calls inside :meth:`exclusive`
    that hold at least ``exclusive_min_mflops`` MFLOPs (None or equal to ``threads``: no second set).
    """

    name = "ort"
    concurrent_calls = True  # InferenceSession.run is thread-safe; IOBinding objects are made per call

    def __init__(self, bundle, providers=None, threads: int | None = None, variant: str | None = None,
                 spinning: bool | None = None, exclusive_threads: int | None = None,
                 exclusive_min_mflops: float = 64.0):
        super().__init__(bundle)
        self._providers_req = list(providers) if providers else None
        self.threads = int(threads) if threads else _default_threads()
        self.variant = variant
        self.spinning = spinning
        self.exclusive_threads = int(exclusive_threads) if exclusive_threads else None
        self.exclusive_min_mflops = float(exclusive_min_mflops)
        self._exclusive = threading.local()
        self.wide_sessions = []  # the exclusive_threads sessions (CPU only), else empty
        self.sessions = []
        self.providers = []
        self.files = []
        self.on_device = False
        self.isa_warning = None  # set on activation when the CPU form was quantized for another kind of CPU

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
        opts = self._session_options(ort, self.threads)
        self.sessions, self.files, self._feat_in = [], [], []
        for k in range(self.num_stages):
            path = self.bundle.stage_path(k, variant)
            sess = self._load(ort, k, path, opts, providers)
            self._check_io(k, sess)
            self.sessions.append(sess)
            self.files.append(path)
        self.providers = self.sessions[0].get_providers() if self.sessions else []
        self.on_device = any(p in _GPU_PROVIDERS for p in self.providers)
        self._out_names = [[o.name for o in s.get_outputs()] for s in self.sessions]
        self.wide_sessions = []
        if not self.on_device and self.exclusive_threads and self.exclusive_threads != self.threads:
            wide = self._session_options(ort, self.exclusive_threads)
            self.wide_sessions = [self._load(ort, k, path, wide, providers) for k, path in enumerate(self.files)]
        self._stage_flops = [float(st.get("flops") or 0.0) for st in self.bundle.stages]
        self.isa_warning = None
        if not self.on_device and variant == "cpu":
            self._warn_other_isa()

    def _warn_other_isa(self) -> None:
        """One line when the CPU form was quantized for another kind of CPU (its accuracy was measured there)."""
        from ...cpu_isa import mismatch_warning

        prec = self.bundle.manifest.get("precision") or {}
        target = (prec.get("cpu_variant") or {}).get("target_isa")
        if not any((st.get("variants") or {}).get("cpu") for st in self.bundle.stages):
            return
        self.isa_warning = mismatch_warning(target)
        if self.isa_warning:
            # logging's last-resort handler prints the bare line on stderr; applications may route it
            logging.getLogger("dmpo_edge.runtime").warning(self.isa_warning)

    def _session_options(self, ort, threads: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.spinning is not None:
            # Spinning workers burn cores that another stage session needs; off when several sessions exist.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return opts

    def _load(self, ort, k: int, path: str, opts, providers):
        try:
            return ort.InferenceSession(path, sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            raise DmpoEdgeError(f"ort backend stage {k}", f"ONNX Runtime cannot load '{os.path.basename(path)}' ({exc}). "
                                "Recompile the bundle with 'dmpo-edge compile'") from None

    @contextlib.contextmanager
    def exclusive(self):
        prev = getattr(self._exclusive, "on", False)
        self._exclusive.on = True
        try:
            yield self
        finally:
            self._exclusive.on = prev

    def _session_for(self, k: int, rows: int):
        """The wide session when this thread is inside exclusive() and the call holds enough work."""
        if (self.wide_sessions and getattr(self._exclusive, "on", False)
                and rows * self._stage_flops[k] >= self.exclusive_min_mflops * 1e6):
            return self.wide_sessions[k]
        return self.sessions[k]

    def _check_io(self, k: int, sess) -> None:
        ins = [i.name for i in sess.get_inputs()]
        outs = {o.name for o in sess.get_outputs()}
        want_out = set(FINAL_OUTPUTS) | ({"features"} if k < self.num_stages - 1 else set())
        ok_in = ins == ["input"] if k == 0 else (len(ins) == 2 and "keep_idx" in ins)
        if not ok_in or not want_out <= outs:
            want_in = "input" if k == 0 else "the previous stage's features and keep_idx"
            raise DmpoEdgeError(f"ort backend stage {k}", f"graph inputs {sorted(ins)} / outputs {sorted(outs)} do not follow the "
                                f"stage contract (inputs: {want_in}; outputs {sorted(want_out)}). Recompile the bundle")
        # The manifest's own shapes were checked against each other; these are the graph's: a class list
        # shorter than the logits would index past it at run time, another input size fails on frame one.
        where, n_cls = f"ort backend stage {k}", len(self.bundle.classes)
        for o in sess.get_outputs():
            c = o.shape[-1] if o.name == "logits" and o.shape else None
            if isinstance(c, int) and c != n_cls:
                raise DmpoEdgeError(where, f"the graph's logits have {c} classes but the manifest lists {n_cls} class "
                                    "names. Recompile the bundle (or restore its class list)")
        hw = list(sess.get_inputs()[0].shape[2:]) if k == 0 else []
        if len(hw) == 2 and all(isinstance(d, int) for d in hw) and hw != list(self.bundle.preprocess.size):
            raise DmpoEdgeError(where, f"the graph takes {hw[0]} x {hw[1]} images but the manifest's preprocessing "
                                f"makes {self.bundle.preprocess.size[0]} x {self.bundle.preprocess.size[1]}. Recompile the bundle")
        self._feat_in.append(None if k == 0 else stage_features_input(self.bundle, k, ins))

    def _deactivate_impl(self) -> None:
        self.sessions = []
        self.wide_sessions = []

    def _feed_dtype(self, k: int, name: str):
        spec = tensor_spec(self.bundle, k, name)
        return np.dtype(spec["dtype"]) if spec else None

    def _infer_impl(self, k: int, feeds: dict, keep_features: bool) -> dict:
        if k == 0:
            x = feeds["input"]
            dt = self._feed_dtype(0, "input") or np.float32
            host = {"input": np.ascontiguousarray(x, dtype=dt)}
        else:
            host = {"keep_idx": np.ascontiguousarray(feeds["keep_idx"], dtype=np.int32)}
        sess = self._session_for(k, int(next(iter(host.values())).shape[0]))
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
