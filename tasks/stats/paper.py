"""The seed-000 test: is the worst-case curve outside the pointwise band of random anchors?

Kept for fidelity with the paper. Its error rate is NOT controlled: it compares a
selected maximum with random anchors, pointwise at every radius (see docs/statistics.md).
"""
from __future__ import annotations

import numpy as np


def top_anchors(counts: np.ndarray, p: int) -> np.ndarray:
    """Indices of the p largest counts; ties go to the lower index so the choice is deterministic."""
    counts = np.asarray(counts)
    order = np.lexsort((np.arange(len(counts)), -counts))
    return order[:p]


def reference_anchors(seed: int, m: int, q: int) -> np.ndarray:
    """q distinct random rows of S (a pure function of the seed)."""
    rng = np.random.default_rng([seed, 0x5EF])
    return np.sort(rng.choice(m, size=q, replace=False))


def pointwise_band(ref_curves: np.ndarray, alpha: float):
    """Pointwise [alpha/2, 1-alpha/2] quantiles and median of reference curves, per radius."""
    ref = np.asarray(ref_curves, np.float64)
    low, med, high = np.quantile(ref, [alpha / 2, 0.5, 1 - alpha / 2], axis=0)
    return low, high, med


def paper_test(obs_curve: np.ndarray, ref_curves: np.ndarray, alpha: float) -> dict:
    """Reject when an R_obs curve leaves the pointwise band at any radius (seed 000, Algorithm 1).

    `obs_curve` is one curve (R,) or the p curves of R_obs (p, R); with p > 1 the test
    rejects when any of them leaves (`reject_each` says which). `radii_above` /
    `radii_below` count the radii of the first (the worst-case) curve.
    """
    low, high, med = pointwise_band(ref_curves, alpha)
    obs = np.atleast_2d(np.asarray(obs_curve, np.float64))
    above, below = obs > high, obs < low
    each = (above | below).any(axis=1)
    out = {"reject": bool(each.any()), "alpha": alpha,
           "radii_above": int(above[0].sum()), "radii_below": int(below[0].sum()),
           "band": {"low": low.tolist(), "high": high.tolist(), "median": med.tolist()}}
    if len(obs) > 1:
        out["reject_each"] = [bool(e) for e in each]
    return out


def population_mccs(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, seed 001 eq. 8) of MCCS over the anchors."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
