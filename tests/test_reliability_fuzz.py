"""Property-based fuzzing of everything that reads a file or an array from outside.

Targets: the manifest loader (``Bundle.load`` on random JSON, mutated valid manifests, raw garbage text,
deep nesting, huge numbers, wrong types), the checkpoint loader (``load_checkpoint`` on random bytes,
truncated and byte-flipped real checkpoints, zips with the wrong members, dmpo-edge dicts with wrong types),
the image decoder (``load_image`` on random / truncated / mutated PNG and JPEG bytes) and ``Preprocess``
(arrays of odd shapes, dtypes and values). The property is always the same: the call returns a well-formed
value or raises :class:`DmpoEdgeError`; any other exception (or a crash) is a bug.

Example counts: the suite runs a few hundred per target (fixed seed). ``DMPO_FUZZ_EXAMPLES=10000`` spreads
that many examples over the targets by weight (random seeds) - the figure in docs/reliability.md.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmpo_edge.bundle import Bundle
from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.preprocess import Preprocess

# target -> (share of DMPO_FUZZ_EXAMPLES, examples in the default suite run)
TARGETS = {
    "manifest_random_json": (0.08, 200),
    "manifest_raw_text": (0.08, 150),
    "manifest_mutated": (0.16, 300),
    "checkpoint_bytes": (0.10, 120),
    "checkpoint_real_damaged": (0.10, 80),
    "checkpoint_zip_members": (0.06, 60),
    "checkpoint_wrong_types": (0.12, 120),
    "image_bytes": (0.18, 250),
    "preprocess_arrays": (0.12, 200),
}
assert abs(sum(s for s, _ in TARGETS.values()) - 1.0) < 1e-9

_FULL = int(os.environ.get("DMPO_FUZZ_EXAMPLES", "0") or 0)


def fuzz_settings(target: str):
    share, default = TARGETS[target]
    n = max(1, round(share * _FULL)) if _FULL else default
    return settings(max_examples=n, deadline=None, derandomize=not _FULL, database=None,
                    suppress_health_check=list(HealthCheck))


class _Case(tuple):
    """Fixture value with a short repr (hypothesis prints the arguments of a failing example)."""

    def __repr__(self):
        return "<fuzz case>"


def _ok_or_dmpo(fn, *args, **kw):
    """Run ``fn``: a value or DmpoEdgeError is fine; anything else fails the property (re-raised as is)."""
    try:
        return fn(*args, **kw)
    except DmpoEdgeError as exc:
        assert exc.where and exc.message, "a DmpoEdgeError must say where and what"
        return None


# ---------------------------------------------------------------------------------------------
# JSON values, including the awkward ones Python's json module accepts: NaN, Infinity, 400-digit ints
# ---------------------------------------------------------------------------------------------
_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10 ** 400), max_value=10 ** 400)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
            | st.sampled_from(["", "..", "/etc/passwd", "../x", "stage_0.onnx", "fp32", "int8", "float32", "keep_idx_gather",
                               "dmpo-edge-bundle", "0" * 64, "features", "logits", "\x00", "C:\\x"]))
json_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=12), c, max_size=5),
                           max_leaves=30)


def _deep(depth: int, kind: str):
    v = 1
    for _ in range(depth):
        v = [v] if kind == "list" else {"a": v}
    return v


# ---------------------------------------------------------------------------------------------
# manifest loader
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest_case(toy_bundle):
    """A writable bundle folder with real stage files; each example rewrites only manifest.json."""
    tb = toy_bundle(num_stages=3, classes=4, seed=11, thresholds=[0.7, 0.8], cpu_variant=True)
    import onnx

    from dmpo_edge.bundle import sha256_file

    d = tempfile.mkdtemp(prefix="dmpo-fuzz-bundle-")
    for f in os.listdir(tb.path):
        if f.endswith(".onnx"):
            shutil.copy(os.path.join(tb.path, f), d)
    with open(os.path.join(tb.path, "manifest.json")) as f:
        valid = json.load(f)
    # stage 1 keeps its weights in an external-data file: mutations reach its data_files record too
    g = onnx.load(os.path.join(d, "stage_1.onnx"))
    onnx.save_model(g, os.path.join(d, "stage_1.onnx"), save_as_external_data=True, location="stage_1.weights",
                    size_threshold=0)
    valid["stages"][1]["sha256"] = sha256_file(os.path.join(d, "stage_1.onnx"))
    valid["stages"][1]["data_files"] = [{"file": "stage_1.weights", "sha256": sha256_file(os.path.join(d, "stage_1.weights"))}]
    yield _Case((d, valid))
    shutil.rmtree(d, ignore_errors=True)


def _load_and_use(path: str):
    """Bundle.load plus every accessor the runtime reads; all must hold for a manifest that validates."""
    b = Bundle.load(path, verify=True)
    b.preprocess
    b.classes
    b.num_stages
    b.precision
    b.max_batch
    th = b.thresholds
    assert th is None or all(not math.isnan(t) for t in th)
    assert all(math.isfinite(c) for c in b.cumulative_flops)
    for k in range(b.num_stages):
        assert os.path.realpath(b.stage_path(k, "cpu")).startswith(os.path.realpath(path) + os.sep)
        assert os.path.realpath(b.stage_path(k)).startswith(os.path.realpath(path) + os.sep)
    return b


def _write_manifest(d: str, text) -> None:
    with open(os.path.join(d, "manifest.json"), "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))


@fuzz_settings("manifest_random_json")
@given(value=json_values | st.builds(_deep, st.integers(1, 3000), st.sampled_from(["list", "dict"])))
def test_fuzz_manifest_random_json(manifest_case, value):
    d, _ = manifest_case
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):
        return
    _write_manifest(d, text)
    _ok_or_dmpo(_load_and_use, d)


@fuzz_settings("manifest_raw_text")
@given(raw=st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.integers(4000, 6000).map(lambda n: b'{"max_batch": ' + b"9" * n + b"}"),  # past Python's int-parsing limit
    st.integers(1, 200000).map(lambda n: b"[" * n),  # deep nesting, unterminated
    st.integers(1, 50000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
))
def test_fuzz_manifest_raw_text(manifest_case, raw):
    d, valid = manifest_case
    _write_manifest(d, raw)
    _ok_or_dmpo(_load_and_use, d)


_MUTATIONS = ("replace", "delete", "insert", "huge", "nonfinite", "wrong_type", "deep", "path", "classes", "size")


def _paths(obj, prefix=()):
    yield prefix
    if len(prefix) > 8:  # never walk into the deep-nesting mutations
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(data, m: dict):
    m = json.loads(json.dumps(m))
    for _ in range(data.draw(st.integers(1, 4), label="n_mutations")):
        paths = [p for p in _paths(m) if p]
        path = data.draw(st.sampled_from(paths), label="path")
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = data.draw(st.sampled_from(_MUTATIONS), label="op")
        if op == "classes":  # a class list that disagrees with the logits
            m["model"]["classes"] = m["model"]["classes"][:data.draw(st.integers(1, 8), label="n_classes")] + (
                ["extra"] * data.draw(st.integers(0, 3), label="extra"))
            m["model"]["num_classes"] = len(m["model"]["classes"])
        elif op == "size":  # a preprocessing size that disagrees with the stage input (consistent in itself)
            n = data.draw(st.sampled_from([1, 7, 9, 64, 8192]), label="side")
            m["preprocess"] = dict(m["preprocess"], resize=n, crop=n, size=[n, n])
        elif op == "replace":
            parent[key] = data.draw(json_values, label="value")
        elif op == "delete":
            if isinstance(parent, dict):
                del parent[key]
            else:
                parent.pop(key)
        elif op == "insert":
            if isinstance(parent, dict):
                parent[data.draw(st.text(max_size=10), label="new_key")] = data.draw(json_values, label="value")
            else:
                parent.insert(key, data.draw(json_values, label="value"))
        elif op == "huge":
            parent[key] = data.draw(st.sampled_from([10 ** 400, -(10 ** 400), 2 ** 63, 2 ** 64 + 1, -1, 0, 1e308, -1e308,
                                                     5e-324, 2 ** 31]), label="huge")
        elif op == "nonfinite":
            parent[key] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="nonfinite")
        elif op == "wrong_type":
            v = parent[key]
            try:
                sv = str(v)
            except RecursionError:  # a value made deep by an earlier mutation
                sv = "deep"
            alt = [sv, [v], {"v": v}, None, True, 1.5, 7]
            parent[key] = data.draw(st.sampled_from(alt), label="alt")
        elif op == "deep":
            parent[key] = _deep(data.draw(st.integers(10, 2500), label="depth"), "list")
        elif op == "path":
            parent[key] = data.draw(st.sampled_from(["/etc/passwd", "../stage_0.onnx", "..", "./../../x", "a/../../b",
                                                     "/", "stage_0.onnx/..", "reports/../../x", "link_out"]), label="p")
    return m


@fuzz_settings("manifest_mutated")
@given(data=st.data())
def test_fuzz_manifest_mutated(manifest_case, data):
    d, valid = manifest_case
    link = os.path.join(d, "link_out")
    if not os.path.islink(link):
        os.symlink(os.path.join(os.path.dirname(d), "outside.onnx"), link)
    m = _mutate(data, valid)
    try:
        text = json.dumps(m)
    except (RecursionError, ValueError):
        return
    _write_manifest(d, text)
    b = _ok_or_dmpo(_load_and_use, d)
    if b is not None:  # whatever validated must still name files inside the bundle, with matching checksums
        for st_ in b.stages:
            assert os.path.isfile(os.path.join(d, st_["file"]))
        # ... agree with itself: classes vs logits, preprocessing vs the stage input ...
        # (where the manifest states the dimension; the runtime checks the graph's own shapes at session creation)
        for st_ in b.stages:
            for t in st_["outputs"]:
                if t["name"] == "logits" and t["shape"] and isinstance(t["shape"][-1], int):
                    assert t["shape"][-1] == len(b.classes)
        for t in b.stages[0]["inputs"]:
            if t["name"] == "input" and len(t["shape"]) == 4 and all(isinstance(v, int) for v in t["shape"][2:]):
                assert list(t["shape"][2:]) == list(b.preprocess.size)
        # ... and list the external-data file that stage 1's graph loads
        assert [f["file"] for f in b.stages[1]["data_files"]] == ["stage_1.weights"]


def test_manifest_huge_int_and_variants_list_are_refused(manifest_case):
    """Regressions found by the fuzzer, kept as plain tests."""
    d, valid = manifest_case
    cases = []
    m = json.loads(json.dumps(valid))
    m["thresholds"]["values"][0] = 10 ** 400
    cases.append(json.dumps(m))
    m = json.loads(json.dumps(valid))
    m["stages"][0]["cumulative_flops"] = 10 ** 400
    cases.append(json.dumps(m))
    m = json.loads(json.dumps(valid))
    m["stages"][0]["variants"] = ["cpu"]
    cases.append(json.dumps(m))
    m = json.loads(json.dumps(valid))
    m["preprocess"]["size"] = [1e999, 8]
    cases.append(json.dumps(m))
    m = json.loads(json.dumps(valid))
    m["preprocess"]["std"] = [0, 0, 0]
    cases.append(json.dumps(m))
    m = json.loads(json.dumps(valid))
    m["preprocess"]["resize"] = 10 ** 9
    cases.append(json.dumps(m))
    cases.append('{"max_batch": ' + "9" * 5000 + "}")
    for text in cases:
        _write_manifest(d, text)
        with pytest.raises(DmpoEdgeError):
            Bundle.load(d)
    _write_manifest(d, json.dumps(valid))
    Bundle.load(d)


# ---------------------------------------------------------------------------------------------
# checkpoint loader
# ---------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def ckpt_case(tmp_path_factory):
    from dmpo_edge.models import TINY_VIT_CONFIG, build_model, save_checkpoint

    d = tmp_path_factory.mktemp("fuzz_ckpt")
    torch.manual_seed(0)
    cfg = dict(TINY_VIT_CONFIG, embed_dim=16, depth=2, exits=[0, 1], num_classes=3, lora_rank=0, adapter_dim=0,
               bypass_dim=8, cov_dim=4)
    model = build_model(cfg)
    path = str(d / "model.pt")
    save_checkpoint(path, model, classes=["a", "b", "c"], preprocess=Preprocess(32, 32).to_dict(), loss_schedule={},
                    metrics={"exit_accuracy": [0.5, 0.6]})
    with open(path, "rb") as f:
        raw = f.read()
    payload = torch.load(path, weights_only=True)
    return _Case((str(d), raw, payload))




def _load_ckpt_bytes(d: str, blob: bytes):
    from dmpo_edge.models import load_checkpoint

    p = os.path.join(d, "fuzz.pt")
    with open(p, "wb") as f:
        f.write(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _ok_or_dmpo(load_checkpoint, p)
    if out is not None:
        model, meta = out
        assert isinstance(meta, dict) and {"config", "classes", "preprocess"} <= set(meta)
    return out


@fuzz_settings("checkpoint_bytes")
@given(blob=st.binary(max_size=2000) | st.binary(max_size=64).map(lambda b: b"PK\x03\x04" + b)
       | st.binary(max_size=64).map(lambda b: b"\x80\x02" + b))  # zip and pickle magic numbers
def test_fuzz_checkpoint_random_bytes(ckpt_case, blob):
    _load_ckpt_bytes(ckpt_case[0], blob)


@fuzz_settings("checkpoint_real_damaged")
@given(data=st.data())
def test_fuzz_checkpoint_truncated_or_flipped(ckpt_case, data):
    d, raw, _ = ckpt_case
    if data.draw(st.booleans(), label="truncate"):
        blob = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            i = data.draw(st.integers(0, len(b) - 1), label="pos")
            b[i] = data.draw(st.integers(0, 255), label="byte")
        blob = bytes(b)
    _load_ckpt_bytes(d, blob)


@fuzz_settings("checkpoint_zip_members")
@given(members=st.dictionaries(st.sampled_from(["archive/data.pkl", "archive/version", "archive/byteorder", "archive/data/0",
                                                "data.pkl", "x/y", "archive/.data/version"]),
                               st.binary(max_size=200), min_size=0, max_size=5),
       keep_real=st.booleans())
def test_fuzz_checkpoint_zip_with_wrong_contents(ckpt_case, members, keep_real):
    d, raw, _ = ckpt_case
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        if keep_real:  # a real checkpoint's members with some replaced
            with zipfile.ZipFile(io.BytesIO(raw)) as src:
                for info in src.infolist():
                    if not any(info.filename.endswith(k.split("/")[-1]) for k in members):
                        z.writestr(info.filename, src.read(info.filename))
        for name, blob in members.items():
            z.writestr(name, blob)
    _load_ckpt_bytes(d, buf.getvalue())


_tensors = st.builds(
    lambda shape, dt: torch.zeros(shape, dtype=dt),
    st.lists(st.integers(0, 5), max_size=3), st.sampled_from([torch.float32, torch.int64, torch.float16, torch.bool, torch.uint8]))
_values = st.recursive(_scalars | _tensors, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                       max_leaves=12)


@fuzz_settings("checkpoint_wrong_types")
@given(data=st.data())
def test_fuzz_checkpoint_dicts_with_wrong_types(ckpt_case, data):
    d, _, payload = ckpt_case
    obj = {k: (dict(v) if isinstance(v, dict) else v) for k, v in payload.items()}
    for _ in range(data.draw(st.integers(1, 3), label="n")):
        key = data.draw(st.sampled_from(sorted(obj) + ["config.*", "state_dict.*", "extra"]), label="key")
        if key in ("config.*", "state_dict.*") and not isinstance(obj.get(key[:-2]), dict):
            continue
        if key == "config.*":
            ck = data.draw(st.sampled_from(sorted(obj["config"]) + ["unknown"]), label="config_key")
            obj["config"] = dict(obj["config"])
            obj["config"][ck] = data.draw(_values | st.integers(-(2 ** 70), 2 ** 70), label="config_value")
        elif key == "state_dict.*":
            sd = dict(obj["state_dict"])
            name = data.draw(st.sampled_from(sorted(sd) + ["bogus"]), label="tensor")
            if data.draw(st.booleans(), label="drop"):
                sd.pop(name, None)
            else:
                sd[name] = data.draw(_values, label="tensor_value")
            obj["state_dict"] = sd
        elif data.draw(st.booleans(), label="delete") and key in obj:
            del obj[key]
        else:
            obj[key] = data.draw(_values, label="value")
    buf = io.BytesIO()
    torch.save(obj, buf)
    _load_ckpt_bytes(d, buf.getvalue())


def test_checkpoint_config_that_asks_for_more_than_the_file_holds(ckpt_case, tmp_path):
    """A 2 KB file whose config describes a 13-billion-parameter ViT is refused before anything is allocated."""
    import time

    from dmpo_edge.models import load_checkpoint

    _, _, payload = ckpt_case
    obj = dict(payload)
    obj["config"] = dict(payload["config"], embed_dim=4096, depth=64, num_heads=8)
    p = tmp_path / "bomb.pt"
    torch.save(obj, p)
    assert p.stat().st_size < 1 << 20
    t0 = time.perf_counter()
    with pytest.raises(DmpoEdgeError, match="checkpoint"):
        load_checkpoint(str(p))
    assert time.perf_counter() - t0 < 10


# ---------------------------------------------------------------------------------------------
# image decoding and preprocessing
# ---------------------------------------------------------------------------------------------
def _encoded_images():
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for mode, fmt, shape in (("RGB", "PNG", (9, 7, 3)), ("L", "PNG", (5, 6)), ("RGBA", "PNG", (4, 4, 4)),
                             ("RGB", "JPEG", (16, 12, 3)), ("L", "JPEG", (8, 8)), ("P", "PNG", (6, 6))):
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
        im = Image.fromarray(a if mode != "P" else a, mode="L" if mode == "P" else mode)
        if mode == "P":
            im = im.convert("P")
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


_IMAGES = None


def _images():
    global _IMAGES
    if _IMAGES is None:
        _IMAGES = _encoded_images()
    return _IMAGES


@pytest.fixture(scope="module")
def img_dir(tmp_path_factory):
    pytest.importorskip("PIL")
    return str(tmp_path_factory.mktemp("fuzz_img"))


@fuzz_settings("image_bytes")
@given(data=st.data())
def test_fuzz_load_image(img_dir, data):
    """Calibration (load_image) and the runtime's folder source decode the same bytes the same way."""
    from dmpo_edge.calib.datasets import load_image

    kind = data.draw(st.sampled_from(["random", "truncated", "mutated", "header_plus_random"]), label="kind")
    base = data.draw(st.sampled_from(_images()), label="base")
    if kind == "random":
        blob = data.draw(st.binary(max_size=500), label="blob")
    elif kind == "truncated":
        blob = base[: data.draw(st.integers(0, len(base) - 1), label="len")]
    elif kind == "mutated":
        b = bytearray(base)
        for _ in range(data.draw(st.integers(1, 10), label="n")):
            b[data.draw(st.integers(0, len(b) - 1), label="pos")] = data.draw(st.integers(0, 255), label="byte")
        blob = bytes(b)
    else:
        blob = base[: data.draw(st.integers(8, 40), label="hdr")] + data.draw(st.binary(max_size=300), label="tail")
    ext = data.draw(st.sampled_from([".png", ".jpg", ".bmp", ".gif"]), label="ext")
    p = os.path.join(img_dir, "fuzz" + ext)
    with open(p, "wb") as f:
        f.write(blob)
    from dmpo_edge.runtime.sources import _decode_image  # the stream's decoder (folder sources)

    img = _ok_or_dmpo(load_image, p)
    img2 = _ok_or_dmpo(_decode_image, p)
    assert (img is None) == (img2 is None) and (img is None or np.array_equal(img, img2))
    if img is not None:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[0] >= 1 and img.shape[1] >= 1
        x = Preprocess(resize=16, crop=16)([img])
        assert x.shape == (1, 3, 16, 16) and np.isfinite(x).all()


_dtypes = st.sampled_from([np.uint8, np.int8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_,
                           np.complex64, object, "U3"])


@fuzz_settings("preprocess_arrays")
@given(shape=st.lists(st.integers(0, 7), min_size=0, max_size=4)
       | st.tuples(st.integers(1, 3), st.integers(1, 300000)).map(lambda s: s + (3,)),  # extreme aspect ratios
       dtype=_dtypes,
       special=st.sampled_from([None, "nan", "inf", "huge", "negative"]),
       resize=st.integers(1, 24), crop_frac=st.floats(0.05, 1.0))
def test_fuzz_preprocess_arrays(shape, dtype, special, resize, crop_frac):
    crop = max(1, int(resize * crop_frac))
    pre = Preprocess(resize=resize, crop=crop, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    try:
        a = np.zeros(shape, dtype=dtype)
    except (TypeError, ValueError):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 1e300 into float16 overflows to inf on purpose
        if a.size and special and a.dtype.kind in "fc":
            a.flat[0] = {"nan": np.nan, "inf": np.inf, "huge": 1e300, "negative": -5}[special]
        elif a.size and special == "negative" and a.dtype.kind == "i":
            a.flat[0] = -5
        x = _ok_or_dmpo(pre, [a])
    if x is not None:
        assert x.shape == (1, 3, crop, crop) and x.dtype == np.float32 and np.isfinite(x).all()
