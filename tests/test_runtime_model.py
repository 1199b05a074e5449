"""The runtime against the torch model it was compiled from: same exits, classes and logits.

One test compiles a real tiny DMPO ViT (random weights) with the compile API in a fixture; another uses
the tuned digits model and its compiled fp32 bundle from ``out/`` when they exist.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dmpo_edge.policies import get_policy  # noqa: E402
from dmpo_edge.runtime.pipeline import Pipeline  # noqa: E402
from dmpo_edge.runtime.static import run_all_stages  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "out")


def torch_exits(model, x: np.ndarray, policy: str):
    """Per exit: logits and the exit score, computed by the torch model stage by stage."""
    score = get_policy(policy)
    outs = []
    with torch.no_grad():
        h = torch.from_numpy(x)
        for k in range(model.num_stages):
            h = model.forward_stage(k, h)
            logits = model.forward_exit(k, h).float().numpy()
            outs.append({"logits": logits, "confidence": score(logits), "prediction": logits.argmax(1)})
    return outs


def safe_thresholds(outs, quantiles, gap=2e-4):
    """Thresholds near the given quantiles of each early exit's scores, moved into a gap between scores."""
    thr = []
    for k, q in enumerate(quantiles):
        if q <= 0 or q > 1:  # everyone exits here / nobody does
            thr.append(0.0 if q <= 0 else float("inf"))
            continue
        c = np.sort(outs[k]["confidence"].astype(np.float64))
        t = float(np.quantile(c, q))
        for _ in range(200):
            if np.all(np.abs(c - t) > gap):
                break
            t += gap
        thr.append(t)
    return thr


def torch_early_exit(outs, thr):
    n, K = outs[0]["logits"].shape[0], len(outs)
    stage = np.full(n, K - 1, np.int32)
    done = np.zeros(n, bool)
    for k, t in enumerate(thr):
        now = ~done & (outs[k]["confidence"] >= t)
        stage[now], done = k, done | now
    rows = np.arange(n)
    return stage, np.stack([o["prediction"] for o in outs])[stage, rows], np.stack([o["logits"] for o in outs])[stage, rows]


def check_against_torch(bundle_path, model, x, quantile_sets, tol):
    from dmpo_edge.bundle import Bundle

    b = Bundle.load(bundle_path)
    outs = torch_exits(model, x, b.manifest["exit_policy"])
    static = run_all_stages(b, x, batch_size=16)
    for k in range(b.num_stages):
        np.testing.assert_allclose(static[k]["logits"], outs[k]["logits"], rtol=tol, atol=tol)
    for qs in quantile_sets:
        thr = safe_thresholds(outs, qs)
        stage, pred, logits = torch_early_exit(outs, thr)
        with Pipeline.from_bundle(b, backend="ort", thresholds=thr, refill=True, max_in_flight=3) as p:
            r = p.predict(x, batch_size=13, return_logits=True)
        np.testing.assert_array_equal(r.exit_stage, stage)
        np.testing.assert_array_equal(r.prediction, pred)
        np.testing.assert_allclose(r.logits, logits, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def tiny_vit_bundle(tmp_path_factory):
    try:
        from dmpo_edge.compile.compiler import compile_model
        from dmpo_edge.models import TINY_VIT_CONFIG, build_model
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"the compile API is not available ({exc})")
    from dmpo_edge.preprocess import Preprocess

    torch.manual_seed(0)
    model = build_model(TINY_VIT_CONFIG).eval()
    meta = {"config": model.config, "classes": [str(i) for i in range(10)],
            "preprocess": Preprocess(resize=32, crop=32).to_dict(), "metrics": {}}
    path = str(tmp_path_factory.mktemp("tiny_vit") / "bundle")
    compile_model(model, meta, path, precision="fp32", build="never", progress=False, log=lambda msg: None)
    return path, model


@pytest.mark.slow
def test_pipeline_matches_compiled_torch_model(tiny_vit_bundle):
    path, model = tiny_vit_bundle
    x = np.random.default_rng(0).normal(size=(70, 3, 32, 32)).astype(np.float32)
    check_against_torch(path, model, x, [(0.3, 0.5), (0.0, 0.0), (2.0, 2.0), (0.7, 0.2)], tol=1e-4)


@pytest.mark.skipif(not (os.path.isfile(os.path.join(OUT, "digits_model.pt"))
                         and os.path.isfile(os.path.join(OUT, "digits_fp32", "manifest.json"))),
                    reason="out/digits_model.pt and its compiled out/digits_fp32 bundle are not there")
def test_digits_bundle_matches_the_tuned_model():
    from dmpo_edge.bundle import Bundle
    from dmpo_edge.calib.datasets import load_dataset
    from dmpo_edge.models import load_checkpoint

    from dmpo_edge.bundle import sha256_file

    b = Bundle.load(os.path.join(OUT, "digits_fp32"))
    src = b.manifest["model"].get("source") or {}
    if src.get("sha256") and src["sha256"] != sha256_file(os.path.join(OUT, "digits_model.pt")):
        pytest.skip("out/digits_fp32 was compiled from an earlier out/digits_model.pt (recompile it)")
    model, meta = load_checkpoint(os.path.join(OUT, "digits_model.pt"))
    model.eval()
    ds = load_dataset("digits:test")
    x = b.preprocess(list(ds.images[:120]))
    K = b.num_stages
    check_against_torch(b.path, model, x, [(0.5,) * (K - 1), tuple(np.linspace(0.9, 0.3, K - 1))], tol=1e-3)
