"""The sweep plot of ``dmpo-edge bench --sweep``: throughput and speed-up against the realised cost."""

from __future__ import annotations

import os

from .._lazy import require

__all__ = ["plot_sweep"]


def plot_sweep(report: dict, path: str) -> str:
    """Latency and speed-up across the sweep, one line per batch size (PNG, Agg backend)."""
    require("matplotlib", "the sweep plot").use("Agg")
    plt = require("matplotlib.pyplot", "the sweep plot")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in report.get("sweep") or []:
        pts = sorted(r["early_exit"], key=lambda e: e["exits"]["expected_cost"])
        cost = [e["exits"]["expected_cost"] for e in pts]
        line, = ax1.plot(cost, [e["throughput"] for e in pts], "o-", label=f"early exit, batch {r['batch']}")
        ax1.axhline(r["static"]["throughput"], color=line.get_color(), ls="--", lw=1, label=f"static, batch {r['batch']}")
        if r.get("peer"):
            ax1.axhline(r["peer"]["throughput"], color=line.get_color(), ls="-.", lw=1, label=f"peer (one graph), batch {r['batch']}")
            ax2.plot(cost, [e["speedup"].get("over_peer") for e in pts], "s-", color=line.get_color(),
                     label=f"over the peer, batch {r['batch']}")
        ax2.plot(cost, [e["speedup"]["realised"] for e in pts], "o--", color=line.get_color(),
                 label=f"over the static pipeline, batch {r['batch']}")
        ax2.plot(cost, [e["speedup"]["ideal"] for e in pts], "x:", color=line.get_color(), label=f"ideal, batch {r['batch']}")
    ax1.set_xlabel("realised cost (fraction of full-model FLOPs)")
    ax1.set_ylabel("throughput (samples/s)")
    ax1.set_title("throughput across the threshold sweep")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set_xlabel("realised cost (fraction of full-model FLOPs)")
    ax2.set_ylabel("speed-up")
    ax2.set_title("realised vs ideal speed-up")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
