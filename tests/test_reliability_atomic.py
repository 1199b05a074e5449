"""Atomic outputs: a compile, calibrate or engine build killed at any moment leaves the previous bundle usable.

The kills are real: ``dmpo-edge compile ... --force`` and ``dmpo-edge calibrate`` run as subprocesses onto
an existing, calibrated bundle and get SIGKILL at several points (while exporting, while writing the new
bundle's files, right before the swap, and at spread-out delays). Afterwards the bundle must load with
``verify=True``, be *entirely* the old one or entirely the new one, and classify exactly as before.
The swap itself is checked deterministically by killing a process between its renames.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dmpo_edge.bundle import Bundle, atomic_directory, sha256_file, write_json_atomic
from dmpo_edge.errors import DmpoEdgeError

torch = pytest.importorskip("torch")

TINY = {"backbone": "vit", "image_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 3, "num_heads": 2,
        "num_classes": 10, "exits": [0, 1, 2], "pretrained": False, "adapter_dim": 0, "lora_rank": 0,
        "bypass_dim": 8, "cov_dim": 4}
PY = sys.executable


def _checkpoint(path, seed):
    from dmpo_edge.models import build_model, save_checkpoint
    from dmpo_edge.preprocess import Preprocess

    torch.manual_seed(seed)
    save_checkpoint(path, build_model(TINY), classes=[str(i) for i in range(10)], preprocess=Preprocess(32, 32).to_dict(),
                    loss_schedule={}, metrics={})
    return path


def _state(path) -> dict:
    """What identifies a bundle: its stage checksums and thresholds (after a full verify)."""
    b = Bundle.load(path, verify=True)
    return {"sha": [s["sha256"] for s in b.stages], "thresholds": b.thresholds}


def _classify(path, x, thresholds):
    from dmpo_edge.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(path, backend="ort", thresholds=thresholds) as p:
        r = p.predict(x)
    return r.prediction, r.exit_stage


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A compiled + calibrated bundle from model A, model B's checkpoint, inputs and the bundle's answers."""
    from dmpo_edge.calib.datasets import load_dataset
    from dmpo_edge.calib.evaluate import calibrate
    from dmpo_edge.compile import compile_bundle

    d = tmp_path_factory.mktemp("atomic")
    a = _checkpoint(str(d / "a.pt"), 0)
    b = _checkpoint(str(d / "b.pt"), 1)
    bundle = str(d / "bundle")
    compile_bundle(a, bundle, progress=False, build="never", exporter="torchscript", log=lambda m: None)
    calibrate(Bundle.load(bundle), "digits:val", budget=0.6, progress=False, plot=False)
    ds = load_dataset("digits:test").take(40)
    x = Bundle.load(bundle).preprocess(ds.images)
    st = _state(bundle)
    assert st["thresholds"] is not None
    pred, stage = _classify(bundle, x, st["thresholds"])
    return {"dir": str(d), "bundle": bundle, "b_pt": b, "x": x, "state": st, "pred": pred, "stage": stage}


def _assert_old_and_usable(g, path) -> None:
    st = _state(path)
    assert st == g["state"], "the bundle changed although the run that changed it was killed"
    pred, stage = _classify(path, g["x"], st["thresholds"])
    np.testing.assert_array_equal(pred, g["pred"])
    np.testing.assert_array_equal(stage, g["stage"])


def _kill_when(cmd, ready, timeout=240.0, tmpdir=None) -> str:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds; return 'killed' or 'finished' (it won the race).

    ``tmpdir``: the child's TMPDIR, so the scratch folders a killed compile leaves stay inside the test's folder.
    """
    env = dict(os.environ, TMPDIR=str(tmpdir)) if tmpdir else None
    if tmpdir:
        os.makedirs(tmpdir, exist_ok=True)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    t0 = time.perf_counter()
    try:
        while p.poll() is None:
            if ready(time.perf_counter() - t0, p.pid):
                p.send_signal(signal.SIGKILL)
                p.wait()
                return "killed"
            if time.perf_counter() - t0 > timeout:
                raise AssertionError(f"{cmd[3]} did not reach the kill point in {timeout} s")
            time.sleep(0.002)
        return "finished"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _temp_has(parent, base, name=None, after_s=0.0):
    """Kill point: the child's temp bundle folder exists (and holds ``name``), for at least ``after_s`` seconds."""
    seen = []

    def ready(t, pid):
        for d in glob.glob(os.path.join(parent, f".{base}.tmp-{pid}-*")):
            if name is None or os.path.exists(os.path.join(d, name)):
                seen.append(t) if not seen else None
                return t - seen[0] >= after_s
        return False

    return ready


def test_compile_killed_at_any_phase_leaves_the_old_bundle(good, tmp_path):
    import shutil

    target = str(tmp_path / "bundle")  # a copy: a compile that wins the race must not change the shared bundle
    shutil.copytree(good["bundle"], target)
    parent, base = os.path.split(target)
    cmd = [PY, "-m", "dmpo_edge", "compile", good["b_pt"], "-o", target, "--force", "--quiet", "--build", "never",
           "--exporter", "torchscript"]
    outcomes = []
    # while exporting (temp folder just made) / while the new bundle's files are written / right before the swap
    for point, after in ((None, 0.0), ("stage_1.onnx", 0.0), ("manifest.json", 0.0)):
        outcome = _kill_when(cmd, _temp_has(parent, base, point, after), tmpdir=os.path.join(good["dir"], "tmp"))
        outcomes.append(outcome)
        if outcome == "finished":  # the compile beat the kill: then it must be entirely the new bundle
            st = _state(target)
            assert st["sha"] != good["state"]["sha"] and st["thresholds"] is None
            return
        _assert_old_and_usable(good, target)
    assert outcomes.count("killed") == 3


def test_calibrate_killed_at_spread_delays_leaves_old_or_new_thresholds(good, tmp_path):
    import shutil

    bundle = str(tmp_path / "bundle")
    shutil.copytree(good["bundle"], bundle)
    old = _state(bundle)
    cmd = [PY, "-m", "dmpo_edge", "calibrate", bundle, "--val", "digits:val", "--budget", "0.35", "--quiet"]
    seen = set()
    for delay in (0.3, 1.0, 1.8, 2.6, 3.5):
        outcome = _kill_when(cmd, lambda t, pid, d=delay: t >= d, tmpdir=tmp_path / "tmp")
        st = _state(bundle)  # loads and verifies whatever the kill left
        assert st["sha"] == old["sha"], "calibrate must never touch the stage files"
        th = st["thresholds"]
        assert th is not None and len(th) == 2 and all(np.isfinite(th) | np.isinf(th))
        seen.add(tuple(th))
        pred, stage = _classify(bundle, good["x"], th)
        assert pred.shape == (len(good["x"]),) and set(np.unique(stage)) <= {0, 1, 2}
        if outcome == "finished":
            break
        with open(os.path.join(bundle, "manifest.json")) as f:
            json.load(f)  # never half a file
    assert seen <= {tuple(old["thresholds"]), tuple(_state(bundle)["thresholds"])}  # old or new, nothing else


# ---------------------------------------------------------------------------------------------
# the swap, killed deterministically between its steps
# ---------------------------------------------------------------------------------------------
_SWAP_SCRIPT = textwrap.dedent("""
    import os, shutil, signal, sys
    import dmpo_edge.bundle as B
    src, final, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if mode == "fallback":  # a filesystem without an atomic swap (vfat SD card, old kernel)
        B._exchange = lambda a, b: False
        real = os.replace
        def replace(a, b):
            real(a, b)
            if os.path.basename(b).startswith("." + os.path.basename(final) + ".old-"):
                die()  # the old bundle is aside, the new one not yet in place
        B.os.replace = replace
    elif mode == "exchange":
        real_x = B._exchange
        def exchange(a, b):
            ok = real_x(a, b)
            assert ok, "this filesystem has no RENAME_EXCHANGE"
            die()  # swapped; the temp folder (now the old bundle) not yet removed
        B._exchange = exchange
    with B.atomic_directory(final, force=True) as tmp:
        for f in os.listdir(src):
            shutil.copy(os.path.join(src, f), tmp)
        if mode == "inside":
            die()
""")


def _new_bundle_source(toy_bundle):
    return toy_bundle(num_stages=2, classes=3, seed=31, thresholds=[0.5])


@pytest.mark.parametrize("mode", ["inside", "exchange", "fallback"])
def test_swap_killed_between_steps(toy_bundle, tmp_path, mode):
    import shutil

    from dmpo_edge.bundle import _exchange

    old_src = toy_bundle(num_stages=2, classes=3, seed=30, thresholds=[0.6])
    new_src = _new_bundle_source(toy_bundle)
    final = str(tmp_path / "bundle")
    shutil.copytree(old_src.path, final)
    old = _state(final)
    new = _state(new_src.path)
    probe_a, probe_b = tmp_path / "pa", tmp_path / "pb"
    probe_a.mkdir()
    probe_b.mkdir()
    if mode == "exchange" and not _exchange(str(probe_a), str(probe_b)):
        pytest.skip("this filesystem has no atomic directory swap (the fallback case covers it)")
    script = tmp_path / "swap.py"
    script.write_text(_SWAP_SCRIPT)
    r = subprocess.run([PY, str(script), new_src.path, final, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    if mode == "inside":
        assert _state(final) == old
    elif mode == "exchange":
        assert _state(final) == new  # never a moment without a complete bundle at the path
    else:
        with pytest.raises(DmpoEdgeError, match="previous bundle is intact") as ei:
            Bundle.load(final)
        aside = ei.value.message.split("'")[1]
        os.rename(aside, final)  # what the message says to do
        assert _state(final) == old
    # the next write cleans the dead run's temp folder (it holds a whole bundle on a small device)
    leftovers = glob.glob(str(tmp_path / ".bundle.tmp-*"))
    assert leftovers or mode == "fallback"
    with atomic_directory(final, force=True) as tmp:
        for f in os.listdir(new_src.path):
            shutil.copy(os.path.join(new_src.path, f), tmp)
    assert _state(final) == new
    assert glob.glob(str(tmp_path / ".bundle.tmp-*")) == []


def test_bundle_files_are_readable_by_other_users(toy_bundle, tmp_path):
    """Temp files and folders are private (0600 / 0700); a bundle is shared with the service that runs it."""
    import shutil

    src = toy_bundle(num_stages=2, classes=3, seed=30, thresholds=[0.6])
    final = str(tmp_path / "bundle")
    old_umask = os.umask(0o022)
    try:
        with atomic_directory(final) as tmp:
            for f in os.listdir(src.path):
                shutil.copy(os.path.join(src.path, f), tmp)
            write_json_atomic(os.path.join(tmp, "manifest.json"), json.load(open(os.path.join(src.path, "manifest.json"))))
        Bundle.load(final).update_manifest({"thresholds": {"values": [0.7], "method": "fixed", "target": None}})
    finally:
        os.umask(old_umask)
    assert os.stat(final).st_mode & 0o777 == 0o755
    assert os.stat(os.path.join(final, "manifest.json")).st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# engines/<device key>/ (what `dmpo-edge build` writes on the target) under random kills
# ---------------------------------------------------------------------------------------------
_ENGINE_WRITER = textwrap.dedent("""
    import hashlib, json, os, sys, time
    from dmpo_edge.bundle import atomic_directory
    final = sys.argv[1]
    gen = int(time.time() * 1e6)
    while True:  # build generation after generation, slowly, like a TensorRT build writing engines
        gen += 1
        with atomic_directory(final, force=True, where="build") as tmp:
            engines = []
            for k in range(3):
                blob = (f"engine gen {gen} stage {k} ".encode() * 4000)
                with open(os.path.join(tmp, f"stage_{k}.engine"), "wb") as f:
                    for i in range(0, len(blob), 8192):
                        f.write(blob[i:i + 8192])
                        f.flush()
                engines.append({"stage": k, "file": f"stage_{k}.engine", "sha256": hashlib.sha256(blob).hexdigest()})
            with open(os.path.join(tmp, "timing.cache"), "wb") as f:
                f.write(str(gen).encode() * 1000)
            with open(os.path.join(tmp, "engines.json"), "w") as f:
                json.dump({"generation": gen, "engines": engines}, f)
""")


def _engines_consistent(d) -> int:
    with open(os.path.join(d, "engines.json")) as f:
        meta = json.load(f)
    for e in meta["engines"]:
        assert sha256_file(os.path.join(d, e["file"])) == e["sha256"], "an engine file does not match engines.json"
    assert open(os.path.join(d, "timing.cache"), "rb").read() == str(meta["generation"]).encode() * 1000
    return meta["generation"]


def test_engines_folder_survives_random_kills(tmp_path):
    final = str(tmp_path / "bundle" / "engines" / "10.3.0-orin-sm87-int8")
    script = tmp_path / "writer.py"
    script.write_text(_ENGINE_WRITER)
    rng = random.Random(0)
    generations = []
    for i in range(8):
        delay = 0.3 + rng.random() * 0.5 if i else 1.0
        _kill_when([PY, str(script), final], lambda t, pid, d=delay: t >= d and os.path.isdir(final), timeout=60,
                   tmpdir=tmp_path / "tmp")
        generations.append(_engines_consistent(final))
    assert len(set(generations)) > 1, "the writer never replaced the folder: the test did not exercise the swap"
    # dead runs' temp folders are swept by the next write
    assert len(glob.glob(os.path.join(os.path.dirname(final), ".*.tmp-*"))) <= 8
    with atomic_directory(final, force=True) as tmp:
        open(os.path.join(tmp, "engines.json"), "w").write("{}")
    assert glob.glob(os.path.join(os.path.dirname(final), ".*.tmp-*")) == []
