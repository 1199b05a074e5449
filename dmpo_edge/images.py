"""Image files: which names count as images, listing a folder, decoding one file to RGB uint8.

Shared by the calibration sets (``dmpo_edge.calib.datasets``) and the runtime's folder source
(``dmpo_edge.runtime.sources``) so that both decode the same bytes to the same pixels: the runtime
then sees what the thresholds were calibrated on. numpy-only at import; Pillow is loaded on first decode.
"""

from __future__ import annotations

import os

import numpy as np

from ._lazy import require
from .errors import DmpoEdgeError
from .preprocess import to_rgb_uint8

__all__ = ["IMAGE_EXTENSIONS", "list_images", "load_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def load_image(path: str) -> np.ndarray:
    """Decode one file to H x W x 3 uint8 (grey, palette and alpha images are converted)."""
    Image = require("PIL.Image", "decoding images")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except Exception as exc:  # PIL raises many types for corrupt files; all mean "unreadable"
        raise DmpoEdgeError(f"image {path}", f"cannot decode ({type(exc).__name__}: {exc}). Expected a readable image file") from None
    return to_rgb_uint8(arr, where=f"image {path}")


def list_images(folder: str) -> list:
    """Image files directly in ``folder`` (not its sub-folders), sorted by path."""
    return sorted(
        os.path.join(folder, f) for f in os.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f))
    )
