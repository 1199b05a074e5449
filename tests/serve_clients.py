"""Client side of the serving tests; runs in the ``serve`` environment (tritonclient's gRPC needs protobuf < 7).

``python serve_clients.py CASE.json OUT.json``: CASE names the endpoints, an .npy of preprocessed images and
a list of encoded image files. Concurrent HTTP and gRPC clients send the images one per request, then each
encoded file; then malformed requests (each followed by a good one, which must still be answered); then
Triton's batch statistics. Everything is written to OUT for the test to compare with Pipeline.predict.
"""

import json
import sys
import threading
import time

import numpy as np

from dmpo_edge.runtime.serve.client import Client


def _as_lists(d):
    return {k: (v.astype(str).tolist() if v.dtype == object else v.tolist()) for k, v in d.items()}


def main(case_path, out_path):
    with open(case_path) as f:
        case = json.load(f)
    x = np.load(case["inputs"])
    model = case.get("model", "dmpo")
    out = {"rows": [None] * x.shape[0], "errors": {}, "after_error": {}}
    lock = threading.Lock()
    next_row = [0]

    def worker(protocol):
        c = Client(protocol, case[protocol], model)
        deadline = time.monotonic() + 120  # bounded: every row once, or give up
        while time.monotonic() < deadline:
            with lock:
                i = next_row[0]
                next_row[0] += 1
            if i >= x.shape[0]:
                break
            r = c.infer(x[i:i + 1])
            out["rows"][i] = {"protocol": protocol, **_as_lists(r)}
        c.close()

    threads = [threading.Thread(target=worker, args=("http" if t % 2 == 0 else "grpc",)) for t in range(case.get("threads", 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)

    # a bad request batched with good ones (300 ms queue delay in the test: they arrive together)
    mixed = {}

    def send(i):
        c = Client("grpc", case["grpc"], model)
        try:
            arr = x[i:i + 1] if i else np.full((1,) + x.shape[1:], np.nan, np.float32)
            mixed[i] = _as_lists(c.infer(arr))
        except Exception as exc:
            mixed[i] = {"error": str(exc)[:300]}
        c.close()

    ts = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    out["mixed"] = [mixed.get(i) for i in range(4)]

    http = Client("http", case["http"], model)
    out["images"] = [_as_lists(http.infer_images([open(p, "rb").read()])) for p in case.get("images", [])]
    if case.get("images"):
        blobs = [open(p, "rb").read() for p in case["images"][:3]]
        out["images_batch"] = _as_lists(http.infer_images(blobs))

    shape = list(x.shape[1:])
    bad = {
        "wrong_shape": lambda c: c.infer_raw("input", np.zeros([1, shape[0], shape[1], shape[2] + 1], np.float32), "FP32"),
        "wrong_dtype": lambda c: c.infer_raw("input", np.zeros([1] + shape, np.float64), "FP64"),
        "empty_batch": lambda c: c.infer_raw("input", np.zeros([0] + shape, np.float32), "FP32"),
        "undecodable": lambda c: c.infer_images([b"this is not a PNG"]),
        "nan": lambda c: c.infer(np.full([1] + shape, np.nan, np.float32)),
    }
    for protocol in ("http", "grpc"):
        c = Client(protocol, case[protocol], model)
        for name, send in bad.items():
            try:
                send(c)
                out["errors"][f"{protocol}:{name}"] = None
            except Exception as exc:  # tritonclient raises InferenceServerException (or a client-side error)
                out["errors"][f"{protocol}:{name}"] = f"{type(exc).__name__}: {exc}"
            out["after_error"][f"{protocol}:{name}"] = _as_lists(c.infer(x[:1]))
        c.close()
    out["batch_sizes"] = {str(k): v for k, v in http.batch_sizes().items()}
    if case.get("thresholds_model"):
        before = http.thresholds()
        never = http.thresholds([float("inf")] * len(before))
        out["thresholds"] = {"before": before, "set": never, "rows_never": _as_lists(http.infer(x[:4]))}
        http.thresholds(before)
        out["thresholds"]["restored"] = http.thresholds()
    http.close()
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


def drain(case_path, out_path):
    """Requests in Triton's queue when the server gets SIGTERM must still be answered."""
    import os
    import signal

    with open(case_path) as f:
        case = json.load(f)
    x = np.load(case["inputs"])
    done = {}

    def one(i):
        c = Client("grpc", case["grpc"], case.get("model", "dmpo"))
        try:
            r = c.infer(x[i % x.shape[0]][None])
            done[i] = {"ok": True, "t": time.monotonic(), "prediction": int(r["prediction"][0])}
        except Exception as exc:
            done[i] = {"ok": False, "t": time.monotonic(), "error": str(exc)[:300]}
        c.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(case["requests"])]
    for t in threads:
        t.start()
    # SIGTERM once Triton holds requests in its queue (the ones beyond the first full batch wait there for the
    # queue delay): Triton's pending-request gauge says when
    import urllib.request

    deadline = time.monotonic() + 60
    pending = 0
    while time.monotonic() < deadline and pending < case["min_pending"]:
        text = urllib.request.urlopen(f"http://{case['metrics']}/metrics", timeout=5).read().decode()
        pending = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("nv_inference_pending_request_count") and 'model="dmpo"' in line)
        time.sleep(0.01)
    t_kill = time.monotonic()
    os.kill(case["pid"], signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    with open(out_path, "w") as f:
        json.dump({"results": [done.get(i) for i in range(case["requests"])], "pending_at_sigterm": pending,
                   "answered_after_sigterm": sum(1 for d in done.values() if d["ok"] and d["t"] > t_kill)}, f)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "drain":
        sys.exit(drain(sys.argv[2], sys.argv[3]))
    sys.exit(main(sys.argv[1], sys.argv[2]))
