"""The "add a backend" example of docs/architecture.md is real code: run it on a real bundle against ONNX Runtime."""

import os
import re

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "architecture.md")


@pytest.fixture(scope="module")
def reference_backend():
    text = open(DOC, encoding="utf-8").read()
    section = text.split("### Worked example: add a backend", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns = {"__name__": "architecture_example"}
    exec(compile(code, DOC, "exec"), ns)
    return ns["ReferenceBackend"]


def test_the_example_backend_matches_onnx_runtime_stage_by_stage(reference_backend, toy_bundle):
    from dmpo_edge.runtime import run_all_stages

    tb = toy_bundle(num_stages=3, classes=4, seed=11, thresholds=[0.5, 0.5])
    x = tb.inputs(13, seed=3)
    got = run_all_stages(tb.path, x, batch_size=5, backend=reference_backend(tb.path))
    want = run_all_stages(tb.path, x, batch_size=5, backend="ort")
    for k, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g["logits"], w["logits"], rtol=1e-5, atol=1e-5, err_msg=f"stage {k}")
        np.testing.assert_array_equal(g["prediction"], w["prediction"])


def test_the_example_backend_runs_the_pipeline_with_exits(reference_backend, toy_bundle):
    from dmpo_edge.runtime import Pipeline

    tb = toy_bundle(num_stages=3, classes=4, seed=11, thresholds=[0.5, 0.5])
    x = tb.inputs(40, seed=4)
    with Pipeline.from_bundle(tb.path, backend="ort", backend_options={"threads": 1}) as p:
        thr = [float(np.quantile(run_conf, 0.5)) for run_conf in _confidences(p, x)]
        want = p.predict(x, batch_size=8, thresholds=thr)
    with Pipeline.from_bundle(tb.path, backend=reference_backend, thresholds=thr, max_in_flight=3) as p:
        got = p.predict(x, batch_size=8)
        stats = p.stats()
    assert np.bincount(got.exit_stage, minlength=3).min() > 0  # every exit takes a share: the regroup is exercised
    np.testing.assert_array_equal(got.exit_stage, want.exit_stage)
    np.testing.assert_array_equal(got.prediction, want.prediction)
    assert stats[0]["samples_in"] == 40 and stats[1]["samples_in"] == 40 - stats[0]["exited"]


def _confidences(pipe, x):
    from dmpo_edge.runtime import run_all_stages

    outs = run_all_stages(pipe.bundle, x, backend="ort")
    return [o["confidence"] for o in outs[:-1]]
