"""Two writers of one bundle cannot corrupt it, and every byte a stage loads is under the checksum.

The races are forced, not hoped for: a hook runs at the exact point between calibrate's measurement (the
bundle is loaded) and its write, and starts the competing writer there. Without the writer lock the
``compile --force`` in the middle succeeded and calibrate then wrote the old manifest into the new folder,
leaving a bundle that fails its sha256 check while both commands exited 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from dmpo_edge.bundle import Bundle, replace_directory, sha256_file, write_json_atomic
from dmpo_edge.errors import DmpoEdgeError

PY = sys.executable


def _labelled_folder(root, classes, size, n_per_class=12, seed=0):
    """Real PNG files in one sub-folder per class: a labelled split any bundle with these classes accepts."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(root, c, f"{i}.png"))
    return str(root)


@pytest.fixture
def toy_copy(toy_bundle, tmp_path):
    tb = toy_bundle(3, 4, seed=0)
    dst = str(tmp_path / "bundle")
    shutil.copytree(tb.path, dst)
    data = _labelled_folder(tmp_path / "val", [f"class_{i}" for i in range(4)], tb.size)
    return dst, data, tb


def _hook_before_write(monkeypatch, action):
    """Run ``action()`` once calibrate has measured the stages and before it writes anything."""
    import dmpo_edge.calib.evaluate as ev

    real = ev._check_policy
    calls = []

    def hooked(out):
        calls.append(action())
        return real(out)

    monkeypatch.setattr(ev, "_check_policy", hooked)
    return calls


# ---- the writer lock ------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_while_calibrate_holds_the_bundle(toy_copy, monkeypatch):
    """Deterministic interleaving: between calibrate's load and its write, a second writer process tries."""
    from dmpo_edge.calib.evaluate import calibrate

    path, data, _ = toy_copy
    code = ("import sys; from dmpo_edge.locking import writer_lock\n"
            "from dmpo_edge.errors import DmpoEdgeError\n"
            "try:\n    with writer_lock(sys.argv[1], 'compile', 'compile'):\n        print('GOT THE LOCK')\n"
            "except DmpoEdgeError as e:\n    print(e); sys.exit(2)\n")

    def second_writer():
        return subprocess.run([PY, "-c", code, path], capture_output=True, text=True, timeout=60)

    calls = _hook_before_write(monkeypatch, second_writer)
    calibrate(path, data, budget=0.9, progress=False, plot=False)
    (res,) = calls
    assert res.returncode == 2, res.stdout + res.stderr
    assert "is being written by another command (pid " in res.stdout and "calibrate" in res.stdout
    b = Bundle.load(path)  # verifies every checksum
    assert b.thresholds is not None
    # once calibrate is done the lock is free again, and the holder record is cleared
    assert second_writer().returncode == 0
    from dmpo_edge.locking import lock_paths

    assert os.path.getsize(lock_paths(path)[0]) == 0


def test_the_writer_lock_is_reentrant_in_one_thread_and_exclusive_across_threads(tmp_path):
    from dmpo_edge.locking import writer_lock

    target = str(tmp_path / "b")
    got = []
    with writer_lock(target, "t", "compile"):
        with writer_lock(target, "t", "build"):  # compile -> build in one process
            pass

        def other():
            try:
                with writer_lock(target, "t", "calibrate"):
                    got.append("locked")
            except DmpoEdgeError as exc:
                got.append(str(exc))

        t = threading.Thread(target=other)
        t.start()
        t.join(10)
    assert len(got) == 1 and "being written by another command" in got[0]


def test_a_writer_that_ignores_the_lock_is_caught_by_the_recheck(toy_copy, toy_bundle, monkeypatch, tmp_path):
    """cp -r / rsync do not take locks: calibrate re-checks the bundle before its swap and writes nothing."""
    from dmpo_edge.calib.evaluate import calibrate

    path, data, _ = toy_copy
    other = toy_bundle(3, 4, seed=1)

    def copy_over():
        staged = str(tmp_path / ".incoming")
        shutil.copytree(other.path, staged)
        replace_directory(staged, path)

    _hook_before_write(monkeypatch, copy_over)
    with pytest.raises(DmpoEdgeError, match="was replaced by another writer"):
        calibrate(path, data, budget=0.9, progress=False, plot=False)
    b = Bundle.load(path)  # the new bundle, intact, with its own (absent) thresholds and no calibration report
    assert [s["sha256"] for s in b.stages] == [s["sha256"] for s in Bundle.load(other.path).stages]
    assert b.thresholds is None and not os.path.exists(os.path.join(path, "reports", "calibration.json"))


@pytest.mark.slow
def test_compile_force_during_calibrate_is_refused_and_the_bundle_stays_loadable(tiny_bundle_factory, tmp_path,
                                                                               monkeypatch, tiny_checkpoint):
    """The reported race, end to end: `dmpo-edge compile --force` started while `calibrate` is between load and write."""
    from dmpo_edge.calib.evaluate import calibrate

    path = str(tmp_path / "bundle")
    shutil.copytree(tiny_bundle_factory().path, path)
    before = [s["sha256"] for s in Bundle.load(path).stages]
    cmd = [PY, "-m", "dmpo_edge", "compile", tiny_checkpoint, "-o", path, "--force", "--quiet", "--build", "never",
           "--exporter", "torchscript", "--max-batch", "32"]
    calls = _hook_before_write(monkeypatch, lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=600))
    calibrate(path, "digits:val", budget=0.6, progress=False, plot=False)
    (res,) = calls
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "is being written by another command" in res.stderr
    b = Bundle.load(path)
    assert [s["sha256"] for s in b.stages] == before and b.thresholds is not None
    r = subprocess.run([PY, "-m", "dmpo_edge", "inspect", path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ---- readers see a whole bundle -------------------------------------------------------------------------------

def test_a_reader_loading_holds_off_the_swap(toy_copy, toy_bundle, tmp_path):
    """A writer's swap waits for a reader that is loading; the reader gets the old bundle whole."""
    from dmpo_edge.locking import swap_lock, writer_lock

    path, _, _ = toy_copy
    old = [s["sha256"] for s in Bundle.load(path).stages]
    with writer_lock(path, "t", "test"):  # creates the swap lock file, as every writer does
        pass
    staged = str(tmp_path / ".new")
    shutil.copytree(toy_bundle(3, 4, seed=1).path, staged)
    swapped = threading.Event()

    def writer():
        with swap_lock(path, shared=False):
            replace_directory(staged, path)
        swapped.set()

    with swap_lock(path, shared=True):  # a reader in the middle of Bundle.load + session creation
        t = threading.Thread(target=writer)
        t.start()
        assert not swapped.wait(0.5), "the writer swapped the bundle under a reader"
        assert [s["sha256"] for s in Bundle.load(path).stages] == old
    t.join(30)
    assert swapped.is_set() and [s["sha256"] for s in Bundle.load(path).stages] != old


# ---- every byte under the checksum ----------------------------------------------------------------------------

def _external_bundle(src, dst, listed=True):
    """Copy ``src`` and move stage 1's weights into an external-data file beside its graph."""
    import onnx

    shutil.copytree(src, dst)
    m = onnx.load(os.path.join(dst, "stage_1.onnx"))
    onnx.save_model(m, os.path.join(dst, "stage_1.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="stage_1.weights", size_threshold=0)
    with open(os.path.join(dst, "manifest.json")) as f:
        man = json.load(f)
    st = man["stages"][1]
    st["sha256"] = sha256_file(os.path.join(dst, "stage_1.onnx"))
    if listed:
        st["data_files"] = [{"file": "stage_1.weights", "sha256": sha256_file(os.path.join(dst, "stage_1.weights"))}]
    write_json_atomic(os.path.join(dst, "manifest.json"), man)
    return dst


def test_external_data_files_are_checksummed_and_unlisted_ones_refused(toy_bundle, tmp_path):
    from dmpo_edge.runtime.pipeline import Pipeline

    tb = toy_bundle(3, 4, seed=0, thresholds=[0.6, 0.6])
    good = _external_bundle(tb.path, str(tmp_path / "ext"))
    x = tb.inputs(16)
    with Pipeline.from_bundle(good, backend="ort") as p:  # listed and intact: loads and classifies as before
        with Pipeline.from_bundle(tb.path, backend="ort") as ref:
            np.testing.assert_array_equal(p.predict(x).prediction, ref.predict(x).prediction)
    # the reported hole: weights replaced in the external file (same size), graph and manifest untouched
    w = os.path.join(good, "stage_1.weights")
    data = bytearray(open(w, "rb").read())
    data[:8] = np.float32([3.0, -3.0]).tobytes()
    open(w, "wb").write(bytes(data))
    for load in (lambda: Bundle.load(good), lambda: Pipeline.from_bundle(good, backend="ort")):
        with pytest.raises(DmpoEdgeError, match="external-data file 'stage_1.weights' fails its sha256 check"):
            load()
    unlisted = _external_bundle(tb.path, str(tmp_path / "unlisted"), listed=False)
    with pytest.raises(DmpoEdgeError, match="loads weights from 'stage_1.weights', which the manifest does not list"):
        Bundle.load(unlisted)


def test_external_data_that_escapes_the_bundle_is_refused(toy_bundle, tmp_path):
    import onnx

    tb = toy_bundle(3, 4, seed=0)
    d = _external_bundle(tb.path, str(tmp_path / "esc"))
    m = onnx.load(os.path.join(d, "stage_1.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.weights"
    onnx.save_model(m, os.path.join(d, "stage_1.onnx"))
    man = json.load(open(os.path.join(d, "manifest.json")))
    man["stages"][1]["sha256"] = sha256_file(os.path.join(d, "stage_1.onnx"))
    write_json_atomic(os.path.join(d, "manifest.json"), man)
    with pytest.raises(DmpoEdgeError, match="escapes the bundle folder"):
        Bundle.load(d)


# ---- the manifest agrees with itself and with the graphs ------------------------------------------------------

def _edited(src, dst, edit):
    shutil.copytree(src, dst)
    man = json.load(open(os.path.join(dst, "manifest.json")))
    edit(man)
    write_json_atomic(os.path.join(dst, "manifest.json"), man)
    return dst


def test_a_class_list_shorter_than_the_logits_is_refused(toy_bundle, tmp_path):
    tb = toy_bundle(3, 4, seed=0, thresholds=[0.6, 0.6])

    def shorter(m):
        m["model"]["classes"] = m["model"]["classes"][:2]
        m["model"]["num_classes"] = 2
    with pytest.raises(DmpoEdgeError, match="logits have 4 classes but model.classes lists 2 names"):
        Bundle.load(_edited(tb.path, str(tmp_path / "a"), shorter))

    def hidden(m):  # the manifest's own shapes edited to agree: the graph itself still says 4
        shorter(m)
        for st in m["stages"]:
            for t in st["outputs"]:
                if t["name"] == "logits":
                    t["shape"] = ["batch", "classes"]
    path = _edited(tb.path, str(tmp_path / "b"), hidden)
    from dmpo_edge.runtime.pipeline import Pipeline

    with pytest.raises(DmpoEdgeError, match="stage 0 .*4 classes.*2 class names"):
        Pipeline.from_bundle(path, backend="ort")
    frames = _labelled_folder(tmp_path / "frames", ["x"], tb.size, n_per_class=40)
    r = subprocess.run([PY, "-m", "dmpo_edge", "run", path, "--source", frames, "--backend", "ort"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_preprocessing_size_other_than_the_stage_input_is_refused(toy_bundle, tmp_path):
    tb = toy_bundle(3, 4, seed=0)

    def big(m):
        m["preprocess"].update(resize=8192, crop=8192, size=[8192, 8192])
    with pytest.raises(DmpoEdgeError, match="input is 8 x 8 but preprocess.size is 8192 x 8192"):
        Bundle.load(_edited(tb.path, str(tmp_path / "a"), big))


@pytest.mark.parametrize("field,value,match", [
    ("std", [1e-300, 0.2, 0.2], "std"), ("std", [1e-9, 0.2, 0.2], "std"), ("mean", [1e30, 0.5, 0.5], "mean"),
    ("mean", [300.0, 0.5, 0.5], "mean"),
])
def test_insane_mean_or_std_is_refused(toy_bundle, tmp_path, field, value, match):
    tb = toy_bundle(3, 4, seed=0)
    with pytest.raises(DmpoEdgeError, match=match):
        Bundle.load(_edited(tb.path, str(tmp_path / "a"), lambda m: m["preprocess"].__setitem__(field, value)))
