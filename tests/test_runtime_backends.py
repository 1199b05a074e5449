"""Stage backends and the static runner against the numpy reference of real toy stage graphs."""

import numpy as np
import pytest

from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.runtime.backends import NullBackend, OrtBackend, get_backend
from dmpo_edge.runtime.static import run_all_stages


@pytest.mark.parametrize("n,batch_size", [(37, 8), (1, 64), (64, 64), (5, 1)])
def test_run_all_stages_matches_reference(toy_bundle, n, batch_size):
    tb = toy_bundle(num_stages=3, classes=5)
    x = tb.inputs(n, seed=n)
    got = run_all_stages(tb.path, x, batch_size=batch_size, keep_features=True)
    ref = tb.reference(x)
    assert len(got) == 3
    for k in range(3):
        np.testing.assert_allclose(got[k]["logits"], ref[k]["logits"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[k]["confidence"], ref[k]["confidence"], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[k]["prediction"], ref[k]["prediction"])
        assert got[k]["prediction"].dtype == np.int32 and got[k]["prediction"].shape == (n,)
        if k < 2:
            np.testing.assert_allclose(got[k]["features"], ref[k]["features"], rtol=1e-4, atol=1e-4)
        else:
            assert "features" not in got[k]


def test_run_all_stages_empty_batch(toy_bundle):
    tb = toy_bundle()
    got = run_all_stages(tb.path, np.zeros((0, 3, 8, 8), np.float32))
    assert [g["logits"].shape for g in got] == [(0, 4)] * 3


def test_fp16_features_regroup(toy_bundle):
    tb = toy_bundle(num_stages=3, classes=4, seed=3, features_dtype="float16")
    x = tb.inputs(20)
    got = run_all_stages(tb.path, x, batch_size=7)
    ref = tb.reference(x)
    for k in range(3):
        np.testing.assert_allclose(got[k]["logits"], ref[k]["logits"], rtol=2e-3, atol=2e-3)


def test_gather_regroups_survivors_in_graph(toy_bundle):
    tb = toy_bundle(num_stages=2, classes=3)
    x = tb.inputs(10)
    ref = tb.reference(x)
    keep = np.array([7, 2, 2, 9], np.int32)  # any order, repeats allowed (bucket padding repeats rows)
    with OrtBackend(tb.path) as be:
        f = be.infer(0, {"input": x})["features"]
        out = be.infer(1, {"features": f, "keep_idx": keep})
    np.testing.assert_allclose(out["logits"], ref[1]["logits"][keep], rtol=1e-4, atol=1e-4)


def test_cpu_variant_preferred_on_cpu(toy_bundle):
    tb = toy_bundle(num_stages=2, cpu_variant=True)
    with OrtBackend(tb.path) as be:
        assert all(f.endswith(".cpu.onnx") for f in be.files)
        assert be.providers == ["CPUExecutionProvider"]
    with OrtBackend(tb.path, variant="default") as be:
        assert not any(f.endswith(".cpu.onnx") for f in be.files)


def test_get_backend_names(toy_bundle):
    tb = toy_bundle()
    assert get_backend("ort") is OrtBackend and get_backend("null") is NullBackend
    assert get_backend("auto", tb.path) is OrtBackend  # no TensorRT here
    with pytest.raises(DmpoEdgeError, match="unknown backend"):
        get_backend("tpu")


def test_infer_requires_activate(toy_bundle):
    be = OrtBackend(toy_bundle().path)
    with pytest.raises(DmpoEdgeError, match="activate"):
        be.infer(0, {"input": np.zeros((1, 3, 8, 8), np.float32)})


def test_null_backend_shapes(toy_bundle):
    tb = toy_bundle(num_stages=3, classes=6)
    got = run_all_stages(tb.path, tb.inputs(9), batch_size=4, backend="null")
    for g in got:
        assert g["logits"].shape == (9, 6) and g["confidence"].dtype == np.float32
        assert np.all((g["confidence"] >= 0) & (g["confidence"] <= 1))
    again = run_all_stages(tb.path, tb.inputs(9), batch_size=4, backend="null")
    np.testing.assert_array_equal(got[1]["confidence"], again[1]["confidence"])


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 3, 9, 8), np.float32), r"N x 3 x 8 x 8"),
    (np.zeros((3, 8, 8), np.float32), r"single sample"),
    (np.zeros((2, 3, 8, 8), np.int64), r"dtype is int64"),
])
def test_bad_input_names_expected_shape(toy_bundle, bad, match):
    with pytest.raises(DmpoEdgeError, match=match):
        run_all_stages(toy_bundle().path, bad)


def test_nonfinite_input_is_refused(toy_bundle):
    x = toy_bundle().inputs(4)
    x[2, 0, 0, 0] = np.nan
    with pytest.raises(DmpoEdgeError, match=r"NaN or Inf \(rows 2\)"):
        run_all_stages(toy_bundle().path, x)


def test_cpu_form_of_another_cpu_kind_warns_once(toy_bundle, tmp_path, caplog):
    """A CPU form quantized for another ISA class (e.g. full 8-bit weights for VNNI, run on AVX2) says so in one
    line; the same class, or no record (FP32 bundles), says nothing."""
    import json
    import logging
    import os
    import shutil

    from dmpo_edge.bundle import write_json_atomic
    from dmpo_edge.cpu_isa import detect, from_flags

    src = toy_bundle(num_stages=2, cpu_variant=True)
    host = detect()
    other = from_flags("aarch64", ["asimddp"]) if host.isa_class != "arm" else from_flags("x86_64", ["avx2"])
    for target, warns in ((None, False), (dict(host), False), (dict(other), True)):
        path = str(tmp_path / f"b{len(os.listdir(tmp_path))}")
        shutil.copytree(src.path, path)
        with open(os.path.join(path, "manifest.json")) as f:
            m = json.load(f)
        if target:
            m["precision"]["cpu_variant"] = {"target_isa": target}
        write_json_atomic(os.path.join(path, "manifest.json"), m)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dmpo_edge.runtime"):
            with OrtBackend(path) as be:
                assert be.files[0].endswith(".cpu.onnx")
        lines = [r.getMessage() for r in caplog.records if r.name == "dmpo_edge.runtime"]
        if warns:
            assert len(lines) == 1 and lines[0] == be.isa_warning and "\n" not in lines[0]
            assert lines[0].startswith(f"WARNING cpu form | quantized for {other.name} ({other.isa_class}), running on {host.name}")
        else:
            assert lines == [] and be.isa_warning is None
    with OrtBackend(path, variant="default") as be:  # the portable graphs are not CPU-specific
        assert be.isa_warning is None
