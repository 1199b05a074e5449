"""The kit a GPU machine without network needs (``out/gpu_kit``, made by ``benchmarks/gpu_kit.sh``), and using it.

- :func:`prepare_kit`: the checkpoint (a tiny ViT trained here when none is given) and one bundle per precision;
- :func:`install_pycuda`: pycuda built from the kit's source distribution against the local CUDA toolkit,
  offline, into a temporary site folder (the device layer falls back to cuda-python when that is impossible);
- :func:`ensure_from_kit`: small wheels (pycuda's dependencies, the digits backbone) installed from the kit;
- :func:`kit_size`: what travels, in bytes (the kit and the repository together stay under 64 MiB).
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from dmpo_edge._lazy import available, require
from dmpo_edge.errors import DmpoEdgeError

from .checkout import ROOT

__all__ = ["DEFAULT_KIT", "TINY_PRE", "find_cuda_toolkit", "add_site", "ensure_from_kit", "pycuda_plan", "install_pycuda",
           "with_parallel_compile", "kit_size",
           "make_tiny_checkpoint", "read_kit", "prepare_kit"]

DEFAULT_KIT = os.path.join(ROOT, "out", "gpu_kit")


def find_cuda_toolkit() -> dict:
    """nvcc and cuda.h: what building pycuda needs (CUDA_HOME / CUDA_PATH, PATH, /usr/local/cuda*)."""
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    if shutil.which("nvcc"):
        cands.append(shutil.which("nvcc"))
    cands += ["/usr/local/cuda/bin/nvcc"] + sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    for nvcc in cands:
        if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK):
            root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
            for r in (os.path.dirname(os.path.dirname(nvcc)), root):
                h = os.path.join(r, "include", "cuda.h")
                if os.path.isfile(h):
                    return {"nvcc": nvcc, "root": r, "cuda_h": h}
            return {"nvcc": nvcc, "root": root, "cuda_h": None}
    return {"nvcc": None, "root": None, "cuda_h": None}




def _pip(args: list, timeout: float, env=None) -> tuple:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"] + args
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, (p.stdout + p.stderr)[-3000:], " ".join(cmd)


def add_site(target: str) -> None:
    import importlib

    if target not in sys.path:
        sys.path.append(target)  # after the environment's own packages: the kit only fills gaps
    importlib.invalidate_caches()


def ensure_from_kit(module: str, dist: str, kit: str, target: str, timeout: float = 120) -> str:
    """Import ``module``, installing ``dist`` from the kit's wheels into ``target`` when it is missing."""
    if available(module):
        return "present"
    wheels = os.path.join(kit, "wheels")
    if not os.path.isdir(wheels):
        raise DmpoEdgeError("kit", f"'{module}' is missing and there is no {wheels} to install it from. "
                            f"pip install {dist}, or prepare the kit with benchmarks/gpu_kit.sh")
    rc, log, _ = _pip(["install", "--no-index", "--no-deps", "--find-links", wheels, "--target", target, dist], timeout)
    if rc != 0:
        raise DmpoEdgeError("kit", f"installing {dist} from {wheels} failed: {log.strip().splitlines()[-1] if log.strip() else rc}")
    add_site(target)
    if not available(module):
        raise DmpoEdgeError("kit", f"{dist} installed into {target} but '{module}' still does not import")
    return f"installed from {wheels}"


PYCUDA_DEPS = (("pytools", "pytools"), ("platformdirs", "platformdirs"), ("mako", "mako"), ("markupsafe", "markupsafe"),
               ("typing_extensions", "typing_extensions"), ("siphash24", "siphash24"))


PARALLEL_COMPILE = """\
# --- added by dmpo-edge gpu_check.py: compile the sources of one extension in parallel ---
def _dmpo_parallel_compile():
    import os
    from concurrent.futures import ThreadPoolExecutor

    try:
        from setuptools._distutils import ccompiler
    except ImportError:
        from distutils import ccompiler

    def compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

        def one(obj):
            if obj in build:
                src, ext = build[obj]
                self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

        with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
            list(pool.map(one, objects))
        return objects

    ccompiler.CCompiler.compile = compile


try:
    _dmpo_parallel_compile()
except Exception:  # keep the serial build
    pass
"""


def with_parallel_compile(setup_py: str) -> str:
    """``setup.py`` with :data:`PARALLEL_COMPILE` added after its ``from __future__`` imports (pycuda >= 2025.1.2
    starts with ``from __future__ import annotations``, which must stay the first statement: prepending code
    there is a SyntaxError)."""
    import ast

    tree = ast.parse(setup_py)
    end = 0  # line after the module docstring and the __future__ imports
    for i, node in enumerate(tree.body):
        doc = i == 0 and isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) \
            and isinstance(node.value.value, str)
        if doc or (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            end = node.end_lineno
        else:
            break
    lines = setup_py.splitlines(keepends=True)
    return "".join(lines[:end]) + ("\n" if end else "") + PARALLEL_COMPILE + "\n" + "".join(lines[end:])


def pycuda_plan(kit: str) -> str:
    """What a GPU run would do about pycuda here (said in the dry run)."""
    sdists = sorted(glob.glob(os.path.join(kit, "pycuda-*.tar.gz")))
    tk = find_cuda_toolkit()
    if not sdists:
        return f"no pycuda sdist in {kit}; a GPU run would use cuda-python"
    if not (tk["nvcc"] and tk["cuda_h"]):
        return f"{os.path.basename(sdists[-1])} found but no CUDA toolkit; a GPU run would use cuda-python"
    return f"a GPU run would build {os.path.basename(sdists[-1])} against {tk['root']}"


def install_pycuda(kit: str, target: str, timeout: float) -> dict:
    """Build pycuda from the kit's sdist against the local CUDA toolkit into ``target`` (offline)."""
    sdists = sorted(glob.glob(os.path.join(kit, "pycuda-*.tar.gz")))
    tk = find_cuda_toolkit()
    if not sdists:
        return {"ok": None, "detail": f"pycuda missing and no pycuda-*.tar.gz in {kit}: device layer uses cuda-python"}
    if not tk["nvcc"] or not tk["cuda_h"]:
        return {"ok": None, "detail": "pycuda missing and no CUDA toolkit (nvcc + cuda.h) to build it: device layer uses cuda-python",
                "toolkit": tk}
    t0 = time.perf_counter()
    deps = []
    for mod, dist in PYCUDA_DEPS:
        if not available(mod):
            ensure_from_kit(mod, dist, kit, target)
            deps.append(dist)
    src = tempfile.mkdtemp(prefix="dmpo-pycuda-src-")
    try:
        subprocess.run(["tar", "xzf", sdists[-1], "-C", src], check=True, capture_output=True, timeout=120)
        (folder,) = [os.path.join(src, d) for d in os.listdir(src)]
        # pycuda is one big extension (its Boost.Python subset included) that setuptools compiles one file at a
        # time: compile each extension's sources on every core instead (no effect on what gets built)
        with open(os.path.join(folder, "setup.py")) as f:
            setup_py = f.read()
        with open(os.path.join(folder, "setup.py"), "w") as f:
            f.write(with_parallel_compile(setup_py))
        env = dict(os.environ, CUDA_ROOT=tk["root"], PATH=os.path.dirname(tk["nvcc"]) + os.pathsep + os.environ.get("PATH", ""))
        try:
            rc, log, cmd = _pip(["install", "--no-index", "--no-deps", "--no-build-isolation", "--target", target, folder],
                                timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"ok": False, "detail": f"building pycuda took longer than {timeout:.0f} s (--pycuda-timeout); "
                    "the device layer falls back to cuda-python", "toolkit": tk}
    finally:
        shutil.rmtree(src, ignore_errors=True)
    if rc != 0:
        return {"ok": False, "detail": f"building pycuda from {os.path.basename(sdists[-1])} failed (exit {rc}); "
                "the device layer falls back to cuda-python", "log_tail": log, "command": cmd}
    add_site(target)
    ok = available("pycuda.driver")
    return {"ok": ok, "detail": (f"built {os.path.basename(sdists[-1])} in {time.perf_counter() - t0:.0f} s against "
                                 f"{tk['root']}" + (f" (+ {', '.join(deps)} from the kit)" if deps else "")
                                 if ok else "pycuda built but does not import"), "toolkit": tk, "target": target}




TINY_PRE = {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def make_tiny_checkpoint(path: str, steps: int, device: str = "cpu", seed: int = 0) -> dict:
    """A tiny DMPO ViT (3 exits, 32 x 32) trained ``steps`` Adam steps on digits:train, saved as a checkpoint."""
    torch = require("torch", "training the tiny check model")
    from dmpo_edge.calib.datasets import load_dataset
    from dmpo_edge.models import TINY_VIT_CONFIG, build_model, save_checkpoint
    from dmpo_edge.preprocess import Preprocess

    torch.manual_seed(seed)
    model = build_model(dict(TINY_VIT_CONFIG)).to(device)
    ds = load_dataset("digits:train").take(512, seed=seed)
    pre = Preprocess.from_dict(TINY_PRE)
    x = torch.from_numpy(pre(list(ds.images))).to(device)
    y = torch.from_numpy(np.asarray(ds.labels, np.int64)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = None
    for _ in range(int(steps)):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen).to(device)
        outs = model(x[idx])
        loss = sum(torch.nn.functional.cross_entropy(o, y[idx]) for o in outs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().cpu()
    with torch.no_grad():
        acc = [float((o.argmax(1) == y.cpu()).float().mean()) for o in model(x.cpu())]
    save_checkpoint(path, model, classes=ds.classes, preprocess=pre.to_dict(),
                    loss_schedule={"kind": "sum", "note": "gpu_check tiny model"},
                    metrics={"exit_accuracy": acc, "train_steps": int(steps), "train_data": "digits:train[512]"})
    return {"checkpoint": path, "steps": int(steps), "train_exit_accuracy": [round(a, 4) for a in acc],
            "final_loss": None if loss is None else round(float(loss), 4)}




def kit_size(kit: str) -> int:
    """Bytes under the kit folder (it travels with the repository: the two together stay under 64 MiB)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(kit) for f in files
               if not os.path.islink(os.path.join(d, f)))


def read_kit(kit: str) -> dict | None:
    p = os.path.join(kit, "kit.json")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)



def prepare_kit(args) -> int:
    """Checkpoint + one bundle per precision into ``args.prepare_kit`` (the sdist and wheels come from gpu_kit.sh)."""
    from dmpo_edge.compile import compile_bundle

    kit = os.path.abspath(args.prepare_kit)
    os.makedirs(kit, exist_ok=True)
    model = args.model
    if model is None:
        digits = os.path.join(ROOT, "out", "digits_model.pt")
        if os.path.isfile(digits):
            model = digits
    dst = os.path.join(kit, "model.pt")
    if model is None:
        info = make_tiny_checkpoint(dst, args.train_steps)
        print(f"kit: tiny ViT trained {info['steps']} steps -> {dst}", file=sys.stderr)
        source = "tiny ViT (built by gpu_check.py)"
    else:
        shutil.copyfile(model, dst)
        source = os.path.relpath(model, ROOT) if os.path.abspath(model).startswith(ROOT) else model
    bundles = {}
    for prec in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        out = os.path.join(kit, f"bundle_{prec}")
        print(f"kit: compiling the {prec} bundle -> {out}", file=sys.stderr)
        kw = {} if prec == "fp32" else {"calib": "digits:train", "calib_count": 256, "holdout": "digits:val",
                                        "accept_drop": True}  # the kit carries the bundle; its report says the drop
        compile_bundle(dst, out, precision=prec, max_batch=args.max_batch, force=True, progress=True, build="never",
                       exporter=args.exporter, **kw)
        bundles[prec] = f"bundle_{prec}"
    rec = {"format": "dmpo-edge-gpu-kit", "version": 1, "model": "model.pt", "model_source": source, "bundles": bundles,
           "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    with open(os.path.join(kit, "kit.json"), "w") as f:
        json.dump(rec, f, indent=2)
    print(json.dumps(rec, indent=2))
    return 0
