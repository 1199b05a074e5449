"""Stage split and ONNX export: the stage contract, dynamic batch, the in-graph gather, parity with torch."""

import numpy as np
import pytest

from dmpo_edge.errors import DmpoEdgeError

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dmpo_edge.compile.export import export_stage, simplify  # noqa: E402
from dmpo_edge.compile.graph import exit_head_nodes, io_specs, is_second_order_head, load_model, opset_of  # noqa: E402
from dmpo_edge.compile.parity import stage_parity  # noqa: E402
from dmpo_edge.compile.stages import make_stage_module, split_stages  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    from dmpo_edge.models import load_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint)
    return model, meta


@pytest.fixture(scope="module")
def digits_x(tiny_model):
    from dmpo_edge.calib.datasets import load_dataset
    from dmpo_edge.preprocess import Preprocess

    pre = Preprocess.from_dict(tiny_model[1]["preprocess"])
    return pre(load_dataset("digits:test").take(24).images)


@pytest.fixture(scope="module")
def exported(tiny_model, digits_x, tmp_path_factory):
    """All stages exported with the TorchScript exporter (fast), probe output kept, simplified."""
    model, _ = tiny_model
    d = tmp_path_factory.mktemp("export")
    mods = split_stages(model, "max_softmax", probe=True)
    paths, feats = [], None
    for k, mod in enumerate(mods):
        args = (torch.from_numpy(digits_x[:4]),) if k == 0 else (feats, torch.arange(feats.shape[0] - 1, -1, -1, dtype=torch.int32))
        with torch.no_grad():
            outs = mod(*args)
        p = str(d / f"stage_{k}.onnx")
        assert export_stage(mod, args, p, exporter="torchscript") == "torchscript"
        assert simplify(p) in ("onnxsim", "onnxslim")
        paths.append(p)
        feats = outs[0]
    return mods, paths


def test_stage_graphs_follow_the_contract(exported):
    mods, paths = exported
    K = len(paths)
    for k, p in enumerate(paths):
        m = load_model(p)
        onnx.checker.check_model(m, full_check=True)
        assert opset_of(m) >= 17
        ins, outs = io_specs(m)
        if k == 0:
            assert [t["name"] for t in ins] == ["input"]
            assert ins[0]["shape"] == ["batch", 3, 32, 32] and ins[0]["dtype"] == "float32"
        else:
            assert [t["name"] for t in ins] == ["features_in", "keep_idx"]
            assert ins[0]["shape"][0] == "batch_in" and ins[1] == {"name": "keep_idx", "shape": ["batch"], "dtype": "int32"}
        names = [t["name"] for t in outs]
        first = "features" if k < K - 1 else "trunk_probe"
        assert names == [first, "logits", "confidence", "prediction"]
        by = {t["name"]: t for t in outs}
        assert by["logits"]["shape"] == ["batch", 10] and by["logits"]["dtype"] == "float32"
        assert by["confidence"] == {"name": "confidence", "shape": ["batch"], "dtype": "float32"}
        assert by["prediction"] == {"name": "prediction", "shape": ["batch"], "dtype": "int32"}


def test_dynamic_batch_and_in_graph_gather(exported, digits_x):
    """Stage 1 on (features of 7 rows, keep_idx of 3) equals torch on the gathered rows; any batch size runs."""
    mods, paths = exported
    with torch.no_grad():
        feats = mods[0](torch.from_numpy(digits_x[:7]))[0]
    sess = ort.InferenceSession(paths[1], providers=["CPUExecutionProvider"])
    for keep in ([6, 0, 3], [2], list(range(7))):
        keep = np.asarray(keep, np.int32)
        got = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {"features_in": feats.numpy(), "keep_idx": keep})))
        with torch.no_grad():
            ref = mods[1](feats[torch.from_numpy(keep).long()], torch.arange(len(keep), dtype=torch.int32))
        assert got["logits"].shape == (len(keep), 10)
        np.testing.assert_allclose(got["logits"], ref[1].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got["prediction"], ref[3].numpy())


def test_parity_with_torch_on_real_images(exported, digits_x):
    mods, paths = exported
    rep = stage_parity(mods, paths, digits_x, batch_size=8)
    assert rep["ok"] and len(rep["stages"]) == len(paths)
    for e in rep["stages"]:
        assert e["max_relative_error"] <= 1e-4
        assert e["prediction_agreement"] == 1.0


def test_parity_failure_names_the_stage_and_output(exported, digits_x):
    mods, paths = exported
    with pytest.raises(DmpoEdgeError, match=r"parity stage 0.*relative error"):
        stage_parity(mods, paths, digits_x[:8], tol=1e-12)


def test_exit_head_region(exported):
    """The early covariance heads are found as second-order (kept FP32 by --fp16); the final linear head is not."""
    mods, paths = exported
    kinds = []
    for k, p in enumerate(paths):
        m = load_model(p)
        head = exit_head_nodes(m, mods[k].io.trunk_output)
        assert head and not any(n.output[0] == mods[k].io.trunk_output for n in m.graph.node if n.name in head)
        kinds.append(is_second_order_head(m, head))
    assert kinds == [True] * (len(paths) - 1) + [False]


def test_dynamo_exporter_on_a_vit(digits_x, tmp_path):
    """The default exporter (torch.export based) on the tiny ViT config: tokens, attention, LayerNorm, LoRA,
    the covariance head on tokens, the margin exit score; same contract and dynamic batch."""
    from dmpo_edge.models import TINY_VIT_CONFIG, build_model

    torch.manual_seed(0)
    model = build_model(dict(TINY_VIT_CONFIG)).eval()
    mod = make_stage_module(model, 1, "margin")
    with torch.no_grad():
        feats = make_stage_module(model, 0)(torch.from_numpy(digits_x[:5]))[0]
    p = str(tmp_path / "s1.onnx")
    assert export_stage(mod, (feats, torch.tensor([4, 1], dtype=torch.int32)), p, exporter="dynamo") == "dynamo"
    ins, outs = io_specs(load_model(p))
    assert [t["shape"][0] for t in ins] == ["batch_in", "batch"] and ins[0]["shape"][1:] == list(feats.shape[1:])
    assert [t["name"] for t in outs] == ["features", "logits", "confidence", "prediction"]
    sess = ort.InferenceSession(p, providers=["CPUExecutionProvider"])
    keep = np.array([3, 0, 4], np.int32)
    got = sess.run(None, {"features_in": feats.numpy(), "keep_idx": keep})
    with torch.no_grad():
        ref = mod(feats, torch.from_numpy(keep))
    for g, r in zip(got[:3], ref[:3]):
        np.testing.assert_allclose(g, r.numpy(), rtol=1e-4, atol=1e-5)


def test_not_an_early_exit_model():
    with pytest.raises(DmpoEdgeError, match="EarlyExitModel contract"):
        make_stage_module(torch.nn.Linear(3, 3), 0)
