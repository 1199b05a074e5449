"""The early-exit pipeline against the numpy reference: same exits, classes and logits, order kept."""

import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.runtime.pipeline import Pipeline, Results

K = 4


@pytest.fixture(scope="module")
def tb(toy_bundle):
    return toy_bundle(num_stages=K, classes=5, seed=1, max_batch=32)


@pytest.fixture(scope="module")
def pool(tb):
    return tb.inputs(200, seed=7)


def _check(r: Results, e: dict, logits=True):
    np.testing.assert_array_equal(r.exit_stage, e["exit_stage"])
    np.testing.assert_array_equal(r.prediction, e["prediction"])
    np.testing.assert_allclose(r.confidence, e["confidence"], rtol=1e-5, atol=1e-5)
    if logits:
        np.testing.assert_allclose(r.logits, e["logits"], rtol=1e-4, atol=1e-4)
    assert r.prediction.dtype == np.int64 and r.confidence.dtype == np.float32 and r.exit_stage.dtype == np.int32


def _far_from_confidences(tb, x, thr, eps=1e-4):
    """Thresholds within float noise of a confidence would make either exit decision right."""
    ref = tb.reference(x)
    return all(np.all(np.abs(ref[k]["confidence"] - t) > eps) for k, t in enumerate(thr) if math.isfinite(t))


CONFIGS = [dict(), dict(buckets="pow2"), dict(refill=True), dict(refill=True, buckets=[4, 16], max_in_flight=3),
           dict(max_in_flight=1)]


@pytest.fixture(scope="module", params=range(len(CONFIGS)), ids=lambda i: "-".join(f"{k}={v}" for k, v in CONFIGS[i].items()) or "default")
def pipe(request, tb):
    with Pipeline.from_bundle(tb.path, thresholds=[0.5] * (K - 1), **CONFIGS[request.param]) as p:
        yield p


thr_value = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, math.inf, 1.5]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(thr=st.lists(thr_value, min_size=K - 1, max_size=K - 1), n=st.integers(0, 90), bs=st.integers(1, 40),
       start=st.integers(0, 100))
def test_predict_matches_reference(pipe, tb, pool, thr, n, bs, start):
    x = pool[start:start + n]
    assume(_far_from_confidences(tb, x, thr))
    pipe.thresholds = thr
    r = pipe.predict(x, return_logits=True, batch_size=bs)
    assert len(r) == x.shape[0]
    _check(r, tb.early_exit(x, thr))


@pytest.mark.parametrize("thr,expect", [([0.0] * (K - 1), 0), ([math.inf] * (K - 1), K - 1)])
def test_all_exit_first_or_none_before_last(tb, pool, thr, expect):
    with Pipeline.from_bundle(tb.path, thresholds=thr) as p:
        r = p.predict(pool[:50], return_logits=True)
        assert np.all(r.exit_stage == expect)
        _check(r, tb.early_exit(pool[:50], thr))
        stats = p.stats()
    assert stats[0]["samples_in"] == 50 and stats[expect]["exited"] == 50
    assert sum(s["exited"] for s in stats) == 50


def test_batch_of_one_and_empty(tb, pool):
    with Pipeline.from_bundle(tb.path, thresholds=[0.7] * (K - 1)) as p:
        r = p.predict(pool[3:4], return_logits=True)
        _check(r, tb.early_exit(pool[3:4], [0.7] * (K - 1)))
        e = p.predict(pool[:0])
        assert len(e) == 0 and e.exit_stage.shape == (0,)


def test_submit_results_order_with_batches_in_flight(tb, pool):
    thr = [0.8, 0.9, 0.95]
    sizes = [1, 17, 32, 5, 0, 64, 3, 31, 40]  # 64 and 40 exceed max_batch 32: split into groups
    with Pipeline.from_bundle(tb.path, thresholds=thr, max_in_flight=4, refill=True) as p:
        got, xs, s = [], [], 0
        for i, n in enumerate(sizes):
            xb = pool[s % 150:(s % 150) + n]
            xs.append(xb)
            s += n
            p.submit(xb, tag=i)
            got.extend(p.results(wait=False))
        got.extend(p.results())
    assert [t for t, _ in got] == list(range(len(sizes)))
    for (_, r), xb in zip(got, xs):
        assert len(r) == xb.shape[0]
        _check(r, tb.early_exit(xb, thr), logits=False)


def test_thresholds_change_between_batches(tb, pool):
    with Pipeline.from_bundle(tb.path, thresholds=[0.0] * (K - 1)) as p:
        p.submit(pool[:20], tag="early")
        p.thresholds = [math.inf] * (K - 1)
        p.submit(pool[:20], tag="late")
        (t1, a), (t2, b) = list(p.results())
    assert (t1, t2) == ("early", "late")
    assert np.all(a.exit_stage == 0) and np.all(b.exit_stage == K - 1)


def test_run_static_is_the_last_exit(tb, pool):
    with Pipeline.from_bundle(tb.path, thresholds=[0.0] * (K - 1)) as p:
        r = p.run_static(pool[:45], return_logits=True, batch_size=16)
    ref = tb.reference(pool[:45])[-1]
    assert np.all(r.exit_stage == K - 1)
    np.testing.assert_array_equal(r.prediction, ref["prediction"])
    np.testing.assert_allclose(r.logits, ref["logits"], rtol=1e-4, atol=1e-4)


def test_concurrent_submitters_get_their_own_results(tb, pool):
    thr = [0.6, 0.8, 0.9]
    with Pipeline.from_bundle(tb.path, thresholds=thr, max_in_flight=3) as p:
        lock = threading.Lock()

        def work(i):
            # each thread uses predict on its own pipeline view: serialise predict, overlap inside it
            with lock:
                return p.predict(pool[i * 20:(i + 1) * 20])

        outs = [work(i) for i in range(3)]
    for i, r in enumerate(outs):
        _check(r, tb.early_exit(pool[i * 20:(i + 1) * 20], thr), logits=False)


def test_missing_thresholds_names_calibrate(toy_bundle):
    tb = toy_bundle(num_stages=3, seed=5)  # manifest without thresholds
    with pytest.raises(DmpoEdgeError, match="dmpo-edge calibrate"):
        Pipeline.from_bundle(tb.path)


def test_manifest_thresholds_used(toy_bundle):
    tb = toy_bundle(num_stages=3, seed=6, thresholds=[0.0, 0.0])
    with Pipeline.from_bundle(tb.path) as p:
        assert p.thresholds == [0.0, 0.0]
        assert np.all(p.predict(tb.inputs(10)).exit_stage == 0)


@pytest.mark.parametrize("bad", [[0.5], [0.5, float("nan"), 0.5], "high"])
def test_bad_thresholds(tb, bad):
    with Pipeline.from_bundle(tb.path, thresholds=[0.5] * (K - 1)) as p:
        with pytest.raises(DmpoEdgeError, match="thresholds|threshold"):
            p.thresholds = bad


def test_bad_batch_is_refused_and_pipeline_survives(tb, pool):
    with Pipeline.from_bundle(tb.path, thresholds=[0.5] * (K - 1)) as p:
        with pytest.raises(DmpoEdgeError, match="N x 3 x 8 x 8"):
            p.predict(np.zeros((2, 8, 8, 3), np.float32))
        x = pool[:4].copy()
        x[1, 2, 3, 4] = np.inf
        with pytest.raises(DmpoEdgeError, match=r"NaN or Inf \(rows 1\)"):
            p.predict(x)
        assert len(p.predict(pool[:4])) == 4


def test_damaged_bundle_is_refused(tb, tmp_path):
    import shutil

    dst = tmp_path / "b"
    shutil.copytree(tb.path, dst)
    with open(dst / "stage_2.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DmpoEdgeError, match="sha256"):
        Pipeline.from_bundle(str(dst), thresholds=[0.5] * (K - 1))


def test_null_backend_runs_the_same_scheduler(tb, pool):
    with Pipeline.from_bundle(tb.path, backend="null", thresholds=[0.7] * (K - 1), refill=True, buckets="pow2") as p:
        r = p.predict(pool[:100], batch_size=30)
        stats = p.stats()
    assert len(r) == 100 and np.all(r.exit_stage >= 0)
    assert sum(s["exited"] for s in stats) == 100
