"""``dmpo-edge build BUNDLE``: build the TensorRT engines of a bundle on this machine (the target).

Engines go to ``BUNDLE/engines/<trt version>-<gpu>-sm<XY>-<precision>/`` with a persisted timing cache and an
``engines.json`` that records the build. ``--dry-run`` prints the derived builder settings (profiles, precision
plan, device and cache keys) without TensorRT, e.g. to review a build for a Jetson from a laptop.
"""

from __future__ import annotations

__all__ = ["add_arguments", "run"]


def add_arguments(p) -> None:
    from .options import add_bundle, add_trt_builder

    add_bundle(p)
    p.add_argument("--max-batch", type=int, metavar="N", help="largest batch (default: the bundle's max_batch)")
    add_trt_builder(p)
    p.add_argument("--weakly-typed", action="store_true",
                   help="TensorRT 10.x only: weakly typed network with the deprecated FP16/INT8 flags")
    p.add_argument("--checkpoint", metavar="MODEL.pt", help="the model.pt the bundle came from (torch-tensorrt frontend)")
    p.add_argument("--force", action="store_true", help="rebuild even when the engines are up to date")
    p.add_argument("--verbose", action="store_true", help="TensorRT's INFO log")
    p.add_argument("--dry-run", action="store_true", help="print the builder settings as JSON and stop")
    p.add_argument("--trt-version", help="with --dry-run: TensorRT version to plan for (default: the installed one)")
    p.add_argument("--gpu", help="with --dry-run: GPU name to plan for (default: GPU 0)")
    p.add_argument("--sm", help="with --dry-run: compute capability, e.g. 87 (default: GPU 0's)")


def run(args) -> int:
    import json

    from ..bundle import Bundle
    from ..errors import DmpoEdgeError

    strongly = False if args.weakly_typed else None
    if args.dry_run:
        from ..compile.trt_settings import build_settings

        b = Bundle.load(args.bundle)
        trt_version, gpu, sm = args.trt_version, args.gpu, args.sm
        if trt_version is None or gpu is None or sm is None:
            from .._lazy import available

            if trt_version is None:
                if not available("tensorrt"):
                    raise DmpoEdgeError("build", "TensorRT is not installed here; pass --trt-version (and --gpu, --sm) to plan a build")
                import tensorrt

                trt_version = tensorrt.__version__
            if gpu is None or sm is None:
                from ..compile.trt_builder import gpu_info

                info = gpu_info()
                gpu, sm = gpu or info["gpu"], sm or info["sm"]
        s = build_settings(b.manifest, trt_version, gpu, sm, args.max_batch, args.buckets or (), args.workspace_mib,
                           strongly, args.frontend)
        print(json.dumps(s, indent=2, default=list))
        return 0
    from ..compile.trt_builder import build_engines

    build_engines(args.bundle, max_batch=args.max_batch, buckets=args.buckets or (), workspace_mib=args.workspace_mib,
                  strongly_typed=strongly, force=args.force, frontend=args.frontend, verbose=args.verbose,
                  checkpoint=args.checkpoint)
    return 0
