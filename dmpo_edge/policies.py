"""Exit policies: how a stage turns its logits into the exit score ``confidence`` (higher = surer).

The stage graphs compute the score in-graph (the torch twin of each policy lives in
``dmpo_edge.compile``); these numpy versions are the reference and are used on host-side logits.
A sample leaves at stage k when ``confidence >= threshold[k]``.
"""

from __future__ import annotations

import numpy as np

from .errors import DmpoEdgeError

__all__ = ["POLICIES", "get_policy", "softmax", "DEFAULT_POLICY", "NEVER_EXIT", "format_thresholds"]

DEFAULT_POLICY = "max_softmax"

# "Nobody exits here": MSDNet's reference uses 1e8; float32's largest value works for any exit-score scale and,
# unlike inf, survives JSON (the manifest is written with allow_nan=False). Its negative means "all who reach it exit".
NEVER_EXIT = float(np.finfo(np.float32).max)


def format_thresholds(values) -> str:
    """Thresholds for people: the sentinels read "never" (nobody leaves there) and "always" (all who reach it leave)."""

    def one(t):
        if t >= NEVER_EXIT:
            return "never"
        if t <= -NEVER_EXIT:
            return "always"
        return f"{t:.6g}"

    return ", ".join(one(float(t)) for t in values)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def max_softmax(logits: np.ndarray) -> np.ndarray:
    return softmax(logits).max(axis=-1).astype(np.float32)


def entropy(logits: np.ndarray) -> np.ndarray:
    """1 - H(p) / log(C): 1 for a one-hot prediction, 0 for a uniform one."""
    p = softmax(logits)
    h = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=-1)
    return (1.0 - h / np.log(logits.shape[-1])).astype(np.float32)


def margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 softmax probability."""
    p = np.sort(softmax(logits), axis=-1)
    return (p[..., -1] - p[..., -2]).astype(np.float32)


POLICIES = {"max_softmax": max_softmax, "entropy": entropy, "margin": margin}


def get_policy(name: str):
    try:
        return POLICIES[name]
    except KeyError:
        raise DmpoEdgeError("exit policy", f"unknown policy '{name}'. Expected one of {', '.join(POLICIES)}") from None
