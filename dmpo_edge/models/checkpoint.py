"""model.pt: a plain dict that loads with ``torch.load(weights_only=True)``.

``{"format": "dmpo-edge-model", "version": 1, "config", "state_dict", "classes", "preprocess", "loss_schedule",
"metrics"}`` with JSON-like values and tensors only: loading never runs code from the file. A user's own pickled
``nn.Module`` (following the EarlyExitModel contract) loads only with ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings

from .._lazy import require
from ..bundle import shared_file_mode
from ..locking import writer_lock
from ..errors import DmpoEdgeError

torch = require("torch", "models")

__all__ = ["FORMAT", "VERSION", "build_model", "save_checkpoint", "load_checkpoint"]

FORMAT = "dmpo-edge-model"
VERSION = 1


def build_model(config: dict, load_weights: bool = True):
    """A DMPO early-exit model from its config (``dmpo_edge.models.config.DEFAULTS`` lists the keys).

    ``load_weights`` loads the pre-trained backbone named by ``config['pretrained']``; checkpoints skip it.
    """
    from .dmpo import DMPOModel

    return DMPOModel(config, load_weights=load_weights)


def _json_like(value, where: str):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise DmpoEdgeError("checkpoint", f"{where} is not JSON-serialisable ({exc}). Expected plain numbers, strings, lists, dicts") from None


def save_checkpoint(path, model, *, classes, preprocess: dict, loss_schedule: dict, metrics: dict) -> str:
    """Write model.pt atomically (temp file in the same folder + rename): a crash never leaves half a file."""
    if hasattr(model, "module"):  # DDP wrapper
        model = model.module
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise DmpoEdgeError("checkpoint", "the model has no 'config' dict. Expected a model from build_model()")
    classes = [str(c) for c in classes]
    if len(classes) != int(config["num_classes"]):
        raise DmpoEdgeError("checkpoint", f"{len(classes)} class names for a model with {config['num_classes']} classes")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": _json_like(config, "config"),
        "state_dict": state,
        "classes": classes,
        "preprocess": _json_like(dict(preprocess), "preprocess"),
        "loss_schedule": _json_like(dict(loss_schedule), "loss_schedule"),
        "metrics": _json_like(dict(metrics), "metrics"),
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with writer_lock(path, "checkpoint", "save checkpoint", swaps=False):
        _write_payload(payload, path, folder)
    return path


def _write_payload(payload: dict, path: str, folder: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".pt.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fchmod(f.fileno(), shared_file_mode(path))  # 0644 as documented, not mkstemp's 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _foreign_module(path: str, allow_pickle: bool):
    if not allow_pickle:
        raise DmpoEdgeError(
            "checkpoint",
            f"'{path}' holds pickled Python objects (e.g. a whole nn.Module), and unpickling runs code from the file. "
            "If you trust it, pass allow_pickle=True (CLI: --allow-pickle); otherwise save a dmpo-edge checkpoint",
        )
    warnings.warn(f"checkpoint | unpickling '{path}' runs code from the file; only do this for files you trust", stacklevel=3)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DmpoEdgeError("checkpoint", f"cannot unpickle '{path}' ({type(exc).__name__}: {exc})") from None
    model = obj.get("model") if isinstance(obj, dict) else obj
    missing = [a for a in ("num_stages", "forward_stage", "forward_exit") if not hasattr(model, a)]
    if not isinstance(model, torch.nn.Module) or missing:
        raise DmpoEdgeError(
            "checkpoint",
            f"'{path}' is not a dmpo-edge checkpoint nor an nn.Module following the EarlyExitModel contract "
            f"(missing {missing or 'nn.Module'}). Expected num_stages, forward_stage(k, x), forward_exit(k, feats)",
        )
    model.eval()
    extra = obj if isinstance(obj, dict) else {}
    config = extra.get("config", getattr(model, "config", None)) or {}
    num_classes = config.get("num_classes") or getattr(model, "num_classes", None)
    classes = extra.get("classes") or getattr(model, "classes", None) or (
        [str(i) for i in range(int(num_classes))] if num_classes else [])
    from ..preprocess import Preprocess

    pre = extra.get("preprocess") or getattr(model, "preprocess", None) or Preprocess().to_dict()
    meta = {
        "format": "pickled-module", "version": None, "config": dict(config), "classes": list(classes),
        "preprocess": dict(pre), "loss_schedule": dict(extra.get("loss_schedule") or {}),
        "metrics": dict(extra.get("metrics") or {}),
    }
    return model, meta


def load_checkpoint(path, allow_pickle: bool = False):
    """model.pt -> ``(model, meta)``; the model is in eval mode on the CPU.

    ``meta`` has ``config``, ``classes``, ``preprocess``, ``loss_schedule``, ``metrics`` (+ ``format``, ``version``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DmpoEdgeError("checkpoint", f"'{path}' does not exist. Expected a model.pt written by 'dmpo-edge tune'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses classes/functions: a pickled module; anything else is not a torch file at all
        if "Unsupported global" in str(exc) or "GLOBAL " in str(exc):
            return _foreign_module(path, allow_pickle)
        raise DmpoEdgeError("checkpoint", f"'{path}' is not a dmpo-edge checkpoint ({exc.__class__.__name__}). Expected a model.pt written by 'dmpo-edge tune'") from None
    except Exception as exc:
        raise DmpoEdgeError(
            "checkpoint", f"'{path}' is not a dmpo-edge checkpoint (cannot read it: {type(exc).__name__}). "
            "Expected a model.pt written by 'dmpo-edge tune'"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        what = "a bare state dict" if isinstance(obj, dict) and obj and all(hasattr(v, "shape") for v in obj.values()) else "another file"
        raise DmpoEdgeError(
            "checkpoint", f"'{path}' is not a dmpo-edge checkpoint ({what}, no format marker '{FORMAT}'). "
            "Expected a model.pt written by 'dmpo-edge tune' or save_checkpoint()"
        )
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
        raise DmpoEdgeError("checkpoint", f"'{path}' has checkpoint version {version!r}; this dmpo-edge reads up to {VERSION}. Upgrade dmpo-edge")
    for key in ("config", "state_dict", "classes", "preprocess"):
        if key not in obj:
            raise DmpoEdgeError("checkpoint", f"'{path}' lacks '{key}'. Expected a complete dmpo-edge checkpoint")
    from ..preprocess import Preprocess
    from .config import normalize_config
    from .weights import load_checked

    sd, where = obj["state_dict"], f"checkpoint {os.path.basename(path)}"
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise DmpoEdgeError("checkpoint", f"'{path}' has a state_dict that is not a map of names to tensors")
    bad = next((k for k, v in sd.items() if v.is_complex()), None)
    if bad is not None:
        raise DmpoEdgeError("checkpoint", f"'{path}': tensor '{bad}' is {sd[bad].dtype}. Expected real-valued weights")
    cfg = normalize_config(obj["config"])
    classes = obj["classes"]
    if not isinstance(classes, list) or len(classes) != cfg["num_classes"] or not all(isinstance(c, str) for c in classes):
        raise DmpoEdgeError("checkpoint", f"'{path}' lists classes that are not {cfg['num_classes']} class names")
    if not isinstance(obj["preprocess"], dict):
        raise DmpoEdgeError("checkpoint", f"'{path}' has a preprocess record that is not a dict")
    Preprocess.from_dict(obj["preprocess"])
    extras = {k: {} if obj.get(k) is None else obj[k] for k in ("loss_schedule", "metrics")}
    if not all(isinstance(v, dict) for v in extras.values()):
        raise DmpoEdgeError("checkpoint", f"'{path}' has loss_schedule / metrics that are not dicts")
    try:
        # The config comes from the file: check it against the tensors the file holds on the meta device (no
        # memory) before building, so a 2 KB file describing a 50 GB model is refused instead of exhausting the machine.
        with torch.device("meta"):
            probe = build_model(cfg, load_weights=False)
        load_checked(probe, sd, where=where, check_only=True)
        del probe
        model = build_model(cfg, load_weights=False)
        load_checked(model, sd, where=where)
    except DmpoEdgeError:
        raise
    except Exception as exc:  # e.g. a head size the modules cannot take: still a bad file, not a crash
        raise DmpoEdgeError("checkpoint", f"'{path}': cannot build the model its config describes ({type(exc).__name__}: {exc})") from None
    model.eval()
    meta = {
        "format": FORMAT, "version": version, "config": model.config, "classes": list(classes),
        "preprocess": dict(obj["preprocess"]), "loss_schedule": dict(extras["loss_schedule"]),
        "metrics": dict(extras["metrics"]),
    }
    return model, meta
