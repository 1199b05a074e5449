"""The exit histogram in Prometheus' text format, served beside Triton's own ``/metrics``.

Triton exports request counts, queue and compute times per model; what it cannot know is where the images
left the network. ``dmpo_exit_total{stage}`` is that histogram (the realised exit distribution, from which
expected cost follows), with the active thresholds as gauges so a dashboard shows both sides of a change.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["ExitMetrics", "MetricsServer"]


def _label(v) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ExitMetrics:
    """Counters updated by the request path; :meth:`text` renders them."""

    def __init__(self, model: str, num_stages: int, thresholds=lambda: []):
        self.model = model
        self.num_stages = int(num_stages)
        self._thresholds = thresholds
        self._lock = threading.Lock()
        self.exits = np.zeros(self.num_stages, np.int64)
        self.batches = 0
        self.requests = {"success": 0, "failure": 0}

    def record_batch(self, exit_stage: np.ndarray) -> None:
        counts = np.bincount(np.asarray(exit_stage, np.int64).clip(0, self.num_stages - 1), minlength=self.num_stages)
        with self._lock:
            self.exits += counts[: self.num_stages]
            self.batches += 1

    def record_requests(self, ok: int, failed: int) -> None:
        with self._lock:
            self.requests["success"] += int(ok)
            self.requests["failure"] += int(failed)

    def snapshot(self) -> dict:
        with self._lock:
            return {"exits": self.exits.tolist(), "batches": self.batches, "requests": dict(self.requests)}

    def text(self) -> str:
        s = self.snapshot()
        m = _label(self.model)
        lines = ["# HELP dmpo_exit_total Images that left the early-exit pipeline at each stage (0-based).",
                 "# TYPE dmpo_exit_total counter"]
        lines += [f'dmpo_exit_total{{model="{m}",stage="{k}"}} {v}' for k, v in enumerate(s["exits"])]
        lines += ["# HELP dmpo_images_total Images classified.", "# TYPE dmpo_images_total counter",
                  f'dmpo_images_total{{model="{m}"}} {sum(s["exits"])}',
                  "# HELP dmpo_pipeline_batches_total Batches (one per Triton execution) run through the pipeline.",
                  "# TYPE dmpo_pipeline_batches_total counter",
                  f'dmpo_pipeline_batches_total{{model="{m}"}} {s["batches"]}',
                  "# HELP dmpo_requests_total Requests answered, by outcome.", "# TYPE dmpo_requests_total counter"]
        lines += [f'dmpo_requests_total{{model="{m}",outcome="{o}"}} {v}' for o, v in s["requests"].items()]
        lines += ["# HELP dmpo_exit_threshold Active exit threshold per early exit (+Inf: never exit there).",
                  "# TYPE dmpo_exit_threshold gauge"]
        for k, t in enumerate(self._thresholds()):
            v = "+Inf" if t == float("inf") else ("-Inf" if t == float("-inf") else repr(float(t)))
            lines.append(f'dmpo_exit_threshold{{model="{m}",stage="{k}"}} {v}')
        return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on its own port (Triton's metrics port is its own), in a daemon thread."""

    def __init__(self, metrics: ExitMetrics, host: str, port: int):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics here")
                    return
                body = metrics.text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds would flood the server log
                pass

        self.httpd = ThreadingHTTPServer((host, int(port)), _Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="dmpo-exit-metrics", daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
