"""Streaming: real video files, image folders and GStreamer pipelines through the early-exit pipeline."""

import json
import shutil
import time

import numpy as np
import pytest

from dmpo_edge.cli import main
from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.runtime.pipeline import Pipeline
from dmpo_edge.runtime.sources import FrameSource, open_source
from dmpo_edge.runtime.stream import stream

cv2 = pytest.importorskip("cv2")
skdata = pytest.importorskip("skimage.data")

THR = [0.6, 0.75]


@pytest.fixture(scope="module")
def tb(toy_bundle):
    return toy_bundle(num_stages=3, classes=4, seed=11, thresholds=THR, max_batch=16)


@pytest.fixture(scope="module")
def photos():
    return [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.immunohistochemistry()]


def _write_video(path, photos, n, fourcc="mp4v", size=(96, 72)):
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, size)
    assert vw.isOpened()
    for i in range(n):
        im = cv2.resize(photos[i % len(photos)], size)
        vw.write(np.ascontiguousarray(np.roll(im, 7 * i, axis=1)[:, :, ::-1]))  # RGB -> BGR for OpenCV
    vw.release()


def _decode_all(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(np.ascontiguousarray(f[:, :, ::-1]))
    cap.release()
    return frames


def test_video_file_frames_classified_like_the_reference(tb, photos, tmp_path):
    video = tmp_path / "clip.mp4"
    _write_video(video, photos, 23)
    s = stream(tb.path, str(video), batch=4, max_wait_ms=5)
    got = list(s)
    frames = _decode_all(video)
    assert len(frames) == 23 and [r.index for r in got] == list(range(23))
    from dmpo_edge.bundle import Bundle

    x = Bundle.load(tb.path).preprocess(frames)
    ref = tb.early_exit(x, THR)
    assert [r.exit_stage for r in got] == ref["exit_stage"].tolist()
    assert [r.prediction for r in got] == ref["prediction"].tolist()
    np.testing.assert_allclose([r.confidence for r in got], ref["confidence"], rtol=1e-5, atol=1e-5)
    summ = s.summary()
    assert summ["frames_classified"] == 23 and summ["frames_dropped"] == 0 and summ["mode"] == "lossless"
    assert sum(summ["exit_counts"]) == 23 and summ["fps"] > 0
    assert len(set(r.exit_stage for r in got)) > 1, "the toy thresholds should spread exits over stages"


def test_truncated_video_delivers_what_was_read_then_fails(tb, photos, tmp_path):
    full = tmp_path / "clip.avi"
    _write_video(full, photos, 30, fourcc="MJPG")
    data = full.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    s = stream(tb.path, str(cut), batch=4)
    got = []
    with pytest.raises(DmpoEdgeError, match=r"ended after \d+ of 30 frames"):
        for r in s:
            got.append(r)
    assert 5 <= len(got) < 30 and [r.index for r in got] == list(range(len(got)))
    assert s.summary()["frames_classified"] == len(got) and "error" in s.summary()


def test_unopenable_sources(tb, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\0" * 1000)
    with pytest.raises(DmpoEdgeError, match="cannot open the video"):
        stream(tb.path, str(bad))
    with pytest.raises(DmpoEdgeError, match="does not exist"):
        stream(tb.path, str(tmp_path / "nope.mp4"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DmpoEdgeError, match="no images"):
        stream(tb.path, str(empty))


def _photo_folder(root, photos, per_class=3):
    PIL = pytest.importorskip("PIL.Image")
    for c in range(4):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            img = np.roll(photos[(c + i) % len(photos)], 13 * i, axis=0)
            PIL.fromarray(img).resize((40, 30)).save(d / f"img_{i}.png")
    return root


def test_folder_with_labels_and_a_corrupt_image(tb, photos, tmp_path):
    root = _photo_folder(tmp_path / "frames", photos)
    s = stream(tb.path, str(root), batch=5)
    got = list(s)
    assert len(got) == 12 and {r.truth for r in got} == {f"class_{c}" for c in range(4)}
    summ = s.summary()
    assert summ["labelled"] == 12 and 0.0 <= summ["accuracy"] <= 1.0
    assert summ["accuracy"] == pytest.approx(np.mean([r.label == r.truth for r in got]), abs=1e-4)
    (root / "class_2" / "img_1.png").write_bytes(b"not a png at all")
    got = []
    with pytest.raises(DmpoEdgeError, match=r"class_2/img_1.png.*cannot be decoded"):
        for r in stream(tb.path, str(root), batch=5):
            got.append(r)
    assert len(got) == 7  # class_0 (3) + class_1 (3) + class_2/img_0 all delivered before the failure
    s = stream(tb.path, str(root), batch=5, skip_bad=True)
    assert len(list(s)) == 11 and len(s.summary()["skipped"]) == 1


class _FastLiveSource(FrameSource):
    """A synthetic camera: frames as fast as asked, marked live."""

    live = True

    def __init__(self, photos, n):
        super().__init__()
        self.uri, self.photos, self.n = "synthetic camera", photos, n

    def read(self):
        if self._index >= self.n:
            return None
        return self._frame(np.ascontiguousarray(self.photos[self._index % len(self.photos)][::8, ::8]))


def test_realtime_drops_stale_frames_and_lossless_does_not(tb, photos):
    s = stream(tb.path, _FastLiveSource(photos, 120), batch=2, max_wait_ms=0)
    assert s.realtime
    got = []
    for r in s:
        got.append(r)
        time.sleep(0.004)  # a slow consumer: the source gets ahead
    summ = s.summary()
    assert summ["frames_dropped"] > 0 and summ["frames_read"] == 120
    assert len(got) + summ["frames_dropped"] == 120
    assert all(a.index < b.index for a, b in zip(got, got[1:]))  # still in order
    s = stream(tb.path, _FastLiveSource(photos, 40), batch=2, realtime=False)
    got = list(s)
    assert [r.index for r in got] == list(range(40)) and s.summary()["frames_dropped"] == 0


def test_limit_and_reused_pipeline(tb, photos, tmp_path):
    video = tmp_path / "clip.mp4"
    _write_video(video, photos, 15)
    with Pipeline.from_bundle(tb.path, thresholds=[0.0, 0.0]) as p:
        got = list(stream(None, str(video), pipeline=p, limit=6))
        assert len(got) == 6 and all(r.exit_stage == 0 for r in got)
        assert len(p.predict(np.zeros((2, 3, 8, 8), np.float32))) == 2  # the stream left the pipeline open


@pytest.mark.skipif(shutil.which("gst-launch-1.0") is None, reason="gst-launch-1.0 is not installed (apt: gstreamer1.0-tools)")
def test_gstreamer_videotestsrc(tb):
    src = open_source("gst:videotestsrc num-buffers=17 pattern=ball", width=64, height=48, gst="launch")
    s = stream(tb.path, src, batch=4)
    got = list(s)
    src.close()
    assert [r.index for r in got] == list(range(17)) and not s.realtime
    # the same pipeline given without the gst: prefix ("' ! '" marks a pipeline)
    got = list(stream(tb.path, "videotestsrc num-buffers=5 ! videoflip method=horizontal-flip", width=32, height=32))
    assert len(got) == 5
    with pytest.raises(DmpoEdgeError, match="GStreamer pipeline stopped"):
        list(stream(tb.path, "gst:videotestsrc num-buffers=3 ! no_such_element_xyz"))


def test_cli_run_json_and_failure(tb, photos, tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    _write_video(video, photos, 9)
    assert main(["run", tb.path, "--source", str(video), "--json", "--batch", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 10 and lines[-1]["summary"]["frames_classified"] == 9
    assert [x["index"] for x in lines[:-1]] == list(range(9)) and {"label", "exit_stage", "latency_ms"} <= set(lines[0])
    root = _photo_folder(tmp_path / "frames", photos, per_class=2)
    (root / "class_1" / "img_0.png").write_bytes(b"garbage")
    assert main(["run", tb.path, "--source", str(root)]) == 2
    out, err = capsys.readouterr()
    assert out.count(" exit ") == 2 and "summary: 2 frames classified" in out
    assert "cannot be decoded" in err and "Traceback" not in err
    assert main(["run", tb.path, "--source", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
