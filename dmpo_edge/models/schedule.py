"""Decoupled optimisation: per-exit loss weights in two phases.

Phase 1 puts the weight on the deep exits (the early stages keep their "representative" role for the trunk);
from the switch epoch on, phase 2 shifts the weight onto the early exits. ``uniform`` is the plain multi-exit
baseline (every exit weighted 1 throughout).
"""

from __future__ import annotations

from ..errors import DmpoEdgeError

__all__ = ["LossSchedule"]


class LossSchedule:
    def __init__(self, num_exits: int, epochs: int, mode: str = "two_phase", switch_at: float = 0.5,
                 phase1=None, phase2=None):
        if num_exits < 1 or epochs < 1:
            raise DmpoEdgeError("loss schedule", f"need >= 1 exit and >= 1 epoch, got {num_exits} exits, {epochs} epochs")
        if mode not in ("two_phase", "uniform"):
            raise DmpoEdgeError("loss schedule", f"mode '{mode}' is not 'two_phase' or 'uniform'")
        if not 0.0 <= float(switch_at) <= 1.0:
            raise DmpoEdgeError("loss schedule", f"switch_at {switch_at} must be a fraction of the epochs in [0, 1]")
        self.num_exits, self.epochs, self.mode, self.switch_at = int(num_exits), int(epochs), mode, float(switch_at)
        k = self.num_exits
        if mode == "uniform":
            phase1 = phase2 = [1.0] * k
        else:
            # deep exits first: early exits start at 0.1, ramp to 1 at the final exit
            phase1 = [0.1 + 0.9 * i / max(1, k - 1) for i in range(k)] if phase1 is None else phase1
            phase2 = [1.0] * (k - 1) + [0.5] if phase2 is None and k > 1 else ([1.0] if phase2 is None else phase2)
        self.phase1 = self._check(phase1, "phase1")
        self.phase2 = self._check(phase2, "phase2")

    def _check(self, weights, name: str) -> list:
        try:
            w = [float(x) for x in weights]
        except (TypeError, ValueError):
            raise DmpoEdgeError("loss schedule", f"{name} weights {weights!r} are not numbers") from None
        if len(w) != self.num_exits:
            raise DmpoEdgeError("loss schedule", f"{name} has {len(w)} weights for {self.num_exits} exits. Expected one per exit")
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise DmpoEdgeError("loss schedule", f"{name} weights {w} must be >= 0 and not all zero")
        return w

    @property
    def switch_epoch(self) -> int:
        """First epoch (0-based) of phase 2."""
        return int(round(self.switch_at * self.epochs))

    def weights(self, epoch: int) -> list:
        return list(self.phase1 if epoch < self.switch_epoch else self.phase2)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "epochs": self.epochs, "switch_at": self.switch_at, "switch_epoch": self.switch_epoch,
            "phase1": self.phase1, "phase2": self.phase2,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LossSchedule":
        return cls(len(d["phase1"]), d["epochs"], d.get("mode", "two_phase"), d.get("switch_at", 0.5), d["phase1"], d["phase2"])
