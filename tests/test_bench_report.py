"""The interleaved loop and the report's bookkeeping, on real ONNX stages in real ONNX Runtime sessions."""

import json
import time

import numpy as np
import pytest

from dmpo_edge.runtime.bench import BenchSettings, Runner, batches_of, bench_batch, host_overhead, interleave, run_benchmark
from dmpo_edge.runtime.bench_stats import exit_histogram
from dmpo_edge.runtime.pipeline import Pipeline

THRESHOLDS = [0.8, 0.8]
QUICK = BenchSettings(batch_sizes=[1, 8, 32], warmup_ms=10, duration_s=0.15, iterations=3, stream_batches=3)


def test_interleave_alternates_and_feeds_the_same_batch():
    log = []

    def runner(name, cost_s):
        def call(j):
            log.append((name, j))
            time.sleep(cost_s)
            return j
        return Runner(name, call)

    out = interleave([runner("early_exit", 0.001), runner("static", 0.002)], num_batches=3, warmup_s=0.0,
                     duration_s=0.05, min_iterations=5)
    names = [t[0] for t in out["trace"]]
    assert names == ["early_exit", "static"] * out["rounds"]
    assert log == [(t[0], t[1]) for t in out["trace"]]  # no warm-up call with warmup 0
    # round r feeds batch r % 3 to both, so both see the same inputs
    assert [t[1] for t in out["trace"]] == [r % 3 for r in range(out["rounds"]) for _ in range(2)]
    assert out["rounds"] >= 5 and out["wall_s"] >= 0.05
    starts = [t[2] for t in out["trace"]]
    ends = [t[3] for t in out["trace"]]
    assert all(e <= s for e, s in zip(ends, starts[1:]))  # one at a time, in order
    assert len(out["latency_s"]["early_exit"]) == len(out["latency_s"]["static"]) == out["rounds"]
    # latency is the call alone: the 2 ms runner measures about twice the 1 ms one
    assert np.median(out["latency_s"]["static"]) > 1.4 * np.median(out["latency_s"]["early_exit"])
    # at least `min_iterations` even when the duration is already over
    out = interleave([runner("a", 0.0)], 1, warmup_s=0.0, duration_s=0.0, min_iterations=7)
    assert out["rounds"] == 7


def test_interleave_settles_each_runner_on_the_previous_batch_untimed():
    """With settle, every timed call follows an untimed call of the same runner on the previous batch, outside
    before/after, so it is timed in its own configuration's caches and its counters hold the timed call only."""
    log = []

    def runner(name):
        return Runner(name, lambda j: log.append((name, "call", j)), before=lambda j: log.append((name, "before", j)),
                      after=lambda j, out: log.append((name, "after", j)))

    out = interleave([runner("early_exit"), runner("static")], num_batches=3, warmup_s=0.0, duration_s=0.0,
                     min_iterations=4, settle=True)
    expect = []
    for r in range(4):
        for name in ("early_exit", "static"):
            expect += [(name, "call", (r - 1) % 3), (name, "before", r % 3), (name, "call", r % 3), (name, "after", r % 3)]
    assert log == expect
    assert [t[:2] for t in out["trace"]] == [(n, r % 3) for r in range(4) for n in ("early_exit", "static")]
    assert len(out["latency_s"]["static"]) == 4  # settle calls are not timed


def test_settle_is_on_for_one_batch_calls_and_recorded(toy_bundle):
    tb = toy_bundle(num_stages=3, classes=4, seed=3, thresholds=THRESHOLDS)
    x = tb.inputs(40, seed=2)
    calls = []
    s = BenchSettings(batch_sizes=[8], warmup_ms=0, duration_s=0.0, iterations=3, stream_batches=2)
    assert s.settle is True
    with Pipeline.from_bundle(tb.path, backend="ort", backend_options={"threads": 1}) as pipe:
        real_predict, real_static = pipe.predict, pipe.run_static
        pipe.predict = lambda xb, **kw: calls.append(("ee", xb.shape[0])) or real_predict(xb, **kw)
        pipe.run_static = lambda xb, **kw: calls.append(("static", xb.shape[0])) or real_static(xb, **kw)
        r = bench_batch(pipe, x, None, 8, [{"name": "early_exit", "thresholds": THRESHOLDS}], s, [1.0, 2.0, 3.0])
        assert r["early_exit"][0]["iterations"] == r["static"]["iterations"] == 3
        assert calls == [("ee", 8), ("ee", 8), ("static", 8), ("static", 8)] * 3  # settle + timed, each
        # the counters hold the timed calls only
        assert r["early_exit"][0]["stages"][0]["samples_in"] == r["static"]["stages"][0]["samples_in"] == 24
        calls.clear()
        bench_batch(pipe, x, None, 16, [{"name": "early_exit", "thresholds": THRESHOLDS}], s, [1.0, 2.0, 3.0], stage_batch=8)
        assert calls == [("ee", 16), ("static", 16)] * 3  # streams of several batches: no settle call


def test_interleave_warms_up_first():
    log = []
    out = interleave([Runner("a", lambda j: log.append(j))], 2, warmup_s=0.02, duration_s=0.0, min_iterations=2)
    assert out["warmup"]["rounds"] >= 1 and out["warmup"]["ms"] >= 20
    assert len(log) == out["warmup"]["rounds"] + 2


@pytest.fixture(scope="module")
def measured(toy_bundle):
    tb = toy_bundle(num_stages=3, classes=4, seed=3, thresholds=THRESHOLDS)
    x = tb.inputs(100, seed=1)
    ref = tb.reference(x)
    labels = ref[-1]["prediction"].astype(np.int64)  # the full model is right by construction
    with Pipeline.from_bundle(tb.path, backend="ort", backend_options={"threads": 1}) as pipe:
        rep = run_benchmark(pipe, x, labels, QUICK, thresholds=THRESHOLDS, expected=[0.4, 0.3, 0.3], keep_trace=True)
    return tb, x, labels, rep


def test_report_per_batch_size_and_exit_bookkeeping(measured):
    tb, x, labels, rep = measured
    assert [r["batch"] for r in rep["results"]] == [1, 8, 32]
    cum = [s["cumulative_flops"] for s in json.load(open(f"{tb.path}/manifest.json"))["stages"]]
    for r in rep["results"]:
        b, ee, st = r["batch"], r["early_exit"], r["static"]
        n = ee["iterations"]
        assert n == st["iterations"] == r["rounds"] >= QUICK.iterations
        ex = ee["exits"]
        assert sum(ex["histogram"]) == ex["samples"] == b * n
        assert sum(ex["realised"]) == pytest.approx(1.0)
        assert ex["expected"] == [0.4, 0.3, 0.3] and "max_abs_deviation" in ex
        # the realised histogram is exactly the reference exit rule over the batches that were timed
        _, _, idx = batches_of(x, b)
        want = np.zeros(3, np.int64)
        for j in range(n):
            want += exit_histogram(tb.early_exit(x[idx[j % len(idx)]], THRESHOLDS)["exit_stage"], 3)
        assert ex["histogram"] == want.tolist()
        # per-stage counters: everyone enters stage 0, survivors flow on, exits add up
        stages = ee["stages"]
        assert stages[0]["samples_in"] == b * n
        assert [s["exited"] for s in stages] == ex["histogram"]
        assert stages[1]["samples_in"] == b * n - ex["histogram"][0]
        assert [s["samples_in"] for s in st["stages"]] == [b * n] * 3  # static: every stage, every sample
        assert all(s["time_ms_per_iteration"] > 0 for s in st["stages"])
        # the speed-up arithmetic
        sp = ee["speedup"]
        assert sp["realised"] == pytest.approx(st["latency_ms"]["mean"] / ee["latency_ms"]["mean"])
        exp_flops = float(np.dot(ex["histogram"], cum)) / (b * n)
        assert sp["ideal"] == pytest.approx(cum[-1] / exp_flops)
        assert sp["efficiency"] == pytest.approx(sp["realised"] / sp["ideal"])
        # trtexec statistics are ordered and the throughput is samples over the summed latency
        lat = ee["latency_ms"]
        assert lat["min"] <= lat["median"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert ee["throughput"] == pytest.approx(b / (lat["mean"] / 1e3), rel=1e-6)
        assert st["accuracy"] == 1.0 and 0.0 <= ee["accuracy"] <= 1.0
        assert ee["accuracy_drop"] == pytest.approx(1.0 - ee["accuracy"])
        # the efficiency's three factors multiply back to it
        bd = sp["breakdown"]
        assert bd["flops_to_time"] * bd["batch_efficiency"] * bd["host_factor"] == pytest.approx(sp["efficiency"])
        # streaming: each call hands 3 batches over at once; same bookkeeping per sample
        sm = r["streaming"]
        assert sm["batches_per_call"] == 3 and sm["max_in_flight"] == 2
        m = sm["early_exit"]["iterations"]
        assert sum(sm["early_exit"]["exits"]["histogram"]) == 3 * b * m
        assert sm["early_exit"]["stages"][0]["batches"] == 3 * m  # cut into stage batches of b
        assert sm["static"]["stages"][-1]["samples_in"] == 3 * b * sm["static"]["iterations"]
        assert sm["speedup"]["realised"] == pytest.approx(sm["static"]["call_latency_ms"]["mean"] / sm["early_exit"]["call_latency_ms"]["mean"])
    json.dumps(rep, allow_nan=False)  # the report is plain JSON


def test_real_run_interleaves_early_exit_and_static(measured):
    _, _, _, rep = measured
    for r in rep["results"]:
        trace = r["trace"]
        assert [t[0] for t in trace] == ["early_exit", "static"] * r["rounds"]
        assert all(a[1] == b[1] for a, b in zip(trace[::2], trace[1::2]))  # same inputs in a round
        assert all(a[3] <= b[2] for a, b in zip(trace, trace[1:]))


def test_sweep_times_every_configuration_against_static(toy_bundle):
    tb = toy_bundle(num_stages=3, classes=4, seed=3, thresholds=THRESHOLDS)
    x = tb.inputs(64, seed=2)
    cfgs = [{"name": "loose", "thresholds": [0.5, 0.5], "budget": 0.5},
            {"name": "never", "thresholds": [2.0, 2.0], "budget": 1.0}]
    s = BenchSettings(batch_sizes=[16], warmup_ms=0, duration_s=0.05, iterations=3, stream_batches=0)
    with Pipeline.from_bundle(tb.path, backend="ort", backend_options={"threads": 1}) as pipe:
        rep = run_benchmark(pipe, x, None, s, thresholds=None, sweep=cfgs, keep_trace=True)
    assert rep["results"] == [] and len(rep["sweep"]) == 1
    sw = rep["sweep"][0]
    assert [t[0] for t in sw["trace"][:3]] == ["static", "loose", "never"]
    never = sw["early_exit"][1]
    assert never["exits"]["histogram"] == [0, 0, 16 * never["iterations"]]
    assert never["speedup"]["ideal"] == pytest.approx(1.0) and never["budget"] == 1.0
    loose = sw["early_exit"][0]
    assert loose["exits"]["expected_cost"] < 1.0 and loose["thresholds"] == [0.5, 0.5]


def test_host_overhead_with_the_null_backend(toy_bundle):
    tb = toy_bundle(num_stages=3, classes=4, seed=3, thresholds=THRESHOLDS)
    s = BenchSettings(warmup_ms=0, duration_s=0.05, iterations=5)
    rows = host_overhead(tb.path, [1, 16], settings=s)
    assert [r["batch"] for r in rows] == [1, 16]
    for r in rows:
        for kind in ("early_exit", "static"):
            v = r[kind]
            assert v["iterations"] >= 5 and 1.0 <= v["stage_batches_per_iteration"] <= 3.0
            assert 0 < v["ms_per_stage_batch"] < 50  # a generous bound: a few threads handing off work
        assert r["static"]["stage_batches_per_iteration"] == 3.0
