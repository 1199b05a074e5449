"""The caller-thread path of predict / run_static against the in-flight workers: same exits, classes, order.

One batch (n <= min(batch_size, max_batch)) with nothing else in flight runs its stages in the
caller's thread; everything else goes through the stage workers. A thread-recording wrapper around
the real ONNX Runtime backend says which path ran; the results are compared with the numpy reference
and with the workers' results for the same samples.
"""

import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dmpo_edge.bundle import Bundle
from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.runtime import pipeline as pipeline_mod
from dmpo_edge.runtime.pipeline import Pipeline

K = 4
MAX_BATCH = 32


@pytest.fixture(scope="module")
def tb(toy_bundle):
    return toy_bundle(num_stages=K, classes=5, seed=11, max_batch=MAX_BATCH)


@pytest.fixture(scope="module")
def pool(tb):
    return tb.inputs(120, seed=5)


class _Threads:
    """Records the thread of every stage call on a real backend (the call itself goes through)."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []
        self._infer = backend.infer

        def infer(k, feeds, keep_features=False):
            self.calls.append((k, threading.get_ident()))
            return self._infer(k, feeds, keep_features=keep_features)

        backend.infer = infer

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


def _same(a, b):
    np.testing.assert_array_equal(a.exit_stage, b.exit_stage)
    np.testing.assert_array_equal(a.prediction, b.prediction)
    np.testing.assert_array_equal(a.confidence, b.confidence)
    if a.logits is not None or b.logits is not None:
        np.testing.assert_array_equal(a.logits, b.logits)


def _matches_reference(r, e):
    np.testing.assert_array_equal(r.exit_stage, e["exit_stage"])
    np.testing.assert_array_equal(r.prediction, e["prediction"])
    np.testing.assert_allclose(r.confidence, e["confidence"], rtol=1e-5, atol=1e-5)
    assert r.prediction.dtype == np.int64 and r.confidence.dtype == np.float32 and r.exit_stage.dtype == np.int32


def _far(tb, x, thr, eps=1e-4):
    ref = tb.reference(x)
    return all(np.all(np.abs(ref[k]["confidence"] - t) > eps) for k, t in enumerate(thr) if math.isfinite(t))


CONFIGS = [dict(), dict(buckets="pow2"), dict(refill=True, max_in_flight=3), dict(max_in_flight=1)]


@pytest.fixture(scope="module", params=range(len(CONFIGS)),
                ids=lambda i: "-".join(f"{k}={v}" for k, v in CONFIGS[i].items()) or "default")
def traced(request, tb):
    with Pipeline.from_bundle(tb.path, thresholds=[0.5] * (K - 1), **CONFIGS[request.param]) as p:
        yield p, _Threads(p.backend)


thr_value = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, math.inf]))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(thr=st.lists(thr_value, min_size=K - 1, max_size=K - 1), n=st.integers(0, MAX_BATCH), start=st.integers(0, 80),
       logits=st.booleans())
def test_one_batch_runs_in_the_callers_thread_and_matches_the_workers(traced, tb, pool, thr, n, start, logits):
    p, threads = traced
    x = pool[start:start + n]
    assume(_far(tb, x, thr))
    p.thresholds = thr
    threads.take()
    direct = p.predict(x, return_logits=logits)
    calls = threads.take()
    assert all(t == threading.get_ident() for _, t in calls), "a single batch should not leave the caller's thread"
    assert [k for k, _ in calls] == sorted(k for k, _ in calls)  # stage by stage
    # The same batch through the workers (submit/results always uses them).
    p.submit(x, return_logits=logits)
    ((_, workers),) = list(p.results())
    calls = threads.take()
    assert n == 0 or (calls and all(t != threading.get_ident() for _, t in calls))
    assert len(direct) == n
    _same(direct, workers)
    _matches_reference(direct, tb.early_exit(x, thr))


@pytest.mark.parametrize("n,batch_size", [(MAX_BATCH + 1, None), (90, None), (20, 8)])
def test_more_than_one_batch_goes_through_the_workers(tb, pool, n, batch_size):
    thr = [0.6, 0.7, 0.8]
    with Pipeline.from_bundle(tb.path, thresholds=thr) as p:
        threads = _Threads(p.backend)
        r = p.predict(pool[:n], batch_size=batch_size, return_logits=True)
        calls = threads.take()
    assert calls and all(t != threading.get_ident() for _, t in calls)
    _matches_reference(r, tb.early_exit(pool[:n], thr))


def test_run_static_in_the_callers_thread_is_the_last_exit(tb, pool):
    with Pipeline.from_bundle(tb.path, thresholds=[0.0] * (K - 1)) as p:
        threads = _Threads(p.backend)
        r = p.run_static(pool[:30], return_logits=True)
        calls = threads.take()
        assert [k for k, _ in calls] == list(range(K)) and all(t == threading.get_ident() for _, t in calls)
        big = p.run_static(pool[:70], return_logits=True, batch_size=30)
        assert all(t != threading.get_ident() for _, t in threads.take())
        stats = p.stats()
    ref = tb.reference(pool[:70])[-1]
    assert np.all(r.exit_stage == K - 1) and np.all(big.exit_stage == K - 1)
    np.testing.assert_array_equal(r.prediction, ref["prediction"][:30])
    np.testing.assert_array_equal(big.prediction, ref["prediction"])
    np.testing.assert_array_equal(r.logits, big.logits[:30])
    # stats count the caller-thread run like a worker run: every stage saw 30 + 70 samples
    assert [s["samples_in"] for s in stats] == [100] * K and stats[-1]["exited"] == 100


def test_input_is_checked_once(tb, pool, monkeypatch):
    seen = []
    real = pipeline_mod.check_batch

    def counting(*a, **kw):
        seen.append(kw.get("where"))
        return real(*a, **kw)

    monkeypatch.setattr(pipeline_mod, "check_batch", counting)
    with Pipeline.from_bundle(tb.path, thresholds=[0.5] * (K - 1)) as p:
        p.predict(pool[:10])  # caller's thread
        assert len(seen) == 1
        p.predict(pool[:100], batch_size=16)  # 7 batches through the workers
        assert len(seen) == 2
        p.submit(pool[:5])  # submit checks what it is given
        list(p.results())
        assert len(seen) == 3


def test_a_failed_stage_in_the_callers_thread_leaves_the_pipeline_usable(tb, pool):
    thr = [0.9, 0.95, 0.99]
    with Pipeline.from_bundle(tb.path, thresholds=thr, max_in_flight=1) as p:
        real = p.backend.infer

        def failing(k, feeds, keep_features=False):
            if k == 2:
                raise RuntimeError("device lost")
            return real(k, feeds, keep_features=keep_features)

        p.backend.infer = failing
        with pytest.raises(DmpoEdgeError, match=r"pipeline stage 2.*RuntimeError: device lost"):
            p.predict(pool[:20])
        p.backend.infer = real
        # nothing is left counted in flight: with max_in_flight=1 a stuck count would block submit() for good
        t = threading.Thread(target=p.submit, args=(pool[:20],), kwargs={"tag": "after"}, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "submit() blocked: the failed batch is still counted in flight"
        ((tag, r),) = list(p.results())
        assert tag == "after"
        _matches_reference(r, tb.early_exit(pool[:20], thr))
        _matches_reference(p.predict(pool[:20]), tb.early_exit(pool[:20], thr))


def test_a_second_predict_during_a_caller_thread_run_takes_the_workers(tb, pool):
    """Thread A's one-batch predict runs in A's thread; thread B's predict, arriving meanwhile, finds A's
    batch in flight and goes through the workers instead (the per-stage lock keeps one caller per stage
    engine). Each gets its own results."""
    thr = [0.6, 0.7, 0.8]
    with Pipeline.from_bundle(tb.path, thresholds=thr) as p:
        gate, entered = threading.Event(), threading.Event()
        real = p.backend.infer
        calls = []

        def held_stage0(k, feeds, keep_features=False):
            calls.append((threading.current_thread().name, k))
            if k == 0 and threading.current_thread().name == "A":
                entered.set()
                gate.wait(10)
            return real(k, feeds, keep_features=keep_features)

        p.backend.infer = held_stage0
        out = {}
        a = threading.Thread(target=lambda: out.setdefault("a", p.predict(pool[:25])), name="A")
        b = threading.Thread(target=lambda: out.setdefault("b", p.predict(pool[30:50])), name="B")
        a.start()
        assert entered.wait(10)
        b.start()
        b.join(0.3)  # B's stage 0 waits for A's to finish
        gate.set()
        a.join(10)
        b.join(10)
    a_calls = [k for name, k in calls if name == "A"]
    b_calls = [(name, k) for name, k in calls if name != "A"]
    assert a_calls == sorted(a_calls) and a_calls[0] == 0
    worker_stage = [(name.split(".")[0], k) for name, k in b_calls]  # stage 0 may have several workers: -0, -0.1
    assert b_calls and ("dmpo-stage-0", 0) in worker_stage and all(name == f"dmpo-stage-{k}" for name, k in worker_stage)
    _matches_reference(out["a"], tb.early_exit(pool[:25], thr))
    _matches_reference(out["b"], tb.early_exit(pool[30:50], thr))


@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_ort_sessions_do_not_spin_when_several_stages_exist(toy_bundle, max_in_flight):
    """An idle stage session's spinning pool would burn the cores the next stage needs, in either path."""
    tb = toy_bundle(num_stages=3, seed=13, thresholds=[0.5, 0.5])
    with Pipeline.from_bundle(tb.path, max_in_flight=max_in_flight) as p:
        assert p.backend.spinning is False
    one = toy_bundle(num_stages=1, seed=14)
    with Pipeline.from_bundle(one.path) as p:
        assert p.backend.spinning is None  # a single session: ONNX Runtime's default
    with Pipeline.from_bundle(tb.path, backend_options={"spinning": True}) as p:
        assert p.backend.spinning is True  # the caller's choice stands


class _SessionCalls:
    """Which ONNX Runtime session objects ran (a recording wrapper around each real session's run)."""

    def __init__(self, backend):
        self.calls = []
        for kind, sessions in (("narrow", backend.sessions), ("wide", backend.wide_sessions)):
            for k, sess in enumerate(sessions):
                real = sess.run

                def run(*a, _real=real, _kind=kind, _k=k, **kw):
                    self.calls.append((_kind, _k, threading.current_thread().name))
                    return _real(*a, **kw)

                sess.run = run

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


def test_caller_thread_path_takes_the_all_core_sessions_for_enough_work(tb, pool):
    thr = [0.6, 0.7, 0.8]
    opts = {"threads": 1, "exclusive_threads": 2, "exclusive_min_mflops": 0.0}
    with Pipeline.from_bundle(tb.path, thresholds=thr, backend_options=opts) as p:
        assert len(p.backend.wide_sessions) == K and p.backend.wide_sessions[0] is not p.backend.sessions[0]
        calls = _SessionCalls(p.backend)
        one = p.predict(pool[:30], return_logits=True)  # one batch: the caller's thread, wide sessions
        got = calls.take()
        assert got and all(kind == "wide" and name == threading.current_thread().name for kind, _, name in got)
        many = p.predict(pool[:90], return_logits=True)  # three batches: the workers, their own sessions
        got = calls.take()
        assert got and all(kind == "narrow" and name.startswith("dmpo-stage-") for kind, _, name in got)
        p.submit(pool[:30], return_logits=True)
        ((_, streamed),) = list(p.results())
        assert all(kind == "narrow" for kind, _, _ in calls.take())
        static = p.run_static(pool[:30])  # the static baseline gets the same treatment
        assert [(kind, k) for kind, k, _ in calls.take()] == [("wide", k) for k in range(K)]
    _matches_reference(one, tb.early_exit(pool[:30], thr))
    _matches_reference(many, tb.early_exit(pool[:90], thr))
    np.testing.assert_array_equal(one.exit_stage, streamed.exit_stage)
    np.testing.assert_allclose(one.logits, streamed.logits, rtol=1e-5, atol=1e-6)
    assert np.all(static.exit_stage == K - 1)


def test_small_stage_calls_stay_on_the_narrow_sessions(tb, pool):
    """Below exclusive_min_mflops splitting an operator across threads costs more than it saves."""
    flops = [s["flops"] for s in Bundle.load(tb.path).stages]
    rows = 20
    cut = rows * flops[0] / 1e6  # stage 0 at 20 rows is just enough; survivor batches deeper are smaller
    opts = {"threads": 1, "exclusive_threads": 2, "exclusive_min_mflops": cut}
    with Pipeline.from_bundle(tb.path, thresholds=[0.0] * (K - 1), backend_options=opts) as p:
        calls = _SessionCalls(p.backend)
        p.predict(pool[:rows])
        assert [(kind, k) for kind, k, _ in calls.take()] == [("wide", 0)]
        p.predict(pool[:rows - 1])
        assert [(kind, k) for kind, k, _ in calls.take()] == [("narrow", 0)]


def test_default_threads_split_for_workers_and_all_cores_for_one_batch(tb):
    from dmpo_edge.runtime.backends.ort import _default_threads

    cores = _default_threads()
    with Pipeline.from_bundle(tb.path, thresholds=[0.5] * (K - 1), max_in_flight=2) as p:
        be = p.backend
        assert be.threads == max(1, cores // 2)
        if cores >= 2:
            assert be.exclusive_threads == cores and len(be.wide_sessions) == K
        else:
            assert be.wide_sessions == []
    with Pipeline.from_bundle(tb.path, thresholds=[0.5] * (K - 1), backend_options={"threads": 1}) as p:
        assert p.backend.threads == 1 and p.backend.wide_sessions == []  # an explicit count is the whole answer


def _timed_stage_calls(backend, hold_s=0.03):
    """Record (stage, thread name, start, end) of every stage call; stage 0 is held a little so overlap shows."""
    import time

    calls, real = [], backend.infer

    def infer(k, feeds, keep_features=False):
        t0 = time.perf_counter()
        if k == 0:
            time.sleep(hold_s)
        out = real(k, feeds, keep_features=keep_features)
        calls.append((k, threading.current_thread().name, t0, time.perf_counter()))
        return out

    backend.infer = infer
    return calls


def test_stage0_runs_batches_in_flight_side_by_side_on_onnx_runtime(tb, pool):
    """Every sample passes stage 0 and most leave there: with one stage-0 worker a stream keeps one core busy."""
    thr = [0.6, 0.7, 0.8]
    with Pipeline.from_bundle(tb.path, thresholds=thr, max_in_flight=2) as p:
        assert p.backend.concurrent_calls
        calls = _timed_stage_calls(p.backend)
        xs = [pool[i * 20:(i + 1) * 20] for i in range(4)]
        for i, xb in enumerate(xs):
            p.submit(xb, tag=i)
        got = list(p.results())
    assert [t for t, _ in got] == [0, 1, 2, 3]
    for (_, r), xb in zip(got, xs):
        _matches_reference(r, tb.early_exit(xb, thr))
    s0 = [c for c in calls if c[0] == 0]
    assert {name for _, name, _, _ in s0} <= {"dmpo-stage-0", "dmpo-stage-0.1"}
    overlap = any(a[2] < b[3] and b[2] < a[3] for a in s0 for b in s0 if a[1] != b[1])
    assert overlap, "two batches in flight never ran stage 0 at the same time"


def test_one_call_per_stage_for_backends_that_need_it(tb, pool):
    """TensorRT keeps an execution context and staging buffers per stage: one worker, and a lock against the
    caller's thread (shown here with ONNX Runtime told that it is such a backend)."""
    from dmpo_edge.runtime.backends import OrtBackend

    be = OrtBackend(tb.path, threads=1)
    be.concurrent_calls = False
    thr = [0.6, 0.7, 0.8]
    with Pipeline.from_bundle(None, backend=be, thresholds=thr, max_in_flight=3) as p:
        calls = _timed_stage_calls(p.backend)
        for i in range(4):
            p.submit(pool[i * 20:(i + 1) * 20], tag=i)
        got = list(p.results())
    for (_, r), i in zip(got, range(4)):
        _matches_reference(r, tb.early_exit(pool[i * 20:(i + 1) * 20], thr))
    for k in range(K):
        mine = sorted((c[2], c[3]) for c in calls if c[0] == k)
        assert all(end <= nxt_start for (_, end), (nxt_start, _) in zip(mine, mine[1:])), f"stage {k} calls overlapped"
    assert {c[1] for c in calls if c[0] == 0} == {"dmpo-stage-0"}
