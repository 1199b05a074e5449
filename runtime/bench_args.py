"""Argument lists of ``dmpo-edge bench`` and ``run``: batch sizes, numbers, thresholds, with clear errors."""

from __future__ import annotations

import math

from ..errors import DmpoEdgeError

__all__ = ["WHERE", "parse_batch_list", "parse_float_list", "parse_thresholds"]

WHERE = "bench"


def parse_batch_list(text, max_batch: int | None = None) -> list:
    """``"1,8,32"`` -> ``[1, 8, 32]``; positive, distinct, at most the bundle's ``max_batch``."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise DmpoEdgeError(WHERE, f"--batch {text!r} is malformed. Expected comma-separated positive integers, e.g. 1,8,32")
    out = []
    for t in items:
        try:
            b = int(t)
        except ValueError:
            raise DmpoEdgeError(WHERE, f"--batch entry {t!r} is not an integer. Expected e.g. 1,8,32") from None
        if b < 1:
            raise DmpoEdgeError(WHERE, f"--batch entry {b} must be at least 1")
        if b in out:
            raise DmpoEdgeError(WHERE, f"--batch lists {b} twice")
        out.append(b)
    if max_batch is not None:
        over = [b for b in out if b > max_batch]
        if over:
            raise DmpoEdgeError(
                WHERE, f"batch size(s) {over} exceed the bundle's max batch {max_batch}. Use --batch up to {max_batch} "
                "or recompile with a larger --max-batch")
    return out


def parse_float_list(text, what: str, where: str = WHERE) -> list:
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise DmpoEdgeError(where, f"{what} {text!r} is malformed. Expected comma-separated numbers")
    out = []
    for t in items:
        try:
            v = float(t)
        except ValueError:
            raise DmpoEdgeError(where, f"{what} entry {t!r} is not a number") from None
        if not math.isfinite(v):
            raise DmpoEdgeError(where, f"{what} entry {t!r} is not finite")
        out.append(v)
    return out


def parse_thresholds(text, num_stages: int) -> list:
    """``"0.9,0.8"`` -> K-1 floats (one per early exit; the last exit takes everyone)."""
    vals = parse_float_list(text, "--thresholds")
    if len(vals) != num_stages - 1:
        raise DmpoEdgeError(
            WHERE, f"--thresholds has {len(vals)} value(s) but the bundle has {num_stages} stages. "
            f"Expected {num_stages - 1} (one per early exit; the last exit takes everyone)")
    return vals
