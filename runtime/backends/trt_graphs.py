"""CUDA graphs for the TensorRT backend: one captured graph per (stage, bucket), each with its own context.

Host-side bookkeeping only (pure Python); the device work goes through the device layer
(:mod:`..device`: ``begin_capture`` / ``end_capture`` / ``launch_graph`` / ``destroy_graph``) and the
execution context the backend makes for each slot.

Why a context per graph: a CUDA graph replays the kernels, tensor addresses and shapes it captured, while an
``IExecutionContext`` keeps one set of shapes, addresses and one optimisation profile - and a profile switch
only takes effect at the next ``enqueueV3``, which a graph launch is not. NVIDIA's guidance (the TensorRT
developer guide's CUDA graphs section, TensorRT issue #3798, trtexec's ``--useCudaGraph``) is therefore one
execution context per captured graph, configured once with its final shapes, addresses and profile, enqueued
once (the warm-up: TensorRT may allocate or upload on the first enqueue after a shape change), then captured.

So a :class:`GraphSlot` owns, for one stage and one bucket (the batch sizes of every input): an execution
context with that bucket's profile and shapes, fixed device buffers of that size for every tensor (the
backend copies inputs into them and results out of them), and the graph. The first call of a slot enqueues
(its result is the call's result) and captures right after; later calls launch the graph. A slot whose
capture fails (e.g. an engine with data-dependent shapes) keeps enqueueing on its own context; a slot that
cannot be made at all (or one beyond ``max_graphs``) leaves the call to the stage's ordinary path.
"""

from __future__ import annotations

import numpy as np

from ...errors import DmpoEdgeError

__all__ = ["GraphSlot", "StageGraphs", "bucket_key", "make_slot", "free_slot"]


def bucket_key(shapes: dict) -> tuple:
    """A hashable, order-free key of the input shapes of one call (the bucket)."""
    return tuple(sorted((str(n), tuple(int(d) for d in s)) for n, s in shapes.items()))


class GraphSlot:
    """One stage at one bucket: ``context`` (its own), ``bufs`` (tensor name -> fixed DeviceBuffer), ``graph``."""

    __slots__ = ("key", "context", "bufs", "graph", "plain", "profile")

    def __init__(self, key, context, bufs: dict, profile: int = 0):
        self.key, self.context, self.bufs, self.profile = key, context, dict(bufs), int(profile)
        self.graph = None
        self.plain = False  # capture failed: enqueue on this slot's context from now on


class StageGraphs:
    """The graph slots of one stage. ``make_slot(key)`` builds a configured :class:`GraphSlot` (or raises).

    ``slot(key)`` returns the slot of a bucket (making it when there is room: at most ``max_graphs`` per stage),
    or None when the call must take the stage's ordinary path. ``run(slot, stream, enqueue)`` does the work of
    one call on ``stream``: ``enqueue()`` is ``slot.context.execute_async_v3(stream)`` and returns True on success.
    """

    def __init__(self, dev, make_slot, free_slot=None, max_graphs: int = 16, log=None):
        self.dev = dev
        self.make_slot, self.free_slot = make_slot, free_slot
        self.max_graphs = max(0, int(max_graphs))
        self.log = log or (lambda msg: None)
        self.slots = {}  # key -> GraphSlot
        self.refused = set()  # keys whose slot could not be made: ordinary path, not retried
        self.counts = {"enqueued": 0, "captured": 0, "launched": 0, "capture_failed": 0}

    @property
    def num_graphs(self) -> int:
        return sum(1 for s in self.slots.values() if s.graph is not None)

    def slot(self, key):
        s = self.slots.get(key)
        if s is not None:
            return s
        if key in self.refused or len(self.slots) >= self.max_graphs:
            return None
        try:
            s = self.make_slot(key)
        except Exception as exc:  # e.g. a profile another context holds: this bucket runs without a graph
            self.refused.add(key)
            self.log(f"CUDA graphs: no graph for bucket {key} ({exc}); it runs without one")
            return None
        self.slots[key] = s
        return s

    def run(self, slot: GraphSlot, stream, enqueue) -> bool:
        if slot.graph is not None:
            try:
                self.dev.launch_graph(slot.graph, stream)
            except Exception:  # a graph that does not launch: forget it and enqueue from now on
                self._destroy(slot.graph)
                slot.graph, slot.plain = None, True
                return self._enqueue(enqueue)
            self.counts["launched"] += 1
            return True
        ok = self._enqueue(enqueue)  # the warm-up (first call) or a slot that could not be captured
        if ok and not slot.plain:
            slot.graph = self._capture(stream, enqueue)
            if slot.graph is None:
                slot.plain = True
                self.counts["capture_failed"] += 1
            else:
                self.counts["captured"] += 1
        return ok

    def _enqueue(self, enqueue) -> bool:
        self.counts["enqueued"] += 1
        return bool(enqueue())

    def _capture(self, stream, enqueue):
        """The graph exec of one captured enqueue, or None (the stream is out of capture mode either way)."""
        try:
            self.dev.begin_capture(stream)
        except Exception:
            return None
        ok = False
        graph = None
        try:
            ok = bool(enqueue())
        except Exception:
            ok = False
        finally:
            try:
                graph = self.dev.end_capture(stream)
            except Exception:
                graph = None
        if not ok and graph is not None:
            self._destroy(graph)
            graph = None
        return graph

    def _destroy(self, graph) -> None:
        try:
            self.dev.destroy_graph(graph)
        except Exception:
            pass

    def release(self) -> None:
        """Destroy every graph, then let ``free_slot`` free each slot's context and buffers (the caller has
        synchronised the stream)."""
        for s in self.slots.values():
            if s.graph is not None:
                self._destroy(s.graph)
                s.graph = None
            if self.free_slot is not None:
                self.free_slot(s)
        self.slots = {}
        self.refused = set()


def make_slot(backend, k: int, key: tuple) -> GraphSlot:
    """The slot of stage ``k`` of a :class:`~.trt.TrtBackend` at one bucket: a context of its own with that bucket's
    profile and shapes, and fixed device buffers of the bucket's size bound to every tensor."""
    trt, st, dev = backend.trt, backend.stages[k], backend.dev
    shapes = {name: tuple(shape) for name, shape in key}
    # USER_MANAGED contexts (TensorRT >= 10.1: the strategy enum and set_device_memory) share one scratch;
    # older releases allocate per context
    if hasattr(trt, "ExecutionContextAllocationStrategy") and hasattr(trt.IExecutionContext, "set_device_memory"):
        # one scratch per stage: its slots run one after another on the stage's stream
        size = int(st.engine.device_memory_size_v2)  # 10.1+ like set_device_memory; 11.x has no device_memory_size
        if st.scratch is None or st.scratch.nbytes < size:
            if st.scratch is not None:
                st.scratch.free()
            st.scratch = dev.malloc(max(size, 1))
        ctx = st.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is not None:
            ctx.set_device_memory(st.scratch.ptr, st.scratch.nbytes)
    else:
        ctx = st.engine.create_execution_context()
    if ctx is None:
        raise DmpoEdgeError(f"trt backend stage {k}", "TensorRT could not create an execution context for a CUDA graph")
    bufs = {}
    try:
        batches = {name: shape[0] for name, shape in shapes.items()}
        profile = backend._best_profile(st, batches)
        if len(st.profiles) > 1:
            backend._switch_profile(ctx, profile, st.stream, f"stage {k} graph")
        for name, shape in shapes.items():
            if not ctx.set_input_shape(st.tensor_name(name), shape):
                raise DmpoEdgeError(f"trt backend stage {k}", f"shape {shape} for {name!r} is outside profile {profile}")
        n = shapes["input"][0] if k == 0 else shapes["keep_idx"][0]
        for name in st.inputs + st.outputs:
            shape = shapes.get(name, (n, *st.sample_shape[name]))
            bufs[name] = dev.malloc(int(np.prod(shape)) * st.dtypes[name].itemsize)
            ctx.set_tensor_address(st.tensor_name(name), bufs[name].ptr)
    except BaseException:
        for b in bufs.values():
            b.free()
        raise
    return GraphSlot(key, ctx, bufs, profile)

def free_slot(slot: GraphSlot) -> None:
    slot.context = None  # before its buffers and the shared scratch
    for b in slot.bufs.values():
        b.free()
    slot.bufs = {}
