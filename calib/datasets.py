"""Labelled image sets: an image folder (one sub-folder per class), the bundled ``digits`` set, Fashion-MNIST
or any folder of MNIST-style IDX files.

A dataset spec is one of

* a folder path (one sub-folder of images per class);
* ``digits`` (all 1,797 images) or ``digits:<split>`` with split one of ``train``, ``val``, ``test`` (a fixed,
  stratified 60/20/20 split, the same in every command, so that a model tuned on ``digits:train`` is
  calibrated on ``digits:val`` and evaluated on ``digits:test``);
* ``fashion-mnist`` (all 70,000 images) or ``fashion-mnist:<split>``: ``train`` is the official training set
  less ``val``, a fixed stratified 10% of it (6,000 images), and ``test`` the official 10,000-image test set,
  which tuning and calibration never see. The files come from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``) or the folder named by ``$DMPO_EDGE_FASHION_MNIST``;
* ``idx:DIR`` or ``idx:DIR:<split>``: the same for any folder of IDX files (MNIST, KMNIST, ...); class names
  come from ``DIR/classes.txt`` (one per line) when present, else ``0..max label``.

Images are returned decoded as H x W x 3 uint8; preprocessing is :class:`dmpo_edge.preprocess.Preprocess`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from .._lazy import require
from ..errors import DmpoEdgeError
# re-exported: the image-file helpers are shared with the runtime's folder source
from ..images import IMAGE_EXTENSIONS, list_images, load_image

__all__ = [
    "Dataset", "load_dataset", "load_image", "list_images", "IMAGE_EXTENSIONS", "SPLITS", "split_indices",
    "write_image_folder", "is_named_dataset", "named_split",
]

SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}


@dataclass
class Dataset:
    images: list  # H x W x 3 uint8 arrays
    labels: np.ndarray | None  # int64 (N,), None for unlabelled folders
    classes: list
    source: str
    skipped: list = field(default_factory=list)  # (path, reason) of unreadable files

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> "Dataset":
        idx = np.asarray(idx, dtype=np.int64)
        labels = None if self.labels is None else self.labels[idx]
        return Dataset([self.images[i] for i in idx], labels, list(self.classes), f"{self.source}[{len(idx)}]", [])

    def take(self, n: int, seed: int = 0) -> "Dataset":
        """A fixed random subset of ``n`` images (all of them when ``n >= len``)."""
        if n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        return self.subset(np.sort(rng.choice(len(self), n, replace=False)))

    def stratified_take(self, n: int, seed: int = 0, where: str = "dataset") -> "Dataset":
        """``n`` images drawn per class in proportion to the class sizes (seeded); every class keeps at least one
        image when ``n`` allows. Asking for more images than the set holds is an error, not a silent 'all'."""
        if self.labels is None:
            raise DmpoEdgeError(where, f"{self.source} has no labels, so no stratified subset can be drawn")
        if n < 1 or n > len(self):
            raise DmpoEdgeError(where, f"asked for {n} images but {self.source} holds {len(self)}. "
                                f"Expected a count from 1 to {len(self)}")
        if n == len(self):
            return self
        rng = np.random.default_rng(seed)
        classes, counts = np.unique(self.labels, return_counts=True)
        # largest-remainder apportionment: exact total n, shares as close to the class frequencies as integers allow
        share = counts * (n / len(self))
        take = np.floor(share).astype(int)
        if n >= len(classes):
            take = np.maximum(take, 1)
        floor_min = 1 if n >= len(classes) else 0
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        while take.sum() != n:  # terminates: floor_min * classes <= n <= sum(counts)
            step = 1 if take.sum() < n else -1
            for i in (order if step > 0 else order[::-1]):
                if take.sum() != n and floor_min <= take[i] + step <= counts[i]:
                    take[i] += step
        picked = [rng.choice(np.flatnonzero(self.labels == c), k, replace=False) for c, k in zip(classes, take) if k]
        out = self.subset(np.sort(np.concatenate(picked)))
        out.source = f"{self.source} ({n} stratified, seed {seed})"
        return out

    def fingerprint(self) -> str:
        """sha256 over the decoded pixels and labels: recorded as the calibration set's identity."""
        h = hashlib.sha256()
        for img in self.images:
            h.update(np.ascontiguousarray(img).tobytes())
        if self.labels is not None:
            h.update(np.asarray(self.labels, np.int64).tobytes())
        return h.hexdigest()


def split_indices(labels: np.ndarray, split: str, seed: int = 0) -> np.ndarray:
    """Stratified, deterministic indices of ``split`` (train/val/test fractions in :data:`SPLITS`)."""
    if split not in SPLITS:
        raise DmpoEdgeError("dataset", f"unknown split '{split}'. Expected one of {', '.join(SPLITS)}")
    rng = np.random.default_rng(seed)
    names = list(SPLITS)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        cuts = np.round(np.cumsum([SPLITS[s] for s in names]) * n).astype(int)
        start = 0 if names.index(split) == 0 else cuts[names.index(split) - 1]
        picked.append(idx[start : cuts[names.index(split)]])
    return np.sort(np.concatenate(picked))


def _digits(split: str | None) -> Dataset:
    datasets = require("sklearn.datasets", "the bundled digits set")
    d = datasets.load_digits()
    # 8 x 8 grey levels 0..16 -> uint8 RGB; the preprocessing upsamples them to the network size.
    imgs = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    idx = np.arange(len(labels)) if split is None else split_indices(labels, split)
    images = [np.repeat(imgs[i][:, :, None], 3, axis=2) for i in idx]
    return Dataset(images, labels[idx], [str(i) for i in range(10)], "digits" + (f":{split}" if split else ""))


def _folder(root: str, labelled: bool) -> Dataset:
    if not os.path.isdir(root):
        raise DmpoEdgeError(
            "dataset", f"data folder '{root}' does not exist. Expected a folder with one sub-folder of images per class, or 'digits'"
        )
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        if labelled:
            raise DmpoEdgeError(
                "dataset", f"data folder '{root}' has no class sub-folders. Expected one sub-folder of images per class"
            )
        files = [(p, -1) for p in list_images(root)]
    else:
        files = []
        for ci, c in enumerate(classes):
            imgs = list_images(os.path.join(root, c))
            if not imgs:
                raise DmpoEdgeError(
                    "dataset", f"class folder '{os.path.join(root, c)}' has no images. Expected files ending in {', '.join(IMAGE_EXTENSIONS)}"
                )
            files += [(p, ci) for p in imgs]
    if not files:
        raise DmpoEdgeError("dataset", f"data folder '{root}' is empty. Expected image files ({', '.join(IMAGE_EXTENSIONS)})")
    images, labels, skipped = [], [], []
    for path, label in files:
        try:
            images.append(load_image(path))
            labels.append(label)
        except DmpoEdgeError as exc:
            skipped.append((path, exc.message))
    if skipped:
        warnings.warn(f"dataset | skipped {len(skipped)} unreadable image(s) in '{root}', first: {skipped[0][0]}", stacklevel=2)
    if not images:
        raise DmpoEdgeError("dataset", f"none of the {len(files)} images in '{root}' could be decoded")
    lab = np.asarray(labels, np.int64) if classes else None
    return Dataset(images, lab, classes, os.path.abspath(root), skipped)


def load_dataset(spec: str, labelled: bool = True) -> Dataset:
    """Load a dataset spec (see the module doc); a folder without class sub-folders is unlabelled if ``labelled=False``."""
    if spec is None or str(spec).strip() == "":
        raise DmpoEdgeError("dataset", "no data given. Expected a folder path, 'digits', 'fashion-mnist' or "
                            "'idx:DIR', optionally with ':train|val|test'")
    spec = str(spec)
    if is_named_dataset(spec):
        name, split = named_split(spec)
        if split is not None and split not in SPLITS:
            raise DmpoEdgeError("dataset", f"unknown split '{split}' in '{spec}'. Expected one of {', '.join(SPLITS)}")
        if name == "digits":
            return _digits(split)
        from .idx_sets import load_fashion_mnist, load_idx_folder

        if name == "fashion-mnist":
            return load_fashion_mnist(split)
        return load_idx_folder(name[len("idx:"):], split)
    return _folder(spec, labelled)


def is_named_dataset(spec) -> bool:
    """True for ``digits``/``fashion-mnist``/``idx:DIR`` specs (with or without a split); an existing folder
    of that exact name wins, so a user's folder called ``digits`` still loads as a folder."""
    spec = str(spec)
    if os.path.exists(spec):
        return False
    return spec.startswith("idx:") or named_split(spec)[0] in ("digits", "fashion-mnist")


def named_split(spec) -> tuple:
    """``(name, split or None)`` of a spec: ``fashion-mnist:val`` -> (``fashion-mnist``, ``val``),
    ``idx:/data/kmnist:test`` -> (``idx:/data/kmnist``, ``test``), ``digits`` -> (``digits``, None)."""
    spec = str(spec)
    head, sep, tail = spec.rpartition(":")
    if sep and tail in SPLITS and head not in ("", "idx"):
        return head, tail
    if sep and head in ("digits", "fashion-mnist"):
        return head, tail  # an unknown split: load_dataset says which ones exist
    return spec, None


def write_image_folder(ds: Dataset, root: str) -> str:
    """Write a labelled dataset as ``root/<class>/<index>.png`` (so folder-based commands can be tried on digits)."""
    Image = require("PIL.Image", "writing images")
    for i, (img, label) in enumerate(zip(ds.images, ds.labels)):
        d = os.path.join(root, ds.classes[int(label)])
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img).save(os.path.join(d, f"{i:05d}.png"))
    return root
