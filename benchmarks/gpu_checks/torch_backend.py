"""A stage backend that runs the checkpoint's stage modules through torch, on CUDA (or the CPU).

It stands in for the TensorRT engines on a GPU machine that has torch with CUDA but no TensorRT, so the
runtime's own :class:`~dmpo_edge.runtime.pipeline.Pipeline` (scheduler, batches in flight, survivor regroup)
runs on the GPU and can be compared sample by sample with the ONNX Runtime pipeline on the CPU.

It follows the backend contract of ``dmpo_edge.runtime.backends.base`` exactly as the TensorRT backend does:

- stage modules come from :func:`dmpo_edge.compile.stages.split_stages` (the same modules the bundle's ONNX
  graphs were exported from), so stage k > 0 gathers ``features[keep_idx]`` itself, on the device;
- each stage runs on its own CUDA stream; ``features`` stay on the device as a :class:`TorchFeatures` handle
  with an event recorded after the stage, and the next stage's stream waits on that event (no host round trip);
- only ``logits``, ``confidence`` and ``prediction`` (N values each) come back to the host.

It lives in ``benchmarks/`` because the runtime must not import torch. With ``device="cpu"`` it runs the
same code path without streams: that is what ``gpu_check.py --dry-run`` exercises here.
"""

from __future__ import annotations

import os

import numpy as np

from dmpo_edge._lazy import require
from dmpo_edge.bundle import sha256_file
from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.runtime.backends.base import Backend

__all__ = ["TorchStageBackend", "TorchFeatures", "set_exact_math"]


def set_exact_math(torch) -> None:
    """FP32 on the GPU as the CPU computes it: no TF32 in matmuls or convolutions (Ampere+ defaults to TF32 in cuDNN)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if hasattr(torch, "set_float32_matmul_precision"):
        torch.set_float32_matmul_precision("highest")


class TorchFeatures:
    """A stage's ``features`` left on the device: the tensor and the event that marks it ready."""

    __slots__ = ("tensor", "event")

    def __init__(self, tensor, event=None):
        self.tensor, self.event = tensor, event

    @property
    def rows(self) -> int:
        return int(self.tensor.shape[0])


class TorchStageBackend(Backend):
    """Stage modules of ``checkpoint`` on ``device`` (``cuda``, ``cuda:1``, ``cpu``) behind the backend interface.

    ``verify_source``: refuse a checkpoint whose sha256 differs from the one the bundle records it was compiled
    from (``manifest.model.source.sha256``), since the comparison would then be meaningless.
    """

    name = "torch"

    def __init__(self, bundle, checkpoint: str, device: str = "cuda", verify_source: bool = True, **_ignored):
        super().__init__(bundle)
        self.checkpoint = str(checkpoint)
        self.device_name = str(device)
        self.verify_source = verify_source
        self.modules = []
        self.streams = []
        self.merge_stream = None
        self.torch = None

    # --- activate ------------------------------------------------------------------------------
    def _activate_impl(self) -> None:
        torch = self.torch = require("torch", "the torch stage backend")
        from dmpo_edge.compile.stages import split_stages
        from dmpo_edge.models import load_checkpoint

        if not os.path.isfile(self.checkpoint):
            raise DmpoEdgeError("torch backend", f"checkpoint '{self.checkpoint}' does not exist. Pass the model.pt the bundle was compiled from")
        src = ((self.bundle.manifest.get("model") or {}).get("source") or {}).get("sha256")
        if self.verify_source and src and sha256_file(self.checkpoint) != src:
            raise DmpoEdgeError("torch backend", f"checkpoint '{self.checkpoint}' is not the one bundle {self.bundle.path} was compiled "
                                "from (sha256 differs). Pass the matching model.pt")
        self.device = torch.device(self.device_name)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise DmpoEdgeError("torch backend", "torch sees no CUDA device. Install a CUDA build of torch or use device='cpu'")
        if self.cuda:
            set_exact_math(torch)
        model, _meta = load_checkpoint(self.checkpoint)
        if int(model.num_stages) != self.num_stages:
            raise DmpoEdgeError("torch backend", f"checkpoint has {model.num_stages} stages, the bundle {self.num_stages}")
        model = model.to(self.device).eval()
        self.modules = split_stages(model, self.bundle.manifest.get("exit_policy", "max_softmax"))
        if self.cuda:
            # One stream per stage: the pipeline's stage workers overlap on the device like the TensorRT backend's.
            self.streams = [torch.cuda.Stream(device=self.device) for _ in range(self.num_stages)]
            self.merge_stream = torch.cuda.Stream(device=self.device)

    def _deactivate_impl(self) -> None:
        if self.cuda and self.torch is not None:
            self.torch.cuda.synchronize(self.device)
        self.modules, self.streams, self.merge_stream = [], [], None

    # --- helpers -------------------------------------------------------------------------------
    def _stream_ctx(self, stream):
        import contextlib

        return self.torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _to_device(self, arr: np.ndarray, dtype=None):
        """Host array -> device tensor; on CUDA through page-locked memory and a non-blocking copy."""
        torch = self.torch
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=dtype))
        if not self.cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _features_in(self, f, stream):
        """The previous stage's features as a tensor usable on ``stream``."""
        torch = self.torch
        if isinstance(f, TorchFeatures):
            if self.cuda:
                if f.event is not None:
                    stream.wait_event(f.event)  # produced on the previous stage's stream
                f.tensor.record_stream(stream)  # the caching allocator must not recycle it while this stream reads
            return f.tensor
        if isinstance(f, torch.Tensor):
            return f.to(self.device)
        return self._to_device(np.asarray(f))

    # --- infer ---------------------------------------------------------------------------------
    def _infer_impl(self, k: int, feeds: dict, keep_features: bool) -> dict:
        torch = self.torch
        stream = self.streams[k] if self.cuda else None
        last = k == self.num_stages - 1
        with torch.no_grad(), self._stream_ctx(stream):
            if k == 0:
                x = np.asarray(feeds["input"])
                if x.shape[0] > self.max_batch:
                    raise DmpoEdgeError("torch backend", f"batch of {x.shape[0]} exceeds the bundle's max batch {self.max_batch}")
                outs = self.modules[0](self._to_device(x, np.float32))
            else:
                keep = np.asarray(feeds["keep_idx"], dtype=np.int32)
                if keep.shape[0] > self.max_batch:
                    raise DmpoEdgeError("torch backend", f"batch of {keep.shape[0]} exceeds the bundle's max batch {self.max_batch}")
                feats = self._features_in(feeds["features"], stream)
                # The stage module gathers features[keep_idx] first: the survivor regroup runs on the device.
                outs = self.modules[k](feats, self._to_device(keep))
            if last:
                logits, conf, pred = outs
                feats_out = None
            else:
                feats_out, logits, conf, pred = outs
            # Three small host copies; .cpu() orders itself after this stream's work and waits for it.
            res = {"logits": logits.float().cpu().numpy(), "confidence": conf.float().cpu().numpy(),
                   "prediction": pred.to(torch.int32).cpu().numpy()}
            if feats_out is not None:
                if keep_features:
                    ev = None
                    if self.cuda:
                        ev = torch.cuda.Event()
                        ev.record(stream)
                    res["features"] = TorchFeatures(feats_out, ev)
                else:
                    res["features"] = feats_out.cpu().numpy()
        return res

    # --- features handles ----------------------------------------------------------------------
    def features_to_host(self, features):
        if isinstance(features, TorchFeatures):
            if features.event is not None:
                features.event.synchronize()
            return features.tensor.cpu().numpy()
        if self.torch is not None and isinstance(features, self.torch.Tensor):
            return features.cpu().numpy()
        return features

    def release(self, features) -> None:
        # Tensors go back to torch's caching allocator when the last reference drops; record_stream keeps
        # a buffer alive for the streams that still read it.
        return None

    def merge_features(self, features: list, keeps: list):
        """Refill on the device: gather each group's survivors and concatenate them (keep_idx becomes 0..M-1)."""
        torch = self.torch
        if not all(isinstance(f, TorchFeatures) for f in features):
            return super().merge_features(features, keeps)
        stream = self.merge_stream
        with torch.no_grad(), self._stream_ctx(stream):
            parts = []
            for f, keep in zip(features, keeps):
                t = self._features_in(f, stream) if stream is not None else f.tensor
                parts.append(t.index_select(0, self._to_device(np.asarray(keep, dtype=np.int64))))
            merged = torch.cat(parts, dim=0)
            ev = None
            if stream is not None:
                ev = torch.cuda.Event()
                ev.record(stream)
        return TorchFeatures(merged, ev), np.arange(merged.shape[0], dtype=np.int32)
