"""``dmpo-edge serve BUNDLE``: Triton Inference Server (PyTriton) in front of the early-exit pipeline.

HTTP and gRPC endpoints, Triton's dynamic batcher, Prometheus metrics plus the exit histogram; SIGTERM drains
the requests in flight and stops everything this command started. Needs the ``serve`` extra, which pins numpy < 2
and so lives in its own environment (see ``dmpo_edge.runtime.serve.env``).
"""

from __future__ import annotations

__all__ = ["add_arguments", "run"]


def add_arguments(p) -> None:
    from .options import add_backend, add_bundle, add_thresholds

    add_bundle(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--http-port", type=int, default=8000, help="Triton HTTP/REST port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Triton Prometheus metrics port (default 8002)")
    p.add_argument("--exit-metrics-port", type=int, default=8003,
                   help="Prometheus port of the exit histogram and active thresholds (default 8003)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="largest batch Triton's dynamic batcher forms (default: the bundle's max batch)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="how long a request may wait for others to join its batch, microseconds (default 2000)")
    p.add_argument("--instances", type=int, default=2,
                   help="Triton model instances; their batches are in the pipeline at the same time (default 2)")
    add_backend(p)
    add_thresholds(p)
    p.add_argument("--model-name", default="dmpo", help="Triton model name (default dmpo)")
    p.add_argument("--drain-s", type=int, default=30,
                   help="on SIGTERM, how long in-flight requests may take to finish (default 30)")
    p.add_argument("--verbose", action="store_true", help="Triton's verbose log")


def run(args) -> int:
    from ..runtime.serve.pytriton_server import serve
    from .options import checked_backend, serve_thresholds

    backend = checked_backend(args.backend, where="serve --backend")
    thresholds = serve_thresholds(args.thresholds, "serve --thresholds")
    return serve(args.bundle, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                 metrics_port=args.metrics_port, exit_metrics_port=args.exit_metrics_port, max_batch=args.max_batch,
                 max_queue_delay_us=args.max_queue_delay_us, instances=args.instances, backend=backend, thresholds=thresholds,
                 model_name=args.model_name, drain_s=args.drain_s, verbose=args.verbose,
                 log=lambda s: print(s, flush=True))
