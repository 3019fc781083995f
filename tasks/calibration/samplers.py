"""Black-box calibration: reshape the latent sampler so a dense mode gets a typical mass.

Both approaches of seed 001 (section 3.2.2) act on the latent sampler only: the
model G and the descriptor f stay black boxes. Inputs come from a finished audit:
latents Z (N, k) and unit embeddings E (N, D) of the first N rows of T, the dense
modes (embeddings of the top distinct dense anchors, |D| x D), r0 (= d0), the
density p1_i of each mode (fraction of T within r0 of mode i) and the typical
density p2 (median over random reference anchors of the fraction of T within r0).
A row of T is *dense* when it lies within r0 of any mode.

Approach 1, cluster reshaping (seed 001 Alg. 1) -- `fit_cluster`
-----------------------------------------------------------------
k-means on Z (K clusters); per cluster k: n_k members, c_k dense members,
f_k = c_k / n_k, pi_k = n_k / N.

*How this differs from the paper.* Alg. 1 sets w_k = 1 / c_k, which divides by
zero for every clean cluster (c_k = 0) -- i.e. for almost all of them -- and,
where it is finite, does not aim at any particular mass. Here
    w_k = 1 / (1 + lam * f_k)
so clean clusters keep w_k = 1 and a cluster is down-weighted in proportion to
how dense it is; lam >= 0 is found by bisection so that the calibrated dense share
    sum_k pi_k w_k f_k / sum_k pi_k w_k
equals the target |D| * p2 (each mode brought down to a typical identity's mass).
The share is non-increasing in lam (a weighted mean of f under weights that fall
faster for larger f), so bisection is exact; lam = 0 when the share already is at
or below the target, and lam is capped at `lam_max` (then `target_reached` is 0).
Which cells are reshaped (`reshape`, default "excess"): only those whose dense
count is significantly above what the collapse-free model predicts. Under the null
a row falls into the modes' balls with probability |D| * p2 (a typical ball's mass
per mode), so cell k's dense count is Binomial(n_k, |D| p2); the cell is reshaped
when P(X >= c_k) < alpha / K, and lam is solved over those cells only (the others
keep w = 1, with the natural variation of density across cells). Half of the
centroids (at most #dense / 20) are fitted to the dense rows' latents and the rest
to the other rows', so the cells follow the dense region instead of cutting it
(k-means on all latents puts the planted slab into most cells, each a few percent
dense). On the demo world this keeps FD to the collapse-free world below its value
before calibration (docs/calibration.md). reshape="all" is the previous behaviour
(every cell with a dense member, k-means on all latents).
Two samplers use these weights:

* "gmm" -- the paper's sampler: a Gaussian mixture whose component k is
  N(mean of Z in cluster k, covariance of Z in cluster k + ridge) and whose
  weights are pi_k w_k (normalised). With w = 1 the mixture has exactly the mean
  and covariance of Z. It is only an approximation of N(0, I): a component's
  Gaussian spills over its cell's border, so a clean cluster next to the dense
  region still puts mass into it, and the GMM's dense share is not controlled
  exactly (on synthetic:planted it lands at ~1.4x the target; audit the
  calibrated generator again to measure it).
* "cells" -- exact cell-wise rejection from N(0, I): propose z ~ N(0, I), find
  its nearest centroid k, accept with probability w_k / max(w). The accepted
  distribution is exactly N(0, I) reweighted by w over the Voronoi cells, so the
  expected dense share is the bisection's target (up to the sampling error of the
  cells' pi_k and f_k) and inside a cell the latents are N(0, I) restricted to it.

Approach 2, rejection sampling (seed 001 Alg. 2) -- `fit_rejection`
-------------------------------------------------------------------
Every proposal z ~ N(0, I) is accepted unless it falls into the dense region of
mode i, where it is accepted with probability a_i = min(1, p2 / p1_i) (the
smallest a_i when several regions hold it). Two ways to decide "in the region":

* "descriptor" -- the exact decision: x = G(z), e = f(x), in region i iff
  d(e, mode_i) <= r0. Costs one G + f evaluation per proposal (the accepted
  rows are generated again by the audit; G is deterministic, so they are equal).
* "latent" -- a proxy decided from z alone (no G, no f at sampling time), two kinds:
  - proxy "balls" (closest to the paper): the paper's convex hull of the
    latents near the mode has measure zero in high dimension, so use balls: Z_Im
    = latents of the `n_top` rows of T closest to mode i (the paper's experiment
    uses the top 1e2 of 1e6; n_top=None takes every row within r0, as Alg. 2's H
    does), and z is in region i if its distance to the nearest Z_Im latent is
    <= rho_i = the 90th percentile of the Z_Im points' distances to their nearest
    other Z_Im point. On synthetic:planted this covers only a small part of the
    dense region (recall ~0.1 with n_top=100, ~0.9 with every dense row but then
    precision ~0.3): nearest-neighbour geometry in latent space is too coarse
    (neighbour distances ~1 in 8-d at N = 2e4) and it only grows worse with k.
  - proxy "logistic" (default): a logistic regression of the dense label of mode
    i on features [z, z^2] (all of Z, positives and negatives), region = predicted
    probability >= a threshold chosen for the best F1 on Z. The region is then a
    half-space or an axis-aligned quadric -- it holds slabs (the planted mode is
    z[0] < Phi^-1(planted_prob)) and ellipsoids. On synthetic:planted it reaches
    precision and recall ~0.99 on fresh samples. Cost O(k) per proposal.
  `proxy_agreement` measures, on fresh samples, how closely a proxy matches the
  descriptor decision (precision, recall) and the calibrated dense share each
  decision achieves.

Measured on synthetic:planted (dim 32, 100 identities, planted_prob 0.1,
latent_dim 8; N = 2e4 rows of T, r0 = 0.25, one mode; p1 = 0.100, p2 = 0.00475,
a typical identity's share 0.009), planted share of 2e4 calibrated rows, before
0.100: gmm 0.0068 (no rejection), cells 0.0056 (acceptance 0.37: 44 of 64
k-means cells in 8-d are cut by the planted region's border, so clean mass is
reshaped too, clean_tv 0.50; K = 256: acceptance 0.56, clean_tv 0.35),
descriptor 0.0049 (acceptance 0.90), latent/logistic 0.0054 (acceptance 0.90,
precision/recall 0.997/0.993 against the descriptor), latent/balls 0.090
(precision 0.46, recall 0.15).

Counter-based rejection (determinism)
-------------------------------------
Row j of a calibrated sampler is a pure function of (seed, stream, j), whatever
the shard or batch: row j has its own sequence of proposals, attempt a being
latent_rows(seed, f"{stream}/try{a}", j, j+1) with coin
uniform_rows(seed, f"{stream}/u{a}", j, j+1); the first accepted attempt is row
j's latent. Work is vectorised (attempt 0 for all rows, attempt 1 for the rows
still rejected, ...) inside blocks aligned to global multiples of batch_size (an
option, hence part of the fingerprint), so even a network's or BLAS's
batch-dependent rounding sees the same batches whatever the shard. The "gmm"
sampler needs no rejection: row j's component comes from
uniform_rows(seed, f"{stream}/comp", j) and its Gaussian draw from
latent_rows(seed, f"{stream}/gauss", j). Attempts are capped (`max_attempts`,
a clear error beyond) and counted, so the acceptance rate and the cost per
accepted sample can be reported (`latents_with_attempts`, `stats`,
`acceptance_stats`).

Pure compute (numpy; scikit-learn only inside the fit functions); no Prefect.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np

from modeaudit.storage.layout import atomic_write_bytes, atomic_write_json

from modeaudit.tasks.models.generators import GENERATORS, Generator, build_generator
from modeaudit.tasks.registry import ConfigError, Option
from modeaudit.tasks.join.kernels import arccos_over_pi
from modeaudit.tasks.models.rng import latent_rows, uniform_rows

__all__ = [
    "METHODS",
    "CalibratedGenerator",
    "acceptance_stats",
    "cluster_share",
    "cluster_weights",
    "dense_mask",
    "densities",
    "fit_cluster",
    "fit_rejection",
    "load_params",
    "mode_hits",
    "params_checksum",
    "proxy_agreement",
    "save_params",
]

# method -> variants it can sample with
METHODS = {"cluster": ("gmm", "cells"), "rejection": ("descriptor", "latent")}
PROXIES = ("logistic", "balls")
_NO_REGION = -1e300          # logistic intercept of a mode with no (or only) dense rows


# ----------------------------------------------------------------------------
# dense decisions


def mode_hits(E, modes, r0: float) -> np.ndarray:
    """Bool (N, |D|): row n within r0 of mode i, decided in float64 with the join
    kernels' expression arccos(clip(<e, m>)) / pi <= r0."""
    E = np.asarray(E, np.float64)
    if E.ndim != 2:
        raise ValueError(f"embeddings must be 2-d, got shape {E.shape}")
    M = np.asarray(modes, np.float64).reshape(-1, E.shape[1])
    return arccos_over_pi(E @ M.T) <= r0


def dense_mask(E, modes, r0: float) -> np.ndarray:
    """Bool (N,): row within r0 of any mode."""
    return mode_hits(E, modes, r0).any(axis=1)


def densities(anchors, E, r0: float) -> np.ndarray:
    """Fraction of the rows of E within r0 of each anchor (exact counts, modeaudit.tasks.join.kernels.range_counts).

    p1 = densities(modes, E, r0); p2 = median(densities(random reference anchors, E, r0))."""
    from modeaudit.tasks.join.kernels import range_counts
    E = np.asarray(E)
    return range_counts(np.asarray(anchors), E, [float(r0)])[:, 0] / max(len(E), 1)


def _accept_from_hits(hits: np.ndarray, accept: np.ndarray) -> np.ndarray:
    """Acceptance probability per row: min a_i over the regions holding it, 1 outside all."""
    if hits.shape[1] == 0:
        return np.ones(hits.shape[0])
    return np.where(hits, accept[None, :], 1.0).min(axis=1)


def _check_inputs(Z, E, modes, r0):
    Z = np.asarray(Z, np.float64)
    E = np.asarray(E)
    modes = np.asarray(modes, np.float64)
    if Z.ndim != 2 or E.ndim != 2 or len(Z) != len(E) or len(Z) == 0:
        raise ValueError(f"Z (N, k) and E (N, D) must be 2-d with the same N > 0 rows; got {Z.shape} and {E.shape}")
    if modes.ndim != 2 or modes.shape[1] != E.shape[1] or len(modes) == 0:
        raise ValueError(f"modes must be (|D| >= 1, {E.shape[1]}), got shape {modes.shape}")
    if not (0 < r0 < 1):
        raise ValueError(f"r0 must be in (0, 1), got {r0}")
    if not (np.all(np.isfinite(Z)) and np.all(np.isfinite(modes))):
        raise ValueError("Z and modes must be finite")
    return Z, E, modes


# ----------------------------------------------------------------------------
# approach 1: cluster reshaping


def cluster_weights(lam: float, fracs, flagged=None) -> np.ndarray:
    """w_k = 1 / (1 + lam f_k) for the reshaped cells (all, or those `flagged`), 1 for the others."""
    f = np.asarray(fracs, np.float64)
    if flagged is not None:
        f = np.where(np.asarray(flagged, bool), f, 0.0)
    return 1.0 / (1.0 + lam * f)


def cluster_share(lam: float, pis, fracs, flagged=None) -> float:
    """Calibrated dense share sum(pi w f) / sum(pi w) with w = `cluster_weights` (flagged cells only, if given)."""
    fracs = np.asarray(fracs, np.float64)
    pw = np.asarray(pis, np.float64) * cluster_weights(lam, fracs, flagged)
    return float((pw * fracs).sum() / pw.sum())


def _solve_lam(pis, fracs, target, lam_max, flagged=None):
    if cluster_share(0.0, pis, fracs, flagged) <= target:
        return 0.0, True
    if cluster_share(lam_max, pis, fracs, flagged) > target:
        return float(lam_max), False
    lo, hi = 0.0, math.log1p(lam_max)           # bisection on t = log(1 + lam)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cluster_share(math.expm1(mid), pis, fracs, flagged) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return float(math.expm1(hi)), True


def _nearest(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared Euclidean; ||z||^2 drops out of the argmin)."""
    z = np.asarray(z, np.float64)
    d = (centroids * centroids).sum(axis=1)[None, :] - 2.0 * (z @ centroids.T)
    return np.argmin(d, axis=1)


def _excess_cells(counts, dense_counts, expected: float, alpha: float) -> np.ndarray:
    """Bool per cell: its dense count is significantly above what the collapse-free model predicts.

    Under the null a row lands in the modes' balls with probability `expected`
    (|D| typical balls' mass), so a cell of n_k rows holds Binomial(n_k, expected)
    dense rows; a cell is flagged when P(X >= c_k) < alpha / K (Bonferroni over the K cells).
    """
    from scipy.stats import binom
    n = np.asarray(counts, np.float64)
    c = np.asarray(dense_counts, np.float64)
    p = binom.sf(c - 1, n, min(1.0, max(expected, 0.0)))
    return (n > 0) & (c > 0) & (p < alpha / max(len(n), 1))


def _centroids(Z, dense, K: int, seed: int, reshape: str) -> np.ndarray:
    """k-means centroids of the latents; with reshape="excess" half of them are fitted to the dense rows.

    Cells fitted to all of Z are blind to the dense region: in 16-d latents the planted
    slab cuts most of 64 cells, each holding a few percent of dense rows next to clean
    mass (docs/calibration.md), so any cell-wise down-weighting reshapes the clean
    identities too. Fitting K_d = min(K // 2, #dense // 20) centroids to the dense rows
    and the rest to the clean rows gives cells that follow the dense region's shape.
    One k-means++ start per fit (scikit-learn's own default since 1.4): four starts, kept
    until 2026-12-03, cost four fits (4.8 s each for 40,000 16-d latents in 32 cells on one
    thread here) for a calibration that came out the same to two or three digits on the demo
    world (docs/calibration.md has it measured both ways).
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from modeaudit.tasks.join.threads import compute_threads
    n_dense = int(dense.sum())
    k_dense = min(K // 2, n_dense // 20) if reshape == "excess" else 0

    def centres(k: int, rows: np.ndarray) -> np.ndarray:
        return KMeans(n_clusters=k, n_init=1, random_state=seed).fit(rows).cluster_centers_

    with threadpool_limits(limits=compute_threads()):
        if k_dense < 1 or len(Z) - n_dense < K - k_dense:
            return centres(K, Z).astype(np.float64)
        cd, cc = centres(k_dense, Z[dense]), centres(K - k_dense, Z[~dense])
    return np.vstack([cd, cc]).astype(np.float64)


def fit_cluster(Z, E, modes, r0: float, p2: float, *, K: int = 64, seed: int = 0,
                ridge: float = 1e-4, lam_max: float = 1e6, reshape: str = "excess",
                alpha: float = 0.05) -> dict:
    """Cluster reshaping (seed 001 Alg. 1, with finite weights; see the module docstring).

    reshape="excess" (default): reshape only the cells whose dense count is
    significantly above the collapse-free expectation (|D| p2 per row; binomial,
    Bonferroni over the K cells at `alpha`); every other cell keeps w = 1, so the
    world's natural variation of density across cells is left alone, and half of
    the centroids are fitted to the dense rows (`_centroids`). reshape="all": the
    seed's Alg. 1 as before, k-means on all latents and every cell with a dense
    member down-weighted (raises FD to the collapse-free world on synthetic:planted).

    Returns numpy arrays and floats: centroids (K, k); pis, dense_frac, weights (K,);
    lam, target_share (= min(1, |D| p2)), share_before (dense share of Z),
    achieved_share_estimate (= the cells sampler's expected share on Z), target_reached
    (1/0); gmm_means (K, k), gmm_chol (K, k, k) (Cholesky factors of the
    covariances), gmm_weights (K,) (pi w normalised); cells_acceptance (expected
    acceptance of the cells sampler = sum pi w / max w); clean_tv (total variation
    between the non-dense mass's distribution over the cells before and after: how
    much the rest of the latent space is reshaped); reshaped (K,) 1/0 and n_reshaped (the
    cells whose weight may differ from 1), excess_only (1 for reshape="excess"). k-means runs on at most
    compute_threads() threads (oversubscribed OpenMP on busy cores is 5x slower).
    """
    Z, E, modes = _check_inputs(Z, E, modes, r0)
    N, k = Z.shape
    if not (1 <= K <= N):
        raise ValueError(f"K must be in [1, N={N}], got {K}")
    if reshape not in ("excess", "all"):
        raise ValueError(f"reshape must be 'excess' or 'all', got {reshape!r}")
    dense = dense_mask(E, modes, r0)
    centroids = _centroids(Z, dense, K, seed, reshape)
    # Cells are the Voronoi cells of the centroids (what the sampler uses), so the
    # labels are recomputed rather than taken from the fit.
    labels = _nearest(Z, centroids)
    n_k = np.bincount(labels, minlength=K).astype(np.float64)
    c_k = np.bincount(labels, weights=dense.astype(np.float64), minlength=K)
    fracs = np.divide(c_k, n_k, out=np.zeros(K), where=n_k > 0)
    pis = n_k / N
    target = min(1.0, len(modes) * float(p2))
    flagged = _excess_cells(n_k, c_k, target, alpha) if reshape == "excess" else None
    lam, reached = _solve_lam(pis, fracs, target, lam_max, flagged)
    w = cluster_weights(lam, fracs, flagged)

    # Gaussian mixture: member mean and covariance per cluster; small clusters
    # borrow the pooled within-cluster covariance so every factor exists.
    means = centroids.copy()
    covs = np.empty((K, k, k))
    pooled = np.zeros((k, k))
    for j in range(K):
        m = Z[labels == j]
        if len(m):
            means[j] = m.mean(axis=0)
            dm = m - means[j]
            covs[j] = dm.T @ dm / len(m)
            pooled += dm.T @ dm
    pooled /= N
    for j in range(K):
        if n_k[j] <= 2 * k:
            a = n_k[j] / (n_k[j] + 2 * k)
            covs[j] = a * covs[j] + (1 - a) * pooled
        covs[j] += ridge * np.eye(k)
    chol = np.linalg.cholesky(covs)
    gw = pis * w
    gw = gw / gw.sum()
    # How much the clean (non-dense) mass is reshaped, at cell resolution: total
    # variation between its distribution over the cells before and after.
    clean = pis * (1.0 - fracs)
    clean_tv = 0.5 * float(np.abs(clean / clean.sum() - clean * w / (clean * w).sum()).sum()) if clean.sum() > 0 else 0.0
    return {
        "centroids": centroids, "pis": pis, "dense_frac": fracs, "weights": w, "counts": n_k,
        "lam": float(lam), "target_share": float(target), "share_before": float(dense.mean()),
        "achieved_share_estimate": cluster_share(lam, pis, fracs, flagged), "target_reached": float(reached),
        "reshaped": (fracs > 0 if flagged is None else flagged).astype(np.float64),
        "n_reshaped": float((fracs > 0).sum() if flagged is None else flagged.sum()), "excess_only": float(reshape == "excess"),
        "r0": float(r0), "p2": float(p2), "n_modes": float(len(modes)),
        "gmm_means": means, "gmm_chol": chol, "gmm_weights": gw,
        "cells_acceptance": float((pis * w).sum() / w.max()), "clean_tv": clean_tv,
    }


# ----------------------------------------------------------------------------
# approach 2: rejection sampling


def _quad_features(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    return np.hstack([z, z * z])


def _logistic_region(coef, intercept, threshold, z) -> np.ndarray:
    """Bool (n, |D|): logistic proxy decision (score >= threshold on the logit scale)."""
    s = _quad_features(z) @ coef.T + intercept[None, :]
    return s >= threshold[None, :]


def _ball_trees(points, owner, n_modes):
    from scipy.spatial import cKDTree
    points = np.asarray(points, np.float64)
    return [cKDTree(points[owner == i]) if (owner == i).any() else None for i in range(n_modes)]


def _balls_region(trees, rho, z) -> np.ndarray:
    """Bool (n, |D|): distance to the nearest Z_Im latent of mode i <= rho_i."""
    z = np.asarray(z, np.float64)
    out = np.zeros((len(z), len(trees)), bool)
    for i, t in enumerate(trees):
        if t is not None:
            d, _ = t.query(z, k=1)
            out[:, i] = d <= rho[i]
    return out


def fit_rejection(Z, E, modes, r0: float, p1, p2: float, *, n_top: int | None = 100, seed: int = 0,
                  rho_quantile: float = 90.0, max_fit_rows: int = 200_000) -> dict:
    """Rejection sampling (seed 001 Alg. 2): parameters of the descriptor decision and both latent proxies.

    Returns: modes (|D|, D), p1 (|D|,), p2, r0, accept (|D|,) = min(1, p2/p1);
    proxy "balls": ball_points (P, k), ball_owner (P,), rho (|D|,);
    proxy "logistic": logit_coef (|D|, 2k), logit_intercept (|D|,), logit_threshold (|D|,);
    in-sample estimates on Z: share_before, descriptor_share_estimate,
    descriptor_acceptance, and for each proxy <proxy>_share_estimate,
    <proxy>_acceptance, <proxy>_precision, <proxy>_recall.
    """
    Z, E, modes = _check_inputs(Z, E, modes, r0)
    N, k = Z.shape
    M = len(modes)
    p1 = np.asarray(p1, np.float64).reshape(-1)
    if p1.shape != (M,) or not np.all(p1 > 0):
        raise ValueError(f"p1 must hold one positive density per mode ({M}), got {p1}")
    if not p2 > 0:
        raise ValueError(f"p2 must be > 0, got {p2}")
    accept = np.minimum(1.0, float(p2) / p1)
    hits = mode_hits(E, modes, r0)
    dense = hits.any(axis=1)
    sims = np.asarray(E, np.float64) @ modes.T

    # balls: the n_top closest rows per mode (or every row within r0)
    pts, owner, rho = [], [], np.zeros(M)
    for i in range(M):
        idx = np.flatnonzero(hits[:, i]) if n_top is None else np.argsort(-sims[:, i], kind="stable")[:n_top]
        P = Z[idx]
        if len(P) >= 2:
            from scipy.spatial import cKDTree
            d, _ = cKDTree(P).query(P, k=2)
            rho[i] = float(np.percentile(d[:, 1], rho_quantile))
        pts.append(P)
        owner.append(np.full(len(P), i, np.int64))
    ball_points, ball_owner = np.concatenate(pts), np.concatenate(owner)

    # logistic proxy on [z, z^2], one per mode, threshold for the best F1 on Z
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from modeaudit.tasks.join.threads import compute_threads
    rng = np.random.default_rng([seed, 8102])
    fit_idx = np.sort(rng.choice(N, max_fit_rows, replace=False)) if N > max_fit_rows else np.arange(N)
    F = _quad_features(Z[fit_idx])
    coef = np.zeros((M, 2 * k))
    intercept = np.full(M, _NO_REGION)
    thr = np.zeros(M)
    for i in range(M):
        y = hits[fit_idx, i]
        if y.all():
            intercept[i] = -_NO_REGION
            continue
        if y.sum() < 2:
            continue
        with threadpool_limits(limits=compute_threads()):
            clf = LogisticRegression(C=1.0, max_iter=2000).fit(F, y)
        coef[i], intercept[i] = clf.coef_[0], clf.intercept_[0]
        s = F @ coef[i] + intercept[i]
        thr[i] = _best_f1_threshold(s, y)

    params = {
        "modes": modes.astype(np.float32), "p1": p1, "p2": float(p2), "r0": float(r0), "accept": accept,
        "ball_points": ball_points, "ball_owner": ball_owner, "rho": rho,
        "logit_coef": coef, "logit_intercept": intercept, "logit_threshold": thr,
        "share_before": float(dense.mean()),
    }
    a = _accept_from_hits(hits, accept)
    params["descriptor_share_estimate"] = float((a * dense).sum() / a.sum())
    params["descriptor_acceptance"] = float(a.mean())
    for proxy in PROXIES:
        reg = _proxy_region(params, proxy, Z)
        a = _accept_from_hits(reg, accept)
        inr = reg.any(axis=1)
        params[f"{proxy}_share_estimate"] = float((a * dense).sum() / a.sum())
        params[f"{proxy}_acceptance"] = float(a.mean())
        params[f"{proxy}_precision"] = float((inr & dense).sum() / max(inr.sum(), 1))
        params[f"{proxy}_recall"] = float((inr & dense).sum() / max(dense.sum(), 1))
    return params


def _best_f1_threshold(s: np.ndarray, y: np.ndarray) -> float:
    """Score threshold (region = s >= t) with the best F1 against y (ties: the higher t)."""
    order = np.argsort(-s, kind="stable")
    ys = y[order].astype(np.float64)
    tp = np.cumsum(ys)
    k = np.arange(1, len(s) + 1)
    f1 = 2 * tp / (k + ys.sum())
    # only cut between distinct scores
    ok = np.r_[s[order][1:] < s[order][:-1], True]
    f1 = np.where(ok, f1, -1.0)
    j = int(np.argmax(f1))
    return float(s[order][j])


def _proxy_region(params: dict, proxy: str, z, trees=None) -> np.ndarray:
    if proxy == "logistic":
        return _logistic_region(params["logit_coef"], params["logit_intercept"], params["logit_threshold"], z)
    if proxy == "balls":
        if trees is None:
            trees = _ball_trees(params["ball_points"], params["ball_owner"], len(params["accept"]))
        return _balls_region(trees, params["rho"], z)
    raise ConfigError(f"unknown latent proxy {proxy!r}; choose one of: {', '.join(PROXIES)}")


# ----------------------------------------------------------------------------
# parameters on disk


def params_checksum(params: dict) -> str:
    """sha256 over the parameters' names, dtypes, shapes and bytes (order independent)."""
    h = hashlib.sha256()
    for key in sorted(params):
        a = np.ascontiguousarray(np.asarray(params[key]))
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_params(path_dir, params: dict, meta: dict) -> Path:
    """Write params.npz (arrays; floats as 0-d arrays) and meta.json into path_dir.

    meta must name the method ("cluster" or "rejection"), the variant it samples
    with (gmm/cells or descriptor/latent) and the base generator {spec, options}
    under "base" (or "generator");
    the descriptor {spec, options} is required for variant "descriptor" and kept
    for the record otherwise. r0 and anything else (proxy, p2, provenance) may be
    added. The params' checksum is stored in meta as params_sha256.
    """
    meta = dict(meta)
    _check_meta(meta)
    arrays = {k: np.asarray(v) for k, v in params.items()}
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise ValueError(f"param {k!r} must be numeric (got dtype {a.dtype}); put strings in meta")
    p = Path(path_dir)
    p.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(p / "params.npz", buf.getvalue())
    meta["params_sha256"] = params_checksum(arrays)
    atomic_write_json(p / "meta.json", meta, sort_keys=True)
    return p


def load_params(path_dir) -> tuple[dict, dict]:
    """(params, meta) from a folder written by save_params; 0-d arrays come back as Python floats/ints."""
    p = Path(path_dir)
    if not (p / "params.npz").is_file() or not (p / "meta.json").is_file():
        raise ConfigError(f"calibration folder {str(p)!r} has no params.npz + meta.json; write one with "
                          "modeaudit.tasks.calibration.samplers.save_params")
    meta = json.loads((p / "meta.json").read_text())
    with np.load(p / "params.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    got = params_checksum(arrays)
    if meta.get("params_sha256") not in (None, got):
        raise ConfigError(f"calibration folder {str(p)!r}: params.npz does not match the checksum in meta.json "
                          "(modified or partly written); write it again")
    _check_meta(meta)
    params = {k: (a.item() if a.ndim == 0 else a) for k, a in arrays.items()}
    return params, meta


def _base_of(meta: dict):
    """The base generator's {spec, options}: meta["base"], or meta["generator"]."""
    return meta.get("base") if meta.get("base") is not None else meta.get("generator")


def _check_meta(meta: dict):
    method, variant = meta.get("method"), meta.get("variant")
    if method not in METHODS:
        raise ConfigError(f"calibration meta: method {method!r} must be one of {', '.join(METHODS)}")
    if variant not in METHODS[method]:
        raise ConfigError(f"calibration meta: variant {variant!r} does not belong to method {method!r}; "
                          f"choose one of {', '.join(METHODS[method])}")
    g = _base_of(meta)
    if not isinstance(g, dict) or "spec" not in g:
        raise ConfigError("calibration meta: 'base' (or 'generator') must be {spec, options} of the base generator")
    if variant == "descriptor" and not isinstance(meta.get("descriptor"), dict):
        raise ConfigError("calibration meta: variant 'descriptor' needs 'descriptor': {spec, options}")
    if meta.get("proxy", "logistic") not in PROXIES:
        raise ConfigError(f"calibration meta: proxy {meta.get('proxy')!r} must be one of {', '.join(PROXIES)}")


# ----------------------------------------------------------------------------
# the calibrated generator


class CalibratedGenerator(Generator):
    """spec 'calibrated:PATH' (PATH = a folder written by save_params).

    Wraps the base generator named in meta: latents() does the reshaped sampling
    (row j a pure function of (seed, stream, j)); generate()/truth() delegate to
    the base; the fingerprint adds the params' checksum, the variant and the
    base's own fingerprint; stats() reports attempts / accepted so far.
    """

    def __init__(self, spec: str, options: dict, params: dict, meta: dict):
        super().__init__(spec, options)
        self.params, self.meta = params, meta
        self.variant = options.get("variant") or meta["variant"]
        if self.variant not in METHODS[meta["method"]]:
            raise ConfigError(f"generator {spec!r}: variant {self.variant!r} needs a {self._method_of(self.variant)!r} "
                              f"calibration, this folder holds {meta['method']!r} (variants "
                              f"{', '.join(METHODS[meta['method']])})")
        self.proxy = options.get("proxy") or meta.get("proxy", "logistic")
        if self.proxy not in PROXIES:
            raise ConfigError(f"generator {spec!r}: proxy {self.proxy!r} must be one of {', '.join(PROXIES)}")
        if self.variant == "descriptor" and not isinstance(meta.get("descriptor"), dict):
            raise ConfigError(f"generator {spec!r}: variant 'descriptor' needs the descriptor in meta.json")
        g = _base_of(meta)
        self.base = build_generator(g["spec"], g.get("options") or {})
        self.latent_dim = self.base.latent_dim
        self.sample_kind = self.base.sample_kind
        self.default_descriptor = self.base.default_descriptor
        self.has_truth = self.base.has_truth
        self.batch_size = int(options.get("batch_size") or 4096)
        self.max_attempts = int(options.get("max_attempts") or 10000)
        self.checksum = meta.get("params_sha256") or params_checksum(params)
        self._descriptor = None
        self._trees = None
        self._attempts = 0
        self._accepted = 0
        self._max_row_attempts = 0
        if meta["method"] == "cluster":
            w = np.asarray(params["weights"], np.float64)
            self._cell_accept = w / w.max()
            cw = np.cumsum(np.asarray(params["gmm_weights"], np.float64))
            self._gmm_cum = cw / cw[-1]
        k = self.latent_dim
        for key in ("centroids", "gmm_means", "ball_points"):
            if key in params and np.asarray(params[key]).ndim == 2 and np.asarray(params[key]).shape[1] != k:
                raise ConfigError(f"generator {spec!r}: params {key} have latent dimension "
                                  f"{np.asarray(params[key]).shape[1]}, the base generator has {k}")

    @staticmethod
    def _method_of(variant):
        return next((m for m, vs in METHODS.items() if variant in vs), "?")

    # -- sampling -----------------------------------------------------------

    def latents(self, seed: int, stream: str, start: int, stop: int) -> np.ndarray:
        z, _ = self.latents_with_attempts(seed, stream, start, stop)
        return z

    def latents_with_attempts(self, seed: int, stream: str, start: int, stop: int):
        """(latents (n, k) float32, attempts per row (n,) int64) of rows [start, stop)."""
        if not (0 <= start <= stop):
            raise ValueError(f"bad row range [{start}, {stop})")
        bs = self.batch_size
        zs, atts = [], []
        for lo in range(start // bs * bs, stop, bs):
            z, a = self._block(seed, stream, lo, lo + bs)
            s, e = max(start, lo) - lo, min(stop, lo + bs) - lo
            zs.append(z[s:e])
            atts.append(a[s:e])
        k = self.latent_dim
        z = np.concatenate(zs) if zs else np.zeros((0, k), np.float32)
        a = np.concatenate(atts) if atts else np.zeros(0, np.int64)
        return z, a

    def _block(self, seed, stream, lo, hi):
        # One aligned block; counted in stats once per call (blocks are recomputed
        # when a shard boundary cuts them, so stats count work done, not rows kept).
        if self.variant == "gmm":
            z, att = self._gmm_block(seed, stream, lo, hi), np.ones(hi - lo, np.int64)
        else:
            z, att = self._rejection_block(seed, stream, lo, hi)
        self._attempts += int(att.sum())
        self._accepted += len(att)
        self._max_row_attempts = max(self._max_row_attempts, int(att.max(initial=0)))
        return z, att

    def _gmm_block(self, seed, stream, lo, hi):
        p = self.params
        u = uniform_rows(seed, f"{stream}/comp", lo, hi)
        comp = np.minimum(np.searchsorted(self._gmm_cum, u, side="right"), len(self._gmm_cum) - 1)
        eps = latent_rows(seed, f"{stream}/gauss", lo, hi, self.latent_dim, dtype=np.float64)
        means, chol = np.asarray(p["gmm_means"], np.float64), np.asarray(p["gmm_chol"], np.float64)
        z = np.empty_like(eps)
        for c in np.unique(comp):
            rows = comp == c
            z[rows] = means[c] + eps[rows] @ chol[c].T
        return z.astype(np.float32)

    def _rejection_block(self, seed, stream, lo, hi):
        n, k = hi - lo, self.latent_dim
        out = np.empty((n, k), np.float32)
        att = np.zeros(n, np.int64)
        pending = np.arange(n)
        for a in range(self.max_attempts):
            # rows of this attempt: only the blocks that still hold pending rows
            b0, b1 = lo + int(pending[0]), lo + int(pending[-1]) + 1
            idx = pending - (b0 - lo)
            z = latent_rows(seed, f"{stream}/try{a}", b0, b1, k)[idx]
            u = uniform_rows(seed, f"{stream}/u{a}", b0, b1)[idx]
            ok = u < self.accept_prob(z)
            att[pending] += 1
            out[pending[ok]] = z[ok]
            pending = pending[~ok]
            if not len(pending):
                return out, att
        raise RuntimeError(f"calibrated generator {self.spec!r} ({self.variant}): rows {lo + pending[:5]} of stream "
                           f"{stream!r} were rejected {self.max_attempts} times in a row; the acceptance rate is "
                           "too low for this calibration (check p1/p2 or the weights), or raise max_attempts")

    def accept_prob(self, z: np.ndarray) -> np.ndarray:
        """Acceptance probability of each proposal z (1 for the gmm variant)."""
        p = self.params
        if self.variant == "gmm":
            return np.ones(len(z))
        if self.variant == "cells":
            return self._cell_accept[_nearest(z, np.asarray(p["centroids"], np.float64))]
        if self.variant == "descriptor":
            hits = mode_hits(self._embed(z), p["modes"], p["r0"])
        else:
            if self.proxy == "balls" and self._trees is None:
                self._trees = _ball_trees(p["ball_points"], p["ball_owner"], len(p["accept"]))
            hits = _proxy_region(p, self.proxy, z, self._trees)
        return _accept_from_hits(hits, np.asarray(p["accept"], np.float64))

    def _embed(self, z):
        if self._descriptor is None:
            from modeaudit.tasks.models.descriptors import build_descriptor
            d = self.meta["descriptor"]
            self._descriptor = build_descriptor(d["spec"], d.get("options") or {})
        e = np.asarray(self._descriptor.embed(self.base.generate(z)), np.float64)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    # -- delegation ---------------------------------------------------------

    def generate(self, z):
        return self.base.generate(z)

    def truth(self, z):
        return self.base.truth(z)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "params_sha256": self.checksum, "method": self.meta["method"],
                "variant": self.variant, "proxy": self.proxy if self.variant == "latent" else None,
                "base": self.base.fingerprint(), "descriptor": self.meta.get("descriptor")}

    def stats(self) -> dict:
        """Attempts / accepted so far in this process (see acceptance_stats)."""
        return {"variant": self.variant, **acceptance_stats(self._attempts, self._accepted),
                "max_attempts_per_row": self._max_row_attempts}


def acceptance_stats(attempts, accepted: int | None = None) -> dict:
    """Acceptance rate and cost per accepted sample.

    `attempts` is either an array of attempts per accepted row (from
    latents_with_attempts) or a total count with `accepted` given. cost_per_accepted
    = proposals per accepted row; for the "descriptor" variant each proposal is
    one G + f evaluation, for the latent variants one latent draw (+ a cheap test).
    """
    if accepted is None:
        a = np.asarray(attempts)
        total, accepted = int(a.sum()), int(a.size)
    else:
        total = int(attempts)
    return {"attempts": total, "accepted": int(accepted),
            "acceptance_rate": accepted / total if total else float("nan"),
            "cost_per_accepted": total / accepted if accepted else float("nan")}


def _as_model(obj, build):
    return build(obj["spec"], obj.get("options") or {}) if isinstance(obj, dict) else obj


def proxy_agreement(params: dict, generator, descriptor, *, n: int = 20000, seed: int = 0,
                    stream: str = "calibration/agree", proxy: str = "logistic", batch: int = 4096) -> dict:
    """How closely the latent proxy matches the descriptor decision on n fresh z ~ N(0, I).

    generator/descriptor: objects or {spec, options}. Returns precision and recall
    of "in the proxy's region" against "within r0 of a mode", the dense share
    before, the calibrated dense share each decision achieves (exact expectations
    over the fresh rows: sum(a * dense) / sum(a) with a the acceptance probability)
    and each one's acceptance rate; with ground truth, the same for the planted share.
    """
    from modeaudit.tasks.models.descriptors import build_descriptor
    g = _as_model(generator, build_generator)
    d = _as_model(descriptor, build_descriptor)
    accept = np.asarray(params["accept"], np.float64)
    dense, a_desc, a_prox, inr, truth = [], [], [], [], []
    trees = _ball_trees(params["ball_points"], params["ball_owner"], len(accept)) if proxy == "balls" else None
    for lo in range(0, n, batch):
        z = latent_rows(seed, stream, lo, min(n, lo + batch), g.latent_dim)
        e = np.asarray(d.embed(g.generate(z)), np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        hits = mode_hits(e, params["modes"], params["r0"])
        reg = _proxy_region(params, proxy, z, trees)
        dense.append(hits.any(axis=1))
        inr.append(reg.any(axis=1))
        a_desc.append(_accept_from_hits(hits, accept))
        a_prox.append(_accept_from_hits(reg, accept))
        t = g.truth(z)
        truth.append(None if t is None else np.asarray(t, bool))
    dense, inr = np.concatenate(dense), np.concatenate(inr)
    a_desc, a_prox = np.concatenate(a_desc), np.concatenate(a_prox)
    tp = int((dense & inr).sum())
    out = {"n": n, "proxy": proxy, "precision": tp / max(int(inr.sum()), 1), "recall": tp / max(int(dense.sum()), 1),
           "share_before": float(dense.mean()),
           "share_descriptor": float((a_desc * dense).sum() / a_desc.sum()),
           "share_latent": float((a_prox * dense).sum() / a_prox.sum()),
           "acceptance_descriptor": float(a_desc.mean()), "acceptance_latent": float(a_prox.mean())}
    if all(t is not None for t in truth):
        t = np.concatenate(truth)
        out.update(planted_before=float(t.mean()), planted_descriptor=float((a_desc * t).sum() / a_desc.sum()),
                   planted_latent=float((a_prox * t).sum() / a_prox.sum()))
    return out


# ----------------------------------------------------------------------------
# registry


@GENERATORS.register("calibrated", {
    "batch_size": Option(int, 4096, "rows per aligned rejection block (a row's latent never depends on the shard)",
                         check=lambda v: v > 0, check_msg="must be > 0"),
    "max_attempts": Option(int, 10000, "proposals per row before giving up with an error",
                           check=lambda v: v > 0, check_msg="must be > 0"),
    "variant": Option(str, "", "sampler: gmm or cells (cluster), descriptor or latent (rejection); "
                      "empty = the one in meta.json"),
    "proxy": Option(str, "", "latent proxy: logistic or balls; empty = the one in meta.json (default logistic)"),
}, prefix=True, help="a calibrated latent sampler over a base generator: folder written by modeaudit.tasks.calibration.samplers.save_params")
def _calibrated(path, *, batch_size, max_attempts, variant, proxy):
    params, meta = load_params(path)
    options = {"batch_size": batch_size, "max_attempts": max_attempts, "variant": variant, "proxy": proxy}
    return CalibratedGenerator(f"calibrated:{path}", options, params, meta)
