"""Latency budgets and exits that pay: bench records per-stage times in the bundle, calibrate chooses thresholds
by expected time per sample, and says per exit whether it pays for its head. Real toy bundles, real ONNX Runtime
sessions, real digits images."""

import json
import os
import shutil

import numpy as np
import pytest

from dmpo_edge.bundle import Bundle, write_json_atomic
from dmpo_edge.cli import main
from dmpo_edge.errors import DmpoEdgeError

pytest.importorskip("onnxruntime")

QUICK = ["--duration", "0.2", "--iterations", "3", "--warmup", "10", "--threads", "1", "--stream", "0", "--quiet"]


@pytest.fixture()
def digits_toy(toy_bundle, tmp_path):
    """A toy bundle whose classes are the digits (8x8 input like the digits images), copied so tests may write."""
    tb = toy_bundle(num_stages=3, classes=10, seed=5, thresholds=[0.5, 0.5], max_batch=32)
    path = str(tmp_path / "digits_toy")
    shutil.copytree(tb.path, path)
    m = json.load(open(os.path.join(path, "manifest.json")))
    m["model"]["classes"] = [str(i) for i in range(10)]
    for st in m["stages"]:
        st["head_flops"] = 2.0 * 16 * 10  # the toy's head: hidden x classes
    write_json_atomic(os.path.join(path, "manifest.json"), m)
    return path


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("dmpo-edge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bench_records_per_stage_times_and_calibrate_meets_a_latency_budget(capsys, digits_toy):
    assert main(["bench", digits_toy, "--batch", "1,8"] + QUICK) == 0
    assert "recorded the per-stage times" in capsys.readouterr().out
    rep = json.load(open(os.path.join(digits_toy, "reports", "latency.json")))
    assert rep["format"] == "dmpo-edge-latency" and [e["batch"] for e in rep["entries"]] == [1, 8]
    for e in rep["entries"]:
        assert e["backend"] == "ort" and e["precision"] == "fp32" and len(e["stage_ms_per_sample"]) == 3
        per = [(t + e["host_overhead_ms_per_stage_batch"]) / e["batch"] for t in e["stage_ms_per_batch"]]
        np.testing.assert_allclose(e["stage_ms_per_sample"], per, rtol=1e-12)
        np.testing.assert_allclose(e["cumulative_ms_per_sample"], np.cumsum(per), rtol=1e-12)
    one = rep["entries"][0]["cumulative_ms_per_sample"]
    # a second bench at batch 1 replaces that entry and keeps batch 8's
    assert main(["bench", digits_toy, "--batch", "1"] + QUICK) == 0
    rep2 = json.load(open(os.path.join(digits_toy, "reports", "latency.json")))
    assert [e["batch"] for e in rep2["entries"]] == [1, 8] and rep2["entries"][1] == rep["entries"][1]
    one = rep2["entries"][0]["cumulative_ms_per_sample"]
    capsys.readouterr()

    budget = 0.5 * (one[0] + one[-1])
    out = os.path.join(digits_toy, "cal.json")
    assert main(["calibrate", digits_toy, "--val", "digits:val", "--latency-budget", f"{budget:.6f}", "--json", out,
                 "--cost-axis", "time", "--quiet"]) == 0
    printed = capsys.readouterr().out
    cal = json.load(open(out))
    assert cal["thresholds"]["method"] == "latency_budget_ms" and cal["latency"]["batch"] == 1
    dist = np.asarray(cal["chosen"]["exit_distribution"])
    expected_ms = float(dist @ np.asarray(cal["latency"]["cumulative_ms_per_sample"]))
    assert cal["chosen"]["expected_ms_per_sample"] == pytest.approx(expected_ms, rel=1e-9)
    assert expected_ms <= budget * (1 + 1e-9)
    assert "ms per sample expected" in printed and "exits that pay" in printed
    assert Bundle.load(digits_toy).thresholds == pytest.approx(cal["thresholds"]["values"])
    assert os.path.getsize(os.path.join(digits_toy, "reports", "calibration.png")) > 1000
    png = os.path.join(digits_toy, "eval.png")
    assert main(["eval", digits_toy, "--data", "digits:test", "--plot", png, "--cost-axis", "time", "--quiet"]) == 0
    assert os.path.getsize(png) > 1000
    pay = cal["exit_payoff"]["ms_per_sample"]
    assert [p["exit"] for p in pay] == [0, 1] and all(p["net"] == pytest.approx(p["saving"] - p["head_cost"]) for p in pay)


def test_latency_budget_errors_name_the_command_that_measures(capsys, digits_toy):
    msg = _err(capsys, ["calibrate", digits_toy, "--val", "digits:val", "--latency-budget", "1", "--quiet"])
    assert "no latency report" in msg and f"dmpo-edge bench {os.path.abspath(digits_toy)}" in msg
    msg = _err(capsys, ["eval", digits_toy, "--data", "digits:test", "--plot", "x.png", "--cost-axis", "time", "--quiet"])
    assert "no latency report" in msg and "dmpo-edge bench" in msg
    assert main(["bench", digits_toy, "--batch", "1"] + QUICK) == 0
    capsys.readouterr()
    one = json.load(open(os.path.join(digits_toy, "reports", "latency.json")))["entries"][0]["cumulative_ms_per_sample"]
    msg = _err(capsys, ["calibrate", digits_toy, "--val", "digits:val", "--latency-budget", f"{one[0] / 2:.6g}", "--quiet"])
    assert "below the cheapest point" in msg
    msg = _err(capsys, ["calibrate", digits_toy, "--val", "digits:val", "--latency-budget", "1", "--latency-batch", "4",
                        "--quiet"])
    assert "no timings at batch 4" in msg and "--batch 4" in msg
    msg = _err(capsys, ["calibrate", digits_toy, "--val", "digits:val", "--latency-budget", "-1", "--quiet"])
    assert "out of range" in msg


def test_latency_measured_on_another_machine_is_not_used(digits_toy):
    from dmpo_edge.runtime.latency import find_latency

    os.makedirs(os.path.join(digits_toy, "reports"), exist_ok=True)
    write_json_atomic(os.path.join(digits_toy, "reports", "latency.json"), {
        "format": "dmpo-edge-latency", "entries": [{"machine": "another CPU | 64 cores | elsewhere", "backend": "ort",
                                                    "precision": "fp32", "batch": 1, "cumulative_ms_per_sample": [1, 2, 3]}]})
    with pytest.raises(DmpoEdgeError, match="no timings for this machine .* dmpo-edge bench"):
        find_latency(Bundle.load(digits_toy))


def test_exit_payoff_bookkeeping():
    """Exit 0 takes half the samples and saves them the rest of the model; exit 1 takes nobody and only costs."""
    from dmpo_edge.calib.latency_budget import exit_payoff

    conf = np.array([[0.9, 0.9, 0.1, 0.1],
                     [0.2, 0.2, 0.2, 0.2],
                     [1.0, 1.0, 1.0, 1.0]])
    correct = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], bool)
    cum = np.array([2.0, 5.0, 10.0])  # stage costs 2, 3, 5 (heads 1, 1, 1 included)
    heads = np.array([1.0, 1.0, 1.0])
    p0, p1 = exit_payoff(conf, correct, cum, heads, [0.5, 0.5])
    # with both exits: samples 0, 1 leave at 0 (cost 2), 2, 3 go to the end (cost 10): mean 6
    assert p0["share"] == 0.5 and p0["reach"] == 1.0 and p0["head_cost"] == 1.0
    # without exit 0: everyone to the end at 10 - 1 = 9: it saves 3 net
    assert p0["net"] == pytest.approx(3.0) and p0["saving"] == pytest.approx(4.0) and p0["pays"]
    # accuracy: with exits 1 + 0 + 1 + 0 = 0.5; without exit 0: 1 + 1 + 1 + 0 = 0.75
    assert p0["accuracy_change_without"] == pytest.approx(0.25)
    # exit 1: nobody leaves; the half that reaches it pays its head (1) for nothing
    assert p1["share"] == 0.0 and p1["reach"] == 0.5 and p1["head_cost"] == pytest.approx(0.5)
    assert p1["saving"] == pytest.approx(0.0) and p1["net"] == pytest.approx(-0.5) and not p1["pays"]
