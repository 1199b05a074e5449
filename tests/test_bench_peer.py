"""The peer one-graph static model (what users would run instead of early exit) and bundles with a subset of exits.

Real parts: bundles compiled from the tiny pre-trained checkpoint, real ONNX Runtime sessions, digits images.
"""

import json
import os
import shutil

import numpy as np
import pytest

from dmpo_edge.bundle import Bundle
from dmpo_edge.cli import main
from dmpo_edge.errors import DmpoEdgeError

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

QUICK = ["--duration", "0.2", "--iterations", "3", "--warmup", "10", "--threads", "1", "--stream", "2", "--quiet"]


def _digits_test(bundle, n=200):
    from dmpo_edge.calib.datasets import load_dataset

    ds = load_dataset("digits:test").take(n, seed=1)
    return bundle.preprocess(ds.images), np.asarray(ds.labels)


def _session_outputs(path, x):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))


def test_compile_writes_the_peer_and_it_is_the_final_exit(tiny_bundle_factory):
    from dmpo_edge.compile.onnxrun import run_chain

    b = tiny_bundle_factory("fp32")
    peer = b.manifest["peer"]
    assert peer["file"] == "peer.onnx" and os.path.isfile(b.peer_path())
    assert [t["name"] for t in peer["inputs"]] == ["input"]
    assert {t["name"] for t in peer["outputs"]} == {"logits", "confidence", "prediction"}
    x, _ = _digits_test(b, 64)
    chain = run_chain([b.stage_path(k) for k in range(b.num_stages)], x)
    out = _session_outputs(b.peer_path(), x)
    # the same trunk and final exit as the last stage: same logits, same predictions
    np.testing.assert_allclose(out["logits"], chain[-1]["logits"], rtol=1e-4, atol=1e-4)
    assert (out["prediction"] == chain[-1]["prediction"]).all()
    # no early exit heads: fewer FLOPs than the static pipeline, which runs every head
    assert 0 < peer["flops"] < b.cumulative_flops[-1]
    with open(os.path.join(b.path, "reports", "parity.json")) as f:
        assert json.load(f)["peer"]["agreement_with_last_exit"] == 1.0


def test_a_damaged_peer_fails_the_bundle_check(tiny_bundle_factory, tmp_path):
    path = str(tmp_path / "b")
    shutil.copytree(tiny_bundle_factory("fp32").path, path)
    with open(os.path.join(path, "peer.onnx"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(DmpoEdgeError, match="peer.onnx' fails its sha256 check"):
        Bundle.load(path)


def test_bench_prints_the_speed_up_over_the_peer_from_one_run(capsys, tiny_bundle_factory, tmp_path):
    path = str(tmp_path / "b")
    shutil.copytree(tiny_bundle_factory("fp32").path, path)
    out = tmp_path / "bench.json"
    code = main(["bench", path, "--budget", "0.7", "--samples", "96", "--batch", "1,8", "--json", str(out)] + QUICK)
    printed = capsys.readouterr().out
    assert code == 0
    rep = json.loads(out.read_text())
    assert rep["peer"]["file"] == "peer.onnx" and rep["peer"]["spinning"] is False
    for r in rep["results"]:
        ee, st, pe = r["early_exit"], r["static"], r["peer"]
        # one interleaved loop: every configuration timed the same number of rounds
        assert r["order"] == ["early_exit", "static", "peer"]
        assert pe["iterations"] == ee["iterations"] == st["iterations"] == r["rounds"]
        sp = ee["speedup"]
        assert sp["over_peer"] == pytest.approx(pe["latency_ms"]["mean"] / ee["latency_ms"]["mean"], rel=1e-12)
        assert sp["over_peer_median"] == pytest.approx(pe["latency_ms"]["median"] / ee["latency_ms"]["median"], rel=1e-12)
        # the peer is the final exit of the same FP32 model: it classifies exactly like the static pipeline
        assert pe["accuracy"] == pytest.approx(st["accuracy"], abs=1e-12)
        assert ee["accuracy_drop_vs_peer"] == pytest.approx(pe["accuracy"] - ee["accuracy"])
        assert "peer" in r["streaming"] and "over_peer" in r["streaming"]["speedup"]
    assert printed.count("speed-up over the peer (one graph):") == 2
    assert "early exit, static and peer interleaved" in printed


def test_bench_says_why_a_bundle_without_peer_has_no_speed_up_over_it(capsys, toy_bundle, tmp_path):
    tb = toy_bundle(num_stages=3, classes=4, seed=7, thresholds=[0.6, 0.6])
    out = tmp_path / "bench.json"
    assert main(["bench", tb.path, "--random", "--samples", "32", "--batch", "4", "--json", str(out)] + QUICK) == 0
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["peer"] is None and "peer" not in rep["results"][0]
    assert "over_peer" not in rep["results"][0]["early_exit"]["speedup"]
    assert any("no peer one-graph model" in w and "recompile" in w for w in rep["warnings"])
    assert "speed-up over the peer (one graph)" not in printed


# ---- a subset of the model's exits --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,match", [
    ("0,1,5", "does not have"),
    ("1,0,3", "not increasing"),
    ("0,1,1,3", "not increasing"),
    ("0,1", "leaves out the last exit 3"),
    ("0,,3", "malformed"),
    ("a,3", "not an integer"),
])
def test_bad_exit_lists_are_one_clear_error(capsys, tiny_checkpoint, tmp_path, spec, match):
    out = tmp_path / "never"
    code = main(["compile", tiny_checkpoint, "-o", str(out), "--exits", spec, "--build", "never", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("dmpo-edge: error:")]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err, err
    assert not out.exists()


def test_parse_exits():
    from dmpo_edge.compile.stages import parse_exits

    assert parse_exits(None, 4) == [0, 1, 2, 3]
    assert parse_exits("0, 1,3", 4) == [0, 1, 3]
    assert parse_exits([3], 4) == [3]
    for bad in ([0, 1.5, 3], [True, 3], []):
        with pytest.raises(DmpoEdgeError):
            parse_exits(bad, 4)


@pytest.mark.slow
def test_subset_bundle_merges_the_left_out_trunks(tiny_bundle_factory):
    from dmpo_edge.compile.onnxrun import run_chain

    full = tiny_bundle_factory("fp32")
    sub = tiny_bundle_factory("fp32", exits="0,3")
    assert sub.num_stages == 2 and sub.manifest["exits"] == {"kept": [0, 3], "model_exits": 4}
    assert [st["model_exit"] for st in sub.stages] == [0, 3]
    x, _ = _digits_test(full, 64)
    a = run_chain([full.stage_path(k) for k in range(full.num_stages)], x)
    b = run_chain([sub.stage_path(k) for k in range(sub.num_stages)], x)
    for got, want in ((b[0], a[0]), (b[1], a[3])):
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
        assert (got["prediction"] == want["prediction"]).all()
    # the subset pays for exit 0's and the final exit's heads only: cheaper than the full static pipeline
    assert sub.cumulative_flops[0] == pytest.approx(full.cumulative_flops[0], rel=1e-6)
    assert sub.cumulative_flops[-1] < full.cumulative_flops[-1]
