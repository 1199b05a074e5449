"""model.pt round trip, refusals (foreign pickles, non-checkpoints, bad shapes), timm-format ViT weights."""

import json
import os

import pytest

torch = pytest.importorskip("torch")

from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.models import FORMAT, TINY_VIT_CONFIG, build_model, load_checkpoint, save_checkpoint
from dmpo_edge.models.vit import load_vit_weights
from dmpo_edge.preprocess import Preprocess

META = dict(
    classes=[str(i) for i in range(10)], preprocess=Preprocess(resize=32, crop=32).to_dict(),
    loss_schedule={"mode": "two_phase", "phase1": [0.1, 0.55, 1.0], "phase2": [1.0, 1.0, 0.5], "switch_epoch": 1},
    metrics={"exit_accuracy": [0.5, 0.6, 0.7], "stage_flops": [1, 2, 3], "cumulative_flops": [1, 3, 6]},
)


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = build_model(TINY_VIT_CONFIG)
    with torch.no_grad():  # move every parameter away from its init so the round trip is tested on real values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _timm_vit_state_dict(dim, depth, heads, image, patch, classes, mlp_ratio=4, seed=0):
    """Key names and shapes of timm's VisionTransformer, written out independently of dmpo_edge's ViT."""
    g = torch.Generator().manual_seed(seed)
    hidden = int(dim * mlp_ratio)
    shapes = {
        "cls_token": (1, 1, dim), "pos_embed": (1, (image // patch) ** 2 + 1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (classes, dim), "head.bias": (classes,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,),
        })
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = _tiny()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, **META)
    raw = torch.load(path, weights_only=True)  # plain dict: nothing in it runs code
    assert raw["format"] == FORMAT and raw["version"] == 1
    assert set(raw) >= {"config", "state_dict", "classes", "preprocess", "loss_schedule", "metrics"}
    json.dumps({k: v for k, v in raw.items() if k != "state_dict"})  # everything else is JSON-like
    assert all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())
    loaded, meta = load_checkpoint(path)
    assert meta["classes"] == META["classes"] and meta["metrics"]["cumulative_flops"] == [1, 3, 6]
    assert Preprocess.from_dict(meta["preprocess"]).size == (32, 32)
    assert meta["config"]["exits"] == [0, 1, 3] and loaded.num_stages == 3
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not loaded.training


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, _tiny(), **META)
    before = path.read_bytes()
    with pytest.raises(DmpoEdgeError, match="JSON"):
        save_checkpoint(path, _tiny(1), **{**META, "metrics": {"bad": object()}})
    assert path.read_bytes() == before
    # no temp file left behind (the writer lock file stays beside it: see docs/reliability.md)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.pt.lock", "model.pt"]


def test_foreign_pickled_module_needs_opt_in(tmp_path):
    model = _tiny()
    path = str(tmp_path / "whole_module.pt")
    torch.save(model, path)  # a user's own nn.Module, pickled whole
    with pytest.raises(DmpoEdgeError, match="allow_pickle=True"):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match="runs code"):
        loaded, meta = load_checkpoint(path, allow_pickle=True)
    assert loaded.num_stages == 3 and meta["classes"] == [str(i) for i in range(10)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_exit(0, loaded.forward_stage(0, x)), model(x)[0])


@pytest.mark.parametrize("kind", ["random_bytes", "json", "bare_state_dict", "foreign_dict", "missing"])
def test_not_a_checkpoint_is_one_clear_error(tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "random_bytes":
        path.write_bytes(os.urandom(256))
    elif kind == "json":
        path.write_text('{"format": "dmpo-edge-model"}')
    elif kind == "bare_state_dict":
        torch.save(_tiny().state_dict(), path)
    elif kind == "foreign_dict":
        torch.save({"epoch": 3, "weights": torch.zeros(2)}, path)
    with pytest.raises(DmpoEdgeError, match="not a dmpo-edge checkpoint|does not exist") as exc:
        load_checkpoint(path)
    assert "\n" not in str(exc.value)


def test_checkpoint_with_mismatched_tensor_names_it(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, _tiny(), **META)
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["exits.0.predictor.fc.weight"] = torch.zeros(10, 7)
    torch.save(raw, path)
    with pytest.raises(DmpoEdgeError, match=r"exits\.0\.predictor\.fc\.weight.*\(10, 7\).*\(10, 36\)"):
        load_checkpoint(path)


def test_exits_beyond_the_backbone_depth_are_refused():
    with pytest.raises(DmpoEdgeError, match=r"beyond the depth.*4 blocks"):
        build_model({**TINY_VIT_CONFIG, "exits": [1, 4]})
    with pytest.raises(DmpoEdgeError, match=r"beyond the depth.*16 blocks"):
        build_model({"backbone": "efficientnet_lite0", "exits": [3, 16], "pretrained": False})


def test_timm_format_state_dict_loads_into_the_vit():
    cfg = {**TINY_VIT_CONFIG, "lora_rank": 2}
    model = build_model(cfg)
    sd = _timm_vit_state_dict(32, 4, 2, 32, 8, classes=10)
    report = load_vit_weights(model.backbone, sd)
    assert report["skipped"] == []
    own = model.backbone.state_dict()
    for name, value in sd.items():
        torch.testing.assert_close(own[name], value, rtol=0, atol=0, msg=name)
    # tuning parameters stay as built: adapters / LoRA are the only tensors the file does not provide
    assert report["missing"] and all(".lora_" in n or ".adapter." in n for n in report["missing"])
    # the ViT computes timm's function: zero-initialised PEFT branches leave it unchanged
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(model.backbone(x)).all()


def test_timm_weights_with_another_image_size_resize_the_position_embedding(tmp_path):
    sd = _timm_vit_state_dict(32, 4, 2, 48, 8, classes=1000)  # 6 x 6 grid, ImageNet head
    sd["pos_embed"][:, 1:] = 0.25  # a constant grid stays constant under bicubic resampling
    path = tmp_path / "vit.pth"
    torch.save(sd, path)
    model = build_model({**TINY_VIT_CONFIG, "pretrained": str(path)})  # a timm file as the pre-trained backbone
    pe = model.backbone.pos_embed.detach()
    assert pe.shape == (1, 17, 32)
    torch.testing.assert_close(pe[:, 0], sd["pos_embed"][:, 0])
    torch.testing.assert_close(pe[:, 1:], torch.full((1, 16, 32), 0.25), atol=1e-6, rtol=0)
    assert model.pretrained_report["skipped"] == ["head.weight", "head.bias"]  # 1000 classes: a new task
    torch.testing.assert_close(model.backbone.blocks[3].mlp.fc2.weight.detach(), sd["blocks.3.mlp.fc2.weight"])


def test_timm_weights_with_a_wrong_shape_name_the_tensor_and_both_shapes():
    model = build_model(TINY_VIT_CONFIG)
    sd = _timm_vit_state_dict(32, 4, 2, 32, 8, classes=10)
    sd["blocks.2.attn.qkv.weight"] = torch.zeros(48, 32)
    with pytest.raises(DmpoEdgeError, match=r"'blocks\.2\.attn\.qkv\.weight' has shape \(48, 32\).*\(96, 32\)"):
        load_vit_weights(model.backbone, sd)
    sd = _timm_vit_state_dict(64, 4, 2, 32, 8, classes=10)  # vit of another width
    with pytest.raises(DmpoEdgeError, match="pos_embed"):
        load_vit_weights(model.backbone, sd)


def test_hugging_face_vit_names_are_converted():
    model = build_model(TINY_VIT_CONFIG)
    sd = _timm_vit_state_dict(32, 4, 2, 32, 8, classes=10)
    hf = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"],
          "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
          "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
          "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"],
          "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}
    names = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(4):
        for ours, theirs in names.items():
            for t in ("weight", "bias"):
                hf[f"vit.encoder.layer.{i}.{theirs}.{t}"] = sd[f"blocks.{i}.{ours}.{t}"]
        for t in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{t}"].chunk(3)
            for part, val in zip(("query", "key", "value"), (q, k, v)):
                hf[f"vit.encoder.layer.{i}.attention.attention.{part}.{t}"] = val
    load_vit_weights(model.backbone, hf)
    own = model.backbone.state_dict()
    for name, value in sd.items():
        torch.testing.assert_close(own[name], value, rtol=0, atol=0, msg=name)
