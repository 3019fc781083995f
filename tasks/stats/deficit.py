"""Deficit test: balls of the reference set that the model fills too little (a dropped or starved mode).

Why it exists
-------------
Every other test of the audit looks for EXCESS mass: its balls are centred on generated samples
(S), and the two-sample test asks whether the model puts more mass on them than the reference
does. A mode the model never generates is never a centre, and its missing mass is seen only
where it went (docs/toy-benchmarks.md: `dropped-junk`, the starved modes of ring8 gan seed 0).
This test turns the question around: balls centred on REFERENCE rows, counted in T and in
reference rows that did not choose them, one-sided "less".

Setting
-------
The reference set R (real data, or a baseline's samples) is split by row index: the first
n_sel rows choose the balls, the remaining n_R rows (held out) are counted. Centres: the
densest reference rows at d0, distinct (no two within d0), greedy like the dense modes of S
(tasks/stats/modes.py) but over every selection row, not a top-count candidate pool: a world of
equal modes gives near-equal counts, and a pool of the top counts would hold one or two modes.
Counting the held-out rows is what makes the test exact: balls chosen as dense on the selection
rows are denser than average there, so counting those same rows would inflate x_R and make
"less" reject under H0.

Statistic
---------
For ball i, x_T of the n_T rows of T and x_R of the n_R held-out rows fall in it. Given
n_i = x_T + x_R, x_T ~ Binomial(n_i, p0), p0 = n_T / (n_T + n_R) under H0 (the model and the
reference put the same mass on the ball), independent of the unknown mass (the conditional
argument of tasks/stats/two_sample.py). The p-value is the lower tail P(X <= x_T); Holm across the
balls controls the family-wise error rate under any dependence. ratio = (x_T / n_T) / (x_R / n_R)
with its two-sided 1 - alpha Clopper-Pearson interval (tasks/stats/two_sample.ratio_ci).
Everything is computed by tasks/stats/two_sample.density_ratio_test with alternative="less".

This module is pure compute (numpy); it must not import Prefect.
"""
from __future__ import annotations

import numpy as np

from modeaudit.tasks.stats.modes import distinct_modes
from modeaudit.tasks.stats.two_sample import density_ratio_test

__all__ = ["SELECT_ROWS", "split_reference", "reference_balls", "deficit_test", "summary"]

# At most this many reference rows choose the balls (a self-join, quadratic in the count);
# every other row is counted. 10,000 rows put ~1,000 rows on each of ten equal modes.
SELECT_ROWS = 10_000


def split_reference(n_ref: int, select_rows: int = SELECT_ROWS) -> int:
    """n_sel: rows [0, n_sel) choose the balls, rows [n_sel, n_ref) are counted.

    Half the reference (at most `select_rows`): the count side keeps at least as many rows as
    the selection side, because the test's power comes from x_R.
    """
    n_ref = int(n_ref)
    if n_ref < 2:
        raise ValueError(f"the deficit test needs at least 2 reference rows, got {n_ref}")
    return max(1, min(n_ref // 2, int(select_rows)))


def reference_balls(rows: np.ndarray, counts: np.ndarray, k: int, d0: float) -> np.ndarray:
    """Indices of up to k selection rows, densest first, no two within d0 (greedy over every row)."""
    rows = np.asarray(rows)
    return distinct_modes(rows, np.asarray(counts), k, d0, candidates=max(1, len(rows)))


def deficit_test(x_t, n_t: int, x_r, n_r: int, alpha: float) -> list[dict]:
    """Per ball: x_t, x_r, ratio, ci, p (lower tail), p_adj (Holm), reject; see the module docstring."""
    return density_ratio_test(x_t, n_t, x_r, n_r, alpha=alpha, alternative="less")


def summary(balls: list[dict], *, centres, select_counts, n_sel: int, n_r: int, n_t: int, d0: float,
            alpha: float) -> dict:
    """The result.json entry `tests.deficit` from the per-ball results (JSON-ready)."""
    out = []
    for b, i, c in zip(balls, centres, select_counts):
        out.append({"ref_index": int(i), "count_select": int(c), **b})
    # The family's p-value: the smallest Holm-adjusted one (reject iff p <= alpha); watch's history reads it.
    return {"reject": any(b["reject"] for b in out), "p": min((b["p_adj"] for b in out), default=1.0),
            "alternative": "less", "radius": float(d0),
            "alpha": float(alpha), "reference_rows_select": int(n_sel), "reference_rows_counted": int(n_r),
            "T_rows": int(n_t), "n_balls": len(out), "rejected_balls": sum(b["reject"] for b in out),
            "balls": out}
