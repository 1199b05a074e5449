"""Readable summaries of a bundle (numpy-only) and of a model.pt (torch): what ``dmpo-edge inspect`` prints."""

from __future__ import annotations

import json
import os

from ..bundle import Bundle
from ..errors import DmpoEdgeError
from ..policies import format_thresholds
from .trt_settings import ENGINES_DIR, ENGINES_JSON

__all__ = ["summarize", "bundle_summary", "checkpoint_summary", "engines_present"]


def _mflops(v) -> str:
    return "-" if v is None else f"{float(v) / 1e6:.2f}"


def _shape(t: dict) -> str:
    return f"{t['name']}[{', '.join(str(d) for d in t['shape'])}] {t['dtype']}"


def engines_present(bundle_path: str) -> list:
    """[(device key, engines.json dict)] of engine builds inside the bundle."""
    root = os.path.join(bundle_path, ENGINES_DIR)
    out = []
    if not os.path.isdir(root):
        return out
    for name in sorted(os.listdir(root)):
        p = os.path.join(root, name, ENGINES_JSON)
        if name.startswith(".") or not os.path.isfile(p):
            continue
        try:
            with open(p) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError):
            meta = {"error": "unreadable engines.json"}
        out.append((meta.get("device_key", name) if isinstance(meta, dict) else name, meta))
    return out


def bundle_summary(path: str, verify: bool = True) -> str:
    b = Bundle.load(path, verify=verify)
    m = b.manifest
    model = m["model"]
    prec = m["precision"]
    lines = [f"bundle {b.path}" + ("  (checksums verified)" if verify else ""),
             f"  model      {model.get('name')}  backbone {model.get('backbone')}  {model.get('num_classes')} classes: "
             f"{', '.join(model['classes'][:10])}{' ...' if len(model['classes']) > 10 else ''}"]
    pre = m["preprocess"]
    lines.append(f"  preprocess resize {pre.get('resize')} crop {pre.get('crop')} -> {pre.get('size')} {pre.get('layout')}, "
                 f"mean {pre.get('mean')} std {pre.get('std')}")
    tool = prec.get("tool")
    calib = prec.get("calibration") or {}
    lines.append(f"  precision  {prec['mode']}" + (f" via {tool}" if tool else "")
                 + (f"; calibrated on {calib.get('source')} ({calib.get('count')} images, {calib.get('method', '')}, "
                    f"sha256 {str(calib.get('fingerprint'))[:12]})" if calib else ""))
    cpu = prec.get("cpu_variant")
    if cpu and cpu.get("format"):
        t = cpu.get("timings_ms", {})
        lines.append(f"  cpu form   {cpu['format']} ({cpu.get('activations')}, {cpu.get('weights')}); "
                     f"{t.get('cpu_variant')} ms vs fp32 {t.get('fp32')} ms per {cpu.get('timing_batch')} samples, all stages")
    tools = prec.get("tools") or {}
    if tools:
        lines.append("  tools      " + ", ".join(f"{k} {v}" for k, v in tools.items() if v))
    lines.append(f"  exit policy {m['exit_policy']}   regroup {m['regroup']}   max batch {m['max_batch']}")
    lines.append("  stages")
    for st in b.stages:
        var = ", cpu variant " + st["variants"]["cpu"]["file"] if st.get("variants", {}).get("cpu") else ""
        lines.append(f"    {st['index']}: {st['file']}{var}  {_mflops(st['flops'])} MFLOPs "
                     f"(cumulative {_mflops(st['cumulative_flops'])})")
        lines.append(f"       in : {'; '.join(_shape(t) for t in st['inputs'])}")
        lines.append(f"       out: {'; '.join(_shape(t) for t in st['outputs'])}")
    th = m.get("thresholds")
    if th:
        lines.append(f"  thresholds {format_thresholds(th['values'])}  (method {th.get('method')}, "
                     f"target {th.get('target')})")
        dist = th.get("expected_exit_distribution")
        if dist:
            lines.append("             expected exits % " + " / ".join(f"{100 * d:.0f}" for d in dist))
    else:
        lines.append("  thresholds none yet (run 'dmpo-edge calibrate')")
    rep = os.path.join(b.path, "reports", "precision.json")
    if os.path.isfile(rep):
        with open(rep) as f:
            r = json.load(f)
        for name, per_exit in r.get("variants", {}).items():
            accs = " / ".join(
                f"{100 * e['fp32_accuracy']:.1f}->{100 * e['accuracy']:.1f}" if e.get("accuracy") is not None
                else f"agree {100 * e['top1_agreement']:.1f}" for e in per_exit)
            lines.append(f"  accuracy   fp32 -> {name} per exit (%): {accs}")
    engines = engines_present(b.path)
    if engines:
        for key, meta in engines:
            n = len(meta.get("engines", [])) if isinstance(meta, dict) else 0
            lines.append(f"  engines    {key}: {n} engine(s), built {meta.get('built_utc', '?')}")
    else:
        lines.append(f"  engines    none (build on the target: dmpo-edge build {b.path})")
    return "\n".join(lines)


def checkpoint_summary(path: str, allow_pickle: bool = False) -> str:
    from ..models import load_checkpoint

    model, meta = load_checkpoint(path, allow_pickle=allow_pickle)
    cfg = meta.get("config") or {}
    met = meta.get("metrics") or {}
    classes = meta.get("classes") or []
    lines = [f"model.pt {os.path.abspath(path)}",
             f"  format     {meta.get('format')} v{meta.get('version')}",
             f"  backbone   {cfg.get('backbone')}  image {cfg.get('image_size')}  exits after blocks {cfg.get('exits')}  "
             f"({model.num_stages} stages)",
             f"  classes    {len(classes)}: {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}",
             "  config     " + json.dumps(cfg, sort_keys=True)]
    pre = meta.get("preprocess") or {}
    lines.append(f"  preprocess resize {pre.get('resize')} crop {pre.get('crop')} mean {pre.get('mean')} std {pre.get('std')}")
    acc = met.get("exit_accuracy")
    if acc:
        lines.append("  accuracy   per exit (%): " + " / ".join(f"{100 * a:.1f}" for a in acc)
                     + (f"  on {met.get('val_data')}" if met.get("val_data") else ""))
    if met.get("cumulative_flops"):
        lines.append("  FLOPs      cumulative per exit (M): " + " / ".join(_mflops(v) for v in met["cumulative_flops"]))
    ls = meta.get("loss_schedule") or {}
    if ls:
        lines.append(f"  schedule   {ls.get('mode')}  epochs {ls.get('epochs')}  switch at epoch {ls.get('switch_epoch')}")
    return "\n".join(lines)


def summarize(path: str, verify: bool = True, allow_pickle: bool = False) -> str:
    """Summary of a bundle folder or a model.pt file."""
    if os.path.isdir(path):
        return bundle_summary(path, verify)
    if os.path.isfile(path):
        return checkpoint_summary(path, allow_pickle)
    raise DmpoEdgeError("inspect", f"'{path}' does not exist. Expected a bundle folder or a model.pt")
