"""Advisory locks that keep two writers of one bundle (or one model.pt) from corrupting each other.

Two lock files sit *beside* the output (a bundle folder is replaced by a rename, so a lock inside it would be
swapped away with it):

- ``.<name>.lock``: the **writer lock**, held exclusively by a command that writes the output for the whole
  time from reading it to its last write (``compile``, ``calibrate``, ``build``, ``tune``). A second writer
  is refused at once with the holder's pid and command, like ``apt`` and ``dpkg`` do: waiting silently behind
  a 10-minute compile is worse than a clear message.
- ``.<name>.swap``: the **swap lock**, held exclusively by a writer only around the moment it replaces files
  (the directory exchange, the manifest rename), and shared by readers while they load and verify a bundle and
  create sessions from it. A reader therefore sees the old bundle whole or the new one whole, never a manifest
  from one and a stage file from the other.

``fcntl.flock`` locks belong to an open file, are released by the kernel when the holder dies (a SIGKILLed
compile leaves no stale lock) and are advisory: tools that ignore them (``cp -r``, ``rsync``) are caught by
the writer's re-check before its swap instead. Where ``fcntl`` does not exist, or the folder is read-only for
a reader, the locks are skipped (nothing can be written there either).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
import time

from .errors import DmpoEdgeError

__all__ = ["writer_lock", "swap_lock", "lock_paths", "SWAP_TIMEOUT_S"]

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None

#: longest a writer waits for readers that are loading the bundle (or a reader for a swap) before giving up
SWAP_TIMEOUT_S = 600.0  # hashing a multi-GB bundle on an SD card takes minutes

_held = {}  # (kind, real path) -> [thread id, depth, fd]: a writer may call another writer (compile -> build)
_held_guard = threading.Lock()


def lock_paths(target: str) -> tuple:
    """(writer lock file, swap lock file) of a bundle folder or checkpoint file."""
    target = os.path.realpath(os.path.abspath(os.fspath(target)))  # one lock however the path is spelled
    parent, name = os.path.dirname(target), os.path.basename(target.rstrip(os.sep)) or "root"
    return os.path.join(parent, f".{name}.lock"), os.path.join(parent, f".{name}.swap")


def _open(path: str, create: bool):
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError:
        try:  # a reader in a read-only folder can still share-lock an existing file
            return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None


def _holder(fd) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return f" ({text})" if text else ""


def _enter_again(key) -> bool:
    """True when this thread already holds ``key``: the hold is counted once more (locks are per thread and
    re-entrant, so a command that loads what it is writing does not wait for itself)."""
    with _held_guard:
        rec = _held.get(key)
        if rec is not None and rec[0] == threading.get_ident():
            rec[1] += 1
            return True
    return False


@contextlib.contextmanager
def _holding(key, fd):
    """Record this thread as the holder of ``key`` (so that it can re-enter) for as long as the block runs."""
    with _held_guard:
        _held[key] = [threading.get_ident(), 1, fd]
    try:
        yield
    finally:
        with _held_guard:
            _held.pop(key, None)


@contextlib.contextmanager
def _held_again(key):
    try:
        yield
    finally:
        with _held_guard:
            _held[key][1] -= 1



@contextlib.contextmanager
def writer_lock(target: str, where: str, command: str | None = None, swaps: bool = True):
    """Hold the exclusive writer lock of ``target`` (a bundle folder or a checkpoint file); refuse if held.

    ``swaps=False`` for a single file replaced by one ``os.replace`` (model.pt): readers need no swap lock there,
    so no ``.swap`` file is made beside it."""
    if fcntl is None:
        yield
        return
    key = ("w", os.path.realpath(os.path.abspath(target)))
    if _enter_again(key):
        with _held_again(key):
            yield
        return
    path, swap = lock_paths(target)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if swaps:
            os.close(os.open(swap, os.O_WRONLY | os.O_CREAT, 0o666))
    except OSError:
        pass
    fd = _open(path, create=True)
    if fd is None:
        raise DmpoEdgeError(where, f"cannot create the lock file '{path}'. Expected a writable folder for the output")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise DmpoEdgeError(
                where, f"'{os.path.abspath(target)}' is being written by another command{_holder(fd)}. Wait for it to "
                "finish and run this again (two writers at once would leave a bundle that fails its checksums)",
            ) from None
        info = f"pid {os.getpid()}: dmpo-edge {command or ' '.join(sys.argv[1:2]) or 'api'}".encode()
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        try:
            with _holding(key, fd):
                yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def swap_lock(target: str, shared: bool, where: str = "bundle", timeout_s: float | None = None):
    """Writers (``shared=False``) around a replace; readers (``shared=True``) around load + session creation."""
    if fcntl is None:
        yield
        return
    key = ("s", os.path.realpath(os.path.abspath(target)))
    if _enter_again(key):  # nested (Bundle.load inside Pipeline.from_bundle, a writer re-reading)
        with _held_again(key):
            yield
        return
    path = lock_paths(target)[1]
    # Readers never create lock files (a bundle copied onto a device gets none until a writer runs there);
    # every writer creates the swap file when it takes its writer lock, before it can swap anything.
    fd = _open(path, create=not shared)
    if fd is None:
        yield
        return
    timeout = SWAP_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    what = "being replaced" if shared else "being loaded by another process"
                    raise DmpoEdgeError(where, f"'{os.path.abspath(target)}' has been {what} for over {timeout:.0f} s. "
                                        "Check for a hung dmpo-edge process and run this again") from None
                time.sleep(delay)
                delay = min(0.05, delay * 2)
        with _holding(key, fd):
            yield
    finally:
        os.close(fd)
