"""`import dmpo_edge` and `dmpo-edge --help` must work with numpy alone (a Jetson runtime install)."""

import subprocess
import sys

BLOCKED = ["torch", "onnx", "onnxruntime", "tensorrt", "pycuda", "cv2", "modelopt", "onnxsim", "onnxslim", "PIL", "matplotlib"]

_BLOCKER = f"""
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked for this test: ' + name)
        return None
sys.meta_path.insert(0, _Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKER + code], capture_output=True, text=True, timeout=120)


def test_import_and_help_with_heavy_packages_blocked():
    r = _run(
        "import dmpo_edge, dmpo_edge.runtime, dmpo_edge.calib, dmpo_edge.compile, dmpo_edge.bundle, dmpo_edge.engines\n"
        "import dmpo_edge.calib.thresholds, dmpo_edge.calib.evaluate, dmpo_edge.calib.plots, dmpo_edge.calib.datasets\n"
        "import dmpo_edge.images, dmpo_edge.runtime.sources, dmpo_edge.runtime.backends.trt_graphs\n"
        "import dmpo_edge.commands.calibrate, dmpo_edge.commands.eval_\n"
        "import dmpo_edge.runtime.bench, dmpo_edge.runtime.bench_stats, dmpo_edge.commands.bench\n"
        "import dmpo_edge.compile.compiler, dmpo_edge.compile.trt_builder, dmpo_edge.compile.trt_settings\n"
        "import dmpo_edge.compile.summary, dmpo_edge.compile.torchtrt, dmpo_edge.compile.int8, dmpo_edge.compile.fp16\n"
        "import dmpo_edge.commands.compile, dmpo_edge.commands.build, dmpo_edge.commands.inspect\n"
        "from dmpo_edge.cli import main\n"
        "import contextlib, io\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n        main(['--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
        "assert 'compile' in buf.getvalue() and 'bench' in buf.getvalue()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in " + repr(BLOCKED) + ")\n"
        "assert not heavy, heavy\n"
        "print('light ok')\n"
    )
    assert r.returncode == 0, r.stderr
    assert "light ok" in r.stdout


def test_missing_extra_gives_one_clear_error():
    r = _run(
        "from dmpo_edge._lazy import require\n"
        "from dmpo_edge.errors import DmpoEdgeError\n"
        "try:\n    require('tensorrt', 'building engines')\n"
        "except DmpoEdgeError as e:\n    print(str(e))\n"
    )
    assert r.returncode == 0, r.stderr
    assert "dmpo-edge[trt]" in r.stdout and "building engines" in r.stdout
