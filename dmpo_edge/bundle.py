"""The bundle: a directory that fully describes a deployment (see docs/architecture.md, "The bundle").

``manifest.json`` is validated against :data:`SCHEMA` before anything is loaded, every file it
names must stay inside the bundle and match its sha256, and every write goes through a temporary
path plus ``os.replace`` so that a killed compile, build or calibrate never leaves a half-written
bundle in place of a good one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile

from .errors import DmpoEdgeError
from .locking import swap_lock
from .manifest_checks import check_agreement, check_data_files
from .onnx_refs import external_data_files
from .preprocess import Preprocess

__all__ = [
    "SCHEMA_VERSION", "REGROUP_KEEP_IDX", "Bundle", "validate_manifest", "sha256_file", "write_json_atomic",
    "atomic_directory", "replace_directory", "safe_join", "remove_dead_temp_files", "shared_file_mode",
]

SCHEMA_VERSION = 1
FORMAT = "dmpo-edge-bundle"
# How survivors reach the next stage: stage k>0 takes the previous stage's full ``features`` plus a
# ``keep_idx`` (int32, survivors' rows) and gathers inside the graph, so features stay on the device.
REGROUP_KEEP_IDX = "keep_idx_gather"
PRECISIONS = ("fp32", "fp16", "int8")
DTYPES = ("float32", "float16", "int32", "int64", "int8", "uint8", "bool")

# A small structural schema, checked by hand so the runtime needs no jsonschema: key -> type(s).
SCHEMA = {
    "format": str,
    "schema_version": int,
    "model": dict,
    "preprocess": dict,
    "precision": dict,
    "regroup": str,
    "max_batch": int,
    "exit_policy": str,
    "stages": list,
}
STAGE_SCHEMA = {"index": int, "file": str, "sha256": str, "inputs": list, "outputs": list, "flops": (int, float),
                "cumulative_flops": (int, float)}
TENSOR_SCHEMA = {"name": str, "shape": list, "dtype": str}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_join(root: str, name: str, where: str = "bundle") -> str:
    """``root/name`` refusing absolute names, '..' and links that lead outside ``root``."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name or "\x00" in name:
        raise DmpoEdgeError(where, f"file name {name!r} in the manifest is not a relative path inside the bundle")
    root_real = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root_real, name))
    if os.path.commonpath([root_real, full]) != root_real:
        raise DmpoEdgeError(where, f"file name {name!r} in the manifest escapes the bundle folder. Refusing to load it")
    return full


def _check_keys(obj, schema: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise DmpoEdgeError(where, f"expected an object, found {type(obj).__name__}")
    for key, typ in schema.items():
        if key not in obj:
            raise DmpoEdgeError(where, f"missing key '{key}'. The manifest is incomplete; recompile the bundle")
        val = obj[key]
        if isinstance(val, bool) and typ in (int, (int, float)):
            raise DmpoEdgeError(where, f"key '{key}' must be {typ}, found a boolean")
        if not isinstance(val, typ):
            raise DmpoEdgeError(where, f"key '{key}' must be {getattr(typ, '__name__', typ)}, found {type(val).__name__}")


def _number(v, what: str, where: str, allow_inf: bool = False) -> float:
    """A JSON number as a float: refuses booleans, NaN, ints too large for a float and (unless allowed) infinities."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DmpoEdgeError(where, f"{what} {v!r} is not a number")
    try:
        f = float(v)
    except OverflowError:
        raise DmpoEdgeError(where, f"{what} is out of range (an integer of {v.bit_length()} bits)") from None
    if math.isnan(f) or (math.isinf(f) and not allow_inf):
        raise DmpoEdgeError(where, f"{what} {v!r} is not a finite number")
    return f


def validate_manifest(m) -> dict:
    """Raise :class:`DmpoEdgeError` unless ``m`` is a manifest this version can run; return it."""
    try:
        return _validate_manifest(m)
    except DmpoEdgeError:
        raise
    except Exception as exc:  # a manifest is untrusted input: any shape the checks did not foresee is still just invalid
        raise DmpoEdgeError("manifest", f"is malformed ({type(exc).__name__}: {exc}). Recompile the bundle or copy it again") from None


def _validate_manifest(m) -> dict:
    where = "manifest"
    _check_keys(m, SCHEMA, where)
    if m["format"] != FORMAT:
        raise DmpoEdgeError(where, f"format is {m['format']!r}, expected {FORMAT!r}")
    if m["schema_version"] > SCHEMA_VERSION or m["schema_version"] < 1:
        raise DmpoEdgeError(
            where, f"schema version {m['schema_version']} is not supported by this dmpo-edge (reads 1..{SCHEMA_VERSION}). "
            "Upgrade dmpo-edge or recompile the bundle"
        )
    if m["regroup"] != REGROUP_KEEP_IDX:
        raise DmpoEdgeError(where, f"regroup method {m['regroup']!r} is unknown, expected {REGROUP_KEEP_IDX!r}")
    if not (1 <= m["max_batch"] <= 1 << 16):
        raise DmpoEdgeError(where, f"max_batch {m['max_batch']} is out of range 1..65536")
    prec = m["precision"].get("mode")
    if prec not in PRECISIONS:
        raise DmpoEdgeError(where, f"precision mode {prec!r} is unknown, expected one of {PRECISIONS}")
    classes = m["model"].get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DmpoEdgeError(where, "model.classes must be a non-empty list of class names")
    Preprocess.from_dict(m["preprocess"])
    stages = m["stages"]
    if not stages or len(stages) > 64:
        raise DmpoEdgeError(where, f"a bundle needs 1..64 stages, found {len(stages)}")
    for k, st in enumerate(stages):
        sw = f"manifest stage {k}"
        _check_keys(st, STAGE_SCHEMA, sw)
        if st["index"] != k:
            raise DmpoEdgeError(sw, f"index is {st['index']}, expected {k} (stages must be listed in order)")
        if len(st["sha256"]) != 64 or any(c not in "0123456789abcdef" for c in st["sha256"]):
            raise DmpoEdgeError(sw, "sha256 is not a 64-digit hex string")
        for t in st["inputs"] + st["outputs"]:
            _check_keys(t, TENSOR_SCHEMA, sw + " tensor")
            if t["dtype"] not in DTYPES:
                raise DmpoEdgeError(sw, f"tensor {t['name']!r} has unknown dtype {t['dtype']!r}")
            if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in t["shape"]):
                raise DmpoEdgeError(sw, f"tensor {t['name']!r} has a malformed shape {t['shape']!r}")
        if _number(st["flops"], "flops", sw) < 0 or _number(st["cumulative_flops"], "cumulative_flops", sw) < 0:
            raise DmpoEdgeError(sw, "flops must not be negative")
        outs = {t["name"] for t in st["outputs"]}
        need = {"logits", "confidence", "prediction"} | ({"features"} if k < len(stages) - 1 else set())
        if not need <= outs:
            raise DmpoEdgeError(sw, f"outputs {sorted(outs)} lack {sorted(need - outs)} (the stage contract)")
        variants = st.get("variants") or {}
        if not isinstance(variants, dict):
            raise DmpoEdgeError(sw, f"variants must be an object (name -> file, sha256), found {type(variants).__name__}")
        for var in variants.values():
            _check_keys(var, {"file": str, "sha256": str}, sw + " variant")
        for entry in [st] + list(variants.values()):
            check_data_files(entry, sw)
    check_agreement(m)
    th = m.get("thresholds")
    if th is not None:
        vals = th.get("values") if isinstance(th, dict) else None
        if not isinstance(vals, list) or len(vals) != len(stages) - 1:
            raise DmpoEdgeError(where, f"thresholds.values must list {len(stages) - 1} numbers (one per early exit)")
        for v in vals:  # inf is allowed: "never exit here"
            _number(v, "threshold", where, allow_inf=True)
    return m


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def shared_file_mode(path: str) -> int:
    """The mode for a file about to replace ``path``: mkstemp makes 0600 files, but a service user on the device
    must still read what another user compiled or calibrated: keep the replaced file's mode, else umask's."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def write_json_atomic(path: str, obj) -> None:
    """Write JSON next to ``path`` and rename it into place (a reader sees the old or the new file, never half)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fchmod(f.fileno(), shared_file_mode(path))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _remove_dead_temps(parent: str, base: str) -> None:
    """Temp folders of killed runs (``.<base>.tmp-<pid>-*`` whose process is gone) would pile up on a device."""
    for p in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.tmp-*")):
        pid = os.path.basename(p)[len(base) + 6:].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def remove_dead_temp_files(folder: str) -> None:
    """Temp files of killed writers (``.tmp-<pid>-*`` whose process is gone) in ``folder``."""
    for p in glob.glob(os.path.join(glob.escape(folder), ".tmp-*")):
        pid = os.path.basename(p)[5:].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and os.path.isfile(p):
            with contextlib.suppress(OSError):
                os.unlink(p)


def _fsync_tree(root: str) -> None:
    """Flush every file and folder under ``root``: after a power cut the renamed bundle has its bytes, not zeros."""
    for d, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(d, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        with contextlib.suppress(OSError):
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: str, force: bool = False, where: str = "bundle"):
    """Yield a temporary directory beside ``final``; on success it replaces ``final`` in one rename.

    An existing ``final`` is refused unless ``force``; with ``force`` the new directory is swapped in only
    once complete (see :func:`replace_directory`), so an interrupted run leaves the old bundle usable.
    """
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    if os.path.exists(final) and not force:
        raise DmpoEdgeError(where, f"output '{final}' already exists. Pass --force to replace it or choose another -o")
    if os.path.exists(final) and not os.path.isdir(final):
        raise DmpoEdgeError(where, f"output '{final}' exists and is not a directory")
    os.makedirs(parent, exist_ok=True)
    _remove_dead_temps(parent, os.path.basename(final))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-{os.getpid()}-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; a bundle is meant to be shared
        yield tmp
        _fsync_tree(tmp)
        with swap_lock(final, shared=False, where=where):  # readers loading the old bundle finish first
            replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28 or another libc
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):  # e.g. vfat, old kernels
        return False
    raise OSError(err, os.strerror(err), b)


def replace_directory(new: str, final: str) -> None:
    """Put the complete directory ``new`` at ``final``, replacing what is there.

    Where the filesystem can swap two directories atomically, ``final`` is at every instant either the old
    or the new directory, so a process killed at any point leaves a usable one. Elsewhere the old directory
    is renamed aside first (``.<name>.old-*``); a kill between the two renames leaves it there, and
    :meth:`Bundle.load` says where.
    """
    if os.path.isdir(final) and _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old directory
        return
    old = None
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
        os.rmdir(old)
        os.replace(final, old)
    os.replace(new, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


class Bundle:
    """A loaded, verified bundle. ``Bundle.load(path)`` checks schema, paths and checksums first."""

    def __init__(self, path: str, manifest: dict):
        self.path = os.path.abspath(path)
        self.manifest = manifest

    @classmethod
    def load(cls, path: str, verify: bool = True) -> "Bundle":
        """Read, validate and (``verify``) checksum a bundle, all under the bundle's shared swap lock: a
        concurrent ``compile --force`` or ``calibrate`` swaps in its files before or after, never during."""
        if not os.path.isdir(path):
            return cls._load(path, verify)
        with swap_lock(path, shared=True, where=f"bundle {path}"):
            return cls._load(path, verify)

    @classmethod
    def _load(cls, path: str, verify: bool) -> "Bundle":
        where = f"bundle {path}"
        mpath = os.path.join(path, "manifest.json")
        if not os.path.isdir(path):
            aside = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(os.path.abspath(path))}.old-*")))
            if aside:  # a replacement was interrupted between its two renames (filesystems without an atomic swap)
                raise DmpoEdgeError(where, f"is missing, but the previous bundle is intact at '{aside[-1]}' (an interrupted "
                                    f"replace). Rename it back to '{path}'")
            raise DmpoEdgeError(where, "is not a directory. Expected a bundle written by 'dmpo-edge compile'")
        if not os.path.isfile(mpath):
            raise DmpoEdgeError(where, "has no manifest.json. Expected a bundle written by 'dmpo-edge compile'")
        try:
            with open(mpath, "rb") as f:
                raw = f.read(16 << 20)
            manifest = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # ValueError covers JSONDecodeError, bad UTF-8 and 5000-digit ints
            raise DmpoEdgeError(where, f"manifest.json is not valid JSON ({exc}). The bundle is damaged; recompile or copy it again") from None
        try:
            validate_manifest(manifest)
        except DmpoEdgeError as exc:
            raise DmpoEdgeError(where, f"{exc.where}: {exc.message}") from None
        b = cls(path, manifest)
        if verify:
            b.verify()
        return b

    def verify(self) -> None:
        """Every file a stage loads - its graph, the graph's external-data files, its variants - exists inside the
        bundle, is listed in the manifest and matches its sha256."""
        where = f"bundle {self.path}"
        for st in self.stages:
            for entry in [st] + list((st.get("variants") or {}).values()):
                graph = self._check_file(entry["file"], entry["sha256"], "stage file")
                listed = {}
                for d in entry.get("data_files") or []:
                    listed[os.path.normpath(d["file"])] = self._check_file(d["file"], d["sha256"], "external-data file")
                base = os.path.dirname(entry["file"])
                for loc in sorted(external_data_files(graph)):
                    name = os.path.normpath(os.path.join(base, loc))
                    safe_join(self.path, name, where)  # a graph may not read outside the bundle either
                    if name not in listed:
                        raise DmpoEdgeError(where, f"stage file '{entry['file']}' loads weights from '{loc}', which the "
                                            "manifest does not list (so no checksum covers it). Recompile the bundle")

    def _check_file(self, name: str, digest: str, what: str) -> str:
        p = safe_join(self.path, name, f"bundle {self.path}")
        if not os.path.isfile(p):
            raise DmpoEdgeError(f"bundle {self.path}", f"{what} '{name}' is missing. Copy the whole bundle folder again")
        if sha256_file(p) != digest:
            raise DmpoEdgeError(
                f"bundle {self.path}",
                f"{what} '{name}' fails its sha256 check (damaged or edited). Copy the bundle again or recompile",
            )
        return p

    # --- accessors -------------------------------------------------------------------------
    @property
    def stages(self) -> list:
        return self.manifest["stages"]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def classes(self) -> list:
        return self.manifest["model"]["classes"]

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.manifest["preprocess"])

    @property
    def precision(self) -> str:
        return self.manifest["precision"]["mode"]

    @property
    def max_batch(self) -> int:
        return self.manifest["max_batch"]

    @property
    def thresholds(self):
        th = self.manifest.get("thresholds")
        return None if th is None else [float(v) for v in th["values"]]

    @property
    def cumulative_flops(self) -> list:
        return [float(s["cumulative_flops"]) for s in self.stages]

    def stage_path(self, k: int, variant: str | None = None) -> str:
        st = self.stages[k]
        name = st["file"]
        if variant and variant in (st.get("variants") or {}):
            name = st["variants"][variant]["file"]
        return safe_join(self.path, name, f"bundle {self.path}")

    def update_manifest(self, changes: dict, before_write=None) -> None:
        """Merge top-level ``changes`` into the manifest and write it atomically (calibrate uses this).

        Under the swap lock, the bundle on disk is first checked to still be the one this object describes
        (same stage files, same checksums); another writer that replaced it meanwhile - a ``compile --force``, a
        copy - is reported instead of having this stale manifest written over its files. ``before_write()``
        runs after that check, still under the lock (calibrate writes its reports there).
        """
        m = dict(self.manifest)
        m.update(changes)
        validate_manifest(m)
        with swap_lock(self.path, shared=False, where=f"bundle {self.path}"):
            self.check_unchanged()
            if before_write is not None:
                before_write()
            write_json_atomic(os.path.join(self.path, "manifest.json"), m)
        self.manifest = m

    def check_unchanged(self) -> None:
        """The bundle on disk still has the stage files this object was loaded with, each matching its sha256."""
        try:
            on_disk = Bundle._load(self.path, verify=False)
        except DmpoEdgeError as exc:
            raise DmpoEdgeError(f"bundle {self.path}", f"changed while this command ran ({exc.message}). Nothing was "
                                "written; run the command again") from None
        if _graph_entries(on_disk.manifest) != _graph_entries(self.manifest):
            raise DmpoEdgeError(f"bundle {self.path}", "was replaced by another writer (a compile, a copy) while this "
                                "command ran. Nothing was written; run the command again on the new bundle")
        self.verify()


def _graph_entries(m: dict) -> list:
    """What identifies a bundle's graphs: every stage's files and checksums (thresholds and reports may differ)."""
    return [json.dumps({k: st.get(k) for k in ("file", "sha256", "variants", "data_files", "inputs", "outputs")},
                       sort_keys=True) for st in m["stages"]]
