"""IDX files and the MNIST-family data sets: real IDX files written here (gzipped and not), the official
Fashion-MNIST files where Debian's package is installed, and one-line errors naming the bad file."""

import gzip
import re
import os

import numpy as np
import pytest

from dmpo_edge.calib.datasets import is_named_dataset, load_dataset, named_split
from dmpo_edge.calib.idx import read_idx, write_idx
from dmpo_edge.calib.idx_sets import FASHION_MNIST_DIR, holdout_split
from dmpo_edge.errors import DmpoEdgeError

FASHION_INSTALLED = os.path.exists(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
needs_fashion = pytest.mark.skipif(not FASHION_INSTALLED, reason="Debian package dataset-fashion-mnist not installed "
                                   "(apt-get install dataset-fashion-mnist; CI installs it)")


def _images(n, seed, size=(6, 5)):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *size), dtype=np.uint8)


def _write_set(root, n_train=60, n_test=20, classes=3, gz=True, prefix_test="t10k"):
    os.makedirs(root, exist_ok=True)
    ext = ".gz" if gz else ""
    sets = {}
    for prefix, n, seed in (("train", n_train, 0), (prefix_test, n_test, 1)):
        imgs = _images(n, seed)
        labels = (np.arange(n) % classes).astype(np.uint8)
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte{ext}"), imgs)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
        sets[prefix] = (imgs, labels)
    return sets


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_and_splits(tmp_path, gz):
    root = str(tmp_path / "set")
    sets = _write_set(root, gz=gz)
    arr = read_idx(os.path.join(root, "train-images-idx3-ubyte" + (".gz" if gz else "")))
    assert arr.dtype == np.uint8 and np.array_equal(arr, sets["train"][0])

    full = load_dataset(f"idx:{root}")
    assert len(full) == 80 and full.classes == ["0", "1", "2"]
    assert full.images[0].shape == (6, 5, 3) and full.images[0].dtype == np.uint8
    # the grey level is repeated on the three channels; train comes first, then the test file
    assert np.array_equal(full.images[0][:, :, 2], sets["train"][0][0])
    assert np.array_equal(full.images[60][:, :, 0], sets["t10k"][0][0])

    train, val, test = (load_dataset(f"idx:{root}:{s}") for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (54, 6, 20)
    assert np.bincount(val.labels).tolist() == [2, 2, 2]  # stratified 10%
    assert np.array_equal(test.labels, sets["t10k"][1].astype(np.int64))
    # train and val partition the training file exactly, and the split is the same on every load
    key = lambda d: {img.tobytes() for img in d.images}  # noqa: E731
    assert not key(train) & key(val) and len(key(train) | key(val)) == 60
    assert key(load_dataset(f"idx:{root}:val")) == key(val)


def test_idx_classes_txt_names_the_classes_and_bounds_the_labels(tmp_path):
    root = str(tmp_path / "set")
    _write_set(root, classes=3, prefix_test="test")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("cat\ndog\nfox\n")
    assert load_dataset(f"idx:{root}:test").classes == ["cat", "dog", "fox"]
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("cat\ndog\n")
    with pytest.raises(DmpoEdgeError, match=r"train-labels-idx1-ubyte.gz' has 20 label\(s\) outside the 2 classes"):
        load_dataset(f"idx:{root}:train")


def test_spec_parsing():
    assert named_split("fashion-mnist:val") == ("fashion-mnist", "val")
    assert named_split("idx:/data/kmnist:test") == ("idx:/data/kmnist", "test")
    assert named_split("idx:/data/kmnist") == ("idx:/data/kmnist", None)
    assert named_split("digits") == ("digits", None)
    assert is_named_dataset("fashion-mnist") and is_named_dataset("idx:/x") and not is_named_dataset("/tmp")
    with pytest.raises(DmpoEdgeError, match="unknown split 'valid'"):
        load_dataset("fashion-mnist:valid")


def _bad(tmp_path, name, data: bytes, gz=False):
    root = tmp_path / "bad"
    _write_set(str(root), gz=False)
    path = root / name
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(root), str(path)


def test_truncated_file_is_one_error_naming_it(tmp_path):
    _write_set(str(tmp_path / "g"), gz=False)
    good = (tmp_path / "g" / "train-images-idx3-ubyte").read_bytes()
    root, path = _bad(tmp_path, "train-images-idx3-ubyte", good[:-7])
    with pytest.raises(DmpoEdgeError, match="is truncated") as e:
        load_dataset(f"idx:{root}:train")
    assert path in str(e.value)
    root, path = _bad(tmp_path, "train-images-idx3-ubyte", good[:9])  # cut inside the header
    with pytest.raises(DmpoEdgeError, match="truncated inside its header"):
        load_dataset(f"idx:{root}")


def test_damaged_gzip_and_wrong_magic(tmp_path):
    root = str(tmp_path / "z")
    _write_set(root)
    path = os.path.join(root, "t10k-images-idx3-ubyte.gz")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(DmpoEdgeError, match="damaged gzip") as e:
        load_dataset(f"idx:{root}:test")
    assert path in str(e.value)
    root, path = _bad(tmp_path, "train-labels-idx1-ubyte", b"PK\x03\x04" + bytes(60))
    with pytest.raises(DmpoEdgeError, match="does not start with an IDX magic number") as e:
        load_dataset(f"idx:{root}:train")
    assert path in str(e.value)


def test_count_mismatch_and_labels_outside_classes(tmp_path, monkeypatch):
    root = str(tmp_path / "m")
    _write_set(root, gz=False)
    write_idx(os.path.join(root, "train-labels-idx1-ubyte"), np.zeros(59, np.uint8))
    with pytest.raises(DmpoEdgeError, match="has 59 labels but .*train-images-idx3-ubyte' has 60 images"):
        load_dataset(f"idx:{root}:train")
    # Fashion-MNIST has 10 classes: a label 10 in its files is named, with the file
    fm = str(tmp_path / "fm")
    _write_set(fm, n_train=100, n_test=20, classes=10)
    write_idx(os.path.join(fm, "t10k-labels-idx1-ubyte.gz"), np.full(20, 10, np.uint8))
    monkeypatch.setenv("DMPO_EDGE_FASHION_MNIST", fm)
    assert len(load_dataset("fashion-mnist:train")) == 90
    with pytest.raises(DmpoEdgeError, match=r"t10k-labels-idx1-ubyte.gz' has 20 label\(s\) outside the 10 classes"):
        load_dataset("fashion-mnist:test")


def test_missing_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DMPO_EDGE_FASHION_MNIST", str(tmp_path / "absent"))
    with pytest.raises(DmpoEdgeError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist:test")
    root = tmp_path / "half"
    root.mkdir()
    write_idx(str(root / "train-images-idx3-ubyte"), _images(4, 0))
    with pytest.raises(DmpoEdgeError, match="has no label file beside it. Expected 'train-labels-idx1-ubyte'"):
        load_dataset(f"idx:{root}")
    with pytest.raises(DmpoEdgeError, match="does not exist"):
        load_dataset(f"idx:{tmp_path / 'nothing'}")
    only_train = str(tmp_path / "only")
    _write_set(only_train)
    os.remove(os.path.join(only_train, "t10k-images-idx3-ubyte.gz"))
    with pytest.raises(DmpoEdgeError, match="has no test file"):
        load_dataset(f"idx:{only_train}:test")


def test_stratified_subset_and_too_large_subset(tmp_path):
    root = str(tmp_path / "s")
    _write_set(root, n_train=90, classes=3)
    train = load_dataset(f"idx:{root}:train")  # 81 images, 27 per class
    sub = train.stratified_take(30, seed=3)
    assert np.bincount(sub.labels).tolist() == [10, 10, 10]
    again = train.stratified_take(30, seed=3)
    assert [i.tobytes() for i in sub.images] == [i.tobytes() for i in again.images]
    assert [i.tobytes() for i in train.stratified_take(30, seed=4).images] != [i.tobytes() for i in sub.images]
    with pytest.raises(DmpoEdgeError, match="asked for 82 images but .* holds 81"):
        train.stratified_take(82)


def test_holdout_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), [50, 30, 20, 100])
    tr, va = holdout_split(labels, 0.1)
    assert np.bincount(labels[va]).tolist() == [5, 3, 2, 10]
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 200


@needs_fashion
def test_fashion_mnist_official_splits():
    test = load_dataset("fashion-mnist:test")
    val = load_dataset("fashion-mnist:val")
    assert len(test) == 10_000 and np.bincount(test.labels).tolist() == [1000] * 10
    assert len(val) == 6_000 and np.bincount(val.labels).tolist() == [600] * 10
    assert test.images[0].shape == (28, 28, 3) and test.classes[9] == "ankle-boot"
    # the first official test image is an ankle boot (label 9); the split is fixed: its fingerprint never changes
    assert int(test.labels[0]) == 9
    assert val.fingerprint() == load_dataset("fashion-mnist:val").fingerprint()
    assert len(load_dataset("fashion-mnist:train")) == 54_000


def test_tune_bad_idx_data_is_one_line_error(tmp_path, capsys):
    pytest.importorskip("torch")
    from dmpo_edge.cli import main

    root = str(tmp_path / "t")
    _write_set(root, gz=False)
    raw = open(os.path.join(root, "train-images-idx3-ubyte"), "rb").read()
    open(os.path.join(root, "train-images-idx3-ubyte"), "wb").write(raw[:-1])
    argv = ["tune", "--data", f"idx:{root}", "--backbone", "vit", "--embed-dim", "16", "--depth", "1", "--num-heads", "1",
            "--patch-size", "8", "--image-size", "16", "--exits", "0", "--no-pretrained", "--quiet", "-o", str(tmp_path / "m.pt")]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "train-images-idx3-ubyte' is truncated" in err, err
    _write_set(root, gz=False)
    rc = main(argv + ["--train-count", "1000"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "asked for 1000 images but" in err, err


def test_tune_on_an_idx_subset_logs_its_threads(tmp_path, capsys):
    pytest.importorskip("torch")
    from dmpo_edge.cli import main
    from dmpo_edge.commands.tune import _cnn_image_size
    from dmpo_edge.models import load_checkpoint

    assert _cnn_image_size("fashion-mnist:train") == 32 and _cnn_image_size("idx:/data/kmnist") == 32
    assert _cnn_image_size("digits") == 64 and _cnn_image_size(str(tmp_path)) == 64
    root = str(tmp_path / "t")
    _write_set(root, n_train=120, n_test=20, classes=3)
    out = tmp_path / "m.pt"
    rc = main(["tune", "--data", f"idx:{root}", "--train-count", "30", "--epochs", "1", "--seed", "3",
               "--backbone", "vit", "--embed-dim", "16", "--depth", "1", "--num-heads", "1", "--patch-size", "8",
               "--image-size", "16", "--exits", "0", "--no-pretrained", "--quiet", "-o", str(out)])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    # the thread choice is in the closing line (also under --quiet) and in the checkpoint
    assert re.search(r"in [\d.]+ s; validation on .*; threads: \d+ \(\d+ cores, \d+\.\d busy now, load \d+\.\d\)", printed), printed
    _, meta = load_checkpoint(str(out))
    m = meta["metrics"]
    assert m["num_train"] == 30 and m["num_val"] == 12  # val: the stratified 10% of the training file
    assert "30 stratified, seed 3" in m["train_data"] and m["val_data"].endswith(":val")
    assert m["threads"].startswith("threads: ")
