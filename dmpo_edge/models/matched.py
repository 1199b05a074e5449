"""Sizing first-order early heads to the parameters and FLOPs of DMPO's exits.

A comparison of covariance heads against GAP + linear heads mixes two things: second-order statistics and
a 27x larger head. The control variant replaces every early exit (bypass + covariance predictor) by a
:class:`~dmpo_edge.models.heads.FirstOrderPredictor` with the same parameter count and, as nearly as a
first-order head allows, the same FLOPs. FLOPs are counted as everywhere in the product (``FlopCounterMode``:
2 x multiply-adds of convolutions and matrix products) on the exit's real feature shape.

A first-order head spends at most 2 x positions FLOPs per parameter (a 1x1 convolution over every position),
while the covariance exit also spends parameter-free FLOPs (the covariance and the Newton-Schulz iterations);
on small feature maps the FLOPs cannot both be matched, and then parameters are matched and FLOPs fall short.
:func:`match_first_order` reports both, so that every table can show what was matched.
"""

from __future__ import annotations

import copy

from .._lazy import require

torch = require("torch", "models")

__all__ = ["match_first_order", "count_params_flops"]

#: parameters are matched to within this share; within it, the FLOPs gap is minimised
PARAM_TOLERANCE = 0.01


def count_params_flops(module, feats) -> tuple:
    """(parameters, FLOPs for one sample) of ``module`` applied to ``feats`` (a batch of one)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = module.training
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(feats)
    module.train(was)
    return sum(p.numel() for p in module.parameters()), int(counter.get_total_flops())


def _first_order_cost(kind, channels, positions, num_classes, width, hidden) -> tuple:
    params = channels * width + (3 * width if kind == "tokens" else 2 * width)  # reduce (+ bias for tokens) + norm
    flops = 2 * positions * channels * width
    fc_in = width
    if hidden > 0:
        params += width * hidden + hidden
        flops += 2 * width * hidden
        fc_in = hidden
    params += fc_in * num_classes + num_classes
    flops += 2 * fc_in * num_classes
    return params, flops


def _search(kind, channels, positions, num_classes, target_params, target_flops) -> tuple:
    best = None
    for width in range(1, max(2, target_params // max(1, channels) + 2)):
        base_params, _ = _first_order_cost(kind, channels, positions, num_classes, width, 0)
        options = [0]
        per_hidden = width + 1 + num_classes
        rest = target_params - (base_params - width * num_classes) - num_classes
        h = rest / per_hidden
        # a hidden layer narrower than the classes would be a bottleneck, not capacity: none rather than that
        options += [v for v in (int(h), int(h) + 1) if v >= num_classes]
        for hidden in options:
            p, f = _first_order_cost(kind, channels, positions, num_classes, width, hidden)
            dp, df = abs(p - target_params) / target_params, abs(f - target_flops) / target_flops
            key = (0, df, dp) if dp <= PARAM_TOLERANCE else (1, dp, df)
            if best is None or key < best[0]:
                best = (key, width, hidden, p, f)
    return best[1:]


def match_first_order(model) -> list:
    """Per early exit of ``model``: the DMPO exit's parameters and FLOPs at that place, and the first-order head
    ``widths`` ([width, hidden]) that match them, with that head's own parameters and FLOPs."""
    from .dmpo import EarlyExit
    from .heads import FirstOrderPredictor

    cfg = copy.deepcopy(model.config)
    dmpo_cfg = dict(cfg, bypass=True, early_head="cov")
    size = int(cfg["image_size"])
    p = next(model.parameters())
    x = torch.zeros(1, 3, size, size, dtype=p.dtype, device=p.device)
    kind = model.backbone.feature_kind
    rows = []
    with torch.no_grad():
        for k, block in enumerate(cfg["exits"][:-1]):
            x = model.forward_stage(k, x)
            channels = model.backbone.channels(block)
            positions = x.shape[1] if kind == "tokens" else x.shape[2] * x.shape[3]
            target = EarlyExit(kind, channels, dmpo_cfg).to(x.device)
            tp, tf = count_params_flops(target, x)
            width, hidden, _, _ = _search(kind, channels, positions, cfg["num_classes"], tp, tf)
            head = FirstOrderPredictor(kind, channels, cfg["num_classes"], width, hidden).to(x.device)
            hp, hf = count_params_flops(head, x)  # measured, not the formula: what every table reports
            rows.append({"exit": k, "block": block, "channels": channels, "positions": positions, "widths": [width, hidden],
                         "dmpo_params": tp, "dmpo_flops": tf, "params": hp, "flops": hf})
    return rows
