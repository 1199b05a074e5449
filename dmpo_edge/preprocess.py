"""Image preprocessing shared by tuning, calibration and the runtime.

One numpy implementation (no PIL/OpenCV resize) so that the pixels a stage was calibrated on are
bit-for-bit the pixels it sees on the device, whatever decoder the device has.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import DmpoEdgeError

__all__ = ["Preprocess", "resize_bilinear", "to_rgb_uint8"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: largest resize / crop side accepted (a network input far beyond any edge model's)
MAX_SIDE = 8192
#: bounds of a sane normalisation on the [0, 1] pixel scale (see Preprocess)
MIN_STD, MAX_NORM = 1e-3, 255.0


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


def resize_bilinear(image: np.ndarray, height: int, width: int, window: tuple | None = None) -> np.ndarray:
    """Bilinear resize with half-pixel centres (the convention of OpenCV, PIL without antialias, ONNX Resize).

    ``window=(top, left, h, w)`` computes only that part of the resized image (bit-identical to resizing
    and then cropping): memory stays bounded by the window however extreme the source's aspect ratio.
    """
    h, w = image.shape[:2]
    top, left, out_h, out_w = window if window is not None else (0, 0, height, width)
    if (h, w) == (height, width):
        return image[top:top + out_h, left:left + out_w].astype(np.float32)
    ys = (np.arange(top, top + out_h, dtype=np.float32) + 0.5) * (h / height) - 0.5
    xs = (np.arange(left, left + out_w, dtype=np.float32) + 0.5) * (w / width) - 0.5
    ys = np.clip(ys, 0, h - 1)
    xs = np.clip(xs, 0, w - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    # gather out_h x out_w pixels from the source as it is (uint8), then convert only those: converting the
    # whole image first cost 12000 x 12000 x 3 float32 = 1.7 GB for one frame; now memory follows the window
    y0, y1, x0, x1 = y0[:, None], y1[:, None], x0[None, :], x1[None, :]
    f32 = np.float32
    top_row = image[y0, x0].astype(f32) * (1 - wx) + image[y0, x1].astype(f32) * wx
    bot_row = image[y1, x0].astype(f32) * (1 - wx) + image[y1, x1].astype(f32) * wx
    return top_row * (1 - wy) + bot_row * wy


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
        for name in ("resize", "crop"):  # integral values only (numpy ints and 224.0 are fine, "224" and 224.5 are not)
            v = getattr(self, name)
            try:
                ok = not isinstance(v, (bool, str)) and int(v) == v
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not ok:
                raise DmpoEdgeError("preprocess", f"{name} {v!r} must be a positive integer")
            setattr(self, name, int(v))
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
        # Manifests come from elsewhere: sizes that would allocate gigabytes per frame, or a zero / non-finite
        # std that turns every pixel into Inf / NaN, are refused here rather than met at run time.
        if self.resize > MAX_SIDE:
            raise DmpoEdgeError("preprocess", f"resize {self.resize} must be at most {MAX_SIDE}")
        if self.size != (self.crop, self.crop):
            raise DmpoEdgeError("preprocess", f"size {list(self.size)} must equal the crop ({self.crop} x {self.crop})")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise DmpoEdgeError("preprocess", "mean and std need 3 values (R, G, B)")
        if not all(math.isfinite(v) for v in self.mean + self.std) or not all(v > 0 for v in self.std):
            raise DmpoEdgeError("preprocess", f"mean {list(self.mean)} / std {list(self.std)} must be finite, std > 0")
        # Pixels are scaled to [0, 1] first: a std below 1e-3 (1e-300 is 0 in float32) or a mean far outside the
        # pixel range turns every input into huge values that overflow FP16 graphs; such a record is a mistake.
        if not all(MIN_STD <= v <= MAX_NORM for v in self.std) or not all(abs(v) <= MAX_NORM for v in self.mean):
            raise DmpoEdgeError("preprocess", f"mean {list(self.mean)} / std {list(self.std)} are not on the [0, 1] pixel "
                                f"scale (std in [{MIN_STD:g}, {MAX_NORM:g}], |mean| <= {MAX_NORM:g}; ImageNet's are "
                                f"{list(IMAGENET_MEAN)} / {list(IMAGENET_STD)})")

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
        except (TypeError, ValueError, OverflowError) as exc:
            raise DmpoEdgeError("preprocess", f"invalid preprocessing record {d!r}: {exc}") from None

    def one(self, image: np.ndarray) -> np.ndarray:
        """One decoded image -> 3 x H x W float32."""
        img = to_rgb_uint8(image)
        h, w = img.shape[:2]
        scale = self.resize / min(h, w)
        nh, nw = max(self.crop, int(round(h * scale))), max(self.crop, int(round(w * scale)))
        top, left = (nh - self.crop) // 2, (nw - self.crop) // 2
        # only the centre crop is computed: a 1 x 100000 image must not become a 224 x 22,400,000 float array
        img = resize_bilinear(img, nh, nw, window=(top, left, self.crop, self.crop))
        img = (img / 255.0 - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)

    def __call__(self, images) -> np.ndarray:
        """A list (or N x H x W x C array) of decoded images -> N x 3 x H x W float32."""
        out = np.empty((len(images), 3, *self.size), np.float32)
        for i, img in enumerate(images):
            out[i] = self.one(img)
        return out
