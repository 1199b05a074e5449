"""Fashion-MNIST and other MNIST-family sets read from IDX files, split as every command expects.

``train`` is the official training file less ``val``, a fixed stratified 10% of it (the same images in
every command and on every machine: a seeded per-class permutation), and ``test`` is the official test
file, which tuning and calibration never touch. Images are grey 28 x 28; they are returned as H x W x 3
uint8 like every other set (the grey level repeated), and the preprocessing resizes them to the network.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import DmpoEdgeError
from .datasets import Dataset
from .idx import TEST_PREFIXES, TRAIN_PREFIXES, find_idx_pairs, read_idx, read_idx_pair

__all__ = ["load_fashion_mnist", "load_idx_folder", "holdout_split", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR",
           "VAL_FRACTION"]

#: folder names as well as labels: no '/' (the official "T-shirt/top") so write_image_folder can use them
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle-boot"]
#: where Debian's dataset-fashion-mnist package puts the four gzipped IDX files
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                  "t10k-labels-idx1-ubyte.gz"]
#: share of the official training file held out as ``val``
VAL_FRACTION = 0.1
_SPLIT_SEED = 0


def holdout_split(labels: np.ndarray, fraction: float = VAL_FRACTION, seed: int = _SPLIT_SEED):
    """``(train_idx, val_idx)``: a seeded, stratified ``fraction`` of every class held out (sorted indices)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _as_rgb(images: np.ndarray) -> list:
    # one contiguous N x H x W x 3 block; the list holds views of it (no per-image allocation)
    rgb = np.repeat(images[:, :, :, None], 3, axis=3)
    return list(rgb)


def _pick(pairs: dict, prefixes: tuple, root: str, what: str):
    for p in prefixes:
        if p in pairs:
            return pairs[p]
    names = " or ".join(f"{p}-images-idx3-ubyte(.gz)" for p in prefixes)
    raise DmpoEdgeError("IDX data", f"folder '{root}' has no {what} file ({names}); found only "
                        f"{', '.join(sorted(pairs))}. Use idx:{root} without a split to load every file")


def _split_set(pairs: dict, root: str, split: str | None, classes: list, source: str) -> Dataset:
    n = len(classes)
    if split is None:
        order = [p for p in TRAIN_PREFIXES + TEST_PREFIXES if p in pairs] + sorted(
            p for p in pairs if p not in TRAIN_PREFIXES + TEST_PREFIXES)
        parts = [read_idx_pair(*pairs[p], num_classes=n) for p in order]
        shapes = {im.shape[1:] for im, _ in parts}
        if len(shapes) > 1:
            raise DmpoEdgeError("IDX data", f"the IDX files in '{root}' hold images of different sizes {sorted(shapes)}. "
                                "Expected one image size per folder")
        images = np.concatenate([im for im, _ in parts])
        labels = np.concatenate([lab for _, lab in parts])
    elif split == "test":
        images, labels = read_idx_pair(*_pick(pairs, TEST_PREFIXES, root, "test"), num_classes=n)
    else:
        images, labels = read_idx_pair(*_pick(pairs, TRAIN_PREFIXES, root, "training"), num_classes=n)
        tr, va = holdout_split(labels)
        idx = tr if split == "train" else va
        images, labels = images[idx], labels[idx]
    return Dataset(_as_rgb(images), labels.copy(), list(classes), source + (f":{split}" if split else ""))


def load_fashion_mnist(split: str | None = None) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017, MIT licence): 60,000 + 10,000 grey 28 x 28 images, 10 classes."""
    root = os.environ.get("DMPO_EDGE_FASHION_MNIST") or FASHION_MNIST_DIR
    if not os.path.isdir(root) or not any(
        os.path.exists(os.path.join(root, f)) or os.path.exists(os.path.join(root, f[:-3])) for f in _FASHION_FILES
    ):
        raise DmpoEdgeError(
            "fashion-mnist", f"the data set is not installed ('{root}' has no IDX files). Install it with "
            "'sudo apt-get install dataset-fashion-mnist', or set DMPO_EDGE_FASHION_MNIST to a folder holding "
            "its four IDX files (train/t10k images and labels, gzipped or not)"
        )
    pairs = find_idx_pairs(root)
    for prefix in ("train", "t10k"):
        if prefix not in pairs:
            raise DmpoEdgeError(
                "fashion-mnist", f"'{root}' lacks {prefix}-images-idx3-ubyte.gz or {prefix}-labels-idx1-ubyte.gz. "
                "Reinstall with 'sudo apt-get install --reinstall dataset-fashion-mnist'"
            )
    pairs = {p: pairs[p] for p in ("train", "t10k")}
    return _split_set(pairs, root, split, FASHION_MNIST_CLASSES, "fashion-mnist")


def _idx_classes(root: str, pairs: dict) -> list:
    names_file = os.path.join(root, "classes.txt")
    if os.path.isfile(names_file):
        with open(names_file, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        if not names:
            raise DmpoEdgeError("IDX data", f"'{names_file}' is empty. Expected one class name per line")
        return names
    top = 0
    for _, labels_path in pairs.values():
        labels = read_idx(labels_path)
        if labels.size and labels.dtype.kind in "iu":
            top = max(top, int(labels.max()))
    return [str(i) for i in range(top + 1)]


def load_idx_folder(root: str, split: str | None = None) -> Dataset:
    """Every IDX image/label pair in ``root`` (``split`` None), or its ``train``/``val``/``test`` split."""
    if not root:
        raise DmpoEdgeError("IDX data", "'idx:' needs a folder. Expected idx:DIR or idx:DIR:train|val|test")
    pairs = find_idx_pairs(root)
    return _split_set(pairs, root, split, _idx_classes(root, pairs), f"idx:{os.path.abspath(root)}")
