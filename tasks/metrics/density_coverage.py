"""Density and coverage (Naeem, Oh, Uh, Choi, Yoo, ICML 2020, "Reliable Fidelity and
Diversity Metrics for Generative Models"; reference code: the `prdc` package).

With r_R(i) the distance of real row R_i to its k-th nearest real neighbour
(itself excluded), N real and M fake rows:

    density  = 1/(k M) sum_j sum_i 1[ d(R_i, F_j) < r_R(i) ]
    coverage = (1/N) sum_i 1[ min_j d(R_i, F_j) < r_R(i) ]
             = (1/N) sum_i 1[ #{j : d(R_i, F_j) < r_R(i)} > 0 ]

Density counts how many real balls hold each fake sample (it can exceed 1);
coverage is the share of real balls holding at least one fake sample, so only the
real set's radii are used (outliers in the fake set cannot inflate it). Strict "<"
as in prdc.
"""
from __future__ import annotations

import numpy as np

from modeaudit.tasks.metrics.manifold import Manifolds, manifold_counts

__all__ = ["density_coverage", "density_coverage_from_counts"]


def density_coverage_from_counts(fake_in_real_balls, real_ball_counts, k: int) -> tuple[float, float]:
    """(density, coverage) from the per-fake-row count of real balls holding it and
    the per-real-row count of fake rows inside its ball."""
    a = np.asarray(fake_in_real_balls)
    b = np.asarray(real_ball_counts)
    if a.size == 0 or b.size == 0:
        raise ValueError("density and coverage need at least one real and one fake row")
    # The sum is an exact integer; divide once so the value is the correctly rounded quotient.
    return float(int(a.sum()) / (k * a.size)), float(np.mean(b > 0))


def density_coverage(real, fake, k: int = 5, distance: str = "euclidean", *,
                     block_rows: int | None = None, manifolds: Manifolds | None = None) -> dict:
    """{'density', 'coverage'} of fake rows against real rows, exact (tasks/metrics/knn.py)."""
    m = manifolds if manifolds is not None else manifold_counts(real, fake, k, distance, block_rows=block_rows)
    d, c = density_coverage_from_counts(m.fake_in_real_balls, m.real_ball_counts, m.k)
    return {"density": d, "coverage": c}
