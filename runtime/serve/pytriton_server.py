"""``dmpo-edge serve``: Triton Inference Server (through PyTriton) in front of the early-exit pipeline.

PyTriton starts the ``tritonserver`` of its wheel and binds Python callables as Triton models; Triton's dynamic
batcher forms the batches, and each model instance hands its batch to :class:`~.handler.ServeHandler` in this
process, where one :class:`~dmpo_edge.runtime.Pipeline` keeps several batches in flight.

Models:
- ``<name>``: inputs ``input`` (FP32 [3, H, W]) or ``image`` (BYTES [1], JPEG / PNG), one of the two per request;
  outputs ``prediction`` (INT64), ``class_name`` (BYTES), ``confidence`` (FP32), ``exit_stage`` (INT32), [1] each;
- ``<name>_thresholds``: send ``thresholds`` (FP32 [K-1]) to change the exit thresholds while serving (batches
  formed afterwards use them), or send nothing to read them; the answer is the active thresholds.

Shutdown: SIGTERM and SIGINT become ``KeyboardInterrupt`` in the main thread (PyTriton stops tritonserver only
on that path: a bare SIGTERM to this process used to leave tritonserver running). Triton then stops taking
requests, waits up to ``drain_s`` for those in flight, and exits; the pipeline closes after it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import numpy as np

from ...errors import DmpoEdgeError
from .._common import as_bundle, input_shape
from . import IMAGE, INPUT, MODEL_NAME
from .env import check_serve_env, library_path
from .handler import ServeHandler
from .metrics import ExitMetrics, MetricsServer
from .ports import check_ports_free, wait_models_ready

__all__ = ["serve"]

# PyTriton guards these Triton endpoints with a random token by default. Model loading, shared memory, tracing
# and log settings stay guarded; statistics are read-only and what a load test or dashboard reads.
_GUARDED_ENDPOINTS = ["model-repository", "shared-memory", "trace", "logging"]
_START_ATTEMPTS = 3


class _RequestError(DmpoEdgeError):
    """What a client sees of a bad request: PyTriton sends ``traceback.format_exception(e, e.__traceback__)``
    as the error message, so this error reports no traceback and the client reads the one line that says
    what was wrong with its request."""

    __traceback__ = property(lambda self: None, lambda self, value: None)

    @classmethod
    def of(cls, errors: list) -> "_RequestError":
        if len(errors) == 1:
            return cls(errors[0].where, errors[0].message)
        return cls("request", "; ".join(dict.fromkeys(str(e) for e in errors)))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _bind_models(triton, handler: ServeHandler, model_name: str, max_batch: int, max_queue_delay_us: int,
                 instances: int) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    def infer(requests):
        results = handler.infer([{n: r.data.get(n) for n in (INPUT, IMAGE)} for r in requests])
        errors = [r for r in results if isinstance(r, Exception)]
        if len(errors) == len(results):
            # PyTriton answers a failed execution with one error for all its requests; here they all failed
            raise _RequestError.of(errors)
        # A bad request batched with good ones: PyTriton cannot fail one request of a batch, so it gets
        # prediction -1 and exit_stage -1 with the reason in class_name; the good ones get their results.
        return [r if not isinstance(r, Exception) else {
            "prediction": np.full((n, 1), -1, np.int64), "class_name": np.full((n, 1), f"error: {r}".encode(), object),
            "confidence": np.zeros((n, 1), np.float32), "exit_stage": np.full((n, 1), -1, np.int32)}
            for r, n in zip(results, (_rows(q) for q in requests))]

    shape = input_shape(handler.bundle)
    triton.bind(
        model_name=model_name,
        infer_func=[infer] * max(1, int(instances)),
        inputs=[Tensor(name=INPUT, dtype=np.float32, shape=tuple(shape), optional=True),
                Tensor(name=IMAGE, dtype=bytes, shape=(1,), optional=True)],
        outputs=[Tensor(name="prediction", dtype=np.int64, shape=(1,)),
                 Tensor(name="class_name", dtype=bytes, shape=(1,)),
                 Tensor(name="confidence", dtype=np.float32, shape=(1,)),
                 Tensor(name="exit_stage", dtype=np.int32, shape=(1,))],
        config=ModelConfig(max_batch_size=int(max_batch),
                           batcher=DynamicBatcher(max_queue_delay_microseconds=int(max_queue_delay_us))),
        strict=True,
    )

    def thresholds(requests):
        out = []
        for r in requests:
            values = r.data.get("thresholds")
            if values is not None and np.asarray(values).size:
                try:
                    handler.set_thresholds(values)
                except DmpoEdgeError as exc:
                    raise _RequestError.of([exc]) from None
            out.append({"thresholds": np.asarray(handler.thresholds, np.float32)})
        return out

    triton.bind(
        model_name=f"{model_name}_thresholds",
        infer_func=thresholds,
        inputs=[Tensor(name="thresholds", dtype=np.float32, shape=(-1,), optional=True)],
        outputs=[Tensor(name="thresholds", dtype=np.float32, shape=(-1,))],
        config=ModelConfig(batching=False),
    )


def wait_ready(host: str, http_port: int, models: list, alive=lambda: True, timeout_s: float = 180.0) -> None:
    """Return once every model answers ready on Triton's HTTP endpoint (binding a model returns before it loads)."""
    def fail(name):
        raise DmpoEdgeError("serve", f"model {name} did not become ready within {timeout_s:.0f} s. "
                            "Run with --verbose for Triton's log")

    wait_models_ready(host, http_port, models, alive, timeout_s, fail)


def _rows(request) -> int:
    for name in (INPUT, IMAGE):
        v = request.data.get(name)
        if v is not None and getattr(v, "ndim", 0) >= 1:
            return int(v.shape[0])
    return 1


def serve(bundle_path, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, exit_metrics_port: int = 8003, max_batch: int | None = None,
          max_queue_delay_us: int = 2000, instances: int = 2, backend: str = "auto", thresholds=None, model_name: str = MODEL_NAME,
          drain_s: int = 30, verbose: bool = False, log=print, ready=None) -> int:
    """Serve ``bundle_path`` until SIGTERM / SIGINT. ``ready(info)`` is called once the models answer."""
    check_serve_env("serve")
    import re

    if not re.fullmatch(r"[A-Za-z0-9._-]+", model_name or ""):
        raise DmpoEdgeError("serve", f"--model-name {model_name!r}: letters, digits, '.', '_' and '-' only")
    if int(instances) < 1:
        raise DmpoEdgeError("serve", f"--instances {instances} must be at least 1")
    bundle = as_bundle(bundle_path)  # verifies checksums before anything starts
    check_ports_free(host, {"http": http_port, "grpc": grpc_port, "metrics": metrics_port,
                            "exit-metrics": exit_metrics_port})
    max_batch = int(max_batch or bundle.max_batch)
    if not 1 <= max_batch <= bundle.max_batch:
        raise DmpoEdgeError("serve", f"--max-batch {max_batch} must be between 1 and the bundle's max batch {bundle.max_batch}")

    from ..pipeline import Pipeline

    # The Python-backend stub must load this interpreter's libpython (see .env); PyTriton passes our
    # environment on to tritonserver and appends its own libraries.
    os.environ["LD_LIBRARY_PATH"] = library_path()
    on_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if on_main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _raise_interrupt)

    pipeline = handler = metrics_server = triton = None
    try:
        pipeline = Pipeline.from_bundle(bundle, backend=backend, thresholds=thresholds, max_in_flight=max(2, int(instances)))
        max_batch = min(max_batch, pipeline.max_batch)
        metrics = ExitMetrics(model_name, bundle.num_stages, lambda: pipeline.thresholds)
        handler = ServeHandler(pipeline, metrics)
        try:
            metrics_server = MetricsServer(metrics, host, exit_metrics_port)
        except OSError as exc:  # taken since check_ports_free looked
            raise DmpoEdgeError("serve", f"exit-metrics port {host}:{exit_metrics_port} is not available "
                                f"({exc.strerror or exc}). Pass another --exit-metrics-port") from None

        if not verbose:
            logging.getLogger("pytriton").setLevel(logging.WARNING)
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

        config = TritonConfig(http_address=host, http_port=int(http_port), grpc_address=host, grpc_port=int(grpc_port),
                              metrics_address=host, metrics_port=int(metrics_port), allow_gpu_metrics=False,
                              exit_timeout_secs=int(drain_s), log_verbose=1 if verbose else 0)
        security = TritonSecurityConfig(restricted_endpoints=list(_GUARDED_ENDPOINTS))
        for attempt in range(1, _START_ATTEMPTS + 1):
            triton = Triton(config=config, security_config=security)
            try:
                triton.run()
                _bind_models(triton, handler, model_name, max_batch, max_queue_delay_us, instances)
                wait_ready(host, http_port, [model_name, f"{model_name}_thresholds"], alive=triton.is_alive)
                break
            except (KeyboardInterrupt, DmpoEdgeError):
                raise
            except Exception as exc:
                # PyTriton gives each extra model instance 1 s to fetch its configuration from the first one;
                # on an overloaded host that handshake can time out and the model fails to load. A fresh start
                # is the only public way to retry it.
                triton.stop()
                triton = None
                last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
                if attempt == _START_ATTEMPTS:
                    raise DmpoEdgeError("serve", f"Triton did not load the models after {attempt} attempts ({last}). "
                                        "Run with --verbose for Triton's log; on an overloaded host try --instances 1") from None
                log(f"Triton did not load the models ({last}); starting again ({attempt + 1}/{_START_ATTEMPTS})")
        info = {"model": model_name, "http": f"{host}:{http_port}", "grpc": f"{host}:{grpc_port}",
                "metrics": f"http://{host}:{metrics_port}/metrics",
                "exit_metrics": f"http://{host}:{metrics_server.port}/metrics",
                "backend": pipeline.backend.name, "max_batch": max_batch, "instances": int(instances),
                "thresholds": pipeline.thresholds, "pid": os.getpid()}
        log(f"serving {model_name} ({bundle.num_stages} stages, backend {info['backend']}, max batch {max_batch}, "
            f"{instances} instance(s)) on HTTP {info['http']}, gRPC {info['grpc']}; Triton metrics {info['metrics']}, "
            f"exit histogram {info['exit_metrics']}; thresholds via model {model_name}_thresholds")
        if ready is not None:
            ready(info)
        sys.stdout.flush()
        triton.serve()  # returns on KeyboardInterrupt (SIGTERM / SIGINT) or when tritonserver dies
        log("stopped: in-flight requests drained, tritonserver exited")
        return 0
    finally:
        try:
            if triton is not None:
                triton.stop()  # idempotent; SIGINT to tritonserver, waits for it (and its in-flight requests)
        finally:
            if metrics_server is not None:
                metrics_server.close()
            if handler is not None:
                handler.close()
            if pipeline is not None:
                pipeline.close()
            for sig, h in previous.items():
                signal.signal(sig, h)
