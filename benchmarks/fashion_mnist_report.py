"""Analysis and report of :mod:`fashion_mnist`: thresholds on val, figures on test, paired tests, plot, docs section.

Cost is always the expected per-sample FLOPs on the test images (every stage reached, every early head
evaluated on the way, ``torch.utils.flop_counter`` with LoRA merged), in MFLOPs and as a share of ONE
denominator: the static model (trunk + final exit, no early heads). A budget a model cannot meet (below
its first exit) has the accuracy of a guess (1 / classes): it is what the model can promise at that cost.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "results.md")
PLOT = os.path.join(ROOT, "docs", "img", "fashion_mnist_accuracy_vs_flops.png")
SECTION = "## Fashion-MNIST: DMPO, plain multi-exit and the static model"


def _softmax_conf(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return (z / z.sum(1, keepdims=True)).max(1)


def _arrays(npz: str, split: str, num_stages: int):
    with np.load(npz) as d:
        labels = d[f"{split}_labels"]
        logits = [d[f"{split}_{k}"] for k in range(num_stages)]
    conf = np.stack([_softmax_conf(lg) for lg in logits])
    correct = np.stack([lg.argmax(1) == labels for lg in logits])
    return conf, correct


def _curve(meta, npz, static_flops, budgets, chance):
    """Test (accuracy, cost share of static, MFLOPs) for thresholds fitted on val at every budget."""
    from dmpo_edge.calib.thresholds import budgeted_batch_sweep, evaluate_thresholds, minimum_cost, solve_budget

    cum = np.asarray(meta["metrics"]["cumulative_flops"], np.float64)
    k = len(cum)
    vc, vr = _arrays(npz, "val", k)
    tc, tr = _arrays(npz, "test", k)
    if k == 1:  # the static model: one operating point, the whole model
        acc, share = float(tr[0].mean()), float(cum[0] / static_flops)
        pts = [(acc, share, float(cum[0])) if b >= share - 1e-9 else (chance, 0.0, 0.0) for b in budgets]
        return pts, [acc]
    # every 4th budgeted-batch point as a start: the same optima here (checked on the DMPO model, 3 budgets) at a
    # quarter of the search time, which matters for ~500 solves on a shared CPU
    sweep = budgeted_batch_sweep(vc, vr, cum, check=False)[::4]
    floor = minimum_cost(cum, vc.shape[1])
    pts = []
    for b in budgets:
        own = b * static_flops / cum[-1]  # the budget as a share of this model's own full cost
        if own < floor:
            pts.append((chance, 0.0, 0.0))
            continue
        point = solve_budget(vc, vr, cum, min(own, 1.0), sweep_points=sweep)
        test = evaluate_thresholds(tc, tr, cum, point.thresholds)
        pts.append((test.accuracy, test.expected_flops / static_flops, test.expected_flops))
    return pts, [float(r.mean()) for r in tr]


def _auc(budgets, accs, lo, hi) -> float:
    b = np.asarray(budgets)
    sel = (b >= lo - 1e-9) & (b <= hi + 1e-9)
    return float(np.trapezoid(np.asarray(accs)[sel], b[sel]) / (hi - lo))


def _paired(a, b):
    """Mean and std of a - b over seeds and the paired t-test's two-sided p (NaN when undefined)."""
    from scipy import stats

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    p = float(stats.ttest_rel(a, b).pvalue) if len(d) > 1 and np.ptp(d) > 1e-12 else float("nan")
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0, p


def _meta(path: str) -> dict:
    """config, metrics, loss schedule and early-head parameter counts of a model.pt, without building the model
    (32 EfficientNet builds cost minutes on a loaded CPU)."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    heads = {}
    for key, t in obj["state_dict"].items():
        if key.startswith("exits.") and not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            k = int(key.split(".")[1])
            heads[k] = heads.get(k, 0) + int(t.numel())
    return {"config": obj["config"], "metrics": obj["metrics"], "loss_schedule": obj["loss_schedule"],
            "head_params": [heads[k] for k in sorted(heads)]}


def analyse(runs, int8, protocol, variants, static_name, log) -> dict:
    seeds = sorted({s for (_, s) in runs})
    budgets = protocol["budgets"]
    chance = 0.1
    metas = {key: _meta(path) for key, (path, _) in runs.items()}
    static_flops = {s: float(metas[(static_name, s)]["metrics"]["cumulative_flops"][-1]) for s in seeds}
    res = {"budgets": budgets, "seeds": seeds, "static_mflops": static_flops[seeds[0]] / 1e6, "variants": {}}
    for name in variants:
        per = {"curve": [], "exit_acc": [], "val_exit_acc": [], "auc": [], "tune_seconds": [], "at": {}}
        for s in seeds:
            meta = metas[(name, s)]
            pts, exit_acc = _curve(meta, runs[(name, s)][1], static_flops[s], budgets, chance)
            per["curve"].append(pts)
            per["exit_acc"].append(exit_acc)
            per["val_exit_acc"].append(meta["metrics"]["exit_accuracy"])
            per["tune_seconds"].append(meta["metrics"]["tune_seconds"])
            per["auc"].append(_auc(budgets, [p[0] for p in pts], *protocol["auc_range"]))
        meta = metas[(name, seeds[0])]
        cum = np.asarray(meta["metrics"]["cumulative_flops"], np.float64)
        per["exit_mflops"] = (cum / 1e6).tolist()
        per["exit_share"] = (cum / static_flops[seeds[0]]).tolist()
        per["exits"] = meta["config"]["exits"]
        per["head_params"] = meta["head_params"]
        per["config"] = {k: meta["config"][k] for k in ("early_head", "bypass", "bypass_detach", "head_widths")}
        per["loss_schedule"] = meta["loss_schedule"]["mode"]
        for b in protocol["report_budgets"]:
            i = budgets.index(b)
            per["at"][str(b)] = [c[i] for c in per["curve"]]
        res["variants"][name] = per
        log(f"analysed {name}: AUC {np.mean(per['auc']):.4f}, final exit {np.mean([e[-1] for e in per['exit_acc']]):.4f}")
    # paired comparisons against DMPO (the same seed = the same training subset and initialisation of shared parts)
    dm = res["variants"]["DMPO"]
    comps = {}
    for name, per in res["variants"].items():
        if name == "DMPO":
            continue
        row = {}
        for b in protocol["report_budgets"]:
            row[f"acc@{b}"] = _paired([p[0] for p in dm["at"][str(b)]], [p[0] for p in per["at"][str(b)]])
        row["auc"] = _paired(dm["auc"], per["auc"])
        row["final"] = _paired([e[-1] for e in dm["exit_acc"]], [e[-1] for e in per["exit_acc"]])
        comps[name] = row
    res["dmpo_minus"] = comps
    res["int8"] = {str(s): v for s, v in int8.items()}
    # what each model's tuning ran with, e.g. "2 (2 cores, 0.0 busy now, load 1.0)": the run header quotes it
    res["threads"] = sorted({str(m["metrics"].get("threads", "?")).split(" ")[0] for m in metas.values()})
    return res


def _ms(values, scale=100.0, digits=2) -> str:
    v = np.asarray(values, np.float64) * scale
    return f"{v.mean():.{digits}f} +- {v.std(ddof=1) if len(v) > 1 else 0.0:.{digits}f}"


def plot(res, path=PLOT) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = np.asarray(res["budgets"]) * 100
    # left: the whole range (a budget below a model's first exit scores a guess); right: the same curves where the
    # models differ by a point or two, which the full range squeezes into one line
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1]})
    finals = []
    for name, per in res["variants"].items():
        acc = np.asarray([[p[0] for p in c] for c in per["curve"]]) * 100
        m, s = acc.mean(0), acc.std(0, ddof=1) if len(acc) > 1 else np.zeros(acc.shape[1])
        finals.append(m[-1])
        style = "-" if name == "DMPO" or name.startswith("plain") or name.startswith("static") else "--"
        step = name.startswith("static")
        for a in (ax, zoom):
            (line,) = a.plot(b, m, style, lw=2 if name == "DMPO" else 1.3, label=name, drawstyle="steps-post" if step else None)
            a.fill_between(b, m - s, m + s, color=line.get_color(), alpha=0.15, step="post" if step else None)
    for a in (ax, zoom):
        a.set_xlabel("FLOPs budget, % of the static model (trunk + final exit), thresholds fitted on val")
        a.grid(alpha=0.3)
    ax.set_ylabel("accuracy on fashion-mnist:test (%)")
    ax.set_title(f"mean +- std over {len(res['seeds'])} seeds")
    ax.set_ylim(bottom=max(0, ax.get_ylim()[0]))
    top = max(finals) + 1.0
    zoom.set_ylim(top - 8.0, top)
    zoom.set_xlim(25, 105)
    zoom.set_title("zoom: the top 8 points")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Fashion-MNIST, EfficientNet-Lite0 + PEFT: accuracy versus FLOPs")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _int8_rows(res) -> list:
    rows = []
    dm = res["variants"]["DMPO"]
    for s in res["seeds"]:
        rep = res["int8"].get(str(s))
        if rep is None:
            continue
        fp32 = dm["exit_acc"][res["seeds"].index(s)]
        if "error" in rep:
            rows.append(f"| {s} | INT8 bundle failed: {rep['error'][:160]} |")
            continue
        forms = [("CPU form (" + " / ".join(rep.get("cpu_forms") or ["?"]) + ")", rep["exits"])]
        if rep.get("tensorrt_form"):
            forms.append(("TensorRT form (INT8 Q/DQ in every stage, simulated)", rep["tensorrt_form"]))
        for label, exits in forms:
            int8 = [e["accuracy"] for e in exits]
            cells = " | ".join(f"{100 * a:.2f} / {100 * q:.2f} ({100 * (q - a):+.2f})" for a, q in zip(fp32, int8))
            rows.append(f"| {s} | {label} | {cells} |")
    return rows


def _plain_words(name: str, row) -> str:
    m, s, p = row["auc"]
    if p == p and p < 0.05:
        return (f"DMPO is better than {name}" if m > 0 else f"{name} is better than DMPO") + \
            f" ({100 * m:+.2f} points of AUC, p = {p:.3f})"
    return f"DMPO and {name} cannot be told apart ({100 * m:+.2f} +- {100 * s:.2f} points of AUC, p = {p:.2f})"


def verdict(res) -> str:
    c = res["dmpo_minus"]
    n = len(res["seeds"])
    lines = [f"On the primary measure fixed with the protocol (AUC 20-100% of the static FLOPs, paired over {n} seeds): "
             + "; ".join(_plain_words(name, row) for name, row in c.items()) + "."]
    parts = []
    for name in ("plain multi-exit", "plain, size-matched first-order heads"):
        row = c[name]
        bits = []
        for key, label in (("acc@0.3", "at 30%"), ("acc@0.5", "at 50%"), ("auc", "AUC 20-100%")):
            m, s, p = row[key]
            sig = "p < 0.05" if p < 0.05 else f"p = {p:.2f}, not significant" if p == p else "no spread"
            bits.append(f"{label} {100 * m:+.2f} +- {100 * s:.2f} points ({sig})")
        parts.append(f"DMPO minus {name}: " + "; ".join(bits) + ".")
    st = res["variants"]["static (final exit only)"]
    dm = res["variants"]["DMPO"]
    s_acc = np.mean([e[-1] for e in st["exit_acc"]])
    at50 = np.mean([p[0] for p in dm["at"]["0.5"]])
    parts.append(f"Against the static model ({100 * s_acc:.2f}% at 100% of its FLOPs), DMPO gives {100 * at50:.2f}% "
                 f"at a 50% budget.")
    first = {name: per["exit_share"][0] for name, per in res["variants"].items() if len(per["exit_share"]) > 1}
    parts.append("The AUC counts a budget below a model's first exit as a guess, so it rewards a cheap first exit: the "
                 "first exit costs " + ", ".join(f"{100 * v:.0f}% ({name})" for name, v in first.items())
                 + " of the static model, heads included.")
    # where every early-exit model has an exit: which is most accurate at each reported budget
    for b in ("0.3", "0.5"):
        reach = {name: np.mean([p[0] for p in per["at"][b]]) for name, per in res["variants"].items()
                 if len(per["exit_share"]) > 1 and all(p[1] > 0 for p in per["at"][b])}
        if len(reach) > 1 and "DMPO" in reach:
            order = sorted(reach, key=reach.get, reverse=True)
            parts.append(f"At {int(100 * float(b))}% of the static FLOPs, where {len(reach)} of the early-exit models have "
                         f"an exit, DMPO ranks {order.index('DMPO') + 1} of {len(reach)} ({100 * reach['DMPO']:.2f}%; "
                         f"best {order[0]}, {100 * reach[order[0]]:.2f}%).")
    lines.append("Details: " + " ".join(parts))
    return "\n\n".join(lines)


def section(res, protocol) -> str:
    import torch

    r = res["run"]
    names = list(res["variants"])
    budgets = protocol["report_budgets"]
    when = _dt.date.today().isoformat()
    lines = [
        SECTION, "",
        f"Generated by `python benchmarks/fashion_mnist.py` on {r['started']}: **{r['seconds'] / 60:.0f} min** wall clock on "
        f"{r['cores']} CPU cores, load average {r['load_start']:.1f} at the start, {r['load_end']:.1f} at the end "
        f"({r['load_mean']:.1f} mean of the samples taken between models); {platform.machine()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, torch threads per model: "
        f"{' or '.join(res.get('threads', ['?']))} (the free cores when it started). {r.get('note', '')} Written {when}.",
        "",
        f"Protocol (version {protocol.get('version', 1)}, fixed in the script before any of its test results was looked at): pre-trained EfficientNet-Lite0 (frozen, "
        f"BatchNorm in eval mode) + the same PEFT for every model (adapters width 32, LoRA rank 8), "
        f"{protocol['image_size']} x {protocol['image_size']} input, exits after blocks {protocol['exits']}, "
        f"{protocol['epochs']} epochs, batch {protocol['batch_size']}, AdamW {protocol['lr']:g} cosine; trained on a stratified "
        f"{protocol['train_count']}-image subset of `fashion-mnist:train` (seeded by the run's seed: the same images for every "
        f"variant of a seed, so comparisons are paired), seeds {protocol['seeds']}. Thresholds: `solve_budget` on "
        f"{protocol['val_count']} images of `fashion-mnist:val` (a fixed stratified subset); every figure below is on "
        + (f"a fixed stratified {protocol['test_count']}-image subset of `fashion-mnist:test`" if protocol.get("test_count")
           else "all 10,000 images of `fashion-mnist:test`")
        + " (the same images for every model), which "
        f"tuning and threshold fitting never see. Cost: expected per-sample FLOPs on test (early heads on the way included), as a share "
        f"of **one** denominator, the static model = trunk + final exit = {res['static_mflops']:.2f} MFLOPs. "
        "A budget below a model's first exit scores a guess (10%). Mean +- standard deviation over seeds; "
        "p = paired t-test over seeds (DMPO minus the variant); the primary measure, fixed with the protocol, is the "
        "AUC (mean accuracy over budgets from 20% to 100% of the static FLOPs); the rest is descriptive.",
        "",
        "![accuracy versus FLOPs](img/fashion_mnist_accuracy_vs_flops.png)",
        "",
        "| variant | " + " | ".join(f"acc. at {int(100 * b)}% (cost)" for b in budgets) + " | AUC 20-100% | final exit |",
        "| --- | " + " | ".join("---:" for _ in budgets) + " | ---: | ---: |",
    ]
    for name in names:
        per = res["variants"][name]
        cells = []
        for b in budgets:
            pts = per["at"][str(b)]
            if all(p[1] == 0.0 for p in pts):
                cells.append("unreachable")
            else:
                cells.append(f"{_ms([p[0] for p in pts])} ({100 * np.mean([p[1] for p in pts]):.0f}%, "
                             f"{np.mean([p[2] for p in pts]) / 1e6:.2f} MF)")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_ms(per['auc'])} | {_ms([e[-1] for e in per['exit_acc']])} |")
    lines += ["", "Per exit: test accuracy (mean +- std), cumulative MFLOPs and share of the static model, early-head parameters.", "",
              "| variant | " + " | ".join(f"exit {k}" for k in range(len(protocol["exits"]))) + " | early-head params | tune s |",
              "| --- | " + " | ".join("---:" for _ in protocol["exits"]) + " | ---: | ---: |"]
    for name in names:
        per = res["variants"][name]
        acc = np.asarray(per["exit_acc"])
        cells = []
        for k in range(len(protocol["exits"])):
            if k < acc.shape[1]:
                j = k if acc.shape[1] > 1 else 0
                cells.append(f"{_ms(acc[:, j])}% @ {per['exit_mflops'][j]:.2f} MF ({100 * per['exit_share'][j]:.0f}%)")
            else:
                cells.append("")
        if acc.shape[1] == 1:  # the static model: its one exit is the last column
            cells = [""] * (len(protocol["exits"]) - 1) + [cells[0]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per['head_params']} | {np.mean(per['tune_seconds']):.0f} |")
    lines += ["", "DMPO minus each variant, paired over seeds (points; p):", "",
              "| variant | " + " | ".join(f"at {int(100 * b)}%" for b in budgets) + " | AUC | final exit |",
              "| --- | " + " | ".join("---:" for _ in budgets) + " | ---: | ---: |"]
    for name, row in res["dmpo_minus"].items():
        cells = [f"{100 * m:+.2f} +- {100 * s:.2f} (p {p:.2f})" for m, s, p in
                 [row[f"acc@{b}"] for b in budgets] + [row["auc"], row["final"]]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = _int8_rows(res)
    if rows:
        lines += ["", "DMPO, FP32 (torch) against INT8 (`dmpo-edge compile --int8`, calibrated on "
                  f"{protocol['int8_calib_count']} training images) per exit on test: FP32 / INT8 (difference, points). "
                  "The CPU form is what ONNX Runtime runs on this CPU: per stage the fastest form within compile's "
                  "accuracy budget (FP32 where the U8 kernels did not pay, so those exits equal FP32); the TensorRT form "
                  "is INT8 in every stage, its Q/DQ computed in float as TensorRT rounds and clips.", "",
                  "| seed | form | " + " | ".join(f"exit {k}" for k in range(len(protocol["exits"]))) + " |",
                  "| --- | --- | " + " | ".join("---:" for _ in protocol["exits"]) + " |"] + rows
    lines += ["", f"**What the data shows.** {verdict(res)}", "",
              "The digits sections below are a quick sanity check of the same code on 8 x 8 images; they cannot tell "
              "the variants apart (every exit is at 92-100% there).", ""]
    return "\n".join(lines)


def write(res, protocol, docs: bool = True, out_dir: str | None = None) -> str:
    plot(res, PLOT if docs or out_dir is None else os.path.join(out_dir, os.path.basename(PLOT)))
    text = section(res, protocol)
    if not docs:
        return text
    with open(DOC) as f:
        doc = f.read()
    head, sep, rest = doc.partition("\n## ")
    body = sep.lstrip("\n") + rest if sep else ""
    if body.startswith(SECTION):  # replace our own earlier section
        nxt = body.find("\n## ", 1)
        body = body[nxt + 1:] if nxt >= 0 else ""
    new = head.rstrip("\n") + "\n\n" + text + "\n" + ("\n" + body if body else "")
    tmp = DOC + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, DOC)
    return text
