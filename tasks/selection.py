"""Selection-aware test of the worst-case dense mode.

The paper compares the *selected maximum* of m anchors with random anchors, so
any density peak looks "denser than typical". Here the observed worst-case curve
is compared with worst-case curves produced by the same selection procedure (same
m, same d0, same radii) on samples from a null distribution with no collapse:

  (a) a reference set: real-data embeddings or a baseline checkpoint's samples
      (rows drawn without replacement within a replicate);
  (b) a reference generator (drawn fresh for every replicate);
  (c) a parametric surrogate fitted to the audited embeddings: a Gaussian in R^D
      (mean and covariance of S) projected to the unit sphere. Its assumption: the
      collapse-free distribution is one smooth unimodal density; data with real
      cluster structure (many identities) violates it and the test then rejects.

Curves are compared as fractions of the curve set's size (M for the observed, the
replicate's own size for the nulls), with the ERL global envelope test
(tasks/envelope.py): exchangeable under H0, so the p-value is exact up to the
Monte-Carlo resolution 1/(B+1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import backend
from .envelope import erl_test
from .paper_test import top_anchors


def worst_case_curve(S: np.ndarray, T_blocks, n_t: int, d0: float, radii, kernel: str = "fast") -> tuple[int, np.ndarray]:
    """The selection procedure on one sample: argmax of N(I, S minus I, d0), then its curve in T as fractions."""
    counts = backend.range_counts(S, [(0, S)], [d0], anchor_ids=np.arange(len(S)), kernel=kernel)[:, 0]
    w = int(top_anchors(counts, 1)[0])
    curve = backend.range_counts(S[w:w + 1], T_blocks, radii, kernel=kernel)[0]
    return w, curve / float(n_t)


@dataclass
class NullSampler:
    """Draws the replicate samples (S*, T*) of a null; `describe` goes into the report."""
    draw: Callable[[int, int, int], tuple[np.ndarray, np.ndarray]]   # (replicate, m, n_t) -> (S*, T*)
    describe: str
    max_rows: int | None = None   # a finite pool caps m + n_t


def pool_sampler(pool: np.ndarray, seed: int, describe: str) -> NullSampler:
    """Null (a): disjoint random rows of a reference pool for S* and T*, fresh for every replicate."""
    def draw(b, m, n_t):
        idx = np.random.default_rng([seed, 0x5E1, b]).permutation(len(pool))
        return pool[np.sort(idx[:m])], pool[np.sort(idx[m:m + n_t])]
    return NullSampler(draw, describe, max_rows=len(pool))


def gaussian_surrogate(S: np.ndarray, seed: int) -> NullSampler:
    """Null (c): N(mean(S), cov(S)) in R^D projected to the sphere."""
    X = np.asarray(S, np.float64)
    mu = X.mean(axis=0)
    L = np.linalg.cholesky(np.cov(X, rowvar=False) + 1e-9 * np.eye(X.shape[1]))

    def one(rng, n):
        x = mu + rng.standard_normal((n, len(mu))) @ L.T
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def draw(b, m, n_t):
        rng = np.random.default_rng([seed, 0x5E2, b])
        return one(rng, m), one(rng, n_t)
    return NullSampler(draw, "parametric surrogate: a Gaussian with the mean and covariance of S, projected to "
                       "the unit sphere (assumes one smooth unimodal density, no identity clusters)")


def selection_test(obs_curve_frac: np.ndarray, null: NullSampler, *, m: int, n_t: int, d0: float, radii,
                   replicates: int, alpha: float, kernel: str = "fast", seed: int = 0) -> dict:
    """ERL test of the observed worst-case curve (fractions) against `replicates` null worst-case curves."""
    curves = np.empty((replicates, len(radii)))
    for b in range(replicates):
        S, T = null.draw(b, m, n_t)
        _, curves[b] = worst_case_curve(S, [(0, T)], len(T), d0, radii, kernel)
    res = erl_test(np.asarray(obs_curve_frac, np.float64), curves, alpha=alpha, alternative="greater")
    res.update({"null": null.describe, "replicates": replicates, "null_m": m, "null_T": n_t,
                "null_median": np.median(curves, axis=0).tolist()})
    return res
