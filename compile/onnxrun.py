"""Run a chain of stage graphs in ONNX Runtime on the CPU: every stage on every sample (no exits).

Compile uses this to collect each stage's inputs for calibration (stage k is calibrated on what stage k-1
actually hands it), to check parity and to measure per-exit accuracy of the graphs it writes. The runtime has
its own, device-aware runner; this one stays small and host-side on purpose.
"""

from __future__ import annotations

import numpy as np

from .._lazy import require

__all__ = ["session", "run_chain", "input_feeds", "SIMULATED_QDQ", "SIMULATED_QDQ_NAME", "HOST_KERNELS"]

#: How the TensorRT (Q/DQ) form is judged on the CPU. ONNX Runtime normally fuses DequantizeLinear -> op ->
#: QuantizeLinear into its integer kernels; on x86 without VNNI those U8S8/S8S8 kernels (``vpmaddubsw``) saturate
#: pairwise sums at int16, which TensorRT (32-bit accumulation) never does. With these session options ONNX Runtime
#: applies every Q/DQ pair as quantize-then-dequantize in float and runs the layers in FP32: the same rounding and
#: clipping as TensorRT, on any CPU. (``disable_double_qdq_remover``: that pass rewrites back-to-back Q/DQ pairs.)
SIMULATED_QDQ = {"session.disable_quant_qdq": "1", "session.disable_double_qdq_remover": "1"}
SIMULATED_QDQ_NAME = ("onnxruntime CPU, Q/DQ simulated in float (session.disable_quant_qdq=1, "
                      "session.disable_double_qdq_remover=1): the rounding and clipping TensorRT applies, no integer kernels")
HOST_KERNELS = "onnxruntime CPU, this host's integer kernels"


def session(path: str, threads: int | None = None, simulate_qdq: bool = False):
    """A CPU ONNX Runtime session; ``simulate_qdq``: the faithful reference for the TensorRT form (see above)."""
    ort = require("onnxruntime", "running stage graphs")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    if simulate_qdq:
        for key, value in SIMULATED_QDQ.items():
            so.add_session_config_entry(key, value)
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


def run_chain(paths: list, x: np.ndarray, batch_size: int = 64, collect_inputs: bool = False, sessions=None,
              simulate_qdq: bool = False) -> list:
    """All stages on all of ``x``; per stage a dict of ``logits``, ``confidence``, ``prediction`` arrays.

    ``simulate_qdq``: run Q/DQ graphs as TensorRT computes them (float quantize-dequantize), not with the host's
    integer kernels.

    With ``collect_inputs`` each dict also holds ``input``: what that stage received (images for stage 0, the
    previous stage's features otherwise), in the graph's own dtype.
    """
    sessions = sessions or [session(p, simulate_qdq=simulate_qdq) for p in paths]
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
