"""The size-matched first-order early head: parameters and FLOPs against the DMPO exit it replaces, a checkpoint
that rebuilds the same shapes, an ONNX export that matches torch; and the CPU thread choice of tuning."""

import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.models import TINY_VIT_CONFIG, build_model, load_checkpoint, save_checkpoint
from dmpo_edge.models.config import normalize_config
from dmpo_edge.models.matched import PARAM_TOLERANCE, count_params_flops, match_first_order
from dmpo_edge.models.threads import free_cpu_threads


def _exit_feats(model, k, size):
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        for j in range(k + 1):
            x = model.forward_stage(j, x)
    return x


@pytest.mark.parametrize("size", [32, 64])
def test_first_order_heads_match_dmpo_exits_on_efficientnet(size):
    cfg = {"backbone": "efficientnet_lite0", "image_size": size, "exits": [1, 5, 10], "early_head": "first_order",
           "bypass": False}
    model = build_model(cfg, load_weights=False)
    dmpo = build_model({**cfg, "early_head": "cov", "bypass": True}, load_weights=False)
    rows = match_first_order(model)
    assert [list(r["widths"]) for r in rows] == model.config["head_widths"]
    for k, row in enumerate(rows):
        feats = _exit_feats(model, k, size)
        p, f = count_params_flops(model.exits[k], feats)
        dp, df = count_params_flops(dmpo.exits[k], feats)  # the real DMPO exit, bypass + covariance head
        assert (row["params"], row["flops"], row["dmpo_params"], row["dmpo_flops"]) == (p, f, dp, df)
        assert abs(p - dp) <= PARAM_TOLERANCE * dp, (k, p, dp)
        # FLOPs: matched where a first-order head can spend them (exit 0 at 64 px has 256 positions),
        # never above the DMPO exit, and reported where it cannot (a few positions)
        assert f <= df * 1.02
        if size == 64 and k == 0:
            assert abs(f - df) <= 0.05 * df, (f, df)
    # a first-order head is not a bottleneck: the pooled width is at least the classes
    assert all(w >= 10 and (h == 0 or h >= 10) for w, h in model.config["head_widths"])


def test_first_order_checkpoint_round_trip_and_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_model({**TINY_VIT_CONFIG, "early_head": "first_order", "bypass": False}).eval()
    widths = model.config["head_widths"]
    assert len(widths) == len(TINY_VIT_CONFIG["exits"]) - 1
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, classes=[str(i) for i in range(10)], preprocess={"resize": 32, "crop": 32},
                    loss_schedule={"mode": "uniform", "epochs": 1, "phase1": [1.0] * 3, "phase2": [1.0] * 3}, metrics={})
    again, meta = load_checkpoint(path)
    assert meta["config"]["head_widths"] == widths
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(x), again(x)
    for a, b in zip(ref, out):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)

    deployed = again.merged()  # LoRA folded, as compile exports it

    class Exit0(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = deployed

        def forward(self, x):
            return self.m.forward_exit(0, self.m.forward_stage(0, x))

    onnx_path = str(tmp_path / "exit0.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Exit0().eval(), (x,), onnx_path, input_names=["x"], output_names=["logits"], dynamo=False,
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17)
    got = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).run(None, {"x": x[:2].numpy()})[0]
    np.testing.assert_allclose(got, ref[0][:2].numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(got).max() > 1e-3


def test_head_widths_are_validated():
    base = {**TINY_VIT_CONFIG, "early_head": "first_order"}
    with pytest.raises(DmpoEdgeError, match="head_widths"):
        normalize_config({**base, "head_widths": [[8, 0]]})  # 2 early exits, one pair
    with pytest.raises(DmpoEdgeError, match="head_widths"):
        normalize_config({**base, "head_widths": [[8, 0], [0, 0]]})
    assert normalize_config({**base, "head_widths": [[8, 0], [9, 12]]})["head_widths"] == [[8, 0], [9, 12]]


def test_thread_choice_follows_free_cores(monkeypatch):
    from dmpo_edge.models import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for busy, want in ((0.1, 2), (0.6, 1), (1.9, 1), (7.5, 1)):
        monkeypatch.setattr(threads, "busy_cores", lambda cores, busy=busy: busy)
        monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0, 0))  # trails; the measurement wins
        n, why = free_cpu_threads()
        assert n == want and why == f"2 cores, {busy:.1f} busy now, load 3.0", (busy, n, why)
    # no /proc/stat (not Linux): the load average decides
    monkeypatch.setattr(threads, "busy_cores", lambda cores: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.2, 0, 0))
    assert free_cpu_threads() == (6, "8 cores, load 2.2")


def test_busy_cores_reads_only_this_process_cores(tmp_path, monkeypatch):
    from dmpo_edge.models import threads

    snaps = iter([
        "cpu  900 0 0 900 0 0 0 0\ncpu0 100 0 0 300 0 0 0 0\ncpu1 400 0 0 0 0 0 0 0\ncpu2 0 0 0 500 0 0 0 0\n",
        # +100 ticks each: cpu0 fully busy (user+system), cpu1 idle + iowait, cpu2 busy but not ours
        "cpu  1200 0 0 1000 0 0 0 0\ncpu0 150 0 50 300 0 0 0 0\ncpu1 400 0 0 60 40 0 0 0\ncpu2 100 0 0 500 0 0 0 0\n",
    ])
    stat = tmp_path / "stat"
    monkeypatch.setattr(threads.time, "sleep", lambda s: stat.write_text(next(snaps)))
    stat.write_text(next(snaps))
    assert threads.busy_cores({0, 1}, path=str(stat)) == pytest.approx(1.0)
    assert threads.busy_cores({0, 1}, path=str(tmp_path / "absent")) is None
