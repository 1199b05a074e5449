"""Accuracy-versus-FLOPs plots (matplotlib, Agg backend, PNG), written atomically.

Inputs are the plain dicts of the calibration and evaluation reports (``OperatingPoint.to_dict()``), so
a plot can be redrawn from a saved JSON without running anything.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from .._lazy import require
from ..bundle import shared_file_mode
from ..errors import DmpoEdgeError

__all__ = ["plot_curves", "plot_calibration", "plot_evaluation", "save_figure_atomic"]

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def _pyplot():
    mpl = require("matplotlib", "plotting accuracy-versus-cost curves")
    mpl.use("Agg")  # headless: devices and CI have no display
    return require("matplotlib.pyplot", "plotting accuracy-versus-cost curves")


def save_figure_atomic(fig, path: str, dpi: int = 130) -> str:
    """Save to a temporary PNG beside ``path`` and rename it into place."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".png", dir=d)
    except OSError as exc:
        raise DmpoEdgeError("plot", f"cannot write '{path}' ({exc}). Expected a writable path") from None
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
        os.chmod(tmp, shared_file_mode(path))  # mkstemp's 0600 would hide the plot from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def plot_curves(curves, path: str, operating_points=(), anytime=(), title: str | None = None,
                full_flops: float | None = None) -> str:
    """Accuracy versus expected MFLOPs per sample.

    ``curves``: [{"label", "points": [point dicts]}] drawn as lines through the points sorted by cost;
    ``anytime``: [{"label", "exits": [{"cumulative_flops", "accuracy"}]}] drawn as markers (one per exit);
    ``operating_points``: [{"label", "point": point dict}] drawn as stars with a note.
    With ``full_flops`` a top axis shows the cost as % of the full model.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    try:
        for i, c in enumerate(curves):
            pts = sorted(c["points"], key=lambda p: (p["expected_flops"], p["accuracy"]))
            ax.plot([p["expected_flops"] / 1e6 for p in pts], [100 * p["accuracy"] for p in pts], "-o", ms=3, lw=1.4,
                    color=c.get("color", _COLORS[i % len(_COLORS)]), label=c["label"])
        for i, a in enumerate(anytime):
            ex = a["exits"]
            ax.plot([e["cumulative_flops"] / 1e6 for e in ex], [100 * e["accuracy"] for e in ex], "s", ms=6, mfc="none",
                    color=a.get("color", _COLORS[i % len(_COLORS)]), label=a["label"])
        for op in operating_points:
            p = op["point"]
            x, y = p["expected_flops"] / 1e6, 100 * p["accuracy"]
            color = op.get("color", "tab:red")
            marker = op.get("marker", "*")
            ax.plot([x], [y], marker, ms=16 if marker == "*" else 10, color=color, mec="black", mew=0.6, label=op["label"],
                    zorder=5)
            ax.annotate(f"{100 * p['accuracy']:.1f}% @ {100 * p['expected_cost']:.0f}% FLOPs",
                        (x, y), textcoords="offset points", xytext=op.get("offset", (8, -14)), fontsize=8, color=color,
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})
        ax.margins(x=0.04, y=0.1)  # room for the operating-point notes
        ax.set_xlabel("expected MFLOPs per sample")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(True, alpha=0.3)
        if full_flops:
            scale = 1e6 / float(full_flops) * 100.0
            top = ax.secondary_xaxis("top", functions=(lambda v: v * scale, lambda v: v / scale))
            top.set_xlabel("expected cost (% of the full model's FLOPs)")
        if title:
            ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="best")
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def plot_calibration(report: dict, path: str) -> str:
    """The validation sweep, the per-exit accuracies and the chosen thresholds of a calibration report."""
    chosen = report["chosen"]
    split = report.get("split", {})
    target = chosen.get("target")
    label = f"chosen ({chosen.get('method')}" + (f", target {target:g}" if isinstance(target, (int, float)) else "") + ")"
    return plot_curves(
        [{"label": "budgeted-batch sweep (validation)", "points": report["sweep"]}],
        path,
        operating_points=[{"label": label, "point": chosen}],
        anytime=[{"label": "single exit k (all samples)", "exits": report["exits"]}],
        title=f"calibration on {split.get('source', '?')} ({split.get('size', '?')} samples), "
              f"{report.get('precision', '')}, policy {report.get('policy', '')}",
        full_flops=report.get("full_flops"),
    )


def plot_evaluation(report: dict, path: str, label: str = "early exit") -> str:
    """Curve + per-exit accuracies + the manifest's operating point of an evaluation report."""
    ops = []
    if report.get("operating_point"):
        op = report["operating_point"]
        ops.append({"label": f"operating point ({op.get('method') or op.get('thresholds_from')})", "point": op})
    data = report.get("data", {})
    return plot_curves(
        [{"label": f"{label}: thresholds from {report['curve']['thresholds_from']}", "points": report["curve"]["points"]}],
        path,
        operating_points=ops,
        anytime=[{"label": "single exit k (all samples)", "exits": report["exits"]}],
        title=f"{os.path.basename(report.get('bundle', ''))} on {data.get('source', '?')} ({data.get('size', '?')} samples), "
              f"{report.get('precision', '')}",
        full_flops=report.get("full_flops"),
    )
