"""One request path for every server: Triton requests -> one pipeline batch -> per-request outputs.

Triton's dynamic batcher hands over several requests at once. Each request carries exactly one of
``input`` (preprocessed float32, n x 3 x H x W) or ``image`` (encoded JPEG / PNG bytes, n x 1; decoded and
preprocessed here with the bundle's own numpy preprocessing, so a served image sees the pixels the
thresholds were calibrated on). Every request is checked on its own, so one malformed request is reported
as its own error and never costs the others their results. The valid rows of all requests go through the
pipeline as one batch.

Several Triton model instances call :meth:`ServeHandler.infer` from their own threads: the :class:`Dispatcher`
lets their batches be in the pipeline at the same time (stage k of one batch overlaps stage k+1 of another)
instead of queueing behind a lock.
"""

from __future__ import annotations

import io
import threading

import numpy as np

from ..._lazy import require
from ...errors import DmpoEdgeError
from ...preprocess import to_rgb_uint8
from .._common import input_shape
from ..checks import check_batch
from . import IMAGE, INPUT

__all__ = ["ServeHandler", "Dispatcher", "decode_image_bytes"]


def decode_image_bytes(data, where: str = "request image") -> np.ndarray:
    """Encoded image bytes -> H x W x 3 uint8, the conversions of :func:`dmpo_edge.images.load_image`."""
    Image = require("PIL.Image", "decoding images sent to the server")
    if isinstance(data, np.ndarray):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise DmpoEdgeError(where, "empty image. Expected the bytes of a JPEG or PNG file")
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
            if im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except Exception as exc:  # PIL raises many types for corrupt data; all mean "undecodable"
        raise DmpoEdgeError(where, f"cannot decode {len(data)} bytes ({type(exc).__name__}: {exc}). "
                            "Expected the bytes of a JPEG or PNG file") from None
    return to_rgb_uint8(arr, where=where)


class _Future:
    __slots__ = ("event", "value", "error")

    def __init__(self):
        self.event = threading.Event()
        self.value = None
        self.error = None

    def set(self, value=None, error=None):
        self.value, self.error = value, error
        self.event.set()

    def result(self):
        self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class Dispatcher:
    """Runs batches from many threads through one pipeline with batches in flight.

    Callers ``submit`` under a lock (so submit order is the pipeline's result order) and wait on a future;
    one collector thread takes each finished batch off the pipeline and wakes its caller.
    """

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self._lock = threading.Lock()
        self._ready = threading.Semaphore(0)  # one release per submitted batch
        self._closed = False
        self._collector = threading.Thread(target=self._collect, name="dmpo-serve-collector", daemon=True)
        self._collector.start()

    def run(self, x: np.ndarray):
        fut = _Future()
        with self._lock:
            if self._closed:
                raise DmpoEdgeError("server", "the server is shutting down. Retry on another instance")
            self.pipeline.submit(x, tag=fut, _checked=True)
            self._ready.release()
        return fut.result()

    def _collect(self) -> None:
        while True:
            self._ready.acquire()
            if self._closed and not self.pipeline._pending:
                return
            try:
                for fut, res in self.pipeline.results(wait=True):
                    fut.set(res)
                    break  # one batch per release
            except DmpoEdgeError as exc:  # a failed batch: its caller gets the error, the others go on
                tag = getattr(exc, "tag", None)
                if isinstance(tag, _Future):
                    tag.set(error=exc)

    def close(self) -> None:
        """Finish the batches already submitted, then stop the collector."""
        with self._lock:
            self._closed = True
            self._ready.release()
        self._collector.join(timeout=60)


class ServeHandler:
    """Triton requests in, per-request outputs (or a DmpoEdgeError per bad request) out."""

    def __init__(self, pipeline, metrics=None):
        self.pipeline = pipeline
        self.bundle = pipeline.bundle
        self.shape = input_shape(self.bundle)
        self.preprocess = self.bundle.preprocess
        self.class_names = np.array([str(c).encode() for c in pipeline.classes], dtype=object)
        self.metrics = metrics
        self.dispatcher = Dispatcher(pipeline)

    # --- thresholds (changeable while serving: batches submitted afterwards use them) ---------
    @property
    def thresholds(self) -> list:
        return self.pipeline.thresholds

    def set_thresholds(self, values) -> list:
        self.pipeline.thresholds = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
        return self.pipeline.thresholds

    # --- one request -> rows ---------------------------------------------------------------
    def request_rows(self, inputs: dict) -> np.ndarray:
        """The n x 3 x H x W float32 rows of one request, or a DmpoEdgeError saying what is wrong with it."""
        given = [name for name in (INPUT, IMAGE) if inputs.get(name) is not None]
        if len(given) != 1:
            raise DmpoEdgeError("request", f"got inputs {sorted(inputs)}; expected exactly one of '{INPUT}' "
                                f"(float32 N x {' x '.join(map(str, self.shape))}) or '{IMAGE}' (encoded JPEG/PNG bytes, N x 1)")
        if given[0] == INPUT:
            x = inputs[INPUT]
            if not isinstance(x, np.ndarray) or x.dtype != np.float32:
                raise DmpoEdgeError("request input", f"dtype {getattr(x, 'dtype', type(x).__name__)}; expected FP32")
            if x.ndim >= 1 and x.shape[0] == 0:
                raise DmpoEdgeError("request input", "empty batch (0 images). Send at least one image")
            return check_batch(self.bundle, x, where="request input")
        blobs = np.asarray(inputs[IMAGE], dtype=object).reshape(-1)
        if blobs.size == 0:
            raise DmpoEdgeError("request image", "empty batch (0 images). Send at least one image")
        out = np.empty((blobs.size, *self.shape), np.float32)
        for i, b in enumerate(blobs):
            out[i] = self.preprocess.one(decode_image_bytes(b, where=f"request image {i}"))
        return out

    # --- a Triton batch --------------------------------------------------------------------
    def infer(self, requests: list) -> list:
        """``requests``: one dict of input name -> array per request. Returns, per request, a dict of
        output arrays (n x 1 each) or the DmpoEdgeError that request gets as its error response."""
        out, rows = [None] * len(requests), []
        for i, req in enumerate(requests):
            try:
                rows.append((i, self.request_rows(req)))
            except DmpoEdgeError as exc:
                out[i] = exc
        if rows:
            x = rows[0][1] if len(rows) == 1 else np.concatenate([r for _, r in rows])
            try:
                res = self.dispatcher.run(x)
            except DmpoEdgeError as exc:
                for i, _ in rows:
                    out[i] = exc
            else:
                s = 0
                for i, r in rows:
                    n = r.shape[0]
                    pred = res.prediction[s:s + n]
                    out[i] = {
                        "prediction": pred.astype(np.int64).reshape(n, 1),
                        "class_name": self.class_names[pred].reshape(n, 1),
                        "confidence": res.confidence[s:s + n].astype(np.float32).reshape(n, 1),
                        "exit_stage": res.exit_stage[s:s + n].astype(np.int32).reshape(n, 1),
                    }
                    s += n
                if self.metrics is not None:
                    self.metrics.record_batch(res.exit_stage)
        if self.metrics is not None:
            failed = sum(isinstance(o, Exception) for o in out)
            self.metrics.record_requests(len(out) - failed, failed)
        return out

    def close(self) -> None:
        self.dispatcher.close()
