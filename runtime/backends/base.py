"""The backend interface (Polygraphy style): a small class per inference engine.

``activate()`` loads sessions / engines and allocates every buffer once at the bundle's max batch;
``infer(k, feeds)`` runs stage ``k``; ``deactivate()`` frees everything. Backends are context managers.

Feeds follow the stage contract: stage 0 takes ``{"input": float32 [N, 3, H, W]}``, stage k > 0 takes
``{"features": <stage k-1 features>, "keep_idx": int32 [N]}`` (feeds are keyed by role; the graph's
features input may carry another name, see ``_common.stage_features_input``). ``infer`` returns numpy arrays;
``infer(..., keep_features=True)`` may return ``features`` as a backend-native handle (a device
buffer) that is only good for feeding the next stage - that is how survivors are regrouped on the
device without features visiting the host.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from ...errors import DmpoEdgeError
from .._common import as_bundle

__all__ = ["Backend"]


class Backend:
    """Base class: subclasses implement ``_activate_impl``, ``_infer_impl`` and ``_deactivate_impl``."""

    name = "base"
    # Whether one stage may run several calls at once from different threads. False: the pipeline keeps one
    # caller per stage (TensorRT: an execution context and staging buffers per stage).
    concurrent_calls = False

    def __init__(self, bundle):
        self.bundle = as_bundle(bundle)
        self.num_stages = self.bundle.num_stages
        self.max_batch = self.bundle.max_batch
        self.is_active = False
        self._lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------
    def activate(self) -> "Backend":
        with self._lock:
            if not self.is_active:
                self._activate_impl()
                self.is_active = True
        return self

    def deactivate(self) -> None:
        with self._lock:
            if self.is_active:
                self.is_active = False
                self._deactivate_impl()

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()
        return False

    # --- inference -------------------------------------------------------------------------
    def infer(self, k: int, feeds: dict, keep_features: bool = False) -> dict:
        """Run stage ``k`` on ``feeds``; see the module doc for the feeds and outputs."""
        if not self.is_active:
            raise DmpoEdgeError(f"{self.name} backend", "infer() called before activate(). Use 'with backend:' or call activate()")
        if not 0 <= k < self.num_stages:
            raise DmpoEdgeError(f"{self.name} backend", f"stage {k} does not exist; the bundle has {self.num_stages} stages (0-based)")
        return self._infer_impl(k, feeds, keep_features)

    def exclusive(self):
        """Context manager: the stage calls this thread makes inside have the machine to themselves (one batch,
        nothing else in flight), so a backend may give them more of it. A no-op unless a backend says otherwise
        (ONNX Runtime: sessions with all cores, see :class:`OrtBackend`)."""
        return contextlib.nullcontext()

    def features_to_host(self, features):
        """A ``features`` value returned with ``keep_features=True`` -> numpy (for tests and calibration)."""
        return features

    def use_buckets(self, buckets) -> None:
        """The pipeline's batch buckets (a tuple of sizes, or None): a backend may tune for them (TensorRT: CUDA graphs)."""

    def release(self, features) -> None:
        """Give back a device features buffer returned with ``keep_features=True`` (no-op on the host)."""

    def merge_features(self, features: list, keeps: list):
        """Refill: one features value and keep_idx holding the survivors of several groups.

        Host version: gather each group's survivors and stack them (keep_idx becomes 0..M-1); the
        sources are released. Device backends override this with device-to-device copies.
        """
        parts = [np.asarray(self.features_to_host(f))[np.asarray(k)] for f, k in zip(features, keeps)]
        for f in features:
            self.release(f)
        merged = np.ascontiguousarray(np.concatenate(parts, axis=0))
        return merged, np.arange(merged.shape[0], dtype=np.int32)

    # --- hooks -----------------------------------------------------------------------------
    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, k: int, feeds: dict, keep_features: bool) -> dict:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        pass

    def __repr__(self):
        return f"{type(self).__name__}({self.bundle.path!r}, active={self.is_active})"
