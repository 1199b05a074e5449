"""Manifest checks beyond the schema: the records that must agree with each other, and ``data_files``.

Split from :mod:`dmpo_edge.bundle` (which reads, verifies and writes bundles) because these are about what a
manifest *says*: a class list shorter than the logits would index past it at run time, a preprocessing size
other than the graph's input fails (or costs gigabytes) on the first frame, and every external-data file a
graph loads needs a checksum like the graph itself.
"""

from __future__ import annotations

from .errors import DmpoEdgeError
from .preprocess import Preprocess

__all__ = ["check_agreement", "check_data_files"]


def check_data_files(entry: dict, where: str) -> None:
    """``data_files``: the external-data files a graph loads, each with its sha256 like the graph itself."""
    files = entry.get("data_files")
    if files is None:
        return
    if not isinstance(files, list) or len(files) > 4096:
        raise DmpoEdgeError(where, "data_files must be a list of {file, sha256} objects")
    for d in files:
        if not isinstance(d, dict) or not isinstance(d.get("file"), str) or not isinstance(d.get("sha256"), str):
            raise DmpoEdgeError(where, f"data_files entry {d!r} must be an object with 'file' and 'sha256' strings")
        if len(d["sha256"]) != 64 or any(c not in "0123456789abcdef" for c in d["sha256"]):
            raise DmpoEdgeError(where, f"data file {d['file']!r}: sha256 is not a 64-digit hex string")


def check_agreement(m: dict) -> None:
    """What the manifest says in two places must agree: a class list shorter than the logits would index past it
    at run time, and a preprocessing size other than the graph's input fails (or costs gigabytes) on frame one."""
    classes = m["model"]["classes"]
    declared = m["model"].get("num_classes")
    if declared is not None and (isinstance(declared, bool) or declared != len(classes)):
        raise DmpoEdgeError("manifest", f"model.num_classes is {declared!r} but model.classes lists {len(classes)} names. "
                            "The manifest was edited or damaged; recompile the bundle")
    for k, st in enumerate(m["stages"]):
        for t in st["outputs"]:
            if t["name"] == "logits":
                c = t["shape"][-1] if t["shape"] and isinstance(t["shape"][-1], int) else None
                if c is not None and c != len(classes):
                    raise DmpoEdgeError(f"manifest stage {k}", f"logits have {c} classes but model.classes lists "
                                        f"{len(classes)} names. Recompile the bundle (or fix the class list)")
    size = list(Preprocess.from_dict(m["preprocess"]).size)
    for t in m["stages"][0]["inputs"]:
        if t["name"] == "input" and len(t["shape"]) == 4:
            hw = t["shape"][2:]
            if all(isinstance(d, int) for d in hw) and list(hw) != size:
                raise DmpoEdgeError("manifest stage 0", f"input is {hw[0]} x {hw[1]} but preprocess.size is "
                                    f"{size[0]} x {size[1]}. Recompile the bundle (or fix preprocess)")
            if isinstance(t["shape"][1], int) and t["shape"][1] != 3:
                raise DmpoEdgeError("manifest stage 0", f"input has {t['shape'][1]} channels; preprocessing makes 3")
