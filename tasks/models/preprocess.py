"""Declared image preprocessing, shared by every image descriptor.

Generators hand descriptors the *canonical image batch*: float32 (n, C, H, W), RGB,
values in [-1, 1] (what `torch:tiny` makes; docs/models.md). Each image descriptor
declares how its network wants that batch, with five options, applied here in this
order before the network sees the images:

1. `crop`  -- centre crop, a fraction of each side in (0, 1] (1 = none). The kept
   side is round(side * crop) pixels (at least 1), centred; when the removed count
   is odd, the extra pixel comes off the bottom / right.
2. `resize` -- square output side in pixels (0 = none): bilinear with half-pixel
   centres and no antialiasing (the arithmetic of torch's
   `F.interpolate(mode="bilinear", align_corners=False)`), computed in float64.
3. `input_range` -- "LO:HI": canonical [-1, 1] is mapped linearly to [LO, HI]
   (e.g. "0:1", "0:255", "-1:1" = unchanged). No rounding, no clipping.
4. `channels` -- "rgb" (unchanged) or "bgr" (channel axis reversed; 3-channel images).
5. `flip_average` -- the descriptor embeds the batch and its horizontal mirror, and
   returns normalise(e) + normalise(e_mirror) (what the seed paper's ArcFace code does;
   the caller normalises the sum). `combine_flip` is that sum.

Pure numpy, no torch: the ONNX, Python and dlib descriptors use it too, so the same
declared options mean the same pixels for every backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modeaudit.tasks.registry import ConfigError, Option

CANONICAL_RANGE = (-1.0, 1.0)


def _parse_range(v: str) -> tuple[float, float] | None:
    lo, sep, hi = str(v).partition(":")
    try:
        lo_f, hi_f = float(lo), float(hi)
    except ValueError:
        return None
    if not sep or not np.isfinite(lo_f) or not np.isfinite(hi_f) or lo_f == hi_f:
        return None
    return lo_f, hi_f


def preprocess_options(input_range: str = "-1:1", resize: int = 0, crop: float = 1.0, channels: str = "rgb",
                       flip_average: bool = False) -> dict[str, Option]:
    """The five preprocessing options (registry Options) with a descriptor's own defaults."""
    return {
        "input_range": Option(str, input_range, "value range the network takes, LO:HI (images arrive in -1:1)",
                              check=lambda v: _parse_range(v) is not None,
                              check_msg="must be LO:HI with two different numbers, e.g. 0:1 or 0:255"),
        "resize": Option(int, resize, "resize images to this square side in pixels, bilinear (0 = no resize)",
                         check=lambda v: v >= 0, check_msg="must be >= 0 (0 = no resize)"),
        "crop": Option(float, crop, "centre crop, fraction of each side kept before resizing (1 = none)",
                       check=lambda v: 0 < v <= 1, check_msg="must be a fraction in (0, 1]"),
        "channels": Option(str, channels, "colour order the network takes: rgb or bgr",
                           check=lambda v: v in ("rgb", "bgr"), check_msg="must be rgb or bgr"),
        "flip_average": Option(bool, flip_average,
                               "embed the mirrored image too and average the two unit embeddings"),
    }


PREPROCESS_KEYS = ("input_range", "resize", "crop", "channels", "flip_average")


@dataclass(frozen=True)
class Preprocess:
    """Declared preprocessing of one descriptor (see the module docstring for the order)."""

    input_range: str = "-1:1"
    resize: int = 0
    crop: float = 1.0
    channels: str = "rgb"
    flip_average: bool = False

    @classmethod
    def from_options(cls, options: dict) -> "Preprocess":
        return cls(**{k: options[k] for k in PREPROCESS_KEYS if k in options})

    @property
    def input_size(self) -> int | None:
        """The declared resize (None when not declared): image readers resize files to it."""
        return self.resize or None

    @property
    def identity(self) -> bool:
        return (self.input_range == "-1:1" or _parse_range(self.input_range) == CANONICAL_RANGE) and \
            not self.resize and self.crop == 1.0 and self.channels == "rgb"

    def __call__(self, images: np.ndarray, what: str = "descriptor") -> np.ndarray:
        """Canonical (n, C, H, W) in [-1, 1] -> the network's input, float32 (n, C, H', W')."""
        x = np.asarray(images)
        if x.ndim != 4:
            raise ConfigError(f"{what} needs images (n, C, H, W); got shape {x.shape}")
        if self.identity:
            return np.ascontiguousarray(x, np.float32)
        x = x.astype(np.float64)
        if self.crop != 1.0:
            x = center_crop(x, self.crop)
        if self.resize:
            x = resize_bilinear(x, self.resize, self.resize)
        lo, hi = _parse_range(self.input_range)
        if (lo, hi) != CANONICAL_RANGE:
            x = (x + 1.0) * ((hi - lo) / 2.0) + lo
        if self.channels == "bgr":
            if x.shape[1] != 3:
                raise ConfigError(f"{what}: channels=bgr needs 3-channel images; got {x.shape[1]} channels")
            x = x[:, ::-1]
        return np.ascontiguousarray(x, np.float32)


def center_crop(x: np.ndarray, frac: float) -> np.ndarray:
    """Centre crop of (n, C, H, W) keeping round(side * frac) pixels of each side."""
    h, w = x.shape[-2:]
    kh, kw = max(1, int(round(h * frac))), max(1, int(round(w * frac)))
    top, left = (h - kh) // 2, (w - kw) // 2
    return x[..., top:top + kh, left:left + kw]


def _bilinear_weights(n_in: int, n_out: int):
    # Half-pixel centres: output pixel i samples input coordinate (i + 0.5) * n_in / n_out - 0.5,
    # clamped at 0 below (as torch does), neighbours clamped to the edge.
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    return i0, i1, w1


def resize_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of (..., H, W) to (..., out_h, out_w), half-pixel centres, no antialiasing (float64)."""
    x = np.asarray(x, np.float64)
    h, w = x.shape[-2:]
    if (h, w) == (out_h, out_w):
        return x
    r0, r1, wr = _bilinear_weights(h, out_h)
    c0, c1, wc = _bilinear_weights(w, out_w)
    rows = x[..., r0, :] * (1.0 - wr)[:, None] + x[..., r1, :] * wr[:, None]
    return rows[..., c0] * (1.0 - wc) + rows[..., c1] * wc


def flip_horizontal(x: np.ndarray) -> np.ndarray:
    """Mirror images (n, C, H, W) left-right."""
    return np.ascontiguousarray(np.asarray(x)[..., ::-1])


def _unit(e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, np.float64)
    n = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.where(n > 0, n, 1.0)


def combine_flip(e: np.ndarray, e_mirror: np.ndarray) -> np.ndarray:
    """normalise(e) + normalise(e_mirror), float32 (the flip-averaged embedding, before the caller's normalisation)."""
    return (_unit(e) + _unit(e_mirror)).astype(np.float32)
