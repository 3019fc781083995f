"""Selection-aware test of the worst-case dense mode.

The paper compares the *selected maximum* of m anchors with random anchors, so
any density peak looks "denser than typical". Here the observed worst-case curve
is compared with worst-case curves produced by the same selection procedure (same
m, same d0, same radii) on samples from a null distribution with no collapse:

  (a) a reference set: real-data embeddings or a baseline checkpoint's samples
      (rows drawn without replacement within a replicate);
  (b) a reference generator (drawn fresh for every replicate);
  (c) a parametric surrogate fitted to the audited embeddings: the maximum-likelihood
      projected normal PN(mu, Sigma) of S, with its plug-in bias corrected
      (tasks/stats/surrogate.py). Its assumption: the collapse-free distribution is one
      smooth density of that family (one bump, or an antipodal pair when mu = 0);
      data with real cluster structure (many identities) violates it, and the test
      then rejects because the data is clustered, not because a mode collapsed.

Curves are compared as fractions of the curve set's size (M for the observed, the
replicate's own size for the nulls), with the ERL global envelope test
(tasks/stats/envelope.py): exchangeable under H0, so the p-value is exact up to the
Monte-Carlo resolution 1/(B+1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from modeaudit.tasks.join import backend
from modeaudit.tasks.stats.envelope import erl_measures, erl_test
from modeaudit.tasks.stats.modes import distinct_modes
from modeaudit.tasks.stats.paper import top_anchors


def worst_case_curve(S: np.ndarray, T_blocks, n_t: int, d0: float, radii, kernel: str = "fast") -> tuple[int, np.ndarray]:
    """The selection procedure on one sample: argmax of N(I, S minus I, d0), then its curve in T as fractions."""
    _, w, curve = _worst_case(S, T_blocks, n_t, d0, radii, kernel)
    return w, curve


def _worst_case(S: np.ndarray, T_blocks, n_t: int, d0: float, radii, kernel: str):
    """worst_case_curve, with S's self-counts at d0 that chose the worst case: (counts, w, curve)."""
    counts = backend.range_counts(S, [(0, S)], [d0], anchor_ids=np.arange(len(S)), kernel=kernel)[:, 0]
    w = int(top_anchors(counts, 1)[0])
    curve = backend.range_counts(S[w:w + 1], T_blocks, radii, kernel=kernel)[0]
    return counts, w, curve / float(n_t)


@dataclass
class NullSampler:
    """Draws the replicate samples (S*, T*) of a null; `describe` goes into the report."""
    draw: Callable[[int, int, int], tuple[np.ndarray, np.ndarray]]   # (replicate, m, n_t) -> (S*, T*)
    describe: str
    kind: str = "reference"       # "reference" (a sample of the collapse-free law) or "surrogate" (a model of it)
    fit: dict | None = None       # the surrogate's fitted parameters, summarised
    # Surrogates only: (S, w, n_t, radii, key, kernel) -> the curve (fractions) that a model
    # refitted to S predicts for anchor S[w]. The test then compares excesses over it.
    predict: Callable | None = None
    # Permutation nulls only: the pooled rows (S + T + reference, in that order), b -> that replicate's
    # row order of the pool (S* = the first m, T* = the next n_t, R* = the rest), and the number of
    # distinct modes whose T-over-R contrast is tested with the worst-case curve (0: the curve alone).
    pool: np.ndarray | None = None
    order: Callable[[int], np.ndarray] | None = None
    modes: int = 0


def pool_sampler(pool: np.ndarray, seed: int, describe: str, modes: int = 0) -> NullSampler:
    """Null (a): disjoint random rows of a reference pool for S* and T*, fresh for every replicate.

    With `modes` > 0 the pool is S + T + R of a permutation test and each replicate's remaining
    rows are its R* (see split_statistics).
    """
    def order(b):
        return np.random.default_rng([seed, 0x5E1, b]).permutation(len(pool))

    def draw(b, m, n_t):
        idx = order(b)
        return pool[np.sort(idx[:m])], pool[np.sort(idx[m:m + n_t])]
    return NullSampler(draw, describe, pool=pool, order=order, modes=modes)


def split_statistics(pool: np.ndarray, idx: np.ndarray, m: int, n_t: int, d0: float, radii, k: int,
                     kernel: str = "fast") -> dict:
    """Both statistics of one split of a permutation pool: S = pool[idx[:m]], T = the next n_t rows, R = the rest.

    The worst case (argmax of N(I, S minus I, d0)) and its curve in T as fractions, as
    worst_case_curve; and the contrast: the top-k distinct modes chosen on S, each ball (radius
    d0) counted in T and in R, and the largest excess of T over R (contrast_z). The modes are
    chosen on S alone, as the two-sample test's are, and re-chosen on every split.
    """
    s_idx, t_idx, r_idx = np.sort(idx[:m]), np.sort(idx[m:m + n_t]), np.sort(idx[m + n_t:])
    S, T, R = pool[s_idx], pool[t_idx], pool[r_idx]
    counts, w, curve = _worst_case(S, [(0, T)], n_t, d0, radii, kernel)
    md = distinct_modes(S, counts, k, d0)
    x_t = backend.range_counts(S[md], [(0, T)], [d0], kernel=kernel)[:, 0]
    x_r = backend.range_counts(S[md], [(0, R)], [d0], kernel=kernel)[:, 0]
    return {"w": w, "curve": curve, "z": contrast_z(x_t, x_r, len(T), len(R)), "modes": md, "x_t": x_t,
            "x_r": x_r, "n_r": len(R)}


def replicate_stats(null: NullSampler, indices, *, m: int, n_t: int, d0: float, radii,
                    kernel: str = "fast") -> np.ndarray:
    """replicate_curves for a permutation null with a contrast: (len(indices), len(radii) + 1), the
    worst-case curve and, in the last column, the contrast z of each replicate's split."""
    out = []
    for b in indices:
        st = split_statistics(null.pool, null.order(b), m, n_t, d0, radii, null.modes, kernel)
        out.append(np.r_[st["curve"], st["z"]])
    return np.asarray(out, np.float64).reshape(len(out), len(radii) + 1)


SURROGATE_NOTE = ("parametric surrogate: the maximum-likelihood projected normal PN(mu, Sigma) of S, "
                  "bias-corrected (James-Stein mean, Ledoit-Wolf covariance). Valid only if the collapse-free "
                  "distribution is one smooth bump on the sphere; identity clusters violate it, and then a "
                  "rejection says 'clustered', not 'collapsed': pass --reference or --reference-generator")


REFIT_ROWS = 2000   # rows of each sample the surrogate is refitted on (see predict below)
REFIT_ITER = 5      # EM steps of a refit, warm-started from the fit to S (the same for every sample)


def gaussian_surrogate(S: np.ndarray, seed: int) -> NullSampler:
    """Null (c): the projected normal fitted to S (tasks/stats/surrogate.py), drawn fresh for every replicate."""
    from modeaudit.tasks.stats.surrogate import fit_projected_normal
    fit = fit_projected_normal(S)
    return surrogate_sampler(fit, seed, fit.describe())


def surrogate_sampler(fit, seed: int, describe: dict) -> NullSampler:
    """Null (c) from a fit made once (in a worker): draws and refit-predictions, seeded by replicate."""
    from modeaudit.tasks.stats.surrogate import fit_projected_normal

    def draw(b, m, n_t):
        rng = np.random.default_rng([seed, 0x5E2, b])
        return fit.sample(rng, m), fit.sample(rng, n_t)

    def predict(S_b, w, n_t, radii, key, kernel):
        # Refit on this sample (warm from the first fit), then count the anchor's
        # balls in a fresh draw of the refitted law: what "no collapse" predicts here.
        # The refit uses the first REFIT_ROWS rows (iid, so a random subsample) and the
        # same procedure for the observed sample and every replicate, which is all the
        # pivot needs; it keeps B refits at 1e4 x 128 from costing minutes.
        rows = min(len(S_b), max(REFIT_ROWS, 4 * S_b.shape[1]))
        f = fit_projected_normal(S_b[:rows], init=fit, max_iter=REFIT_ITER)
        Y = f.sample(np.random.default_rng([seed, 0x5E3, key]), n_t)
        return backend.range_counts(S_b[w:w + 1], [(0, Y)], radii, kernel=kernel)[0] / float(n_t)
    return NullSampler(draw, SURROGATE_NOTE, kind="surrogate", fit=describe, predict=predict)


def excess(curve_frac: np.ndarray, predicted_frac: np.ndarray, n_t: int) -> np.ndarray:
    """Standardised excess of a worst-case curve over the model's prediction, per radius.

    Counts c (observed) and e (predicted) out of n_t, compared on the variance-stabilised
    Poisson scale 2 (sqrt(c + 3/8) - sqrt(e + 3/8)) (Anscombe): a log ratio would let a
    dozen counts where the model predicts none outweigh hundreds where it predicts tens.
    """
    c = np.asarray(curve_frac, np.float64) * n_t
    e = np.asarray(predicted_frac, np.float64) * n_t
    return 2.0 * (np.sqrt(c + 0.375) - np.sqrt(e + 0.375))


def replicate_curves(null: NullSampler, indices, *, m: int, n_t: int, d0: float, radii,
                     kernel: str = "fast") -> np.ndarray:
    """The null's statistic (worst-case curve, or its excess over the refit) for each replicate index, serially.

    Replicate b depends on b alone (its draws are seeded by b), so any split of the
    indices over processes gives the same rows. No thread pool here: the BLAS calls
    of the surrogate's EM must run where nothing changes the BLAS thread count.
    """
    out = []
    for b in indices:
        S, T = null.draw(b, m, n_t)
        w, c = worst_case_curve(S, [(0, T)], len(T), d0, radii, kernel)
        out.append(c if null.predict is None else excess(c, null.predict(S, w, n_t, radii, b + 1, kernel), n_t))
    return np.asarray(out, np.float64).reshape(len(out), len(radii))


def selection_test(obs_curve_frac: np.ndarray, null: NullSampler, *, m: int, n_t: int, d0: float, radii,
                   replicates: int, alpha: float, kernel: str = "fast", seed: int = 0,
                   obs_S: np.ndarray | None = None, obs_w: int | None = None, curves=None,
                   contrast: dict | None = None) -> dict:
    """ERL test of the observed worst-case curve (fractions) against `replicates` null worst-case curves.

    With a reference null the curves themselves are compared. With a surrogate
    (`null.predict`), a plug-in null is off by its own estimation error, so each
    curve -- observed and replicate alike -- is first compared with what a model refitted
    to *its own* S predicts for the selected anchor (`excess`): the parametric
    bootstrap of an approximately pivotal statistic. That needs the observed S and
    its worst-case row (`obs_S`, `obs_w`). `curves`: the replicates' statistics when they were
    computed elsewhere (on a Dask cluster, `replicate_curves` per group of indices).

    `contrast` (permutation nulls): {"obs_z": the observed split's contrast, "z": the replicates'}.
    Then the decision is the min-p combination of both statistics (min_p_combination): `p`,
    `p_low`, `p_high`, `reject` are the combined test's, and `p_curve` / `p_contrast` each
    statistic's own p-value; `envelope_high` stays the curve's envelope.
    """
    if curves is None:
        curves = replicate_curves(null, range(replicates), m=m, n_t=n_t, d0=d0, radii=radii, kernel=kernel)
    curves = np.asarray(curves, np.float64)
    if curves.shape != (replicates, len(radii)):
        raise ValueError(f"curves must be (replicates, radii) = ({replicates}, {len(radii)}), got {curves.shape}")
    obs = np.asarray(obs_curve_frac, np.float64)
    if null.predict is not None:
        if obs_S is None or obs_w is None:
            raise ValueError("a surrogate null needs the observed S and worst-case row (obs_S, obs_w)")
        obs = excess(obs, null.predict(np.asarray(obs_S), int(obs_w), n_t, radii, 0, kernel), n_t)
    res = erl_test(obs, curves, alpha=alpha, alternative="greater")
    if contrast is not None:
        z = np.r_[float(contrast["obs_z"]), np.asarray(contrast["z"], np.float64)]
        if z.shape != (replicates + 1,):
            raise ValueError(f"contrast z must hold {replicates} replicates, got {z.size - 1}")
        res.update(min_p_combination(np.vstack([obs[None, :], curves]), z, alpha))
        res["contrast_z"] = float(z[0])
        res["contrast_null_z"] = z[1:].tolist()
    res.update({"null": null.describe, "null_kind": null.kind, "replicates": replicates, "null_m": m, "null_T": n_t,
                "null_median": np.median(curves, axis=0).tolist(),
                "statistic": "standardised excess over the refitted surrogate's prediction" if null.predict else
                "worst-case curve (fraction of T)" if contrast is None else
                "worst-case curve (fraction of T) and the top modes' excess in T over the reference, min-p"})
    if null.fit is not None:
        res["surrogate_fit"] = null.fit
        res["obs_excess"] = obs.tolist()
    return res


def contrast_z(x_t, x_r, n_t: int, n_r: int) -> float:
    """Largest excess of a ball's count in T over its count in R, over the given balls.

    Per ball, the conditional binomial z of x_t given x_t + x_r (p0 = n_t / (n_t + n_r), the
    share of T when both sets are draws of one law); 0 for an empty ball. Used as a
    permutation statistic, so its scale need not be exactly normal: the permutations calibrate it.
    """
    x_t, x_r = np.asarray(x_t, np.float64), np.asarray(x_r, np.float64)
    n, p0 = x_t + x_r, n_t / float(n_t + n_r)
    z = np.where(n > 0, (x_t - n * p0) / np.sqrt(np.maximum(n, 1.0) * p0 * (1.0 - p0)), 0.0)
    return float(z.max()) if z.size else 0.0


def min_p_combination(curves: np.ndarray, z: np.ndarray, alpha: float) -> dict:
    """Exact permutation test of two statistics at once: the worst-case curve (ERL) and the contrast z.

    Row 0 of `curves` and z[0] are the observed split, the rest the permutations (exchangeable
    under H0). Each split gets its p-value under each statistic among all s splits (ERL measure:
    small is extreme; z: large is extreme), then the smaller of the two; the observed split's
    rank in that minimum is the p-value (min-p, Westfall and Young 1993), exact because every
    split is treated alike. Ties count against the observed split (conservative).
    """
    e = erl_measures(np.asarray(curves, np.float64), "greater")
    z = np.asarray(z, np.float64)
    s = len(z)
    p_curve = (e[None, :] <= e[:, None]).sum(axis=1) / s
    p_z = (z[None, :] >= z[:, None]).sum(axis=1) / s
    q = np.minimum(p_curve, p_z)
    n_high, n_low = int(np.sum(q <= q[0])), 1 + int(np.sum(q[1:] < q[0]))
    return {"p": n_high / s, "p_high": n_high / s, "p_low": n_low / s,
            "reject": bool(n_high <= np.floor(alpha * s + 1e-9)),
            "p_curve": float(p_curve[0]), "p_contrast": float(p_z[0])}
