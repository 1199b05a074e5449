"""Checks of the runtime's device layer (``dmpo_edge.runtime.device``) on a real GPU, bit for bit against numpy.

- :func:`check_copies`: page-locked buffers, host->device, device->device and device->host copies on two
  streams ordered by an event;
- :func:`check_refill_merge`: the TensorRT backend's refill path (``TrtBackend.merge_features``: runs of
  surviving rows coalesced into device-to-device copies) on real device buffers, without TensorRT;
- :func:`check_graph_replay`: the layer's own CUDA graph calls (capture, instantiate, launch, destroy) on a real
  stream: the copies in, the survivor gather and the copy out captured once, replayed with new data;
- :func:`check_event_timing`: the layer's timing events against the wall clock.

:class:`~.host_device.HostDevice` stands in for the GPU in ``--dry-run``.
"""

from __future__ import annotations

import time

import numpy as np

from dmpo_edge._lazy import available, require
from dmpo_edge.runtime.device import Device

from .host_device import HostDevice, same_bits
from .regroup import check_gather, check_trt_gather
from .report import FAIL, one_line

__all__ = ["check_copies", "check_refill_merge", "check_graph_replay", "check_event_timing", "device_impls", "make_device",
           "step_device_layer"]


def check_copies(dev: Device, mib: int = 16, seed: int = 0) -> dict:
    """Pinned host -> device (stream A) -> device copy (stream A) -> event -> device -> pinned host (stream B)."""
    rng = np.random.default_rng(seed)
    n = int(mib) << 20
    with dev.bind_thread():
        src = dev.pinned_empty((n,), np.uint8)
        src[...] = rng.integers(0, 256, size=n, dtype=np.uint8)
        dst = dev.pinned_empty((n,), np.uint8)
        dst[...] = 0
        a, b = dev.malloc(n), dev.malloc(n)
        s1, s2 = dev.stream(), dev.stream()
        ev = dev.event()
        try:
            t0 = time.perf_counter()
            dev.htod_async(a.ptr, src, s1)
            dev.synchronize(s1)
            t_h2d = time.perf_counter() - t0
            dev.dtod_async(b.ptr, a.ptr, n, s1)
            dev.record(ev, s1)
            dev.wait_event(s2, ev)  # stream B reads what stream A wrote: the event orders them
            t0 = time.perf_counter()
            dev.dtoh_async(dst, b.ptr, s2)
            dev.synchronize(s2)
            t_d2h = time.perf_counter() - t0
            ok = same_bits(src, dst)
            # A partial copy at an offset: the pointer arithmetic the runtime's refill uses.
            part = dev.pinned_empty((4096,), np.uint8)
            dev.dtoh_async(part, b.ptr + 12345, s2)
            dev.synchronize(s2)
            ok_offset = same_bits(part, src[12345:12345 + 4096])
        finally:
            a.free()
            b.free()
            dev.destroy_event(ev)
            for s in (s1, s2):
                dev.destroy_stream(s)
    gbps = lambda t: round(n / t / 1e9, 2) if t > 0 else None  # noqa: E731
    return {"ok": bool(ok and ok_offset), "bytes": n, "roundtrip_bit_exact": bool(ok), "offset_copy_bit_exact": bool(ok_offset),
            "h2d_GBps": gbps(t_h2d), "d2h_GBps": gbps(t_d2h), "impl": dev.impl}



def check_refill_merge(dev: Device, bundle, rows: int = 40, shape=(17, 32), seed: int = 2) -> dict:
    """The TensorRT backend's ``merge_features`` (device-to-device copies of survivor runs) on real buffers.

    Builds the backend's pools by hand (no engine needed): two groups' features in device buffers, their
    keep_idx, merged into one buffer, read back and compared with ``concat(f1[keep1], f2[keep2])``.
    """
    import queue

    from dmpo_edge.runtime.backends import trt as trt_mod

    rng = np.random.default_rng(seed)
    dtype = np.float32
    be = trt_mod.TrtBackend(bundle, device=dev.impl)
    be.dev = dev
    st = trt_mod._Stage()
    st.pool, st.merge_pool = queue.Queue(), queue.Queue()
    row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    bufs = []
    with dev.bind_thread():
        for _ in range(2):
            b = dev.malloc(rows * row_bytes)
            bufs.append(b)
            st.pool.put(trt_mod._DevFeatures(b, 0, tuple(shape), dtype, st.pool, None))
        mb = dev.malloc(2 * rows * row_bytes)
        bufs.append(mb)
        st.merge_pool.put(trt_mod._DevFeatures(mb, 0, tuple(shape), dtype, st.merge_pool, None))
        st.stream = dev.stream()
        st.merge_stream = dev.stream()
        be.stages = [st]
        try:
            hosts, feats = [], []
            for _ in range(2):
                h = rng.normal(size=(rows, *shape)).astype(dtype)
                f = st.pool.get_nowait()
                pinned = dev.pinned_empty(h.shape, dtype)
                pinned[...] = h
                dev.htod_async(f.buf.ptr, pinned, st.stream)
                f.rows = rows
                ev = dev.event()
                dev.record(ev, st.stream)
                f.event = ev  # merge_features must wait on it before copying
                hosts.append(h)
                feats.append(f)
            # survivors with runs and gaps (coalesced copies), and a group with a single survivor
            keeps = [np.array([0, 1, 2, 5, 6, 9, rows - 1], np.int32), np.array([7], np.int32)]
            merged, keep = be.merge_features(feats, keeps)
            got = np.empty((merged.rows, *shape), dtype)
            dev.dtoh_async(got, merged.buf.ptr, st.merge_stream)
            dev.synchronize(st.merge_stream)
            want = np.concatenate([hosts[0][keeps[0]], hosts[1][keeps[1]]])
            ok = same_bits(got, want) and np.array_equal(keep, np.arange(want.shape[0]))
            returned = st.pool.qsize() == 2  # the sources went back to their pool
        finally:
            be.stages = []
            for b in bufs:
                b.free()
            for s in (st.stream, st.merge_stream):
                dev.destroy_stream(s)
    return {"ok": bool(ok and returned), "merged_rows": int(want.shape[0]), "bit_exact": bool(ok),
            "sources_released": bool(returned), "impl": dev.impl}


def check_graph_replay(dev: Device, torch, rows: int = 64, width: int = 544, bucket: int = 32, replays: int = 3,
                       seed: int = 4) -> dict:
    """The device layer's CUDA graph calls on a real stream, as the TensorRT backend uses them.

    On fixed buffers of one bucket's size: host -> device copies of the features and ``keep_idx``, the survivor
    gather (torch ``index_select`` with ``out=`` on the layer's stream: no allocation inside the capture), the
    device -> host copy. Run once plainly (the warm-up, as TensorRT needs one enqueue before capture), captured
    once with ``begin_capture`` / ``end_capture``, then replayed ``replays`` times with new data written into the
    same page-locked buffers; every replay is compared with numpy bit for bit. The graph is destroyed last.
    """
    if not dev.graphs_supported():
        return {"ok": False, "detail": f"{dev.impl} reports no CUDA graph support", "impl": dev.impl}
    from .regroup import _torch_on_buffer, _torch_stream

    rng = np.random.default_rng(seed)
    results, ok = [], True
    with dev.bind_thread():
        stream = dev.stream()
        f_h, k_h = dev.pinned_empty((rows, width), np.float32), dev.pinned_empty((bucket,), np.int64)
        o_h = dev.pinned_empty((bucket, width), np.float32)
        f_d, k_d, o_d = dev.malloc(f_h.nbytes), dev.malloc(k_h.nbytes), dev.malloc(o_h.nbytes)
        graph = None
        try:
            src = _torch_on_buffer(torch, dev, f_d, (rows, width), np.float32, True)
            idx = _torch_on_buffer(torch, dev, k_d, (bucket,), np.int64, True)
            out = _torch_on_buffer(torch, dev, o_d, (bucket, width), np.float32, True)

            def work():
                dev.htod_async(f_d.ptr, f_h, stream)
                dev.htod_async(k_d.ptr, k_h, stream)
                with _torch_stream(torch, dev, stream, True):
                    torch.index_select(src, 0, idx, out=out)
                dev.dtoh_async(o_h, o_d.ptr, stream)

            def fill():
                f_h[...] = rng.normal(size=f_h.shape).astype(np.float32)
                k_h[...] = np.sort(rng.choice(rows, size=bucket, replace=False))
                return f_h.copy(), k_h.copy()

            feats, keep = fill()
            work()  # the warm-up: plain enqueue (kernels loaded, no lazy allocation inside the capture)
            dev.synchronize(stream)
            results.append({"run": "plain", "bit_exact": bool(same_bits(np.array(o_h), feats[keep]))})
            dev.begin_capture(stream)
            try:
                work()
            finally:
                graph = dev.end_capture(stream)  # always: it takes the stream out of capture
            for r in range(replays):
                feats, keep = fill()
                o_h[...] = np.nan
                dev.launch_graph(graph, stream)
                dev.synchronize(stream)
                results.append({"run": f"replay {r + 1}", "bit_exact": bool(same_bits(np.array(o_h), feats[keep]))})
        finally:
            if graph is not None:
                dev.destroy_graph(graph)
            for b in (f_d, k_d, o_d):
                b.free()
            dev.destroy_stream(stream)
    ok = all(r["bit_exact"] for r in results) and len(results) == replays + 1
    return {"ok": bool(ok), "runs": results, "replays": replays, "bucket": bucket, "impl": dev.impl}


def check_event_timing(dev: Device, sizes_mib=(16, 64, 256), slack_ms: float = 0.05) -> dict:
    """Timing events around host -> device copies against the wall clock around the same work.

    The device time between two events can never exceed the wall time around enqueue + synchronize (plus a small
    slack for clock granularity), and for a copy of hundreds of MiB it must account for most of it; the device
    times must also grow with the bytes moved.
    """
    rows, ok = [], True
    with dev.bind_thread():
        stream = dev.stream()
        start, end = dev.timing_event(), dev.timing_event()
        try:
            for mib in sizes_mib:
                n = int(mib) << 20
                h = dev.pinned_empty((n,), np.uint8)
                h[...] = 1
                d = dev.malloc(n)
                try:
                    dev.htod_async(d.ptr, h, stream)  # warm-up (first touch of the pages, the copy engine)
                    dev.synchronize(stream)
                    t0 = time.perf_counter()
                    dev.record(start, stream)
                    dev.htod_async(d.ptr, h, stream)
                    dev.record(end, stream)
                    dev.synchronize(stream)
                    wall = 1e3 * (time.perf_counter() - t0)
                    ev = dev.elapsed_ms(start, end)
                finally:
                    d.free()
                rows.append({"mib": int(mib), "event_ms": round(ev, 4), "wall_ms": round(wall, 4),
                             "ratio": round(ev / wall, 3) if wall > 0 else None})
                ok = ok and 0.0 < ev <= wall + slack_ms
        finally:
            for e in (start, end):
                dev.destroy_event(e)
            dev.destroy_stream(stream)
    grows = all(a["event_ms"] < b["event_ms"] for a, b in zip(rows, rows[1:]))
    covers = rows[-1]["ratio"] is not None and rows[-1]["ratio"] >= 0.5
    return {"ok": bool(ok and grows and covers), "sizes": rows, "within_wall": bool(ok), "grows_with_bytes": bool(grows),
            "covers_most_of_wall": bool(covers), "impl": dev.impl}


def device_impls(ctx) -> list:
    if ctx.args.dry_run:
        return ["host"]
    want = ctx.args.device_impl
    impls = []
    if want in ("all", "pycuda") and available("pycuda.driver"):
        impls.append("pycuda")
    if want in ("all", "cuda-python") and (available("cuda.bindings.runtime") or available("cuda.cudart")):
        impls.append("cuda-python")
    return impls


def make_device(impl: str):
    if impl == "host":
        return HostDevice()
    from dmpo_edge.runtime.device import get_device

    return get_device(impl)


def step_device_layer(ctx, impl: str) -> None:
    rep = ctx.report
    try:
        dev = make_device(impl)
    except Exception as exc:
        rep.add(f"device_{impl}", "device layer", impl, FAIL, one_line(exc))
        return
    try:
        def copies():
            r = check_copies(dev, mib=ctx.args.copy_mib)
            bw = f", h2d {r['h2d_GBps']} GB/s, d2h {r['d2h_GBps']} GB/s" if impl != "host" else ""
            r["detail"] = (f"{dev.name()}: pinned {r['bytes'] >> 20} MiB h2d -> d2d -> event -> d2h on 2 streams "
                           f"{'bit-exact' if r['ok'] else 'CORRUPTED'}{bw}")
            return r

        rep.run(f"device_copies_{impl}", "device layer: copies, streams, events", impl, copies)

        torch_skip = None
        if not available("torch"):
            torch_skip = "torch is not installed (the gather check runs torch.index_select on the device)"
        elif impl != "host" and not ctx.cuda.get("torch_cuda"):
            torch_skip = "torch has no CUDA here"

        def gather():
            r = check_gather(dev, require("torch"), cuda=impl != "host")
            bad = [k for k, v in r["cases"].items() if not v]
            r["detail"] = (f"keep_idx gather, {len(r['cases'])} cases (fp32/fp16: all, subset, single, empty, padded, "
                           f"permuted) by {r['runner']} on the layer's memory and stream: "
                           + ("bit-exact" if not bad else f"DIFFERS in {', '.join(bad)}"))
            return r

        rep.run(f"gather_torch_{impl}", "survivor regroup (gather)", f"{impl}+torch", gather, skip=torch_skip)

        cuda_skip = "dry run: host memory has no streams to capture or time" if impl == "host" else None

        def graph():
            r = check_graph_replay(dev, require("torch"))
            r["detail"] = (f"begin_capture / end_capture / launch_graph / destroy_graph on a real stream: h2d + "
                           f"keep_idx gather (bucket {r.get('bucket')}) + d2h captured once, {r.get('replays')} replays with "
                           "new data: " + ("bit-exact" if r["ok"] else "DIFFER: " + str(r.get("runs", r.get("detail")))))
            return r

        rep.run(f"device_graphs_{impl}", "device layer: CUDA graph capture + replay", impl, graph,
                skip=cuda_skip or torch_skip)

        def events():
            r = check_event_timing(dev)
            r["detail"] = "; ".join(f"{s['mib']} MiB h2d {s['event_ms']:.3f} ms by events, {s['wall_ms']:.3f} ms wall"
                                    for s in r["sizes"]) + ("" if r["ok"] else " - INCONSISTENT")
            return r

        rep.run(f"device_events_{impl}", "device layer: event timings vs wall clock", impl, events, skip=cuda_skip)

        def merge():
            r = check_refill_merge(dev, ctx.bundle)
            r["detail"] = (f"TrtBackend.merge_features: {r['merged_rows']} survivor rows of 2 groups copied d2d "
                           + ("bit-exact" if r["bit_exact"] else "DIFFER") + ("" if r["sources_released"] else ", sources NOT released"))
            return r

        rep.run(f"refill_merge_{impl}", "refill merge (d2d copies)", impl, merge)

        trt_skip = None if available("tensorrt") else "TensorRT is not installed"
        if impl == "host" and trt_skip is None:
            trt_skip = "dry run (no CUDA)"

        def trt_gather():
            r = check_trt_gather(dev, require("tensorrt"))
            bad = [k for k, v in r["cases"].items() if not v]
            r["detail"] = f"{r['runner']}, {len(r['cases'])} cases: " + ("bit-exact" if not bad else f"DIFFERS in {', '.join(bad)}")
            return r

        rep.run(f"gather_trt_{impl}", "survivor regroup (gather)", f"{impl}+trt", trt_gather, skip=trt_skip)
    finally:
        try:
            dev.close()
        except Exception:
            pass
