"""The Python-backend model of a repository written by ``dmpo-edge export-triton``.

The repository's ``model.py`` is two lines that import :class:`TritonPythonModel` from here, so the code that
runs inside ``tritonserver`` is this tested module of the installed dmpo-edge (``pip install 'dmpo-edge[runtime]'``
in the server's Python, e.g. in an NGC ``tritonserver:<yy.mm>-py3`` container). One Python-backend process per
model instance, each with its own :class:`~dmpo_edge.runtime.Pipeline`; Triton's dynamic batcher feeds it.

Parameters read from ``config.pbtxt``: ``bundle`` (folder beside model.py), ``backend`` (``auto`` / ``ort`` /
``trt``), ``thresholds`` (comma-separated, empty = the bundle's; change them without restarting the server
through Triton's model-control API: load the model again with an edited config), ``max_in_flight``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from . import IMAGE, INPUT

__all__ = ["TritonPythonModel", "parse_thresholds"]


def parse_thresholds(text: str):
    """``"0.9, 0.8"`` -> [0.9, 0.8]; empty -> None (the bundle's own)."""
    text = (text or "").strip()
    if not text:
        return None
    return [float(v) for v in text.replace(";", ",").split(",") if v.strip()]


class _TritonExitMetrics:
    """The exit histogram as Triton custom metrics: it appears in tritonserver's own ``/metrics``."""

    def __init__(self, pb_utils, model: str, instance: str, num_stages: int, thresholds):
        counter = pb_utils.MetricFamily(name="dmpo_exit_total", kind=pb_utils.MetricFamily.COUNTER,
                                        description="Images that left the early-exit pipeline at each stage (0-based)")
        self.exits = [counter.Metric(labels={"model": model, "instance": instance, "stage": str(k)})
                      for k in range(num_stages)]
        requests = pb_utils.MetricFamily(name="dmpo_requests_total", kind=pb_utils.MetricFamily.COUNTER,
                                         description="Requests answered, by outcome")
        self.ok = requests.Metric(labels={"model": model, "instance": instance, "outcome": "success"})
        self.failed = requests.Metric(labels={"model": model, "instance": instance, "outcome": "failure"})
        gauge = pb_utils.MetricFamily(name="dmpo_exit_threshold", kind=pb_utils.MetricFamily.GAUGE,
                                      description="Active exit threshold per early exit (+Inf: never exit there)")
        for k, t in enumerate(thresholds):
            gauge.Metric(labels={"model": model, "instance": instance, "stage": str(k)}).set(float(t))
        self._families = (counter, requests, gauge)  # a family must outlive its metrics
        self.num_stages = num_stages

    def record_batch(self, exit_stage) -> None:
        counts = np.bincount(np.asarray(exit_stage, np.int64).clip(0, self.num_stages - 1), minlength=self.num_stages)
        for m, c in zip(self.exits, counts):
            if c:
                m.increment(float(c))

    def record_requests(self, ok: int, failed: int) -> None:
        if ok:
            self.ok.increment(float(ok))
        if failed:
            self.failed.increment(float(failed))


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize`` / ``execute`` / ``finalize``."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from ..pipeline import Pipeline
        from .handler import ServeHandler

        self.pb_utils = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        if args.get("model_instance_kind") == "GPU":
            # One process per instance: pin it to the GPU Triton gave this instance before CUDA starts.
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.get("model_instance_device_id", "0"))
        version_dir = os.path.join(args["model_repository"], str(args["model_version"]))
        bundle = os.path.join(version_dir, params.get("bundle") or "bundle")
        backend = params.get("backend") or "auto"
        options = {}
        if backend == "ort":
            # Each instance is its own process with its own ONNX Runtime pools: share the cores between them
            # instead of letting every instance size itself for the whole machine.
            count = sum(int(g.get("count", 1)) for g in (config.get("instance_group") or [{}]))
            options["threads"] = max(1, (os.cpu_count() or 1) // max(1, count))
        # Pipeline.from_bundle loads the manifest and verifies every file's sha256 before a stage runs.
        self.pipeline = Pipeline.from_bundle(bundle, backend=backend, backend_options=options,
                                             thresholds=parse_thresholds(params.get("thresholds", "")),
                                             max_in_flight=int(params.get("max_in_flight") or 2))
        try:
            metrics = _TritonExitMetrics(pb_utils, config.get("name", "dmpo"), args.get("model_instance_name", ""),
                                         self.pipeline.num_stages, self.pipeline.thresholds)
        except AttributeError:  # a Python backend older than custom metrics (Triton < 23.05)
            metrics = None
        self.handler = ServeHandler(self.pipeline, metrics)

    def execute(self, requests):
        pb_utils = self.pb_utils
        inputs = []
        for r in requests:
            d = {}
            for name in (INPUT, IMAGE):
                t = pb_utils.get_input_tensor_by_name(r, name)
                d[name] = None if t is None else t.as_numpy()
            inputs.append(d)
        responses = []
        for res in self.handler.infer(inputs):
            if isinstance(res, Exception):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=self._error(str(res))))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, value) for name, value in res.items()]))
        return responses

    def _error(self, message: str):
        """A bad request is the client's to fix: INVALID_ARG (HTTP 400) where the Python backend knows codes."""
        err = self.pb_utils.TritonError
        code = getattr(err, "INVALID_ARG", None)
        return err(message) if code is None else err(message, code)

    def finalize(self):
        self.handler.close()
        self.pipeline.close()
