"""A backend that does no inference: correctly shaped outputs with deterministic confidences.

It measures what the pipeline itself costs (threads, queues, regrouping bookkeeping) with the stage
work taken out. Confidences depend only on the sample's position in the original batch and the
stage, so a given threshold makes a reproducible exit pattern.
"""

from __future__ import annotations

import numpy as np

from .._common import features_dtype
from .base import Backend

__all__ = ["NullBackend"]


class NullBackend(Backend):
    """``features`` are one number per sample (the sample's row in the stage-0 batch), carried through gathers."""

    name = "null"
    concurrent_calls = True  # stateless

    def __init__(self, bundle, **_ignored):
        super().__init__(bundle)
        self.num_classes = len(self.bundle.classes)

    def _activate_impl(self) -> None:
        self._fdt = [features_dtype(self.bundle, k) for k in range(self.num_stages)]

    def _infer_impl(self, k: int, feeds: dict, keep_features: bool) -> dict:
        if k == 0:
            n = int(np.asarray(feeds["input"]).shape[0])
            rows = np.arange(n, dtype=np.float32)
        else:
            keep = np.asarray(feeds["keep_idx"], dtype=np.int64)
            rows = np.asarray(feeds["features"], dtype=np.float32).reshape(-1)[keep]
        # A fixed pseudo-random score in [0, 1) per (row, stage), rising with depth like a real model's.
        conf = ((rows * 0.6180339887 + k * 0.3819660113) % 1.0).astype(np.float32)
        conf = np.minimum(1.0, conf * 0.5 + 0.5 * (k + 1) / self.num_stages).astype(np.float32)
        pred = (rows.astype(np.int64) % self.num_classes).astype(np.int32)
        logits = np.zeros((rows.shape[0], self.num_classes), np.float32)
        logits[np.arange(rows.shape[0]), pred] = conf
        out = {"logits": logits, "confidence": conf, "prediction": pred}
        if k < self.num_stages - 1:
            out["features"] = rows.reshape(-1, 1)
        return out
