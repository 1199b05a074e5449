"""Streaming: frame source -> preprocessing -> micro-batches -> early-exit pipeline -> per-frame results.

``for r in stream(bundle, source): ...`` is the embedding API; ``dmpo-edge run`` prints what it yields.

- A reader thread pulls frames from the source and preprocesses them with the bundle's own
  :class:`~dmpo_edge.preprocess.Preprocess` (the calibration preprocessing), so decoding and resizing
  overlap inference.
- The micro-batcher takes up to ``batch`` frames, waiting at most ``max_wait_ms`` after the first one,
  and submits them to the pipeline; results come back in frame order while later batches are in flight.
- Lossless mode (default for folders and files) never drops a frame: the reader waits when the
  batcher is behind. Real-time mode (default for cameras and live pipelines) keeps only the newest
  frames: when the queue is full the oldest waiting frame is dropped and counted.
- A source that fails or ends early stops the reader; every frame read before is still classified
  and yielded, then the source's DmpoEdgeError is raised. ``summary()`` has the counts either way.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import DmpoEdgeError
from .checks import MAX_IN_FLIGHT, check_float, check_int
from .pipeline import Pipeline
from .sources import FrameSource, open_source

__all__ = ["FrameResult", "Stream", "stream", "LATENCY_WINDOW"]

#: latency percentiles in ``summary()`` are over the most recent frames, at most this many
LATENCY_WINDOW = 10_000


@dataclass
class FrameResult:
    index: int  # frame position in the source
    name: str
    prediction: int
    label: str  # class name
    confidence: float
    exit_stage: int
    latency_ms: float  # capture -> result
    batch_size: int
    truth: str | None = None  # class sub-folder of a folder source

    def as_dict(self) -> dict:
        return asdict(self)


class _End:
    def __init__(self, error=None):
        self.error = error


class Stream:
    """Iterable over :class:`FrameResult`; see :func:`stream`. ``summary()`` after (or during) iteration."""

    def __init__(self, bundle, source, batch: int | None = None, max_wait_ms: float = 20.0, realtime: bool | None = None,
                 limit: int | None = None, pipeline: Pipeline | None = None, backend="auto", thresholds=None,
                 max_in_flight: int = 2, width: int | None = None, height: int | None = None, skip_bad: bool = False,
                 queue_frames: int | None = None, pipeline_options: dict | None = None, max_file_bytes: int | None = None,
                 max_pixels: int | None = None):
        # numbers first, before a thread or a session exists: inf / 1e300 ms, batch 0, limit -1 are mistakes
        where = "stream"
        batch = None if batch is None else check_int(batch, "batch", where)
        max_wait_ms = check_float(max_wait_ms, "max_wait_ms", where, 0.0, 60_000.0)
        limit = None if limit is None else check_int(limit, "limit", where, 1, 1 << 62)
        max_in_flight = check_int(max_in_flight, "max_in_flight", where, 1, MAX_IN_FLIGHT)
        # The pipeline is built from the path itself: it loads, verifies and creates the sessions under the
        # bundle's shared swap lock, so a compile or calibrate cannot swap files in between.
        self._own_pipeline = pipeline is None
        self.pipeline = pipeline or Pipeline.from_bundle(bundle, backend=backend, thresholds=thresholds,
                                                         max_in_flight=max_in_flight, **(pipeline_options or {}))
        self.bundle = self.pipeline.bundle
        self._own_source = not isinstance(source, FrameSource)
        try:
            self.source = open_source(source, width=width, height=height, skip_bad=skip_bad, max_file_bytes=max_file_bytes,
                                      max_pixels=max_pixels) if self._own_source else source
        except BaseException:
            if self._own_pipeline:
                self.pipeline.close()
            raise
        self.batch = int(batch or min(8, self.bundle.max_batch))
        if not 1 <= self.batch <= 1 << 16:
            raise DmpoEdgeError("stream", f"batch {batch!r} must be a positive integer")
        self.max_wait_s = max(0.0, float(max_wait_ms)) / 1000.0
        self.realtime = self.source.live if realtime is None else bool(realtime)
        self.limit = None if limit is None else int(limit)
        self.preprocess = self.bundle.preprocess
        cap = queue_frames or (self.batch if self.realtime else 4 * self.batch)
        self._q = collections.deque()
        self._cap = max(1, cap)
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._reader = None
        self.frames_read = 0
        self.frames_dropped = 0
        self.frames_done = 0
        self.exit_counts = [0] * self.bundle.num_stages
        self.correct = 0
        self.labelled = 0
        # bounded: a stream runs for weeks, and one float per frame would grow without end (~80 MB a day at 30 fps)
        self.latencies_ms = collections.deque(maxlen=LATENCY_WINDOW)
        self.error = None
        self.stage_error = None  # the first failed batch's DmpoEdgeError (names the stage)
        self.frames_failed = 0  # frames of failed batches that never got a result
        self.t_start = None
        self.t_end = None

    # --- reader thread ---------------------------------------------------------------------
    def _read_loop(self):
        end = _End()
        try:
            while not self._stop.is_set():
                if self.limit is not None and self.frames_read >= self.limit:
                    break
                f = self.source.read()
                if f is None:
                    break
                x = self.preprocess.one(f.image)
                self.frames_read += 1
                with self._cv:
                    if self.realtime:
                        while len(self._q) >= self._cap:
                            self._q.popleft()  # the stalest waiting frame goes
                            self.frames_dropped += 1
                    else:
                        while len(self._q) >= self._cap and not self._stop.is_set():
                            self._cv.wait(0.1)
                    self._q.append((f, x))
                    self._cv.notify_all()
        except DmpoEdgeError as exc:
            end.error = exc
        except Exception as exc:  # a decoder crash is a source failure, not a runtime bug
            end.error = DmpoEdgeError(f"source {self.source.uri}", f"reading failed ({type(exc).__name__}: {exc})")
        finally:
            with self._cv:
                self._q.append(end)
                self._cv.notify_all()

    def _next_batch(self):
        """Up to ``batch`` frames: block for the first, then wait at most max_wait for the rest."""
        items, end = [], None
        with self._cv:
            while not self._q:
                self._cv.wait(0.5)
            deadline = time.perf_counter() + self.max_wait_s
            while len(items) < self.batch:
                if self._q:
                    it = self._q.popleft()
                    self._cv.notify_all()
                    if isinstance(it, _End):
                        end = it
                        break
                    items.append(it)
                    continue
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
        return items, end

    # --- iteration -------------------------------------------------------------------------
    def __iter__(self):
        self.t_start = time.perf_counter()
        self._reader = threading.Thread(target=self._read_loop, name="dmpo-source", daemon=True)
        self._reader.start()
        p = self.pipeline
        end = None
        try:
            while end is None and self.stage_error is None:
                items, end = self._next_batch()
                if items:
                    x = np.stack([x for _, x in items])
                    p.submit(x, tag=[f for f, _ in items])
                yield from self._collect(wait=False)
            if self.stage_error is not None:
                # a stage failed: read no more frames, but classify those already read and finish every batch
                self._stop.set()
                with self._cv:
                    self._cv.notify_all()
                while end is None:
                    items, end = self._next_batch()
                    if items:
                        p.submit(np.stack([x for _, x in items]), tag=[f for f, _ in items])
                    yield from self._collect(wait=False)
            yield from self._collect(wait=True)
        finally:
            self._shutdown()
        self.t_end = time.perf_counter()
        if self.stage_error is not None:
            exc = self.stage_error
            lost = self.frames_read - self.frames_done
            self.error = DmpoEdgeError(exc.where, f"{exc.message} ({lost} of {self.frames_read} frame(s) read were not "
                                       "classified; every other frame was delivered)")
            raise self.error
        if end is not None and end.error is not None:
            self.error = end.error
            raise end.error

    def _collect(self, wait: bool):
        """Results of finished batches in frame order. A failed batch (its stage raised) is noted, its frames
        that exited before the failure are still delivered, and collection goes on with the next batch."""
        while True:
            try:
                yield from self._deliver(self.pipeline.results(wait=wait), None)
                return
            except DmpoEdgeError as exc:
                if self.stage_error is None:
                    self.stage_error = exc
                frames, part = getattr(exc, "tag", None), getattr(exc, "partial", None)
                if frames and part is not None:
                    done = part.exit_stage >= 0
                    self.frames_failed += int((~done).sum())
                    yield from self._deliver([(frames, part)], done)

    def _deliver(self, finished, only):
        classes = self.pipeline.classes
        for frames, r in finished:
            now = time.perf_counter()
            for i, f in enumerate(frames):
                if only is not None and not only[i]:
                    continue
                cls = int(r.prediction[i])
                lat = (now - f.t_capture) * 1000.0
                k = int(r.exit_stage[i])
                self.exit_counts[k] += 1
                self.latencies_ms.append(lat)
                if f.label is not None:
                    self.labelled += 1
                    self.correct += int(classes[cls] == f.label)
                self.frames_done += 1
                yield FrameResult(f.index, f.name, cls, classes[cls], float(r.confidence[i]), k, lat, len(frames), f.label)

    def _shutdown(self):
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self._own_source:
            self.source.close()
        if self._own_pipeline:
            self.pipeline.close()
        if self.t_end is None:
            self.t_end = time.perf_counter()

    def summary(self) -> dict:
        """Frames read / classified / dropped, FPS, latency percentiles (ms), exits per stage, accuracy if labelled."""
        elapsed = ((self.t_end or time.perf_counter()) - self.t_start) if self.t_start else 0.0
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        flops = self.bundle.cumulative_flops
        done = max(1, self.frames_done)
        exp_flops = sum(c * f for c, f in zip(self.exit_counts, flops)) / done
        out = {
            "source": self.source.uri,
            "mode": "realtime" if self.realtime else "lossless",
            "frames_read": self.frames_read,
            "frames_classified": self.frames_done,
            "frames_dropped": self.frames_dropped,
            "elapsed_s": round(elapsed, 4),
            "fps": round(self.frames_done / elapsed, 2) if elapsed > 0 else None,
            "latency_ms": {"mean": round(float(lat.mean()), 3), "p50": round(float(np.percentile(lat, 50)), 3),
                           "p90": round(float(np.percentile(lat, 90)), 3), "p99": round(float(np.percentile(lat, 99)), 3)},
            "exit_counts": list(self.exit_counts),
            "exit_fractions": [round(c / done, 4) for c in self.exit_counts],
            "ideal_speedup": round(flops[-1] / exp_flops, 3) if exp_flops > 0 and self.frames_done else None,
            "thresholds": self.pipeline.thresholds,
            "backend": self.pipeline.backend.name,
        }
        if self.labelled:
            out["accuracy"] = round(self.correct / self.labelled, 4)
            out["labelled"] = self.labelled
        if getattr(self.source, "skipped", None):
            out["skipped"] = list(self.source.skipped)
            out["skip_reasons"] = list(getattr(self.source, "skip_reasons", []))
        if getattr(self.source, "ignored", None):
            out["ignored"] = list(self.source.ignored)
        if self.frames_failed:
            out["frames_failed"] = self.frames_failed
        if self.error is not None:
            out["error"] = str(self.error)
        return out


def stream(bundle, source, **kw) -> Stream:
    """Classify frames from ``source`` (URI or FrameSource) with ``bundle``; iterate for FrameResults.

    Keywords: ``batch`` (frames per micro-batch, default min(8, max_batch)), ``max_wait_ms`` (20),
    ``realtime`` (default: True for cameras/live pipelines, False for files and folders), ``limit``
    (stop after N frames), ``backend`` (auto), ``thresholds``, ``max_in_flight``, ``pipeline`` (reuse a
    Pipeline), ``width``/``height`` (camera / GStreamer frame size), ``skip_bad`` (skip undecodable images),
    ``max_file_bytes`` / ``max_pixels`` (per-image limits checked before decoding; see dmpo_edge.images).
    """
    return Stream(bundle, source, **kw)
