"""Improved precision and recall (Kynkaanniemi, Karras, Laine, Lehtinen, Aila, NeurIPS 2019).

Each real row R_i carries a ball of radius r_R(i) = distance to its k-th nearest
real neighbour (itself excluded); the union of these balls is the estimated real
manifold. Likewise r_F(j) for the fake rows. With N real and M fake rows:

    precision = (1/M) sum_j 1[ exists i : d(R_i, F_j) < r_R(i) ]
    recall    = (1/N) sum_i 1[ exists j : d(R_i, F_j) < r_F(j) ]

Strict "<" (a point exactly on a sphere is outside), as in the reference code the
`prdc` package carries (Naeem et al.'s github.com/clovaai/generative-evaluation-prdc),
so the values equal ``prdc.compute_prdc``'s on the same features. The paper's
default k is 3; prdc's and this CLI's is 5.
"""
from __future__ import annotations

import numpy as np

from modeaudit.tasks.metrics.manifold import Manifolds, manifold_counts

__all__ = ["precision_recall", "precision_recall_from_counts"]


def precision_recall_from_counts(fake_in_real_balls, real_in_fake_balls) -> tuple[float, float]:
    """(precision, recall) from per-row strict ball-membership counts (see the module docstring)."""
    a = np.asarray(fake_in_real_balls)
    b = np.asarray(real_in_fake_balls)
    if a.size == 0 or b.size == 0:
        raise ValueError("precision and recall need at least one real and one fake row")
    return float(np.mean(a > 0)), float(np.mean(b > 0))


def precision_recall(real, fake, k: int = 5, distance: str = "euclidean", *,
                     block_rows: int | None = None, manifolds: Manifolds | None = None) -> dict:
    """{'precision', 'recall'} of fake rows against real rows, exact (tasks/metrics/knn.py)."""
    m = manifolds if manifolds is not None else manifold_counts(real, fake, k, distance, block_rows=block_rows)
    p, r = precision_recall_from_counts(m.fake_in_real_balls, m.real_in_fake_balls)
    return {"precision": p, "recall": r}
