"""Comparing two runs: is run B more collapsed than run A? (issue 8, `modeaudit compare`).

Statistics
----------
Balls. Each run's top-k distinct dense modes (chosen on that run's S, result.json
"modes") give balls ball(anchor, d0). Every ball, A's and B's, is counted exactly in
T_A (n_A rows) and in T_B (n_B rows) with the range-join kernels: x_A, x_B.

Test. For each ball, H0: the two generators put the same mass on it. Given the
total x_A + x_B, x_B ~ Binomial(x_A + x_B, n_B / (n_A + n_B)) under H0 (the exact
conditional binomial test of tasks/stats/two_sample.py, T_B in the role of the model
and T_A in the role of the reference). The test is TWO-SIDED, and Holm's adjustment
runs over all 2k balls together. A rejected ball is attributed to the run with the
larger share x / n (the direction of a two-sided rejection). Then

    more_collapsed = "B"  if some ball is rejected with B's share larger and none with A's,
                     "A"  the other way round,
                     null otherwise (nothing rejected, or rejections in both directions:
                          `conflicting` is then true).

Why two-sided and Holm over both families: under H0 (one generator, two seeds) the
event "declare A or declare B" is contained in "Holm rejects some true null", whose
probability Holm bounds by alpha under any dependence between balls (A's and B's
balls may coincide). A one-sided test per direction at alpha each would give up to
2 alpha. The balls are chosen on S_A and S_B, independent of T_A and T_B, so the
selection does not bias the counts. The binomial (rather than hypergeometric) law
makes the test slightly conservative.

MCCS difference. MCCS of run A's worst case (its S row worst_case.s_index) over the
first |C_A| rows of T_A, and of run B's worst case over the first |C_B| rows of T_B
(each run's own C, so each value equals the run's result.json worst_case.mccs);
difference = MCCS_B - MCCS_A. Interval: percentile bootstrap (1 - alpha) over the
rows of C_A and C_B, resampled independently, `replicates` times, numpy PCG64 with a
fixed seed. A resample of n rows with replacement is drawn exactly, and cheaply, by
first drawing how many of its rows fall on the rows with a non-zero MCCS term
(Binomial(n, nnz / n)) and then which of those (uniform with replacement): the same
law as resampling all n rows, in O(nnz) per replicate.

Frechet distance between T_A and T_B in the runs' embedding space: a seeded random
subset (without replacement, sorted) of at most `fd_rows` rows of each T, float64
statistics, tasks/metrics/fid.py. Two finite samples of one distribution have FD > 0
(bias ~ trace terms / rows); the value is descriptive, not a test.

Everything is deterministic for fixed inputs and settings. Pure compute (numpy,
scipy, numba kernels, in this process): no Prefect, no Dask.
"""
from __future__ import annotations

import math

import numpy as np

from modeaudit.tasks.join.kernels import arccos_over_pi, mccs_from_sums, range_counts
from modeaudit.tasks.metrics.fid import StreamingStats, frechet_distance_stats
from modeaudit.tasks.stats.two_sample import density_ratio_test

__all__ = ["compare_runs", "ball_counts_two", "decide", "mccs_terms", "bootstrap_mccs_difference", "fd_subsample"]

BLOCK = 65536


def _rows(x) -> int:
    return int(x.rows) if hasattr(x, "blocks") else int(np.asarray(x).shape[0])


def _blocks(x, stop: int | None = None):
    """(offset, rows) blocks of a Source or of an in-memory array (same block plan for both)."""
    n = _rows(x) if stop is None else min(stop, _rows(x))
    if hasattr(x, "blocks"):
        yield from x.blocks(0, n, BLOCK)
        return
    a = np.asarray(x)
    for lo in range(0, n, BLOCK):
        yield lo, a[lo:min(lo + BLOCK, n)]


def ball_counts_two(anchors, T_A, T_B, radius: float, *, kernel: str = "fast") -> tuple[np.ndarray, np.ndarray]:
    """Exact counts of ball(anchor, radius) in T_A and in T_B (int64 arrays, one per anchor)."""
    radii = np.array([float(radius)])
    a = np.asarray(anchors, dtype=np.float32)
    x_a = range_counts(a, _blocks(T_A), radii, kernel=kernel)[:, 0].astype(np.int64)
    x_b = range_counts(a, _blocks(T_B), radii, kernel=kernel)[:, 0].astype(np.int64)
    return x_a, x_b


def decide(tests: list[dict]) -> tuple[str | None, bool]:
    """(more_collapsed, conflicting) from the per-ball Holm decisions (module docstring)."""
    dirs = {t["direction"] for t in tests if t["reject"]}
    if dirs == {"B"}:
        return "B", False
    if dirs == {"A"}:
        return "A", False
    return None, len(dirs) > 1


def mccs_terms(anchor, T, n_c: int, theta: float) -> np.ndarray:
    """Per-row MCCS terms s(anchor, t) over the first n_c rows of T, float64 (distances in float64)."""
    a = np.asarray(anchor, dtype=np.float64).reshape(-1)
    out = np.empty(min(n_c, _rows(T)), dtype=np.float64)
    denom = math.expm1(theta)
    for lo, blk in _blocks(T, n_c):
        d = arccos_over_pi(np.asarray(blk, dtype=np.float64) @ a)
        out[lo:lo + d.shape[0]] = np.expm1(np.maximum(0.0, theta - d)) / denom
    return out


def _mccs(sum_, n) -> float:
    return float(mccs_from_sums(np.array([max(sum_, 0.0)]), n)[0])


def _boot_sums(terms: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Sums of `replicates` with-replacement resamples of `terms` (len n), drawn through the non-zero terms."""
    n = terms.size
    nz = terms[terms > 0]
    k = rng.binomial(n, nz.size / n, size=replicates) if nz.size else np.zeros(replicates, np.int64)
    out = np.empty(replicates, dtype=np.float64)
    for b in range(replicates):
        out[b] = nz[rng.integers(0, nz.size, size=int(k[b]))].sum() if k[b] else 0.0
    return out


def bootstrap_mccs_difference(terms_a: np.ndarray, terms_b: np.ndarray, *, alpha: float, replicates: int,
                              seed: int) -> dict:
    """MCCS_A, MCCS_B, their difference B - A and its percentile bootstrap 1 - alpha interval."""
    rng = np.random.default_rng(seed)
    na, nb = terms_a.size, terms_b.size
    m_a, m_b = _mccs(terms_a.sum(), na), _mccs(terms_b.sum(), nb)
    sa = _boot_sums(terms_a, replicates, rng)
    sb = _boot_sums(terms_b, replicates, rng)
    diff = mccs_from_sums(np.minimum(sb, nb), nb) - mccs_from_sums(np.minimum(sa, na), na)
    lo, hi = np.quantile(diff, [alpha / 2, 1 - alpha / 2])
    return {"a": m_a, "b": m_b, "difference": m_b - m_a, "interval": [float(lo), float(hi)],
            "confidence": 1 - alpha, "replicates": int(replicates), "seed": int(seed)}


def fd_subsample(T_A, T_B, rows: int, seed: int) -> dict:
    """Frechet distance between seeded random row subsets (<= rows each) of T_A and T_B."""
    rng = np.random.default_rng(seed)
    stats, used = [], []
    for T in (T_A, T_B):
        n = _rows(T)
        k = min(rows, n)
        idx = np.sort(rng.choice(n, size=k, replace=False)) if k < n else np.arange(n)
        st = StreamingStats(_dim(T))
        for lo, blk in _blocks(T):
            sel = idx[(idx >= lo) & (idx < lo + blk.shape[0])] - lo
            if sel.size:
                st.update(np.asarray(blk, dtype=np.float64)[sel])
        stats.append(st)
        used.append(int(k))
    a, b = stats
    return {"value": frechet_distance_stats(a, b), "rows_a": used[0],
            "rows_b": used[1], "seed": int(seed), "sampling": "random rows without replacement"}


def _dim(x) -> int:
    return int(x.dim) if hasattr(x, "blocks") else int(np.asarray(x).shape[1])


def compare_runs(modes_a, modes_b, T_A, T_B, *, d0: float, alpha: float, worst_a, worst_b, n_c_a: int, n_c_b: int,
                 theta: float, replicates: int = 1000, seed: int = 0, fd_rows: int = 20000,
                 kernel: str = "fast", mode_ids_a=None, mode_ids_b=None) -> dict:
    """The whole comparison on rows already in hand.

    modes_a / modes_b: anchor rows (k_A x dim, k_B x dim) of each run's distinct dense modes
    (from its S); T_A / T_B: Sources or 2-d arrays of unit rows; worst_a / worst_b: the worst-case
    anchor rows; n_c_a / n_c_b: rows of each T the MCCS runs over. mode_ids_*: S indices (reported).
    """
    modes_a = np.asarray(modes_a, dtype=np.float32).reshape(-1, _dim(T_A))
    modes_b = np.asarray(modes_b, dtype=np.float32).reshape(-1, _dim(T_B))
    n_a, n_b = _rows(T_A), _rows(T_B)
    anchors = np.concatenate([modes_a, modes_b])
    origin = ["A"] * len(modes_a) + ["B"] * len(modes_b)
    ids = list(mode_ids_a if mode_ids_a is not None else range(len(modes_a))) + \
        list(mode_ids_b if mode_ids_b is not None else range(len(modes_b)))
    x_a, x_b = ball_counts_two(anchors, T_A, T_B, d0, kernel=kernel)
    # T_B plays the model, T_A the reference: ratio = (x_B / n_B) / (x_A / n_A).
    tests = density_ratio_test(x_b, n_b, x_a, n_a, alpha=alpha, alternative="two-sided") if len(anchors) else []
    balls = []
    for i, t in enumerate(tests):
        share_a, share_b = x_a[i] / n_a, x_b[i] / n_b
        direction = None if share_a == share_b else ("B" if x_b[i] * n_a > x_a[i] * n_b else "A")
        balls.append({"mode_of": origin[i], "rank": i if origin[i] == "A" else i - len(modes_a),
                      "s_index": int(ids[i]), "x_a": int(x_a[i]), "x_b": int(x_b[i]), "share_a": float(share_a),
                      "share_b": float(share_b), "ratio_b_over_a": t["ratio"], "ci": t["ci"], "p": t["p"],
                      "p_adj": t["p_adj"], "reject": t["reject"], "direction": direction})
    more, conflicting = decide(balls)
    terms_a = mccs_terms(worst_a, T_A, n_c_a, theta)
    terms_b = mccs_terms(worst_b, T_B, n_c_b, theta)
    mccs = bootstrap_mccs_difference(terms_a, terms_b, alpha=alpha, replicates=replicates, seed=seed)
    mccs["theta"] = float(theta)
    mccs["rows_a"], mccs["rows_b"] = int(terms_a.size), int(terms_b.size)
    fd = fd_subsample(T_A, T_B, fd_rows, seed)
    if more == "B":
        level, headline = "collapse", "B is more collapsed than A"
    elif more == "A":
        level, headline = "ok", "A is more collapsed than B"
    elif conflicting:
        level, headline = "warning", "Dense balls differ in both directions (neither run is uniformly more collapsed)"
    elif mccs["interval"][0] > 0:
        level, headline = "warning", "B's worst case is tighter (MCCS interval above 0), no ball significant"
    else:
        level, headline = "ok", "Neither run is more collapsed"
    return {"more_collapsed": more, "conflicting": conflicting, "alpha": float(alpha),
            "verdict": {"level": level, "headline": headline},
            "sizes": {"T_a": n_a, "T_b": n_b, "modes_a": len(modes_a), "modes_b": len(modes_b)},
            "radius": float(d0), "test": {"kind": "exact conditional binomial, two-sided, Holm over all balls",
                                          "balls": balls},
            "mccs": mccs, "fd": fd}
