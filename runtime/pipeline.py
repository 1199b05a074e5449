"""The early-exit pipeline: batches flow through stage workers, exits leave, survivors regroup on the device.

(Over 500 lines on purpose: submit/predict/results/close and the stage workers share one condition variable
and its counters - batches in flight, groups upstream of each stage, caller-thread runs - and every invariant
of that lock is visible in this one file; split, each half would hold half of them.)

One worker thread per stage; stage 0, which every sample passes and where most leave, has one per
batch in flight when the backend takes concurrent calls (ONNX Runtime), so that batches in flight
keep every core busy there too. A *group* is the unit of work: some rows of one or more submitted batches
plus the previous stage's ``features`` and a ``keep_idx`` naming the surviving rows in it. Stage k runs
the group, reads N confidences (never the features), writes the results of the rows that exit and hands
the survivors (``keep_idx`` = their positions in this stage's output) to stage k+1. While stage k+1
works on batch b, stage k already runs batch b+1, so the exit decisions overlap device work
(ONNX Runtime and TensorRT release the GIL while they compute).

Caller-thread path: ``predict`` / ``run_static`` on at most one batch (``n <= min(batch_size,
max_batch)``) while nothing else is in flight run the stages in the caller's thread, one after the
other. With a single batch there is nothing to overlap, and handing the batch to the stage-0 worker
and waiting to be woken again cost two thread wake-ups per call (on a loaded 2-core host: 2.1 ms for
the ONNX Runtime call, 6.2 ms through the workers, batch 8). The same ``_run_group`` does the work on
both paths, so exits, classes and order are identical; ``submit`` / ``results`` streaming and larger
inputs keep the in-flight workers. For backends whose stage engines take one call at a time (TensorRT:
a context and staging buffers per stage) a per-stage lock keeps it so, whichever path the group came
from. Inside the caller-thread path the backend may use the whole machine (``Backend.exclusive``:
ONNX Runtime switches to sessions with all cores for stage calls with enough work).

Shapes: ``buckets`` pads a group up to the next bucket size by repeating its last ``keep_idx`` (the
padded rows' results are dropped), so an engine sees a few shapes only; ``refill`` merges a shrunken
group with survivors of later batches already waiting at the same stage, so deep stages run fuller
batches. See ``benchmarks/runtime_shapes.py`` for what each costs or saves on the CPU backend.

Exit rule: at stage k < K-1 a sample exits when ``confidence >= thresholds[k]``; the last stage takes
everyone. Thresholds are read when a batch is submitted, so changing them at run time affects the
batches submitted afterwards and never half a batch.

Bad input (wrong shape or dtype, NaN / Inf) is refused at ``submit`` with a DmpoEdgeError.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import DmpoEdgeError
from ..locking import swap_lock
from ._common import as_bundle
from .backends import Backend, get_backend
from .checks import MAX_IN_FLIGHT, check_batch, check_int

__all__ = ["Pipeline", "Results", "StageStats"]

_STOP = object()


@dataclass
class Results:
    """Per-sample results of one batch, in input order."""

    prediction: np.ndarray  # int64 [N]: class index (see Pipeline.classes)
    confidence: np.ndarray  # float32 [N]: exit score at the exit stage
    exit_stage: np.ndarray  # int32 [N]: 0-based stage the sample left at
    logits: np.ndarray | None = None  # float32 [N, C] when asked for
    latency_s: float = 0.0  # submit -> last sample of the batch finished

    def __len__(self) -> int:
        return int(self.prediction.shape[0])

    @classmethod
    def concat(cls, parts: list) -> "Results":
        if not parts:
            raise ValueError("no results to concatenate")
        logits = None if any(p.logits is None for p in parts) else np.concatenate([p.logits for p in parts])
        return cls(np.concatenate([p.prediction for p in parts]), np.concatenate([p.confidence for p in parts]),
                   np.concatenate([p.exit_stage for p in parts]), logits, max(p.latency_s for p in parts))


@dataclass
class StageStats:
    samples_in: int = 0
    exited: int = 0
    batches: int = 0
    time_s: float = 0.0
    padded: int = 0  # rows added by bucket padding
    merged: int = 0  # groups merged into another by refill

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Batch:
    """One submitted batch: its result arrays fill up as its rows exit."""

    __slots__ = ("id", "tag", "n", "x", "thresholds", "want_logits", "prediction", "confidence", "exit_stage",
                 "logits", "remaining", "error", "done", "t_submit", "t_done")

    def __init__(self, bid, tag, x, thresholds, want_logits, num_classes):
        self.id, self.tag, self.x, self.n = bid, tag, x, int(x.shape[0])
        self.thresholds = thresholds
        self.want_logits = want_logits
        self.prediction = np.full(self.n, -1, np.int64)
        self.confidence = np.zeros(self.n, np.float32)
        self.exit_stage = np.full(self.n, -1, np.int32)
        self.logits = np.zeros((self.n, num_classes), np.float32) if want_logits else None
        self.remaining = self.n
        self.error = None
        self.done = threading.Event()
        self.t_submit = time.perf_counter()
        self.t_done = None

    def results(self) -> Results:
        return Results(self.prediction, self.confidence, self.exit_stage, self.logits,
                       (self.t_done or time.perf_counter()) - self.t_submit)


def _batch_failure(batch: "_Batch") -> DmpoEdgeError:
    """The error of a failed batch, for the caller: names the stage, and carries the batch's ``tag`` and
    ``partial`` results (rows that exited before the failure; ``exit_stage`` -1 for the rest), so that no
    finished result is lost with it. A fresh exception per batch: several batches may share one cause."""
    err = batch.error
    exc = DmpoEdgeError(err.where, err.message) if isinstance(err, DmpoEdgeError) else DmpoEdgeError("pipeline", str(err))
    exc.tag = batch.tag
    r = batch.results()
    exc.partial = Results(r.prediction.copy(), r.confidence.copy(), r.exit_stage.copy(),
                          None if r.logits is None else r.logits.copy(), r.latency_s)
    exc.__cause__ = err if err is not exc else None
    return exc


@dataclass
class _Group:
    """Rows of one or more batches that go through one stage together."""

    batches: list  # _Batch per segment
    rows: list  # np.int64 rows (into the batch) per segment, in the order of keep_idx
    features: list = field(default_factory=list)  # one features value per segment source (None at stage 0)
    keep_idx: np.ndarray | None = None  # positions into the (merged) features, int32

    @property
    def size(self) -> int:
        return int(sum(r.shape[0] for r in self.rows))


def _check_thresholds(values, num_stages: int, where="thresholds") -> tuple:
    try:
        if isinstance(values, (str, bytes)) or any(isinstance(v, (str, bytes, bool)) for v in values):
            raise TypeError("text")  # "999" is not [9, 9, 9]
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError, OverflowError):
        raise DmpoEdgeError(where, f"{values!r} is not a list of numbers. Expected {num_stages - 1} floats (one per early exit)") from None
    if len(vals) != num_stages - 1:
        raise DmpoEdgeError(where, f"got {len(vals)} thresholds, expected {num_stages - 1} (one per early exit; the last exit takes everyone)")
    if any(math.isnan(v) for v in vals):
        raise DmpoEdgeError(where, f"thresholds {list(vals)} contain NaN. Expected numbers (inf = never exit there)")
    return vals


def _check_buckets(buckets, max_batch: int):
    if buckets is None or buckets is False:
        return None
    if buckets == "pow2" or buckets is True:
        b, out = 1, []
        while b < max_batch:
            out.append(b)
            b *= 2
        return tuple(out + [max_batch])
    try:
        out = sorted({int(b) for b in buckets})
    except (TypeError, ValueError):
        raise DmpoEdgeError("buckets", f"{buckets!r} is not a list of batch sizes (or 'pow2')") from None
    if not out or out[0] < 1:
        raise DmpoEdgeError("buckets", f"{buckets!r}: bucket sizes must be positive")
    return tuple([b for b in out if b < max_batch] + [max_batch])


def _default_backend_options(kind, bundle, max_in_flight: int, opts: dict) -> dict:
    """Size the backend for the batches in flight unless the caller did.

    ONNX Runtime: stages that run at the same time share the cores, so each session gets
    cores / (stages busy at once) intra-op threads, and the one-batch caller-thread path, where
    nothing else runs, a second set of sessions with all cores (used for stage calls of at least
    64 MFLOPs; see :class:`~.backends.ort.OrtBackend`). Spinning is off whenever several stage
    sessions exist: each has its own pool, and an idle pool that spins after its stage burns the cores
    the next stage (or another batch in flight) needs - measured 3x slower under load. One
    process-wide pool shared by the sessions was measured too and not kept (its spinning cannot be
    turned off from Python). TensorRT: one device features buffer per group that can wait, plus two.
    """
    name = getattr(kind, "name", "")
    busy = max(1, min(int(max_in_flight), bundle.num_stages))
    if name == "ort":
        if "threads" not in opts:  # an explicit thread count is the caller's whole answer
            from .backends.ort import _default_threads

            cores = _default_threads()
            opts["threads"] = max(1, cores // busy)
            if opts["threads"] < cores and "exclusive_threads" not in opts:
                opts["exclusive_threads"] = cores
        if "spinning" not in opts and bundle.num_stages > 1:
            opts["spinning"] = False
    elif name == "trt" and "features_buffers" not in opts:
        opts["features_buffers"] = int(max_in_flight) + 2
    return opts


class Pipeline:
    """Early-exit inference over a bundle. Build with :meth:`from_bundle`; use as a context manager."""

    def __init__(self, bundle, backend: Backend, thresholds=None, max_in_flight: int = 2, buckets=None,
                 refill: bool = False, refill_wait_ms: float = 0.0):
        self.bundle = bundle
        self.backend = backend
        self.num_stages = bundle.num_stages
        self.classes = list(bundle.classes)
        self.num_classes = len(self.classes)
        if thresholds is None:
            thresholds = bundle.thresholds
        if thresholds is None:
            if self.num_stages > 1:
                raise DmpoEdgeError(f"bundle {bundle.path}", "has no exit thresholds. Run 'dmpo-edge calibrate BUNDLE --val DATA --max-drop 0.01' "
                                    "first, or pass thresholds=[...] (one per early exit)")
            thresholds = ()
        self._thresholds = _check_thresholds(thresholds, self.num_stages)
        self.backend.activate()
        self.max_batch = backend.max_batch  # TensorRT engines may be built for less than the manifest's max batch
        self.max_in_flight = check_int(max_in_flight, "max_in_flight", "pipeline", 1, MAX_IN_FLIGHT)
        self.buckets = _check_buckets(buckets, self.max_batch)
        use = getattr(backend, "use_buckets", None)
        if use is not None:
            use(self.buckets)  # TensorRT: one CUDA graph per bucket shape
        self.refill = bool(refill)
        self.refill_wait_s = max(0.0, float(refill_wait_ms)) / 1000.0
        self._stats = [StageStats() for _ in range(self.num_stages)]
        self._stats_lock = threading.Lock()
        self._cv = threading.Condition()
        self._pending = collections.deque()  # batches in submit order, not yet handed out by results()
        self._private = []  # one deque of batches per predict() call in progress (close() fails them too)
        self._in_flight = 0
        self._next_id = 0
        self._closed = False
        self._upstream = [0] * self.num_stages  # groups queued for or running in stages < k (refill waits on them)
        self._queues = [queue.Queue() for _ in range(self.num_stages)]
        self._caller_runs = 0  # predict()/run_static() calls running stages in their own thread
        # Backends whose stage engines take one call at a time (TensorRT: a context and staging buffers per
        # stage) get a lock per stage: a worker and a caller-thread run may meet there. ONNX Runtime sessions
        # take concurrent calls, so stage 0 - which every sample passes, and where most leave - gets one
        # worker per batch in flight: with one, a stream whose samples mostly exit at stage 0 keeps one
        # core busy and leaves the others idle.
        concurrent = bool(getattr(backend, "concurrent_calls", False))
        self._stage_locks = [contextlib.nullcontext() if concurrent else threading.Lock() for _ in range(self.num_stages)]
        replicas = [max_in_flight if (concurrent and k == 0) else 1 for k in range(self.num_stages)]
        self._worker_stage = [k for k in range(self.num_stages) for _ in range(replicas[k])]
        self._workers = [threading.Thread(target=self._worker, args=(k,), daemon=True,
                                          name=f"dmpo-stage-{k}" + (f".{i}" if i else ""))
                         for k in range(self.num_stages) for i in range(replicas[k])]
        for w in self._workers:
            w.start()

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path_or_bundle, backend="auto", thresholds=None, max_in_flight: int = 2, buckets=None,
                    refill: bool = False, refill_wait_ms: float = 0.0, backend_options: dict | None = None) -> "Pipeline":
        """Load (and verify) a bundle and start the stage workers.

        ``backend``: ``auto`` (TensorRT when it, a GPU and engines for this device exist, else ONNX Runtime),
        ``ort``, ``trt``, ``null``, a Backend class or an instance. ``thresholds``: K-1 floats overriding the
        manifest's. ``buckets``: None, ``"pow2"`` or a list of batch sizes. ``refill``: merge shrunken groups.
        """
        if isinstance(backend, Backend):
            return cls(backend.bundle, backend, thresholds, max_in_flight, buckets, refill, refill_wait_ms)
        # Load, verify and create the sessions under the bundle's shared swap lock: a compile or calibrate
        # swapping the bundle meanwhile waits, so the sessions come from the files that were verified.
        reading = (swap_lock(str(path_or_bundle), shared=True) if isinstance(path_or_bundle, (str, os.PathLike))
                   and os.path.isdir(path_or_bundle) else contextlib.nullcontext())
        with reading:
            bundle = as_bundle(path_or_bundle)
            kind = backend if isinstance(backend, type) else get_backend(backend, bundle)
            opts = _default_backend_options(kind, bundle, max_in_flight, dict(backend_options or {}))
            be = kind(bundle, **opts)
            be.activate()  # sessions / engines are created here, from the verified files
        try:
            return cls(bundle, be, thresholds, max_in_flight, buckets, refill, refill_wait_ms)
        except BaseException:
            be.deactivate()
            raise

    # --- thresholds / stats ----------------------------------------------------------------
    @property
    def thresholds(self) -> list:
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, values) -> None:
        self._thresholds = _check_thresholds(values, self.num_stages)

    def stats(self) -> list:
        """Per-stage counters: ``samples_in``, ``exited``, ``batches``, ``time_s`` (backend time), ``padded``, ``merged``."""
        with self._stats_lock:
            return [s.as_dict() for s in self._stats]

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats = [StageStats() for _ in range(self.num_stages)]

    # --- submit / results ------------------------------------------------------------------
    def submit(self, x, tag=None, return_logits: bool = False, thresholds=None, exits: bool = True,
               _checked: bool = False) -> None:
        """Queue a batch (N x 3 x H x W float32, any N >= 0; split into groups of at most max_batch).

        Blocks while ``max_in_flight`` batches are still being computed. ``thresholds`` overrides the
        pipeline's for this batch; ``exits=False`` sends every sample to the last stage (the static baseline).
        """
        if not _checked:
            x = check_batch(self.bundle, x, where="pipeline submit")
        self._enqueue(x, tag, return_logits, self._batch_thresholds(thresholds, exits), self._pending)

    def _enqueue(self, x, tag, return_logits: bool, thr: tuple, owner) -> "_Batch":
        """Queue one checked batch; ``owner`` is the collection that hands its result out (``_pending`` for
        submit(), a predict() call's own set, so that concurrent predict() calls never take each other's)."""
        with self._cv:
            if self._closed:
                raise DmpoEdgeError("pipeline", "submit() after close(). Build a new Pipeline")
            while self._in_flight >= self.max_in_flight:
                self._cv.wait()
                if self._closed:
                    raise DmpoEdgeError("pipeline", "the pipeline was closed while submit() waited")
            batch = _Batch(self._next_id, tag, x, thr, return_logits, self.num_classes)
            self._next_id += 1
            owner.append(batch)
            if batch.n == 0:
                batch.t_done = batch.t_submit
                batch.done.set()
                self._cv.notify_all()
                return batch
            self._in_flight += 1
            starts = list(range(0, batch.n, self.max_batch))
            for k in range(1, self.num_stages):
                self._upstream[k] += len(starts)
        for s in starts:
            rows = np.arange(s, min(s + self.max_batch, batch.n), dtype=np.int64)
            self._queues[0].put(_Group([batch], [rows]))
        return batch

    def _batch_thresholds(self, thresholds, exits: bool) -> tuple:
        if not exits:
            return (math.inf,) * (self.num_stages - 1)
        return self._thresholds if thresholds is None else _check_thresholds(thresholds, self.num_stages)

    def results(self, wait: bool = True):
        """Yield ``(tag, Results)`` in submit order for every batch submitted so far.

        With ``wait=False`` only the finished batches at the head of the order are yielded (for
        interleaving with ``submit`` in a streaming loop). A batch whose stage failed raises its error.
        """
        while True:
            with self._cv:
                if not self._pending:
                    return
                batch = self._pending[0]
                if not batch.done.is_set():
                    if not wait:
                        return
                    while not batch.done.is_set():
                        self._cv.wait(0.5)
                if not self._pending or self._pending[0] is not batch:
                    continue  # another thread's results() took it while this one waited: look at the new head
                self._pending.popleft()
            if batch.error is not None:
                raise _batch_failure(batch)
            yield batch.tag, batch.results()

    def predict(self, x, return_logits: bool = False, batch_size: int | None = None, thresholds=None) -> Results:
        """Classify ``x`` (N x 3 x H x W float32) with early exits; results in input order.

        ``x`` is cut into batches of ``batch_size`` (default max_batch) that flow with up to
        ``max_in_flight`` in flight.
        """
        return self._run(x, return_logits, batch_size, thresholds, True)

    def run_static(self, x, return_logits: bool = False, batch_size: int | None = None) -> Results:
        """Every sample through every stage (no exits): the static full-model baseline, same backend and batching."""
        return self._run(x, return_logits, batch_size, None, False)

    def _run(self, x, return_logits, batch_size, thresholds, exits) -> Results:
        x = check_batch(self.bundle, x, where="pipeline predict")  # the only check: submit() trusts it
        bs = self.max_batch if batch_size is None else check_int(batch_size, "batch_size", "pipeline predict", 1, 1 << 30)
        n = x.shape[0]
        thr = self._batch_thresholds(thresholds, exits)
        if n <= min(bs, self.max_batch):
            batch = self._claim_caller_thread(x, thr, return_logits)
            if batch is not None:
                return self._run_in_caller_thread(batch)
        # This call's batches are its own (not in the submit()/results() order): predict() from several threads,
        # or beside a submit() stream, gets exactly its own rows back.
        mine = collections.deque()
        with self._cv:
            self._private.append(mine)
        try:
            for s in range(0, max(n, 1), bs):
                self._enqueue(x[s:s + bs], None, return_logits, thr, mine)
            parts = []
            for batch in mine:
                batch.done.wait()
                if batch.error is not None:
                    raise _batch_failure(batch)
                parts.append(batch.results())
        finally:
            with self._cv:
                self._private.remove(mine)
        return Results.concat(parts)

    def _claim_caller_thread(self, x, thr, want_logits) -> _Batch | None:
        """A batch to run in the caller's thread, or None when other batches are in flight (then the workers
        take it, so it queues behind them instead of competing for the cores)."""
        with self._cv:
            if self._closed:
                raise DmpoEdgeError("pipeline", "predict() after close(). Build a new Pipeline")
            if self._in_flight or self._pending:
                return None
            batch = _Batch(-1, None, x, thr, want_logits, self.num_classes)
            if batch.n:
                self._in_flight += 1  # submit() from another thread sees it and keeps max_in_flight
                self._caller_runs += 1  # close() waits for it
            return batch

    def _run_in_caller_thread(self, batch: _Batch) -> Results:
        if batch.n == 0:
            batch.t_done = batch.t_submit
            return batch.results()
        g = _Group([batch], [np.arange(batch.n, dtype=np.int64)])
        try:
            return self._caller_stages(batch, g)
        finally:
            with self._cv:
                self._caller_runs -= 1
                self._cv.notify_all()

    def _caller_stages(self, batch: _Batch, g: _Group) -> Results:
        k = 0
        try:
            lease = getattr(self.backend, "exclusive", contextlib.nullcontext)
            with lease():  # nothing else in flight: the backend may use the whole machine
                while g is not None:
                    g = self._run_group(k, g, k == self.num_stages - 1)
                    k += 1
        except BaseException as exc:
            # the same error a worker would give this batch; Ctrl-C and the like pass through unchanged
            wrap = isinstance(exc, Exception) and not isinstance(exc, DmpoEdgeError)
            err = DmpoEdgeError(f"pipeline stage {k}", f"{type(exc).__name__}: {exc}") if wrap else exc
            self._fail(g, err)
            if wrap:
                raise err from exc
            raise
        if not batch.done.is_set():  # cannot happen: the last stage takes everyone
            raise DmpoEdgeError("pipeline", f"{batch.remaining} sample(s) never exited")
        return batch.results()

    # --- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        for k in self._worker_stage:  # one stop per worker: stage 0 may have several
            self._queues[k].put(_STOP)
        for w in self._workers:
            w.join(timeout=30)
        with self._cv:
            for b in [*self._pending, *(b for mine in self._private for b in mine)]:
                if not b.done.is_set():
                    b.error = DmpoEdgeError("pipeline", "closed before this batch finished")
                    b.done.set()
            # A caller-thread predict() may be inside a stage: let it finish before the engines go.
            self._cv.wait_for(lambda: self._caller_runs == 0, timeout=30)
        self.backend.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    # --- stage workers ---------------------------------------------------------------------
    def _worker(self, k: int) -> None:
        q = self._queues[k]
        last = k == self.num_stages - 1
        held = None  # a group taken off the queue by refill that did not fit: it runs next
        while True:
            g, held = (held, None) if held is not None else (q.get(), None)
            if g is _STOP:
                return
            if self.refill and k > 0:
                g, held = self._refill(k, g)
            try:
                self._run_group(k, g, last, self._hand_on)
            except BaseException as exc:  # a failed stage fails its batches, never the worker
                err = exc if isinstance(exc, DmpoEdgeError) else DmpoEdgeError(
                    f"pipeline stage {k}", f"{type(exc).__name__}: {exc}")
                self._fail(g, err)
            finally:
                with self._cv:  # this group no longer feeds the stages after k
                    for j in range(k + 1, self.num_stages):
                        self._upstream[j] -= 1

    def _refill(self, k: int, g: _Group):
        """Merge later groups waiting at stage k into ``g`` while it stays within max_batch.

        Returns ``(group to run, group to run next or None)``. Waits up to ``refill_wait_ms`` for more
        survivors only while earlier stages still hold work that can reach stage k.
        """
        q = self._queues[k]
        deadline = time.perf_counter() + self.refill_wait_s
        while g.size < self.max_batch:
            try:
                if self.refill_wait_s and self._upstream[k] > 0:
                    nxt = q.get(timeout=max(1e-4, deadline - time.perf_counter()))
                else:
                    nxt = q.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP or g.size + nxt.size > self.max_batch:
                return g, nxt
            try:
                g = self._merge(g, nxt)
            except BaseException as exc:
                self._fail(nxt, exc if isinstance(exc, DmpoEdgeError) else DmpoEdgeError(f"pipeline stage {k}", str(exc)))
                break
            finally:
                with self._cv:  # the merged group is gone as a unit of work
                    for j in range(k + 1, self.num_stages):
                        self._upstream[j] -= 1
            with self._stats_lock:
                self._stats[k].merged += 1
        return g, None

    def _merge(self, a: _Group, b: _Group) -> _Group:
        feats, keep = self.backend.merge_features(a.features + b.features, [a.keep_idx, b.keep_idx])
        return _Group(a.batches + b.batches, a.rows + b.rows, [feats], keep)

    def _hand_on(self, k: int, nxt: _Group) -> None:
        """Worker path: queue stage k's survivors for the stage k+1 worker."""
        # Count it before queueing, so a waiting refill never sees "nothing upstream" while it exists.
        with self._cv:
            for j in range(k + 2, self.num_stages):
                self._upstream[j] += 1
        self._queues[k + 1].put(nxt)

    def _run_group(self, k: int, g: _Group, last: bool, hand_on=None) -> _Group | None:
        """Run stage k on ``g``, write the results of the rows that exit; returns the survivors' group.

        ``hand_on(k, survivors)`` (the workers' queue) gets the survivors before the exits are written,
        so the next stage starts while this one bookkeeps.
        """
        n = g.size
        pad = 0
        if self.buckets is not None:
            size = next((b for b in self.buckets if b >= n), n)
            pad = size - n
        t0 = time.perf_counter()
        if k == 0:
            (batch,), (rows,) = g.batches, g.rows
            xin = batch.x[rows[0]:rows[-1] + 1]  # stage-0 rows are one contiguous slice
            if pad:
                xin = np.concatenate([xin, np.repeat(xin[-1:], pad, axis=0)])
            feeds = {"input": xin}
        else:
            keep = g.keep_idx
            if pad:
                keep = np.concatenate([keep, np.repeat(keep[-1:], pad)])
            feeds = {"features": g.features[0], "keep_idx": keep}
        try:
            with self._stage_locks[k]:
                out = self.backend.infer(k, feeds, keep_features=not last)
        finally:
            for f in g.features:
                self.backend.release(f)
            g.features = []  # given back: a failure handler must not release them a second time
        dt = time.perf_counter() - t0
        conf = np.asarray(out["confidence"])[:n]
        pred = np.asarray(out["prediction"])[:n]
        logits = out["logits"]
        seg_len = [r.shape[0] for r in g.rows]
        if last:
            exit_mask = np.ones(n, bool)
        else:
            # float64: a threshold just above 1.0 must not round down to 1.0 and let certain samples out.
            thr = np.array([b.thresholds[k] for b in g.batches], np.float64)
            thr = thr[0] if thr.size == 1 else np.repeat(thr, seg_len)  # one batch (the usual case): no per-row copy
            exit_mask = conf.astype(np.float64) >= thr
        n_exit = int(exit_mask.sum())
        with self._stats_lock:
            st = self._stats[k]
            st.samples_in += n
            st.exited += n_exit
            st.batches += 1
            st.time_s += dt
            st.padded += pad
        # Hand survivors on before writing results: the next stage starts while we bookkeep.
        nxt = None
        if not last:
            surv = np.flatnonzero(~exit_mask)
            if surv.size:
                # segments are contiguous and surv is sorted: split it at the segment boundaries
                ends = np.cumsum(seg_len)
                cuts = np.searchsorted(surv, ends)
                batches, rows = [], []
                lo = 0
                for b, seg_rows, start, hi in zip(g.batches, g.rows, ends - seg_len, cuts):
                    if hi > lo:
                        batches.append(b)
                        rows.append(seg_rows[surv[lo:hi] - start])
                    lo = hi
                nxt = _Group(batches, rows, [out["features"]], surv.astype(np.int32))
                if hand_on is not None:
                    hand_on(k, nxt)
            else:
                self.backend.release(out.get("features"))
        if n_exit:
            self._emit(k, g, exit_mask, conf, pred, logits, seg_len)
        return nxt

    def _emit(self, k, g, exit_mask, conf, pred, logits, seg_len) -> None:
        start = 0
        exited = []  # (batch, rows written)
        logits = None if logits is None else np.asarray(logits)
        for b, rows, m in zip(g.batches, g.rows, seg_len):
            pos = np.flatnonzero(exit_mask[start:start + m])
            if pos.size:
                r = rows[pos]
                pos += start
                b.prediction[r] = pred[pos]
                b.confidence[r] = conf[pos]
                b.exit_stage[r] = k
                if b.logits is not None:
                    b.logits[r] = logits[pos]
                exited.append((b, pos.size))
            start += m
        if not exited:
            return
        now = time.perf_counter()
        with self._cv:  # one lock round for all segments; rows are written before any batch can finish
            done = False
            for b, count in exited:
                b.remaining -= count
                if b.remaining == 0 and b.error is None:
                    b.t_done = now
                    b.done.set()
                    self._in_flight -= 1
                    done = True
            if done:
                self._cv.notify_all()

    def _fail(self, g: _Group, err: Exception) -> None:
        for f in g.features:
            try:
                self.backend.release(f)
            except Exception:
                pass
        with self._cv:
            for b in g.batches:
                if not b.done.is_set():
                    b.error = err
                    b.done.set()
                    self._in_flight -= 1
            self._cv.notify_all()
