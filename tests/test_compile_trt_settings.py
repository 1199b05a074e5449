"""TensorRT builder settings as plain data: device key, precision plan, profiles, cache key (CPU only)."""

import copy
import json

import pytest

from dmpo_edge.compile.trt_settings import (
    build_settings, cache_key, device_key, expected_stage_batches, parse_buckets, precision_plan, stage_profiles,
)
from dmpo_edge.errors import DmpoEdgeError


def _manifest(precision="int8", thresholds=None, max_batch=64):
    def stage(k, last=False):
        ins = ([{"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32"}] if k == 0 else
               [{"name": "features_in", "shape": ["batch_in", 17, 32], "dtype": "float32"},
                {"name": "keep_idx", "shape": ["batch"], "dtype": "int32"}])
        outs = ([] if last else [{"name": "features", "shape": ["batch", 17, 32], "dtype": "float32"}]) + [
            {"name": "logits", "shape": ["batch", 10], "dtype": "float32"}]
        return {"index": k, "file": f"stage_{k}.onnx", "sha256": f"{k}" * 64, "inputs": ins, "outputs": outs}
    return {"stages": [stage(0), stage(1), stage(2, last=True)], "max_batch": max_batch,
            "precision": {"mode": precision}, "thresholds": thresholds}


def test_device_key_matches_the_runtime_formula():
    from dmpo_edge.runtime.backends.trt import device_key as runtime_key

    for args in [("10.3.0", "Orin (nvgpu)", "87", "int8"), ("11.0.1.5", "NVIDIA H200", "9.0", "fp16")]:
        assert device_key(*args) == runtime_key(*args)
    assert device_key("10.3.0", "Orin (nvgpu)", (8, 7), "int8") == "10.3.0-orin_nvgpu-sm87-int8"


@pytest.mark.parametrize("version,precision,typed,want_typed,flags", [
    ("10.3.0", "int8", None, True, []),
    ("10.13.2", "fp16", None, True, []),
    ("10.3.0", "int8", False, False, ["INT8", "FP16"]),
    ("10.3.0", "fp16", False, False, ["FP16"]),
    ("11.0.0", "int8", None, True, []),
    ("11.4.1", "fp16", True, True, []),
    ("8.6.2", "int8", None, False, ["INT8", "FP16"]),
    ("8.6.2", "fp32", None, False, []),
])
def test_precision_plan(version, precision, typed, want_typed, flags):
    plan = precision_plan(version, precision, typed)
    assert plan["strongly_typed"] is want_typed
    assert plan["builder_flags"] == flags


def test_weak_typing_is_refused_on_tensorrt_11():
    with pytest.raises(DmpoEdgeError, match="always strongly typed"):
        precision_plan("11.0.0", "int8", strongly_typed=False)


def test_profiles_without_thresholds_optimise_for_max_batch():
    m = _manifest()
    p0 = stage_profiles(m, 0)
    assert p0 == [{"input": ((1, 3, 32, 32), (64, 3, 32, 32), (64, 3, 32, 32))}]
    p2 = stage_profiles(m, 2)[0]
    assert set(p2) == {"features_in", "keep_idx"}
    assert p2["features_in"] == ((1, 17, 32), (64, 17, 32), (64, 17, 32))
    assert p2["keep_idx"] == ((1,), (64,), (64,))


def test_profiles_follow_the_expected_exit_distribution():
    m = _manifest(thresholds={"values": [0.9, 0.8], "expected_exit_distribution": [0.5, 0.25, 0.25]})
    assert expected_stage_batches(m) == [64, 32, 16]
    p1 = stage_profiles(m, 1)[0]
    assert p1["features_in"][1] == (64, 17, 32)  # the previous stage ran on the whole batch
    assert p1["keep_idx"][1] == (32,)  # half of it survives
    p2 = stage_profiles(m, 2)[0]
    assert p2["features_in"][1][0] == 32 and p2["keep_idx"][1] == (16,)
    for prof in (p1, p2):
        for mn, opt, mx in prof.values():
            assert mn[0] == 1 and mn[0] <= opt[0] <= mx[0] == 64
    # K-1 shares are completed with the remainder
    m2 = _manifest(thresholds={"values": [0.9, 0.8], "expected_exit_distribution": [0.75, 0.125]})
    assert expected_stage_batches(m2, 32) == [32, 8, 4]


def test_bucket_profiles():
    m = _manifest()
    profs = stage_profiles(m, 1, buckets="1,8,32")
    assert len(profs) == 4
    assert [p["keep_idx"] for p in profs[1:]] == [((1,), (1,), (1,)), ((2,), (8,), (8,)), ((9,), (32,), (32,))]
    for p in profs[1:]:
        assert p["features_in"][0][0] == 1 and p["features_in"][2][0] == 64
    assert parse_buckets("32, 8,8,1") == [1, 8, 32]
    with pytest.raises(DmpoEdgeError, match="--buckets"):
        parse_buckets("8,x")


def test_build_settings_and_cache_key():
    m = _manifest()
    s = build_settings(m, "10.3.0", "Orin", "87", workspace_mib=512)
    assert s["device_key"] == "10.3.0-orin-sm87-int8"
    assert s["workspace_bytes"] == 512 << 20 and s["plan"]["strongly_typed"] and s["max_batch"] == 64
    assert len(s["profiles"]) == 3
    json.dumps(s)  # plain data, recorded in engines.json
    same = build_settings(copy.deepcopy(m), "10.3.0", "Orin", "87", workspace_mib=512)
    assert same["cache_key"] == s["cache_key"]
    m2 = copy.deepcopy(m)
    m2["stages"][1]["sha256"] = "f" * 64  # a recompiled stage invalidates the engines
    assert build_settings(m2, "10.3.0", "Orin", "87", workspace_mib=512)["cache_key"] != s["cache_key"]
    assert build_settings(m, "10.3.0", "Orin", "87", workspace_mib=1024)["cache_key"] != s["cache_key"]
    assert cache_key(m, {"a": 1}) != cache_key(m, {"a": 2})
    with pytest.raises(DmpoEdgeError, match="workspace"):
        build_settings(m, "10.3.0", "Orin", "87", workspace_mib=1)
