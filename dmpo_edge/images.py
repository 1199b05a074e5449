"""Image files: which names count as images, listing a folder, decoding one file to RGB uint8.

Shared by the calibration sets (``dmpo_edge.calib.datasets``) and the runtime's folder source
(``dmpo_edge.runtime.sources``) so that both decode the same bytes to the same pixels: the runtime
then sees what the thresholds were calibrated on. numpy-only at import; Pillow is loaded on first decode.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np

from ._lazy import require
from .errors import DmpoEdgeError
from .preprocess import to_rgb_uint8

__all__ = ["IMAGE_EXTENSIONS", "list_images", "load_image", "read_regular_file", "MAX_FILE_BYTES", "MAX_PIXELS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


#: per-file limits checked before decoding (``load_image(..., max_bytes=, max_pixels=)``, CLI ``--max-file-mb`` /
#: ``--max-megapixels``): a 140 KB PNG can declare 12000 x 12000 pixels, and a FIFO named like an image never ends
MAX_FILE_BYTES = 256 << 20
MAX_PIXELS = 50_000_000


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file, at most ``max_bytes``: a FIFO, device or socket is refused without blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DmpoEdgeError(f"image {path}", f"cannot open ({exc.strerror}). Expected a readable image file") from None
    try:
        st = os.fstat(fd)  # of what was opened, so a file swapped for a FIFO after a check is still caught
        if not stat.S_ISREG(st.st_mode):
            raise DmpoEdgeError(f"image {path}", "is not a regular file (a FIFO, device or socket). Expected an image file")
        if st.st_size > max_bytes:
            raise DmpoEdgeError(f"image {path}", f"is {st.st_size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB "
                                "limit per file. Raise it (--max-file-mb) if the file is genuine")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = None
            data = f.read(max_bytes + 1)
    finally:
        if fd is not None:
            os.close(fd)
    if len(data) > max_bytes:  # grew while being read
        raise DmpoEdgeError(f"image {path}", f"is over the {max_bytes / 2**20:.0f} MiB limit per file")
    return data


def load_image(path: str, max_bytes: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode one file to H x W x 3 uint8 (grey, palette and alpha images are converted).

    Only regular files are opened; the file size and the pixel count the header declares are checked against
    the limits before any pixel is decoded. 16-bit and floating-point images are scaled to 8 bits (not clipped).
    """
    Image = require("PIL.Image", "decoding images")
    max_bytes = MAX_FILE_BYTES if max_bytes is None else int(max_bytes)
    max_pixels = MAX_PIXELS if max_pixels is None else int(max_pixels)
    data = read_regular_file(path, max_bytes)
    try:
        with warnings.catch_warnings():
            # Pillow's DecompressionBombWarning: the limit below is the one that counts (Pillow's own hard
            # cap, DecompressionBombError at twice its 89 MP warning level, still applies above it)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise DmpoEdgeError(f"image {path}", f"declares {w} x {h} = {w * h / 1e6:.0f} megapixels, over the "
                                        f"{max_pixels / 1e6:.0f} MP limit. Raise it (--max-megapixels) if the image is genuine")
                im.load()
                arr = _to_array(im)
    except DmpoEdgeError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files; all mean "unreadable"
        raise DmpoEdgeError(f"image {path}", f"cannot decode ({type(exc).__name__}: {exc}). Expected a readable image file") from None
    return to_rgb_uint8(arr, where=f"image {path}")


def _to_array(im) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grey: Pillow's convert("RGB") clips at 255 (a 16-bit image turns white); scale instead
        a = np.asarray(im)
        if im.mode == "F":
            return a.astype(np.float32)  # to_rgb_uint8 reads floats <= 1 as [0, 1], else clips
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            return (np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return a.astype(np.uint8)
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    return np.asarray(im)


def list_images(folder: str) -> list:
    """Image files directly in ``folder`` (not its sub-folders), sorted by path."""
    return sorted(
        os.path.join(folder, f) for f in os.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f))
    )
