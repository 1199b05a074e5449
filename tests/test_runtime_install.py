"""A Jetson runtime install has numpy, onnxruntime, OpenCV and Pillow, but no torch, onnx, matplotlib or sklearn:
`dmpo-edge run`, `bench` and `inspect` must do their whole job there."""

import subprocess
import sys

import numpy as np

BLOCKED = ["torch", "onnx", "modelopt", "onnxsim", "onnxslim", "onnxscript", "sklearn", "matplotlib", "tensorrt", "pycuda"]

_SCRIPT = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('not installed on this device: ' + name)
sys.meta_path.insert(0, _Block())
from dmpo_edge.cli import main
rc = [main(a) for a in {argvs!r}]
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {blocked!r})
print('RC', rc, 'HEAVY', heavy)
"""


def test_run_bench_inspect_work_on_a_runtime_only_install(toy_bundle, tmp_path):
    from PIL import Image

    b = toy_bundle(num_stages=3, thresholds=[0.6, 0.6])
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(frames / f"{i:03d}.png")
    argvs = [["run", b.path, "--source", str(frames), "--quiet"],
             ["bench", b.path, "--random", "--batch", "4", "--duration", "0.1", "--iterations", "3", "--warmup", "5",
              "--quiet"],
             ["inspect", b.path]]
    r = subprocess.run([sys.executable, "-c", _SCRIPT.format(blocked=BLOCKED, argvs=argvs)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RC [0, 0, 0] HEAVY []" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
    assert "12 frames classified" in r.stdout
    assert "speed-up: realised" in r.stdout
