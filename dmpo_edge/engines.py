"""Where a bundle keeps its TensorRT engines, shared by the builder (compile) and the TensorRT backend (runtime).

Engines are specific to the TensorRT version, the GPU, its compute capability and the precision, so each build
lives in ``engines/<device key>/`` with an ``engines.json`` record; one formula for the key on both sides.
"""

from __future__ import annotations

import json
import os
import re

__all__ = ["ENGINES_DIR", "ENGINES_JSON", "TIMING_CACHE", "ENGINES_FORMAT", "slug", "sm_text", "device_key",
           "read_engines_json"]

ENGINES_DIR = "engines"
ENGINES_JSON = "engines.json"
TIMING_CACHE = "timing.cache"
ENGINES_FORMAT = "dmpo-edge-engines"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "_", str(text).lower()).strip("_")


def sm_text(sm) -> str:
    """Compute capability as digits: (8, 7), "8.7", "87" and "sm87" all give "87"."""
    text = "".join(str(int(v)) for v in sm) if isinstance(sm, (tuple, list)) else str(sm).replace(".", "")
    return text[2:] if text.startswith("sm") else text


def device_key(trt_version: str, gpu_name: str, sm, precision: str) -> str:
    """``10.3.0-nvidia_jetson_orin-sm87-int8``: engines are specific to all four."""
    return f"{slug(trt_version)}-{slug(gpu_name)}-sm{sm_text(sm)}-{slug(precision)}"


def read_engines_json(d: str) -> dict | None:
    """The ``engines.json`` record of an engines folder, or None when it is missing or unreadable."""
    p = os.path.join(d, ENGINES_JSON)
    try:
        with open(p) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None
