"""``dmpo-edge bench``: bad input gives one error line; a short real run on real images writes a sane report."""

import json
import os
import shutil

import pytest

from dmpo_edge.bundle import write_json_atomic
from dmpo_edge.cli import main

QUICK = ["--duration", "0.2", "--iterations", "3", "--warmup", "10", "--threads", "1", "--stream", "2", "--quiet"]


@pytest.fixture(scope="module")
def digit_bundle(toy_bundle, tmp_path_factory):
    """A real toy bundle whose classes are the digits 0-9 (8x8 input, like the digits images), calibrated."""
    tb = toy_bundle(num_stages=3, classes=10, seed=5, thresholds=[0.5, 0.5], max_batch=32)
    path = str(tmp_path_factory.mktemp("bench_cli") / "digits_toy")
    shutil.copytree(tb.path, path)
    m = json.load(open(os.path.join(path, "manifest.json")))
    m["model"]["classes"] = [str(i) for i in range(10)]
    m["thresholds"]["expected_exit_distribution"] = [0.5, 0.3, 0.2]
    write_json_atomic(os.path.join(path, "manifest.json"), m)
    return path


@pytest.fixture(scope="module")
def uncalibrated(toy_bundle):
    return toy_bundle(num_stages=3, classes=4, seed=6).path


def _err(capsys, argv):
    code = main(["bench"] + argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("dmpo-edge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bundle_without_thresholds_says_how_to_calibrate(capsys, uncalibrated):
    msg = _err(capsys, [uncalibrated, "--random"] + QUICK)
    assert "no exit thresholds" in msg and "dmpo-edge calibrate" in msg and "--max-drop 0.01" in msg


def test_bad_backends(capsys, digit_bundle):
    assert "unknown backend 'tpu'" in _err(capsys, [digit_bundle, "--backend", "tpu"] + QUICK)
    pytest.importorskip("onnx")  # keep the import-light guarantees out of this check
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; the missing-extra message cannot be checked")
    except ImportError:
        pass
    assert "dmpo-edge[trt]" in _err(capsys, [digit_bundle, "--backend", "trt", "--batch", "1"] + QUICK)


@pytest.mark.parametrize("argv,match", [
    (["--batch", "1,64"], "exceed the bundle's max batch 32"),
    (["--batch", "1,,8"], "malformed"),
    (["--batch", "eight"], "not an integer"),
    (["--thresholds", "0.9"], "Expected 2"),
    (["--thresholds", "0.9,high"], "not a number"),
    (["--sweep", "0.5,2"], "out of range"),
    (["--duration", "-1"], "--duration"),
])
def test_malformed_arguments(capsys, digit_bundle, argv, match):
    assert match in _err(capsys, [digit_bundle] + QUICK + argv)


def test_default_data_needs_digit_classes(capsys, toy_bundle):
    tb = toy_bundle(num_stages=3, classes=4, seed=3, thresholds=[0.8, 0.8])
    msg = _err(capsys, [tb.path] + QUICK)
    assert "--data" in msg and "not the digits" in msg


def test_short_real_run_on_digits(capsys, digit_bundle, tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", digit_bundle, "--batch", "1,8", "--json", str(out)] + QUICK)
    printed = capsys.readouterr().out
    assert code == 0
    rep = json.loads(out.read_text())
    assert rep["data"]["source"] == "digits:test" and rep["data"]["samples"] > 300 and rep["data"]["labelled"]
    assert rep["thresholds"]["values"] == [0.5, 0.5] and rep["thresholds"]["source"].startswith("manifest")
    assert rep["settings"]["warmup_ms"] == 10 and rep["settings"]["percentiles"] == [90, 95, 99]
    assert rep["settings"]["settle"] is True and "settle call" in printed
    assert rep["machine"]["cores"] >= 1 and "numpy" in rep["machine"]["versions"]
    assert [r["batch"] for r in rep["results"]] == [1, 8]
    for r in rep["results"]:
        ee, st = r["early_exit"], r["static"]
        assert ee["iterations"] >= 3 and st["iterations"] == ee["iterations"]
        assert sum(ee["exits"]["histogram"]) == r["batch"] * ee["iterations"]
        assert ee["exits"]["expected"] == [0.5, 0.3, 0.2]
        assert {"realised", "ideal", "efficiency"} <= set(ee["speedup"])
        assert "accuracy" in ee and "accuracy" in st
        assert set(ee["latency_ms"]) >= {"min", "mean", "median", "p90", "p95", "p99", "max"}
        assert r["streaming"]["batches_per_call"] == 2
    for word in ("throughput", "early exit", "static", "speed-up: realised", "exits: realised", "batch 8"):
        assert word in printed


def test_no_settle_is_recorded(capsys, digit_bundle, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", digit_bundle, "--batch", "1", "--stream", "0", "--no-settle", "--json", str(out)] + QUICK) == 0
    assert "settle call" not in capsys.readouterr().out
    assert json.loads(out.read_text())["settings"]["settle"] is False


def test_random_inputs_warn_and_sweep_writes_table_and_plot(capsys, digit_bundle, tmp_path):
    out = tmp_path / "sweep.json"
    code = main(["bench", digit_bundle, "--random", "--samples", "64", "--batch", "8", "--sweep", "0.5,0.85,1.0",
                 "--json", str(out), "--host-overhead"] + QUICK)
    cap = capsys.readouterr()
    assert code == 0
    assert "exits on noise mean nothing" in cap.err
    rep = json.loads(out.read_text())
    assert rep["data"]["labelled"] is False and rep["warnings"]
    sw = rep["sweep"][0]
    # the toy's stage 0 holds ~80% of the FLOPs: a budget of 0.5 cannot be met and is skipped, saying why
    assert [e["budget"] for e in sw["early_exit"]] == [0.85, 1.0]
    assert any("0.5 is below the cheapest possible cost" in w for w in rep["warnings"])
    assert all(e["exits"]["expected_cost"] <= e["budget"] + 1e-9 for e in sw["early_exit"])
    assert os.path.getsize(tmp_path / "sweep.sweep.png") > 1000
    assert "sweep, batch 8" in cap.out and rep["host_overhead"][0]["batch"] == 8


def _gpu_skip_reason():
    from dmpo_edge._lazy import available

    if not available("tensorrt"):
        return "TensorRT is not installed"
    if not (available("pycuda.driver") or available("cuda.bindings.runtime") or available("cuda.cudart")):
        return "neither pycuda nor cuda-python is installed"
    from dmpo_edge.runtime.device import cuda_device_present

    return None if cuda_device_present() else "no CUDA device"


@pytest.mark.gpu
def test_bench_on_tensorrt(capsys, toy_bundle, tmp_path):
    reason = _gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    from dmpo_edge.compile import build_engines
    from dmpo_edge.runtime.backends import TrtBackend

    tb = toy_bundle(num_stages=3, classes=4, seed=41, thresholds=[0.8, 0.8], max_batch=32)
    build_engines(tb.path)
    out = tmp_path / "trt.json"
    code = main(["bench", tb.path, "--backend", "trt", "--random", "--batch", "1,32", "--json", str(out)] + QUICK[:6] + ["--stream", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads(out.read_text())
    assert rep["backend"]["name"] == "trt"
    for r in rep["results"]:
        assert sum(r["early_exit"]["exits"]["histogram"]) == r["batch"] * r["early_exit"]["iterations"]
        if hasattr(TrtBackend, "pop_event_timings"):
            assert {"h2d", "compute", "d2h"} <= set(r["early_exit"]["gpu"])
