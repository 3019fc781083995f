"""Random Fourier features on the unit sphere: a descriptor for low-dimensional data.

f(x) = [cos(W x + b), sin(W x + b)] / sqrt(F), W (F, in_dim) ~ N(0, 1 / h^2), F = dim / 2,
h the ``bandwidth``. Each frequency contributes cos^2 + sin^2 = 1, so |f(x)| = 1 exactly (no
renormalisation bends the geometry), and

    <f(x), f(y)> = (1/F) sum_j cos(w_j . (x - y))  ->  k(x, y) = exp(-|x - y|^2 / (2 h^2))

(Rahimi & Recht; the shift b cancels). The error of the cosine is O(1 / sqrt(F)) (its sd is at
most 1 / sqrt(2F), about 0.06 at the default dim = 256).

**Relation to the audit's distance.** The audit uses d(a, b) = arccos(<f_a, f_b>) / pi, so with
r = |x - y|:

    d ~= arccos(exp(-r^2 / (2 h^2))) / pi,     r ~= h * sqrt(-2 ln cos(pi d))   (d < 0.5).

d grows monotonically with r, from 0 at r = 0 to 0.5 as r -> infinity (the kernel never goes
negative), so balls in d are balls in Euclidean distance. Examples: d = 0.10 <-> r = 0.32 h,
d0 = 0.25 <-> r = 0.83 h, d = 0.40 <-> r = 1.53 h, d = 0.45 <-> r = 1.93 h. Because of the
O(1/sqrt(F)) noise, distances near d = 0.5 (r >> h) are not resolved: choose h near the scale
you want to see. For separated modes keep the dense-mode ball r(d0) = 0.83 h below half the
spacing of the modes, else a ball centred between two modes holds both and reads as a dense mode
(measured in docs/toy-benchmarks.md): grid25 (spacing 2) is fine at the default h = 1, ring8
(spacing 1.53) needs h < 0.92, e.g. -D bandwidth=0.5.
"""
from __future__ import annotations

import numpy as np

from modeaudit.tasks.models.descriptors import DESCRIPTORS, Descriptor
from modeaudit.tasks.registry import ConfigError, Option

_pos = dict(check=lambda v: v > 0, check_msg="must be > 0")


class RFFDescriptor(Descriptor):
    """Random Fourier features of low-dimensional points (n, in_dim), unit rows of width dim."""

    # TorchScript generators are labelled "image" whatever they return; the shape check in
    # `embed` is what decides whether the samples are points.
    accepts = ("embedding", "image")

    def __init__(self, *, dim: int, bandwidth: float, in_dim: int, seed: int):
        super().__init__("rff", dict(dim=dim, bandwidth=bandwidth, in_dim=in_dim, seed=seed))
        if dim % 2:
            raise ConfigError(f"descriptor 'rff': dim={dim} must be even (a cos and a sin per frequency)")
        rng = np.random.default_rng([seed, 7_001])
        self.in_dim, self.n_freq, self.bandwidth = in_dim, dim // 2, bandwidth
        self.W = rng.standard_normal((in_dim, self.n_freq)) / bandwidth
        self.b = rng.uniform(0, 2 * np.pi, self.n_freq)

    def embed(self, samples: np.ndarray) -> np.ndarray:
        """Unit rows f(x) (float32, (n, dim)) for points (n, in_dim)."""
        x = np.asarray(samples)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ConfigError(f"descriptor 'rff' needs points of shape (n, {self.in_dim}); got {x.shape}: use it "
                              "for low-dimensional samples (or set -D in_dim=)")
        # float64 phases: |W x| reaches hundreds for small bandwidths, where float32 loses the angle.
        ph = x.astype(np.float64) @ self.W + self.b
        return (np.concatenate([np.cos(ph), np.sin(ph)], axis=1) / np.sqrt(self.n_freq)).astype(np.float32)


def kernel(x: np.ndarray, y: np.ndarray, bandwidth: float) -> np.ndarray:
    """The Gaussian kernel exp(-|x - y|^2 / (2 h^2)) that <f(x), f(y)> approximates (row-wise)."""
    return np.exp(-((np.asarray(x, np.float64) - y) ** 2).sum(-1) / (2 * bandwidth ** 2))


def distance_to_radius(d: float | np.ndarray, bandwidth: float) -> np.ndarray:
    """Euclidean r whose kernel gives angular distance d (d in [0, 0.5)): r = h sqrt(-2 ln cos(pi d))."""
    return bandwidth * np.sqrt(-2.0 * np.log(np.cos(np.pi * np.asarray(d, np.float64))))


@DESCRIPTORS.register("rff", {
    "dim": Option(int, 256, "output width (2 x frequencies); cosine error ~ 1/sqrt(dim)", **_pos),
    "bandwidth": Option(float, 1.0, "Gaussian kernel bandwidth h; d0=0.25 <-> Euclidean r = 0.83 h", **_pos),
    "in_dim": Option(int, 2, "dimension of the input points", **_pos),
    "seed": Option(int, 0, "seed of the random frequencies"),
}, help="random Fourier features of low-dimensional points (toy worlds): cosine ~ Gaussian kernel")
def _rff(*, dim, bandwidth, in_dim, seed):
    return RFFDescriptor(dim=dim, bandwidth=bandwidth, in_dim=in_dim, seed=seed)
