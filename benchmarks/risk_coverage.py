"""How often does the ``--max-drop`` promise hold on unseen data? Plain solver against risk-controlled calibration.

For each data set the deployed fp32 stages (ONNX Runtime) run once over a pool of labelled images that tuning
never saw; the study then draws random validation/test splits of that pool in numpy and, on each split, fits

- ``plain``: ``solve_max_drop`` (the exact optimum on the validation split: ``calibrate --max-drop Y``);
- ``risk shared`` / ``risk split``: ``calibrate --max-drop Y --confidence C`` with either candidate path,

and measures on the split's test part the accuracy drop against the final exit, the disagreement loss
(early exit wrong, final right: what the guarantee bounds) and the cost. The promise "drop <= Y" must hold in
at least a fraction C of the splits; the test part is finite, so its own sampling noise is part of the figure.

Run from the repository root (digits needs only scikit-learn; Fashion-MNIST needs ``dataset-fashion-mnist``)::

    python benchmarks/risk_coverage.py --digits-model out/risk/digits_model.pt \
        --fashion-model out/risk/fashion_dmpo_s0.pt [--splits 200] [--out out/risk]

Writes ``OUT/risk_coverage.json`` and the section "Risk-controlled exit calibration" of ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from doc_section import replace_section  # beside this script
from dmpo_edge.calib import risk
from dmpo_edge.calib import thresholds as th

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- risk-coverage:begin -->", "<!-- risk-coverage:end -->"
MAX_DROP, CONFIDENCE = 0.01, 0.9


def load() -> str:
    return "load %.1f %.1f %.1f" % os.getloadavg()


def pool_outputs(model: str, specs: list, out: str, name: str):
    """Per-exit confidence and correctness of the deployed fp32 stages on the pool (cached in OUT/NAME_pool.npz)."""
    cache = os.path.join(out, f"{name}_pool.npz")
    if os.path.isfile(cache):
        z = np.load(cache)
        return z["confidence"], z["correct"], z["flops"]
    from dmpo_edge.calib.datasets import load_dataset
    from dmpo_edge.calib.evaluate import stage_outputs
    from dmpo_edge.compile import compile_bundle

    bundle = os.path.join(out, f"{name}_bundle")
    if not os.path.isdir(bundle):
        print(f"compiling {model} -> {bundle} (fp32)  [{load()}]", flush=True)
        compile_bundle(model, bundle, precision="fp32", force=True)
    confs, corrs = [], []
    for spec in specs:
        t0 = time.time()
        o = stage_outputs(bundle, load_dataset(spec), progress=False)
        print(f"{name}: stages on {spec} ({o.num_samples} images) in {time.time() - t0:.0f} s, exit accuracy "
              f"{[round(100 * a, 1) for a in o.exit_accuracy]}  [{load()}]", flush=True)
        confs.append(o.confidence)
        corrs.append(o.correct)
        flops = o.cumulative_flops
    conf, corr = np.concatenate(confs, axis=1), np.concatenate(corrs, axis=1)
    np.savez(cache, confidence=conf, correct=corr, flops=flops)
    return conf, corr, flops


def measure(conf, corr, flops, t, final_acc):
    pt = th.evaluate_thresholds(conf, corr, flops, t)
    loss = risk.disagreement_losses(conf, corr, t).mean()
    return {"drop": final_acc - pt.accuracy, "loss": float(loss), "cost": pt.expected_cost, "accuracy": pt.accuracy}


def study(name, conf, corr, flops, n_val, splits, seed, with_plain=True):
    rng = np.random.default_rng(seed)
    n = conf.shape[1]
    methods = (["plain"] if with_plain else []) + ["risk shared", "risk split"]
    rows = {m: [] for m in methods}
    t0 = time.time()
    for s in range(splits):
        perm = rng.permutation(n)
        v, te = perm[:n_val], perm[n_val:]
        cv, kv, ct, kt = conf[:, v], corr[:, v], conf[:, te], corr[:, te]
        final = float(kt[-1].mean())
        for m in methods:
            if m == "plain":
                pt = th.solve_max_drop(cv, kv, flops, MAX_DROP)
            else:
                pt = risk.risk_controlled_max_drop(cv, kv, flops, MAX_DROP, CONFIDENCE, path=m.split()[1], seed=s)
            r = measure(ct, kt, flops, pt.thresholds, final)
            r["val_cost"] = pt.expected_cost
            if "risk" in pt.meta:
                r["bound"] = pt.meta["risk"]["upper_bound"]
                r["full_only"] = pt.meta["risk"]["full_model_only"]
            rows[m].append(r)
    secs = time.time() - t0
    summary = {}
    for m, rs in rows.items():
        held = sum(r["drop"] <= MAX_DROP + 1e-12 for r in rs)
        loss_held = sum(r["loss"] <= MAX_DROP + 1e-12 for r in rs)
        summary[m] = {
            "held": held, "splits": len(rs), "held_fraction": held / len(rs),
            "held_ci90": list(clopper_pearson(held, len(rs), 0.10)),
            "loss_held_fraction": loss_held / len(rs),
            "drop_mean": float(np.mean([r["drop"] for r in rs])), "drop_p90": float(np.quantile([r["drop"] for r in rs], 0.9)),
            "drop_max": float(np.max([r["drop"] for r in rs])),
            "cost_mean": float(np.mean([r["cost"] for r in rs])), "cost_std": float(np.std([r["cost"] for r in rs])),
            "full_only": int(sum(r.get("full_only", False) for r in rs)),
            "bound_mean": float(np.mean([r["bound"] for r in rs])) if "bound" in rs[0] else None,
        }
    return {"name": name, "pool": n, "val": n_val, "test": n - n_val, "splits": splits, "seconds": secs,
            "exit_accuracy_pool": [float(a) for a in corr.mean(axis=1)],
            "cost_per_exit": [float(f / flops[-1]) for f in flops], "summary": summary}


def _former_local_search(c, k, flops, mode, target):
    """The solver this package shipped before the exact search: coordinate descent from the sweep and the extremes."""
    n, full = c.shape[1], float(flops[-1])
    sweep = th.budgeted_batch_sweep(c, k, flops, check=False)
    if mode == "budget":
        def feas(nc, cost):
            return (np.asarray(cost) / n) / full <= target * (1 + 1e-12)

        def key(nc, cost):
            return np.asarray(nc, float), -np.asarray(cost, float)
    else:
        need = math.ceil(int(k[-1].sum()) - target * n - 1e-9)

        def feas(nc, cost):
            return np.asarray(nc) >= need

        def key(nc, cost):
            return -np.asarray(cost, float), np.asarray(nc, float)
    cands = []
    for t0 in th._starts(c, k, flops, sweep):
        cands += [th.evaluate_thresholds(c, k, flops, t0), th.evaluate_thresholds(c, k, flops, th._descend(c, k, flops, t0, feas, key))]
    ok = [p for p in cands if feas([int(p.correct_counts.sum())], [p.expected_flops * n])[0]]
    if mode == "budget":
        return max(ok, key=lambda p: (p.accuracy, -p.expected_cost))
    return min(ok, key=lambda p: (p.expected_cost, -p.accuracy))


def solver_study(conf, corr, flops, n=1000, draws=25, seed=0) -> dict:
    """Exact solvers against the former local search on random validation-sized subsets of a pool."""
    rng = np.random.default_rng(seed)
    out = {"n": n, "draws": draws, "exits": int(conf.shape[0])}
    for mode, target in (("budget", 0.4), ("max_drop", MAX_DROP)):
        gaps, secs_local, secs_exact, exact_all = [], 0.0, 0.0, True
        for _ in range(draws):
            idx = rng.choice(conf.shape[1], n, replace=False)
            c, k = conf[:, idx], corr[:, idx]
            t = time.time()
            lo = _former_local_search(c, k, flops, mode, target)
            secs_local += time.time() - t
            t = time.time()
            ex = (th.solve_budget if mode == "budget" else th.solve_max_drop)(c, k, flops, target)
            secs_exact += time.time() - t
            exact_all &= ex.meta["search"] == "exact"
            gaps.append((ex.accuracy - lo.accuracy, lo.expected_cost - ex.expected_cost))
        g = np.array(gaps)
        miss = g[:, 0] > 1e-12 if mode == "budget" else g[:, 1] > 1e-12
        out[mode] = {"target": target, "missed": int(miss.sum()), "worst_accuracy_gap": float(g[:, 0].max()),
                     "worst_extra_cost": float(g[:, 1].max()), "all_exact": bool(exact_all),
                     "seconds_local": secs_local / draws, "seconds_exact": secs_exact / draws, "load": os.getloadavg()[0]}
    return out


def clopper_pearson(k, n, alpha):
    lo = 0.0 if k == 0 else 1 - risk.binom_upper_bound(n - k, n, alpha / 2)
    hi = 1.0 if k == n else risk.binom_upper_bound(k, n, alpha / 2)
    return lo, hi


def cli(*argv) -> str:
    """Run the installed command as a user would and return its output."""
    r = subprocess.run([sys.executable, "-m", "dmpo_edge", *argv], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"dmpo-edge {' '.join(argv)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def digits_example(bundle: str) -> dict:
    """The issue's example end to end: calibrate on digits:val, evaluate on the unseen digits:test."""
    out = {}
    for label, extra in (("plain --max-drop 0.01", []), ("--max-drop 0.01 --confidence 0.9", ["--confidence", "0.9"])):
        text = cli("calibrate", bundle, "--val", "digits:val", "--max-drop", "0.01", "--quiet", *extra)
        ev = os.path.join(os.path.dirname(bundle), "eval.json")
        cli("eval", bundle, "--data", "digits:test", "--json", ev, "--quiet")
        with open(ev) as f:
            e = json.load(f)
        op = e["operating_point"]
        out[label] = {"calibrate_output": text, "val_accuracy": op["validation_accuracy"], "val_cost": op["validation_cost"],
                      "test_accuracy": op["accuracy"], "test_final": e["final_accuracy"], "test_cost": op["expected_cost"],
                      "test_drop": e["final_accuracy"] - op["accuracy"]}
    return out


def pct(v, d=1) -> str:
    return "n/a" if v is None else f"{100 * v:.{d}f}%"


def markdown(results: list, example: dict | None, seconds: float, loadavg: str, solvers: dict | None = None) -> str:
    L = [BEGIN, "## Risk-controlled exit calibration", "",
         f"Reproduce: `python benchmarks/risk_coverage.py --digits-model ... --fashion-model ...` ({seconds / 60:.0f} min on 2 "
         f"shared cores, {loadavg}).", "",
         f"`calibrate --max-drop {MAX_DROP}` returns the cheapest thresholds whose accuracy on the validation split is within "
         "1 point of the final exit's: exact there, but it rides the split's luck. `--confidence 0.9` instead certifies "
         "thresholds with Learn then Test: the loss 1[early exit wrong, final right] (which bounds the drop), exact binomial "
         "p-values, fixed-sequence testing along a path fixed before the tested samples are seen (`shared`: one threshold "
         "for every exit on a fixed grid, all samples tested; `split`: budgeted-batch sweep fit on half, tested on the "
         "other half). The promise: with probability >= 90% over the validation draw, the expected drop on new data "
         "is <= 1 point.", ""]
    if example:
        L += ["**The digits example** (model tuned on `digits:train`, 1,078 images; thresholds on `digits:val`, 360; "
              "measured on the unseen `digits:test`, 359):", "",
              "| calibration | val accuracy | val cost | test accuracy | test final exit | test drop | test cost |",
              "|---|---|---|---|---|---|---|"]
        for k, r in example.items():
            L.append(f"| `{k}` | {pct(r['val_accuracy'])} | {pct(r['val_cost'])} | {pct(r['test_accuracy'])} | "
                     f"{pct(r['test_final'])} | {100 * r['test_drop']:.1f} pts | {pct(r['test_cost'])} |")
        risk_out = [ln for ln in example["--max-drop 0.01 --confidence 0.9"]["calibrate_output"].splitlines()
                    if ln.startswith("risk control") or ln.startswith("  ")][-3:]
        L += ["", "```", *risk_out, "```", ""]
    if solvers:
        b, d = solvers["budget"], solvers["max_drop"]
        L += [f"**Exact solvers.** On {solvers['draws']} random {solvers['n']}-image validation subsets of the Fashion-MNIST "
              f"pool ({solvers['exits']} exits), the former local search missed the optimum of `--budget {b['target']:g}` in "
              f"{b['missed']} (worst: {100 * b['worst_accuracy_gap']:.2f} accuracy points) and of `--max-drop {d['target']:g}` "
              f"in {d['missed']} (worst: {100 * d['worst_extra_cost']:.1f}% of the full FLOPs more than needed); the exact "
              f"search proved its optimum every time ({'yes' if b['all_exact'] and d['all_exact'] else 'NO'}), in "
              f"{b['seconds_exact']:.1f} s and {d['seconds_exact']:.1f} s per solve against {b['seconds_local']:.1f} s and "
              f"{d['seconds_local']:.1f} s for the local search (load average {b['load']:.0f} on 2 cores). "
              "`tests/test_calib_thresholds.py` checks both solvers against brute force (every combination of distinct "
              "thresholds and both sentinels) on small problems with ties.", ""]
    L += ["**Coverage over random validation/test splits** of a pool of images tuning never saw (deployed fp32 ONNX "
          "stages, run once; splits resampled in numpy). *Held*: the drop measured on the split's test part is <= 1 "
          "point (must be >= 90% for the risk-controlled rows; the test part's own sampling noise counts against it).", "",
          "| data (pool, val / test) | method | held | 90% CI | mean drop | 90th pct drop | mean test cost | full model only |",
          "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for m, s in r["summary"].items():
            ci = f"{pct(s['held_ci90'][0])}-{pct(s['held_ci90'][1])}"
            L.append(f"| {r['name']} ({r['pool']}, {r['val']} / {r['test']}) | {m} | {s['held']}/{s['splits']} "
                     f"({pct(s['held_fraction'])}) | {ci} | {100 * s['drop_mean']:.2f} pts | {100 * s['drop_p90']:.2f} pts | "
                     f"{pct(s['cost_mean'])} | {s['full_only']} |")
    pools = {r["name"]: r for r in results}
    L += ["", "Models: digits, `dmpo-edge tune --data digits:train` with the defaults (8 epochs); Fashion-MNIST, the DMPO "
          "seed-0 checkpoint of `benchmarks/fashion_mnist.py` (800 training images, 4 epochs, 32 px input), a weak model "
          "whose early exits are about as accurate as its final exit. Exit accuracy on each pool (cost share of the full "
          "pipeline): " + "; ".join(
              f"{name}: " + ", ".join(f"{pct(a)} @ {pct(c, 0)}" for a, c in zip(r["exit_accuracy_pool"], r["cost_per_exit"]))
              for name, r in pools.items()) + ".", ""]
    verdict = []
    for r in results:
        s = r["summary"]
        held = ", ".join(f"{m} {pct(s[m]['held_fraction'])}" for m in ("plain", "risk shared", "risk split") if m in s)
        ok = all(s[m]["held_fraction"] >= CONFIDENCE for m in ("risk shared", "risk split") if m in s)
        verdict.append(f"{r['name']} with {r['val']} validation images: {held} "
                       f"({'the promised 90% holds' if ok else 'the promised 90% does NOT hold'} for the risk-controlled rows)")
    L += ["**What the data shows.** " + "; ".join(verdict) + ". The plain solver breaks its 1-point promise on about half "
          "(digits) to two thirds (Fashion-MNIST) of the splits. The risk-controlled rows keep it more often than promised "
          "because the guarantee is conservative: its loss counts the samples the early exit gets wrong and the final exit "
          "right but not the reverse, and on these models the early exits are about as accurate as the final one, so the "
          "realised drops are mostly negative. The price is compute: on Fashion-MNIST the mean test cost goes from about "
          "34% of the full pipeline (plain) to about 70% (shared path) and 75-82% (split path); on digits from 31% to 38%. "
          "The split path tests only half the samples: with digits' 180 it cannot certify 1% at 90% (even zero losses "
          "give p = 0.99^180 = 0.16), so every sample runs the full model; `shared` is the default for that reason. "
          "The digits example above does not reproduce the original 3-point drop: with this model and the current "
          "splits the plain thresholds gain 0.8 points on digits:test (its early exits beat its final exit there); "
          "the random splits show how often that luck runs out.", "", END]
    return "\n".join(L) + "\n"


def update_results_md(path: str, section: str) -> None:
    replace_section(path, section, BEGIN, END)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits-model", help="checkpoint tuned on digits:train")
    ap.add_argument("--fashion-model", help="checkpoint tuned on (part of) fashion-mnist:train")
    ap.add_argument("--splits", type=int, default=200, help="random validation/test splits per setting (default 200)")
    ap.add_argument("--fashion-val", type=int, nargs="+", default=[1000, 4000], help="validation sizes (default 1000 4000)")
    ap.add_argument("--out", default="out/risk")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--render-only", action="store_true", help="rewrite the docs section from OUT/risk_coverage.json")
    ap.add_argument("--solvers-only", action="store_true",
                    help="run only the exact-versus-local solver comparison on the cached Fashion-MNIST pool, add it to "
                         "OUT/risk_coverage.json and rewrite the docs section")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.solvers_only:
        path = os.path.join(args.out, "risk_coverage.json")
        with open(path) as f:
            saved = json.load(f)
        conf, corr, flops = pool_outputs(args.fashion_model, ["fashion-mnist:test"], args.out, "fashion")
        saved["solvers"] = solver_study(conf, corr, flops)
        print(json.dumps(saved["solvers"], indent=1))
        with open(path, "w") as f:
            json.dump(saved, f, indent=1)
        args.render_only = True
    if args.render_only:
        with open(os.path.join(args.out, "risk_coverage.json")) as f:
            saved = json.load(f)
        update_results_md(os.path.join(args.docs, "results.md"),
                          markdown(saved["results"], saved["example"], saved["seconds"], saved["load"], saved.get("solvers")))
        return 0
    t0 = time.time()
    loads = [os.getloadavg()[0]]
    results, example, solvers = [], None, None
    if args.digits_model:
        conf, corr, flops = pool_outputs(args.digits_model, ["digits:val", "digits:test"], args.out, "digits")
        results.append(study("digits", conf, corr, flops, 360, args.splits, 0))
        print(json.dumps(results[-1]["summary"], indent=1), f"[{load()}]", flush=True)
        example = digits_example(os.path.join(args.out, "digits_bundle"))
        for k, r in example.items():
            print(k, {a: b for a, b in r.items() if a != "calibrate_output"}, flush=True)
        loads.append(os.getloadavg()[0])
    if args.fashion_model:
        conf, corr, flops = pool_outputs(args.fashion_model, ["fashion-mnist:test"], args.out, "fashion")
        solvers = solver_study(conf, corr, flops)
        print(json.dumps(solvers, indent=1), flush=True)
        for i, n_val in enumerate(args.fashion_val):
            results.append(study("Fashion-MNIST", conf, corr, flops, n_val, args.splits, 1 + i, with_plain=(i == 0)))
            print(json.dumps(results[-1]["summary"], indent=1), f"[{load()}]", flush=True)
            loads.append(os.getloadavg()[0])
    secs = time.time() - t0
    loadavg = f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the run"
    with open(os.path.join(args.out, "risk_coverage.json"), "w") as f:
        json.dump({"results": results, "example": example, "seconds": secs, "load": loadavg, "solvers": solvers}, f, indent=1)
    update_results_md(os.path.join(args.docs, "results.md"), markdown(results, example, secs, loadavg, solvers))
    print(f"done in {secs:.0f} s  [{load()}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
