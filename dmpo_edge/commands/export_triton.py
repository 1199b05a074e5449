"""``dmpo-edge export-triton BUNDLE REPO/``: a Triton model repository (Python backend) for a bundle.

Runs under any ``tritonserver`` whose Python has dmpo-edge installed: NVIDIA's NGC containers, or the binary in
the PyTriton wheel. Writing it needs numpy only (no PyTriton), so it runs in the main environment.
"""

from __future__ import annotations

__all__ = ["add_arguments", "run"]


def add_arguments(p) -> None:
    from .options import add_backend, add_bundle, add_thresholds

    add_bundle(p)
    p.add_argument("repo", metavar="REPO", help="model repository folder to write (tritonserver --model-repository)")
    p.add_argument("--model-name", default="dmpo", help="Triton model name (default dmpo)")
    add_backend(p)
    for a in p._actions:  # auto here looks at the engines in the bundle (the serving GPUs'), not at this machine
        if a.dest == "backend":
            a.help += ("; for export-triton, auto means TensorRT on KIND_GPU when the bundle holds engines built by "
                       "'dmpo-edge build', else ONNX Runtime on KIND_CPU")
    p.add_argument("--max-batch", type=int, default=None, help="max_batch_size (default: the bundle's max batch)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="dynamic batcher: how long a request may wait for others, microseconds (default 2000)")
    p.add_argument("--instances", type=int, default=2, help="instance_group count (default 2)")
    add_thresholds(p)  # written into config.pbtxt
    p.add_argument("--force", action="store_true", help="replace an existing repository")


def run(args) -> int:
    from ..runtime.serve.repository import export_triton

    from .options import checked_backend, serve_thresholds

    backend = checked_backend(args.backend, where="export-triton --backend")
    thresholds = serve_thresholds(args.thresholds, "export-triton --thresholds")
    info = export_triton(args.bundle, args.repo, name=args.model_name, backend=backend, max_batch=args.max_batch,
                         max_queue_delay_us=args.max_queue_delay_us, instances=args.instances, thresholds=thresholds,
                         force=args.force)
    print(f"wrote {info['repository']}: model {info['model']} ({info['kind']}, backend {info['backend']}, "
          f"max batch {info['max_batch']}, {info['instances']} instance(s)"
          + (f", engines {', '.join(info['engines'])}" if info["engines"] else "") + ")")
    print(f"serve it: tritonserver --model-repository {info['repository']}   (the server's Python needs "
          "pip install 'dmpo-edge[runtime]'; see README, Serving)")
    return 0
