"""2-D toy worlds with ground truth: where the modes are, how wide, how heavy.

Worlds (`WORLDS`, `get_world`):

* ``ring8`` -- seed 003: eight Gaussians at (2 cos(i pi/4), 2 sin(i pi/4)), sd 0.001, equal
  weights. (Seed 003 prints ``2cos`` for both coordinates, which would put every mode on the
  diagonal; the ring of Metz et al. that it cites uses cos and sin.)
* ``grid25`` -- seed 003: 25 Gaussians at (2i, 2j), i, j in -2..2, sd 0.0025, equal weights.
* ``ring8-imbalanced`` -- the ring with every odd mode 10x rarer than the even ones (weights
  10:1, so a rare mode carries 1/44 of the mass): seed 004's "smaller mode M2" setting.
* ``moons`` -- seed 002: scikit-learn's ``make_moons`` without noise (two half circles of
  radius 1). A moon is a curve, not a Gaussian, so its "mode" is the arc: ``means`` holds the
  arcs' midpoints for reference only, and a point belongs to a moon when its distance to the
  arc is within 3 * ``sd`` with the nominal ``sd`` = 0.01 (our choice: the seed has no noise
  and no scoring rule).

Every world is deterministic given a seed (`ToyWorld.sample`) and also maps standard-normal
latents to points (`ToyWorld.from_latents`: z[0] picks the mode through its normal CDF, z[1:3]
place the point within it), so it can be audited as a generator (`toy:WORLD`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from modeaudit.tasks.registry import ConfigError


@dataclass(frozen=True)
class ToyWorld:
    """A 2-D world: modes (means, sds, weights) and its kind ("mixture" or "moons")."""

    name: str
    means: np.ndarray      # (k, 2)
    sds: np.ndarray        # (k,)
    weights: np.ndarray    # (k,), sums to 1
    kind: str = "mixture"

    @property
    def n_modes(self) -> int:
        """Number of modes."""
        return len(self.weights)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """n points (float32, (n, 2)) drawn from the world; a pure function of (n, seed)."""
        if self.kind == "moons":
            from sklearn.datasets import make_moons
            x, _ = make_moons(n_samples=n, noise=0.0, shuffle=True, random_state=seed)
            return x.astype(np.float32)
        rng = np.random.default_rng([seed, 20261202])
        k = rng.choice(self.n_modes, size=n, p=self.weights)
        return (self.means[k] + rng.standard_normal((n, 2)) * self.sds[k, None]).astype(np.float32)

    def from_latents(self, z: np.ndarray) -> np.ndarray:
        """Points for standard-normal latents (n, >= 3): the world's law when z ~ N(0, I)."""
        z = np.asarray(z, np.float64)
        u = ndtr(z[:, 0])
        cum = np.cumsum(self.weights)
        k = np.minimum(np.searchsorted(cum, u, side="right"), self.n_modes - 1)
        if self.kind == "moons":
            # Within the moon, the position along the arc is uniform: u re-scaled inside its cell.
            lo = np.where(k > 0, cum[np.maximum(k - 1, 0)], 0.0)
            t = np.clip((u - lo) / self.weights[k], 0.0, 1.0) * np.pi
            return _moon_points(k, t).astype(np.float32)
        return (self.means[k] + z[:, 1:3] * self.sds[k, None]).astype(np.float32)

    def assign(self, points: np.ndarray) -> np.ndarray:
        """Mode index of each point, or -1 when it lies within 3 sd of no mode (the quality rule)."""
        x = np.asarray(points, np.float64)
        if self.kind == "moons":
            dist = np.stack([_moon_distance(x, i) for i in range(2)], axis=1)
        else:
            dist = np.sqrt(((x[:, None, :] - self.means[None]) ** 2).sum(-1))
        near = dist <= 3.0 * self.sds[None]
        # The 3-sd balls of these worlds never overlap; nearest-by-sd-units keeps it defined anyway.
        idx = np.argmin(np.where(near, dist / self.sds[None], np.inf), axis=1)
        return np.where(near.any(axis=1), idx, -1)

    def truth(self) -> dict:
        """The ground truth as plain JSON."""
        return {"world": self.name, "kind": self.kind, "means": self.means.tolist(), "sds": self.sds.tolist(),
                "weights": self.weights.tolist()}


def _moon_points(k: np.ndarray, t: np.ndarray) -> np.ndarray:
    # make_moons: outer (k=0) = (cos t, sin t); inner (k=1) = (1 - cos t, 0.5 - sin t), t in [0, pi].
    x = np.where(k == 0, np.cos(t), 1.0 - np.cos(t))
    y = np.where(k == 0, np.sin(t), 0.5 - np.sin(t))
    return np.stack([x, y], axis=1)


def _moon_distance(x: np.ndarray, k: int) -> np.ndarray:
    # Distance to a half circle of radius 1: to the circle where the angle is inside the arc,
    # else to the nearer end point.
    c = np.array([0.0, 0.0]) if k == 0 else np.array([1.0, 0.5])
    sgn = 1.0 if k == 0 else -1.0
    d = x - c
    r = np.sqrt((d ** 2).sum(1))
    on_arc = sgn * d[:, 1] >= 0
    ends = np.array([[c[0] + 1.0, c[1]], [c[0] - 1.0, c[1]]])
    to_end = np.min(np.sqrt(((x[:, None, :] - ends[None]) ** 2).sum(-1)), axis=1)
    return np.where(on_arc, np.abs(r - 1.0), to_end)


def _ring8(sd: float = 0.001, imbalanced: bool = False) -> ToyWorld:
    a = np.arange(8) * np.pi / 4
    w = np.where(np.arange(8) % 2 == 1, 1.0, 10.0) if imbalanced else np.ones(8)
    return ToyWorld("ring8-imbalanced" if imbalanced else "ring8", np.stack([2 * np.cos(a), 2 * np.sin(a)], 1),
                    np.full(8, sd), w / w.sum())


def _grid25(sd: float = 0.0025) -> ToyWorld:
    g = np.array([(2.0 * i, 2.0 * j) for i in range(-2, 3) for j in range(-2, 3)])
    return ToyWorld("grid25", g, np.full(25, sd), np.full(25, 1 / 25))


def _moons(sd: float = 0.01) -> ToyWorld:
    return ToyWorld("moons", np.array([[0.0, 1.0], [1.0, -0.5]]), np.full(2, sd), np.full(2, 0.5), kind="moons")


WORLDS = {
    "ring8": _ring8,
    "grid25": _grid25,
    "ring8-imbalanced": lambda sd=0.001: _ring8(sd, imbalanced=True),
    "moons": _moons,
}


def get_world(name: str, sd: float | None = None) -> ToyWorld:
    """The named world; `sd` (> 0) replaces its default mode width (None keeps the seed's)."""
    if name not in WORLDS:
        raise ConfigError(f"unknown toy world {name!r}; choose one of: {', '.join(WORLDS)}")
    if sd is not None and not (np.isfinite(sd) and sd > 0):
        raise ConfigError(f"toy world {name!r}: sd={sd} must be > 0 (or leave it unset for the seed's value)")
    return WORLDS[name]() if sd is None else WORLDS[name](sd)
