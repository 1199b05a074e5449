"""GPU verification kit: one run that proves the GPU paths of dmpo-edge on whatever CUDA machine is at hand.

What it does, top to bottom (each step is one row of the table printed at the end):

1. environment: GPU, driver-side packages (torch, cuda-python, pycuda, TensorRT, ONNX Runtime), nvcc;
2. pycuda: when it is missing and a CUDA toolkit (nvcc + cuda.h) is there, it is built from the source
   distribution carried in the kit (``out/gpu_kit``, see ``benchmarks/gpu_kit.sh``) into a temporary folder;
   otherwise the device layer runs on cuda-python;
3. the bundle: ``--bundle``, ``--model`` (compiled here), the kit's, or a tiny ViT trained for a few steps on
   digits and compiled here;
4. the CPU reference: every stage on every input with ONNX Runtime on the CPU, exit thresholds chosen so that
   every exit takes a share, and the early-exit pipeline on the CPU (checked against the numpy reference);
5. the device layer (``dmpo_edge.runtime.device``, pycuda and cuda-python): page-locked buffers, async copies on
   two streams ordered by an event, the ``keep_idx`` survivor gather run on the device (torch ``index_select``
   on the layer's own memory and stream; a TensorRT Gather engine where TensorRT is installed) and the TensorRT
   backend's refill copies, all bit for bit against numpy;
6. the early-exit pipeline on the GPU with several batches in flight, through the runtime's own Pipeline, on a
   torch-on-CUDA stage backend (``gpu_torch_backend.py``; it stands in for the engines where TensorRT is
   missing): every sample's exit stage and class against the CPU pipeline's (identical except for samples whose
   confidence lies within ``--band`` of a threshold: those are listed);
7. where TensorRT imports: engines built with ``dmpo_edge.compile.build_engines`` for the fp32 bundle and the
   kit's fp16 / int8 bundles, per-stage parity with ONNX Runtime, the pipeline comparison, and per-stage engine
   timings against the static model (every stage on every sample).

``--dry-run`` runs every step that needs no CUDA on the CPU (the torch backend on the CPU device, a host-memory
device layer) so that the comparison logic, the table and the JSON are tested here (tests/test_gpu_check.py).

Run from the repository root::

    python benchmarks/gpu_check.py                          # on the GPU machine; uses out/gpu_kit/ when present
    python benchmarks/gpu_check.py --bundle B --model M.pt   # a given fp32 bundle and its checkpoint
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc   # the CPU self-test

Results: ``<out>/gpu_check.json`` (everything) and ``<out>/gpu_check.txt`` (the table, also printed last).
``<out>`` is ``--out``, else ``$DMPO_GPU_CHECK_OUT``, else ``$OUT``, else ``./gpu_check_out``.
Exit code: 0 when no check failed, 1 when one did, 2 when there is nothing to run on (no CUDA device without
``--dry-run``, bad arguments).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_KIT = os.path.join(ROOT, "out", "gpu_kit")
FORMAT = "dmpo-edge-gpu-check"
PASS, FAIL, SKIP, INFO = "pass", "FAIL", "skip", "info"
#: exit stage and class must agree except where a confidence is this close to a threshold (fp32 paths)
DEFAULT_BAND = 1e-4
#: per bundle precision: (band around thresholds, share of samples allowed to differ beyond it, logits tolerance)
PRECISION_TOL = {"fp32": (1e-4, 0.0, 1e-3), "fp16": (5e-3, 0.01, 5e-2), "int8": (3e-2, 0.02, 0.5)}
#: TensorRT engines of an fp32 bundle: the builder's TF32 flag is on by default on Ampere and later, so FP32 layers
#: may run in TF32 (10-bit mantissa): looser than torch / ONNX Runtime FP32 and stated as such in the JSON
TRT_TOL = dict(PRECISION_TOL, fp32=(1e-3, 0.005, 1e-2))


# ----------------------------------------------------------------------------------------------------------
# imports from this checkout (works without `pip install -e .` on a bare GPU machine)
# ----------------------------------------------------------------------------------------------------------
def _bootstrap_imports() -> str:
    """Make ``dmpo_edge`` (with ``compile``/``runtime``/``calib`` mapped as in pyproject.toml) importable."""
    try:
        import dmpo_edge.calib  # noqa: F401
        import dmpo_edge.compile  # noqa: F401
        import dmpo_edge.runtime  # noqa: F401

        return "installed"
    except ImportError:
        pass
    import importlib.util

    for name in [m for m in sys.modules if m == "dmpo_edge" or m.startswith("dmpo_edge.")]:
        del sys.modules[name]

    def load(name: str, folder: str) -> None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)

    load("dmpo_edge", os.path.join(ROOT, "dmpo_edge"))
    for sub in ("compile", "runtime", "calib"):
        load(f"dmpo_edge.{sub}", os.path.join(ROOT, sub))
    return "mapped from the checkout (not pip-installed)"


IMPORT_MODE = _bootstrap_imports()
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the helper modules beside this script

from dmpo_edge._lazy import available, installed_version, require  # noqa: E402
from dmpo_edge.bundle import Bundle  # noqa: E402
from dmpo_edge.errors import DmpoEdgeError  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# the report: one row per check, everything else in the JSON
# ----------------------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


class Report:
    """Runs checks, never lets one stop the others, and keeps the rows of the final table."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = float(budget_s)
        self.rows = []
        self.checks = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, key: str, check: str, backend: str, status: str, detail: str, data: dict | None = None) -> None:
        rec = dict(data or {})
        rec.update({"check": check, "backend": backend, "status": status, "detail": detail})
        self.checks[key] = _jsonable(rec)
        self.rows.append((check, backend, status, detail))
        print(f"[{self.elapsed():6.1f}s] {status:<4} {check} ({backend}): {detail}", file=sys.stderr, flush=True)

    def run(self, key: str, check: str, backend: str, fn, skip: str | None = None):
        """``fn()`` returns a dict with ``ok`` (True / False / None = information only) and ``detail``."""
        if skip is None and self.elapsed() > self.budget_s:
            skip = f"time budget of {self.budget_s:.0f} s spent"
        if skip:
            self.add(key, check, backend, SKIP, skip, {"skipped": skip})
            return None
        t = time.perf_counter()
        try:
            res = dict(fn())
        except Exception as exc:  # one broken path must not hide the others
            res = {"ok": False, "detail": _one_line(exc), "traceback": traceback.format_exc(limit=8)}
        res["seconds"] = round(time.perf_counter() - t, 3)
        ok = res.get("ok")
        status = INFO if ok is None else (PASS if ok else FAIL)
        self.add(key, check, backend, status, str(res.get("detail", "")), res)
        return res

    def summary(self) -> dict:
        st = [r[2] for r in self.rows]
        return {"passed": st.count(PASS), "failed": st.count(FAIL), "skipped": st.count(SKIP), "info": st.count(INFO),
                "ok": FAIL not in st}

    def table(self) -> str:
        heads = ("check", "backend", "result", "detail")
        rows = [heads] + [(c, b, s, d if len(d) <= 140 else d[:137] + "...") for c, b, s, d in self.rows]
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}" for r in rows]
        lines.insert(1, "-" * min(160, sum(w) + 6 + max(len(r[3]) for r in rows)))
        s = self.summary()
        lines.append(f"\n{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped ({self.elapsed():.0f} s)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# environment, pycuda from the kit, extra wheels
# ----------------------------------------------------------------------------------------------------------
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


def environment(args, cuda: dict) -> dict:
    env = {
        "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
        "dmpo_edge_import": IMPORT_MODE, "numpy": np.__version__,
        "packages": {d: installed_version(d) for d in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "pycuda",
                                               "cuda-python", "cuda-bindings", "cupy-cuda12x", "cupy-cuda13x",
                                               "nvidia-modelopt", "scikit-learn")},
        "cuda": cuda, "toolkit": find_cuda_toolkit(),
    }
    if available("tensorrt"):
        env["tensorrt"] = require("tensorrt").__version__
    if available("onnxruntime"):
        env["ort_providers"] = require("onnxruntime").get_available_providers()
    return env


def probe_cuda() -> dict:
    """Who sees a GPU: torch, the runtime's device layer (pycuda / cuda-python). Never raises."""
    out = {"torch_cuda": False, "device_layer": False, "gpu": None, "sm": None}
    try:
        import torch

        if torch.cuda.is_available():
            out["torch_cuda"] = True
            out["gpu"] = torch.cuda.get_device_name(0)
            out["sm"] = "".join(str(v) for v in torch.cuda.get_device_capability(0))
            out["torch_cuda_version"] = torch.version.cuda
    except Exception as exc:
        out["torch_error"] = _one_line(exc)
    try:
        from dmpo_edge.runtime.device import cuda_device_present

        out["device_layer"] = bool(cuda_device_present())
    except Exception as exc:
        out["device_layer_error"] = _one_line(exc)
    out["present"] = bool(out["torch_cuda"] or out["device_layer"])
    return out


def _pip(args: list, timeout: float, env=None) -> tuple:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"] + args
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, (p.stdout + p.stderr)[-3000:], " ".join(cmd)


def _add_site(target: str) -> None:
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
    _add_site(target)
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
            f.write(PARALLEL_COMPILE + "\n" + setup_py)
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
    _add_site(target)
    ok = available("pycuda.driver")
    return {"ok": ok, "detail": (f"built {os.path.basename(sdists[-1])} in {time.perf_counter() - t0:.0f} s against "
                                 f"{tk['root']}" + (f" (+ {', '.join(deps)} from the kit)" if deps else "")
                                 if ok else "pycuda built but does not import"), "toolkit": tk, "target": target}


# ----------------------------------------------------------------------------------------------------------
# the model and the bundle
# ----------------------------------------------------------------------------------------------------------
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


def _needs_efficientnet(checkpoint: str) -> bool:
    try:
        torch = require("torch")
        cfg = torch.load(checkpoint, map_location="cpu", weights_only=True).get("config") or {}
        return str(cfg.get("backbone", "")).startswith("efficientnet")
    except Exception:
        return False


def compile_fp32(checkpoint: str, out_dir: str, max_batch: int, exporter: str) -> Bundle:
    from dmpo_edge.compile import compile_bundle

    return compile_bundle(checkpoint, out_dir, precision="fp32", max_batch=max_batch, force=True, progress=False,
                          build="never", exporter=exporter, log=lambda m: print(m, file=sys.stderr))


def read_kit(kit: str) -> dict | None:
    p = os.path.join(kit, "kit.json")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


def find_source_checkpoint(bundle_path: str, kit: str) -> str | None:
    """The checkpoint a bundle was compiled from (manifest model.source), beside the bundle or in the kit."""
    from dmpo_edge.bundle import sha256_file

    try:
        src = Bundle.load(bundle_path, verify=False).manifest["model"].get("source") or {}
    except DmpoEdgeError:
        return None
    names = [n for n in (src.get("file"), "model.pt") if n]
    for folder in (os.path.dirname(os.path.abspath(bundle_path)), kit):
        for n in names:
            p = os.path.join(folder, n)
            if os.path.isfile(p) and (not src.get("sha256") or sha256_file(p) == src["sha256"]):
                return p
    return None


def resolve_bundle(ctx) -> dict:
    """Pick the fp32 bundle and its checkpoint: --bundle/--model, the kit, or a tiny ViT built here."""
    a = ctx.args
    work = ctx.work
    kit = read_kit(a.kit) if not a.no_kit else None
    how = None
    if a.bundle:
        ctx.bundle_path, ctx.checkpoint = os.path.abspath(a.bundle), a.model or find_source_checkpoint(a.bundle, a.kit)
        how = "given (--bundle)" + (f", checkpoint {ctx.checkpoint}" if ctx.checkpoint else ", no matching checkpoint found")
    elif a.model:
        ctx.checkpoint = a.model
        if _needs_efficientnet(a.model):
            ensure_from_kit("efficientnet_lite_pytorch", "efficientnet_lite_pytorch", a.kit, ctx.site)
        ctx.bundle_path = os.path.join(work, "bundle_fp32")
        compile_fp32(a.model, ctx.bundle_path, a.max_batch, a.exporter)
        how = f"compiled here from {a.model}"
    elif kit and not a.dry_run:
        ctx.bundle_path = os.path.join(a.kit, kit["bundles"]["fp32"])
        ctx.checkpoint = os.path.join(a.kit, kit["model"])
        ctx.kit_bundles = {p: os.path.join(a.kit, d) for p, d in kit["bundles"].items()}
        how = f"from the kit {a.kit}"
    else:
        ctx.checkpoint = os.path.join(work, "tiny_vit.pt")
        dev = "cuda" if ctx.cuda["torch_cuda"] else "cpu"
        tiny = make_tiny_checkpoint(ctx.checkpoint, a.train_steps, dev)
        ctx.bundle_path = os.path.join(work, "bundle_fp32")
        compile_fp32(ctx.checkpoint, ctx.bundle_path, a.max_batch, a.exporter)
        how = f"tiny ViT trained {a.train_steps} steps on digits ({dev}) and compiled here"
        ctx.extra["tiny_model"] = tiny
    if ctx.checkpoint and _needs_efficientnet(ctx.checkpoint):
        ensure_from_kit("efficientnet_lite_pytorch", "efficientnet_lite_pytorch", a.kit, ctx.site)
    b = ctx.bundle = Bundle.load(ctx.bundle_path)
    if b.precision != "fp32":
        raise DmpoEdgeError("gpu check", f"bundle {b.path} is {b.precision}; the reference run needs the fp32 bundle "
                            "(pass the others through the kit for the TensorRT checks)")
    if b.manifest.get("regroup") != "keep_idx_gather":
        raise DmpoEdgeError("gpu check", f"bundle regroup is {b.manifest.get('regroup')!r}; these checks cover 'keep_idx_gather'")
    detail = (f"{b.manifest['model'].get('name')} ({b.manifest['model'].get('backbone')}), {b.num_stages} stages, "
              f"{len(b.classes)} classes, max batch {b.max_batch}: {how}")
    return {"ok": True, "detail": detail, "path": b.path, "checkpoint": ctx.checkpoint, "source": how,
            "stages": [{"file": s["file"], "flops": s["flops"], "cumulative_flops": s["cumulative_flops"]} for s in b.stages]}


def load_inputs(bundle: Bundle, n: int) -> tuple:
    """n digits preprocessed as the bundle says (all 1,797 images, repeated as needed), labels; random if no sklearn."""
    from dmpo_edge.preprocess import Preprocess

    pre = Preprocess.from_dict(bundle.manifest["preprocess"])
    try:
        from dmpo_edge.calib.datasets import load_dataset

        ds = load_dataset("digits")
        idx = np.arange(n) % len(ds)
        x = pre([ds.images[i] for i in idx])
        return x, np.asarray(ds.labels)[idx], "digits"
    except DmpoEdgeError:
        h, w = pre.size
        rng = np.random.default_rng(0)
        return pre([rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]), None, "random images"


# ----------------------------------------------------------------------------------------------------------
# reference computations and comparisons
# ----------------------------------------------------------------------------------------------------------
def spread_thresholds(conf: list, band: float) -> list:
    """K-1 thresholds that make every exit take about an equal share, each placed mid-way in the widest gap
    between neighbouring confidences near that share, so that few samples sit within ``band`` of a threshold."""
    K = len(conf)
    alive = np.ones(conf[0].shape[0], bool)
    out = []
    for k in range(K - 1):
        c = np.sort(conf[k][alive].astype(np.float64))
        if c.size < 2:
            out.append(float("inf"))
            continue
        share = 1.0 / (K - k)
        target = int(round((1.0 - share) * c.size))
        lo, hi = max(1, target - max(2, c.size // 20)), min(c.size - 1, target + max(2, c.size // 20))
        gaps = c[lo:hi + 1] - c[lo - 1:hi]
        i = lo + int(np.argmax(gaps))
        thr = float((c[i - 1] + c[i]) / 2.0)
        out.append(thr)
        alive &= conf[k] < thr
    return out


def early_exit_reference(static: list, thresholds: list) -> dict:
    """numpy: exit at the first stage k < K-1 whose confidence >= thresholds[k]; the last stage takes the rest."""
    K = len(static)
    n = static[0]["confidence"].shape[0]
    exit_stage = np.full(n, K - 1, np.int32)
    done = np.zeros(n, bool)
    for k, t in enumerate(thresholds):
        now = ~done & (static[k]["confidence"].astype(np.float64) >= t)
        exit_stage[now] = k
        done |= now
    rows = np.arange(n)
    conf = np.stack([s["confidence"] for s in static])[exit_stage, rows]
    pred = np.stack([s["prediction"] for s in static])[exit_stage, rows].astype(np.int64)
    return {"exit_stage": exit_stage, "prediction": pred, "confidence": conf}


def compare_exits(ref: dict, got, thresholds: list, ref_conf: list, got_conf: list | None, band: float,
                  max_share: float = 0.0, ref_logits: list | None = None) -> dict:
    """Sample-by-sample exit stage and class; disagreements within ``band`` of a threshold are listed, not failed.

    ``ref``/``got``: dicts or Results with ``exit_stage``, ``prediction``, ``confidence``. ``ref_conf``/``got_conf``:
    per-stage confidences of every sample (static runs) to tell which samples sit near a threshold.
    """
    g = lambda r, k: np.asarray(r[k] if isinstance(r, dict) else getattr(r, k))  # noqa: E731
    e_ref, e_got = g(ref, "exit_stage"), g(got, "exit_stage")
    p_ref, p_got = g(ref, "prediction").astype(np.int64), g(got, "prediction").astype(np.int64)
    n = e_ref.shape[0]
    K = len(ref_conf)
    near = np.zeros(n, bool)
    decided = np.maximum(e_ref, e_got)
    for k in range(K - 1):
        for conf in (ref_conf[k], got_conf[k] if got_conf is not None else None):
            if conf is not None:
                near |= (decided >= k) & (np.abs(conf.astype(np.float64) - thresholds[k]) <= band)
    exit_mis = e_ref != e_got
    pred_mis = (p_ref != p_got) & ~exit_mis
    # Two top logits closer than the band: the class is not defined by the graph to that precision.
    tie = np.zeros(n, bool)
    if ref_logits is not None:
        lg = np.stack(ref_logits)[e_ref, np.arange(n)]
        top2 = np.sort(lg, axis=1)[:, -2:]
        tie = (top2[:, 1] - top2[:, 0]) <= band * np.maximum(1.0, np.abs(top2[:, 1]))
    explained = near | (pred_mis & tie)
    bad = (exit_mis | pred_mis) & ~explained
    share = float(bad.mean()) if n else 0.0
    ok = share <= max_share if max_share > 0 else not bad.any()

    def listing(mask, limit=40):
        idx = np.flatnonzero(mask)[:limit]
        return [{"sample": int(i), "exit_ref": int(e_ref[i]), "exit_got": int(e_got[i]), "class_ref": int(p_ref[i]),
                 "class_got": int(p_got[i]),
                 "conf_ref": [round(float(ref_conf[k][i]), 7) for k in range(K - 1)],
                 "conf_got": None if got_conf is None else [round(float(got_conf[k][i]), 7) for k in range(K - 1)]}
                for i in idx]

    counts = np.bincount(e_got, minlength=K)
    return {
        "ok": bool(ok), "samples": int(n), "exit_mismatches": int(exit_mis.sum()), "class_mismatches": int(pred_mis.sum()),
        "unexplained": int(bad.sum()), "unexplained_share": round(share, 5), "allowed_share": max_share,
        "near_threshold": int((near & (exit_mis | pred_mis)).sum()), "near_threshold_samples": int(near.sum()),
        "near_tie": int((pred_mis & tie).sum()), "band": band,
        "exit_distribution": [round(float(c) / max(1, n), 4) for c in counts],
        "mismatch_list": listing(bad), "near_threshold_list": listing(near & (exit_mis | pred_mis)),
    }


def _cmp_detail(c: dict, extra: str = "") -> str:
    dist = "/".join(f"{100 * v:.0f}" for v in c["exit_distribution"])
    return (f"{c['samples']} samples, exits {dist}%: {c['unexplained']} mismatches, "
            f"{c['near_threshold']} within {c['band']:g} of a threshold, {c['near_tie']} near ties{extra}")


def stage_parity(ref: list, got: list, tol: float) -> dict:
    """Per stage: max |logits| difference, max |confidence| difference, class agreement."""
    per = []
    ok = True
    for k, (r, g) in enumerate(zip(ref, got)):
        dl = float(np.max(np.abs(r["logits"].astype(np.float64) - g["logits"]))) if r["logits"].size else 0.0
        dc = float(np.max(np.abs(r["confidence"].astype(np.float64) - g["confidence"]))) if r["confidence"].size else 0.0
        agree = float(np.mean(r["prediction"] == g["prediction"])) if r["prediction"].size else 1.0
        scale = float(np.max(np.abs(r["logits"]))) if r["logits"].size else 1.0
        good = dl <= tol * max(1.0, scale)
        ok = ok and good
        per.append({"stage": k, "max_abs_logits": dl, "max_abs_confidence": dc, "class_agreement": agree,
                    "logit_scale": scale, "ok": bool(good)})
    worst = max(p["max_abs_logits"] for p in per)
    return {"ok": bool(ok), "tolerance": tol, "stages": per,
            "detail": f"max |d logits| {worst:.2e} (tol {tol:g} x scale), class agreement "
                      + "/".join(f"{100 * p['class_agreement']:.1f}" for p in per) + "%"}


def ideal_speedup(bundle: Bundle, exit_stage: np.ndarray) -> float:
    cum = np.array([float(s["cumulative_flops"]) for s in bundle.stages])
    return float(cum[-1] / np.mean(cum[np.asarray(exit_stage)])) if exit_stage.size and cum[-1] > 0 else float("nan")


def run_pipeline(bundle, backend, thresholds, x, batch: int, repeats: int, max_in_flight: int = 3, buckets=None,
                 refill: bool = False, backend_options=None, static: bool = True) -> dict:
    """The runtime's Pipeline on ``backend`` (a name/class or an instance): results, stats and timings."""
    from dmpo_edge.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(bundle, backend=backend, thresholds=thresholds, max_in_flight=max_in_flight, buckets=buckets,
                              refill=refill, backend_options=backend_options) as p:
        res = p.predict(x, batch_size=batch)  # also the warm-up
        stats = p.stats()
        t_exit, t_static = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            p.predict(x, batch_size=batch)
            t_exit.append(time.perf_counter() - t)
            if static:
                t = time.perf_counter()
                p.run_static(x, batch_size=batch)
                t_static.append(time.perf_counter() - t)
    out = {"results": res, "stats": stats, "batch": batch, "max_in_flight": max_in_flight, "buckets": buckets, "refill": refill}
    if t_exit:
        out["early_exit_ms"] = 1e3 * float(np.median(t_exit))
    if t_static:
        out["static_ms"] = 1e3 * float(np.median(t_static))
        out["realised_speedup"] = out["static_ms"] / out["early_exit_ms"] if out["early_exit_ms"] > 0 else None
    return out


def ort_backend(bundle, threads: int, variant=None):
    from dmpo_edge.runtime.backends import OrtBackend

    return OrtBackend(bundle, providers=["CPUExecutionProvider"], threads=threads, variant=variant, spinning=False)


def static_run(bundle, x, batch: int, backend) -> list:
    from dmpo_edge.runtime.static import run_all_stages

    return run_all_stages(bundle, x, batch_size=batch, backend=backend)


# ----------------------------------------------------------------------------------------------------------
# the steps
# ----------------------------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, args, report, work, site, cuda):
        self.args, self.report, self.work, self.site, self.cuda = args, report, work, site, cuda
        self.bundle = self.bundle_path = self.checkpoint = None
        self.kit_bundles = {}
        self.extra = {}
        self.x = self.labels = None
        self.cpu_static = self.thresholds = self.cpu_pipe = self.reference = self.torch_static = None
        self.batch, self.band = args.batch, args.band
        self.torch_device = "cuda" if cuda.get("torch_cuda") and not args.dry_run else "cpu"

    def cpu_pipe_dict(self) -> dict:
        p = self.cpu_pipe
        return {"exit_stage": p.exit_stage, "prediction": p.prediction, "confidence": p.confidence}


def step_cpu_reference(ctx) -> dict:
    a = ctx.args
    b = ctx.bundle
    ctx.x, ctx.labels, src = load_inputs(b, a.samples)
    ctx.cpu_static = static_run(b, ctx.x, ctx.batch, ort_backend(b, a.threads))
    conf = [s["confidence"] for s in ctx.cpu_static]
    if a.thresholds == "spread" or (a.thresholds == "manifest" and b.thresholds is None):
        ctx.thresholds = spread_thresholds(conf, ctx.band)
        how = "spread (every exit takes a share)"
    elif a.thresholds == "manifest":
        ctx.thresholds = [float(t) for t in b.thresholds]
        how = "the bundle's calibrated thresholds"
    else:
        ctx.thresholds = [float(t) for t in a.thresholds.split(",")]
        how = "given"
    ctx.reference = early_exit_reference(ctx.cpu_static, ctx.thresholds)
    acc = None
    if ctx.labels is not None and [str(c) for c in b.classes] == [str(i) for i in range(10)]:
        acc = [float(np.mean(s["prediction"] == ctx.labels)) for s in ctx.cpu_static]
    return {"ok": None, "inputs": src, "samples": int(ctx.x.shape[0]), "thresholds": ctx.thresholds, "thresholds_from": how,
            "stage_accuracy": acc, "reference_exit_distribution": np.bincount(ctx.reference["exit_stage"], minlength=b.num_stages) / ctx.x.shape[0],
            "detail": f"{ctx.x.shape[0]} {src} inputs, thresholds " + ", ".join(f"{t:.4f}" for t in ctx.thresholds) + f" ({how})"}


def step_cpu_pipeline(ctx) -> dict:
    a = ctx.args
    run = run_pipeline(ctx.bundle, "ort", ctx.thresholds, ctx.x, ctx.batch, repeats=a.repeats, max_in_flight=a.in_flight,
                       backend_options={"providers": ["CPUExecutionProvider"], "threads": a.threads})
    ctx.cpu_pipe = run["results"]
    conf = [s["confidence"] for s in ctx.cpu_static]
    c = compare_exits(ctx.reference, ctx.cpu_pipe, ctx.thresholds, conf, None, ctx.band,
                      ref_logits=[s["logits"] for s in ctx.cpu_static])
    c.update(_timing(ctx, run))
    c["detail"] = _cmp_detail(c, _timing_text(c)) + " (vs the numpy reference)"
    return c


def _timing(ctx, run) -> dict:
    out = {k: run[k] for k in ("early_exit_ms", "static_ms", "realised_speedup", "stats", "batch", "max_in_flight",
                               "buckets", "refill") if k in run}
    out["ideal_speedup"] = ideal_speedup(ctx.bundle, np.asarray(run["results"].exit_stage))
    return out


def _timing_text(c: dict) -> str:
    if c.get("early_exit_ms") is None:
        return ""
    s = f"; {c['early_exit_ms']:.1f} ms early exit"
    if c.get("static_ms") is not None:
        s += f" vs {c['static_ms']:.1f} ms static (x{c['realised_speedup']:.2f}, ideal x{c['ideal_speedup']:.2f})"
    return s


def device_impls(ctx) -> list:
    if ctx.args.dry_run:
        return ["host"]
    want = ctx.args.device_impl
    impls = []
    if want in ("all", "pycuda") and available("pycuda.driver"):
        impls.append("pycuda")
    if want in ("all", "cuda-python") and (available("cuda.bindings.runtime") or available("cuda.cudart")):
        impls.append("cuda-python")
    return impls


def make_device(impl: str):
    if impl == "host":
        from gpu_device_checks import HostDevice

        return HostDevice()
    from dmpo_edge.runtime.device import get_device

    return get_device(impl)


def step_device_layer(ctx, impl: str) -> None:
    import gpu_device_checks as gdc

    rep = ctx.report
    try:
        dev = make_device(impl)
    except Exception as exc:
        rep.add(f"device_{impl}", "device layer", impl, FAIL, _one_line(exc))
        return
    try:
        def copies():
            r = gdc.check_copies(dev, mib=ctx.args.copy_mib)
            bw = f", h2d {r['h2d_GBps']} GB/s, d2h {r['d2h_GBps']} GB/s" if impl != "host" else ""
            r["detail"] = (f"{dev.name()}: pinned {r['bytes'] >> 20} MiB h2d -> d2d -> event -> d2h on 2 streams "
                           f"{'bit-exact' if r['ok'] else 'CORRUPTED'}{bw}")
            return r

        rep.run(f"device_copies_{impl}", "device layer: copies, streams, events", impl, copies)

        torch_skip = None
        if not available("torch"):
            torch_skip = "torch is not installed (the gather check runs torch.index_select on the device)"
        elif impl != "host" and not ctx.cuda.get("torch_cuda"):
            torch_skip = "torch has no CUDA here"

        def gather():
            r = gdc.check_gather(dev, require("torch"), cuda=impl != "host")
            bad = [k for k, v in r["cases"].items() if not v]
            r["detail"] = (f"keep_idx gather, {len(r['cases'])} cases (fp32/fp16: all, subset, single, empty, padded, "
                           f"permuted) by {r['runner']} on the layer's memory and stream: "
                           + ("bit-exact" if not bad else f"DIFFERS in {', '.join(bad)}"))
            return r

        rep.run(f"gather_torch_{impl}", "survivor regroup (gather)", f"{impl}+torch", gather, skip=torch_skip)

        def merge():
            r = gdc.check_refill_merge(dev, ctx.bundle)
            r["detail"] = (f"TrtBackend.merge_features: {r['merged_rows']} survivor rows of 2 groups copied d2d "
                           + ("bit-exact" if r["bit_exact"] else "DIFFER") + ("" if r["sources_released"] else ", sources NOT released"))
            return r

        rep.run(f"refill_merge_{impl}", "refill merge (d2d copies)", impl, merge)

        trt_skip = None if available("tensorrt") else "TensorRT is not installed"
        if impl == "host" and trt_skip is None:
            trt_skip = "dry run (no CUDA)"

        def trt_gather():
            r = gdc.check_trt_gather(dev, require("tensorrt"))
            bad = [k for k, v in r["cases"].items() if not v]
            r["detail"] = f"{r['runner']}, {len(r['cases'])} cases: " + ("bit-exact" if not bad else f"DIFFERS in {', '.join(bad)}")
            return r

        rep.run(f"gather_trt_{impl}", "survivor regroup (gather)", f"{impl}+trt", trt_gather, skip=trt_skip)
    finally:
        try:
            dev.close()
        except Exception:
            pass


def _torch_backend(ctx):
    from gpu_torch_backend import TorchStageBackend

    return TorchStageBackend(ctx.bundle, ctx.checkpoint, device=ctx.torch_device)


def step_torch_parity(ctx) -> dict:
    be = _torch_backend(ctx)
    ctx.torch_static = static_run(ctx.bundle, ctx.x, ctx.batch, be)
    r = stage_parity(ctx.cpu_static, ctx.torch_static, PRECISION_TOL["fp32"][2])
    r["detail"] = f"every stage on {ctx.x.shape[0]} samples vs ONNX Runtime CPU: " + r["detail"]
    return r


def step_torch_pipeline(ctx, variant: str) -> dict:
    a = ctx.args
    opts = {"default": {}, "refill": {"refill": True, "max_in_flight": a.in_flight + 1},
            "buckets": {"buckets": "pow2"}}[variant]
    kw = {"max_in_flight": a.in_flight}
    kw.update(opts)
    run = run_pipeline(ctx.bundle, _torch_backend(ctx), ctx.thresholds, ctx.x, ctx.batch, repeats=a.repeats,
                       static=variant == "default", **kw)
    got_conf = [s["confidence"] for s in ctx.torch_static] if ctx.torch_static else None
    c = compare_exits(ctx.cpu_pipe_dict(), run["results"], ctx.thresholds, [s["confidence"] for s in ctx.cpu_static],
                      got_conf, ctx.band, ref_logits=[s["logits"] for s in ctx.cpu_static])
    c.update(_timing(ctx, run))
    merged = sum(s.get("merged", 0) for s in run["stats"])
    padded = sum(s.get("padded", 0) for s in run["stats"])
    flight = f"{kw['max_in_flight']} batches of {ctx.batch} in flight"
    if variant == "refill":
        flight += f", refill merged {merged} groups"
    if variant == "buckets":
        flight += f", pow2 buckets padded {padded} rows"
    c["detail"] = _cmp_detail(c, _timing_text(c)) + f" ({flight}; vs the CPU pipeline)"
    return c


def step_ort_cuda(ctx) -> dict:
    a = ctx.args
    run = run_pipeline(ctx.bundle, "ort", ctx.thresholds, ctx.x, ctx.batch, repeats=a.repeats, max_in_flight=a.in_flight,
                       backend_options={"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]})
    c = compare_exits(ctx.cpu_pipe_dict(), run["results"], ctx.thresholds, [s["confidence"] for s in ctx.cpu_static], None,
                      ctx.band, ref_logits=[s["logits"] for s in ctx.cpu_static])
    c.update(_timing(ctx, run))
    c["detail"] = _cmp_detail(c, _timing_text(c)) + " (IOBinding keeps features on the device; vs the CPU pipeline)"
    return c


# --- TensorRT ---------------------------------------------------------------------------------------------
def precision_bundle(ctx, precision: str) -> str | None:
    """The bundle for ``precision``: the fp32 one, the kit's, or compiled here from the checkpoint (int8 needs ModelOpt)."""
    if precision == "fp32":
        return ctx.bundle_path
    if precision in ctx.kit_bundles and os.path.isdir(ctx.kit_bundles[precision]):
        return ctx.kit_bundles[precision]
    if not ctx.checkpoint:
        return None
    from dmpo_edge.compile import compile_bundle

    out = os.path.join(ctx.work, f"src_bundle_{precision}")
    compile_bundle(ctx.checkpoint, out, precision=precision, calib="digits:train", calib_count=256, holdout="digits:val",
                   max_batch=ctx.bundle.max_batch, force=True, progress=False, build="never", exporter=ctx.args.exporter,
                   log=lambda m: print(m, file=sys.stderr), accept_drop=True)  # a check measures; it does not gate
    return out


def _engine_stage_timing(be, bundle, x, batch: int, reps: int) -> list:
    """Median ms of each stage engine at ``batch``, input upload and the three small downloads included
    (every sample survives: keep_idx = arange; features stay on the device between stages)."""
    xb = x[:batch]
    keep = np.arange(xb.shape[0], dtype=np.int32)
    out_ms = []
    feats = None
    for k in range(bundle.num_stages):
        feeds = {"input": xb} if k == 0 else {"features": feats, "keep_idx": keep}
        times, last = [], None
        for _ in range(reps + 2):  # two warm-up runs
            t = time.perf_counter()
            res = be.infer(k, feeds, keep_features=True)
            times.append(time.perf_counter() - t)
            if last is not None:
                be.release(last)
            last = res.get("features")
        if feats is not None:
            be.release(feats)
        feats = last
        out_ms.append(1e3 * float(np.median(times[2:])))
    if feats is not None:
        be.release(feats)
    return out_ms


def step_trt(ctx, precision: str) -> None:
    rep = ctx.report
    a = ctx.args
    key = f"trt_{precision}"
    try:
        src = precision_bundle(ctx, precision)
    except DmpoEdgeError as exc:
        rep.add(f"{key}_bundle", f"TensorRT {precision}: bundle", "trt", SKIP, f"cannot make the {precision} bundle here: {exc}")
        return
    if src is None:
        rep.add(f"{key}_bundle", f"TensorRT {precision}: bundle", "trt", SKIP, f"no {precision} bundle in the kit and no checkpoint")
        return
    path = os.path.join(ctx.work, f"trt_bundle_{precision}")
    shutil.copytree(src, path, ignore=shutil.ignore_patterns("engines"), dirs_exist_ok=False)
    bundle = Bundle.load(path)
    band, share, tol = TRT_TOL[bundle.precision]

    def build():
        from dmpo_edge.compile import build_engines

        t = time.perf_counter()
        d = build_engines(path, force=True, log=lambda m: print(m, file=sys.stderr))
        with open(os.path.join(d, "engines.json")) as f:
            meta = json.load(f)
        return {"ok": True, "engines": d, "device_key": meta.get("device_key"),
                "build_s": round(time.perf_counter() - t, 1), "settings": meta.get("settings"),
                "detail": f"{bundle.num_stages} engines for {meta.get('device_key')} in {time.perf_counter() - t:.0f} s"}

    built = rep.run(f"{key}_build", f"TensorRT {precision}: build engines", "trt", build)
    if not built or not built.get("ok"):
        return
    from dmpo_edge.runtime.backends.trt import TrtBackend

    impl = "pycuda" if available("pycuda.driver") else "cuda-python"
    ort_ref = static_run(bundle, ctx.x, ctx.batch, ort_backend(bundle, a.threads, variant="default"))
    trt_static = {}

    def parity():
        with TrtBackend(bundle, device=impl) as be:
            trt_static["out"] = static_run(bundle, ctx.x, ctx.batch, be)
            ms = _engine_stage_timing(be, bundle, ctx.x, ctx.batch, a.engine_reps)
        r = stage_parity(ort_ref, trt_static["out"], tol)
        r["stage_ms"] = ms
        r["detail"] = (f"vs ONNX Runtime CPU on the same graphs: {r['detail']}; per-stage engine ms at batch {ctx.batch}: "
                       + " + ".join(f"{v:.2f}" for v in ms) + f" = {sum(ms):.2f}")
        return r

    rep.run(f"{key}_parity", f"TensorRT {precision}: stage parity + timing", f"trt/{impl}", parity)

    cpu = run_pipeline(bundle, "ort", ctx.thresholds, ctx.x, ctx.batch, repeats=0, max_in_flight=a.in_flight,
                       backend_options={"providers": ["CPUExecutionProvider"], "threads": a.threads, "variant": "default"},
                       static=False)["results"]
    impls = [impl] + (["cuda-python"] if precision == "fp32" and impl == "pycuda" and
                      (available("cuda.bindings.runtime") or available("cuda.cudart")) else [])
    for dev_impl in impls:
        for variant, extra in (("default", {}), ("refill", {"refill": True, "max_in_flight": a.in_flight + 1}),
                               ("graphs", {"buckets": "pow2"})):
            def pipe(dev_impl=dev_impl, variant=variant, extra=extra):
                kw = {"max_in_flight": a.in_flight}
                kw.update(extra)
                # graphs: pow2 batch buckets, one CUDA graph per (stage, bucket shape, bound buffers)
                be = TrtBackend(bundle, device=dev_impl, features_buffers=kw["max_in_flight"] + 2,
                                cuda_graphs=True if variant == "graphs" else None)
                run = run_pipeline(bundle, be, ctx.thresholds, ctx.x, ctx.batch, repeats=a.repeats,
                                   static=variant == "default", **kw)
                got_conf = [s["confidence"] for s in trt_static["out"]] if trt_static.get("out") else None
                c = compare_exits({"exit_stage": cpu.exit_stage, "prediction": cpu.prediction, "confidence": cpu.confidence},
                                  run["results"], ctx.thresholds, [s["confidence"] for s in ort_ref], got_conf, band,
                                  max_share=share, ref_logits=[s["logits"] for s in ort_ref])
                c.update(_timing(ctx, run))
                gs = ""
                if variant == "graphs":
                    c["graph_stats"] = be.graph_stats()
                    gs = ("; graphs: {captured} captured, {launched} launches, {enqueued} enqueues, "
                          "{capture_failed} failed captures").format(**c["graph_stats"])
                    if c["graph_stats"]["launched"] == 0 and c["graph_stats"]["capture_failed"] == 0:
                        c["ok"] = False  # graphs were asked for and never ran
                c["detail"] = (_cmp_detail(c, _timing_text(c)) + f" ({kw['max_in_flight']} in flight, {variant}; "
                               f"vs ORT CPU pipeline{gs})")
                return c

            rep.run(f"{key}_pipeline_{dev_impl}_{variant}", f"TensorRT {precision}: early-exit pipeline", f"trt/{dev_impl}", pipe)


# ----------------------------------------------------------------------------------------------------------
# the kit (benchmarks/gpu_kit.sh calls --prepare-kit)
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------
def default_out() -> str:
    return os.environ.get("DMPO_GPU_CHECK_OUT") or os.environ.get("OUT") or os.path.join(os.getcwd(), "gpu_check_out")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU self-test: every step that needs no CUDA (torch backend on the CPU)")
    p.add_argument("--out", default=None, help="results folder (default $DMPO_GPU_CHECK_OUT, $OUT, ./gpu_check_out)")
    p.add_argument("--bundle", help="an fp32 bundle to check (with --model: the checkpoint it was compiled from)")
    p.add_argument("--model", help="a checkpoint (model.pt): compiled to an fp32 bundle here unless --bundle is given")
    p.add_argument("--kit", default=DEFAULT_KIT, help="the kit folder from benchmarks/gpu_kit.sh (default out/gpu_kit)")
    p.add_argument("--no-kit", action="store_true", help="ignore the kit's bundles (pycuda sdist and wheels are still used)")
    p.add_argument("--samples", type=int, default=None, help="inputs (digits, repeated as needed; default 1024, dry run 160)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 48, dry run 24; at most the bundle's max batch)")
    p.add_argument("--in-flight", type=int, default=3, help="batches in flight in the pipeline (default 3)")
    p.add_argument("--thresholds", default="spread", help="'spread' (default: every exit takes a share), 'manifest', or K-1 floats")
    p.add_argument("--band", type=float, default=DEFAULT_BAND, help="confidence distance to a threshold within which fp32 "
                   "disagreements are listed rather than failed (default 1e-4)")
    p.add_argument("--precisions", default="fp32,fp16,int8", help="TensorRT bundles to build and check (default fp32,fp16,int8)")
    p.add_argument("--device-impl", default="all", choices=("all", "pycuda", "cuda-python"), help="device layers to check")
    p.add_argument("--install-pycuda", default="auto", choices=("auto", "never"), help="build pycuda from the kit's sdist when missing")
    p.add_argument("--pycuda-timeout", type=float, default=300.0, help="seconds allowed for building pycuda (default 300)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps of the tiny ViT (default 60, dry run 25)")
    p.add_argument("--max-batch", type=int, default=None, help="max batch of bundles compiled here (default 64, dry run 32)")
    p.add_argument("--exporter", default=None, choices=("auto", "dynamo", "torchscript"),
                   help="ONNX exporter for bundles compiled here (default auto; dry run torchscript, the faster one)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of each pipeline run (default 5, dry run 0)")
    p.add_argument("--engine-reps", type=int, default=20, help="timed runs of each stage engine (default 20)")
    p.add_argument("--copy-mib", type=int, default=None, help="MiB moved by the copy check (default 64, dry run 4)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads (default all cores, dry run 1)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds after which remaining checks are skipped (default 480)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work folder (bundles, engines)")
    p.add_argument("--prepare-kit", metavar="DIR", help="write the kit's checkpoint and bundles into DIR and exit (gpu_kit.sh)")
    a = p.parse_args(argv)
    dry = a.dry_run
    a.samples = a.samples or (160 if dry else 1024)
    a.batch = a.batch or (24 if dry else 48)
    a.train_steps = a.train_steps if a.train_steps is not None else (25 if dry else 60)
    a.max_batch = a.max_batch or (32 if dry else 64)
    a.exporter = a.exporter or ("torchscript" if dry else "auto")
    a.repeats = a.repeats if a.repeats is not None else (0 if dry else 5)
    a.copy_mib = a.copy_mib or (4 if dry else 64)
    a.threads = a.threads or (1 if dry else max(1, os.cpu_count() or 1))
    if a.samples < 1 or a.batch < 1 or a.in_flight < 1:
        p.error("--samples, --batch and --in-flight must be positive")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.dry_run or args.prepare_kit:
        # 2-core CI machines: one torch thread avoids oversubscription between torch and ONNX Runtime
        if available("torch"):
            require("torch").set_num_threads(1)
    if args.prepare_kit:
        return prepare_kit(args)
    out = os.path.abspath(args.out or default_out())
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dmpo-gpu-check-")
    site = os.path.join(tempfile.gettempdir(), f"dmpo-gpu-check-site-py{sys.version_info[0]}{sys.version_info[1]}")
    os.makedirs(site, exist_ok=True)
    _add_site(site)  # pycuda / wheels built by an earlier run are reused
    report = Report(args.budget)
    cuda = probe_cuda()
    if not cuda["present"] and not args.dry_run:
        print("gpu check | no CUDA device visible (torch.cuda, pycuda and cuda-python see none). "
              "Run on a GPU machine, or use --dry-run for the CPU self-test", file=sys.stderr)
        return 2
    ctx = Ctx(args, report, work, site, cuda)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    env = environment(args, cuda)
    gpu = f"{cuda['gpu']} sm{cuda['sm']}" if cuda.get("gpu") else ("CUDA via the device layer" if cuda["present"] else "no GPU")
    report.add("environment", "environment", "-", INFO,
               f"{'DRY RUN (CPU), ' if args.dry_run else ''}{gpu}; torch {env['packages']['torch']}, TensorRT "
               f"{env.get('tensorrt') or '-'}, ORT {env['packages']['onnxruntime'] or env['packages']['onnxruntime-gpu'] or '-'}, "
               f"cuda-python {env['packages']['cuda-python'] or env['packages']['cuda-bindings'] or '-'}, "
               f"pycuda {env['packages']['pycuda'] or '-'}", env)
    try:
        # ---- pycuda -------------------------------------------------------------------------------------
        if available("pycuda.driver"):
            report.add("pycuda", "pycuda", "-", INFO, f"pycuda {installed_version('pycuda')} imports")
        else:
            skip = (f"dry run: {pycuda_plan(args.kit)}" if args.dry_run else
                    "--install-pycuda never" if args.install_pycuda == "never" else None)
            report.run("pycuda", "pycuda from the kit sdist", "-", lambda: install_pycuda(args.kit, site, args.pycuda_timeout),
                       skip=skip)
        # ---- bundle and CPU reference ------------------------------------------------------------------
        res = report.run("bundle", "bundle", "-", lambda: resolve_bundle(ctx))
        if not res or not res.get("ok"):
            raise _Abort("no bundle to check")
        ctx.batch = min(args.batch, ctx.bundle.max_batch)
        res = report.run("cpu_reference", "CPU reference (all stages)", "ort/cpu", lambda: step_cpu_reference(ctx))
        if res is None or res.get("ok") is False:
            raise _Abort("no CPU reference")
        res = report.run("cpu_pipeline", "early-exit pipeline", "ort/cpu", lambda: step_cpu_pipeline(ctx))
        if res is None or ctx.cpu_pipe is None:
            raise _Abort("no CPU pipeline results")
        # ---- device layer --------------------------------------------------------------------------------
        impls = device_impls(ctx)
        if not impls:
            report.add("device_layer", "device layer", "-", FAIL, "neither pycuda nor cuda-python imports: the TensorRT "
                       "backend has no device layer. pip install cuda-python (or build pycuda)")
        for impl in impls:
            step_device_layer(ctx, impl)
        # ---- GPU pipeline through torch (the engines' stand-in) ------------------------------------------
        tb = f"torch/{ctx.torch_device}"
        skip = None
        if not available("torch"):
            skip = "torch is not installed"
        elif not args.dry_run and not cuda["torch_cuda"]:
            skip = "torch has no CUDA here"
        elif not ctx.checkpoint:
            skip = "no checkpoint for the bundle (pass --model)"
        report.run("torch_parity", "stage parity (all stages)", tb, lambda: step_torch_parity(ctx), skip=skip)
        for variant in ("default", "refill", "buckets"):
            report.run(f"torch_pipeline_{variant}", f"early-exit pipeline ({variant})", tb,
                       lambda variant=variant: step_torch_pipeline(ctx, variant), skip=skip)
        if "CUDAExecutionProvider" in (env.get("ort_providers") or []) and not args.dry_run:
            report.run("ort_cuda_pipeline", "early-exit pipeline", "ort/cuda", lambda: step_ort_cuda(ctx))
        # ---- TensorRT ------------------------------------------------------------------------------------
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        trt_skip = ("dry run (no CUDA)" if args.dry_run and available("tensorrt") else
                    None if available("tensorrt") else "TensorRT is not installed")
        if trt_skip:
            for prec in precisions:
                report.add(f"trt_{prec}", f"TensorRT {prec}: engines, parity, pipeline, timing", "trt", SKIP, trt_skip)
        else:
            for prec in precisions:
                try:
                    step_trt(ctx, prec)
                except Exception as exc:
                    report.add(f"trt_{prec}", f"TensorRT {prec}", "trt", FAIL, _one_line(exc),
                               {"traceback": traceback.format_exc(limit=8)})
    except _Abort as exc:
        report.add("aborted", "remaining checks", "-", SKIP, f"not run: {exc}")
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    summary = report.summary()
    doc = {
        "format": FORMAT, "version": 1, "dry_run": bool(args.dry_run), "started_utc": started,
        "seconds": round(report.elapsed(), 1), "summary": summary, "environment": env,
        "settings": {k: v for k, v in vars(args).items()}, "thresholds": ctx.thresholds, "band": args.band,
        "checks": report.checks, "table": [list(r) for r in report.rows], "extra": ctx.extra,
        "work_dir": work if args.keep_work else None,
    }
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(_jsonable(doc), f, indent=2)
    table = report.table()
    with open(os.path.join(out, "gpu_check.txt"), "w") as f:
        f.write(table + "\n")
    print(f"results: {os.path.join(out, 'gpu_check.json')}\n")
    print(table)
    return 0 if summary["ok"] else 1


class _Abort(Exception):
    pass


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DmpoEdgeError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(2)
