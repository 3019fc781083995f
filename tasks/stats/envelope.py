"""Global envelope test by extreme rank length (ERL), with its 1-alpha global envelope.

Myllymäki, Mrkvička, Grabarnik, Seijo & Hahn (2017), "Global envelope tests for spatial
processes", JRSS-B 79, 381-404; Myllymäki & Mrkvička (2020), "GET: Global envelopes in R",
arXiv:1911.06583. The conventions below are those of the R package GET
(`global_envelope_test(type="erl")`), read from its source:

* R/forder.r, `find_calc_pointwiserank`: for measure "erl" the pointwise rank at each
  radius is `rank(x, ties.method="average")` (1 = smallest); "less" keeps it, "greater"
  uses `s + 1 - rank` (the largest value gets 1), "two.sided" the smaller of the two.
* R/forder.r, `individual_partial_forder` + `rank_matrix_cols`: each curve's pointwise
  ranks are sorted ascending; the curves are ordered lexicographically by these vectors
  (smallest first = most extreme); identical vectors share the AVERAGE of their positions.
  `scale_ranks` divides by s. So the ERL measure e_i in (0, 1] is SMALL for extreme
  curves; without ties e_i = #{j : R_j <=lex R_i} / s.
* R/envelopes.r, `individual_global_envelope_test`, case "erl": the p-value is
  `estimate_p_value(-e_1, -e_sim, ties="conservative")` (R/p-value.r), i.e.
  p = #{i in 1..s : e_i <= e_1} / s, the observed curve counting itself. GET reports a
  p-interval only for type "rank" (the liberal/conservative pair of `estimate_p_value`);
  we report the same pair on the ERL measure: p_low = (1 + #{refs with e_j < e_1}) / s
  (liberal), p_high = p (conservative). They differ only when e_1 ties with a reference.
* Envelope: GET vignette (JSS 2024 / arXiv:1911.06583, Definition "IGI" point 1 and the
  "Global ERL envelope" eq.): E_(alpha) is the largest E_i such that #{i : E_i < E_(alpha)}
  <= alpha s; the envelope is the pointwise min/max over I_alpha = {i : E_i >= E_(alpha)},
  taken over ALL s curves, the observed one included (R/envelopes.r,
  `individual_central_region` uses `data_and_sim_curves`); LB = -Inf for "greater",
  UB = +Inf for "less". E_(alpha) is the (floor(alpha s)+1)-th smallest measure, which is
  GET's `critical()` (the floor((1-alpha) s)-th largest) whenever alpha s is an integer
  (s = 200, alpha = 0.05); for non-integer alpha s GET's code excludes ceil(alpha s)
  curves while its test rejects only the floor(alpha s) most extreme ones, so we follow
  the definition, which keeps "outside the envelope <=> reject". GET stops when
  s * alpha < 1; we raise ValueError.
* GET's vignette writes E_i = #{i' : R_i' strictly lex-smaller than R_i} / s and
  p_- = #{i : E_i < E_1} / s; its code (used here) gives E_i = (average 1-based lexicographic
  position) / s and the liberal p = (1 + #{refs with E_j < E_1}) / s. Both E's order the
  curves identically (ties preserved), so p_high and the envelope do not depend on it.

Decision rule: reject when p (= p_high, conservative) <= alpha. With continuous data
(no pointwise ties) this rejects exactly when the observed curve leaves the envelope at
some radius (the IGI property of the GET vignette; checked in tests/test_envelope.py).
Not followed: GET's "histogram approximation" of ERL for curve sets over 10 Mi values
(irrelevant at s ~ 2000, R = 41).
"""
from __future__ import annotations

import math

import numpy as np

ALTERNATIVES = ("greater", "less", "two.sided")


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of each column of a 2-D float array, 1 = smallest, tied values sharing the mean of their
    positions (R's rank(), scipy.stats.rankdata(method="average", axis=0): the same half-integers,
    tested). Here so that an audit's ERL test does not import scipy.stats on a worker (~1 CPU-s)."""
    s, r = x.shape
    order = np.argsort(x, axis=0, kind="stable")
    srt = np.take_along_axis(x, order, axis=0)
    pos = np.broadcast_to(np.arange(s)[:, None], (s, r))
    first = np.ones((s, r), dtype=bool)           # a run of equal values starts here
    first[1:] = srt[1:] != srt[:-1]
    last = np.ones((s, r), dtype=bool)            # ... ends here
    last[:-1] = first[1:]
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=0)
    end = np.minimum.accumulate(np.where(last, pos, s)[::-1], axis=0)[::-1]
    ranks = np.empty((s, r), dtype=np.float64)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=0)
    return ranks


def pointwise_ranks(curves, alternative: str = "greater") -> np.ndarray:
    """(s, R) pointwise ranks, 1 = most extreme, ties get the average rank (GET `find_calc_pointwiserank`).

    "greater": the largest value at a radius has rank 1 (s + 1 - ascending rank);
    "less": the smallest has rank 1; "two.sided": min of the two. Average ranks are
    half-integers, so comparing them exactly (as GET's `identical` does) is safe.
    """
    _check_alternative(alternative)
    x = np.asarray(curves, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"curves must be 2-D (s, R), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("curves must be finite")
    s = x.shape[0]
    lo = average_ranks(x)                        # 1 = smallest, like R's rank()
    if alternative == "less":
        return lo
    hi = s + 1 - lo                              # 1 = largest
    if alternative == "greater":
        return hi
    return np.minimum(lo, hi)


def erl_measures(curves, alternative: str = "greater") -> np.ndarray:
    """(s,) ERL measure of every curve (row 0 = observed): small = extreme.

    e_i = (average position of curve i when the curves are sorted lexicographically by
    their ascending-sorted pointwise-rank vectors, most extreme first) / s, as GET's
    `rank_matrix_cols` + `scale_ranks`. Curves with identical sorted rank vectors tie.
    """
    ranks = pointwise_ranks(curves, alternative)
    s = ranks.shape[0]
    srt = np.sort(ranks, axis=1)                 # each curve's ranks, most extreme first
    # np.lexsort takes its PRIMARY key last: feed columns reversed so column 0 leads.
    order = np.lexsort(srt.T[::-1])
    srt_o = srt[order]
    # Group runs of identical vectors in the sorted order; each run gets its mean position.
    new_run = np.empty(s, dtype=bool)
    new_run[0] = True
    new_run[1:] = np.any(srt_o[1:] != srt_o[:-1], axis=1)
    starts = np.flatnonzero(new_run)                      # 0-based run starts
    ends = np.append(starts[1:], s)                       # exclusive run ends
    run_avg = (starts + 1 + ends) / 2.0                   # mean of 1-based positions start+1..end
    pos = np.empty(s, dtype=np.float64)
    pos[order] = np.repeat(run_avg, ends - starts)
    return pos / s


def erl_test(obs, refs, *, alpha: float = 0.05, alternative: str = "greater") -> dict:
    """ERL global envelope test of an observed curve against reference curves.

    obs: (R,) observed curve; refs: (n_ref, R) reference curves (random anchors or null
    replicates, exchangeable with obs under H0). Returns
    {"p_low", "p_high", "p", "reject", "alpha", "alternative", "n_ref",
     "envelope_low": [R], "envelope_high": [R]}
    with p = p_high (GET's conservative ERL p-value), reject = p <= alpha, and the
    1-alpha global ERL envelope (GET `central_region` conventions: built from all s
    curves, the observed included; -inf/+inf on the side the alternative ignores).
    """
    _check_alternative(alternative)
    obs = np.asarray(obs, dtype=np.float64)
    refs = np.asarray(refs, dtype=np.float64)
    if obs.ndim != 1:
        raise ValueError(f"obs must be 1-D (R,), got shape {obs.shape}")
    if refs.ndim != 2 or refs.shape[1] != obs.shape[0]:
        raise ValueError(f"refs must be (n_ref, {obs.shape[0]}), got shape {refs.shape}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    curves = np.vstack([obs[None, :], refs])
    s = curves.shape[0]
    # GET refuses s * alpha < 1: no curve could ever be outside the envelope.
    if s * alpha < 1 - 1e-8:
        raise ValueError(f"s = {s} curves with alpha = {alpha}: s * alpha < 1, the test cannot reject")

    e = erl_measures(curves, alternative)
    e1, e_ref = e[0], e[1:]
    n_high = 1 + int(np.sum(e_ref <= e1))  # conservative: tied references count as more extreme
    n_low = 1 + int(np.sum(e_ref < e1))    # liberal: tied references count as less extreme
    m = math.floor(alpha * s + 1e-9)
    # Reject when p_high <= alpha, compared in counts (n_high <= floor(alpha s)) so that
    # float rounding of alpha cannot flip it and it matches the envelope rule below exactly.
    reject = n_high <= m

    # E_(alpha) (IGI point 1): largest measure with #{e_i < E_(alpha)} <= alpha s, i.e. the
    # (m+1)-th smallest with m = floor(alpha s): every smaller distinct value has fewer
    # below it, every larger one at least m+1. The 1e-9 keeps alpha*s that should be an
    # integer (0.05 * 200) from flooring one too low after rounding.
    k_alpha = np.sort(e)[m]
    inside = e >= k_alpha   # I_alpha: curves less or as extreme as E_(alpha), obs included
    low = curves[inside].min(axis=0)
    high = curves[inside].max(axis=0)
    if alternative == "greater":
        low = np.full_like(low, -np.inf)
    elif alternative == "less":
        high = np.full_like(high, np.inf)

    return {"p_low": n_low / s, "p_high": n_high / s, "p": n_high / s,
            "reject": bool(reject), "alpha": float(alpha),
            "alternative": alternative, "n_ref": int(refs.shape[0]),
            "envelope_low": low.tolist(), "envelope_high": high.tolist()}
