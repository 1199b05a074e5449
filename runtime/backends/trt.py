"""TensorRT backend: stage engines from ``engines/<device key>/`` run with ``execute_async_v3``.

(Over 500 lines on purpose: activation, the per-call copies, the device-resident features handles and the
refill copies all work on one stage's buffers and streams, and read best side by side; the CUDA graph slots
live in :mod:`.trt_graphs`.)

Built against the name-based tensor API of TensorRT 10.x and 11.x (``num_io_tensors``,
``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_dtype``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``); nothing here uses the binding API removed in 10.0.

Memory: everything is allocated once in ``activate()`` at the bundle's max batch - page-locked host
staging buffers, device buffers for the input, ``keep_idx`` and the three small outputs, and per stage
a pool of device ``features`` buffers. A stage's ``features`` output stays on the device: it is bound
directly as the next stage's features input, and only ``keep_idx`` (int32, N values) is uploaded, so
the gather in the next stage's graph regroups the survivors on the device. Each stage has its own
CUDA stream (the pipeline runs one worker per stage, so batches in flight run on different streams);
an event recorded after a stage orders the next stage's stream behind it.

Timing: with ``record_timings = True`` each ``infer`` also records four CUDA timing events on the stage's
stream - before the copy-in (after any wait on the previous stage), after it, after
``execute_async_v3`` and after the copy-out of the three small outputs - and
``pop_event_timings()`` returns (and clears) ``[{"stage", "h2d_ms", "compute_ms", "d2h_ms"}]``, one
per call. The events are read after the stream synchronisation the exit decision needs anyway, so
recording adds no wait. ``dmpo-edge bench`` turns it on and reports H2D / compute / D2H per iteration.

CUDA graphs: with batch buckets (the pipeline's ``buckets``, passed on through ``use_buckets``) an engine
sees a few shapes only, so each (stage, bucket) gets its own execution context, fixed device buffers of the
bucket's size and a CUDA graph captured once after a warm-up enqueue; inputs are copied into those buffers
and the graph is replayed (see :mod:`.trt_graphs` for why a context per graph). ``cuda_graphs``: None
(default) = on with buckets, off without; True / False forces it. Graphs need the cuda-python device layer
(pycuda has no stream capture): with pycuda the backend logs one line and runs without graphs. The graph
contexts of a stage share one scratch allocation (``USER_MANAGED`` device memory) because they all run on
the stage's one stream, one after another.

Device key: ``<tensorrt version>-<gpu name>-sm<major><minor>-<precision>`` (see :func:`device_key`).
``engines/<key>/engines.json`` records the key and the engine files; an engine is refused unless it
was built for this TensorRT version and GPU - the fix is ``dmpo-edge build BUNDLE`` on this machine.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

import numpy as np

from ..._lazy import available, require
from ...bundle import safe_join, sha256_file
from ...errors import DmpoEdgeError
from .._common import as_bundle, stage_features_input
from .base import Backend
from .trt_graphs import StageGraphs, bucket_key, free_slot, make_slot
from ...engines import ENGINES_DIR, device_key, read_engines_json

__all__ = ["TrtBackend", "trt_ready", "device_key", "find_engines", "this_device_key"]

_POOL_TIMEOUT_S = 120.0
_log = logging.getLogger("dmpo_edge.trt")


def this_device_key(precision: str, device=None) -> str:
    """The device key of this machine (TensorRT version + GPU 0) for ``precision``."""
    from ..device import device_info

    trt = require("tensorrt", "running TensorRT engines")
    info = device_info(device)
    return device_key(trt.__version__, info["gpu"], info["sm"], precision)


def find_engines(bundle, key: str) -> tuple:
    """``(engines folder, engines.json)`` built for ``key``, or a DmpoEdgeError naming ``dmpo-edge build``."""
    b = as_bundle(bundle, verify=False)
    root = os.path.join(b.path, ENGINES_DIR)
    found = []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            d = os.path.join(root, name)
            meta = read_engines_json(d) if os.path.isdir(d) else None
            if meta is None:
                continue
            k = str(meta.get("device_key", name))
            found.append(k)
            if k == key:
                return d, meta
    fix = f"Run 'dmpo-edge build {b.path}' on this machine"
    if not found:
        raise DmpoEdgeError(f"bundle {b.path}", f"has no TensorRT engines. {fix}, or use --backend ort")
    raise DmpoEdgeError(f"bundle {b.path}", f"has engines for {', '.join(found)} but this device is {key} "
                        f"(engines only run on the GPU and TensorRT version that built them). {fix}")


def trt_ready(bundle) -> bool:
    """TensorRT and pycuda/cuda-python import, a GPU answers, and the bundle has engines for it (never raises)."""
    try:
        if not available("tensorrt"):
            return False
        from ..device import cuda_device_present

        if not cuda_device_present():
            return False
        b = as_bundle(bundle, verify=False)
        find_engines(b, this_device_key(b.precision))
        return True
    except Exception:
        return False


class _DevFeatures:
    """A stage's ``features`` output left on the device: ``rows`` valid rows in a pooled buffer."""

    __slots__ = ("buf", "rows", "shape", "dtype", "pool", "event")

    def __init__(self, buf, rows, shape, dtype, pool, event):
        self.buf, self.rows, self.shape, self.dtype, self.pool, self.event = buf, rows, shape, dtype, pool, event

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class _Stage:
    """One engine with its execution context, stream and buffers."""

    def __init__(self):
        self.engine = self.context = self.stream = self.event = None
        self.inputs, self.outputs = [], []
        self.dtypes, self.sample_shape = {}, {}
        self.dev, self.host = {}, {}
        self.shapes = {}  # last set input shape per input: set_input_shape only when the batch changes
        self.profiles = []  # per optimisation profile: {input name: (min batch, max batch)}
        self.profile = 0
        self.pool = self.merge_pool = None
        self.merge_stream = None
        self.feat_in = None
        self.marks = None  # 4 timing events: before copy-in, after it, after execute, after copy-out
        self.graphs = None  # StageGraphs while CUDA graphs are on
        self.engine_names = {}  # contract name -> engine tensor name (they differ only where io_map says so)
        self.scratch = None  # device memory shared by the graph slots' contexts (USER_MANAGED)

    def tensor_name(self, name: str) -> str:
        return self.engine_names.get(name, name)


class TrtBackend(Backend):
    """TensorRT engines of this device. ``device``: ``auto`` | ``pycuda`` | ``cuda-python``.

    ``features_buffers``: device features buffers per stage (the number of groups that may wait at
    the next stage; raise it with ``max_in_flight``).

    ``cuda_graphs``: replay each stage call from a CUDA graph, one per (stage, bucket) with its own execution
    context and fixed buffers - captured once right after that bucket's first (warm-up) ``execute_async_v3``;
    buckets TensorRT cannot capture keep enqueueing. None (default): on when the pipeline runs with batch
    buckets (``use_buckets``), off without; True / False force it. Needs the cuda-python device layer.
    ``max_graphs``: graph slots per stage.
    ``graph_stats()`` counts enqueues, captures, launches and failed captures.
    """

    name = "trt"

    def __init__(self, bundle, device: str = "auto", features_buffers: int = 4, engines_dir: str | None = None,
                 verify_engines: bool = True, cuda_graphs: bool | None = None, max_graphs: int = 16, **_ignored):
        super().__init__(bundle)
        self.device_impl = device
        self.features_buffers = max(2, int(features_buffers))
        self.engines_dir = engines_dir
        self.verify_engines = verify_engines
        self.stages = []
        self.dev = None
        self.key = None
        self.record_timings = False  # CUDA-event timings of every infer call (see pop_event_timings)
        self.cuda_graphs = None if cuda_graphs is None else bool(cuda_graphs)
        self.max_graphs = max(0, int(max_graphs))
        self.buckets = None
        self._graph_counts_done = {}  # counts of the stages' graph caches already released
        self._graphs_note_logged = False
        self._timings = []
        self._timings_lock = threading.Lock()

    def use_buckets(self, buckets) -> None:
        """The pipeline's batch buckets (None: off); with ``cuda_graphs=None`` they switch CUDA graphs on."""
        self.buckets = None if buckets is None else tuple(int(b) for b in buckets)

    @property
    def graphs_enabled(self) -> bool:
        return self.cuda_graphs if self.cuda_graphs is not None else self.buckets is not None

    def graph_stats(self) -> dict:
        """``{"enqueued", "captured", "launched", "capture_failed", "graphs"}`` summed over the stages (the counts
        survive ``deactivate()``; ``graphs`` is the number held now)."""
        out = {"enqueued": 0, "captured": 0, "launched": 0, "capture_failed": 0, "graphs": 0}
        for name, v in self._graph_counts_done.items():
            out[name] += v
        for st in self.stages:
            if st.graphs is not None:
                for name, v in st.graphs.counts.items():
                    out[name] += v
                out["graphs"] += st.graphs.num_graphs
        return out

    def pop_event_timings(self) -> list:
        """``[{"stage", "h2d_ms", "compute_ms", "d2h_ms"}]`` of the calls since the last pop (recorded while
        ``record_timings`` is on), oldest first; clears them."""
        with self._timings_lock:
            out, self._timings = self._timings, []
        return out

    # --- activate --------------------------------------------------------------------------
    def _activate_impl(self) -> None:
        trt = require("tensorrt", "running TensorRT engines")
        from ..device import get_device

        self.trt = trt
        self.dev = get_device(self.device_impl)
        self.key = this_device_key(self.bundle.precision, self.dev)
        if self.engines_dir:
            d, meta = self.engines_dir, read_engines_json(self.engines_dir) or {}
        else:
            d, meta = find_engines(self.bundle, self.key)
        stale = meta.get("bundle_stage_sha256")
        if stale is not None and list(stale) != [st["sha256"] for st in self.bundle.stages]:
            raise DmpoEdgeError(f"engines {d}", "were built from other stage graphs than this bundle's (the bundle was "
                                f"recompiled). Rebuild them: 'dmpo-edge build {self.bundle.path} --force'")
        if isinstance(meta.get("max_batch"), int) and 1 <= meta["max_batch"] < self.max_batch:
            self.max_batch = meta["max_batch"]  # engines built for a smaller max batch than the manifest's
        files = self._engine_files(d, meta)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with self.dev.bind_thread():
            self._runtime = trt.Runtime(self._logger)
            try:
                for k, (path, digest, io_map) in enumerate(files):
                    self.stages.append(self._load_stage(k, path, digest, io_map))
            except BaseException:
                self._deactivate_impl()
                raise

    def _engine_files(self, d: str, meta: dict) -> list:
        entries = meta.get("engines") or meta.get("stages") or []
        out = []
        for k in range(self.num_stages):
            e = next((e for e in entries if isinstance(e, dict) and e.get("stage", e.get("index")) == k), None)
            name = (e or {}).get("file", f"stage_{k}.engine")
            path = safe_join(d, name, f"engines {d}")
            if not os.path.isfile(path):
                raise DmpoEdgeError(f"engines {d}", f"engine '{name}' for stage {k} is missing. Run 'dmpo-edge build {self.bundle.path}'")
            out.append((path, (e or {}).get("sha256"), (e or {}).get("io_map") or {}))
        return out

    def _load_stage(self, k: int, path: str, digest, io_map: dict | None = None) -> _Stage:
        trt = self.trt
        if self.verify_engines and not digest:  # an engine no checksum covers is not deserialized
            raise DmpoEdgeError(f"engine {path}", f"has no sha256 in engines.json. Rebuild it: 'dmpo-edge build {self.bundle.path} --force'")
        if self.verify_engines and sha256_file(path) != digest:
            raise DmpoEdgeError(f"engine {path}", f"fails its sha256 check. Rebuild it: 'dmpo-edge build {self.bundle.path} --force'")
        with open(path, "rb") as f:
            blob = f.read()
        st = _Stage()
        st.engine = self._runtime.deserialize_cuda_engine(blob)
        if st.engine is None:
            raise DmpoEdgeError(f"engine {path}", "TensorRT could not deserialize it (another TensorRT version or GPU?). "
                                f"Run 'dmpo-edge build {self.bundle.path}' on this machine")
        st.context = st.engine.create_execution_context()
        for i in range(st.engine.num_io_tensors):
            tname = st.engine.get_tensor_name(i)
            # engines.json's io_map: engine tensor name -> stage contract name (torch-tensorrt releases that name
            # outputs output0, output1, ...); every TensorRT call below goes through st.tensor_name
            name = str((io_map or {}).get(tname, tname))
            st.engine_names[name] = tname
            is_in = st.engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT
            (st.inputs if is_in else st.outputs).append(name)
            st.dtypes[name] = np.dtype(trt.nptype(st.engine.get_tensor_dtype(tname)))
            shape = tuple(st.engine.get_tensor_shape(tname))
            st.sample_shape[name] = tuple(int(s) for s in shape[1:])
        self._check_io(k, st)
        for p in range(st.engine.num_optimization_profiles):
            st.profiles.append({name: (int(st.engine.get_tensor_profile_shape(st.tensor_name(name), p)[0][0]),
                                       int(st.engine.get_tensor_profile_shape(st.tensor_name(name), p)[2][0]))
                                for name in st.inputs})
        mb = self.max_batch
        for name in st.inputs + st.outputs:
            if name == st.feat_in or name == "features":
                continue  # pooled device features, bound per call
            if any(s < 0 for s in st.sample_shape[name]):
                raise DmpoEdgeError(f"engine {path}", f"tensor {name!r} has a dynamic non-batch axis {st.sample_shape[name]}; only the batch may vary")
            nbytes = mb * int(np.prod(st.sample_shape[name])) * st.dtypes[name].itemsize
            st.dev[name] = self.dev.malloc(nbytes)
            st.host[name] = self.dev.pinned_empty((mb, *st.sample_shape[name]), st.dtypes[name])
            self._bind(st, name, st.dev[name].ptr)
        if "features" in st.outputs:
            shape, dtype = st.sample_shape["features"], st.dtypes["features"]
            row = int(np.prod(shape)) * dtype.itemsize
            st.pool, st.merge_pool = queue.Queue(), queue.Queue()
            for _ in range(self.features_buffers):
                st.pool.put(_DevFeatures(self.dev.malloc(mb * row), 0, shape, dtype, st.pool, None))
            for _ in range(2):
                st.merge_pool.put(_DevFeatures(self.dev.malloc(mb * row), 0, shape, dtype, st.merge_pool, None))
        st.stream = self.dev.stream()
        st.event = self.dev.event()
        st.marks = [self.dev.timing_event() for _ in range(4)]
        if st.merge_pool is not None:
            st.merge_stream = self.dev.stream()  # refill copies run beside this stage's own work
        return st

    def _check_io(self, k: int, st: _Stage) -> None:
        want_out = {"logits", "confidence", "prediction"} | ({"features"} if k < self.num_stages - 1 else set())
        if k == 0:
            ok = st.inputs == ["input"]
        else:
            ok = len(st.inputs) == 2 and "keep_idx" in st.inputs
            if ok:
                st.feat_in = stage_features_input(self.bundle, k, st.inputs)
        if not ok or not want_out <= set(st.outputs):
            raise DmpoEdgeError(f"trt backend stage {k}", f"engine tensors {st.inputs} -> {st.outputs} do not follow the stage "
                                f"contract. Rebuild: 'dmpo-edge build {self.bundle.path} --force'")

    def _deactivate_impl(self) -> None:
        if self.dev is None:
            return
        with self.dev.bind_thread():
            for st in self.stages:
                for stream in (st.stream, st.merge_stream):
                    if stream is not None:
                        self.dev.synchronize(stream)
                if st.graphs is not None:
                    for name, v in st.graphs.counts.items():
                        self._graph_counts_done[name] = self._graph_counts_done.get(name, 0) + v
                    st.graphs.release()  # before the buffers they point at
                    st.graphs = None
                if st.scratch is not None:
                    st.scratch.free()
                    st.scratch = None
                for buf in st.dev.values():
                    buf.free()
                for pool in (st.pool, st.merge_pool):
                    while pool is not None and not pool.empty():
                        pool.get_nowait().buf.free()
                for ev in [st.event, *(st.marks or [])]:
                    if ev is not None:
                        self.dev.destroy_event(ev)
                for stream in (st.stream, st.merge_stream):
                    if stream is not None:
                        self.dev.destroy_stream(stream)
                st.event = st.marks = st.stream = st.merge_stream = None
                st.context = st.engine = None
            self.stages = []
            self._runtime = None
        self.dev.close()
        self.dev = None

    # --- infer -----------------------------------------------------------------------------
    def _best_profile(self, st: _Stage, batches: dict) -> int:
        """The tightest optimisation profile that holds these batch sizes.

        Tightness is the sum of the batch ranges over every input: every profile lets ``features_in`` range over
        1..max_batch (the previous stage's whole group), so ranking by the largest maximum alone would tie and
        always pick profile 0; the bucket profiles differ in the ``keep_idx`` / ``input`` range."""
        if len(st.profiles) <= 1:
            return 0
        fits = [p for p, prof in enumerate(st.profiles)
                if all(lo <= batches[name] <= hi for name, (lo, hi) in prof.items() if name in batches)]
        if not fits:
            raise DmpoEdgeError("trt backend", f"batch sizes {batches} fit none of the engine's optimisation profiles "
                                f"{st.profiles}. Rebuild the engines with a larger --max-batch")
        return min(fits, key=lambda p: (sum(hi - lo for lo, hi in st.profiles[p].values()), p))

    def _switch_profile(self, context, profile: int, stream, where: str) -> None:
        """``set_optimization_profile_async``; a refusal (False, or TensorRT's RuntimeError) is a DmpoEdgeError."""
        try:
            ok = context.set_optimization_profile_async(int(profile), self.dev.stream_handle(stream))
        except RuntimeError as exc:
            ok, why = False, str(exc).strip().splitlines()[0] if str(exc).strip() else "RuntimeError"
        else:
            why = "it returned False"
        if not ok:
            raise DmpoEdgeError(f"trt backend {where}", f"TensorRT refused to switch to optimisation profile {profile} "
                                f"({why}; see the TensorRT log). Rebuild the engines: 'dmpo-edge build {self.bundle.path} --force'")

    def _select_profile(self, st: _Stage, batches: dict) -> None:
        """Engines built with bucket profiles: switch the stage's context to the tightest profile for this call."""
        best = self._best_profile(st, batches)
        if best != st.profile:
            self._switch_profile(st.context, best, st.stream, "profile switch")
            st.profile = best
            st.shapes = {}  # every input shape must be set again under the new profile

    def _set_shape(self, st: _Stage, name: str, shape: tuple) -> None:
        if st.shapes.get(name) != shape:
            if not st.context.set_input_shape(st.tensor_name(name), shape):
                raise DmpoEdgeError("trt backend", f"shape {shape} for {name!r} is outside the engine's profile "
                                    f"(max batch {self.max_batch})")
            st.shapes[name] = shape

    def _acquire(self, pool) -> _DevFeatures:
        try:
            return pool.get(timeout=_POOL_TIMEOUT_S)
        except queue.Empty:
            raise DmpoEdgeError("trt backend", "no free device features buffer for 120 s (every buffer is held by a "
                                "waiting stage). Raise features_buffers") from None

    def _upload_features(self, k: int, st: _Stage, host: np.ndarray) -> _DevFeatures:
        """Host features (a caller's numpy array) -> a buffer of stage k-1's pool."""
        prev = self.stages[k - 1]
        host = np.ascontiguousarray(host, dtype=prev.dtypes["features"])
        f = self._acquire(prev.pool)
        self.dev.htod_async(f.buf.ptr, host, st.stream)
        f.rows = host.shape[0]
        return f

    def _infer_impl(self, k: int, feeds: dict, keep_features: bool) -> dict:
        st = self.stages[k]
        dev = self.dev
        timed = bool(self.record_timings)
        with dev.bind_thread():
            uploaded = None
            if k == 0:
                x = np.asarray(feeds["input"])
                n = x.shape[0]
                self._check_n(n)
                h = st.host["input"][:n]
                h[...] = x
                shapes = {"input": (n, *st.sample_shape["input"])}
            else:
                keep = np.asarray(feeds["keep_idx"], dtype=np.int32)
                n = keep.shape[0]
                self._check_n(n)
                f = feeds["features"]
                if isinstance(f, _DevFeatures) and f.event is not None:
                    dev.wait_event(st.stream, f.event)  # produced on the previous stage's stream
                if timed:  # after the wait: the copy-in span holds this stage's copies only
                    dev.record(st.marks[0], st.stream)
                if not isinstance(f, _DevFeatures):
                    f = uploaded = self._upload_features(k, st, np.asarray(f))
                h = st.host["keep_idx"][:n]
                h[...] = keep
                shapes = {st.feat_in: (f.rows, *f.shape), "keep_idx": (n,)}
            slot = self._graph_slot(k, st, shapes)
            # where this call's tensors live: the slot's fixed buffers (graphs) or the stage's own
            where = slot.bufs if slot is not None else st.dev
            if k == 0:
                if timed:
                    dev.record(st.marks[0], st.stream)
                dev.htod_async(where["input"].ptr, h, st.stream)
            else:
                dev.htod_async(where["keep_idx"].ptr, h, st.stream)
                if slot is not None and f.rows:  # the graph reads its own fixed features buffer
                    dev.dtod_async(where[st.feat_in].ptr, f.buf.ptr, f.rows * f.row_bytes, st.stream)
            if slot is None:
                self._configure(k, st, shapes, None if k == 0 else f)
            out_f = None
            if "features" in st.outputs:
                out_f = self._acquire(st.pool)
                if slot is None:
                    st.context.set_tensor_address(st.tensor_name("features"), out_f.buf.ptr)
            if timed:
                dev.record(st.marks[1], st.stream)
            if not self._execute(st, slot):
                if out_f is not None:
                    self.release(out_f)
                raise DmpoEdgeError(f"trt backend stage {k}", "execute_async_v3 failed (see the TensorRT log above)")
            if slot is not None and out_f is not None and n:
                dev.dtod_async(out_f.buf.ptr, where["features"].ptr, n * out_f.row_bytes, st.stream)
            if timed:
                dev.record(st.marks[2], st.stream)
            for name in ("logits", "confidence", "prediction"):
                dev.dtoh_async(st.host[name][:n], where[name].ptr, st.stream)
            if timed:
                dev.record(st.marks[3], st.stream)
            dev.record(st.event, st.stream)
            dev.synchronize(st.stream)  # the exit decision needs the confidences on the host
            if timed:
                self._book_timings(k, st)
            if uploaded is not None:
                self.release(uploaded)
            res = {name: st.host[name][:n].copy() for name in ("logits", "confidence", "prediction")}
            res["prediction"] = res["prediction"].astype(np.int32, copy=False)
            if out_f is not None:
                out_f.rows, out_f.event = n, st.event
                if keep_features:
                    res["features"] = out_f
                else:
                    res["features"] = self._download(out_f, st)
                    self.release(out_f)
        return res

    def _configure(self, k: int, st: _Stage, shapes: dict, f) -> None:
        """The stage's own context for this call: profile, input shapes, the features input's address."""
        if k == 0:
            self._select_profile(st, {"input": shapes["input"][0]})
        else:
            self._select_profile(st, {st.feat_in: f.rows, "keep_idx": shapes["keep_idx"][0]})
            st.context.set_tensor_address(st.tensor_name(st.feat_in), f.buf.ptr)
        for name, shape in shapes.items():
            self._set_shape(st, name, shape)

    def _graphs_on(self) -> bool:
        if not self.graphs_enabled:
            return False
        if self.dev.graphs_supported():
            return True
        if not self._graphs_note_logged:
            self._graphs_note_logged = True
            _log.warning("trt backend: CUDA graphs need the cuda-python device layer (pycuda has no stream capture); "
                         "running without graphs. pip install 'dmpo-edge[trt]' and pass device='cuda-python' to use them")
        return False

    def _graph_slot(self, k: int, st: _Stage, shapes: dict):
        """The graph slot of this (stage, bucket), or None (graphs off, no room, or this bucket cannot have one)."""
        if not self._graphs_on():
            return None
        if st.graphs is None:
            st.graphs = StageGraphs(self.dev, lambda key, k=k: make_slot(self, k, key), free_slot,
                                    self.max_graphs, log=_log.warning)
        return st.graphs.slot(bucket_key(shapes))

    def _bind(self, st: _Stage, name: str, ptr: int) -> None:
        st.context.set_tensor_address(st.tensor_name(name), ptr)

    def _execute(self, st: _Stage, slot) -> bool:
        """``execute_async_v3`` on the stage's stream: the stage's context, or the graph slot's (launch or capture)."""
        handle = self.dev.stream_handle(st.stream)
        if slot is None:
            return bool(st.context.execute_async_v3(handle))
        ctx = slot.context
        return st.graphs.run(slot, st.stream, lambda: ctx.execute_async_v3(handle))

    def _book_timings(self, k: int, st: _Stage) -> None:
        m, ms = st.marks, self.dev.elapsed_ms
        rec = {"stage": k, "h2d_ms": ms(m[0], m[1]), "compute_ms": ms(m[1], m[2]), "d2h_ms": ms(m[2], m[3])}
        with self._timings_lock:
            self._timings.append(rec)

    def _check_n(self, n: int) -> None:
        if n > self.max_batch:
            raise DmpoEdgeError("trt backend", f"batch of {n} exceeds the engines' max batch {self.max_batch}")

    def _download(self, f: _DevFeatures, st: _Stage) -> np.ndarray:
        out = np.empty((f.rows, *f.shape), f.dtype)
        if f.rows:
            self.dev.dtoh_async(out, f.buf.ptr, st.stream)
            self.dev.synchronize(st.stream)
        return out

    def features_to_host(self, features):
        if isinstance(features, _DevFeatures):
            st = next(s for s in self.stages if s.pool is features.pool or s.merge_pool is features.pool)
            with self.dev.bind_thread():
                return self._download(features, st)
        return features

    def release(self, features) -> None:
        if isinstance(features, _DevFeatures) and features.pool is not None:
            features.rows, features.event = 0, None
            features.pool.put(features)

    def merge_features(self, features: list, keeps: list):
        """Refill on the device: copy each group's surviving rows (runs of consecutive keep_idx) into one buffer."""
        if not all(isinstance(f, _DevFeatures) for f in features):
            return super().merge_features(features, keeps)
        src_stage = next(s for s in self.stages if s.pool is features[0].pool or s.merge_pool is features[0].pool)
        out = self._acquire(src_stage.merge_pool)
        row = features[0].row_bytes
        pos = 0
        with self.dev.bind_thread():
            stream = src_stage.merge_stream
            for f, keep in zip(features, keeps):
                if f.event is not None:
                    self.dev.wait_event(stream, f.event)
                keep = np.asarray(keep, dtype=np.int64)
                if keep.size == 0:
                    continue
                # Coalesce consecutive rows into one copy each.
                breaks = np.flatnonzero(np.diff(keep) != 1) + 1
                for run in np.split(keep, breaks):
                    nb = run.size * row
                    self.dev.dtod_async(out.buf.ptr + pos * row, f.buf.ptr + int(run[0]) * row, nb, stream)
                    pos += run.size
            self.dev.synchronize(stream)
        for f in features:
            self.release(f)
        out.rows, out.event = pos, None
        return out, np.arange(pos, dtype=np.int32)
