"""Calibration and evaluation on real stage graphs in real ONNX Runtime sessions, on the digits images.

The bundles here are small but honest: random-feature trunks with ridge-regression heads fit on
digits:train (so the exits have real, increasing accuracies), each exit policy computed inside the graph,
and an INT8 form with explicit symmetric Q/DQ, all written as ONNX and run through the runtime's
``run_all_stages``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dmpo_edge.bundle import REGROUP_KEEP_IDX, SCHEMA_VERSION, Bundle, sha256_file, write_json_atomic
from dmpo_edge.calib import thresholds as th
from dmpo_edge.calib.datasets import load_dataset, write_image_folder
from dmpo_edge.calib.evaluate import CALIBRATION_PLOT, CALIBRATION_REPORT, calibrate, evaluate, stage_outputs, sweep
from dmpo_edge.cli import main
from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.policies import POLICIES, get_policy
from dmpo_edge.preprocess import Preprocess

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

WIDTHS = (128, 192, 256)  # trunk width per stage
HEAD_INPUTS = (10, 32, 256)  # how many trunk units each exit reads (zero weights elsewhere): deeper exits are better
TEMPERATURE = (6.0, 9.0, 12.0)


# --- a small digits bundle --------------------------------------------------------------------------------------
def _fit_weights(seed=0):
    rng = np.random.default_rng(seed)
    train = load_dataset("digits:train")
    pre = Preprocess(resize=8, crop=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = pre(train.images).reshape(len(train), -1)
    y = np.eye(10, dtype=np.float64)[train.labels]
    weights, h, d_in = [], x, x.shape[1]
    for k, width in enumerate(WIDTHS):
        wt = (rng.normal(size=(d_in, width)) / np.sqrt(d_in)).astype(np.float32)
        bt = (rng.normal(size=width) * 0.1).astype(np.float32)
        h = np.maximum(h @ wt + bt, 0).astype(np.float32)
        m = HEAD_INPUTS[k]
        hb = np.c_[h[:, :m], np.ones(len(h))]
        sol = np.linalg.solve(hb.T @ hb + 1.0 * np.eye(hb.shape[1]), hb.T @ y) * TEMPERATURE[k]
        wh = np.zeros((width, 10), np.float32)
        wh[:m] = sol[:-1]
        weights.append((wt, bt, wh, sol[-1].astype(np.float32)))
        d_in = width
    return weights, pre


def _qdq(nodes, inits, src, scale, name):
    """Symmetric per-tensor INT8 quantize + dequantize of activation ``src`` (explicit Q/DQ, zero point 0)."""
    from onnx import numpy_helper

    inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
              numpy_helper.from_array(np.array(0, np.int8), f"{name}_z")]
    nodes += [onnx.helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
              onnx.helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])]
    return f"{name}_dq"


def _weight(inits, nodes, w, name, int8):
    from onnx import numpy_helper

    if not int8:
        inits.append(numpy_helper.from_array(w, name))
        return name
    scale = np.float32(np.abs(w).max() / 127.0)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    inits += [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
              numpy_helper.from_array(np.array(0, np.int8), f"{name}_z")]
    nodes.append(onnx.helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name]))
    return name


def _policy_nodes(nodes, inits, policy, classes):
    """confidence from logits inside the graph, one formula per exit policy."""
    from onnx import TensorProto, helper, numpy_helper

    nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], axis=1))
    if policy == "max_softmax":
        nodes.append(helper.make_node("ReduceMax", ["prob"], ["confidence"], axes=[1], keepdims=0))
    elif policy == "entropy":
        inits += [numpy_helper.from_array(np.array([1], np.int64), "ax1"),
                  numpy_helper.from_array(np.array(1.0 / np.log(classes), np.float32), "inv_logc"),
                  numpy_helper.from_array(np.array(1.0, np.float32), "one")]
        nodes += [helper.make_node("LogSoftmax", ["logits"], ["logp"], axis=1),
                  helper.make_node("Mul", ["prob", "logp"], ["plogp"]),
                  helper.make_node("ReduceSum", ["plogp", "ax1"], ["neg_h"], keepdims=0),
                  helper.make_node("Mul", ["neg_h", "inv_logc"], ["neg_hn"]),
                  helper.make_node("Add", ["one", "neg_hn"], ["confidence"])]
    elif policy == "margin":
        inits += [numpy_helper.from_array(np.array([2], np.int64), "k2"),
                  numpy_helper.from_array(np.array([1], np.int64), "ax1")]
        nodes += [helper.make_node("TopK", ["prob", "k2"], ["top2", "top2_i"], axis=1),
                  helper.make_node("Split", ["top2"], ["top1v", "top2v"], axis=1),
                  helper.make_node("Sub", ["top1v", "top2v"], ["gap"]),
                  helper.make_node("Squeeze", ["gap", "ax1"], ["confidence"])]
    else:
        raise ValueError(policy)
    nodes += [helper.make_node("ArgMax", ["logits"], ["am"], axis=1, keepdims=0),
              helper.make_node("Cast", ["am"], ["prediction"], to=TensorProto.INT32)]


def write_digits_bundle(path, policy="max_softmax", int8=False, seed=0, act_scales=None):
    from onnx import TensorProto, helper

    weights, pre = _fit_weights(seed)
    os.makedirs(path, exist_ok=True)
    k_stages, classes = len(weights), 10
    stages, cum = [], 0.0
    for k, (wt, bt, wh, bh) in enumerate(weights):
        nodes, inits = [], []
        d_in, width = wt.shape
        if k == 0:
            inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])]
            nodes.append(helper.make_node("Flatten", ["input"], ["x"], axis=1))
        else:
            inputs = [helper.make_tensor_value_info("features_in", TensorProto.FLOAT, ["batch_in", d_in]),
                      helper.make_tensor_value_info("keep_idx", TensorProto.INT32, ["batch"])]
            nodes.append(helper.make_node("Gather", ["features_in", "keep_idx"], ["x"], axis=0))
        src = _qdq(nodes, inits, "x", act_scales[k][0], "xq") if int8 else "x"
        w1 = _weight(inits, nodes, wt, "Wt", int8)
        from onnx import numpy_helper
        inits += [numpy_helper.from_array(bt, "bt"), numpy_helper.from_array(bh, "bh")]
        nodes += [helper.make_node("MatMul", [src, w1], ["mm"]), helper.make_node("Add", ["mm", "bt"], ["pre"]),
                  helper.make_node("Relu", ["pre"], ["h"])]
        hsrc = _qdq(nodes, inits, "h", act_scales[k][1], "hq") if int8 else "h"
        w2 = _weight(inits, nodes, wh, "Wh", int8)
        nodes += [helper.make_node("MatMul", [hsrc, w2], ["lm"]), helper.make_node("Add", ["lm", "bh"], ["logits"])]
        _policy_nodes(nodes, inits, policy, classes)
        outputs = []
        if k < k_stages - 1:
            nodes.append(helper.make_node("Identity", ["h"], ["features"]))
            outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width]))
        outputs += [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
                    helper.make_tensor_value_info("confidence", TensorProto.FLOAT, ["batch"]),
                    helper.make_tensor_value_info("prediction", TensorProto.INT32, ["batch"])]
        model = helper.make_model(helper.make_graph(nodes, f"digits_stage_{k}", inputs, outputs, inits),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        fname = f"stage_{k}.onnx"
        onnx.save(model, os.path.join(path, fname))
        flops = 2.0 * (d_in * width + width * classes)
        cum += flops
        ins = ([{"name": "input", "shape": ["batch", 3, 8, 8], "dtype": "float32"}] if k == 0 else
               [{"name": "features_in", "shape": ["batch_in", d_in], "dtype": "float32"},
                {"name": "keep_idx", "shape": ["batch"], "dtype": "int32"}])
        outs = ([{"name": "features", "shape": ["batch", width], "dtype": "float32"}] if k < k_stages - 1 else []) + [
            {"name": "logits", "shape": ["batch", classes], "dtype": "float32"},
            {"name": "confidence", "shape": ["batch"], "dtype": "float32"},
            {"name": "prediction", "shape": ["batch"], "dtype": "int32"}]
        stages.append({"index": k, "file": fname, "sha256": sha256_file(os.path.join(path, fname)), "inputs": ins,
                       "outputs": outs, "flops": flops, "cumulative_flops": cum})
    manifest = {
        "format": "dmpo-edge-bundle", "schema_version": SCHEMA_VERSION,
        "model": {"name": "digits-ridge", "backbone": "random-features", "classes": [str(i) for i in range(10)],
                  "num_classes": 10, "config": {"widths": list(WIDTHS), "seed": seed}},
        "preprocess": pre.to_dict(), "precision": {"mode": "int8" if int8 else "fp32"},
        "regroup": REGROUP_KEEP_IDX, "max_batch": 256, "exit_policy": policy, "stages": stages,
    }
    write_json_atomic(os.path.join(path, "manifest.json"), manifest)
    return path


def _act_scales():
    """Per-stage activation scales (max |x| / 127) measured on digits:train with the fp32 numpy twin."""
    weights, pre = _fit_weights(0)
    train = load_dataset("digits:train")
    h = pre(train.images).reshape(len(train), -1)
    scales = []
    for wt, bt, _, _ in weights:
        s_in = float(np.abs(h).max()) / 127.0
        h = np.maximum(h @ wt + bt, 0)
        scales.append((s_in, float(np.abs(h).max()) / 127.0))
    return scales


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib_bundles")
    made = {p: write_digits_bundle(str(root / f"fp32_{p}"), policy=p) for p in POLICIES}
    made["int8"] = write_digits_bundle(str(root / "int8"), int8=True, act_scales=_act_scales())
    return made


@pytest.fixture(scope="module")
def val_outputs(bundles):
    return stage_outputs(bundles["max_softmax"], "digits:val", progress=False)


@pytest.fixture()
def fresh_bundle(bundles, tmp_path):
    """A writable copy of the fp32 bundle (calibration rewrites the manifest and reports)."""
    import shutil

    dst = str(tmp_path / "bundle")
    shutil.copytree(bundles["max_softmax"], dst)
    return dst


# --- stage outputs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", list(POLICIES))
def test_confidence_output_follows_the_recorded_policy(bundles, policy):
    out = stage_outputs(bundles[policy], load_dataset("digits:val").take(120), progress=False)
    assert out.policy == policy
    fn = get_policy(policy)
    for k in range(out.num_stages):
        np.testing.assert_allclose(out.confidence[k], fn(out.logits[k]), atol=2e-6)
        assert np.array_equal(out.prediction[k], out.logits[k].argmax(axis=1))
    # the three policies give different scores, so a wrongly recorded policy would be caught
    other = [p for p in POLICIES if p != policy][0]
    assert np.abs(get_policy(other)(out.logits[0]) - out.confidence[0]).max() > 0.05


def test_stage_outputs_have_real_accuracies_that_grow_with_depth(val_outputs):
    acc = val_outputs.exit_accuracy
    assert val_outputs.confidence.shape == (3, 360) and val_outputs.data["size"] == 360
    assert acc[0] > 0.5 and acc[-1] > 0.9 and acc[0] < acc[1] < acc[2]
    assert val_outputs.stage_files == ["stage_0.onnx", "stage_1.onnx", "stage_2.onnx"]


def test_int8_thresholds_come_from_the_int8_stages(bundles):
    val = load_dataset("digits:val")
    fp = stage_outputs(bundles["max_softmax"], val, progress=False)
    q = stage_outputs(bundles["int8"], val, progress=False)
    assert 1e-4 < np.abs(fp.confidence - q.confidence).max() < 0.3  # INT8 moves the scores a little
    probs = th.geometric_exit_distribution(0.8, 3)
    t_fp, _ = th.budgeted_batch_thresholds(fp.confidence, probs)
    t_q, _ = th.budgeted_batch_thresholds(q.confidence, probs)
    assert t_fp.tolist() != t_q.tolist()
    # each is a confidence its own stages produced, and the sweep read from each bundle reproduces them
    assert float(t_q[0]) in set(q.confidence[0].astype(np.float64).tolist())
    pts_q = sweep(bundles["int8"], val, ps=[0.8], progress=False)
    pts_fp = sweep(bundles["max_softmax"], val, ps=[0.8], progress=False)
    assert pts_q[0].thresholds.tolist() == t_q.tolist() and pts_fp[0].thresholds.tolist() == t_fp.tolist()


# --- calibrate + evaluate --------------------------------------------------------------------------------------
def test_calibrate_budget_records_thresholds_and_reports(fresh_bundle, val_outputs):
    report = calibrate(fresh_bundle, "digits:val", budget=0.5, progress=False)
    b = Bundle.load(fresh_bundle)  # still verifies: stage files untouched
    rec = b.manifest["thresholds"]
    assert set(rec) >= {"values", "method", "target", "policy", "expected_exit_distribution", "accuracy",
                        "expected_cost", "expected_flops", "speedup_ideal", "split", "created"}
    assert rec["method"] == "budget" and rec["target"] == 0.5 and rec["policy"] == "max_softmax"
    assert rec["expected_cost"] <= 0.5 and len(rec["values"]) == 2
    assert rec["split"]["size"] == 360 and rec["split"]["fingerprint"] == load_dataset("digits:val").fingerprint()
    assert rec["speedup_ideal"] == pytest.approx(1 / rec["expected_cost"])
    # the recorded thresholds are the solver's on the deployed stages' confidences
    ref = th.solve_budget(val_outputs.confidence, val_outputs.correct, val_outputs.cumulative_flops, 0.5)
    assert rec["values"] == ref.thresholds.tolist() and rec["accuracy"] == ref.accuracy
    assert b.manifest["reports"]["calibration"] == CALIBRATION_REPORT
    with open(os.path.join(fresh_bundle, CALIBRATION_REPORT)) as f:
        saved = json.load(f)
    assert len(saved["sweep"]) == 39 and saved["thresholds"]["values"] == rec["values"]
    with open(os.path.join(fresh_bundle, CALIBRATION_PLOT), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert report["chosen"]["accuracy"] == rec["accuracy"]


def test_max_drop_and_sweep_modes(fresh_bundle, val_outputs):
    rep = calibrate(fresh_bundle, "digits:val", max_drop=0.01, progress=False)
    final = val_outputs.exit_accuracy[-1]
    assert rep["thresholds"]["accuracy"] >= final - 0.01 - 1e-12
    assert rep["thresholds"]["expected_cost"] < 1.0  # the early exits do save work at 1 point
    rep = calibrate(fresh_bundle, "digits:val", sweep_only=True, pick_budget=0.6, progress=False)
    rec = Bundle.load(fresh_bundle).manifest["thresholds"]
    assert rec["method"] == "budgeted_batch" and rec["expected_cost"] <= 0.6
    sw = th.budgeted_batch_sweep(val_outputs.confidence, val_outputs.correct, val_outputs.cumulative_flops)
    assert rec["values"] in [p.thresholds.tolist() for p in sw]  # a sweep point, not a refined one


def test_evaluate_applies_the_manifest_and_calibration_sweep_to_test_data(fresh_bundle):
    calibrate(fresh_bundle, "digits:val", budget=0.5, progress=False)
    test = load_dataset("digits:test")
    rep = evaluate(fresh_bundle, test, progress=False)
    assert rep["curve"]["thresholds_from"].startswith("calibration split digits:val")
    out = stage_outputs(fresh_bundle, test, progress=False)
    b = Bundle.load(fresh_bundle)
    exits = th.assign_exits(out.confidence, b.thresholds)
    op = rep["operating_point"]
    assert op["exit_counts"] == np.bincount(exits, minlength=3).tolist()
    assert op["accuracy"] == pytest.approx(np.mean(out.prediction[exits, np.arange(len(test))] == out.labels))
    assert [e["accuracy"] for e in rep["exits"]] == out.exit_accuracy
    assert len(rep["curve"]["points"]) == 39


def test_pipeline_realises_the_calibrated_exit_distribution(fresh_bundle):
    # The runtime's early-exit pipeline with the manifest thresholds makes the exits calibration predicted.
    from dmpo_edge.runtime.pipeline import Pipeline

    calibrate(fresh_bundle, "digits:val", budget=0.5, progress=False)
    test = load_dataset("digits:test")
    rep = evaluate(fresh_bundle, test, progress=False)
    b = Bundle.load(fresh_bundle)
    with Pipeline.from_bundle(b, backend="ort") as pipe:
        res = pipe.predict(b.preprocess(test.images))
    assert np.bincount(res.exit_stage, minlength=3).tolist() == rep["operating_point"]["exit_counts"]
    assert np.mean(res.prediction == test.labels) == pytest.approx(rep["operating_point"]["accuracy"])


# --- bad input -------------------------------------------------------------------------------------------------
def test_unlabelled_folder_is_refused(fresh_bundle, tmp_path):
    from PIL import Image

    d = tmp_path / "unlabelled"
    d.mkdir()
    for i, img in enumerate(load_dataset("digits:val").take(30).images):
        Image.fromarray(img).save(d / f"{i}.png")
    ds = load_dataset(str(d), labelled=False)
    with pytest.raises(DmpoEdgeError, match="has no labels"):
        calibrate(fresh_bundle, ds, budget=0.5, progress=False)
    rc = main(["calibrate", fresh_bundle, "--val", str(d), "--budget", "0.5", "--quiet"])
    assert rc == 2


def test_classes_that_do_not_match_name_both(toy_bundle):
    toy = toy_bundle(num_stages=3, classes=10, size=8)  # classes class_0 .. class_9
    with pytest.raises(DmpoEdgeError) as e:
        stage_outputs(toy.path, "digits:val", progress=False)
    msg = str(e.value)
    assert "class_0" in msg and "0, 1, 2" in msg and "do not match" in msg


def test_budget_below_minimum_and_tiny_split(fresh_bundle, val_outputs, capsys):
    lo = th.minimum_cost(val_outputs.cumulative_flops)
    with pytest.raises(DmpoEdgeError, match="minimum achievable") as e:
        calibrate(fresh_bundle, outputs=val_outputs, budget=lo * 0.9)
    assert f"{lo:.4g}" in str(e.value)
    with pytest.raises(DmpoEdgeError, match=r"needs at least 10 per exit, i\.e\. 30"):
        calibrate(fresh_bundle, load_dataset("digits:val").take(12), budget=0.5, progress=False)
    assert "thresholds" not in Bundle.load(fresh_bundle).manifest  # nothing was written
    rc = main(["calibrate", fresh_bundle, "--val", "digits:val", "--budget", f"{lo * 0.9:.4f}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "minimum achievable" in err and len(err.strip().splitlines()) == 1


# --- command line ----------------------------------------------------------------------------------------------
def test_cli_calibrate_then_eval(fresh_bundle, tmp_path, capsys):
    assert main(["calibrate", fresh_bundle, "--val", "digits:val", "--budget", "0.45", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "thresholds:" in out and "budgeted-batch sweep" in out
    js, png = str(tmp_path / "res" / "eval.json"), str(tmp_path / "res" / "eval.png")
    assert main(["eval", fresh_bundle, "--data", "digits:test", "--json", js, "--plot", png, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "per-exit (anytime) accuracy" in out and "operating point" in out
    with open(js) as f:
        rep = json.load(f)
    assert rep["operating_point"]["method"] == "budget" and rep["data"]["size"] == 359
    with open(png, "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_cli_eval_on_an_image_folder(fresh_bundle, tmp_path, capsys):
    folder = write_image_folder(load_dataset("digits:test").take(60), str(tmp_path / "imgs"))
    assert main(["eval", fresh_bundle, "--data", folder, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "no thresholds yet" in out and "60 samples" in out


# --- a bundle written by the compiler ------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_bundle_confidence_follows_its_policy_and_calibration_records_it(tmp_path):
    torch = pytest.importorskip("torch")
    from dmpo_edge.compile import compile_bundle
    from dmpo_edge.models import TINY_VIT_CONFIG, build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(TINY_VIT_CONFIG)
    ckpt = save_checkpoint(str(tmp_path / "tiny.pt"), model, classes=[str(i) for i in range(10)],
                           preprocess=Preprocess(resize=32, crop=32).to_dict(), loss_schedule={}, metrics={})
    path = str(tmp_path / "tiny_margin")
    compile_bundle(ckpt, path, precision="fp32", exit_policy="margin", holdout="digits:val", progress=False)
    out = stage_outputs(path, "digits:val", progress=False)
    assert out.policy == "margin"
    for k in range(out.num_stages):
        np.testing.assert_allclose(out.confidence[k], get_policy("margin")(out.logits[k]), atol=1e-5)
    assert np.abs(get_policy("max_softmax")(out.logits[0]) - out.confidence[0]).min() > 0.01
    calibrate(path, outputs=out, budget=0.9)
    b = Bundle.load(path)
    assert b.manifest["thresholds"]["policy"] == b.manifest["exit_policy"] == "margin"
    assert b.manifest["thresholds"]["expected_cost"] <= 0.9


def test_folder_labels_are_matched_to_the_bundle_by_class_name(bundles, tmp_path):
    # a folder holding only classes "3" and "7": its label 0 is the bundle's class 3, its label 1 class 7
    test = load_dataset("digits:test")
    pick = np.flatnonzero(np.isin(test.labels, [3, 7]))[:40]
    folder = write_image_folder(test.subset(pick), str(tmp_path / "two_classes"))
    ds = load_dataset(folder)
    assert ds.classes == ["3", "7"]
    out = stage_outputs(bundles["max_softmax"], ds, progress=False)
    assert sorted(set(out.labels.tolist())) == [3, 7]
    assert out.exit_accuracy[-1] > 0.8  # right labels: the last exit gets most of them
