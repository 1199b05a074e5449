"""Serving the early-exit pipeline behind NVIDIA Triton Inference Server.

Two ways in, one request path (:mod:`.handler`):

- ``dmpo-edge serve`` (:mod:`.pytriton_server`): PyTriton starts the ``tritonserver`` from its wheel and
  proxies Triton's dynamic batches into a :class:`~dmpo_edge.runtime.Pipeline` living in this process;
- ``dmpo-edge export-triton`` (:mod:`.repository`): a plain Triton model repository whose Python-backend
  ``model.py`` (:mod:`.triton_model`) runs the same handler inside any ``tritonserver`` (the wheel's, or an
  NGC container's).

PyTriton pins numpy < 2, so the ``serve`` extra lives in its own environment (see :mod:`.env`). Nothing here
imports torch or ``dmpo_edge.compile``; PyTriton and tritonclient load inside the functions that use them.
"""

from __future__ import annotations

__all__ = ["MODEL_NAME", "INPUT", "IMAGE", "OUTPUTS"]

#: default Triton model name
MODEL_NAME = "dmpo"
#: preprocessed float32 images, N x 3 x H x W
INPUT = "input"
#: encoded JPEG / PNG bytes, N x 1
IMAGE = "image"
#: per image: class index, class name, exit confidence, 0-based exit stage
OUTPUTS = ("prediction", "class_name", "confidence", "exit_stage")
