"""Every stage and exit of the DMPO models exports to ONNX and matches torch in ONNX Runtime (1e-4 relative)."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from dmpo_edge.models import TINY_VIT_CONFIG, build_model


class _Stage(torch.nn.Module):
    """Trunk part of stage k + exit k (what a stage graph holds, without the runtime's score and gather)."""

    def __init__(self, model, k):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x):
        feats = self.model.forward_stage(self.k, x)
        return feats, self.model.forward_exit(self.k, feats)


def _exercise_zero_inits(model):
    # adapters, bypasses and LoRA start at exactly zero; give them weight so the export has to carry them
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".up." in name or name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _check_all_stages(model, image_size, tmp_path, dynamo, stages=None):
    model.eval()
    x = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    for k in range(model.num_stages if stages is None else stages):
        stage = _Stage(model, k).eval()  # eval: the exporter restores the wrapper's mode afterwards
        path = str(tmp_path / f"stage_{k}.onnx")
        kw = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=256)},)} if dynamo else {
            "dynamic_axes": {"x": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}}, "opset_version": 17}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(stage, (x,), path, input_names=["x"], output_names=["features", "logits"], dynamo=dynamo, **kw)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        xb = x[:3]  # another batch size than the traced one: the batch axis is dynamic
        feats_o, logits_o = sess.run(None, {"x": xb.numpy()})
        with torch.no_grad():
            feats_t, logits_t = stage(xb)
        assert _rel(feats_o, feats_t.numpy()) < 1e-4, f"stage {k} features"
        assert _rel(logits_o, logits_t.numpy()) < 1e-4, f"exit {k} logits"
        assert np.abs(logits_t.numpy()).max() > 1e-3  # a head that outputs zeros would pass trivially
        if k == model.num_stages - 1:
            import onnx

            ops = {n.op_type for n in onnx.load(path).graph.node}
            assert not ops & {"Eig", "Svd", "Trilu"}, ops
        with torch.no_grad():
            x = model.forward_stage(k, x)


def test_tiny_vit_dmpo_stages_export_and_match(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY_VIT_CONFIG)  # covariance heads, bypasses, adapters and LoRA all present
    _exercise_zero_inits(model)
    _check_all_stages(model, TINY_VIT_CONFIG["image_size"], tmp_path, dynamo=False)


@pytest.mark.slow
def test_dynamo_exporter_also_handles_the_covariance_exit(tmp_path):
    # the dynamo exporter works too, at ~15 s a stage on 2 cores: one stage (trunk + bypass + covariance head)
    torch.manual_seed(0)
    model = build_model(TINY_VIT_CONFIG)
    _exercise_zero_inits(model)
    _check_all_stages(model, TINY_VIT_CONFIG["image_size"], tmp_path, dynamo=True, stages=1)


def test_covariance_exit_graph_uses_only_portable_ops(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = build_model(TINY_VIT_CONFIG).eval()
    stage = _Stage(model, 0).eval()
    path = str(tmp_path / "s0.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(stage, (torch.randn(2, 3, 32, 32),), path, dynamo=False, opset_version=17)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "MatMul" in ops and "Gather" in ops  # covariance / Newton-Schulz and the triangle gather
    assert not ops & {"Eig", "Svd", "Trilu", "Loop", "If"}, ops


def test_efficientnet_lite0_dmpo_stages_export_and_match(tmp_path):
    torch.manual_seed(0)
    # the real pre-trained trunk (random weights collapse to ~0 features and would make parity meaningless)
    model = build_model({"backbone": "efficientnet_lite0", "image_size": 32, "exits": [4, 10], "lora_rank": 2})
    _exercise_zero_inits(model)
    _check_all_stages(model, 32, tmp_path, dynamo=False)
