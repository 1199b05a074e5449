"""``dmpo_edge.runtime`` is a Jetson install: numpy (+ onnxruntime / tensorrt / cv2 when used), never torch or compile."""

import subprocess
import sys

BLOCKED = ["torch", "onnx", "onnxruntime", "tensorrt", "pycuda", "cuda", "cv2", "PIL", "modelopt", "matplotlib", "sklearn",
           "skimage", "tqdm"]

MODULES = ["dmpo_edge.runtime", "dmpo_edge.runtime.backends", "dmpo_edge.runtime.backends.base",
           "dmpo_edge.runtime.backends.ort", "dmpo_edge.runtime.backends.trt", "dmpo_edge.runtime.backends.null",
           "dmpo_edge.runtime.device", "dmpo_edge.runtime.pipeline", "dmpo_edge.runtime.static",
           "dmpo_edge.runtime.sources", "dmpo_edge.runtime.stream", "dmpo_edge.runtime.checks", "dmpo_edge.commands.run"]

CODE = f"""
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r} or name.startswith('dmpo_edge.compile'):
            raise ImportError('blocked for this test: ' + name)
        return None
sys.meta_path.insert(0, _Block())
import importlib
for m in {MODULES!r}:
    importlib.import_module(m)
from dmpo_edge.runtime import Pipeline, run_all_stages, stream, open_source, get_backend
from dmpo_edge.errors import DmpoEdgeError
# without the heavy packages, using them fails with one clear error naming the extra
from dmpo_edge.runtime.backends import OrtBackend
try:
    OrtBackend.__mro__  # class is importable
    import numpy as np
    from dmpo_edge._lazy import require
    require('onnxruntime', 'running stage graphs')
except DmpoEdgeError as e:
    assert 'dmpo-edge[runtime]' in str(e), e
bad = sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r} or m.startswith('dmpo_edge.compile'))
assert not bad, bad
print('runtime light ok')
"""


def test_runtime_imports_without_heavy_packages_or_compile():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "runtime light ok" in r.stdout
