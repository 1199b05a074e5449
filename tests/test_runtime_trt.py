"""TensorRT backend: device keys and engine lookup (CPU), and the engines themselves (gpu marker).

The gpu tests build engines for a toy bundle with the TensorRT builder right here (ONNX parser, one
profile 1..max_batch), so they check the runtime independently of ``dmpo-edge build``.
"""

import json
import os
import shutil

import numpy as np
import pytest

from dmpo_edge._lazy import available
from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.runtime.backends import get_backend
from dmpo_edge.runtime.backends.trt import TrtBackend, device_key, find_engines, trt_ready


def test_device_key_formula():
    assert device_key("10.3.0", "NVIDIA Jetson Orin", (8, 7), "int8") == "10.3.0-nvidia_jetson_orin-sm87-int8"
    assert device_key("11.0.1", "NVIDIA H200", "9.0", "fp16") == "11.0.1-nvidia_h200-sm90-fp16"
    assert device_key("10.3.0", "Orin", "sm87", "fp32") == device_key("10.3.0", "orin", 87, "fp32")


def test_device_key_matches_the_builder():
    ts = pytest.importorskip("dmpo_edge.compile.trt_settings")
    for args in [("10.3.0", "NVIDIA Jetson AGX Orin", (8, 7), "int8"), ("11.1", "NVIDIA GeForce RTX 4090", "8.9", "fp16")]:
        assert device_key(*args) == ts.device_key(*args)


def _fake_engines(bundle_path, key):
    d = os.path.join(bundle_path, "engines", key)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "engines.json"), "w") as f:
        json.dump({"device_key": key, "engines": [{"stage": 0, "file": "stage_0.engine"}]}, f)
    return d


def test_find_engines_refuses_other_devices_and_names_the_fix(toy_bundle, tmp_path):
    src = toy_bundle(num_stages=2, seed=21)
    path = str(tmp_path / "b")
    shutil.copytree(src.path, path)
    with pytest.raises(DmpoEdgeError, match=r"has no TensorRT engines. Run 'dmpo-edge build .*b'"):
        find_engines(path, "10.3.0-nvidia_jetson_orin-sm87-fp32")
    _fake_engines(path, "10.3.0-nvidia_jetson_orin-sm87-fp32")
    d, meta = find_engines(path, "10.3.0-nvidia_jetson_orin-sm87-fp32")
    assert d.endswith("10.3.0-nvidia_jetson_orin-sm87-fp32") and meta["engines"][0]["file"] == "stage_0.engine"
    with pytest.raises(DmpoEdgeError, match=r"has engines for 10.3.0-nvidia_jetson_orin-sm87-fp32 but this device is "
                                            r"10.5.0-nvidia_h200-sm90-fp32.*dmpo-edge build"):
        find_engines(path, "10.5.0-nvidia_h200-sm90-fp32")


def test_engine_files_carry_the_io_map_of_torch_tensorrt_engines(toy_bundle, tmp_path):
    """torch-tensorrt releases without output_binding_names name outputs output0..; the frontend writes the map
    to the stage contract into engines.json, and the backend reads it with each engine file."""
    src = toy_bundle(num_stages=2, seed=21)
    path = str(tmp_path / "b")
    shutil.copytree(src.path, path)
    d = os.path.join(path, "engines", "k")
    os.makedirs(d)
    io_map = {"output0": "features", "output1": "logits", "output2": "confidence", "output3": "prediction"}
    meta = {"engines": [{"stage": 0, "file": "stage_0.engine", "io_map": io_map}, {"stage": 1, "file": "stage_1.engine"}]}
    for k in range(2):
        open(os.path.join(d, f"stage_{k}.engine"), "wb").close()
    files = TrtBackend(path)._engine_files(d, meta)
    assert [f[2] for f in files] == [io_map, {}]


@pytest.mark.skipif(available("tensorrt"), reason="TensorRT is installed here")
def test_without_tensorrt_auto_is_ort_and_trt_names_the_extra(toy_bundle):
    tb = toy_bundle(num_stages=2, seed=21)
    assert not trt_ready(tb.path)
    assert get_backend("auto", tb.path).name == "ort"
    with pytest.raises(DmpoEdgeError, match=r"dmpo-edge\[trt\]"):
        TrtBackend(tb.path).activate()


# --- GPU ------------------------------------------------------------------------------------------
def _gpu_ready():
    if not available("tensorrt"):
        return "TensorRT is not installed"
    from dmpo_edge.runtime.device import cuda_device_present

    if not (available("pycuda.driver") or available("cuda.bindings.runtime") or available("cuda.cudart")):
        return "neither pycuda nor cuda-python is installed"
    if not cuda_device_present():
        return "no CUDA device"
    return None


_GPU_SKIP = _gpu_ready()


def _build_engines(tb, max_batch):
    """Engines for every stage of a toy bundle on this GPU, laid out as ``dmpo-edge build`` does."""
    import tensorrt as trt

    from dmpo_edge.bundle import Bundle, sha256_file
    from dmpo_edge.runtime.backends.trt import this_device_key

    b = Bundle.load(tb.path)
    key = this_device_key(b.precision)
    d = os.path.join(tb.path, "engines", key)
    if os.path.isfile(os.path.join(d, "engines.json")):
        return key
    os.makedirs(d, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    entries = []
    for k in range(b.num_stages):
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        assert parser.parse_from_file(b.stage_path(k)), [parser.get_error(i) for i in range(parser.num_errors)]
        config = builder.create_builder_config()
        prof = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            rest = tuple(t.shape)[1:]
            prof.set_shape(t.name, (1, *rest), (max_batch, *rest), (max_batch, *rest))
        config.add_optimization_profile(prof)
        blob = builder.build_serialized_network(network, config)
        assert blob is not None
        name = f"stage_{k}.engine"
        with open(os.path.join(d, name), "wb") as f:
            f.write(bytes(blob))
        entries.append({"stage": k, "file": name, "sha256": sha256_file(os.path.join(d, name))})
    with open(os.path.join(d, "engines.json"), "w") as f:
        json.dump({"device_key": key, "engines": entries}, f)
    return key


@pytest.fixture(scope="module")
def trt_toy(toy_bundle):
    tb = toy_bundle(num_stages=3, classes=5, seed=31, max_batch=32)
    _build_engines(tb, 32)
    return tb


@pytest.mark.parametrize("device", ["pycuda", "cuda-python"])
@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_trt_static_matches_reference(trt_toy, device):
    if device == "pycuda" and not available("pycuda.driver"):
        pytest.skip("pycuda is not installed")
    if device == "cuda-python" and not (available("cuda.bindings.runtime") or available("cuda.cudart")):
        pytest.skip("cuda-python is not installed")
    from dmpo_edge.runtime.static import run_all_stages

    x = trt_toy.inputs(45, seed=2)
    with TrtBackend(trt_toy.path, device=device) as be:
        got = run_all_stages(None, x, batch_size=16, backend=be, keep_features=True)
    ref = trt_toy.reference(x)
    for k in range(3):
        np.testing.assert_allclose(got[k]["logits"], ref[k]["logits"], rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(got[k]["prediction"], ref[k]["prediction"])
        if k < 2:
            np.testing.assert_allclose(got[k]["features"], ref[k]["features"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("opts", [dict(), dict(refill=True, max_in_flight=3), dict(buckets="pow2")])
@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_trt_pipeline_matches_reference(trt_toy, opts):
    from dmpo_edge.runtime.pipeline import Pipeline

    assert trt_ready(trt_toy.path) and get_backend("auto", trt_toy.path).name == "trt"
    x = trt_toy.inputs(150, seed=3)
    ref_all = trt_toy.reference(x)
    thr = [float(np.quantile(ref_all[0]["confidence"], 0.5)) + 1e-4, float(np.quantile(ref_all[1]["confidence"], 0.5)) + 1e-4]
    with Pipeline.from_bundle(trt_toy.path, backend="auto", thresholds=thr, **opts) as p:
        assert p.backend.name == "trt"
        r = p.predict(x, batch_size=20, return_logits=True)
    e = trt_toy.early_exit(x, thr)
    np.testing.assert_array_equal(r.exit_stage, e["exit_stage"])
    np.testing.assert_array_equal(r.prediction, e["prediction"])
    np.testing.assert_allclose(r.logits, e["logits"], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_trt_engine_for_another_device_is_refused(trt_toy, tmp_path):
    path = str(tmp_path / "b")
    shutil.copytree(trt_toy.path, path, ignore=shutil.ignore_patterns("engines"))
    _fake_engines(path, "9.0.0-some_other_gpu-sm50-fp32")
    with pytest.raises(DmpoEdgeError, match="dmpo-edge build"):
        TrtBackend(path).activate()


def test_event_timings_are_off_until_asked_and_pop_empty(toy_bundle):
    """The bench's protocol exists without a GPU: recording is off by default and nothing is booked."""
    be = TrtBackend(toy_bundle(num_stages=2, seed=21).path)
    assert be.record_timings is False
    assert be.pop_event_timings() == [] and be.pop_event_timings() == []


@pytest.mark.parametrize("device", ["pycuda", "cuda-python"])
@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_trt_event_timings_one_record_per_stage_call(trt_toy, device):
    if device == "pycuda" and not available("pycuda.driver"):
        pytest.skip("pycuda is not installed")
    if device == "cuda-python" and not (available("cuda.bindings.runtime") or available("cuda.cudart")):
        pytest.skip("cuda-python is not installed")
    from dmpo_edge.runtime.pipeline import Pipeline

    x = trt_toy.inputs(60, seed=4)
    ref_all = trt_toy.reference(x)
    thr = [float(np.quantile(ref_all[0]["confidence"], 0.5)) + 1e-4, float(np.quantile(ref_all[1]["confidence"], 0.5)) + 1e-4]
    with Pipeline.from_bundle(trt_toy.path, backend="trt", thresholds=thr, backend_options={"device": device}) as p:
        be = p.backend
        p.predict(x[:20])
        assert be.pop_event_timings() == []  # off by default
        be.record_timings = True
        for xb in (x[:20], x[:60]):  # one batch in the caller's thread, then two through the workers
            p.reset_stats()
            r = p.predict(xb, batch_size=30)
            ev = be.pop_event_timings()
            stats = p.stats()
            assert len(ev) == sum(s["batches"] for s in stats)
            assert sorted(e["stage"] for e in ev) == sorted(k for k, s in enumerate(stats) for _ in range(s["batches"]))
            for e in ev:
                assert set(e) == {"stage", "h2d_ms", "compute_ms", "d2h_ms"}
                assert e["compute_ms"] > 0 and e["h2d_ms"] >= 0 and e["d2h_ms"] >= 0
                assert max(e["h2d_ms"], e["compute_ms"], e["d2h_ms"]) < 1000
            np.testing.assert_array_equal(r.exit_stage, trt_toy.early_exit(xb, thr)["exit_stage"])
        assert be.pop_event_timings() == []  # popped means cleared
        be.record_timings = False
        p.predict(x[:20])
        assert be.pop_event_timings() == []


# --- CUDA graphs: host-side bookkeeping (CPU) -----------------------------------------------------
class _GraphDevice:
    """The four graph calls of the device layer, recording what happened (stands in for a GPU)."""

    def __init__(self, capture_ok=True):
        self.capture_ok, self.calls, self.live, self.capturing, self.n = capture_ok, [], set(), False, 0

    def begin_capture(self, stream):
        self.capturing = True
        self.calls.append("begin")

    def end_capture(self, stream):
        self.capturing = False
        self.calls.append("end")
        if not self.capture_ok:
            raise RuntimeError("capture invalidated")
        self.n += 1
        self.live.add(self.n)
        return self.n

    def launch_graph(self, graph, stream):
        assert graph in self.live
        self.calls.append(("launch", graph))

    def destroy_graph(self, graph):
        self.live.discard(graph)


def _enqueue(dev, ok=True):
    def run():
        dev.calls.append("capture-enqueue" if dev.capturing else "enqueue")
        return ok
    return run


def test_bucket_key_is_the_input_shapes_order_free():
    from dmpo_edge.runtime.backends.trt_graphs import bucket_key

    a = bucket_key({"features_in": (8, 16), "keep_idx": (8,)})
    assert a == bucket_key({"keep_idx": (8,), "features_in": (8, 16)})
    assert a != bucket_key({"features_in": (8, 16), "keep_idx": (16,)})
    assert a != bucket_key({"features_in": (16, 16), "keep_idx": (8,)})


def _slots(made):
    """A make_slot that records every slot it makes: each gets its own context (a fresh object) and buffers."""
    from dmpo_edge.runtime.backends.trt_graphs import GraphSlot

    def make(key):
        s = GraphSlot(key, context=object(), bufs={"input": len(made)})
        made.append(s)
        return s
    return make


def test_each_bucket_gets_its_own_context_warm_up_then_capture_then_replay():
    from dmpo_edge.runtime.backends.trt_graphs import StageGraphs

    dev, made, freed = _GraphDevice(), [], []
    g = StageGraphs(dev, _slots(made), free_slot=freed.append)
    s8 = g.slot(("b8",))
    assert g.slot(("b8",)) is s8  # one slot per bucket, made once
    for _ in range(4):
        assert g.run(s8, "s", _enqueue(dev)) is True
    # the first call enqueues (its result is the call's result) and captures right after; then replays only
    assert dev.calls == ["enqueue", "begin", "capture-enqueue", "end", ("launch", 1), ("launch", 1), ("launch", 1)]
    dev.calls.clear()
    s16 = g.slot(("b16",))
    assert s16.context is not s8.context  # never one context for two graphs
    assert g.run(s16, "s", _enqueue(dev)) and g.run(s16, "s", _enqueue(dev))
    assert dev.calls == ["enqueue", "begin", "capture-enqueue", "end", ("launch", 2)]
    assert g.num_graphs == 2 and g.counts == {"enqueued": 2, "captured": 2, "launched": 4, "capture_failed": 0}
    g.release()
    assert dev.live == set() and g.num_graphs == 0 and freed == [s8, s16]


def test_a_failed_capture_keeps_enqueueing_on_the_slots_context():
    from dmpo_edge.runtime.backends.trt_graphs import StageGraphs

    for dev, enq_ok_in_capture in ((_GraphDevice(capture_ok=False), True), (_GraphDevice(), False)):
        g = StageGraphs(dev, _slots([]))

        def enqueue():  # TensorRT refuses to enqueue while capturing (e.g. data-dependent shapes)
            dev.calls.append("capture-enqueue" if dev.capturing else "enqueue")
            return enq_ok_in_capture or not dev.capturing

        s = g.slot(("k",))
        assert all(g.run(s, "s", enqueue) for _ in range(4))
        assert dev.calls == ["enqueue", "begin", "capture-enqueue", "end", "enqueue", "enqueue", "enqueue"]
        assert g.counts["capture_failed"] == 1 and g.num_graphs == 0 and dev.live == set() and s.plain
        assert not dev.capturing  # the stream always leaves capture mode


def test_slot_limit_refusals_and_a_failed_warm_up_is_not_captured():
    from dmpo_edge.runtime.backends.trt_graphs import StageGraphs

    dev, made = _GraphDevice(), []
    g = StageGraphs(dev, _slots(made), max_graphs=1)
    a = g.slot(("a",))
    assert g.run(a, "s", _enqueue(dev, ok=False)) is False  # a failing enqueue is reported, never captured
    assert dev.calls == ["enqueue"] and a.graph is None
    assert g.slot(("b",)) is None  # beyond max_graphs: the stage's ordinary path
    logs = []

    def refuse(key):
        raise RuntimeError("profile 2 is in use by another context")

    g2 = StageGraphs(dev, refuse, log=logs.append)
    assert g2.slot(("c",)) is None and g2.slot(("c",)) is None  # refused once, not retried
    assert len(logs) == 1 and "runs without one" in logs[0]


def test_best_profile_uses_the_bucket_profiles_of_every_stage(toy_bundle):
    """Every profile lets features_in range over 1..max_batch: ranking by the largest maximum alone tied and
    always picked profile 0 for stages k > 0."""
    from dmpo_edge.runtime.backends.trt import _Stage

    be = TrtBackend(toy_bundle(num_stages=2, seed=21).path)
    st = _Stage()
    st.profiles = [{"features_in": (1, 64), "keep_idx": (1, 64)}, {"features_in": (1, 64), "keep_idx": (1, 8)},
                   {"features_in": (1, 64), "keep_idx": (9, 32)}, {"features_in": (1, 64), "keep_idx": (33, 64)}]
    assert be._best_profile(st, {"features_in": 40, "keep_idx": 5}) == 1
    assert be._best_profile(st, {"features_in": 64, "keep_idx": 20}) == 2
    assert be._best_profile(st, {"features_in": 64, "keep_idx": 64}) == 3
    st.profiles = [{"input": (1, 64)}, {"input": (1, 1)}, {"input": (2, 2)}, {"input": (3, 4)}]
    assert [be._best_profile(st, {"input": n}) for n in (1, 2, 4, 7)] == [1, 2, 3, 0]
    with pytest.raises(DmpoEdgeError, match="fit none"):
        be._best_profile(st, {"input": 65})


def test_a_refused_profile_switch_is_one_clear_error(toy_bundle):
    be = TrtBackend(toy_bundle(num_stages=2, seed=21).path)

    class Dev:
        def stream_handle(self, stream):
            return 7

    class Refuses:
        def __init__(self, how):
            self.how = how

        def set_optimization_profile_async(self, profile, stream):
            if self.how == "raise":
                raise RuntimeError("profile 1 is already in use by another execution context")
            return False

    be.dev = Dev()
    for how, why in (("raise", "already in use"), ("false", "returned False")):
        with pytest.raises(DmpoEdgeError, match=f"refused to switch to optimisation profile 1 .*{why}"):
            be._switch_profile(Refuses(how), 1, object(), "stage 1")


def test_cuda_graphs_follow_buckets_unless_forced(toy_bundle):
    path = toy_bundle(num_stages=2, seed=21).path
    be = TrtBackend(path)
    assert be.graphs_enabled is False and be.graph_stats()["graphs"] == 0
    be.use_buckets((1, 2, 4))
    assert be.graphs_enabled is True
    be.use_buckets(None)
    assert be.graphs_enabled is False
    forced_off = TrtBackend(path, cuda_graphs=False)
    forced_off.use_buckets((1, 2, 4))
    assert forced_off.graphs_enabled is False
    assert TrtBackend(path, cuda_graphs=True).graphs_enabled is True


def test_pipeline_hands_its_buckets_to_the_backend(toy_bundle):
    from dmpo_edge.runtime.backends.ort import OrtBackend
    from dmpo_edge.runtime.pipeline import Pipeline

    tb = toy_bundle(num_stages=2, seed=21)
    seen = []

    class Recording(OrtBackend):
        def use_buckets(self, buckets):
            seen.append(buckets)

    for buckets in (None, "pow2"):
        with Pipeline.from_bundle(tb.path, backend=Recording(tb.path), thresholds=[0.5], buckets=buckets) as p:
            assert seen[-1] == p.buckets
    assert seen[0] is None and seen[1] == (1, 2, 4, 8, 16, 32, 64)


@pytest.mark.parametrize("device", ["pycuda", "cuda-python"])
@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_trt_cuda_graphs_with_buckets_match_reference(trt_toy, device):
    if device == "pycuda" and not available("pycuda.driver"):
        pytest.skip("pycuda is not installed")
    if device == "cuda-python" and not (available("cuda.bindings.runtime") or available("cuda.cudart")):
        pytest.skip("cuda-python is not installed")
    from dmpo_edge.runtime.pipeline import Pipeline

    x = trt_toy.inputs(150, seed=5)
    ref_all = trt_toy.reference(x)
    thr = [float(np.quantile(ref_all[0]["confidence"], 0.5)) + 1e-4, float(np.quantile(ref_all[1]["confidence"], 0.5)) + 1e-4]
    e = trt_toy.early_exit(x, thr)
    with Pipeline.from_bundle(trt_toy.path, backend="trt", thresholds=thr, buckets="pow2",
                              backend_options={"device": device}) as p:
        assert p.backend.graphs_enabled
        for _ in range(3):  # enqueue, capture, replay
            r = p.predict(x, batch_size=20, return_logits=True)
            np.testing.assert_array_equal(r.exit_stage, e["exit_stage"])
            np.testing.assert_array_equal(r.prediction, e["prediction"])
            np.testing.assert_allclose(r.logits, e["logits"], rtol=1e-3, atol=1e-3)
        gs = p.backend.graph_stats()
        if p.backend.dev.graphs_supported():
            assert gs["captured"] + gs["capture_failed"] > 0
            assert gs["launched"] > 0 or gs["capture_failed"] > 0
