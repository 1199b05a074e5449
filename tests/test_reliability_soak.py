"""Soak (short): 5,000 frames through the streaming pipeline with batches in flight, in a clean process.

Every frame comes back once and in order, nothing is dropped in lossless mode, the stream never stalls
(the script's watchdog dumps the threads and exits 3 on a deadlock) and resident memory stays within 5%
after warm-up. ``python benchmarks/soak.py`` runs the full 100,000 frames (docs/reliability.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOAK = os.path.join(ROOT, "benchmarks", "soak.py")


def _soak_module():
    spec = importlib.util.spec_from_file_location("_dmpo_soak", SOAK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_soak_5000_frames_accounted_no_stall_flat_memory(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, SOAK, "--frames", "5000", "--warmup", "1000", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["frames"] == fig["frames_read"] == fig["classified"] == 5000 and fig["last_index"] == 4999
    assert fig["frames_dropped"] == 0 and fig["out_of_order"] == 0 and not fig["stalled"]
    assert all(c > 0 for c in fig["exit_counts"]), "every stage should see traffic (batches regroup at each exit)"
    assert fig["rss_growth_pct"] < 5.0
    assert "soak: PASS" in r.stdout


def test_stream_bookkeeping_is_bounded(toy_bundle):
    """Per-frame records kept by a stream stay bounded however long it runs (weeks on a device)."""
    from dmpo_edge.runtime.stream import LATENCY_WINDOW, Stream

    soak = _soak_module()
    tb = toy_bundle(num_stages=3, classes=4, seed=0, hidden=16, size=8, thresholds=[0.5, 0.5])
    n = LATENCY_WINDOW + 1500
    s = Stream(tb.path, soak.GeneratedSource(n), batch=16, max_wait_ms=1, realtime=False, max_in_flight=2,
               pipeline_options={"backend_options": {"threads": 1}})
    count = sum(1 for _ in s)
    assert count == n and s.frames_done == n
    assert len(s.latencies_ms) == LATENCY_WINDOW
    summ = s.summary()
    assert summ["frames_classified"] == n and summ["latency_ms"]["p99"] >= summ["latency_ms"]["p50"] > 0


def test_watchdog_check_catches_lost_frames():
    """The soak's checks can fail: lost, dropped, reordered frames and memory growth are each reported."""
    soak = _soak_module()
    good = {"frames": 10, "classified": 10, "frames_read": 10, "last_index": 9, "frames_dropped": 0, "out_of_order": 0,
            "exit_counts": [5, 5], "rss_growth_pct": 1.0}
    assert soak.check(good) == []
    for change in ({"classified": 9}, {"frames_dropped": 1}, {"out_of_order": 2}, {"exit_counts": [5, 4]},
                   {"rss_growth_pct": 7.5}):
        assert len(soak.check(dict(good, **change))) == 1, change


@pytest.mark.slow
def test_soak_full_100k(tmp_path):
    """The full figure of docs/reliability.md (about 15-30 s on 2 cores): run with -m slow."""
    if os.environ.get("DMPO_SOAK_FULL") != "1":
        pytest.skip("set DMPO_SOAK_FULL=1 to run the 100,000-frame soak")
    r = subprocess.run([sys.executable, SOAK, "--frames", "100000"], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:]


def test_mixed_fault_soak_every_frame_and_every_fault_accounted_once(tmp_path):
    """Bad files of seven kinds (truncated, random, empty, text, a pixel bomb, a FIFO, a device) and sources that die
    mid-stream among good frames: each good frame exactly one result, each fault exactly one report, memory flat."""
    out = tmp_path / "mixed.json"
    r = subprocess.run([sys.executable, SOAK, "--mixed", "--rounds", "30", "--json", str(out)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["results"] == fig["good_frames"] == 30 * (24 + 5) and fig["missing"] == fig["duplicates"] == 0
    assert fig["bad_reported"] == 30 * fig["bad_files"] and fig["bad_files"] >= 6 and fig["bad_misreported"] == 0
    assert fig["dead_errors"] == fig["dead_sources"] == 30 and not fig["unexpected_errors"]
    assert fig["rss_growth_pct"] < 5.0 and "mixed soak: PASS" in r.stdout


def test_mixed_soak_check_can_fail():
    soak = _soak_module()
    good = {"rounds": 2, "bad_files": 3, "good_frames": 10, "results": 10, "missing": 0, "duplicates": 0,
            "bad_reported": 6, "bad_misreported": 0, "dead_sources": 2, "dead_errors": 2, "unexpected_errors": [],
            "rss_growth_pct": 1.0}
    assert soak.check_mixed(good) == []
    for change in ({"results": 9, "missing": 1}, {"duplicates": 1}, {"bad_reported": 5}, {"dead_errors": 1},
                   {"unexpected_errors": ["x"]}, {"rss_growth_pct": 6.0}):
        assert len(soak.check_mixed(dict(good, **change))) == 1, change
