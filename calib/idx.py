"""IDX files (the MNIST family's format: MNIST, Fashion-MNIST, KMNIST, EMNIST), gzipped or not.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the values in C order. Image files are ``uint8 [N, H, W]`` (magic 0x00000803),
label files ``uint8 [N]`` (0x00000801). Everything that can be wrong with a downloaded or hand-made file
(truncation, a wrong magic, image and label counts that disagree, labels outside the classes) is reported
as one :class:`DmpoEdgeError` that names the file, never as a numpy reshape traceback.

A folder of IDX files is read as pairs ``<prefix>-images-idx3-ubyte[.gz]`` + ``<prefix>-labels-idx1-ubyte[.gz]``
(``.`` or ``_`` accepted in place of ``-``); prefix ``train`` is the training file, ``t10k`` or ``test`` the test file.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import struct
import zlib

import numpy as np

from ..errors import DmpoEdgeError

__all__ = ["read_idx", "read_idx_pair", "find_idx_pairs", "write_idx", "TRAIN_PREFIXES", "TEST_PREFIXES"]

TRAIN_PREFIXES = ("train",)
TEST_PREFIXES = ("t10k", "test")

# type code -> numpy big-endian dtype (the IDX specification's table)
_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IMAGES_RE = re.compile(r"^(?P<prefix>.+?)[-_.]images[-_.]idx3[-_.]ubyte(?P<gz>\.gz)?$")


def _raw_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DmpoEdgeError("IDX file", f"cannot read '{path}': {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DmpoEdgeError(
                "IDX file", f"'{path}' is a damaged gzip file ({exc}). Download or reinstall it again"
            ) from None
    return raw


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    raw = _raw_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES or raw[3] == 0:
        raise DmpoEdgeError(
            "IDX file", f"'{path}' does not start with an IDX magic number (got {raw[:4].hex() or 'an empty file'}). "
            "Expected an MNIST-style IDX file such as train-images-idx3-ubyte(.gz)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DmpoEdgeError("IDX file", f"'{path}' is truncated inside its header. Download or reinstall it again")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_TYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have != expected:
        what = "truncated" if have < expected else "longer than its header says"
        raise DmpoEdgeError(
            "IDX file", f"'{path}' is {what}: its header promises shape {tuple(shape)} ({expected} bytes of data), "
            f"the file holds {have}. Download or reinstall it again"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    arr = arr.astype(dtype.newbyteorder("="), copy=False)
    # Shared between callers through the cache: read-only, so that no caller can change another's data.
    arr.flags.writeable = False
    return arr


def read_idx(path: str) -> np.ndarray:
    """The array an IDX file holds (native byte order, read-only; decoded once per process and file version)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DmpoEdgeError("IDX file", f"cannot read '{path}': {exc.strerror or exc}") from None
    return _read_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size)


def read_idx_pair(images_path: str, labels_path: str, num_classes: int | None = None):
    """``(images uint8 [N, H, W], labels int64 [N])`` with every consistency check done."""
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DmpoEdgeError(
            "IDX file", f"'{images_path}' holds {images.dtype} data of shape {images.shape}. "
            "Expected uint8 images [count, height, width] (magic 0x00000803)"
        )
    labels = read_idx(labels_path)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DmpoEdgeError(
            "IDX file", f"'{labels_path}' holds {labels.dtype} data of shape {labels.shape}. "
            "Expected integer labels [count] (magic 0x00000801)"
        )
    if len(labels) != len(images):
        raise DmpoEdgeError(
            "IDX file", f"'{labels_path}' has {len(labels)} labels but '{images_path}' has {len(images)} images. "
            "Expected one label per image: the two files come from different sets or one is cut short"
        )
    if len(labels) == 0:
        raise DmpoEdgeError("IDX file", f"'{images_path}' holds no images")
    labels = labels.astype(np.int64)
    limit = num_classes if num_classes is not None else 256
    bad = np.flatnonzero((labels < 0) | (labels >= limit))
    if len(bad):
        raise DmpoEdgeError(
            "IDX file", f"'{labels_path}' has {len(bad)} label(s) outside the {limit} classes 0..{limit - 1} "
            f"(first: {int(labels[bad[0]])} at index {int(bad[0])}). Expected labels 0..{limit - 1}"
        )
    return images, labels


def find_idx_pairs(root: str) -> dict:
    """``{prefix: (images_path, labels_path)}`` for every complete pair in ``root``."""
    if not os.path.isdir(root):
        raise DmpoEdgeError("IDX data", f"folder '{root}' does not exist. Expected a folder of IDX files "
                            "such as train-images-idx3-ubyte.gz + train-labels-idx1-ubyte.gz")
    names = sorted(os.listdir(root))
    pairs, orphans = {}, []
    for name in names:
        m = _IMAGES_RE.match(name)
        if not m:
            continue
        prefix = m.group("prefix")
        stem = name[len(prefix):].replace("images", "labels", 1).replace("idx3", "idx1", 1)
        candidates = [prefix + stem, prefix + stem[:-3] if stem.endswith(".gz") else prefix + stem + ".gz"]
        found = [c for c in candidates if c in names]
        if found:
            pairs[prefix] = (os.path.join(root, name), os.path.join(root, found[0]))
        else:
            orphans.append((name, candidates[0]))
    if orphans and not pairs:
        name, want = orphans[0]
        raise DmpoEdgeError("IDX data", f"'{os.path.join(root, name)}' has no label file beside it. Expected '{want}'")
    if not pairs:
        raise DmpoEdgeError(
            "IDX data", f"folder '{root}' has no IDX image files. Expected pairs such as "
            "train-images-idx3-ubyte.gz + train-labels-idx1-ubyte.gz (gzipped or not)"
        )
    return pairs


def write_idx(path: str, array: np.ndarray, compress: bool | None = None) -> str:
    """Write ``array`` (uint8 images or labels) as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    array = np.ascontiguousarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _TYPES.items()}
    code = codes.get(array.dtype)
    if code is None:
        raise DmpoEdgeError("IDX file", f"cannot store {array.dtype} in IDX. Expected uint8, int8, int16, int32, float32 or float64")
    data = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.dtype(_TYPES[code]), copy=False).tobytes()
    if compress if compress is not None else path.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path
