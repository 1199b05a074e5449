"""Small Triton clients for a served bundle (tritonclient, HTTP or gRPC): one request = some images.

Used by the serving tests and ``benchmarks/serve_load.py``; an example of the request format for users.
tritonclient's gRPC client needs protobuf < 7, so these run in the ``serve`` environment.
"""

from __future__ import annotations

import numpy as np

from ..._lazy import require
from . import IMAGE, INPUT, OUTPUTS

__all__ = ["Client"]


class Client:
    """``Client("http", "127.0.0.1:8000").infer(x)`` -> dict of output name -> array (n,)."""

    def __init__(self, protocol: str, url: str, model: str = "dmpo", timeout_s: float = 60.0):
        self.protocol, self.url, self.model = protocol, url, model
        if protocol == "http":
            self.mod = require("tritonclient.http", "talking to Triton over HTTP")
            self.client = self.mod.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        elif protocol == "grpc":
            self.mod = require("tritonclient.grpc", "talking to Triton over gRPC")
            self.client = self.mod.InferenceServerClient(url)
        else:
            raise ValueError(f"protocol {protocol!r}: expected http or grpc")

    def _input(self, name: str, arr: np.ndarray, dtype: str):
        i = self.mod.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        return i

    def infer_raw(self, name: str, arr: np.ndarray, dtype: str, model: str | None = None) -> dict:
        r = self.client.infer(model or self.model, [self._input(name, arr, dtype)])
        return {k: r.as_numpy(k).reshape(-1) for k in OUTPUTS}

    def infer(self, x: np.ndarray) -> dict:
        """Preprocessed float32 images, n x 3 x H x W."""
        return self.infer_raw(INPUT, np.ascontiguousarray(x, np.float32), "FP32")

    def infer_images(self, blobs: list) -> dict:
        """Encoded JPEG / PNG files (bytes), one per image."""
        return self.infer_raw(IMAGE, np.array([[bytes(b)] for b in blobs], dtype=object), "BYTES")

    def thresholds(self, values=None) -> list:
        """Read (``values`` None) or set the served thresholds through ``<model>_thresholds`` (``dmpo-edge serve``)."""
        arr = np.asarray([] if values is None else values, np.float32).reshape(-1)
        inputs = [self._input("thresholds", arr, "FP32")] if arr.size else []
        r = self.client.infer(f"{self.model}_thresholds", inputs)
        return [float(v) for v in r.as_numpy("thresholds").reshape(-1)]

    def batch_sizes(self) -> dict:
        """Triton's statistics for the model: batch size -> executions."""
        stats = self.client.get_inference_statistics(self.model)
        if self.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            stats = MessageToDict(stats, preserving_proto_field_name=True)
        out = {}
        for m in stats.get("model_stats", []):
            for b in m.get("batch_stats", []):
                out[int(b["batch_size"])] = out.get(int(b["batch_size"]), 0) + int(b["compute_infer"]["count"])
        return out

    def close(self) -> None:
        self.client.close()
