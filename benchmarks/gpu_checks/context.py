"""What the checks share during one run: arguments, report, work folder, bundle, inputs, CPU reference."""

from __future__ import annotations

__all__ = ["Ctx"]


class Ctx:
    def __init__(self, args, report, work, site, cuda):
        self.args, self.report, self.work, self.site, self.cuda = args, report, work, site, cuda
        self.bundle = self.bundle_path = self.checkpoint = None
        self.kit_bundles = {}
        self.extra = {}
        self.x = self.labels = None
        self.cpu_static = self.thresholds = self.cpu_pipe = self.reference = self.torch_static = None
        self.batch, self.band = args.batch, args.band
        self.torch_device = "cuda" if cuda.get("torch_cuda") and not args.dry_run else "cpu"

    def cpu_pipe_dict(self) -> dict:
        p = self.cpu_pipe
        return {"exit_stage": p.exit_stage, "prediction": p.prediction, "confidence": p.confidence}
