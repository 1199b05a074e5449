"""Parameter-efficient tuning: the pre-trained function is kept at start, only PEFT + heads move, BN stays frozen."""

import pytest

torch = pytest.importorskip("torch")

from dmpo_edge.models import TINY_VIT_CONFIG, build_model


def test_frozen_cnn_trains_only_peft_and_heads_and_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    model = build_model({"backbone": "efficientnet_lite0", "image_size": 32, "exits": [4, 10]})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith("exits.") or ".adapter." in n or ".lora_" in n or n.startswith("backbone._fc.") for n in trainable
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(8, 3, 32, 32) * 2 + 1, torch.randint(0, 10, (8,))
    for _ in range(2):
        loss = sum(torch.nn.functional.cross_entropy(lg, y) for lg in model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for name, value in before.items():
        frozen = name.startswith("backbone.") and not (".adapter." in name or ".lora_" in name or "._fc." in name)
        if frozen:  # weights and BatchNorm running statistics of the pre-trained trunk
            torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    moved = [n for n in trainable if not torch.equal(after[n], before[n])]
    assert any(".adapter." in n for n in moved) and any(".lora_" in n for n in moved)
    assert any(n.startswith("exits.") for n in moved) and "backbone._fc.weight" in moved


def test_peft_modules_start_as_the_pretrained_function_and_lora_folds_exactly():
    torch.manual_seed(0)
    cfg = {"backbone": "efficientnet_lite0", "image_size": 32, "exits": [4, 10]}
    plain = build_model({**cfg, "adapter_dim": 0, "lora_rank": 0}).eval()
    tuned = build_model(cfg).eval()
    tuned.backbone._fc.load_state_dict(plain.backbone._fc.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f_plain, f_tuned = x, x
        for k in range(plain.num_stages):
            f_plain, f_tuned = plain.forward_stage(k, f_plain), tuned.forward_stage(k, f_tuned)
            torch.testing.assert_close(f_tuned, f_plain)  # zero-initialised up-projections / LoRA B
        torch.testing.assert_close(tuned.forward_exit(2, f_tuned), plain.forward_exit(2, f_plain))
    vit = build_model(TINY_VIT_CONFIG).eval()
    with torch.no_grad():
        for n, p in vit.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(0, 0.1)
        merged = vit.merged()
        names = {type(m).__name__ for m in merged.modules()}
        assert "LoRALinear" not in names
        x = torch.randn(2, 3, 32, 32)
        for a, b in zip(vit(x), merged(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
