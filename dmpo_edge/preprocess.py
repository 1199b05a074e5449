"""Image preprocessing shared by tuning, calibration and the runtime.

One numpy implementation (no PIL/OpenCV resize) so that the pixels a stage was calibrated on are
bit-for-bit the pixels it sees on the device, whatever decoder the device has.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import DmpoEdgeError

__all__ = ["Preprocess", "resize_bilinear", "to_rgb_uint8"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb_uint8(image: np.ndarray, where: str = "preprocess") -> np.ndarray:
    """Any decoded image (H x W, H x W x 1/3/4, uint8 or float in [0, 1]) -> H x W x 3 uint8."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise DmpoEdgeError(where, f"image of shape {a.shape} is not an image. Expected H x W, H x W x 1, 3 or 4")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.number):
            raise DmpoEdgeError(where, f"image dtype {a.dtype} is not numeric. Expected uint8 or float in [0, 1]")
        f = a.astype(np.float32)
        if not np.all(np.isfinite(f)):
            raise DmpoEdgeError(where, "image has NaN or Inf pixels. Expected finite values")
        if f.max(initial=0.0) <= 1.0:
            f = f * 255.0
        a = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (the convention of OpenCV, PIL without antialias, ONNX Resize)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image.astype(np.float32)
    ys = (np.arange(height, dtype=np.float32) + 0.5) * (h / height) - 0.5
    xs = (np.arange(width, dtype=np.float32) + 0.5) * (w / width) - 0.5
    ys = np.clip(ys, 0, h - 1)
    xs = np.clip(xs, 0, w - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    img = image.astype(np.float32)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bot = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


@dataclass
class Preprocess:
    """Resize the shorter side to ``resize``, centre-crop ``crop`` x ``crop``, scale to [0, 1], normalise.

    ``size`` is the network input (H, W); it equals (crop, crop). Layout is NCHW float32 RGB.
    """

    resize: int = 224
    crop: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    layout: str = "NCHW"
    interpolation: str = "bilinear"
    channels: int = 3
    size: tuple = field(default=None)

    def __post_init__(self):
        if self.size is None:
            self.size = (self.crop, self.crop)
        self.size = tuple(int(s) for s in self.size)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.layout != "NCHW" or self.interpolation != "bilinear" or self.channels != 3:
            raise DmpoEdgeError(
                "preprocess",
                f"unsupported preprocessing layout={self.layout} interpolation={self.interpolation} "
                f"channels={self.channels}. Expected NCHW, bilinear, 3 channels",
            )
        if self.crop > self.resize or self.crop < 1:
            raise DmpoEdgeError("preprocess", f"crop {self.crop} must be between 1 and resize {self.resize}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        try:
            return cls(**{k: d[k] for k in ("resize", "crop", "mean", "std", "layout", "interpolation", "channels", "size") if k in d})
        except (TypeError, ValueError) as exc:
            raise DmpoEdgeError("preprocess", f"invalid preprocessing record {d!r}: {exc}") from None

    def one(self, image: np.ndarray) -> np.ndarray:
        """One decoded image -> 3 x H x W float32."""
        img = to_rgb_uint8(image)
        h, w = img.shape[:2]
        scale = self.resize / min(h, w)
        nh, nw = max(self.crop, int(round(h * scale))), max(self.crop, int(round(w * scale)))
        img = resize_bilinear(img, nh, nw)
        top, left = (nh - self.crop) // 2, (nw - self.crop) // 2
        img = img[top : top + self.crop, left : left + self.crop]
        img = (img / 255.0 - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)

    def __call__(self, images) -> np.ndarray:
        """A list (or N x H x W x C array) of decoded images -> N x 3 x H x W float32."""
        out = np.empty((len(images), 3, *self.size), np.float32)
        for i, img in enumerate(images):
            out[i] = self.one(img)
        return out
