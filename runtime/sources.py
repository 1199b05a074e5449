"""Frame sources by URI: image folder, video file, camera, GStreamer pipeline.

``open_source(uri)`` picks the reader:

- an existing folder: its images in sorted order (class sub-folders included; the sub-folder name
  becomes the frame's ``label``); decoded with Pillow like the calibration set, so the runtime sees
  the pixels the thresholds were calibrated on;
- an image file: that one image;
- a video file, or an ``rtsp://`` / ``http://`` URL: OpenCV ``VideoCapture``;
- a camera: an index (``0``) or ``/dev/videoN`` (V4L2 through OpenCV);
- a GStreamer pipeline: ``gst:<pipeline>`` or any string containing ``' ! '``. Read through OpenCV's
  GStreamer backend when OpenCV has one (JetPack's does), otherwise by spawning
  ``gst-launch-1.0 -q <pipeline> ! videoconvert ! videoscale ! video/x-raw,format=RGB,width=W,height=H ! fdsink fd=1``
  and reading raw RGB frames from its stdout (pip's OpenCV has no GStreamer).

Every source yields :class:`Frame` objects (RGB uint8 H x W x 3) from ``read()`` and ``None`` at the
end. A source that stops early (a decode error, a truncated video, a pipeline that dies) raises a
:class:`DmpoEdgeError` from ``read()`` that says what happened; frames read before it are valid.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

import numpy as np

from .._lazy import available, require
from ..errors import DmpoEdgeError
from ..images import IMAGE_EXTENSIONS, MAX_FILE_BYTES, read_regular_file, load_image

__all__ = ["Frame", "FrameSource", "open_source", "ImageFolderSource", "VideoSource", "GstLaunchSource",
           "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "is_gstreamer_uri", "opencv_has_gstreamer"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".wmv", ".flv", ".mjpeg", ".mjpg", ".gif")


@dataclass
class Frame:
    index: int  # 0-based position in the source
    image: np.ndarray  # H x W x 3 uint8 RGB
    t_capture: float  # time.perf_counter() when read
    name: str = ""  # file name (folders) or "frame N"
    label: str | None = None  # class sub-folder name of a folder source


class FrameSource:
    """Base class: ``read() -> Frame | None``; ``close()``; context manager.

    ``live``: a camera or a live pipeline (the stream then defaults to real-time mode, dropping stale
    frames); files and folders are read losslessly. ``expected_frames``: how many frames the source
    says it has (None when unknown), used to notice a video that ends early.
    """

    uri = ""
    live = False
    expected_frames = None

    def __init__(self):
        self._index = 0

    def read(self) -> Frame | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __iter__(self):
        while True:
            f = self.read()
            if f is None:
                return
            yield f

    def _frame(self, image, name=None, label=None) -> Frame:
        f = Frame(self._index, image, time.perf_counter(), name or f"frame {self._index}", label)
        self._index += 1
        return f


def _decode_image(path: str, max_bytes: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Pillow first (the calibration set's decoder), OpenCV when Pillow is absent; regular files within the limits."""
    if available("PIL.Image"):
        return load_image(path, max_bytes=max_bytes, max_pixels=max_pixels)
    cv2 = require("cv2", "decoding images")
    data = np.frombuffer(read_regular_file(path, MAX_FILE_BYTES if max_bytes is None else int(max_bytes)), np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise DmpoEdgeError(f"image {path}", "cannot decode. Expected a readable image file")
    return np.ascontiguousarray(img[:, :, ::-1])


class ImageFolderSource(FrameSource):
    """Images of a folder (and its sub-folders) in sorted path order; or a single image file."""

    def __init__(self, path: str, skip_bad: bool = False, max_file_bytes: int | None = None, max_pixels: int | None = None):
        super().__init__()
        self.uri = path
        self.skip_bad = skip_bad
        self.limits = {"max_bytes": max_file_bytes, "max_pixels": max_pixels}
        self.skipped = []  # paths of the images skipped with skip_bad, one entry each
        self.skip_reasons = []  # why, in the same order
        self.ignored = []  # files in the folder that are not images by their extension (GIFs, videos, text)
        if not os.path.isdir(path):  # one file (a FIFO or device here is refused when read, not hung on)
            self.files = [(path, None)]
        else:
            files = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel = os.path.relpath(root, path)
                label = None if rel == "." else rel.split(os.sep)[0]
                files += [(os.path.join(root, n), label) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
                # GIFs, videos, notes: not frames of an image folder, but said so (summary "ignored"), not hidden
                self.ignored += [os.path.join(root, n) for n in names
                                 if not n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
            self.files = sorted(files)
            self.ignored.sort()
            if not self.files:
                raise DmpoEdgeError(f"source {path}", f"folder has no images. Expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
        self.expected_frames = len(self.files)
        self._pos = 0

    def read(self):
        while self._pos < len(self.files):
            path, label = self.files[self._pos]
            self._pos += 1
            try:
                img = _decode_image(path, **self.limits)
            except DmpoEdgeError as exc:
                if self.skip_bad:
                    self.skipped.append(path)
                    self.skip_reasons.append(exc.message)
                    continue
                raise DmpoEdgeError(f"source {self.uri}", f"image {self._pos} of {len(self.files)} "
                                    f"('{os.path.relpath(path, self.uri) if os.path.isdir(self.uri) else path}') "
                                    f"cannot be decoded ({exc.message}). Fix or remove it, or pass --skip-bad") from None
            return self._frame(img, os.path.relpath(path, self.uri) if os.path.isdir(self.uri) else os.path.basename(path), label)
        return None


def opencv_has_gstreamer() -> bool:
    if not available("cv2"):
        return False
    cv2 = require("cv2")
    for line in cv2.getBuildInformation().splitlines():
        if "GStreamer" in line:
            return "YES" in line.upper()
    return False


class VideoSource(FrameSource):
    """OpenCV ``VideoCapture``: a video file, a URL, a camera (index or /dev/videoN) or a GStreamer string."""

    def __init__(self, target, api: str | None = None, live: bool = False, uri: str | None = None,
                 width: int | None = None, height: int | None = None):
        super().__init__()
        cv2 = require("cv2", "reading video, cameras and GStreamer pipelines")
        self.cv2 = cv2
        self.uri = uri or str(target)
        self.live = live
        apis = {"v4l2": cv2.CAP_V4L2, "gstreamer": cv2.CAP_GSTREAMER, "ffmpeg": cv2.CAP_FFMPEG}
        cap = cv2.VideoCapture(target, apis[api]) if api else cv2.VideoCapture(target)
        if not cap.isOpened():
            cap.release()
            what = "camera" if live and api != "gstreamer" else ("GStreamer pipeline" if api == "gstreamer" else "video")
            raise DmpoEdgeError(f"source {self.uri}", f"cannot open the {what}. Check that it exists, is readable and is a "
                                "format OpenCV can decode (mp4/avi/mkv ...), or that the camera is connected and free")
        if width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        if height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self.cap = cap
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0) or None
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.expected_frames = n if (n > 0 and not live) else None

    def read(self):
        if self.cap is None:
            return None
        ok, img = self.cap.read()
        if not ok or img is None:
            n_read = self._index
            self.close()
            if self.expected_frames and n_read < self.expected_frames * 0.98 - 1:
                raise DmpoEdgeError(f"source {self.uri}", f"video ended after {n_read} of {self.expected_frames} frames "
                                    "(truncated or damaged file). Every frame read was classified")
            if self.live and n_read == 0:
                raise DmpoEdgeError(f"source {self.uri}", "opened but delivered no frame. Check the camera or pipeline")
            return None
        if img.ndim == 3 and img.shape[2] >= 3:
            img = img[:, :, 2::-1]  # BGR(A) -> RGB
        return self._frame(np.ascontiguousarray(img))

    def close(self):
        if getattr(self, "cap", None) is not None:
            self.cap.release()
            self.cap = None


def is_gstreamer_uri(uri: str) -> bool:
    return uri.startswith("gst:") or " ! " in uri


class GstLaunchSource(FrameSource):
    """A GStreamer pipeline run by ``gst-launch-1.0``; raw RGB frames read from its stdout.

    The pipeline is completed with ``videoconvert ! videoscale ! video/x-raw,format=RGB,width=W,height=H
    ! fdsink fd=1`` so every frame is exactly W * H * 3 bytes.
    """

    def __init__(self, pipeline: str, width: int = 640, height: int = 480, live: bool | None = None, uri: str | None = None):
        super().__init__()
        self.uri = uri or pipeline
        exe = shutil.which("gst-launch-1.0")
        if exe is None:
            raise DmpoEdgeError(f"source {self.uri}", "gst-launch-1.0 is not installed and OpenCV has no GStreamer. Install "
                                "gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good (apt) or JetPack's OpenCV")
        self.width, self.height = int(width), int(height)
        self.frame_bytes = self.width * self.height * 3
        self.live = _gst_is_live(pipeline) if live is None else live
        full = (f"{pipeline} ! videoconvert ! videoscale ! video/x-raw,format=RGB,width={self.width},height={self.height} "
                "! fdsink fd=1")
        self.cmd = [exe, "-q"] + _split_pipeline(full)
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                         bufsize=0)
        except OSError as exc:
            raise DmpoEdgeError(f"source {self.uri}", f"cannot start gst-launch-1.0 ({exc})") from None
        self._err = collections.deque(maxlen=20)
        self._err_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._err_thread.start()

    def _drain_stderr(self):
        for line in iter(self.proc.stderr.readline, b""):
            self._err.append(line.decode(errors="replace").rstrip())

    def _read_exact(self, proc, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            b = proc.stdout.read(n - got)
            if not b:
                break
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)

    def read(self):
        proc = self.proc  # close() from another thread (a supervisor stopping a hung camera) clears self.proc
        if proc is None:
            return None
        buf = self._read_exact(proc, self.frame_bytes)
        if len(buf) < self.frame_bytes:
            if self.proc is None:
                return None  # closed while reading: an orderly end, not a failure
            rc = proc.wait(timeout=10)
            self._err_thread.join(timeout=2)
            err = " / ".join(line for line in self._err if line)[-400:]
            n_read = self._index
            self.proc = None
            if rc != 0 or buf:
                why = f"exit code {rc}" + (f": {err}" if err else "")
                part = f" and a partial frame of {len(buf)} bytes" if buf else ""
                raise DmpoEdgeError(f"source {self.uri}", f"GStreamer pipeline stopped after {n_read} frame(s){part} ({why}). "
                                    "Check the pipeline with gst-launch-1.0 directly")
            return None
        img = np.frombuffer(buf, np.uint8).reshape(self.height, self.width, 3)
        return self._frame(img)

    def close(self):
        p, self.proc = getattr(self, "proc", None), None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p is not None:
            for s in (p.stdout, p.stderr):
                try:
                    s.close()
                except Exception:
                    pass


_LIVE_ELEMENTS = ("v4l2src", "nvarguscamerasrc", "nvv4l2camerasrc", "libcamerasrc", "rtspsrc", "udpsrc", "souphttpsrc",
                  "rtmpsrc", "srtsrc", "ximagesrc", "pipewiresrc", "is-live=true", "is-live=1")


def _gst_is_live(pipeline: str) -> bool:
    """A camera or network pipeline (drop stale frames); files and test sources are read losslessly."""
    p = pipeline.replace(" = ", "=").lower()
    return any(e in p for e in _LIVE_ELEMENTS)


def _split_pipeline(text: str) -> list:
    """gst-launch-1.0 takes the pipeline as argv words; keep quoted caps together."""
    import shlex

    return shlex.split(text)


def open_source(uri, width: int | None = None, height: int | None = None, skip_bad: bool = False,
                gst: str = "auto", max_file_bytes: int | None = None, max_pixels: int | None = None) -> FrameSource:
    """Open a frame source from a URI (see the module doc). ``width``/``height``: camera or GStreamer frame size.

    ``gst``: ``auto`` (OpenCV's GStreamer when it has one, else gst-launch-1.0), ``opencv`` or ``launch``.
    """
    if isinstance(uri, int):
        return VideoSource(uri, api="v4l2", live=True, uri=f"camera {uri}", width=width, height=height)
    uri = str(uri)
    if is_gstreamer_uri(uri):
        pipeline = uri[4:].strip() if uri.startswith("gst:") else uri
        use_cv = gst == "opencv" or (gst == "auto" and opencv_has_gstreamer())
        if use_cv:
            caps = "video/x-raw,format=BGR" + (f",width={width},height={height}" if width and height else "")
            return VideoSource(f"{pipeline} ! videoconvert ! videoscale ! {caps} ! appsink drop=false", api="gstreamer",
                               live=_gst_is_live(pipeline), uri=uri)
        return GstLaunchSource(pipeline, width or 640, height or 480, uri=uri)
    if uri.isdigit():
        return VideoSource(int(uri), api="v4l2", live=True, uri=f"camera {uri}", width=width, height=height)
    if uri.startswith("/dev/video"):
        return VideoSource(uri, api="v4l2", live=True, uri=uri, width=width, height=height)
    if "://" in uri and not uri.startswith("file://"):
        return VideoSource(uri, live=True, uri=uri)
    path = uri[7:] if uri.startswith("file://") else uri
    if os.path.isdir(path):
        return ImageFolderSource(path, skip_bad=skip_bad, max_file_bytes=max_file_bytes, max_pixels=max_pixels)
    if not os.path.exists(path):
        raise DmpoEdgeError(f"source {uri}", "does not exist. Expected an image folder, an image or video file, a camera "
                            "index or /dev/videoN, or a GStreamer pipeline (gst:...)")
    if not os.path.isfile(path):  # a FIFO named clip.mp4 would block the decoder forever
        raise DmpoEdgeError(f"source {uri}", "is not a regular file (a FIFO, device or socket). Expected an image folder, "
                            "an image or video file, a camera, or a GStreamer pipeline (gst:...)")
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return ImageFolderSource(path, skip_bad=skip_bad, max_file_bytes=max_file_bytes, max_pixels=max_pixels)
    return VideoSource(path, uri=uri)
