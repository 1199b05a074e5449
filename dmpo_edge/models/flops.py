"""Per-sample FLOPs of each stage (trunk part + its exit head), counted by ``torch.utils.flop_counter``."""

from __future__ import annotations

from .._lazy import require

torch = require("torch", "models")

__all__ = ["stage_flops"]


def stage_flops(model, image_size: int) -> dict:
    """{'stage_flops': [...], 'cumulative_flops': [...]} for one sample (FlopCounterMode: 2 x multiply-adds)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .peft import fold_lora

    # count the deployed form: LoRA merged into its layer (exporters fold the merged weight to a constant)
    model = fold_lora(model).eval()
    p = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    per_stage = []
    with torch.no_grad():
        for k in range(model.num_stages):
            with FlopCounterMode(display=False) as counter:
                x = model.forward_stage(k, x)
                model.forward_exit(k, x)
            per_stage.append(int(counter.get_total_flops()))
    cumulative, total = [], 0
    for f in per_stage:
        total += f
        cumulative.append(total)
    return {"stage_flops": per_stage, "cumulative_flops": cumulative}
