"""The GPU verification kit (benchmarks/gpu_check.py): its CPU self-test here, its GPU run where CUDA is.

The dry run executes every step that needs no CUDA - tiny ViT trained and compiled, CPU reference, the CPU
pipeline, the device-layer checks on host memory, the torch stage backend on the CPU through the runtime's
Pipeline - and writes the JSON checked below. The comparison and device checks are also fed broken inputs, so
that they are shown to fail when they should.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dmpo_edge._lazy import available
from dmpo_edge.errors import DmpoEdgeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gc():
    """The check modules (benchmarks/gpu_checks/), imported the way the driver imports them."""
    _load("gpu_check_script", "gpu_check.py")  # puts benchmarks/ on sys.path for the gpu_checks package
    import types

    from gpu_checks import bundles, kit, reference

    return types.SimpleNamespace(**{n: getattr(m, n) for m in (reference, bundles, kit) for n in m.__all__})


@pytest.fixture(scope="module")
def gdc(gc):
    import types

    from gpu_checks import device, host_device, regroup

    return types.SimpleNamespace(**{n: getattr(m, n) for m in (device, host_device, regroup) for n in m.__all__})


def _env():
    env = dict(os.environ)
    for var in ("OUT", "DMPO_GPU_CHECK_OUT"):
        env.pop(var, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``gpu_check.py --dry-run --out DIR --keep-work`` once: (json, stdout, out dir); the work dir is removed after."""
    out = tmp_path_factory.mktemp("gpu_check_out")
    p = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(out), "--keep-work"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(out / "gpu_check.json") as f:
        doc = json.load(f)
    yield doc, p.stdout, out
    if doc.get("work_dir"):
        shutil.rmtree(doc["work_dir"], ignore_errors=True)


def test_dry_run_passes_and_writes_the_json_and_the_table(dry_run):
    doc, stdout, out = dry_run
    assert doc["format"] == "dmpo-edge-gpu-check" and doc["dry_run"] is True
    assert doc["summary"]["ok"] and doc["summary"]["failed"] == 0 and doc["summary"]["passed"] >= 8
    checks = doc["checks"]
    for key in ("bundle", "cpu_pipeline", "device_copies_host", "gather_torch_host", "refill_merge_host", "torch_parity",
                "torch_pipeline_default", "torch_pipeline_refill", "torch_pipeline_buckets"):
        assert checks[key]["status"] == "pass", (key, checks[key])
    # the table is printed last and saved; every check is a row of it
    table = (out / "gpu_check.txt").read_text()
    assert stdout.rstrip().endswith(table.rstrip().splitlines()[-1])
    assert len(doc["table"]) == len(checks)
    for row in doc["table"]:
        assert row[0] in table and row[2] in ("pass", "FAIL", "skip", "info")


def test_dry_run_compares_every_sample_across_all_exits(dry_run):
    doc, _, _ = dry_run
    checks = doc["checks"]
    n = checks["cpu_reference"]["samples"]
    assert n == 160 and len(doc["thresholds"]) == 2
    for key in ("cpu_pipeline", "torch_pipeline_default", "torch_pipeline_refill", "torch_pipeline_buckets"):
        c = checks[key]
        assert c["samples"] == n and c["unexplained"] == 0 and c["band"] == pytest.approx(1e-4)
        # 'spread' thresholds: every exit takes a real share, so every stage and the regroup are exercised
        assert len(c["exit_distribution"]) == 3 and min(c["exit_distribution"]) > 0.15, c["exit_distribution"]
        stats = c["stats"]
        assert stats[0]["samples_in"] == n and stats[1]["samples_in"] < n and stats[2]["samples_in"] < stats[1]["samples_in"]
    # Whether refill merges groups depends on thread timing (a group must be waiting when the next arrives), so
    # the run only shows the refill pipeline agrees sample by sample; the merge itself is checked directly below.
    assert all("merged" in s for s in checks["torch_pipeline_refill"]["stats"])
    assert sum(s["padded"] for s in checks["torch_pipeline_buckets"]["stats"]) > 0
    assert checks["torch_parity"]["stages"][0]["max_abs_logits"] < 1e-4


def test_dry_run_device_checks_and_skips_say_why(dry_run):
    doc, _, _ = dry_run
    checks = doc["checks"]
    assert checks["device_copies_host"]["roundtrip_bit_exact"] and checks["device_copies_host"]["offset_copy_bit_exact"]
    cases = checks["gather_torch_host"]["cases"]
    assert len(cases) == 12 and all(cases.values())  # fp32 + fp16, six keep_idx patterns
    assert checks["refill_merge_host"]["merged_rows"] == 8 and checks["refill_merge_host"]["sources_released"]
    if not available("tensorrt"):
        for p in ("fp32", "fp16", "int8"):
            assert checks[f"trt_{p}"]["status"] == "skip" and "TensorRT" in checks[f"trt_{p}"]["detail"]
    assert checks["pycuda"]["status"] in ("skip", "info") and checks["pycuda"]["detail"]


# --- the comparison and the device checks fail when they should -----------------------------------------
def _static(conf_rows, preds):
    return [{"confidence": np.asarray(c, np.float32), "prediction": np.asarray(p, np.int32),
             "logits": np.eye(3, dtype=np.float32)[np.asarray(p)] * 5.0} for c, p in zip(conf_rows, preds)]


def test_compare_exits_flags_flips_and_lists_near_threshold_samples(gc):
    thr = [0.5, 0.6]
    static = _static([[0.9, 0.2, 0.50004, 0.1], [0.1, 0.7, 0.2, 0.1], [0.3, 0.3, 0.3, 0.3]],
                     [[0, 1, 2, 0], [1, 1, 2, 0], [2, 2, 2, 1]])
    ref = gc.early_exit_reference(static, thr)
    assert ref["exit_stage"].tolist() == [0, 1, 0, 2]
    conf = [s["confidence"] for s in static]
    logits = [s["logits"] for s in static]
    same = gc.compare_exits(ref, dict(ref), thr, conf, None, 1e-4, ref_logits=logits)
    assert same["ok"] and same["unexplained"] == 0 and same["near_threshold_samples"] == 1
    # sample 2 sits 4e-5 above threshold 0: a flip there is listed, not failed
    got = {k: v.copy() for k, v in ref.items()}
    got["exit_stage"][2], got["prediction"][2] = 2, 2
    c = gc.compare_exits(ref, got, thr, conf, None, 1e-4, ref_logits=logits)
    assert c["ok"] and c["exit_mismatches"] == 1 and c["near_threshold"] == 1 and c["near_threshold_list"][0]["sample"] == 2
    # sample 0 is far from every threshold: a flip fails, and so does a wrong class at the right exit
    got["exit_stage"][0] = 1
    got["prediction"][1] = 0
    c = gc.compare_exits(ref, got, thr, conf, None, 1e-4, ref_logits=logits)
    assert not c["ok"] and c["unexplained"] == 2 and {m["sample"] for m in c["mismatch_list"]} == {0, 1}
    # a looser precision may allow a share of disagreements
    assert gc.compare_exits(ref, got, thr, conf, None, 1e-4, max_share=0.5, ref_logits=logits)["ok"]


def test_spread_thresholds_share_the_exits_and_keep_clear_of_samples(gc):
    rng = np.random.default_rng(0)
    conf = [rng.uniform(0.1, 1.0, 600).astype(np.float32) for _ in range(3)]
    thr = gc.spread_thresholds(conf, 1e-4)
    ref = gc.early_exit_reference([{"confidence": c, "prediction": np.zeros(600, np.int32)} for c in conf], thr)
    share = np.bincount(ref["exit_stage"], minlength=3) / 600
    assert np.all(np.abs(share - 1 / 3) < 0.06), share
    for k, t in enumerate(thr):
        assert np.min(np.abs(conf[k] - t)) > 0  # mid-way between two samples, never on one


class _CorruptCopies:
    """A host device whose device-to-device copies flip one bit: every check must notice."""

    def __new__(cls, gdc):
        class Bad(gdc.HostDevice):
            def dtod_async(self, dst, src, nbytes, stream):
                super().dtod_async(dst, src, nbytes, stream)
                import ctypes

                b = ctypes.c_uint8.from_address(int(dst))
                b.value ^= 1

            def htod_async(self, dst, src, stream):
                super().htod_async(dst, src, stream)
                if np.asarray(src).dtype.kind == "f":
                    import ctypes

                    b = ctypes.c_uint8.from_address(int(dst) + 7)
                    b.value ^= 0x80

        return Bad()


def test_device_checks_catch_corruption(gdc, dry_run):
    doc, _, _ = dry_run
    from dmpo_edge.bundle import Bundle

    bundle = Bundle.load(doc["checks"]["bundle"]["path"])
    good = gdc.HostDevice()
    assert gdc.check_copies(good, mib=1)["ok"] and gdc.check_refill_merge(good, bundle)["ok"]
    bad = _CorruptCopies(gdc)
    assert not gdc.check_copies(bad, mib=1)["ok"]
    assert not gdc.check_refill_merge(bad, bundle)["bit_exact"]
    torch = pytest.importorskip("torch")
    g = gdc.check_gather(bad, torch, cuda=False)
    assert not g["ok"] and not g["cases"]["float32/all"] and g["cases"]["float32/empty"]


def test_torch_backend_refuses_a_checkpoint_the_bundle_was_not_compiled_from(dry_run, tmp_path, gc):
    pytest.importorskip("torch")
    from gpu_checks.torch_backend import TorchStageBackend

    from dmpo_edge.models import TINY_VIT_CONFIG, build_model, save_checkpoint

    doc, _, _ = dry_run
    bundle = doc["checks"]["bundle"]["path"]
    other = str(tmp_path / "other.pt")
    save_checkpoint(other, build_model(dict(TINY_VIT_CONFIG)), classes=[str(i) for i in range(10)], preprocess=gc.TINY_PRE,
                    loss_schedule={}, metrics={})
    with pytest.raises(DmpoEdgeError, match="not the one bundle"):
        TorchStageBackend(bundle, other, device="cpu").activate()
    # the right one runs, and features stay a backend handle between stages
    be = TorchStageBackend(bundle, doc["checks"]["bundle"]["checkpoint"], device="cpu").activate()
    try:
        x = np.zeros((3, 3, 32, 32), np.float32)
        out0 = be.infer(0, {"input": x}, keep_features=True)
        out1 = be.infer(1, {"features": out0["features"], "keep_idx": np.array([2, 0], np.int32)})
        assert out1["logits"].shape == (2, 10) and out1["prediction"].dtype == np.int32
        assert be.features_to_host(out0["features"]).shape[0] == 3
        # refill: two groups' survivors merged on the backend, in order, keep_idx renumbered
        a = be.infer(0, {"input": np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)},
                     keep_features=True)["features"]
        fa, fb = be.features_to_host(out0["features"]), be.features_to_host(a)
        merged, keep = be.merge_features([out0["features"], a], [np.array([2], np.int32), np.array([0, 3], np.int32)])
        np.testing.assert_array_equal(be.features_to_host(merged), np.concatenate([fa[[2]], fb[[0, 3]]]))
        assert keep.tolist() == [0, 1, 2]
    finally:
        be.deactivate()


# --- GPU ------------------------------------------------------------------------------------------------
def _cuda_skip():
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except Exception:
        pass
    from dmpo_edge.runtime.device import cuda_device_present

    return None if cuda_device_present() else "no CUDA device (torch.cuda, pycuda and cuda-python see none)"


_CUDA_SKIP = _cuda_skip()


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
def test_gpu_check_passes_on_this_gpu(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env=_env())
    with open(tmp_path / "gpu_check.json") as f:
        doc = json.load(f)
    assert p.returncode == 0 and doc["summary"]["ok"], p.stdout[-4000:]
    assert not doc["dry_run"] and any(c["status"] == "pass" and c["backend"].startswith("torch/cuda") for c in doc["checks"].values())


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None or not available("torch"), reason=str(_CUDA_SKIP or "torch is not installed"))
def test_torch_cuda_backend_matches_onnx_runtime(dry_run, gc):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    from gpu_checks.torch_backend import TorchStageBackend

    from dmpo_edge.bundle import Bundle

    doc, _, _ = dry_run
    bundle = Bundle.load(doc["checks"]["bundle"]["path"])
    x, _, _ = gc.load_inputs(bundle, 64)
    ref = gc.static_run(bundle, x, 16, gc.ort_backend(bundle, 1))
    got = gc.static_run(bundle, x, 16, TorchStageBackend(bundle, doc["checks"]["bundle"]["checkpoint"], device="cuda"))
    assert gc.stage_parity(ref, got, 1e-3)["ok"]


def test_pycuda_build_patch_keeps_future_imports_first(gc):
    """pycuda >= 2025.1.2's setup.py starts with ``from __future__ import annotations``: the parallel-compile
    patch goes after it (prepending made every kit build a SyntaxError)."""
    for src in ('from __future__ import annotations\nimport os\nsetup = 1\n',
                '"""pycuda"""\nfrom __future__ import annotations\nfrom __future__ import division\nsetup = 1\n',
                '#!/usr/bin/env python\nimport os\nsetup = 1\n'):
        out = gc.with_parallel_compile(src)
        compile(out, "setup.py", "exec")  # a misplaced __future__ import raises SyntaxError here
        assert out.endswith("setup = 1\n") and "_dmpo_parallel_compile()" in out
