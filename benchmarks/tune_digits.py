"""DMPO versus plain multi-exit tuning on digits, same backbone, exits, epochs and seed.

1. tune both with ``dmpo-edge tune`` on digits:train (validation digits:val), pre-trained EfficientNet-Lite0,
   64 x 64 input: DMPO (bypass + covariance early heads + two-phase loss weights) and ``--baseline`` (no bypass,
   linear early heads, uniform weights). ``out/digits_model.pt`` / ``out/digits_baseline.pt`` are reused when
   they were tuned with these very settings (``--force`` retunes);
2. per-exit accuracy on digits:test;
3. accuracy at matched expected FLOPs: a sweep of one max-softmax threshold shared by the early exits, on the test
   confidences (an oracle setting, the same for both models), best accuracy whose expected cost stays within 30%
   and 50% of the static model (trunk + final exit, no early heads: what you would deploy without early exits);
4. the table, with machine and versions, into ``docs/results.md`` (section "DMPO vs plain multi-exit tuning").

Run from the repository root::

    python benchmarks/tune_digits.py [--epochs 8] [--seed 0] [--threads N] [--force] [--no-docs]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "out")
DOC = os.path.join(ROOT, "docs", "results.md")
SECTION = "## DMPO vs plain multi-exit tuning"
BUDGETS = (0.3, 0.5)


# name -> (extra tune flags, the ablation record the checkpoint must carry to be reused)
VARIANTS = {
    "DMPO": ([], {"bypass": True, "early_head": "cov", "loss_schedule": "two_phase"}),
    "plain multi-exit": (["--baseline"], {"bypass": False, "early_head": "linear", "loss_schedule": "uniform"}),
    "DMPO without bypass": (["--no-bypass"], {"bypass": False, "early_head": "cov", "loss_schedule": "two_phase"}),
    "DMPO with linear early heads": (["--linear-early-heads"], {"bypass": True, "early_head": "linear", "loss_schedule": "two_phase"}),
    "DMPO with uniform weights": (["--uniform-weights"], {"bypass": True, "early_head": "cov", "loss_schedule": "uniform"}),
}


def tune_or_reuse(path: str, variant: str, args) -> dict:
    from dmpo_edge.cli import main as cli
    from dmpo_edge.errors import DmpoEdgeError
    from dmpo_edge.models import load_checkpoint
    from dmpo_edge.models.config import normalize_config

    extra, ablation = VARIANTS[variant]
    if os.path.exists(path) and not args.force:
        try:
            _, meta = load_checkpoint(path)
            m = meta["metrics"]
            exits = normalize_config({"backbone": "efficientnet_lite0"})["exits"]
            same = (m.get("epochs"), m.get("seed"), m.get("ablation"), meta["config"]["exits"], m.get("val_data"))
            if same == (args.epochs, args.seed, ablation, exits, "digits:val"):
                print(f"reusing {os.path.relpath(path, ROOT)} (tuned with these settings; --force retunes)", file=sys.stderr)
                return meta
        except DmpoEdgeError:
            pass
    argv = ["tune", "--data", "digits", "--backbone", "efficientnet_lite0", "--epochs", str(args.epochs),
            "--seed", str(args.seed), "-o", path, *extra]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    print("$ dmpo-edge " + " ".join(argv), file=sys.stderr)
    if cli(argv) != 0:
        raise SystemExit(f"tune failed: {argv}")
    return load_checkpoint(path)[1]


def static_flops(model, size: int) -> int:
    """Per-sample FLOPs of the trunk and the final exit only (the model without early exits)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    folded = model.merged()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        x = torch.zeros(1, 3, size, size)
        for k in range(folded.num_stages):
            x = folded.forward_stage(k, x)
        folded.forward_exit(folded.num_stages - 1, x)
    return int(counter.get_total_flops())


def matched_accuracy(logits: list, labels: np.ndarray, cumulative: list, budget: float) -> tuple:
    """Best accuracy over one shared max-softmax threshold with expected FLOPs <= budget: (acc, cost, threshold)."""
    probs = [np.exp(lg - lg.max(1, keepdims=True)) for lg in logits]
    conf = np.stack([(p / p.sum(1, keepdims=True)).max(1) for p in probs[:-1]], 1)  # N x (K-1)
    pred = np.stack([lg.argmax(1) for lg in logits], 1)  # N x K
    best = (float("nan"), float("nan"), None)
    for t in np.unique(np.concatenate([conf.ravel(), [1.1]])):
        hit = np.concatenate([conf >= t, np.ones((len(labels), 1), bool)], 1)
        stage = hit.argmax(1)  # first exit whose confidence clears t (the last exit takes everyone)
        cost = float(np.mean(np.asarray(cumulative)[stage]))
        acc = float(np.mean(pred[np.arange(len(labels)), stage] == labels))
        if cost <= budget and not acc <= best[0]:
            best = (acc, cost, float(t))
    return best


def evaluate(path: str) -> dict:
    from dmpo_edge.calib.datasets import load_dataset
    from dmpo_edge.models import load_checkpoint
    from dmpo_edge.models.tuning import exit_logits, preprocess_images
    from dmpo_edge.preprocess import Preprocess

    model, meta = load_checkpoint(path)
    pre = Preprocess.from_dict(meta["preprocess"])
    test = load_dataset("digits:test")
    logits = exit_logits(model, preprocess_images(test.images, pre))
    labels = np.asarray(test.labels)
    ref = static_flops(model, pre.size[0])
    cum = meta["metrics"]["cumulative_flops"]
    out = {
        "test_acc": [float((lg.argmax(1) == labels).mean()) for lg in logits],
        "val_acc": meta["metrics"]["exit_accuracy"], "cumulative": cum, "static": ref,
        "tune_seconds": meta["metrics"]["tune_seconds"], "n_test": len(labels), "exits": meta["config"]["exits"],
    }
    for b in BUDGETS:
        out[b] = matched_accuracy(logits, labels, cum, b * ref)
    return out


def table(dmpo: dict, base: dict) -> str:
    rows = ["| | DMPO | plain multi-exit |", "| --- | ---: | ---: |"]
    for k, blk in enumerate(dmpo["exits"]):
        rows.append(
            f"| exit {k} (after block {blk}): test accuracy | {100 * dmpo['test_acc'][k]:.2f}% | {100 * base['test_acc'][k]:.2f}% |")
    for k, blk in enumerate(dmpo["exits"]):
        rows.append(
            f"| exit {k}: cumulative MFLOPs (% of static) | {dmpo['cumulative'][k] / 1e6:.1f} ({100 * dmpo['cumulative'][k] / dmpo['static']:.0f}%) "
            f"| {base['cumulative'][k] / 1e6:.1f} ({100 * base['cumulative'][k] / base['static']:.0f}%) |")
    for b in BUDGETS:
        cells = []
        for r in (dmpo, base):
            acc, cost, t = r[b]
            cells.append("no setting fits" if t is None else f"{100 * acc:.2f}% at {100 * cost / r['static']:.0f}% (t={t:.3f})")
        rows.append(f"| accuracy at <= {int(100 * b)}% of static FLOPs | {cells[0]} | {cells[1]} |")
    rows.append(f"| validation accuracy per exit | {', '.join(f'{100 * a:.1f}' for a in dmpo['val_acc'])} "
                f"| {', '.join(f'{100 * a:.1f}' for a in base['val_acc'])} |")
    rows.append(f"| tune time (s) | {dmpo['tune_seconds']:.0f} | {base['tune_seconds']:.0f} |")
    return "\n".join(rows)


def _se(a: float, b: float, n: int) -> float:
    """Standard error (points) of the difference of two accuracies on n images (binomial, independent)."""
    return 100 * float(np.sqrt((a * (1 - a) + b * (1 - b)) / n))


def verdict(dmpo: dict, base: dict) -> str:
    n = dmpo["n_test"]
    says = []
    for b in BUDGETS:
        if dmpo[b][2] is None or base[b][2] is None:
            says.append(f"at {int(100 * b)}% of the static FLOPs no threshold fits for {'DMPO' if dmpo[b][2] is None else 'plain'}")
            continue
        d, se = 100 * (dmpo[b][0] - base[b][0]), max(_se(dmpo[b][0], base[b][0], n), 100 / n)
        word = "DMPO wins clearly" if d > 2 * se else ("plain wins clearly" if d < -2 * se else "level (within two standard errors)")
        says.append(f"at {int(100 * b)}% of the static FLOPs {word}: {d:+.2f} +- {se:.2f} points")
    early = ", ".join(f"{100 * (d - p):+.2f}" for d, p in zip(dmpo["test_acc"][:-1], base["test_acc"][:-1]))
    final = 100 * (dmpo["test_acc"][-1] - base["test_acc"][-1])
    text = "; ".join(says)
    return (f"{text[:1].upper() + text[1:]}. Per exit, DMPO minus plain: early exits {early} points, final exit {final:+.2f} points "
            f"(one seed, {n} test images).")


def ablation_table(results: dict) -> str:
    rows = ["| variant | test accuracy per exit (%) | at <= 30% FLOPs | at <= 50% FLOPs |", "| --- | --- | ---: | ---: |"]
    for name, r in results.items():
        cells = [("n/a" if r[b][2] is None else f"{100 * r[b][0]:.2f}%") for b in BUDGETS]
        rows.append(f"| {name} | {', '.join(f'{100 * a:.1f}' for a in r['test_acc'])} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def write_doc(text: str) -> None:
    old = open(DOC).read() if os.path.exists(DOC) else "# Results\n"
    if SECTION in old:
        head, rest = old.split(SECTION, 1)
        nxt = rest.find("\n## ")
        old = head.rstrip() + "\n\n" + text.rstrip() + "\n" + (rest[nxt:] if nxt >= 0 else "")
    else:
        old = old.rstrip() + "\n\n" + text.rstrip() + "\n"
    tmp = DOC + ".tmp"
    with open(tmp, "w") as f:
        f.write(old)
    os.replace(tmp, DOC)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--force", action="store_true", help="retune even when out/ holds models tuned with these settings")
    p.add_argument("--ablations", action="store_true", help="also tune DMPO with one part switched off at a time")
    p.add_argument("--no-docs", action="store_true", help="print only; leave docs/results.md alone")
    args = p.parse_args()
    import torch

    os.makedirs(OUT, exist_ok=True)
    dmpo_path, base_path = os.path.join(OUT, "digits_model.pt"), os.path.join(OUT, "digits_baseline.pt")
    tune_or_reuse(dmpo_path, "DMPO", args)
    tune_or_reuse(base_path, "plain multi-exit", args)
    dmpo, base = evaluate(dmpo_path), evaluate(base_path)
    ablations = {}
    if args.ablations:
        ablations = {"DMPO": dmpo, "plain multi-exit": base}
        for name in list(VARIANTS)[2:]:
            path = os.path.join(OUT, "digits_ablation_" + name.split(" ", 1)[1].replace(" ", "_") + ".pt")
            tune_or_reuse(path, name, args)
            ablations[name] = evaluate(path)
    import efficientnet_lite_pytorch  # noqa: F401  (its version is reported)
    from importlib.metadata import version

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or 'unknown CPU'}), Linux {platform.release()}"
    text = "\n".join([
        SECTION, "",
        f"Generated by `python benchmarks/tune_digits.py` on {_dt.date.today().isoformat()}: {machine}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, efficientnet-lite-pytorch {version('efficientnet-lite-pytorch')}, "
        f"numpy {np.__version__}. CPU only, shared with other jobs (tune times are wall clock under that load).",
        "",
        f"Both models: pre-trained EfficientNet-Lite0 (ImageNet, frozen, BatchNorm in eval mode), parallel 1x1-conv adapters "
        f"(width 32) and LoRA (rank 8) on the 1x1 convs, exits after blocks {dmpo['exits']}, 64 x 64 input "
        f"(8 x 8 digits upsampled), {args.epochs} epochs, batch 64, AdamW 5e-3 cosine, seed {args.seed}; trained on digits:train "
        f"(1,078 images), validated on digits:val (360), tested on digits:test ({dmpo['n_test']}). DMPO = bypass modules + "
        "covariance (iSQRT, 5 Newton-Schulz steps) early heads + two-phase loss weights [0.1, 0.4, 0.7, 1] -> [1, 1, 1, 0.5] "
        "switching at half the epochs; plain = `dmpo-edge tune --baseline` (no bypass, pool + linear early heads, uniform weights).",
        "",
        "Matched FLOPs: one max-softmax threshold shared by the early exits, swept over the test confidences (an oracle "
        "setting that flatters both equally; the calibration area sets thresholds on held-out data). Cost is the expected "
        "per-sample FLOPs (`torch.utils.flop_counter`, LoRA merged) of reaching each sample's exit, including every early "
        "head on the way, as a share of the static model (trunk + final exit, no early heads).",
        "",
        table(dmpo, base), "",
        "**Verdict.** " + verdict(dmpo, base), "",
    ] + ([
        "Ablations, one DMPO part switched off at a time (same settings; `python benchmarks/tune_digits.py --ablations`):",
        "", ablation_table(ablations), "",
        "Accuracy lost at <= 30% of the static FLOPs when one part is switched off: " + "; ".join(
            f"{name.replace('DMPO ', '')} {100 * (ablations[name][0.3][0] - dmpo[0.3][0]):+.2f} "
            f"+- {_se(ablations[name][0.3][0], dmpo[0.3][0], dmpo['n_test']):.2f} points"
            for name in list(VARIANTS)[2:] if ablations[name][0.3][2] is not None)
        + " (one standard error; one seed, so only differences beyond about two of them are more than noise).", "",
    ] if ablations else []))
    print(text)
    if not args.no_docs:
        write_doc(text)
        print(f"wrote {os.path.relpath(DOC, ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
