"""Stage split: stage k of an :class:`EarlyExitModel` as one ``nn.Module`` that follows the stage contract.

stage 0:    input [N, 3, H, W]                       -> features, logits, confidence, prediction
stage k>0:  features_in [M, ...], keep_idx int32 [N]  -> features (not on the last stage), logits, confidence, prediction

Stage k > 0 gathers ``features_in[keep_idx]`` first, so the survivors of stage k-1 are regrouped on the device and
the features never visit the host (manifest ``regroup`` = ``keep_idx_gather``). The contract calls the input
``features``; an ONNX graph cannot take and give a tensor of one name, so the graph input is ``features_in`` and
the runtime finds it by role (the input that is not ``keep_idx``).

A bundle may keep a subset of the model's exits (``compile --exits 0,1,3``): stage j then runs the trunk
segments after the previous kept exit up to its own exit, merged into one graph, and ends in that exit.
The peer one-graph model (every trunk segment + the final exit, no early heads) is the subset ``[K-1]``.
"""

from __future__ import annotations

from .._lazy import require
from ..errors import DmpoEdgeError
from .policies_torch import torch_policy

__all__ = [
    "StageIO", "stage_io", "make_stage_module", "split_stages", "FEATURES", "FEATURES_IN", "KEEP_IDX", "INPUT",
    "FINAL_OUTPUTS", "TRUNK_PROBE", "parse_exits", "make_peer_module",
]

INPUT = "input"
FEATURES = "features"
FEATURES_IN = "features_in"
KEEP_IDX = "keep_idx"
FINAL_OUTPUTS = ("logits", "confidence", "prediction")
# The last stage is exported with its trunk output under this name too, so that the exit head can be told apart
# from the trunk in the graph (ancestors of logits that are not ancestors of the trunk); it is dropped afterwards.
TRUNK_PROBE = "trunk_probe"


class StageIO:
    """Names and dynamic axes of stage ``k`` of ``num_stages`` (``probe`` adds the last stage's trunk output)."""

    def __init__(self, k: int, num_stages: int, probe: bool = False):
        self.k = k
        self.num_stages = num_stages
        self.last = k == num_stages - 1
        self.inputs = [INPUT] if k == 0 else [FEATURES_IN, KEEP_IDX]
        first = [TRUNK_PROBE if self.last else FEATURES] if (not self.last or probe) else []
        self.outputs = first + list(FINAL_OUTPUTS)
        self.trunk_output = None if not first else first[0]

    def dynamic_axes(self) -> dict:
        axes = {name: {0: "batch"} for name in self.outputs}
        if self.k == 0:
            axes[INPUT] = {0: "batch"}
        else:
            axes[FEATURES_IN] = {0: "batch_in"}
            axes[KEEP_IDX] = {0: "batch"}
        return axes


def stage_io(k: int, num_stages: int, probe: bool = False) -> StageIO:
    return StageIO(k, num_stages, probe)


_STAGE_CLASS = None


def _stage_class():
    """The nn.Module class, built on first use so that importing this module needs no torch."""
    global _STAGE_CLASS
    if _STAGE_CLASS is not None:
        return _STAGE_CLASS
    torch = require("torch", "splitting a model into stages")

    class EarlyExitStage(torch.nn.Module):
        """Trunk part of stage k + exit head k + exit score, with the contract's inputs and outputs."""

        def __init__(self, model, k: int, policy: str = "max_softmax", probe: bool = False, exits=None):
            super().__init__()
            self.model = model
            self.k = int(k)
            exits = list(range(model.num_stages)) if exits is None else [int(e) for e in exits]
            # the model's trunk segments this stage runs (after the previous kept exit, up to its own) and its exit
            self.exit_index = exits[self.k]
            self.segments = list(range(exits[self.k - 1] + 1 if self.k else 0, self.exit_index + 1))
            self.io = StageIO(self.k, len(exits), probe)
            self.policy_name = policy
            self._score = torch_policy(policy)

        def _tail(self, feats):
            logits = self.model.forward_exit(self.exit_index, feats).float()
            confidence = self._score(logits)
            prediction = logits.argmax(dim=-1).to(torch.int32)
            head = (logits, confidence, prediction)
            return ((feats,) + head) if self.io.trunk_output else head

        def forward(self, *args):
            if self.k == 0:
                (x,) = args
            else:
                features, keep_idx = args
                x = features.index_select(0, keep_idx)
            for seg in self.segments:
                x = self.model.forward_stage(seg, x)
            return self._tail(x)

    _STAGE_CLASS = EarlyExitStage
    return EarlyExitStage


def parse_exits(spec, num_exits: int, where: str = "compile") -> list:
    """``"0,1,3"`` (or a list) -> the sorted exits a bundle keeps: known indices, increasing, with the last exit.

    The last exit must stay: it is the model's own classifier, the one every remaining sample leaves at.
    """
    if spec is None:
        return list(range(num_exits))
    items = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    last = num_exits - 1
    if not items or any(isinstance(t, str) and not t for t in items):
        raise DmpoEdgeError(where, f"--exits {spec!r} is malformed. Expected comma-separated exit indices, increasing, "
                            f"ending in the last exit {last} (e.g. 0,{last})")
    out = []
    for t in items:
        try:
            e = int(t)
        except (TypeError, ValueError):
            raise DmpoEdgeError(where, f"--exits entry {t!r} is not an integer. Expected exit indices 0..{last}") from None
        if isinstance(t, float) and t != e or isinstance(t, bool):
            raise DmpoEdgeError(where, f"--exits entry {t!r} is not an integer. Expected exit indices 0..{last}")
        if not 0 <= e <= last:
            raise DmpoEdgeError(where, f"--exits lists exit {e}, which the model does not have (it has exits 0..{last})")
        if out and e <= out[-1]:
            raise DmpoEdgeError(where, f"--exits {spec!r} is not increasing ({out[-1]} then {e}). List each exit once, "
                                "in order, e.g. 0,1,3")
        out.append(e)
    if out[-1] != last:
        raise DmpoEdgeError(where, f"--exits {spec!r} leaves out the last exit {last}, which takes every sample no "
                            f"earlier exit took. Add it: {','.join(map(str, out))},{last}")
    return out


def make_stage_module(model, k: int, policy: str = "max_softmax", probe: bool = False, exits=None):
    """Stage ``k`` of ``model`` as an ``nn.Module`` (eval mode; shares the model's weights).

    ``exits``: the kept exits (see :func:`parse_exits`); stage ``k`` then ends in exit ``exits[k]``."""
    n = getattr(model, "num_stages", None)
    if not isinstance(n, int) or n < 1 or not hasattr(model, "forward_stage") or not hasattr(model, "forward_exit"):
        raise DmpoEdgeError(
            "stage split", "the model does not follow the EarlyExitModel contract (num_stages, forward_stage, "
            "forward_exit). Expected a model from dmpo_edge.models or a subclass of EarlyExitModel",
        )
    exits = parse_exits(exits, n, "stage split") if exits is not None else list(range(n))
    if not 0 <= k < len(exits):
        raise DmpoEdgeError("stage split", f"stage {k} does not exist. Expected 0..{len(exits) - 1}")
    return _stage_class()(model, k, policy, probe, exits).eval()


def split_stages(model, policy: str = "max_softmax", probe: bool = False, exits=None) -> list:
    """Every stage of ``model`` as a module (see :func:`make_stage_module`); ``exits``: the kept exits."""
    model.eval()
    kept = parse_exits(exits, model.num_stages, "stage split") if exits is not None else list(range(model.num_stages))
    return [make_stage_module(model, k, policy, probe, kept) for k in range(len(kept))]


def make_peer_module(model, policy: str = "max_softmax", probe: bool = False):
    """The peer one-graph model: image -> every trunk segment -> the final exit (no early exit heads).

    What a user would deploy instead of early exit; the benchmark's reference. ``probe`` keeps the trunk
    output as an extra output (to tell the exit head apart in the graph), as for the last stage."""
    model.eval()
    return make_stage_module(model, 0, policy, probe, [model.num_stages - 1])
