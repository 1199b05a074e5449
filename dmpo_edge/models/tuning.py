"""The tuning loop behind ``dmpo-edge tune``: frozen backbone, PEFT + exit heads, two-phase exit loss weights.

Runs on one CPU/GPU, or data-parallel with torch DDP + DistributedSampler when launched by ``torchrun``
(WORLD_SIZE > 1); only rank 0 evaluates, prints and writes.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time

import numpy as np

from .._lazy import require
from ..errors import DmpoEdgeError

torch = require("torch", "models")
nn = torch.nn
F = torch.nn.functional

__all__ = ["tune", "evaluate_exits", "exit_logits", "split_train_val", "preprocess_images", "seed_everything"]

# above this many bytes of preprocessed pixels, batches are preprocessed as they are drawn
_CACHE_LIMIT = 2 << 30


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def split_train_val(labels: np.ndarray, fraction: float, seed: int):
    """Stratified seeded split of a folder data set: (train_idx, val_idx); every class keeps >= 1 training image."""
    if not 0.0 < fraction < 1.0:
        raise DmpoEdgeError("tune", f"validation fraction {fraction} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(len(idx) - 1, int(round(fraction * len(idx))))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    train, val = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    if len(val) == 0:
        raise DmpoEdgeError("tune", "too few images for a validation split (each class needs >= 2). Add images or pass --val")
    return train, val


class _Images(torch.utils.data.Dataset):
    """Decoded images, preprocessed up front when small enough, else per item."""

    def __init__(self, images, labels, preprocess):
        self.labels = torch.as_tensor(np.asarray(labels, np.int64))
        self.images, self.preprocess = images, preprocess
        h, w = preprocess.size
        self.cache = None
        if len(images) * 3 * h * w * 4 <= _CACHE_LIMIT:
            self.cache = torch.from_numpy(preprocess_images(images, preprocess))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.cache[i] if self.cache is not None else torch.from_numpy(self.preprocess.one(self.images[i]))
        return x, self.labels[i]


def preprocess_images(images, preprocess, batch: int = 512) -> np.ndarray:
    out = np.empty((len(images), 3, *preprocess.size), np.float32)
    for s in range(0, len(images), batch):
        out[s : s + batch] = preprocess(images[s : s + batch])
    return out


def _distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    dist = torch.distributed
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process, before NCCL starts
        dist.init_process_group(backend=backend)
    return dist


def _device(name: str | None, dist) -> "torch.device":
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if dist else 0)
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise DmpoEdgeError("tune", f"device '{name}' is not valid ({exc}). Expected cpu, cuda or cuda:N") from None


@torch.no_grad()
def exit_logits(model, x: np.ndarray, batch_size: int = 256, device=None) -> list:
    """Every exit's logits on preprocessed images (N x 3 x H x W): a list of N x C float32 arrays."""
    model.eval()
    device = device or next(model.parameters()).device
    outs = [[] for _ in range(model.num_stages)]
    for s in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[s : s + batch_size]).to(device)
        for k, lg in enumerate(model(xb)):
            outs[k].append(lg.float().cpu().numpy())
    return [np.concatenate(o) for o in outs]


def evaluate_exits(model, x: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> list:
    """Top-1 accuracy of every exit."""
    return [float((lg.argmax(1) == labels).mean()) for lg in exit_logits(model, x, batch_size)]


def tune(model, train_ds, val_ds, preprocess, schedule, *, epochs: int, batch_size: int = 64, lr: float = 2e-3,
         weight_decay: float = 1e-4, seed: int = 0, device: str | None = None, progress: bool = True) -> dict:
    """Tune ``model`` in place; returns the metrics dict stored in the checkpoint (rank 0), or {} on other ranks."""
    from .flops import stage_flops

    if epochs < 1 or batch_size < 1:
        raise DmpoEdgeError("tune", f"epochs ({epochs}) and batch size ({batch_size}) must be >= 1")
    dist = _distributed()
    rank = dist.get_rank() if dist else 0
    world = dist.get_world_size() if dist else 1
    dev = _device(device, dist)
    seed_everything(seed)
    model.to(dev)
    train_set = _Images(train_ds.images, train_ds.labels, preprocess)
    sampler = torch.utils.data.DistributedSampler(train_set, shuffle=True, seed=seed) if dist else None
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, generator=gen, drop_last=len(train_set) > batch_size
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DmpoEdgeError("tune", "the model has nothing to tune (no trainable parameters)")
    net = model
    if dist:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * len(loader)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
    )
    tqdm = require("tqdm", "progress bars").tqdm
    history = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        weights = schedule.weights(epoch)
        w = torch.tensor(weights, device=dev)
        net.train()
        total, n = torch.zeros(len(weights), device=dev), 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr, leave=False, disable=not progress or rank != 0,
                   dynamic_ncols=True)
        for xb, yb in bar:
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            losses = torch.stack([F.cross_entropy(lg, yb) for lg in net(xb)])
            loss = (w * losses).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += losses.detach() * len(yb)
            n += len(yb)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        per_exit = (total / max(1, n)).tolist()
        history.append({"epoch": epoch, "weights": weights, "train_loss": [round(v, 5) for v in per_exit]})
        if rank == 0 and progress:
            print(f"epoch {epoch + 1}/{epochs}  weights {[round(v, 2) for v in weights]}  "
                  f"loss per exit {[round(v, 3) for v in per_exit]}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    if dist:
        dist.barrier()
        dist.destroy_process_group()  # the tuned weights are identical on every rank; rank 0 evaluates and writes
    if rank != 0:
        return {}
    xv = preprocess_images(val_ds.images, preprocess)
    acc = evaluate_exits(model, xv, np.asarray(val_ds.labels))
    flops = stage_flops(model, preprocess.size[0])
    return {
        "exit_accuracy": acc,
        **flops,
        "val_data": val_ds.source,
        "train_data": train_ds.source,
        "num_train": len(train_ds),
        "num_val": len(val_ds),
        "skipped_images": len(train_ds.skipped) + len(val_ds.skipped),
        "skipped_examples": [p for p, _ in (train_ds.skipped + val_ds.skipped)[:5]],
        "tune_seconds": round(seconds, 2),
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
        "device": str(dev), "world_size": world, "torch": torch.__version__, "history": history,
    }
