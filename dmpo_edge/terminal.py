"""Text from elsewhere (file names, class names from a manifest, library messages) made safe for a terminal.

A file name that is not UTF-8 arrives as lone surrogates and crashes a strict UTF-8 stdout
(``PYTHONIOENCODING=utf-8``); a class name with ANSI escapes or a newline rewrites the operator's screen or
splits one result over two lines. :func:`printable` shows such bytes as Python-style escapes instead.
"""

from __future__ import annotations

__all__ = ["printable"]

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text) -> str:
    """``text`` with undecodable bytes as ``\\xNN`` and control characters (C0, DEL, C1) escaped."""
    s = str(text)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in s):  # os.fsdecode's surrogateescape: the raw bytes, escaped
        s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in s):
        return s
    return "".join(_ESCAPES.get(c, f"\\x{ord(c):02x}") if (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F) else c for c in s)
