"""Exit policies: how a stage turns its logits into the exit score ``confidence`` (higher = surer).

The stage graphs compute the score in-graph (the torch twin of each policy lives in
``dmpo_edge.compile``); these numpy versions are the reference and are used on host-side logits.
A sample leaves at stage k when ``confidence >= threshold[k]``.
"""

from __future__ import annotations

import numpy as np

from .errors import DmpoEdgeError

__all__ = ["POLICIES", "get_policy", "softmax", "DEFAULT_POLICY"]

DEFAULT_POLICY = "max_softmax"


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
