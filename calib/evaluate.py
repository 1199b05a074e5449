"""Stage outputs of a deployed bundle on labelled data, evaluation and threshold calibration.

Everything is measured on what runs on the device: the bundle's stage graphs at their precision in ONNX
Runtime (:func:`dmpo_edge.runtime.static.run_all_stages`, every stage on every sample), never on the
torch model. The threshold algorithms themselves are the numpy functions of
:mod:`dmpo_edge.calib.thresholds`.

Python API::

    out = stage_outputs(bundle, "digits:val")         # K x N confidences, predictions, labels
    report = evaluate(bundle, "digits:test")           # anytime accuracy, curve, operating point
    points = sweep(bundle, "digits:val")               # budgeted-batch sweep (list of OperatingPoint)
    record = calibrate(bundle, "digits:val", budget=0.4)  # writes manifest thresholds + reports/
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from .._lazy import require
from ..bundle import Bundle, remove_dead_temp_files, write_json_atomic
from ..locking import writer_lock
from ..errors import DmpoEdgeError
from ..policies import DEFAULT_POLICY, get_policy
from . import thresholds as th
from .datasets import Dataset, load_dataset

__all__ = [
    "StageOutputs", "stage_outputs", "evaluate", "sweep", "calibrate", "calibration_record", "load_calibration_report",
    "CALIBRATION_REPORT", "CALIBRATION_PLOT", "POLICY_TOLERANCE",
]

CALIBRATION_REPORT = "reports/calibration.json"
CALIBRATION_PLOT = "reports/calibration.png"
# Largest tolerated gap between a stage's ``confidence`` output and the manifest policy applied to its
# ``logits`` (fp16 graphs may compute the score in half precision); more means the graphs and the manifest disagree.
POLICY_TOLERANCE = 2e-2
# Images preprocessed and pushed through the stages at a time (bounds host memory on large splits).
CHUNK = 512


@dataclass
class StageOutputs:
    """Every stage's outputs on every sample of a labelled dataset (no exits)."""

    confidence: np.ndarray  # K x N float32 (the graphs' exit score)
    prediction: np.ndarray  # K x N int64
    logits: np.ndarray  # K x N x C float32
    labels: np.ndarray  # N int64, indices into the bundle's classes
    cumulative_flops: np.ndarray  # K float64
    policy: str
    data: dict  # source, size, fingerprint
    stage_files: list = field(default_factory=list)  # the files that ran (the cpu variant on the CPU)

    @property
    def num_stages(self) -> int:
        return self.confidence.shape[0]

    @property
    def num_samples(self) -> int:
        return self.confidence.shape[1]

    @property
    def correct(self) -> np.ndarray:
        return self.prediction == self.labels[None, :]

    @property
    def exit_accuracy(self) -> list:
        """Anytime accuracy: every sample classified by exit k."""
        return [float(a) for a in self.correct.mean(axis=1)]

    def policy_deviation(self) -> float:
        """Largest |confidence - policy(logits)| over stages and samples."""
        fn = get_policy(self.policy)
        if self.num_samples == 0:
            return 0.0
        return float(max(np.max(np.abs(fn(self.logits[k]) - self.confidence[k])) for k in range(self.num_stages)))


def _bundle(b) -> Bundle:
    if isinstance(b, Bundle):
        return b
    return Bundle.load(str(b))


def _dataset(d) -> Dataset:
    return d if isinstance(d, Dataset) else load_dataset(d)


def _labels_for_bundle(ds: Dataset, bundle: Bundle) -> np.ndarray:
    """The dataset's labels as indices into the bundle's classes (matched by class name)."""
    if ds.labels is None:
        raise DmpoEdgeError(
            "calibration", f"data '{ds.source}' has no labels (an unlabelled folder). Expected one sub-folder of images per "
            f"class, named like the bundle's classes: {', '.join(bundle.classes[:12])}{' ...' if len(bundle.classes) > 12 else ''}",
        )
    index = {c: i for i, c in enumerate(bundle.classes)}
    unknown = [c for c in ds.classes if c not in index]
    if unknown:
        def show(names):
            return ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")

        raise DmpoEdgeError(
            "calibration",
            f"the classes of data '{ds.source}' ({show(list(ds.classes))}) do not match the bundle's "
            f"({show(list(bundle.classes))}); not in the bundle: {show(unknown)}. Expected class folders named like the bundle's classes",
        )
    remap = np.array([index[c] for c in ds.classes], dtype=np.int64)
    return remap[np.asarray(ds.labels, np.int64)]


def stage_outputs(bundle, dataset, batch_size: int = 64, backend="ort", progress: bool = True) -> StageOutputs:
    """Run every stage of ``bundle`` on every image of the labelled ``dataset`` (a :class:`Dataset` or a spec)."""
    from ..runtime.backends import Backend, get_backend
    from ..runtime.static import run_all_stages

    b = _bundle(bundle)
    ds = _dataset(dataset)
    labels = _labels_for_bundle(ds, b)
    n, k_stages = len(ds), b.num_stages
    if isinstance(backend, Backend):
        be = backend
    else:
        be = get_backend(backend, b)(b)
    pre = b.preprocess
    parts = []
    bar = None
    if progress and n > 0:
        tqdm = require("tqdm", "a progress bar").tqdm
        bar = tqdm(total=n, desc="stage outputs", unit="img", leave=False)
    was_active = be.is_active
    be.activate()
    try:
        for s in range(0, n, CHUNK):
            x = pre(ds.images[s : s + CHUNK])
            parts.append(run_all_stages(b, x, batch_size=batch_size, backend=be))
            if bar is not None:
                bar.update(x.shape[0])
    finally:
        if bar is not None:
            bar.close()
        files = list(getattr(be, "files", []) or [])
        if not was_active:
            be.deactivate()
    c = len(b.classes)
    if parts:
        conf = np.stack([np.concatenate([p[k]["confidence"] for p in parts]) for k in range(k_stages)]).astype(np.float32)
        pred = np.stack([np.concatenate([p[k]["prediction"] for p in parts]) for k in range(k_stages)]).astype(np.int64)
        logits = np.stack([np.concatenate([p[k]["logits"] for p in parts]) for k in range(k_stages)]).astype(np.float32)
    else:
        conf = np.zeros((k_stages, 0), np.float32)
        pred = np.zeros((k_stages, 0), np.int64)
        logits = np.zeros((k_stages, 0, c), np.float32)
    return StageOutputs(
        confidence=conf, prediction=pred, logits=logits, labels=labels,
        cumulative_flops=np.asarray(b.cumulative_flops, np.float64),
        policy=b.manifest.get("exit_policy", DEFAULT_POLICY),
        data={"source": ds.source, "size": n, "fingerprint": ds.fingerprint()},
        stage_files=[os.path.relpath(f, b.path) for f in files],
    )


def _outputs(bundle, dataset, outputs, **kw) -> StageOutputs:
    if outputs is not None:
        return outputs
    if dataset is None:
        raise DmpoEdgeError("evaluate", "no data given. Pass a labelled dataset (folder or 'digits:test') or stage outputs")
    return stage_outputs(bundle, dataset, **kw)


def _check_policy(out: StageOutputs) -> float:
    dev = out.policy_deviation()
    if not dev <= POLICY_TOLERANCE:  # also catches NaN
        raise DmpoEdgeError(
            "calibration",
            f"the stages' confidence output differs from the manifest's exit policy '{out.policy}' applied to their "
            f"logits by up to {dev:.3g} (tolerance {POLICY_TOLERANCE}). The graphs and the manifest disagree; recompile the bundle",
        )
    return dev


def sweep(bundle=None, dataset=None, ps=th.SWEEP_P, outputs: StageOutputs | None = None, **kw) -> list:
    """Budgeted-batch sweep (MSDNet's p = 1/20 .. 39/20) with thresholds fit on ``dataset``'s stage outputs."""
    out = _outputs(bundle, dataset, outputs, **kw)
    return th.budgeted_batch_sweep(out.confidence, out.correct, out.cumulative_flops, ps)


def load_calibration_report(bundle) -> dict | None:
    """The bundle's ``reports/calibration.json`` or None when the bundle was never calibrated."""
    b = _bundle(bundle)
    path = os.path.join(b.path, CALIBRATION_REPORT)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            rep = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        warnings.warn(f"calibration | cannot read {path} ({exc}); ignoring it", stacklevel=2)
        return None
    return rep if isinstance(rep, dict) else None


def _anytime(out: StageOutputs) -> list:
    full = float(out.cumulative_flops[-1])
    return [{"exit": k, "accuracy": a, "cumulative_flops": float(f), "cost": float(f) / full}
            for k, (a, f) in enumerate(zip(out.exit_accuracy, out.cumulative_flops))]


def evaluate(bundle, dataset=None, thresholds=None, outputs: StageOutputs | None = None, **kw) -> dict:
    """Anytime accuracy, the accuracy-versus-FLOPs curve and the operating point of ``bundle`` on labelled data.

    ``thresholds``: K-1 values for the operating point (default: the manifest's). The curve applies the
    calibration sweep's thresholds (found on the calibration split, from ``reports/calibration.json``) to
    this data, as in MSDNet's protocol; a bundle never calibrated gets a sweep fit on this data itself,
    which is optimistic, and the report says so in ``curve.thresholds_from``.
    """
    b = _bundle(bundle)
    out = _outputs(b, dataset, outputs, **kw)
    if out.num_samples == 0:
        raise DmpoEdgeError("evaluate", "the data has no images. Expected a labelled folder or 'digits:test'")
    deviation = out.policy_deviation()
    conf, corr, flops = out.confidence, out.correct, out.cumulative_flops
    rep = load_calibration_report(b)
    stored = (rep or {}).get("sweep") or []
    if stored and all(len(p.get("thresholds", [])) == out.num_stages - 1 for p in stored):
        curve = [th.evaluate_thresholds(conf, corr, flops, p["thresholds"], {"p": p.get("p")}) for p in stored]
        split = rep.get("split", {})
        source = f"calibration split {split.get('source', '?')} ({split.get('size', '?')} samples)"
    else:
        curve = th.budgeted_batch_sweep(conf, corr, flops, check=False)
        source = "this data (the bundle has no calibration report; optimistic)"
    if thresholds is None:
        thresholds, op_from = b.thresholds, "manifest"
    else:
        op_from = "given"
    op = None
    if thresholds is not None:
        op = th.evaluate_thresholds(conf, corr, flops, thresholds).to_dict()
        op["thresholds_from"] = op_from
        mt = b.manifest.get("thresholds") or {}
        if op_from == "manifest":
            op.update({"method": mt.get("method"), "target": mt.get("target"),
                       "validation_accuracy": mt.get("accuracy"), "validation_cost": mt.get("expected_cost")})
    return {
        "bundle": b.path,
        "precision": b.precision,
        "policy": out.policy,
        "data": out.data,
        "stage_files": out.stage_files,
        "cumulative_flops": [float(f) for f in flops],
        "full_flops": float(flops[-1]),
        "full_flops_note": "cumulative_flops[-1]: every stage graph (trunk + every exit head), the static pipeline's cost",
        "exits": _anytime(out),
        "final_accuracy": out.exit_accuracy[-1],
        "confidence_policy_max_abs_diff": deviation,
        "curve": {"thresholds_from": source, "points": [p.to_dict() for p in curve],
                  "pareto": [p.to_dict() for p in th.pareto_front(curve)]},
        "operating_point": op,
    }


# --- calibration -----------------------------------------------------------------------------------------------
def _pick_from_sweep(points: list, pick_budget: float | None):
    if pick_budget is None:
        # no budget: the cheapest sweep point that reaches the sweep's best validation accuracy
        best = max(int(p.correct_counts.sum()) for p in points)
        chosen = min((p for p in points if int(p.correct_counts.sum()) == best), key=lambda p: p.expected_cost)
        return chosen, None
    ok = [p for p in points if p.expected_cost <= pick_budget]
    if not ok:
        lo = min(p.expected_cost for p in points)
        raise DmpoEdgeError(
            "calibration", f"no budgeted-batch sweep point costs at most {pick_budget:.4g} of the full FLOPs (cheapest sweep "
            f"point: {lo:.4g}). Raise --pick-budget or use --budget, which searches finer",
        )
    return max(ok, key=lambda p: (int(p.correct_counts.sum()), -p.expected_cost)), float(pick_budget)


def calibration_record(point: th.OperatingPoint, method: str, target, policy: str, data: dict,
                       full_flops: float) -> dict:
    """The manifest's ``thresholds`` entry for an operating point."""
    return {
        "values": [float(t) for t in point.thresholds],
        "method": method,
        "target": target,
        "policy": policy,
        "expected_exit_distribution": point.exit_distribution,
        "accuracy": point.accuracy,
        "expected_cost": float(point.expected_cost),
        "expected_flops": float(point.expected_flops),
        "full_flops": float(full_flops),
        "speedup_ideal": float(point.speedup_ideal),
        "split": dict(data),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_target(name: str, value, lo_open: float, hi: float):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (lo_open < value <= hi):
        raise DmpoEdgeError("calibration", f"{name} {value!r} is out of range. Expected a number in ({lo_open}, {hi}]")


def calibrate(bundle, dataset=None, *, write: bool = True, **kw) -> dict:
    """See :func:`_calibrate`. A writing calibration holds the bundle's writer lock from before it reads the bundle
    to its last write, so a ``compile --force`` or a second ``calibrate`` of the same bundle is refused meanwhile."""
    if not write:
        return _calibrate(bundle, dataset, write=False, **kw)
    path = bundle.path if isinstance(bundle, Bundle) else str(bundle)
    with writer_lock(path, f"bundle {path}", "calibrate"):
        return _calibrate(bundle, dataset, write=True, **kw)


def _calibrate(bundle, dataset=None, *, budget: float | None = None, max_drop: float | None = None, sweep_only: bool = False,
               pick_budget: float | None = None, outputs: StageOutputs | None = None, write: bool = True,
               plot: bool = True, **kw) -> dict:
    """Choose exit thresholds on a labelled held-out split and (``write=True``) record them in the bundle.

    Exactly one of ``budget`` (best accuracy with expected cost <= budget), ``max_drop`` (cheapest within
    ``max_drop`` of the last exit's accuracy) or ``sweep_only`` (a budgeted-batch sweep point: the best one
    under ``pick_budget``, or without it the cheapest one with the sweep's best accuracy).
    Writes ``reports/calibration.json`` and ``reports/calibration.png`` atomically, then the manifest's
    ``thresholds`` (one atomic rename each; stage files are untouched). Returns the report.
    """
    chosen_modes = [m for m, on in (("budget", budget is not None), ("max_drop", max_drop is not None),
                                     ("sweep", bool(sweep_only))) if on]
    if len(chosen_modes) != 1:
        raise DmpoEdgeError("calibration", f"choose exactly one of --budget, --max-drop, --sweep (got {chosen_modes or 'none'})")
    if pick_budget is not None and not sweep_only:
        raise DmpoEdgeError("calibration", "--pick-budget goes with --sweep (with --budget the solver already meets the budget)")
    _check_target("budget", budget, 0.0, 1.0)
    _check_target("pick budget", pick_budget, 0.0, 1.0)
    if max_drop is not None and (isinstance(max_drop, bool) or not isinstance(max_drop, (int, float))
                                 or not math.isfinite(max_drop) or not 0 <= max_drop < 1):
        raise DmpoEdgeError("calibration", f"max drop {max_drop!r} is out of range. Expected an accuracy fraction in [0, 1), e.g. 0.01")
    b = _bundle(bundle)
    if b.num_stages < 2:
        raise DmpoEdgeError("calibration", "the bundle has a single stage, so there is no early exit to calibrate")
    out = _outputs(b, dataset, outputs, **kw)
    deviation = _check_policy(out)
    conf, corr, flops = th.check_calibration_arrays(out.confidence, out.correct, out.cumulative_flops)
    points = th.budgeted_batch_sweep(conf, corr, flops, check=False)
    if budget is not None:
        point = th.solve_budget(conf, corr, flops, float(budget), sweep_points=points)
        method, target = "budget", float(budget)
    elif max_drop is not None:
        point = th.solve_max_drop(conf, corr, flops, float(max_drop), sweep_points=points)
        method, target = "max_drop", float(max_drop)
    else:
        point, target = _pick_from_sweep(points, pick_budget)
        method = "budgeted_batch"
    record = calibration_record(point, method, target, out.policy, out.data, float(flops[-1]))
    report = {
        "bundle": b.path,
        "precision": b.precision,
        "policy": out.policy,
        "split": out.data,
        "stage_files": out.stage_files,
        "protocol": "budgeted batch as MSDNet (Huang et al., ICLR 2018): exit k's share of samples proportional to p^k, "
                    "p = 1/20 .. 39/20; quota floor(N * share); threshold = confidence of the quota-th remaining sample",
        "cumulative_flops": [float(f) for f in flops],
        "full_flops": float(flops[-1]),
        "exits": _anytime(out),
        "confidence_policy_max_abs_diff": deviation,
        "minimum_cost": th.minimum_cost(flops),
        "sweep": [p.to_dict() for p in points],
        "chosen": {**point.to_dict(), "method": method, "target": target},
        "thresholds": record,
    }
    if write:
        _write_calibration(b, report, record, plot)
    return report


def _write_calibration(b: Bundle, report: dict, record: dict, plot: bool) -> None:
    """Plot, report, then manifest: each an atomic rename, the manifest last so it never names a missing report.
    All three happen after the bundle on disk is re-checked to be the one measured (see Bundle.update_manifest)."""

    def write_reports():
        reports_dir = os.path.join(b.path, "reports")
        if os.path.islink(reports_dir):  # a link could send the writes anywhere on the machine
            raise DmpoEdgeError(f"bundle {b.path}", "reports/ is a symbolic link. Replace it with a folder")
        os.makedirs(reports_dir, exist_ok=True)
        remove_dead_temp_files(reports_dir)
        if plot:
            from .plots import plot_calibration

            plot_calibration(report, os.path.join(b.path, CALIBRATION_PLOT))
        write_json_atomic(os.path.join(b.path, CALIBRATION_REPORT), report)

    try:
        changes = {"thresholds": record}
        reports = b.manifest.get("reports")
        if reports is None or isinstance(reports, dict):  # another layout is left alone
            reports = dict(reports or {})
            reports["calibration"] = CALIBRATION_REPORT
            if plot:
                reports["calibration_plot"] = CALIBRATION_PLOT
            changes["reports"] = reports
        b.update_manifest(changes, before_write=write_reports)
    except OSError as exc:
        raise DmpoEdgeError(f"bundle {b.path}", f"cannot write the calibration ({exc}). Expected a writable bundle folder") from None
