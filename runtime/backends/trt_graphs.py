"""CUDA graphs for the TensorRT backend: which stage calls replay a captured graph, which enqueue.

Host-side bookkeeping only (pure Python); the device work goes through the device layer
(:mod:`..device`: ``begin_capture`` / ``end_capture`` / ``launch_graph`` / ``destroy_graph``).

A graph replays exactly the kernels and tensor addresses it captured, so a key names everything a
call binds: the stream (the in-flight slot), the stage, the optimisation profile, every input shape
(the bucket) and the address of every bound tensor (pooled ``features`` buffers differ per call).
Per key: the first call enqueues normally (TensorRT needs one enqueue after a shape change before it
can be captured), the second captures ``execute_async_v3`` into a graph and launches it, later calls
launch it. A key whose capture fails (an engine TensorRT cannot capture, e.g. data-dependent shapes)
enqueues from then on and is never tried again; nothing raises.
"""

from __future__ import annotations

__all__ = ["GraphCache", "graph_key"]

_WARM = "warm"  # enqueued once with these shapes: the next call captures
_PLAIN = "plain"  # capture failed: always enqueue


def graph_key(slot, stage: int, profile: int, shapes: dict, addresses: dict) -> tuple:
    """A hashable key: slot (stream), stage, profile, input shapes and bound addresses, order-free."""
    return (slot, int(stage), int(profile),
            tuple(sorted((str(n), tuple(int(d) for d in s)) for n, s in shapes.items())),
            tuple(sorted((str(n), int(a)) for n, a in addresses.items())))


class GraphCache:
    """Graphs of one stage. ``run(key, stream, enqueue)`` enqueues or replays; ``release()`` frees them.

    ``enqueue()`` puts the stage's work on ``stream`` and returns True on success (TensorRT's
    ``execute_async_v3``). At most ``max_graphs`` graphs are kept; keys beyond that enqueue.
    """

    def __init__(self, dev, max_graphs: int = 64):
        self.dev = dev
        self.max_graphs = max(0, int(max_graphs))
        self._state = {}  # key -> _WARM | _PLAIN | graph exec
        self.counts = {"enqueued": 0, "captured": 0, "launched": 0, "capture_failed": 0}

    @property
    def num_graphs(self) -> int:
        return sum(1 for s in self._state.values() if s is not _WARM and s is not _PLAIN)

    def _enqueue(self, enqueue) -> bool:
        self.counts["enqueued"] += 1
        return bool(enqueue())

    def run(self, key, stream, enqueue) -> bool:
        state = self._state.get(key)
        if state is _PLAIN:
            return self._enqueue(enqueue)
        if state is None:
            ok = self._enqueue(enqueue)
            if ok and self.num_graphs < self.max_graphs:
                self._state[key] = _WARM
            return ok
        if state is _WARM:
            state = self._capture(stream, enqueue)
            if state is None:
                self._state[key] = _PLAIN
                self.counts["capture_failed"] += 1
                return self._enqueue(enqueue)
            self._state[key] = state
            self.counts["captured"] += 1
        try:
            self.dev.launch_graph(state, stream)
        except Exception:  # a graph that does not launch: forget it and enqueue from now on
            self._state[key] = _PLAIN
            self._destroy(state)
            return self._enqueue(enqueue)
        self.counts["launched"] += 1
        return True

    def _capture(self, stream, enqueue):
        """The graph exec of one captured enqueue, or None (the stream is out of capture mode either way)."""
        try:
            self.dev.begin_capture(stream)
        except Exception:
            return None
        ok = False
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
        """Destroy every graph (the caller has synchronised the stream) and forget every key."""
        for s in self._state.values():
            if s is not _WARM and s is not _PLAIN:
                self._destroy(s)
        self._state = {}
