"""Labelled image sets: an image folder (one sub-folder per class) or the bundled ``digits`` set.

A dataset spec is a folder path, ``digits`` (all 1,797 images) or ``digits:<split>`` with split one of
``train``, ``val``, ``test`` (a fixed, stratified 60/20/20 split, the same in every command, so that
a model tuned on ``digits:train`` is calibrated on ``digits:val`` and evaluated on ``digits:test``).
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
    "write_image_folder",
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
    """Load ``digits``, ``digits:<split>`` or an image folder (class sub-folders; unlabelled if ``labelled=False``)."""
    if spec is None or str(spec).strip() == "":
        raise DmpoEdgeError("dataset", "no data given. Expected a folder path, 'digits' or 'digits:train|val|test'")
    spec = str(spec)
    if spec == "digits" or spec.startswith("digits:"):
        if not os.path.exists(spec):
            return _digits(spec.split(":", 1)[1] if ":" in spec else None)
    return _folder(spec, labelled)


def write_image_folder(ds: Dataset, root: str) -> str:
    """Write a labelled dataset as ``root/<class>/<index>.png`` (so folder-based commands can be tried on digits)."""
    Image = require("PIL.Image", "writing images")
    for i, (img, label) in enumerate(zip(ds.images, ds.labels)):
        d = os.path.join(root, ds.classes[int(label)])
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img).save(os.path.join(d, f"{i:05d}.png"))
    return root
