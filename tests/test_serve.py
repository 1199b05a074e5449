"""Serving on Triton: the request path (here, numpy 2), and the real servers (in the ``serve`` environment).

The server side needs PyTriton, which pins numpy < 2: ``.ci/run`` builds ``.venv-serve`` and exports its
interpreter as ``DMPO_EDGE_SERVE_PYTHON``; without it the server tests skip with that reason. Servers bind
127.0.0.1 on free ports, every wait is bounded, and each process is stopped by its own pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from dmpo_edge.errors import DmpoEdgeError

SERVE_PYTHON = os.environ.get("DMPO_EDGE_SERVE_PYTHON")
HERE = os.path.dirname(os.path.abspath(__file__))
needs_serve_env = pytest.mark.skipif(
    not SERVE_PYTHON or not os.path.exists(SERVE_PYTHON),
    reason="DMPO_EDGE_SERVE_PYTHON is not set: the serve extra (PyTriton, numpy < 2) lives in its own virtualenv; "
           ".ci/run builds .venv-serve and sets it")
THRESHOLDS = [0.6, 0.7]


def _cli(*args, python=None, timeout=120):
    return subprocess.run([python or sys.executable, "-m", "dmpo_edge", *args], capture_output=True, text=True,
                          timeout=timeout)


def _digits_png(tmp_path, n=6):
    """Real images: sklearn's 8 x 8 digits as PNG files, and the preprocessed batch the server must see."""
    from PIL import Image
    from sklearn.datasets import load_digits

    imgs = (load_digits().images[:n] * (255.0 / 16.0)).round().astype(np.uint8)
    paths = []
    for i, im in enumerate(imgs):
        p = tmp_path / (f"digit_{i}.jpg" if i == n - 1 else f"digit_{i}.png")  # PNG and JPEG
        Image.fromarray(im, mode="L").resize((24, 20)).save(p)  # the server resizes and crops
        paths.append(str(p))
    return paths


@pytest.fixture
def served_bundle(toy_bundle):
    return toy_bundle(seed=3, thresholds=THRESHOLDS)


# --------------------------------------------------------------------------------------------
# The request path, without a server: the same ServeHandler runs inside both servers
# --------------------------------------------------------------------------------------------

def _handler(bundle_path):
    from dmpo_edge.runtime import Pipeline
    from dmpo_edge.runtime.serve.handler import ServeHandler
    from dmpo_edge.runtime.serve.metrics import ExitMetrics

    pipe = Pipeline.from_bundle(bundle_path, backend="ort")
    metrics = ExitMetrics("dmpo", pipe.num_stages, lambda: pipe.thresholds)
    return pipe, ServeHandler(pipe, metrics), metrics


def test_handler_answers_each_request_and_isolates_bad_ones(served_bundle, tmp_path):
    from dmpo_edge.images import load_image

    tb = served_bundle
    pipe, handler, metrics = _handler(tb.path)
    try:
        x = tb.inputs(7, seed=1)
        paths = _digits_png(tmp_path, 3)
        assert paths[-1].endswith(".jpg")
        blobs = np.array([[open(p, "rb").read()] for p in paths], dtype=object)
        reqs = [{"input": x[:4]}, {"input": np.full((1, 3, tb.size, tb.size), np.nan, np.float32)},
                {"image": blobs}, {"image": np.array([[b"garbage"]], dtype=object)}, {"input": x[4:]},
                {"input": x[:0]}, {}, {"input": x[:1].astype(np.float64)}]
        out = handler.infer(reqs)
        want = pipe.predict(x)
        got = {k: np.concatenate([out[0][k], out[4][k]]).ravel() for k in out[0]}
        np.testing.assert_array_equal(got["prediction"], want.prediction)
        np.testing.assert_array_equal(got["exit_stage"], want.exit_stage)
        np.testing.assert_allclose(got["confidence"], want.confidence, rtol=0, atol=1e-6)
        assert [c.decode() for c in got["class_name"]] == [pipe.classes[i] for i in want.prediction]
        want_img = pipe.predict(pipe.bundle.preprocess([load_image(p) for p in paths]))
        np.testing.assert_array_equal(out[2]["prediction"].ravel(), want_img.prediction)
        np.testing.assert_array_equal(out[2]["exit_stage"].ravel(), want_img.exit_stage)
        assert all(isinstance(out[i], DmpoEdgeError) for i in (1, 3, 5, 6, 7))
        assert "NaN" in str(out[1]) and "cannot decode" in str(out[3]) and "empty batch" in str(out[5])
        assert "exactly one of" in str(out[6]) and "FP32" in str(out[7])
        text = metrics.text()
        exits = np.bincount(np.concatenate([want.exit_stage, want_img.exit_stage]), minlength=3)
        for k in range(3):
            assert f'dmpo_exit_total{{model="dmpo",stage="{k}"}} {exits[k]}' in text
        assert 'dmpo_requests_total{model="dmpo",outcome="failure"} 5' in text
        assert 'dmpo_exit_threshold{model="dmpo",stage="0"} 0.6' in text
    finally:
        handler.close()
        pipe.close()


def test_handler_batches_from_many_threads_are_in_flight_together(served_bundle):
    tb = served_bundle
    pipe, handler, _ = _handler(tb.path)
    try:
        x = tb.inputs(96, seed=2)
        want = pipe.predict(x)
        got = [None] * 12

        def call(i):
            got[i] = handler.infer([{"input": x[i * 8:(i + 1) * 8]}])[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        pred = np.concatenate([g["prediction"].ravel() for g in got])
        stage = np.concatenate([g["exit_stage"].ravel() for g in got])
        np.testing.assert_array_equal(pred, want.prediction)
        np.testing.assert_array_equal(stage, want.exit_stage)
        # thresholds change at run time: batches formed afterwards use them
        handler.set_thresholds([float("inf"), float("inf")])
        r = handler.infer([{"input": x[:8]}])[0]
        assert (r["exit_stage"] == 2).all()
    finally:
        handler.close()
        pipe.close()


def test_port_in_use_is_one_clear_error():
    from dmpo_edge.runtime.serve.ports import check_ports_free

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(DmpoEdgeError, match=f"http port 127.0.0.1:{port} is not available"):
            check_ports_free("127.0.0.1", {"http": port, "grpc": None})
    with pytest.raises(DmpoEdgeError, match="are both"):
        check_ports_free("127.0.0.1", {"http": 1234, "grpc": 1234})


def test_serve_without_the_serve_extra_names_it(served_bundle, monkeypatch):
    from dmpo_edge.runtime.serve import env

    if env.installed_version("nvidia-pytriton") is None:
        r = _cli("serve", served_bundle.path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "dmpo-edge[serve]" in r.stderr and "own environment" in r.stderr
    # PyTriton present beside numpy 2 (this environment's numpy): the numpy pin is named, and how to install
    import numpy

    if numpy.__version__.startswith("1."):
        pytest.skip("numpy < 2 here")
    real = env.installed_version
    monkeypatch.setattr(env, "installed_version", lambda d: "0.7.0" if d == "nvidia-pytriton" else real(d))
    with pytest.raises(DmpoEdgeError, match=r"numpy 2\..* PyTriton needs numpy < 2.*\.venv-serve"):
        env.check_serve_env()


def test_export_triton_writes_a_standard_repository(served_bundle, tmp_path):
    repo = tmp_path / "repo"
    r = _cli("export-triton", served_bundle.path, str(repo), "--instances", "3", "--max-batch", "16")
    assert r.returncode == 0, r.stderr
    cfg = (repo / "dmpo" / "config.pbtxt").read_text()
    for line in ('backend: "python"', "max_batch_size: 16", "dynamic_batching {", "count: 3 kind: KIND_CPU",
                 'key: "backend" value: { string_value: "ort" }', 'dims: [ 3, 8, 8 ]', "TYPE_STRING"):
        assert line in cfg
    assert "triton_model import TritonPythonModel" in (repo / "dmpo" / "1" / "model.py").read_text()
    from dmpo_edge.bundle import Bundle

    assert Bundle.load(str(repo / "dmpo" / "1" / "bundle")).thresholds == THRESHOLDS
    # an existing repository is kept unless --force
    again = _cli("export-triton", served_bundle.path, str(repo))
    assert again.returncode == 2 and "--force" in again.stderr and again.stderr.count("\n") == 1
    # TensorRT requested without engines: one line, nothing written
    bad = _cli("export-triton", served_bundle.path, str(tmp_path / "trt"), "--backend", "trt")
    assert bad.returncode == 2 and "dmpo-edge build" in bad.stderr and not (tmp_path / "trt").exists()


def _tampered_copy(bundle_path, tmp_path):
    import shutil

    dst = tmp_path / "tampered"
    shutil.copytree(bundle_path, dst)
    with open(dst / "stage_1.onnx", "ab") as f:
        f.write(b"\0")
    return str(dst)


def test_export_triton_refuses_a_bundle_that_fails_verification(served_bundle, tmp_path):
    r = _cli("export-triton", _tampered_copy(served_bundle.path, tmp_path), str(tmp_path / "repo"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "sha256" in r.stderr.lower() or "checksum" in r.stderr.lower()
    assert not (tmp_path / "repo").exists()


# --------------------------------------------------------------------------------------------
# Real servers (serve environment)
# --------------------------------------------------------------------------------------------

def _free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_ready(proc, port, models, timeout_s=180):
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    for m in models:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{m}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert proc.poll() is None, f"server exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"model {m} not ready after {timeout_s} s"
            time.sleep(0.3)


def _children(pid):
    """Pids of processes whose parent is ``pid`` (from /proc), with their names."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid:
            out[int(d)] = name
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _stop(proc, timeout_s=90):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def _run_clients(tmp_path, http, grpc, x, images, thresholds_model):
    np.save(tmp_path / "x.npy", x)
    case = {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "inputs": str(tmp_path / "x.npy"),
            "images": images, "threads": 8, "thresholds_model": thresholds_model}
    (tmp_path / "case.json").write_text(json.dumps(case))
    r = subprocess.run([SERVE_PYTHON, os.path.join(HERE, "serve_clients.py"), str(tmp_path / "case.json"),
                        str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


def _check_answers(out, tb, x, images, server_kind):
    from dmpo_edge.images import load_image
    from dmpo_edge.runtime import Pipeline

    with Pipeline.from_bundle(tb.path, backend="ort") as pipe:
        want = pipe.predict(x)
        want_img = pipe.predict(pipe.bundle.preprocess([load_image(p) for p in images]))
        classes = pipe.classes
    rows = out["rows"]
    assert all(r is not None for r in rows)
    assert {r["protocol"] for r in rows} == {"http", "grpc"}
    np.testing.assert_array_equal([r["prediction"][0] for r in rows], want.prediction)
    np.testing.assert_array_equal([r["exit_stage"][0] for r in rows], want.exit_stage)
    np.testing.assert_allclose([r["confidence"][0] for r in rows], want.confidence, rtol=0, atol=1e-6)
    assert [r["class_name"][0] for r in rows] == [classes[i] for i in want.prediction]
    assert len(set(want.exit_stage.tolist())) > 1  # the bundle really exits at several stages
    np.testing.assert_array_equal([r["prediction"][0] for r in out["images"]], want_img.prediction)
    np.testing.assert_array_equal([r["exit_stage"][0] for r in out["images"]], want_img.exit_stage)
    np.testing.assert_array_equal(out["images_batch"]["prediction"], want_img.prediction[:3])
    # Triton's dynamic batcher combined concurrent single-image requests
    assert max(int(b) for b in out["batch_sizes"]) > 1, out["batch_sizes"]
    # every malformed request got an error response, and the next good request was answered
    for key, err in out["errors"].items():
        assert err is not None, f"{server_kind}: {key} was accepted"
        assert out["after_error"][key]["prediction"] == [int(want.prediction[0])]
    for proto in ("http", "grpc"):
        assert "cannot decode" in out["errors"][f"{proto}:undecodable"]
        assert "NaN" in out["errors"][f"{proto}:nan"]
    # a NaN request sent together with good ones: the good ones get their results; the bad one an error response
    # (export-triton, or serve when it was alone in its batch) or, batched by PyTriton, prediction -1 and the reason
    for i, r in enumerate(out["mixed"][1:], start=1):
        assert r.get("prediction") == [int(want.prediction[i])], out["mixed"]
    bad = out["mixed"][0]
    assert "NaN" in bad.get("error", "") or (bad["prediction"] == [-1] and "NaN" in bad["class_name"][0]), bad
    if server_kind == "export-triton":
        assert "NaN" in bad.get("error", ""), bad
    if server_kind == "export-triton":  # the Python backend answers a client's mistake as one: 400 / INVALID_ARGUMENT
        assert "[400] request image 0 | cannot decode" in out["errors"]["http:undecodable"]
        assert "INVALID_ARGUMENT" in out["errors"]["grpc:nan"]


@pytest.mark.slow
@needs_serve_env
def test_serve_answers_http_and_grpc_with_the_pipeline_results(served_bundle, tmp_path):
    tb = served_bundle
    http, grpc, metrics, exit_metrics = _free_ports(4)
    x = tb.inputs(48, seed=5)
    images = _digits_png(tmp_path)
    proc = subprocess.Popen([SERVE_PYTHON, "-m", "dmpo_edge", "serve", tb.path, "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--exit-metrics-port",
                             str(exit_metrics), "--max-queue-delay-us", "300000", "--max-batch", "8"],
                            stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    tritons = stubs = {}
    try:
        _wait_ready(proc, http, ["dmpo", "dmpo_thresholds"])
        tritons = {p: n for p, n in _children(proc.pid).items() if n.startswith("tritonserver")}
        assert tritons, "no tritonserver child process"
        stubs = {p: n for t in tritons for p, n in _children(t).items()}
        out = _run_clients(tmp_path, http, grpc, x, images, thresholds_model=True)
        _check_answers(out, tb, x, images, "serve")
        assert out["thresholds"]["before"] == pytest.approx(THRESHOLDS)
        assert all(s == 2 for s in out["thresholds"]["rows_never"]["exit_stage"])
        assert out["thresholds"]["restored"] == pytest.approx(THRESHOLDS)
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{exit_metrics}/metrics", timeout=5).read().decode()
        total = sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("dmpo_exit_total"))
        assert total >= x.shape[0] + len(images)
        assert "nv_inference_count" in urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        # SIGTERM with requests waiting in Triton's batcher (12 single-image requests, batches of 8, 300 ms queue
        # delay; the signal goes once Triton reports requests pending): every request is answered, then all stops
        case = {"grpc": f"127.0.0.1:{grpc}", "metrics": f"127.0.0.1:{metrics}", "inputs": str(tmp_path / "x.npy"),
                "requests": 12, "min_pending": 1, "pid": proc.pid}
        (tmp_path / "drain.json").write_text(json.dumps(case))
        r = subprocess.run([SERVE_PYTHON, os.path.join(HERE, "serve_clients.py"), "drain", str(tmp_path / "drain.json"),
                            str(tmp_path / "drained.json")], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        drained = json.loads((tmp_path / "drained.json").read_text())
        assert all(d and d["ok"] for d in drained["results"]), drained
        assert drained["pending_at_sigterm"] >= 1 and drained["answered_after_sigterm"] >= 1, drained
        proc.wait(timeout=90)
    finally:
        rc = _stop(proc)
    log = (tmp_path / "serve.log").read_text()
    assert rc == 0, log[-3000:]
    assert "stopped" in log
    assert not [p for p in list(tritons) + list(stubs) if _alive(p)], "tritonserver still running after SIGTERM"


@pytest.mark.slow
@needs_serve_env
def test_serve_bad_input_is_one_line_and_starts_nothing(served_bundle, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        free = _free_ports(3)
        r = _cli("serve", served_bundle.path, "--http-port", str(busy), "--grpc-port", str(free[0]),
                 "--metrics-port", str(free[1]), "--exit-metrics-port", str(free[2]), python=SERVE_PYTHON)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"{busy}" in r.stderr, r.stderr
    r = _cli("serve", _tampered_copy(served_bundle.path, tmp_path), "--http-port", str(free[0]), python=SERVE_PYTHON)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
@needs_serve_env
def test_exported_repository_serves_under_raw_tritonserver(served_bundle, tmp_path):
    tb = served_bundle
    repo = tmp_path / "repo"
    assert _cli("export-triton", tb.path, str(repo), "--max-queue-delay-us", "300000", "--max-batch", "8").returncode == 0
    http, grpc, metrics = _free_ports(3)
    x = tb.inputs(48, seed=6)
    images = _digits_png(tmp_path)
    # launch execs tritonserver: proc.pid is the server's own pid
    proc = subprocess.Popen([SERVE_PYTHON, "-m", "dmpo_edge.runtime.serve.launch", str(repo), str(tmp_path / "work"),
                             "--model-control-mode=poll", "--repository-poll-secs=1",
                             "--http-address=127.0.0.1", f"--http-port={http}", "--grpc-address=127.0.0.1",
                             f"--grpc-port={grpc}", "--metrics-address=127.0.0.1", f"--metrics-port={metrics}"],
                            stdout=open(tmp_path / "triton.log", "w"), stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, http, ["dmpo"])
        with open(f"/proc/{proc.pid}/comm") as f:
            assert f.read().strip().startswith("tritonserver")
        stubs = list(_children(proc.pid))  # one Python-backend stub process per model instance
        assert len(stubs) >= 2
        out = _run_clients(tmp_path, http, grpc, x, images, thresholds_model=False)
        _check_answers(out, tb, x, images, "export-triton")
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        exits = [line for line in text.splitlines() if line.startswith("dmpo_exit_total")]
        assert exits and sum(float(line.rsplit(" ", 1)[1]) for line in exits) >= x.shape[0] + len(images)
        # thresholds change without a restart: edit config.pbtxt, Triton (poll mode) reloads the model
        cfg = repo / "dmpo" / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace('key: "thresholds" value: { string_value: "" }',
                                               'key: "thresholds" value: { string_value: "inf,inf" }'))
        code = ("import sys, time, numpy as np\nfrom dmpo_edge.runtime.serve.client import Client\n"
                "c = Client('http', sys.argv[1]); x = np.load(sys.argv[2])[:8]\n"
                "for _ in range(120):\n"
                "    if (c.infer(x)['exit_stage'] == 2).all(): sys.exit(0)\n"
                "    time.sleep(0.5)\n"
                "sys.exit(1)\n")
        r = subprocess.run([SERVE_PYTHON, "-c", code, f"127.0.0.1:{http}", str(tmp_path / "x.npy")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert proc.poll() is None
    finally:
        stubs = locals().get("stubs", []) + list(_children(proc.pid))  # the reload started new stubs
        rc = _stop(proc)
    assert rc == 0, (tmp_path / "triton.log").read_text()[-3000:]
    assert not [p for p in stubs if _alive(p)], "Python-backend stubs still running after SIGTERM"
