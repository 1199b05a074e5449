"""`dmpo-edge demo`: the whole job in one command; its summary figures are the ones eval and bench wrote."""

import json
import re

import pytest

from dmpo_edge.cli import main


@pytest.mark.slow  # tune (reused checkpoint), compile, calibrate, run, eval and bench: about 90 s on 2 cores
def test_demo_runs_the_whole_job_and_its_summary_matches_eval_and_bench(tiny_checkpoint, tmp_path, capsys):
    work = tmp_path / "demo"
    code = main(["demo", "--model", tiny_checkpoint, "--workdir", str(work), "--precision", "fp32", "--calib-count", "64",
                 "--duration", "0.2", "--batch", "16", "--backend", "ort", "--exporter", "torchscript", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    ev = json.loads((work / "eval.json").read_text())
    bench = json.loads((work / "bench.json").read_text())
    summary = out.split("== summary", 1)[1]
    # per-exit accuracy rows are eval's anytime accuracies
    for e in ev["exits"]:
        row = re.search(rf"^\s+{e['exit']}\s+([\d.]+)%", summary, re.M)
        assert row and abs(float(row.group(1)) - 100 * e["accuracy"]) < 0.051, (e, summary)
    op = ev["operating_point"]
    assert f"{100 * op['accuracy']:.1f}%" in summary.split("early-exit accuracy", 1)[1].splitlines()[0]
    assert f"{100 * op['expected_cost']:.1f}% of the full model" in summary
    sp = bench["results"][0]["early_exit"]["speedup"]
    assert f"realised speed-up {sp['realised']:.2f}x" in summary and f"ideal {sp['ideal']:.2f}x" in summary
    # the runtime pipeline exited exactly the samples eval predicted from the same graphs and thresholds
    hist = [int(v) for v in re.search(r"exits \[([\d, ]+)\]", summary).group(1).split(",")]
    assert hist == op["exit_counts"]
    assert (work / "eval.png").stat().st_size > 1000


def _small_fashion_mnist(root, n_train=1200, n_test=300):
    """A real slice of the installed Fashion-MNIST (first images of each official file) as IDX files."""
    import os

    import numpy as np

    from dmpo_edge.calib.idx import read_idx, write_idx
    from dmpo_edge.calib.idx_sets import FASHION_MNIST_DIR

    os.makedirs(root, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            write_idx(os.path.join(root, name), np.ascontiguousarray(read_idx(os.path.join(FASHION_MNIST_DIR, name))[:n]))
    return root


@pytest.mark.slow
def test_demo_on_fashion_mnist_compares_with_the_static_model(tmp_path, capsys, monkeypatch, tiny_checkpoint_for):
    import os

    from dmpo_edge.calib.idx_sets import FASHION_MNIST_DIR

    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")):
        pytest.skip("Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.setenv("DMPO_EDGE_FASHION_MNIST", _small_fashion_mnist(str(tmp_path / "fm")))
    ckpt = tiny_checkpoint_for("fashion-mnist:train")
    work = tmp_path / "demo"
    code = main(["demo", "--data", "fashion-mnist", "--model", ckpt, "--workdir", str(work), "--precision", "fp32",
                 "--calib-count", "64", "--duration", "0.2", "--batch", "16", "--backend", "ort",
                 "--exporter", "torchscript", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "$ dmpo-edge calibrate" in out and "--val fashion-mnist:val" in out and "--data fashion-mnist:test" in out
    ev = json.loads((work / "eval.json").read_text())
    assert ev["data"]["size"] == 300
    summary = out.split("== summary", 1)[1]
    op = ev["operating_point"]
    line = summary.split("against the static model", 1)[1].splitlines()[0]
    assert f"early exit {100 * op['accuracy']:.1f}% at {100 * op['expected_cost']:.1f}%" in line, line
    assert f"static model (every stage, final exit) {100 * ev['final_accuracy']:.1f}% at 100.0%" in line, line
