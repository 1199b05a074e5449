"""Which external-data files an ONNX graph will open, read from its bytes without the ``onnx`` package.

A stage graph may keep its weights in files beside the ``.onnx`` (ONNX "external data", used above 2 GB and
by some exporters). ONNX Runtime opens those files by the names written in the graph, so a bundle whose
checksums cover only the ``.onnx`` would run with weights nobody verified. :func:`external_data_files` lists
those names so that :class:`~dmpo_edge.bundle.Bundle` can refuse a graph that references a file the manifest
does not list (and checksum). The runtime-only install has ONNX Runtime but not ``onnx``, so this walks the
protobuf wire format itself: only the few message fields that can hold tensors are entered, everything else
(raw weight bytes included) is skipped by its length, so a 1 GB graph costs a scan of its structure only.
"""

from __future__ import annotations

import mmap
import os

from .errors import DmpoEdgeError

__all__ = ["external_data_files"]

# message -> {field number: message kind entered}; fields not listed are skipped
_MODEL = {7: "graph", 20: "training", 25: "function"}
_GRAPH = {1: "node", 5: "tensor", 15: "sparse"}
_NODE = {5: "attribute"}
_ATTRIBUTE = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_SPARSE = {1: "tensor", 2: "tensor"}
_FUNCTION = {7: "node"}
_TRAINING = {1: "graph", 2: "graph"}
_KINDS = {"model": _MODEL, "graph": _GRAPH, "node": _NODE, "attribute": _ATTRIBUTE, "sparse": _SPARSE,
          "function": _FUNCTION, "training": _TRAINING}
_MAX_DEPTH = 64  # subgraphs of subgraphs (If / Loop bodies); a deeper file is not a stage graph


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """(field number, start, end) of the length-delimited fields of one message; other wire types skipped."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Malformed("field runs past its message")
            yield field, pos, pos + n
            pos += n
        else:
            raise _Malformed(f"wire type {wire}")
        if pos > end:
            raise _Malformed("field runs past its message")


def _tensor_location(buf, start: int, end: int):
    for field, s, e in _fields(buf, start, end):
        if field == 13:  # external_data: StringStringEntryProto {key = 1, value = 2}
            key = value = None
            for f2, s2, e2 in _fields(buf, s, e):
                if f2 == 1:
                    key = bytes(buf[s2:e2])
                elif f2 == 2:
                    value = bytes(buf[s2:e2])
            if key == b"location" and value is not None:
                return value.decode("utf-8", "replace")
    return None


def _walk(buf, kind: str, start: int, end: int, depth: int, out: set) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed("subgraphs nested too deeply")
    if kind == "tensor":
        loc = _tensor_location(buf, start, end)
        if loc is not None:
            out.add(loc)
        return
    table = _KINDS[kind]
    for field, s, e in _fields(buf, start, end):
        sub = table.get(field)
        if sub is not None:
            _walk(buf, sub, s, e, depth + 1, out)


def external_data_files(path: str) -> set:
    """The ``location`` names of every external-data tensor in the ONNX file at ``path`` (relative to its folder)."""
    out = set()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return out
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                buf = memoryview(mm)
                try:
                    _walk(buf, "model", 0, size, 0, out)
                finally:
                    buf.release()
    except _Malformed as exc:
        raise DmpoEdgeError(f"graph {os.path.basename(path)}", f"is not a well-formed ONNX file ({exc}). "
                            "Copy the bundle again or recompile it") from None
    except (OSError, ValueError) as exc:
        raise DmpoEdgeError(f"graph {os.path.basename(path)}", f"cannot be read ({exc})") from None
    return out
