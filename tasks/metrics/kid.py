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

import math
import sys
from concurrent.futures import ThreadPoolExecutor

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


# Rows (of each set) in one tile of the whole-matrix path. A constant: the tiling fixes the order in which
# every subset's sum is added up, so a set read from a file gives the bits of the same rows as an array.
GRAM_TILE = 1024


# The whole-matrix path keeps each set's subset memberships as an (n, subsets) float64 matrix: at most this many
# bytes a set (a fixed constant, not the gather budget: the path taken must not depend on how a set is read).
# With a tile's (tile, subsets) products beside them the path's peak is about four times this.
MEMBERSHIP_BYTES = 1 << 28


def _whole_matrices_cheaper(n_r: int, n_f: int, d: int, m: int, subsets: int) -> bool:
    """Whether forming the three kernel matrices of the whole sets once costs less than forming every
    subset's, counted in multiply-adds: d + 3 a kernel value, and for the whole matrices `subsets` more
    (each value is multiplied into every subset's membership column).

    Subsets overlap when the sets hold few more rows than m: 100 subsets of 1000 from 3000-row sets
    form each kernel value ~11 times over. At the defaults the whole matrices win below ~7500 rows a
    set at 128 columns and ~9700 at 2048. Decided from the sizes only, so a set
    given as a file and the same rows given as an array take the same path, and give the same value."""
    if 8 * max(n_r, n_f) * subsets > MEMBERSHIP_BYTES:
        return False
    whole = (0.5 * n_r * n_r + 0.5 * n_f * n_f + float(n_r) * n_f) * (d + 3 + subsets)
    per_subset = 2.0 * subsets * m * m * (d + 3)
    return whole < per_subset


def _tile_reader(x, in_file: bool, scale: float):
    """rows(lo, hi) -> float64 rows [lo, hi) times `scale` (the bits of mmd2_unbiased's x * sqrt(gamma))."""
    if in_file and x.shape[0] * x.shape[1] * 4 <= GATHER_BYTES:
        x, in_file = x.read(), False       # one read; a larger file is read by tile (the OS caches it)

    def rows(lo: int, hi: int) -> np.ndarray:
        return np.asarray(x.read(lo, hi) if in_file else x[lo:hi], dtype=np.float64) * scale
    return rows


def _subset_sums(rows_x, n_x: int, z_x: np.ndarray, rows_y, n_y: int, z_y: np.ndarray, coef0: float,
                 degree: int, same: bool) -> np.ndarray:
    """For every subset s: the sum of k(x_i, y_j) over the rows i with z_x[i, s] = 1 and j with
    z_y[j, s] = 1 (0/1 membership columns), i != j when `same` (x and y one set, z_x is z_y).

    The kernel matrix is formed tile by tile, once (one triangle of tiles when `same`, the others
    counted twice), never held whole; a tile adds the diagonal of z_x^T K z_y to the sums: one GEMM
    (K z_y), then each subset's column of it weighted by z_x and summed."""
    from modeaudit.tasks.metrics.kid_sums import poly_in_place
    sums = np.zeros(z_x.shape[1])
    for a in range(0, n_x, GRAM_TILE):
        a1 = min(a + GRAM_TILE, n_x)
        xa = rows_x(a, a1)
        for b in range(a if same else 0, n_y, GRAM_TILE):
            b1 = min(b + GRAM_TILE, n_y)
            diagonal = same and b == a
            k = xa @ (xa if diagonal else rows_y(b, b1)).T     # a @ a.T: BLAS's symmetric update
            poly_in_place(k, coef0, degree)
            if diagonal:
                # Zeroed, not summed and subtracted: k(x, x) can exceed the off-diagonal values by many
                # orders (long rows, high degrees), and the subtraction would cancel the digits that count.
                np.fill_diagonal(k, 0.0)
            part = (z_x[a:a1] * (k @ z_y[b:b1])).sum(axis=0)
            sums += part if (diagonal or not same) else 2.0 * part
    return sums


def _membership(picks: list, j: int, n: int) -> np.ndarray:
    """(n, subsets) float64: 1 where row i is in subset s of set j (picks[s][j])."""
    z = np.zeros((n, len(picks)))
    for s, p in enumerate(picks):
        z[p[j], s] = 1.0
    return z


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
    g = 1.0 / sr[1] if gamma is None else float(gamma)
    if (float(degree).is_integer() and 1 <= degree <= 8 and g > 0
            and _whole_matrices_cheaper(sr[0], sf[0], sr[1], m, subsets)):
        vals = _whole_matrix_values(real, fake, in_file, picks, m, np.sqrt(g), float(coef0), int(degree))
    else:
        vals = _per_subset_values(real, fake, in_file, picks, m, degree, gamma, coef0)
    return {"kid": float(vals.mean()), "kid_std": _std(vals), "kid_subsets": int(subsets),
            "kid_subset_size": m}


def _std(vals: np.ndarray) -> float:
    """Population std of the subset values; of the values over their largest |value| (times it) where the squares
    overflow (features near float32's limit give MMD^2 ~1e226): finite wherever the values are."""
    with np.errstate(over="ignore", invalid="ignore"):
        sd = float(vals.std())
    if math.isfinite(sd) or not np.all(np.isfinite(vals)):
        return sd
    top = float(np.abs(vals).max())
    return top * float((vals / top).std())


def _whole_matrix_values(real, fake, in_file, picks, m: int, scale: float, c: float, d: int) -> np.ndarray:
    """Every subset's MMD^2_u from the whole sets' kernel matrices, formed once (`_subset_sums`)."""
    n_r, n_f = real.shape[0], fake.shape[0]
    rows_r, rows_f = (_tile_reader(x, f, scale) for x, f in zip((real, fake), in_file))
    idx_r, idx_f = _membership(picks, 0, n_r), _membership(picks, 1, n_f)
    jobs = ((rows_r, n_r, idx_r, rows_f, n_f, idx_f, c, d, False),      # the cross matrix: half the work
            (rows_r, n_r, idx_r, rows_r, n_r, idx_r, c, d, True),
            (rows_f, n_f, idx_f, rows_f, n_f, idx_f, c, d, True))
    if _parallel_ok() and not any(in_file):
        # Two threads: the cross matrix on one, the two within-set triangles on the other. Each
        # call's own order of summation is unchanged, so the bits are those of the serial run.
        with ThreadPoolExecutor(2) as ex:
            cross = ex.submit(_subset_sums, *jobs[0])
            xx = _subset_sums(*jobs[1])
            within = xx + _subset_sums(*jobs[2])
            cross = cross.result()
    else:
        cross = _subset_sums(*jobs[0])
        within = _subset_sums(*jobs[1]) + _subset_sums(*jobs[2])
    return within / (m * (m - 1)) - 2.0 * cross / (m * m)


def _per_subset_values(real, fake, in_file, picks, m: int, degree, gamma, coef0) -> np.ndarray:
    """Every subset's MMD^2_u from its own kernel matrices (`mmd2_unbiased`).

    A set kept in a file (tasks/metrics/rows.FeatureFile) is read only at the rows the subsets
    use, in one sequential pass per batch of subsets whose rows fit GATHER_BYTES: memory stays
    bounded whatever the set's and the subsets' sizes."""
    subsets = len(picks)
    per_batch = max(1, GATHER_BYTES // (4 * max(1, real.shape[1]) * m)) if any(in_file) else subsets
    vals = np.empty(subsets)
    for b0 in range(0, subsets, per_batch):
        batch = picks[b0:b0 + per_batch]
        used = {}
        for j, x in enumerate((real, fake)):
            if in_file[j]:
                ids = np.unique(np.concatenate([p[j] for p in batch]))
                used[j] = (ids, x.take(ids))

        def one(s: int) -> None:
            ir, jf = picks[s]
            x, y = (_subset(v, ids, used.get(j)) for j, (v, ids) in enumerate(((real, ir), (fake, jf))))
            vals[s] = mmd2_unbiased(x, y, degree, gamma, coef0)

        from modeaudit.tasks.join.threads import run_in_threads
        # Each subset's value is computed alone, with the same shapes and a one-thread BLAS, whichever
        # thread takes it: the same bits as one after the other.
        run_in_threads(one, range(b0, b0 + len(batch)), _compute_threads() if _parallel_ok() else 1)
    return vals


def _parallel_ok() -> bool:
    """Whether KID may spread its BLAS products over threads: only when numpy's BLAS runs one thread a call
    (a Dask worker of this tool pins it), so every product's bits are those of a serial run. With a
    multi-threaded BLAS (`modeaudit metrics` in its own process) BLAS already uses the cores, and calls
    from several threads at once could be given fewer threads each, and other bits."""
    from modeaudit.tasks.join.threads import blas_threads
    return _compute_threads() > 1 and blas_threads() == 1


def _compute_threads() -> int:
    from modeaudit.tasks.join.threads import compute_threads
    return compute_threads()
