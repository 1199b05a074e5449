"""The early-exit contract every model in dmpo-edge follows (and a user's own model must follow).

A model has ``num_stages`` stages; stage ``k`` is a slice of the trunk followed by exit ``k``::

    feats_0 = forward_stage(0, image)            # N x 3 x H x W -> trunk features after stage 0
    feats_k = forward_stage(k, feats_{k-1})      # trunk features flow on untouched
    logits_k = forward_exit(k, feats_k)          # exit k: bypass -> predictor (DMPO), N x num_classes

``forward(image)`` returns the list of every exit's logits (deepest last). Exported stage graphs are
``forward_stage(k)`` + ``forward_exit(k)`` + the exit score, following the stage contract in docs/architecture.md.
"""

from __future__ import annotations

from .._lazy import require

torch = require("torch", "models")
nn = torch.nn

__all__ = ["EarlyExitModel"]


class EarlyExitModel(nn.Module):
    """Base class: subclasses implement :meth:`forward_stage` and :meth:`forward_exit` and set ``config``."""

    #: JSON-serialisable architecture record; ``dmpo_edge.models.build_model(config)`` rebuilds the model.
    config: dict

    @property
    def num_stages(self) -> int:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def forward_stage(self, k: int, x):
        """Trunk part of stage ``k``: image (k=0) or the features of stage k-1 -> features of stage k."""
        raise NotImplementedError

    def forward_exit(self, k: int, feats):
        """Exit ``k`` on the features of stage ``k`` -> logits (N x num_classes)."""
        raise NotImplementedError

    def forward(self, x):
        logits = []
        for k in range(self.num_stages):
            x = self.forward_stage(k, x)
            logits.append(self.forward_exit(k, x))
        return logits
