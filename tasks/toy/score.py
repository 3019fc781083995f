"""Ground-truth scores of generated 2-D points on a toy world (seed 003, section 5.1).

* **quality** -- share of samples within 3 sd of some mode's mean (seed 003, footnote 2,
  after Meulemeester et al.).
* **modes covered** -- seed 003 counts "modes covered" after Metz et al. / Elfeki et al. but
  gives no threshold. Rule used here (PacGAN's, made a share so it does not depend on n): a mode
  is covered when at least ``min_share`` (default 20 / 2500 = 0.8 %) of the samples, and at
  least one, lie within 3 sd of its mean. The rare modes of ``ring8-imbalanced`` (2.3 % of the
  mass) stay above that threshold when generated at their true rate.
* **reverse KL** -- seed 003: D_KL(model || data) = sum_i p_i log(p_i / (1/m)), p_i the share of
  *all* samples assigned to mode i, so sum_i p_i < 1 when there are poor points and the value
  can be negative. For unequal weights w_i the 1/m becomes w_i (the same formula for the
  uniform worlds). Modes with p_i = 0 contribute 0 (the 0 log 0 convention).
* **mode shares** -- p_i per mode (the histogram of seed 003's Fig. 3, fourth column).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from modeaudit.tasks.registry import ConfigError
from modeaudit.tasks.toy.worlds import ToyWorld

MIN_SHARE = 20 / 2500


def score_points(world: ToyWorld, points: np.ndarray, min_share: float = MIN_SHARE) -> dict:
    """modes_covered, quality, reverse_kl and mode_shares of points (n, 2) on a world."""
    x = np.asarray(points)
    if x.ndim != 2 or x.shape[1] != 2 or len(x) == 0:
        raise ConfigError(f"toy scores need a non-empty array of 2-D points (n, 2); got shape {x.shape}: "
                          "score a generator whose outputs are 2-D points")
    if not np.isfinite(x).all():
        raise ConfigError("toy scores: the samples contain NaN or Inf; check the generator")
    n = len(x)
    idx = world.assign(x)
    counts = np.bincount(idx[idx >= 0], minlength=world.n_modes)
    p = counts / n
    need = max(1, int(np.ceil(min_share * n)))
    nz = p > 0
    rkl = float(np.sum(p[nz] * np.log(p[nz] / world.weights[nz])))
    return {"world": world.name, "n": int(n), "modes_total": int(world.n_modes),
            "modes_covered": int((counts >= need).sum()), "covered_min_count": need,
            "quality": float((idx >= 0).mean()), "reverse_kl": rkl, "mode_shares": p.tolist(),
            "mode_counts": counts.tolist(), "true_weights": world.weights.tolist()}


def write_scores(out: str | Path, points: np.ndarray, metrics: dict) -> None:
    """samples.npy (one row a 2-D point) and metrics.json in DIR, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".samples.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(points, np.float32))
    os.replace(tmp, out / "samples.npy")
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, out / "metrics.json")
