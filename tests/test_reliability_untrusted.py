"""Untrusted files: a model file that carries code, a manifest that points outside its bundle, a damaged stage.

Nothing may run that the user did not ask to run: a pickle's ``__reduce__`` never executes without
``allow_pickle=True`` (and then only with a warning); checksums and paths are verified before any ONNX
Runtime session is created or any engine is deserialized.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest

from dmpo_edge.bundle import Bundle, safe_join, write_json_atomic
from dmpo_edge.errors import DmpoEdgeError

torch = pytest.importorskip("torch")


class _Evil:
    """Unpickling this creates ``marker``: stands for any code an attacker would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _EvilSystem:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path):
    """The ways a malicious model.pt arrives: torch zip, legacy raw pickle, nested inside a plausible dict."""
    marker = tmp_path / "PWNED"
    files = {}
    p = tmp_path / "zip_reduce.pt"
    torch.save(_Evil(marker), p)
    files["torch zip, __reduce__ -> open"] = p
    p = tmp_path / "zip_system.pt"
    torch.save({"format": "dmpo-edge-model", "version": 1, "config": _EvilSystem(marker)}, p)
    files["torch zip, nested os.system"] = p
    p = tmp_path / "raw.pkl.pt"
    p.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    files["raw pickle"] = p
    p = tmp_path / "legacy.pt"
    torch.save(_EvilSystem(marker), p, _use_new_zipfile_serialization=False)
    files["legacy torch format"] = p
    return marker, files


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    from dmpo_edge.models import load_checkpoint

    marker, files = _evil_files(tmp_path)
    for what, path in files.items():
        with pytest.raises(DmpoEdgeError) as ei:
            load_checkpoint(str(path))
        assert ei.value.where == "checkpoint", what
        assert not marker.exists(), f"{what}: code from the file ran"
    msg = str(pytest.raises(DmpoEdgeError, load_checkpoint, str(files["raw pickle"])).value)
    assert "allow_pickle" in msg or "--allow-pickle" in msg  # says how to opt in, for files one trusts


def test_allow_pickle_is_an_explicit_opt_in_with_a_warning(tmp_path):
    """With the flag the file is unpickled (that is what the flag means) and a warning says so."""
    from dmpo_edge.models import load_checkpoint

    marker = tmp_path / "RAN"
    p = tmp_path / "m.pt"
    torch.save(_Evil(marker), p)
    with pytest.warns(UserWarning, match="runs code"):
        with pytest.raises(DmpoEdgeError):  # what it unpickled is no EarlyExitModel
            load_checkpoint(str(p), allow_pickle=True)
    assert marker.exists()


def test_cli_refuses_malicious_model_without_running_it(tmp_path):
    marker, files = _evil_files(tmp_path)
    for cmd in (["compile", str(files["torch zip, __reduce__ -> open"]), "-o", str(tmp_path / "b"), "--quiet"],
                ["inspect", str(files["raw pickle"])]):
        r = subprocess.run([sys.executable, "-m", "dmpo_edge", *cmd], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and "--allow-pickle" in r.stderr
        assert not marker.exists()
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# manifests that point outside the bundle
# ---------------------------------------------------------------------------------------------
def _copy_bundle(src, dst):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "manifest.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.onnx", "sub/../../outside.onnx", "..", "", "C:\\x.onnx",
                                  "a\x00b"])
def test_manifest_file_names_cannot_escape(toy_bundle, tmp_path, name):
    tb = toy_bundle(num_stages=2, classes=3, seed=21, thresholds=[0.6])
    d = str(tmp_path / "b")
    m = _copy_bundle(tb.path, d)
    (tmp_path / "outside.onnx").write_bytes(open(os.path.join(d, "stage_0.onnx"), "rb").read())
    m["stages"][0]["file"] = name
    write_json_atomic(os.path.join(d, "manifest.json"), m)
    with pytest.raises(DmpoEdgeError):
        Bundle.load(d)
    b = Bundle.load(d, verify=False)  # even unverified, resolving the path refuses
    with pytest.raises(DmpoEdgeError):
        b.stage_path(0)


def test_symlinks_pointing_out_are_refused_even_with_the_right_checksum(toy_bundle, tmp_path):
    tb = toy_bundle(num_stages=2, classes=3, seed=21, thresholds=[0.6])
    d = str(tmp_path / "b")
    _copy_bundle(tb.path, d)
    outside = tmp_path / "elsewhere" / "stage_0.onnx"
    outside.parent.mkdir()
    shutil.move(os.path.join(d, "stage_0.onnx"), outside)
    os.symlink(outside, os.path.join(d, "stage_0.onnx"))  # same bytes, same sha256, but outside the folder
    with pytest.raises(DmpoEdgeError, match="escapes"):
        Bundle.load(d)
    with pytest.raises(DmpoEdgeError, match="escapes"):
        safe_join(d, "stage_0.onnx")
    # a link that stays inside the bundle is fine
    os.remove(os.path.join(d, "stage_0.onnx"))
    shutil.move(outside, os.path.join(d, "real_stage_0.onnx"))
    os.symlink("real_stage_0.onnx", os.path.join(d, "stage_0.onnx"))
    Bundle.load(d)


# ---------------------------------------------------------------------------------------------
# checksums and versions before anything runs
# ---------------------------------------------------------------------------------------------
class _SessionSpy:
    """Counts ONNX Runtime sessions created (wraps the real class; every call goes through)."""

    def __init__(self, monkeypatch):
        import onnxruntime

        self.created = []
        real = onnxruntime.InferenceSession

        def spy(path_or_bytes, *a, **kw):
            self.created.append(path_or_bytes)
            return real(path_or_bytes, *a, **kw)

        monkeypatch.setattr(onnxruntime, "InferenceSession", spy)


def _flip_byte(path, offset=None):
    data = bytearray(open(path, "rb").read())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("target", ["stage_1.onnx", "stage_0.cpu.onnx"])
def test_one_flipped_byte_is_refused_before_any_session(toy_bundle, tmp_path, monkeypatch, target):
    from dmpo_edge.runtime.pipeline import Pipeline
    from dmpo_edge.runtime.static import run_all_stages

    tb = toy_bundle(num_stages=3, classes=4, seed=22, thresholds=[0.7, 0.8], cpu_variant=True)
    d = str(tmp_path / "b")
    _copy_bundle(tb.path, d)
    spy = _SessionSpy(monkeypatch)
    with Pipeline.from_bundle(d, backend="ort") as p:  # the intact copy runs (and the spy sees its sessions)
        p.predict(tb.inputs(4))
    assert len(set(spy.created)) == 3  # every stage file (twice where the one-batch path has all-core sessions)
    spy.created.clear()
    _flip_byte(os.path.join(d, target))
    with pytest.raises(DmpoEdgeError, match="sha256"):
        Bundle.load(d)
    for backend in ("ort", "auto", "trt", "null"):
        with pytest.raises(DmpoEdgeError, match="sha256"):  # the bundle's damage, not a missing TensorRT
            Pipeline.from_bundle(d, backend=backend)
    with pytest.raises(DmpoEdgeError, match="sha256"):
        run_all_stages(d, tb.inputs(2))
    assert spy.created == [], "an ONNX Runtime session was created from a damaged bundle"


def test_cli_run_and_bench_refuse_a_damaged_bundle(toy_bundle, tmp_path):
    tb = toy_bundle(num_stages=3, classes=4, seed=22, thresholds=[0.7, 0.8])
    d = str(tmp_path / "b")
    _copy_bundle(tb.path, d)
    _flip_byte(os.path.join(d, "stage_2.onnx"), offset=40)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    from PIL import Image
    import numpy as np

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img_dir / "a.png")
    for cmd in (["run", d, "--source", str(img_dir)], ["bench", d]):
        r = subprocess.run([sys.executable, "-m", "dmpo_edge", *cmd], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (cmd, r.stdout[-500:], r.stderr[-2000:])
        assert "sha256" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("change", ["schema_version", "format", "regroup", "truncated", "missing_stage"])
def test_versions_and_damage_are_refused(toy_bundle, tmp_path, change):
    tb = toy_bundle(num_stages=2, classes=3, seed=21, thresholds=[0.6])
    d = str(tmp_path / "b")
    m = _copy_bundle(tb.path, d)
    mp = os.path.join(d, "manifest.json")
    if change == "schema_version":
        m["schema_version"] = 2  # written by a newer dmpo-edge
    elif change == "format":
        m["format"] = "something-else"
    elif change == "regroup":
        m["regroup"] = "host_copy"
    if change == "truncated":  # a copy that stopped half-way
        raw = open(mp, "rb").read()
        open(mp, "wb").write(raw[: len(raw) // 2])
    elif change == "missing_stage":
        os.remove(os.path.join(d, "stage_1.onnx"))
    else:
        write_json_atomic(mp, m)
    with pytest.raises(DmpoEdgeError) as ei:
        Bundle.load(d)
    assert "|" in str(ei.value) and "\n" not in str(ei.value)
    if change == "schema_version":
        assert "Upgrade dmpo-edge" in str(ei.value)


def test_verify_false_still_checks_schema_and_paths(toy_bundle, tmp_path):
    """verify=False skips only the (slow) hashing: schema and path checks always run."""
    tb = toy_bundle(num_stages=2, classes=3, seed=21, thresholds=[0.6])
    d = str(tmp_path / "b")
    m = _copy_bundle(tb.path, d)
    _flip_byte(os.path.join(d, "stage_0.onnx"))
    Bundle.load(d, verify=False)
    m["schema_version"] = 99
    write_json_atomic(os.path.join(d, "manifest.json"), m)
    with pytest.raises(DmpoEdgeError):
        Bundle.load(d, verify=False)
