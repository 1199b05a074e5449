"""Faults: a stage that raises mid-batch, a source that disconnects, a consumer that stops reading.

In every case the pipeline ends cleanly (no deadlock, no stray thread or process), delivers every result
that finished with its id (the batch tag / frame index), and reports what failed with a DmpoEdgeError that
names the stage or the source. Real ONNX Runtime sessions on a toy bundle, real gst-launch-1.0 processes,
real files; the only artificial part is the backend wrapper that raises on its Nth call of one stage.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest

from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.runtime.backends import OrtBackend
from dmpo_edge.runtime.pipeline import Pipeline
from dmpo_edge.runtime.sources import FrameSource, open_source
from dmpo_edge.runtime.stream import stream

THR = [0.6, 0.7]


@pytest.fixture(scope="module")
def tb(toy_bundle):
    return toy_bundle(num_stages=3, classes=4, seed=41, thresholds=THR, max_batch=16)


class FailingBackend(OrtBackend):
    """ONNX Runtime, except that stage ``stage`` raises on its ``nth`` call (a lost device, a driver error)."""

    def __init__(self, bundle, stage: int, nth: int, **kw):
        super().__init__(bundle, threads=1, **kw)
        self.fail_stage, self.nth, self.calls = stage, nth, 0
        self._count = threading.Lock()

    def _infer_impl(self, k, feeds, keep_features):
        if k == self.fail_stage:
            with self._count:
                self.calls += 1
                boom = self.calls == self.nth
            if boom:
                raise RuntimeError("device lost (injected fault)")
        return super()._infer_impl(k, feeds, keep_features)


def _no_stray_threads(before: set, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        extra = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()
                 and t.name.startswith(("dmpo-", "soak"))]
        if not extra:
            return
        time.sleep(0.05)
    raise AssertionError(f"threads left running: {[t.name for t in extra]}")


def _collect_all(p):
    """Every batch's outcome in submit order: ('ok', tag, Results) or ('failed', tag, error)."""
    out = []
    while True:
        try:
            for tag, r in p.results():
                out.append(("ok", tag, r))
            return out
        except DmpoEdgeError as exc:
            out.append(("failed", getattr(exc, "tag", "?"), exc))


@pytest.mark.parametrize("stage,nth", [(0, 3), (1, 4), (2, 2)])
def test_stage_raising_mid_stream_fails_only_its_batch(tb, stage, nth):
    before = {t.ident for t in threading.enumerate()}
    batches = [tb.inputs(12, seed=100 + i) for i in range(10)]
    with Pipeline.from_bundle(tb.path, backend=FailingBackend(tb.path, stage, nth), max_in_flight=3) as p:
        for i, x in enumerate(batches):
            p.submit(x, tag=f"batch-{i}", return_logits=True)
        outcomes = _collect_all(p)
        # the pipeline is still usable after a failed batch (a transient fault must not kill the device loop)
        r = p.predict(batches[0])
        np.testing.assert_array_equal(r.prediction, tb.early_exit(batches[0], THR)["prediction"])
    _no_stray_threads(before)
    assert [o[1] for o in outcomes] == [f"batch-{i}" for i in range(10)], "every batch reported, with its id, in order"
    failed = [o for o in outcomes if o[0] == "failed"]
    assert len(failed) == 1
    err = failed[0][2]
    assert f"stage {stage}" in err.where and "device lost" in err.message
    for kind, tag, r in outcomes:
        i = int(tag.split("-")[1])
        ref = tb.early_exit(batches[i], THR)
        if kind == "ok":
            np.testing.assert_array_equal(r.prediction, ref["prediction"])
            np.testing.assert_array_equal(r.exit_stage, ref["exit_stage"])
            np.testing.assert_allclose(r.logits, ref["logits"], rtol=1e-5, atol=1e-5)
        else:  # the samples of the failed batch that exited before the failing stage are still delivered
            part = r.partial
            done = part.exit_stage >= 0
            assert not done.all()
            assert (part.exit_stage[done] < stage).all() and (part.exit_stage[~done] == -1).all()
            np.testing.assert_array_equal(part.prediction[done], ref["prediction"][done])
            np.testing.assert_array_equal(done, ref["exit_stage"] < stage)


def test_stream_with_a_failing_stage_delivers_the_rest_then_names_the_stage(tb):
    """Frames of batches that finished are all yielded (with their index) before the stage's error is raised."""
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(64)]

    class Images(FrameSource):
        uri = "test images"

        def read(self):
            return self._frame(images[self._index]) if self._index < len(images) else None

    before = {t.ident for t in threading.enumerate()}
    pipe = Pipeline.from_bundle(tb.path, backend=FailingBackend(tb.path, 1, 3), max_in_flight=3)
    s = stream(tb.path, Images(), batch=4, max_wait_ms=1, pipeline=pipe)
    got = []
    with pytest.raises(DmpoEdgeError) as ei:
        for r in s:
            got.append(r)
    pipe.close()
    _no_stray_threads(before)
    assert "stage 1" in ei.value.where and "device lost" in ei.value.message
    idx = [r.index for r in got]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    summ = s.summary()
    lost = summ["frames_read"] - summ["frames_classified"]
    assert summ["frames_classified"] == len(got) and 1 <= lost <= 4  # only the failed batch's survivors
    assert summ.get("frames_failed") == lost and "error" in summ
    from dmpo_edge.bundle import Bundle

    pre = Bundle.load(tb.path).preprocess
    ref = tb.early_exit(pre([images[i] for i in idx]), THR)
    np.testing.assert_array_equal([r.prediction for r in got], ref["prediction"])


# ---------------------------------------------------------------------------------------------
# sources that disconnect
# ---------------------------------------------------------------------------------------------
def _gst_or_skip():
    if shutil.which("gst-launch-1.0") is None:
        pytest.skip("gst-launch-1.0 is not installed (apt: gstreamer1.0-tools)")


def test_gstreamer_pipeline_that_dies_mid_stream(tb):
    _gst_or_skip()
    uri = ("gst:videotestsrc num-buffers=200 pattern=ball ! video/x-raw,width=32,height=24 ! identity error-after=13")
    src = open_source(uri, width=32, height=24, gst="launch")
    s = stream(tb.path, src, batch=4, max_wait_ms=1)
    got = []
    with pytest.raises(DmpoEdgeError) as ei:
        for r in s:
            got.append(r.index)
    src.close()
    assert ei.value.where == f"source {uri}" and "stopped after 12 frame(s)" in ei.value.message
    assert got == list(range(12)), "every frame read before the failure is classified, in order"
    assert s.summary()["frames_read"] == 12


def test_camera_vanishing_kills_gst_launch(tb):
    """A live source whose process dies (unplugged camera): frames so far delivered, then one clear error."""
    _gst_or_skip()
    src = open_source("gst:videotestsrc is-live=true ! video/x-raw,width=32,height=24,framerate=60/1", width=32, height=24,
                      gst="launch")
    assert src.live
    s = stream(tb.path, src, batch=2, max_wait_ms=1, realtime=False)
    got = []
    with pytest.raises(DmpoEdgeError) as ei:
        for r in s:
            got.append(r.index)
            if len(got) == 10:
                os.kill(src.proc.pid, signal.SIGKILL)
    assert "stopped after" in ei.value.message and "-9" in ei.value.message
    assert got == list(range(len(got))) and len(got) >= 10
    assert s.summary()["frames_read"] == len(got)
    src.close()


def test_truncated_video_and_corrupt_image_are_named(tb, tmp_path):
    cv2 = pytest.importorskip("cv2")
    PIL = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(3)
    video = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(40):
        vw.write(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8))
    vw.release()
    raw = video.read_bytes()
    video.write_bytes(raw[: len(raw) // 2])  # the copy stopped half-way
    got = []
    with pytest.raises(DmpoEdgeError) as ei:
        for r in stream(tb.path, str(video), batch=4, max_wait_ms=1):
            got.append(r.index)
    assert str(video) in ei.value.where and "truncated" in ei.value.message
    assert 0 < len(got) < 40 and got == list(range(len(got)))

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(9):
        PIL.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "05.png").write_bytes((folder / "05.png").read_bytes()[:30])
    got = []
    with pytest.raises(DmpoEdgeError) as ei:
        for r in stream(tb.path, str(folder), batch=2, max_wait_ms=1):
            got.append(r.name)
    assert "05.png" in ei.value.message and got == [f"{i:02d}.png" for i in range(5)]
    s = stream(tb.path, str(folder), batch=2, max_wait_ms=1, skip_bad=True)
    names = [r.name for r in s]
    assert names == [f"{i:02d}.png" for i in range(9) if i != 5] and s.summary()["skipped"] == [str(folder / "05.png")]


# ---------------------------------------------------------------------------------------------
# consumers that stop reading
# ---------------------------------------------------------------------------------------------
def _within(seconds, fn, *args):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t0 = time.perf_counter()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {seconds} s (deadlock?)"
    if "error" in box:
        raise box["error"]
    return box.get("value"), time.perf_counter() - t0


class SlowBackend(OrtBackend):
    """ONNX Runtime with 20 ms per stage call: a slow accelerator, so submitters really wait."""

    def _infer_impl(self, k, feeds, keep_features):
        time.sleep(0.02)
        return super()._infer_impl(k, feeds, keep_features)


def test_pipeline_close_with_unread_results_and_a_blocked_submitter(tb):
    before = {t.ident for t in threading.enumerate()}
    p = Pipeline.from_bundle(tb.path, backend=SlowBackend(tb.path, threads=1), max_in_flight=2)
    x = tb.inputs(16)
    for i in range(20):  # nobody reads the results
        p.submit(x, tag=i)
    blocked = {}

    def submitter():  # keeps submitting; blocks while max_in_flight batches are in flight
        try:
            for i in range(10_000):
                p.submit(x, tag=i)
        except DmpoEdgeError as exc:
            blocked["error"] = exc

    t = threading.Thread(target=submitter, daemon=True)
    t.start()
    time.sleep(0.3)
    _, dt = _within(20, p.close)
    t.join(5)
    assert not t.is_alive() and "closed while submit() waited" in blocked["error"].message
    assert dt < 5  # the batches in flight finish; nothing waits for a reader
    with pytest.raises(DmpoEdgeError):
        p.submit(tb.inputs(1))
    _no_stray_threads(before)


def test_stream_consumer_that_stops_reading(tb):
    """A consumer that takes a few results and walks away: the stream, its reader and gst-launch all stop."""
    _gst_or_skip()
    before = {t.ident for t in threading.enumerate()}
    src = open_source("gst:videotestsrc ! video/x-raw,width=32,height=24", width=32, height=24, gst="launch")
    s = stream(tb.path, src, batch=4, max_wait_ms=1, realtime=False)
    it = iter(s)
    got = [next(it).index for _ in range(6)]
    time.sleep(0.5)  # the reader fills its bounded queue and waits; nothing may deadlock
    _, dt = _within(20, it.close)
    assert got == list(range(6)) and dt < 15
    src.close()
    assert src.proc is None
    _no_stray_threads(before)


def test_stream_from_a_source_that_stalls_closes_promptly(tb, tmp_path):
    """A live source that stops delivering (a FIFO nobody writes: a hung camera); the consumer gives up."""
    _gst_or_skip()
    fifo = tmp_path / "camera.fifo"
    os.mkfifo(fifo)
    src = open_source(f"gst:filesrc location={fifo} ! rawvideoparse width=8 height=8 format=rgb framerate=30/1",
                      width=8, height=8, gst="launch")
    s = stream(tb.path, src, batch=2, max_wait_ms=1, realtime=True)
    before = {t.ident for t in threading.enumerate()}
    outcome = {}

    def consume():
        try:
            outcome["frames"] = sum(1 for _ in s)
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcome["error"] = exc

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    time.sleep(0.5)
    assert t.is_alive() and s.frames_read == 0  # waiting on the hung camera
    src.close()  # what a supervisor does with a camera that hangs: the stream must end, not wait forever
    t.join(15)
    assert not t.is_alive(), "the stream kept waiting on a closed source"
    assert outcome == {"frames": 0}, outcome  # an orderly end, not a confusing 'reading failed' error
    _no_stray_threads(before)
