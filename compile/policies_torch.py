"""Torch twins of the exit policies in :mod:`dmpo_edge.policies`: the exit score computed inside a stage graph.

Each twin maps logits (N x C, float) to ``confidence`` (N, float32, higher = surer) with the same formula as the
numpy reference, written with ops that export to ONNX and that TensorRT takes (Softmax, ReduceMax, TopK, Log).
"""

from __future__ import annotations

import math

from ..errors import DmpoEdgeError
from ..policies import POLICIES

__all__ = ["torch_policy", "POLICY_NAMES"]

POLICY_NAMES = tuple(POLICIES)


def _max_softmax(logits):
    return logits.float().softmax(dim=-1).amax(dim=-1)


def _entropy(logits):
    p = logits.float().softmax(dim=-1)
    h = -(p * p.clamp(1e-12, 1.0).log()).sum(dim=-1)
    return 1.0 - h / math.log(logits.shape[-1])


def _margin(logits):
    top2 = logits.float().softmax(dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


_TWINS = {"max_softmax": _max_softmax, "entropy": _entropy, "margin": _margin}


def torch_policy(name: str):
    """The torch exit-score function for policy ``name`` (same names as :func:`dmpo_edge.policies.get_policy`)."""
    if name not in _TWINS:
        raise DmpoEdgeError("exit policy", f"unknown policy '{name}'. Expected one of {', '.join(_TWINS)}")
    return _TWINS[name]
