"""Kernel Inception Distance (Binkowski, Sutherland, Arbel, Gretton, ICLR 2018, "Demystifying
MMD GANs"), computed as torch-fidelity computes it (torch_fidelity/metric_kid.py).

Kernel: k(x, y) = (gamma <x, y> + coef0)^degree, by default degree 3, gamma = 1/d,
coef0 = 1, i.e. (x.y / d + 1)^3. For two subsets X, Y of m rows each, the
unbiased estimator of MMD^2:

    MMD^2_u = [sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)] / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2

(torch-fidelity's mmd_est="unbiased": the cross term keeps its diagonal).
Subsets: `subsets` times (default 100), X = real[rng.choice(N, m, replace=False)]
then Y = fake[rng.choice(M, m, replace=False)] with one
``numpy.random.RandomState(seed)`` (torch-fidelity's default seed is 2020, m = 1000);
KID is the mean of the subset values and kid_std their population std (ddof 0).

Differences, on purpose: the kernel sums run in float64 (torch-fidelity computes
in the features' dtype, float32, whose rounding shows in the 6th-7th digit of the
cancelling sums), and when a set has fewer than m rows, m becomes the smaller set
size instead of an error (the subset size used is returned).
"""
from __future__ import annotations

import sys

import numpy as np

__all__ = ["kid", "mmd2_unbiased", "KID_SUBSETS", "KID_SUBSET_SIZE", "KID_SEED"]

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020


def _poly(x, y, degree, gamma, coef0):
    # The reference form (any degree): gamma scales the m x d rows, not the m x m products.
    k = (x * gamma) @ y.T
    k += coef0
    return k ** degree


def mmd2_unbiased(x, y, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 of two equal-size row sets under the polynomial kernel (module docstring), float64."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m = x.shape[0]
    if y.shape[0] != m or m < 2 or x.ndim != 2 or y.shape[1:] != x.shape[1:]:
        raise ValueError(f"mmd2_unbiased needs two (m, d) sets with m >= 2, got {x.shape} and {y.shape}")
    g = 1.0 / x.shape[1] if gamma is None else float(gamma)
    if float(degree).is_integer() and 1 <= degree <= 8 and g > 0:
        # k(x, x') = (<s x, s x'> + c)^degree with s = sqrt(gamma): `a @ a.T` of one array is a BLAS
        # syrk (half the GEMM), and the off-diagonal sum of a symmetric matrix is twice its upper triangle.
        s = np.sqrt(g)
        xs, ys = x * s, y * s
        d, c = int(degree), float(coef0)
        # numba loads here, not on import: the CLI's parser reads this module's constants.
        from modeaudit.tasks.metrics.kid_sums import poly_sum
        off = 2.0 * (poly_sum(xs @ xs.T, c, d, True) + poly_sum(ys @ ys.T, c, d, True))
        return float(off / (m * (m - 1)) - 2.0 * poly_sum(xs @ ys.T, c, d, False) / (m * m))
    kxx = _poly(x, x, degree, g, coef0)
    kyy = _poly(y, y, degree, g, coef0)
    kxy = _poly(x, y, degree, g, coef0)
    off = (kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))
    return float(off / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


# Rows of one set gathered from a file at a time for KID's subsets (float32).
GATHER_BYTES = 1 << 28


def _subset(x, ids, gathered):
    if gathered is None:
        return x[ids]
    all_ids, rows = gathered
    return rows[np.searchsorted(all_ids, ids)]


def kid(real, fake, *, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, seed: int = KID_SEED) -> dict:
    """{'kid', 'kid_std', 'kid_subsets', 'kid_subset_size'}: mean and std of MMD^2_u over random subsets.

    real, fake: (n, d) arrays (or anything np.asarray takes), or FeatureFiles (tasks/metrics/rows.py)."""
    # Without the rows module loaded there is no FeatureFile (and this module stays numpy-only).
    rows_mod = sys.modules.get("modeaudit.tasks.metrics.rows")
    in_file = [rows_mod is not None and isinstance(x, rows_mod.FeatureFile) for x in (real, fake)]
    real, fake = (x if f else np.asarray(x) for x, f in zip((real, fake), in_file))
    sr, sf = tuple(real.shape), tuple(fake.shape)
    if len(sr) != 2 or len(sf) != 2 or sr[1] != sf[1]:
        raise ValueError(f"KID needs two (n, d) sets of one width, got {sr} and {sf}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(int(subset_size), sr[0], sf[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows per set; got {sr[0]} real and {sf[0]} fake")
    rng = np.random.RandomState(seed)
    picks = [(rng.choice(sr[0], m, replace=False), rng.choice(sf[0], m, replace=False)) for _ in range(subsets)]
    # A set kept in a file (tasks/metrics/rows.FeatureFile) is read only at the rows the subsets
    # use, in one sequential pass per batch of subsets whose rows fit GATHER_BYTES: memory stays
    # bounded whatever the set's and the subsets' sizes.
    per_batch = max(1, GATHER_BYTES // (4 * max(1, sr[1]) * m)) if any(in_file) else subsets
    vals = np.empty(subsets)
    for b0 in range(0, subsets, per_batch):
        batch = picks[b0:b0 + per_batch]
        used = {}
        for j, x in enumerate((real, fake)):
            if in_file[j]:
                ids = np.unique(np.concatenate([p[j] for p in batch]))
                used[j] = (ids, x.take(ids))
        for s, (ir, jf) in enumerate(batch, start=b0):
            x, y = (_subset(v, ids, used.get(j)) for j, (v, ids) in enumerate(((real, ir), (fake, jf))))
            vals[s] = mmd2_unbiased(x, y, degree, gamma, coef0)
    return {"kid": float(vals.mean()), "kid_std": float(vals.std()), "kid_subsets": int(subsets),
            "kid_subset_size": m}
