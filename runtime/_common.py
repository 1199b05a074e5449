"""Small helpers shared by the runtime modules (bundle resolution, stage tensor descriptions)."""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle
from ..errors import DmpoEdgeError

__all__ = ["as_bundle", "tensor_spec", "input_shape", "features_dtype", "FINAL_OUTPUTS", "stage_features_input"]

# What every stage returns besides ``features``: the three numbers the exit decision and the result need.
FINAL_OUTPUTS = ("logits", "confidence", "prediction")


def as_bundle(bundle_or_path, verify: bool = True) -> Bundle:
    """A :class:`Bundle` from a path or an already loaded bundle (loading verifies checksums)."""
    if isinstance(bundle_or_path, Bundle):
        return bundle_or_path
    if bundle_or_path is None:
        raise DmpoEdgeError("runtime", "no bundle given. Pass the folder written by 'dmpo-edge compile'")
    return Bundle.load(str(bundle_or_path), verify=verify)


def tensor_spec(bundle: Bundle, k: int, name: str, kind: str = "inputs") -> dict | None:
    for t in bundle.stages[k][kind]:
        if t["name"] == name:
            return t
    return None


def input_shape(bundle: Bundle) -> tuple:
    """Per-sample shape of stage 0's ``input`` (3, H, W); falls back on the preprocessing size."""
    spec = tensor_spec(bundle, 0, "input")
    if spec is not None and all(isinstance(d, int) for d in spec["shape"][1:]):
        return tuple(int(d) for d in spec["shape"][1:])
    h, w = bundle.preprocess.size
    return (3, int(h), int(w))


def features_dtype(bundle: Bundle, k: int) -> np.dtype:
    """dtype of stage k's ``features`` output (float16 in fp16 bundles): read from the manifest."""
    spec = tensor_spec(bundle, k, "features", "outputs")
    return np.dtype(spec["dtype"] if spec else "float32")


def stage_features_input(bundle: Bundle, k: int, graph_inputs=None) -> str:
    """Name of stage k's (k > 0) features input: the data input that is not ``keep_idx``.

    The contract calls it ``features``, but an ONNX graph cannot take an input and produce an output
    under one name, so exporters may rename it (``features_in`` ...); the runtime finds it by role.
    """
    names = list(graph_inputs) if graph_inputs is not None else [t["name"] for t in bundle.stages[k]["inputs"]]
    rest = [n for n in names if n != "keep_idx"]
    if k == 0 or len(rest) != 1 or "keep_idx" not in names:
        raise DmpoEdgeError(f"bundle stage {k}", f"inputs {names} do not follow the stage contract "
                            "(stage k > 0 takes the previous stage's features and keep_idx). Recompile the bundle")
    return rest[0]
