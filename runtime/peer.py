"""The peer one-graph static model of a bundle, run the way a user would run a single graph.

``compile`` writes ``peer.onnx`` (every trunk segment + the final exit, no early exit heads, in the bundle's
precision; on INT8 bundles also ``peer.cpu.onnx``, the U8 form for ONNX Runtime's CPU kernels). ``bench``
times it next to the early-exit pipeline to report the speed-up over what users would deploy instead.

Settings are the backend's best for one graph: one ONNX Runtime session with every usable core, all graph
optimisations, the CPU form on the CPU provider. Spinning is off by default: in an interleaved benchmark the
peer's idle threads would otherwise keep spinning into the next configuration's call and slow it.
"""

from __future__ import annotations

import os

import numpy as np

from .._lazy import require
from ..errors import DmpoEdgeError
from ._common import as_bundle

__all__ = ["PeerModel", "peer_unavailable"]


def peer_unavailable(bundle, backend: str) -> str | None:
    """Why this bundle's peer cannot be timed on ``backend`` (None when it can)."""
    b = as_bundle(bundle, verify=False)
    if not b.peer:
        return (f"the bundle {b.path} has no peer one-graph model (compiled by an older dmpo-edge); recompile it with "
                "'dmpo-edge compile' to get the speed-up over the peer")
    if backend not in ("ort",):
        return (f"the peer one-graph model is timed on ONNX Runtime only; on the {backend} backend the speed-up over "
                "the peer is not reported (run bench with --backend ort for it)")
    return None


class PeerModel:
    """``predict(x)`` -> ``{"prediction", "confidence"}`` of the peer graph; a context manager like the backends."""

    def __init__(self, bundle, threads: int | None = None, providers=None, spinning: bool = False):
        self.bundle = as_bundle(bundle)
        if not self.bundle.peer:
            raise DmpoEdgeError(f"bundle {self.bundle.path}", "has no peer one-graph model. Recompile it with 'dmpo-edge compile'")
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:
            usable = os.cpu_count() or 1
        self.threads = int(threads) if threads else max(1, usable)
        self._providers = list(providers) if providers else None
        self.spinning = spinning
        self.session = None
        self.file = None
        self.providers = []

    def activate(self) -> "PeerModel":
        if self.session is not None:
            return self
        ort = require("onnxruntime", "running the peer model with ONNX Runtime")
        from .backends.ort import default_providers

        providers = self._providers or default_providers()
        on_cpu = all((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in providers)
        self.file = self.bundle.peer_path("cpu" if on_cpu else None)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        try:
            self.session = ort.InferenceSession(self.file, sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            raise DmpoEdgeError("peer model", f"ONNX Runtime cannot load '{os.path.basename(self.file)}' ({exc}). "
                                "Recompile the bundle with 'dmpo-edge compile'") from None
        self.providers = self.session.get_providers()
        self._input = self.session.get_inputs()[0].name
        self._dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
        self._outs = [o.name for o in self.session.get_outputs()]
        return self

    def predict(self, x: np.ndarray) -> dict:
        if self.session is None:
            self.activate()
        outs = self.session.run(None, {self._input: np.ascontiguousarray(x, dtype=self._dtype)})
        return dict(zip(self._outs, outs))

    def close(self) -> None:
        self.session = None

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.close()
