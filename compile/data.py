"""The images compile works on: the calibration set (INT8 ranges, FP16 reference run) and the held-out set
(parity, per-exit accuracy), decoded by :mod:`dmpo_edge.calib.datasets` and preprocessed exactly as the runtime
will (:class:`dmpo_edge.preprocess.Preprocess`: grey and odd-sized images are converted there).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..calib.datasets import load_dataset
from ..errors import DmpoEdgeError

__all__ = ["CompileData", "load_compile_data", "MIN_CALIB_IMAGES", "default_holdout_spec"]

#: fewer images than this cannot give stable activation ranges (a handful of images under-covers the classes)
MIN_CALIB_IMAGES = 32
#: held-out images used for parity and the precision report (all of them up to this many)
MAX_HOLDOUT_IMAGES = 1000


@dataclass
class CompileData:
    calib_x: np.ndarray | None  # N x 3 x H x W float32
    calib_info: dict | None  # source, count, fingerprint
    holdout_x: np.ndarray | None
    holdout_y: np.ndarray | None  # int64 labels or None
    holdout_info: dict | None


def default_holdout_spec(calib: str | None) -> str | None:
    """Where held-out data comes from when none is given: the validation split of a named set (``digits``,
    ``fashion-mnist``, ``idx:DIR``); None for folders. Not the test split: compile *chooses* on this data (the
    fastest per-stage form within the accuracy budget), and choices are made on validation data, so that the test
    split stays an unbiased place to report them."""
    from ..calib.datasets import is_named_dataset, named_split

    if calib is not None and is_named_dataset(calib):
        return f"{named_split(calib)[0]}:val"
    return None


def _load_calib(spec: str, count: int, pre):
    if count < 1:
        raise DmpoEdgeError("calibration data", f"--calib-count {count} must be at least {MIN_CALIB_IMAGES}")
    ds = load_dataset(spec, labelled=False)
    found = len(ds)
    minimum = min(MIN_CALIB_IMAGES, count)
    if found < minimum:
        raise DmpoEdgeError(
            "calibration data",
            f"'{spec}' has {found} readable image(s); INT8 calibration needs at least {minimum} "
            f"(asked for {count}). Add images of the target data or point --calib at a larger folder",
        )
    if found < count:
        warnings.warn(
            f"calibration data | '{spec}' has {found} images, fewer than the {count} asked for; calibrating on all {found}",
            stacklevel=3,
        )
    picked = ds.take(count)
    return pre(picked.images), {"source": spec, "count": len(picked), "found": found,
                                "fingerprint": picked.fingerprint(), "skipped": len(ds.skipped)}, ds, picked


def load_compile_data(pre, classes: list, calib: str | None = None, calib_count: int = 256, holdout: str | None = None,
                      need_calib: bool = False, holdout_count: int = MAX_HOLDOUT_IMAGES) -> CompileData:
    """Load and preprocess the calibration and held-out sets (either may be absent unless ``need_calib``)."""
    calib_x = calib_info = None
    calib_ds = picked = None
    if calib is None and need_calib:
        raise DmpoEdgeError(
            "calibration data", "INT8 needs calibration images of the target data. Pass --calib DIR (images, "
            "optionally in class sub-folders) or --calib digits:train",
        )
    if calib is not None:
        calib_x, calib_info, calib_ds, picked = _load_calib(calib, calib_count, pre)
    hold_spec = holdout or default_holdout_spec(calib)
    hx = hy = hinfo = None
    if hold_spec is not None:
        ds = load_dataset(hold_spec, labelled=True)
        _check_classes(ds, classes, hold_spec)
        ds = ds.take(holdout_count, seed=1)
        hx, hy = pre(ds.images), ds.labels
        hinfo = {"source": hold_spec, "count": len(ds), "fingerprint": ds.fingerprint()}
    elif calib_ds is not None:
        # A folder given only as --calib: hold out the images calibration did not use, when it has labels.
        if calib_ds.labels is not None and len(calib_ds.labels) > 0:
            _check_classes(calib_ds, classes, calib)
            used = set(map(id, picked.images))
            rest = [i for i, im in enumerate(calib_ds.images) if id(im) not in used]
            if len(rest) >= MIN_CALIB_IMAGES:
                ds = calib_ds.subset(rest).take(holdout_count, seed=1)
                hinfo = {"source": f"{calib} (images not used for calibration)", "count": len(ds), "fingerprint": ds.fingerprint()}
            else:
                ds = picked
                hinfo = {"source": f"{calib} (the calibration images: no separate held-out set)", "count": len(ds),
                         "fingerprint": ds.fingerprint()}
                warnings.warn("held-out data | no --holdout given and no spare labelled images; the accuracy report "
                              "uses the calibration images", stacklevel=2)
            hx, hy = pre(ds.images), ds.labels
        else:
            hx = calib_x
            hinfo = {"source": f"{calib} (unlabelled: agreement only)", "count": len(calib_x),
                     "fingerprint": calib_info["fingerprint"]}
    return CompileData(calib_x, calib_info, hx, hy, hinfo)


def _check_classes(ds, classes: list, spec: str) -> None:
    if ds.labels is None:
        return
    if ds.classes and list(ds.classes) != list(classes):
        if len(ds.classes) != len(classes) or ds.labels.max(initial=0) >= len(classes):
            raise DmpoEdgeError(
                "held-out data", f"'{spec}' has classes {ds.classes[:5]}{'...' if len(ds.classes) > 5 else ''} but the model "
                f"knows {classes[:5]}{'...' if len(classes) > 5 else ''}. Expected the model's classes as sub-folder names",
            )
        warnings.warn(f"held-out data | class folder names of '{spec}' differ from the model's; matching them by sorted order",
                      stacklevel=3)
