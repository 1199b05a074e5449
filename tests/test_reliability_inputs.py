"""Inputs that used to crash or hang: FIFOs named like images, pixel bombs, odd names, bad numbers, API misuse.

Each test is a reproducer from the second reliability pass; the comment says what happened before.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest

from dmpo_edge.bundle import write_json_atomic
from dmpo_edge.errors import DmpoEdgeError

PY = sys.executable


def _pngs(folder, n, size=8, seed=0, names=None):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = names[i] if names else f"{i:03d}.png"
        path = os.path.join(os.fsencode(folder), name if isinstance(name, bytes) else os.fsencode(name))
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.fsdecode(path), format="PNG")
    return str(folder)


def _cli(*args, timeout=120, env=None):
    return subprocess.run([PY, "-m", "dmpo_edge", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def _one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr[-2000:]
    return r.stderr


@pytest.fixture
def toy(toy_bundle):
    return toy_bundle(3, 4, seed=0, thresholds=[0.6, 0.6])


# ---- sources open regular files only, within limits ----------------------------------------------------------

def test_a_fifo_named_png_is_reported_not_waited_on(toy, tmp_path):
    """Before: `run` blocked forever opening the FIFO, even with --skip-bad, and delivered no frame."""
    folder = _pngs(tmp_path / "frames", 5, toy.size)
    os.mkfifo(os.path.join(folder, "004b.png"))
    r = _cli("run", toy.path, "--source", folder, "--backend", "ort", "--skip-bad", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len([x for x in lines if "summary" not in x]) == 5
    s = lines[-1]["summary"]
    assert s["skipped"] == [os.path.join(folder, "004b.png")] and "not a regular file" in s["skip_reasons"][0]
    err = _one_line_error(_cli("run", toy.path, "--source", folder, "--backend", "ort", timeout=60))
    assert "004b.png" in err and "not a regular file" in err
    os.mkfifo(str(tmp_path / "clip.mp4"))
    assert "not a regular file" in _one_line_error(_cli("run", toy.path, "--source", str(tmp_path / "clip.mp4"), timeout=60))


def _png_header_only(path, w, h):
    """A few hundred bytes that declare w x h pixels (the decoder would allocate them all)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_gifs_and_other_files_in_an_image_folder_are_reported_as_ignored(toy, tmp_path, capsys):
    """Before: a GIF in a frame folder was skipped without a word."""
    from dmpo_edge.cli import main

    folder = _pngs(tmp_path / "f", 2, toy.size)
    open(os.path.join(folder, "anim.gif"), "wb").write(b"GIF89a")
    open(os.path.join(folder, ".hidden"), "wb").write(b"x")
    assert main(["run", toy.path, "--source", folder, "--backend", "ort", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ignored 1 file(s) that are not images by name" in out and "anim.gif" in out


def test_pixel_and_size_limits_apply_before_decoding(tmp_path):
    from dmpo_edge.images import load_image

    bomb = str(tmp_path / "bomb.png")
    _png_header_only(bomb, 12000, 12000)
    with pytest.raises(DmpoEdgeError, match="declares 12000 x 12000 = 144 megapixels, over the 50 MP limit"):
        load_image(bomb)
    with pytest.raises(DmpoEdgeError, match="MiB, over the 0 MiB limit per file"):
        load_image(bomb, max_bytes=10)
    small = _pngs(tmp_path / "s", 1, 64)
    with pytest.raises(DmpoEdgeError, match="over the 0 MP limit"):
        load_image(os.path.join(small, "000.png"), max_pixels=1000)
    assert load_image(os.path.join(small, "000.png"), max_pixels=4096).shape == (64, 64, 3)


def test_the_cli_limits_are_configurable(toy, tmp_path):
    folder = _pngs(tmp_path / "f", 3, 64)
    r = _cli("run", toy.path, "--source", folder, "--backend", "ort", "--max-megapixels", "0.001", "--skip-bad", "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["summary"]["frames_classified"] == 0
    r = _cli("run", toy.path, "--source", folder, "--backend", "ort", "--max-megapixels", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["summary"]["frames_classified"] == 3


def test_preprocessing_memory_follows_the_crop_window():
    """Before: the whole image became float32 first (12000 x 12000 -> 1.7 GB for a 32 x 32 input)."""
    from dmpo_edge.preprocess import Preprocess

    img = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)  # 36 MB as uint8
    pre = Preprocess(resize=32, crop=32)
    ref = pre.one(img)
    tracemalloc.start()
    try:
        out = pre.one(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out, ref)
    assert peak < 2 << 20, f"preprocessing one frame allocated {peak / 2**20:.1f} MiB"  # was 137.5 MiB


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from dmpo_edge.images import load_image

    a = np.full((4, 4), 32768, np.uint16)
    p = str(tmp_path / "g16.png")
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    np.testing.assert_array_equal(load_image(p), np.full((4, 4, 3), 128, np.uint8))  # was 255 (clipped)


# ---- text output is safe ---------------------------------------------------------------------------------------

def test_undecodable_file_names_and_escape_codes_are_escaped(toy, tmp_path):
    """Before: UnicodeEncodeError traceback on a strict UTF-8 stdout; ANSI escapes reached the terminal raw."""
    folder = _pngs(tmp_path / "f", 2, toy.size, names=[b"caf\xe9.png", b"ok.png"])
    b = str(tmp_path / "b")
    shutil.copytree(toy.path, b)
    m = json.load(open(os.path.join(b, "manifest.json")))
    m["model"]["classes"] = ["\x1b[31mred\nline"] * 4
    write_json_atomic(os.path.join(b, "manifest.json"), m)
    r = _cli("run", b, "--source", folder, "--backend", "ort", env={"PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr
    assert "caf\\xe9.png" in r.stdout and "\x1b" not in r.stdout and "\\x1b[31mred\\nline"[:12] in r.stdout
    assert len(r.stdout.splitlines()) == 2 + 3  # two frames (one line each) and the summary


# ---- numbers on the command line and in the API ---------------------------------------------------------------

@pytest.mark.parametrize("args,what", [
    (["--max-wait-ms", "inf"], "max_wait_ms"), (["--max-wait-ms", "1e300"], "max_wait_ms"),
    (["--max-wait-ms", "nan"], "max_wait_ms"), (["--in-flight", "100000"], "max_in_flight"),
    (["--limit", "-1"], "limit"), (["--batch", "0"], "batch"), (["--in-flight", "0"], "max_in_flight"),
])
def test_bad_numbers_on_the_command_line_are_one_line_errors(toy, tmp_path, args, what, capsys):
    from dmpo_edge.cli import main

    folder = _pngs(tmp_path / "f", 2, toy.size)
    assert main(["run", toy.path, "--source", folder, "--backend", "ort", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dmpo-edge: error: stream | ") and what in err, err


def test_api_numbers_are_checked(toy):
    from dmpo_edge.runtime.pipeline import Pipeline

    with pytest.raises(DmpoEdgeError, match="not a list of numbers"):
        Pipeline.from_bundle(toy.path, backend="ort", thresholds=[10**400, 0.5])
    with pytest.raises(DmpoEdgeError, match="not a list of numbers"):
        Pipeline.from_bundle(toy.path, backend="ort", thresholds="99")  # was [9, 9]
    with pytest.raises(DmpoEdgeError, match="max_in_flight"):
        Pipeline.from_bundle(toy.path, backend="ort", max_in_flight=100000)
    with Pipeline.from_bundle(toy.path, backend="ort") as p:
        x = toy.inputs(4)
        for bad in ("x", 0, -3, 2.5, True, float("nan")):
            with pytest.raises(DmpoEdgeError, match="batch_size"):
                p.predict(x, batch_size=bad)


# ---- thread safety ---------------------------------------------------------------------------------------------

def test_results_from_two_threads_delivers_each_batch_exactly_once(toy):
    """Before: both threads waited on the same head batch and each popped one: a batch twice, another lost."""
    from dmpo_edge.runtime.pipeline import Pipeline

    x = toy.inputs(64, seed=3)
    with Pipeline.from_bundle(toy.path, backend="ort", max_in_flight=24) as p:
        for rep in range(5):
            for i in range(24):
                p.submit(x, tag=(rep, i))
            got, errors = [], []

            def collect():
                try:
                    got.extend(tag for tag, _ in p.results(wait=True))
                except Exception as exc:  # IndexError before the fix
                    errors.append(exc)

            ts = [threading.Thread(target=collect) for _ in range(3)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            assert not errors and sorted(got) == [(rep, i) for i in range(24)]


def test_predict_from_three_threads_gets_its_own_results(toy):
    """Before: 29 of 45 calls failed with 'earlier submit() calls are still pending'."""
    from dmpo_edge.runtime.pipeline import Pipeline

    xs = [toy.inputs(n, seed=s) for s, n in enumerate((40, 100, 7))]
    with Pipeline.from_bundle(toy.path, backend="ort", max_in_flight=3) as p:
        ref = [p.predict(x, batch_size=16) for x in xs]
        failures = []

        def work(i):
            for _ in range(15):
                try:
                    r = p.predict(xs[i], batch_size=16)
                    np.testing.assert_array_equal(r.prediction, ref[i].prediction)
                    np.testing.assert_array_equal(r.exit_stage, ref[i].exit_stage)
                except Exception as exc:
                    failures.append(exc)

        ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
    assert not failures, failures[:3]


# ---- bundles and checkpoints written by the commands ----------------------------------------------------------

def test_calibrate_sweeps_dead_temp_files_refuses_a_reports_link_and_writes_0644(toy, tmp_path):
    from dmpo_edge.calib.evaluate import calibrate

    from .test_reliability_writers import _labelled_folder

    b = str(tmp_path / "b")
    shutil.copytree(toy.path, b)
    data = _labelled_folder(tmp_path / "val", [f"class_{i}" for i in range(4)], toy.size)
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    os.makedirs(os.path.join(b, "reports"), exist_ok=True)
    leftover = os.path.join(b, "reports", f".tmp-{dead}-abc.png")  # what a SIGKILLed calibrate leaves
    open(leftover, "wb").write(b"half a png")
    old = os.umask(0o022)
    try:
        calibrate(b, data, budget=0.9, progress=False, plot=True)
    finally:
        os.umask(old)
    assert not os.path.exists(leftover)
    for name in ("calibration.png", "calibration.json"):
        assert os.stat(os.path.join(b, "reports", name)).st_mode & 0o777 == 0o644, name
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(os.path.join(b, "reports"))
    os.symlink(outside, os.path.join(b, "reports"))
    with pytest.raises(DmpoEdgeError, match="reports/ is a symbolic link"):
        calibrate(b, data, budget=0.9, progress=False, plot=False)
    assert os.listdir(outside) == []


TINY = {"backbone": "vit", "image_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 3, "num_heads": 2,
        "num_classes": 10, "exits": [0, 1, 2], "pretrained": False, "adapter_dim": 0, "lora_rank": 0,
        "bypass_dim": 8, "cov_dim": 4}


def _checkpoint(path, edit=None):
    torch = pytest.importorskip("torch")
    from dmpo_edge.models import build_model, save_checkpoint
    from dmpo_edge.preprocess import Preprocess

    torch.manual_seed(0)
    model = build_model(TINY)
    if edit:
        edit(model)
    old = os.umask(0o022)
    try:
        save_checkpoint(path, model, classes=[str(i) for i in range(10)], preprocess=Preprocess(32, 32).to_dict(),
                        loss_schedule={}, metrics={})
    finally:
        os.umask(old)
    return path


def test_compile_refuses_nan_weights_with_the_tensor_name(tmp_path):
    """Before: compiled 'successfully' (parity read 0.0 error: NaN compares false)."""
    torch = pytest.importorskip("torch")
    from dmpo_edge.compile import compile_bundle

    def poison(model):
        name, t = next((n, t) for n, t in model.state_dict().items() if t.is_floating_point() and t.numel() > 4)
        with torch.no_grad():
            t.view(-1)[3] = float("nan")
        poison.name = name
    ck = _checkpoint(str(tmp_path / "nan.pt"), poison)
    with pytest.raises(DmpoEdgeError, match=f"weight '{poison.name}' has 1 NaN/Inf value"):
        compile_bundle(ck, str(tmp_path / "out"), progress=False, build="never", log=lambda m: None)
    assert not os.path.exists(tmp_path / "out")


def test_parity_counts_nan_as_a_failure():
    from dmpo_edge.compile.parity import _rel

    assert _rel(np.array([np.nan, 1.0]), np.array([1.0, 1.0])) == float("inf")
    assert _rel(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.0


@pytest.mark.parametrize("version", [True, 0, -5])
def test_checkpoint_versions_that_are_not_versions_are_refused(tmp_path, version):
    torch = pytest.importorskip("torch")
    from dmpo_edge.models import load_checkpoint

    ck = _checkpoint(str(tmp_path / "m.pt"))
    assert os.stat(ck).st_mode & 0o777 == 0o644  # was 0600 (mkstemp)
    obj = torch.load(ck, weights_only=True)
    obj["version"] = version
    torch.save(obj, ck)
    with pytest.raises(DmpoEdgeError, match="checkpoint version"):
        load_checkpoint(ck)


def test_complex_weights_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    from dmpo_edge.models import load_checkpoint

    ck = _checkpoint(str(tmp_path / "m.pt"))
    obj = torch.load(ck, weights_only=True)
    name = next(n for n, t in obj["state_dict"].items() if t.is_floating_point())
    obj["state_dict"][name] = obj["state_dict"][name].to(torch.complex64)
    torch.save(obj, ck)
    with pytest.raises(DmpoEdgeError, match=f"tensor '{name}' is torch.complex64"):
        load_checkpoint(ck)


@pytest.mark.slow
def test_a_full_disk_during_compile_is_one_line_and_keeps_the_old_bundle(tmp_path, monkeypatch, capsys):
    """Before: an OSError traceback (exit 1) when the disk filled up while the bundle's files were written.

    The disk fills at that very point: the copy of the first stage graph into the new bundle fails with ENOSPC."""
    import errno

    import dmpo_edge.compile.compiler as compiler
    from dmpo_edge.cli import main

    ck = _checkpoint(str(tmp_path / "m.pt"))
    out = str(tmp_path / "bundle")
    os.makedirs(out)
    open(os.path.join(out, "keep.txt"), "w").write("old")
    real = compiler.shutil.copyfile

    def disk_full(src, dst, *a, **kw):
        if os.path.basename(dst).startswith("stage_"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(compiler.shutil, "copyfile", disk_full)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    rc = main(["compile", ck, "-o", out, "--force", "--quiet", "--build", "never", "--exporter", "torchscript"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("dmpo-edge: error: compile | the disk is full writing ") and "Nothing was replaced" in err
    assert os.listdir(out) == ["keep.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bundle.tmp-")]  # no half-written bundle left


# ---- one line on stderr ----------------------------------------------------------------------------------------

_NOISY_COMMAND = r'''
import os, sys, types, warnings
from dmpo_edge import cli
from dmpo_edge.errors import DmpoEdgeError
mod = types.ModuleType("dmpo_edge.commands.inspect")
mod.add_arguments = lambda p: p.add_argument("what")
def run(args):
    for _ in range(303):  # what a C decoder writes to fd 2
        os.write(2, b"libpng warning: iCCP: known incorrect sRGB profile\n")
    warnings.warn("TypedStorage is deprecated", UserWarning)
    if args.what == "fail":
        raise DmpoEdgeError("image a.png", "cannot decode (OSError: broken data stream\nwhen reading image file)")
    return 0
mod.run = run
sys.modules["dmpo_edge.commands.inspect"] = mod
sys.exit(cli.main(["inspect"] + sys.argv[1:]))
'''


@pytest.mark.parametrize("what,rc,first", [("fail", 2, "dmpo-edge: error: image a.png | cannot decode"),
                                           ("ok", 0, "dmpo-edge: note: 1 library warning(s) and 303 line(s)")])
def test_library_noise_is_one_summary_line_unless_verbose(what, rc, first):
    """Before: up to 303 lines of decoder output and multi-line messages before (or instead of) the error."""
    r = subprocess.run([PY, "-c", _NOISY_COMMAND, what], capture_output=True, text=True, timeout=60)
    assert r.returncode == rc and r.stderr.count("\n") == 1 and r.stderr.startswith(first), r.stderr[-1000:]
    assert "303 line(s) of library output hidden" in r.stderr and "--verbose" in r.stderr
    r = subprocess.run([PY, "-c", _NOISY_COMMAND, what, "--verbose"], capture_output=True, text=True, timeout=60)
    assert r.returncode == rc and r.stderr.count("libpng warning") == 303 and "TypedStorage" in r.stderr
