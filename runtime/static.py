"""Every stage on every sample, no exits: the static baseline and what calibration reads.

``run_all_stages(bundle, x)`` pushes each batch through all stages with ``keep_idx = arange(N)`` (every
sample survives), so stage k sees exactly the features the early-exit pipeline would hand it.
"""

from __future__ import annotations

import numpy as np

from .._lazy import require
from ..errors import DmpoEdgeError
from ._common import FINAL_OUTPUTS, as_bundle
from .backends import Backend, get_backend
from .checks import check_batch

__all__ = ["run_all_stages"]


def _empty_stage(bundle, num_classes: int, keep_features: bool, k: int) -> dict:
    out = {
        "logits": np.zeros((0, num_classes), np.float32),
        "confidence": np.zeros((0,), np.float32),
        "prediction": np.zeros((0,), np.int32),
    }
    if keep_features and k < bundle.num_stages - 1:
        out["features"] = None
    return out


def run_all_stages(bundle, x: np.ndarray, batch_size: int = 64, backend="ort", keep_features: bool = False,
                   progress: bool = False) -> list[dict]:
    """Run every stage on every sample of ``x`` (N x 3 x H x W float32).

    Returns one dict per stage with numpy arrays ``logits`` [N, C], ``confidence`` [N], ``prediction``
    [N] (int32), and with ``keep_features=True`` also ``features`` (all but the last stage).
    ``backend`` is a name (``ort``, ``trt``, ``null``, ``auto``) or an already built :class:`Backend`
    (activated here if it is not yet, and left as found).
    """
    if isinstance(backend, Backend):
        be, b = backend, backend.bundle
    else:
        b = as_bundle(bundle)
        be = get_backend(backend, b)(b)
    x = check_batch(b, x, where="run_all_stages")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DmpoEdgeError("run_all_stages", f"batch_size {batch_size!r} must be a positive integer")
    batch_size = min(batch_size, b.max_batch)
    K, C = b.num_stages, len(b.classes)
    n = x.shape[0]
    if n == 0:
        return [_empty_stage(b, C, keep_features, k) for k in range(K)]
    parts = [{name: [] for name in FINAL_OUTPUTS + (("features",) if keep_features and k < K - 1 else ())} for k in range(K)]
    was_active = be.is_active
    be.activate()
    try:
        starts = range(0, n, batch_size)
        if progress:
            tqdm = require("tqdm", "a progress bar").tqdm
            starts = tqdm(starts, desc="stages", unit="batch", leave=False)
        for s in starts:
            xb = x[s:s + batch_size]
            keep = np.arange(xb.shape[0], dtype=np.int32)
            feats = None
            for k in range(K):
                feeds = {"input": xb} if k == 0 else {"features": feats, "keep_idx": keep}
                # Features stay a backend handle (device memory on a GPU) and go straight to the next stage.
                out = be.infer(k, feeds, keep_features=True)
                if k > 0:
                    be.release(feats)
                for name in FINAL_OUTPUTS:
                    parts[k][name].append(np.asarray(out[name]))
                if k < K - 1:
                    feats = out["features"]
                    if keep_features:
                        parts[k]["features"].append(np.array(be.features_to_host(feats)))
    finally:
        if not was_active:
            be.deactivate()
    return [{name: np.concatenate(v, axis=0) for name, v in p.items()} for p in parts]
