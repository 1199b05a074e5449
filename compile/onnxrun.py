"""Run a chain of stage graphs in ONNX Runtime on the CPU: every stage on every sample (no exits).

Compile uses this to collect each stage's inputs for calibration (stage k is calibrated on what stage k-1
actually hands it), to check parity and to measure per-exit accuracy of the graphs it writes. The runtime has
its own, device-aware runner; this one stays small and host-side on purpose.
"""

from __future__ import annotations

import numpy as np

from .._lazy import require

__all__ = ["session", "run_chain", "input_feeds"]


def session(path: str, threads: int | None = None):
    ort = require("onnxruntime", "running stage graphs")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def input_feeds(sess, k: int, x, keep_idx=None) -> dict:
    """Feeds for stage ``k``: the image batch (k = 0) or the previous features and the survivors' rows."""
    names = [i.name for i in sess.get_inputs()]
    if k == 0:
        return {names[0]: x}
    if keep_idx is None:
        keep_idx = np.arange(x.shape[0], dtype=np.int32)
    feat = [n for n in names if n != "keep_idx"][0]
    want = sess.get_inputs()[names.index(feat)].type
    if want == "tensor(float16)" and x.dtype != np.float16:
        x = x.astype(np.float16)
    return {feat: x, "keep_idx": np.asarray(keep_idx, np.int32)}


def run_chain(paths: list, x: np.ndarray, batch_size: int = 64, collect_inputs: bool = False, sessions=None) -> list:
    """All stages on all of ``x``; per stage a dict of ``logits``, ``confidence``, ``prediction`` arrays.

    With ``collect_inputs`` each dict also holds ``input``: what that stage received (images for stage 0, the
    previous stage's features otherwise), in the graph's own dtype.
    """
    sessions = sessions or [session(p) for p in paths]
    K = len(sessions)
    parts = [{"logits": [], "confidence": [], "prediction": [], "input": []} for _ in range(K)]
    for lo in range(0, x.shape[0], batch_size):
        cur = x[lo: lo + batch_size]
        for k, sess in enumerate(sessions):
            feeds = input_feeds(sess, k, cur)
            if collect_inputs:
                parts[k]["input"].append(next(v for n, v in feeds.items() if n != "keep_idx"))
            names = [o.name for o in sess.get_outputs()]
            outs = dict(zip(names, sess.run(None, feeds)))
            for key in ("logits", "confidence", "prediction"):
                parts[k][key].append(outs[key])
            if k < K - 1:
                cur = outs["features"]
    res = []
    for p in parts:
        d = {key: np.concatenate(v) for key, v in p.items() if v}
        res.append(d)
    return res
