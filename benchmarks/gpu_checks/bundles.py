"""The bundles under check: the fp32 one (given, from the kit, or a tiny ViT compiled here), the other precisions,
and the inputs they are fed (digits preprocessed as the bundle says)."""

from __future__ import annotations

import os
import sys

import numpy as np

from dmpo_edge._lazy import require
from dmpo_edge.bundle import Bundle
from dmpo_edge.errors import DmpoEdgeError

from .kit import ensure_from_kit, make_tiny_checkpoint, read_kit

__all__ = ["resolve_bundle", "precision_bundle", "load_inputs", "compile_fp32", "find_source_checkpoint"]


def needs_efficientnet(checkpoint: str) -> bool:
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
        if needs_efficientnet(a.model):
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
    if ctx.checkpoint and needs_efficientnet(ctx.checkpoint):
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
