"""The seed-000 test: is the worst-case curve outside the pointwise band of random anchors?

Kept for fidelity with the paper. Its error rate is NOT controlled: it compares a
selected maximum with random anchors, pointwise at every radius (see docs/statistics.md).
"""
from __future__ import annotations

import numpy as np

from modeaudit.tasks.join.kernels import arccos_over_pi


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


def pairs_at_d0(S_rows: np.ndarray, rows: np.ndarray, d0: float, block: int = 8192) -> np.ndarray:
    """For each row i in `rows`: #{j != i : d(S_i, S_j) == d0 exactly}, int64.

    Decided with the float64 reference kernel's expression,
    arccos(clip(<a, b>, -1, 1)) / pi (`range_counts_reference`), so a pair counts
    here exactly when the reference kernel puts it on the d0 boundary. Cost: one
    float64 GEMM of len(rows) x m x D (the self-join's pairs for these rows only).
    """
    S = np.asarray(S_rows)
    rows = np.asarray(rows, np.int64)
    a = S[rows].astype(np.float64)
    out = np.zeros(len(rows), np.int64)
    c0 = np.cos(np.pi * d0)
    for lo in range(0, S.shape[0], block):
        p = S[lo:lo + block].astype(np.float64)
        dot = a @ p.T
        # arccos is the costly part; only inner products within far more than a few ulps
        # of cos(pi d0) can map to exactly d0, so only those are evaluated.
        hit = np.abs(dot - c0) <= 1e-9
        i, j = np.nonzero(hit)
        hit[i, j] = arccos_over_pi(dot[i, j]) == d0
        own = (rows >= lo) & (rows < lo + p.shape[0])
        hit[np.flatnonzero(own), rows[own] - lo] = False  # self pairs are excluded by index, as in the self-join
        out += hit.sum(axis=1)
    return out


def ranking_counts(S_rows: np.ndarray, counts: np.ndarray, d0: float, tie_weight: float, p: int,
                   block: int = 256) -> tuple[np.ndarray, dict[int, int]]:
    """Counts for ranking the dense-mode search with pairs exactly at d0 weighted by `tie_weight`.

    `counts` are the self-join's inclusive counts N(I, S minus I, d0) (a pair at
    exactly d0 counts 1). Seed 000's Eq. 2 sums (1 + sgn(d0 - d)) / 2, i.e. 1/2 for
    such a pair: tie_weight = 0.5. The weighted count is
    counts - (1 - tie_weight) * pairs_at_d0, never above the inclusive one, so
    rows are re-checked (`pairs_at_d0`, float64) in descending order of their
    inclusive count, `block` at a time, until the top p and every row tied with
    the top are settled: no unchecked row's inclusive count (an upper bound) can
    reach the p-th weighted count, nor the top one. Unchecked rows keep their
    inclusive counts. With real data pairs exactly at d0 are measure-zero, so this
    costs one float64 pass of `block` rows against S (block x m x D).

    Returns (float64 ranking counts, {row: pairs at d0} for the checked rows).
    With tie_weight == 1 nothing is re-checked and the counts are returned as float64.
    """
    counts = np.asarray(counts)
    out = counts.astype(np.float64)
    if tie_weight == 1.0:
        return out, {}
    order = np.lexsort((np.arange(len(counts)), -counts))
    checked: dict[int, int] = {}
    done = 0
    while done < len(order) and counts[order[done]] > 0:  # a row with no neighbour has no pair at d0
        rows = order[done:done + block]
        at = pairs_at_d0(S_rows, rows, d0)
        out[rows] -= (1.0 - tie_weight) * at
        checked.update({int(r): int(a) for r, a in zip(rows, at)})
        done += len(rows)
        if done >= p and done < len(order):
            pth = np.sort(out[order[:done]])[::-1][p - 1]
            if pth > counts[order[done]]:  # strict: an unchecked row can neither enter nor tie
                break
    return out, checked
