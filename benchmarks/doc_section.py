"""Benchmark scripts write their tables into docs/*.md between their own markers; this is the one way they do it."""

from __future__ import annotations

import os


def replace_section(path: str, section: str, begin: str, end: str, *, new_file: str = "# Results\n",
                    heading: str = "") -> None:
    """Replace the text between ``begin`` and ``end`` in ``path`` with ``section`` (which carries the markers); where
    the markers are absent, append ``heading`` + ``section``. Written to a temporary file and renamed into place, so an
    interrupted run never leaves half a page."""
    text = open(path).read() if os.path.isfile(path) else new_file
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + heading + section.rstrip("\n") + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
