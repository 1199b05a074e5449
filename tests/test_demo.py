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
