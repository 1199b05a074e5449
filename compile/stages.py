"""Stage split: stage k of an :class:`EarlyExitModel` as one ``nn.Module`` that follows the stage contract.

stage 0:    input [N, 3, H, W]                       -> features, logits, confidence, prediction
stage k>0:  features_in [M, ...], keep_idx int32 [N]  -> features (not on the last stage), logits, confidence, prediction

Stage k > 0 gathers ``features_in[keep_idx]`` first, so the survivors of stage k-1 are regrouped on the device and
the features never visit the host (manifest ``regroup`` = ``keep_idx_gather``). The contract calls the input
``features``; an ONNX graph cannot take and give a tensor of one name, so the graph input is ``features_in`` and
the runtime finds it by role (the input that is not ``keep_idx``).
"""

from __future__ import annotations

from .._lazy import require
from ..errors import DmpoEdgeError
from .policies_torch import torch_policy

__all__ = [
    "StageIO", "stage_io", "make_stage_module", "split_stages", "FEATURES", "FEATURES_IN", "KEEP_IDX", "INPUT",
    "FINAL_OUTPUTS", "TRUNK_PROBE",
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

        def __init__(self, model, k: int, policy: str = "max_softmax", probe: bool = False):
            super().__init__()
            self.model = model
            self.k = int(k)
            self.io = StageIO(self.k, model.num_stages, probe)
            self.policy_name = policy
            self._score = torch_policy(policy)

        def _tail(self, feats):
            logits = self.model.forward_exit(self.k, feats).float()
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
            return self._tail(self.model.forward_stage(self.k, x))

    _STAGE_CLASS = EarlyExitStage
    return EarlyExitStage


def make_stage_module(model, k: int, policy: str = "max_softmax", probe: bool = False):
    """Stage ``k`` of ``model`` as an ``nn.Module`` (eval mode; shares the model's weights)."""
    n = getattr(model, "num_stages", None)
    if not isinstance(n, int) or n < 1 or not hasattr(model, "forward_stage") or not hasattr(model, "forward_exit"):
        raise DmpoEdgeError(
            "stage split", "the model does not follow the EarlyExitModel contract (num_stages, forward_stage, "
            "forward_exit). Expected a model from dmpo_edge.models or a subclass of EarlyExitModel",
        )
    if not 0 <= k < n:
        raise DmpoEdgeError("stage split", f"stage {k} does not exist. Expected 0..{n - 1}")
    return _stage_class()(model, k, policy, probe).eval()


def split_stages(model, policy: str = "max_softmax", probe: bool = False) -> list:
    """Every stage of ``model`` as a module (see :func:`make_stage_module`)."""
    model.eval()
    return [make_stage_module(model, k, policy, probe) for k in range(model.num_stages)]
