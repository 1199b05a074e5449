"""``dmpo-edge tune``: tune a DMPO early-exit model on an image folder or digits and write model.pt."""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["add_arguments", "run", "format_exit_table"]


def _ints(text: str) -> list:
    return [int(t) for t in str(text).replace(" ", "").split(",") if t]


def _floats(text: str) -> list:
    return [float(t) for t in str(text).replace(" ", "").split(",") if t]


def add_arguments(p) -> None:
    from .options import add_batch_size, add_data, add_quiet

    d = p.add_argument_group("data")
    add_data(d, what="training images", default="digits",
             note="a bare named set (digits, fashion-mnist, idx:DIR) means its train split")
    d.add_argument("--val", default=None, help="validation data (default: the ':val' split of a named set, else a seeded split of --data)")
    d.add_argument("--train-count", type=int, default=None, metavar="N",
                   help="tune on a stratified, seeded subset of N training images (default: all of them)")
    d.add_argument("--val-fraction", type=float, default=0.2, help="validation share of a folder (default 0.2)")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="efficientnet_lite0", help="efficientnet_lite0 | vit_tiny | vit_small | vit_base | vit (custom: --embed-dim, --depth, --num-heads) (default efficientnet_lite0)")
    m.add_argument("--weights", default=None, help="pre-trained backbone weights (timm-format .pth/.safetensors for ViT; EfficientNet-Lite0 uses the bundled ImageNet weights)")
    m.add_argument("--no-pretrained", action="store_true", help="start the backbone from random weights")
    m.add_argument("--image-size", type=int, default=None, help="network input size (default for EfficientNet: 32 for fashion-mnist and idx:DIR, else 64; 224 for ViT)")
    m.add_argument("--resize", type=int, default=None, help="resize the shorter side to this before the centre crop (default: image size)")
    m.add_argument("--patch-size", type=int, default=16, help="ViT patch size (default 16)")
    m.add_argument("--embed-dim", type=int, default=None, help="ViT width (backbone 'vit'; presets set it)")
    m.add_argument("--depth", type=int, default=None, help="ViT blocks (backbone 'vit'; presets set it)")
    m.add_argument("--num-heads", type=int, default=None, help="ViT attention heads (backbone 'vit'; presets set it)")
    m.add_argument("--exits", type=_ints, default=None, help="comma-separated block indices of the exits (default 2,7,10,15 for EfficientNet-Lite0); the last block always has one")
    m.add_argument("--train-backbone", action="store_true", help="update the backbone too (default: frozen, only PEFT + heads)")
    m.add_argument("--adapter-dim", type=int, default=32, help="parallel adapter bottleneck width, 0 = none (default 32)")
    m.add_argument("--lora-rank", type=int, default=8, help="LoRA rank on qkv/proj (ViT) or 1x1 convs (CNN), 0 = none (default 8)")
    m.add_argument("--cov-dim", type=int, default=32, help="channels kept before covariance pooling (default 32)")
    m.add_argument("--ns-iters", type=int, default=5, help="Newton-Schulz iterations of the matrix square root (default 5)")
    m.add_argument("--bypass-dim", type=int, default=32, help="bypass bottleneck width (default 32)")
    m.add_argument("--bypass-detach", action="store_true", help="stop early-exit gradients at the bypass (trunk untouched by early losses)")
    a = p.add_argument_group("ablations (DMPO vs plain multi-exit tuning)")
    a.add_argument("--no-bypass", action="store_true", help="early predictors read the trunk features directly")
    a.add_argument("--linear-early-heads", action="store_true", help="pool + linear early heads instead of covariance heads")
    a.add_argument("--uniform-weights", action="store_true", help="every exit weighted 1 throughout (no two-phase schedule)")
    a.add_argument("--first-order-early-heads", action="store_true",
                   help="first-order early heads (1x1 conv + average pool + linear) with the parameters and, as far as "
                        "possible, the FLOPs of a DMPO exit: the size-matched control for the covariance heads")
    a.add_argument("--baseline", action="store_true", help="plain multi-exit tuning: all three ablations at once")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=8, help="epochs (default 8)")
    add_batch_size(o, what="batch size per process")
    o.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate, cosine decay (default 5e-3)")
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--switch-at", type=float, default=0.5, help="fraction of the epochs after which phase 2 starts (default 0.5)")
    o.add_argument("--phase1", type=_floats, default=None, help="phase-1 loss weights per exit (default: ramp 0.1 .. 1, deep exits first)")
    o.add_argument("--phase2", type=_floats, default=None, help="phase-2 loss weights per exit (default: 1 on early exits, 0.5 on the final)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    o.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the free cores, i.e. usable cores minus the load average, at least 1)")
    p.add_argument("-o", "--output", default="model.pt", help="checkpoint to write (atomically; default model.pt)")
    add_quiet(p)


def format_exit_table(config: dict, metrics: dict) -> str:
    acc, cum, stage = metrics["exit_accuracy"], metrics["cumulative_flops"], metrics["stage_flops"]
    full = cum[-1]
    rows = ["exit  block  val acc   stage MFLOPs  cumulative MFLOPs  % of full"]
    for k, b in enumerate(config["exits"]):
        rows.append(f"{k:>4}  {b:>5}  {100 * acc[k]:6.2f}%  {stage[k] / 1e6:12.2f}  {cum[k] / 1e6:17.2f}  {100 * cum[k] / full:8.1f}%")
    return "\n".join(rows)


def _cnn_image_size(spec: str) -> int:
    """EfficientNet's default input: 32 for the 28 x 28 MNIST family (fashion-mnist, idx:DIR): upsampling them to 64
    costs 4x the FLOPs for no new detail (measured in docs/results.md); 64 for everything else (digits included)."""
    from ..calib.datasets import is_named_dataset, named_split

    name = named_split(spec)[0] if is_named_dataset(spec) else ""
    return 32 if name == "fashion-mnist" or name.startswith("idx:") else 64


def _datasets(args):
    from ..calib.datasets import is_named_dataset, load_dataset, named_split
    from ..errors import DmpoEdgeError

    spec = str(args.data)
    if is_named_dataset(spec):
        name, split = named_split(spec)
        train = load_dataset(f"{name}:train" if split is None else spec)
        val = load_dataset(args.val or f"{name}:val")
    else:
        full = load_dataset(spec)
        if args.val:
            train, val = full, load_dataset(args.val)
        else:
            from ..models.tuning import split_train_val

            ti, vi = split_train_val(full.labels, args.val_fraction, args.seed)
            train, val = full.subset(ti), full.subset(vi)
            train.source, val.source = f"{full.source} (train split, seed {args.seed})", f"{full.source} (val split, seed {args.seed})"
            train.skipped = list(full.skipped)
    if list(val.classes) != list(train.classes):
        raise DmpoEdgeError("tune", f"validation classes {val.classes} differ from training classes {train.classes}")
    if train.labels is None or len(set(train.labels.tolist())) < 2:
        raise DmpoEdgeError("tune", "training data needs at least 2 classes with images")
    if args.train_count is not None:
        train = train.stratified_take(args.train_count, seed=args.seed, where="tune --train-count")
    return train, val


def run(args) -> int:
    from .._lazy import require
    from ..errors import DmpoEdgeError
    from ..preprocess import Preprocess

    torch = require("torch", "tuning")
    from ..models import LossSchedule, build_model, save_checkpoint
    from ..models.tuning import seed_everything, tune

    if args.threads:
        torch.set_num_threads(args.threads)
        threads_note = f"threads: {args.threads} (--threads)"
    else:
        from ..models.threads import free_cpu_threads

        n, why = free_cpu_threads()
        torch.set_num_threads(n)
        threads_note = f"threads: {n} ({why})"
    if args.baseline:
        args.no_bypass = args.linear_early_heads = args.uniform_weights = True
    train, val = _datasets(args)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0 and (train.skipped or val.skipped):
        skipped = train.skipped + val.skipped
        print(f"dmpo-edge: skipped {len(skipped)} unreadable image(s), first: {skipped[0][0]} ({skipped[0][1]})", file=sys.stderr)
    vit = args.backbone.startswith("vit")
    image_size = args.image_size or (224 if vit else _cnn_image_size(str(args.data)))
    config = {
        "backbone": args.backbone, "num_classes": len(train.classes), "image_size": image_size, "exits": args.exits,
        "patch_size": args.patch_size, "embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.num_heads,
        "pretrained": False if args.no_pretrained else (args.weights or True),
        "adapter_dim": args.adapter_dim, "lora_rank": args.lora_rank, "cov_dim": args.cov_dim, "ns_iters": args.ns_iters,
        "bypass": not args.no_bypass, "bypass_dim": args.bypass_dim, "bypass_detach": args.bypass_detach,
        "early_head": "first_order" if args.first_order_early_heads else "linear" if args.linear_early_heads else "cov",
        "freeze_backbone": not args.train_backbone,
    }
    if vit and config["pretrained"] is True and rank0:
        print("dmpo-edge: no ViT weights ship offline; tuning from random weights (pass --weights for a timm checkpoint)", file=sys.stderr)
    seed_everything(args.seed)
    model = build_model(config)
    pre = Preprocess(resize=args.resize or image_size, crop=image_size)
    schedule = LossSchedule(
        model.num_stages, args.epochs, "uniform" if args.uniform_weights else "two_phase", args.switch_at, args.phase1, args.phase2
    )
    out = os.path.abspath(args.output)
    if os.path.isdir(out):
        raise DmpoEdgeError("tune", f"output '{args.output}' is a folder. Expected a file path such as model.pt")
    with contextlib.ExitStack() as held:
        if rank0:  # a second tune writing the same model.pt is refused now, not after an hour of training
            from ..locking import writer_lock

            held.enter_context(writer_lock(out, "tune", "tune", swaps=False))
        if rank0 and not args.quiet:  # after every input check: an error stays the only line on stderr
            print(f"dmpo-edge: {threads_note}", file=sys.stderr)
        metrics = tune(
            model, train, val, pre, schedule, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, seed=args.seed, device=args.device, progress=not args.quiet,
        )
        if not metrics:  # not rank 0
            return 0
        metrics["ablation"] = {"bypass": config["bypass"], "early_head": config["early_head"], "loss_schedule": schedule.mode}
        metrics["threads"] = threads_note
        model.to("cpu")
        save_checkpoint(out, model, classes=train.classes, preprocess=pre.to_dict(), loss_schedule=schedule.to_dict(),
                        metrics=metrics)
    print(format_exit_table(model.config, metrics))
    print(f"tuned {metrics['num_train']} images x {args.epochs} epochs in {metrics['tune_seconds']:.1f} s; "
          f"validation on {metrics['val_data']} ({metrics['num_val']} images); {threads_note}")
    print(f"wrote {args.output}")
    return 0
