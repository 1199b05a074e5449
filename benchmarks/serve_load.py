"""Load test of ``dmpo-edge serve``: N concurrent clients for a fixed time, early exit against the static model.

Starts ``dmpo-edge serve BUNDLE`` (this interpreter: run it from the ``serve`` environment) on free 127.0.0.1
ports, then for each configuration runs N client threads that send one request after the other for
``--duration`` seconds (after ``--warmup`` seconds not counted), each request ``--images`` preprocessed images
(or ``--encoded``: PNG files decoded on the server). Reported per configuration: requests and images per second,
latency p50 / p95 / p99 / max (client side, request sent -> answer parsed), Triton's batch-size histogram
and the exit histogram. The static model is the same server with every threshold set to +inf through the
``dmpo_thresholds`` model (every image runs every stage: the full network), so both sides share the process,
the sessions, Triton's batcher and the transport; configurations alternate ``--rounds`` times.
``--server repository`` measures the ``dmpo-edge export-triton`` repository under the wheel's raw ``tritonserver``
instead (one Python-backend process per instance); there the thresholds change by rewriting ``config.pbtxt``, which
Triton reloads in poll mode, and the run waits until the server answers with the new thresholds.

    .venv-serve/bin/python benchmarks/serve_load.py BUNDLE --inputs x.npy --clients 8 --duration 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np


def _percentile(sorted_ms, p):
    if not sorted_ms:
        return float("nan")
    exclude = int((1 - p / 100.0) * len(sorted_ms))  # trtexec's definition, as in dmpo-edge bench
    return sorted_ms[max(len(sorted_ms) - 1 - exclude, 0)]


def _load(clients, protocol, url, x, blobs, per_request, warmup_s, duration_s):
    from dmpo_edge.runtime.serve.client import Client

    lat, exits, errors = [], [], []
    lock = threading.Lock()
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup_s, t_start + warmup_s + duration_s

    def worker(seed):
        c = Client(protocol, url)
        rng = np.random.default_rng(seed)
        mine, my_exits = [], []
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                break
            rows = rng.integers(0, x.shape[0], per_request)
            try:
                r = c.infer_images([blobs[i] for i in rows]) if blobs else c.infer(x[rows])
            except Exception as exc:  # counted and reported, never hidden
                with lock:
                    errors.append(str(exc)[:200])
                continue
            t1 = time.perf_counter()
            if t0 >= t_measure:
                mine.append((t1 - t0) * 1000.0)
                my_exits.append(r["exit_stage"])
        c.close()
        with lock:
            lat.extend(mine)
            exits.extend(my_exits)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=warmup_s + duration_s + 120)
    lat.sort()
    n = len(lat)
    stages = np.concatenate(exits) if exits else np.zeros(0, np.int32)
    return {"requests": n, "images": int(stages.size), "requests_per_s": n / duration_s,
            "images_per_s": stages.size / duration_s, "p50_ms": _percentile(lat, 50), "p95_ms": _percentile(lat, 95),
            "p99_ms": _percentile(lat, 99), "max_ms": lat[-1] if lat else float("nan"),
            "exit_histogram": np.bincount(stages.astype(np.int64)).tolist() if stages.size else [],
            "errors": len(errors), "first_error": errors[0] if errors else None}


def _free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _diff(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(after) if after.get(k, 0) - before.get(k, 0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--inputs", help=".npy of preprocessed images (N x 3 x H x W); default: random normal")
    ap.add_argument("--encoded", help="folder of PNG / JPEG files to send as encoded bytes instead")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--images", type=int, default=1, help="images per request (default 1)")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per configuration and round")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2, help="early exit / static alternations")
    ap.add_argument("--protocol", choices=["http", "grpc"], default="grpc")
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--max-queue-delay-us", type=int, default=2000)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--server", choices=["serve", "repository"], default="serve",
                    help="serve: dmpo-edge serve (PyTriton); repository: dmpo-edge export-triton under raw tritonserver")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)

    from dmpo_edge.bundle import Bundle
    from dmpo_edge.runtime._common import input_shape
    from dmpo_edge.runtime.serve.client import Client

    bundle = Bundle.load(args.bundle)
    x = np.load(args.inputs) if args.inputs else np.random.default_rng(0).normal(
        size=(256, *input_shape(bundle))).astype(np.float32)
    blobs = None
    if args.encoded:
        from dmpo_edge.images import list_images

        blobs = [open(p, "rb").read() for p in list_images(args.encoded)]
    http, grpc, metrics, exit_metrics = _free_ports(4)
    common = ["--instances", str(args.instances), "--max-queue-delay-us", str(args.max_queue_delay_us),
              "--backend", args.backend] + (["--max-batch", str(args.max_batch)] if args.max_batch else [])
    workdir = tempfile.mkdtemp(prefix="serve_load-")
    repo = os.path.join(workdir, "repo")
    if args.server == "serve":
        cmd = [sys.executable, "-m", "dmpo_edge", "serve", args.bundle, "--http-port", str(http), "--grpc-port",
               str(grpc), "--metrics-port", str(metrics), "--exit-metrics-port", str(exit_metrics), *common]
        models = ["dmpo", "dmpo_thresholds"]
    else:  # the export-triton repository under the wheel's raw tritonserver; thresholds reload in poll mode
        # the calibrated thresholds written explicitly: switching back to them is then the same config text
        thr_text = ",".join(repr(float(v)) for v in bundle.thresholds)
        subprocess.run([sys.executable, "-m", "dmpo_edge", "export-triton", args.bundle, repo, *common,
                        "--thresholds", thr_text], check=True, stdout=subprocess.DEVNULL)
        cmd = [sys.executable, "-m", "dmpo_edge.runtime.serve.launch", repo, os.path.join(workdir, "work"),
               "--model-control-mode=poll", "--repository-poll-secs=1", "--http-address=127.0.0.1",
               f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
               "--metrics-address=127.0.0.1", f"--metrics-port={metrics}"]
        models = ["dmpo"]
    probe = x[: min(x.shape[0], 32, args.max_batch or bundle.max_batch)]

    def set_thresholds(ctl, values):
        if args.server == "serve":
            return ctl.thresholds(values)
        import re

        cfg = os.path.join(repo, "dmpo", "config.pbtxt")
        with open(cfg) as f:
            text = f.read()
        static = all(v == float("inf") for v in values)
        new = re.sub(r'key: "thresholds" value: \{ string_value: "[^"]*" \}',
                     f'key: "thresholds" value: {{ string_value: "{",".join(repr(float(v)) for v in values)}" }}', text)
        if new == text:
            return values
        with open(cfg, "w") as f:
            f.write(new)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # Triton reloads the model in the background; wait until it answers so
            stages = ctl.infer(probe)["exit_stage"]
            if (stages == bundle.num_stages - 1).all() == static:
                return values
            time.sleep(0.5)
        raise SystemExit("the repository's thresholds were not reloaded within 180 s")
    log = tempfile.NamedTemporaryFile("w+", prefix="serve_load-", suffix=".log", delete=False)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    report = {"bundle": os.path.abspath(args.bundle), "settings": vars(args), "load_average_start": os.getloadavg(),
              "cpu_count": os.cpu_count(), "runs": []}
    try:
        ctl = None
        deadline = time.monotonic() + 240
        while ctl is None:
            try:
                c = Client("http", f"127.0.0.1:{http}")
                if all(c.client.is_model_ready(m) for m in models):
                    ctl = c
            except Exception:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"server did not start:\n{log.read()[-3000:]}\n(full log: {log.name})")
            time.sleep(0.3)
        calibrated = ctl.thresholds() if args.server == "serve" else list(bundle.thresholds)
        url = f"127.0.0.1:{grpc if args.protocol == 'grpc' else http}"
        for r in range(args.rounds):
            for name, thr in (("early_exit", calibrated), ("static", [float("inf")] * len(calibrated))):
                set_thresholds(ctl, thr)
                before = ctl.batch_sizes()
                res = _load(args.clients, args.protocol, url, x, blobs, args.images, args.warmup, args.duration)
                res.update(config=name, round=r, thresholds=thr, triton_batches=_diff(ctl.batch_sizes(), before),
                           load_average=os.getloadavg())
                report["runs"].append(res)
                print(f"round {r} {name:10s} {res['images_per_s']:8.1f} img/s  {res['requests_per_s']:8.1f} req/s  "
                      f"p50 {res['p50_ms']:6.2f}  p95 {res['p95_ms']:6.2f}  p99 {res['p99_ms']:6.2f} ms  "
                      f"exits {res['exit_histogram']}  batches {res['triton_batches']}  errors {res['errors']}  "
                      f"load {res['load_average'][0]:.2f}", flush=True)
        if args.server == "serve":
            ctl.thresholds(calibrated)
        ctl.close()
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
        log.close()
        if server.returncode == 0:
            os.unlink(log.name)
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    summary = {}
    for name in ("early_exit", "static"):
        runs = [r for r in report["runs"] if r["config"] == name]
        summary[name] = {k: float(np.median([r[k] for r in runs])) for k in
                         ("images_per_s", "requests_per_s", "p50_ms", "p95_ms", "p99_ms")}
    summary["throughput_ratio"] = summary["early_exit"]["images_per_s"] / max(summary["static"]["images_per_s"], 1e-9)
    report["summary"] = summary
    print(f"median over rounds: early exit {summary['early_exit']['images_per_s']:.1f} img/s, static "
          f"{summary['static']['images_per_s']:.1f} img/s, ratio {summary['throughput_ratio']:.2f}; p99 "
          f"{summary['early_exit']['p99_ms']:.2f} vs {summary['static']['p99_ms']:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
