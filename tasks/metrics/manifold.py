"""The k-NN manifolds of a real and a fake set: radii and cross ball counts, one exact pass each.

Precision/recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al.
2020) all read the same three joins, which prdc computes as three in-memory
distance matrices:

* R x R: the k-NN radius of every real row (self excluded; `knn_self`, which
  forms each pair's inner product once, using d(a, b) = d(b, a));
* F x F: the k-NN radius of every fake row;
* R x F, once: for each pair, whether F_j is strictly inside R_i's ball and
  whether R_i is strictly inside F_j's ball (`ball_counts` with both radii).

The R x F join streams the fake rows in blocks of `block_rows` rows with global
offsets; the real rows (its queries) are held in memory, as are both sets for
their self-joins.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modeaudit.tasks.metrics.knn import _check_k, _rows32


@dataclass(frozen=True)
class Manifolds:
    """Everything the four k-NN metrics need, exact (see tasks/metrics/knn.py)."""
    k: int
    distance: str
    real_knn: np.ndarray            # (n_real, k) ascending k-NN distances within R
    fake_knn: np.ndarray            # (n_fake, k) within F
    fake_in_real_balls: np.ndarray  # per fake row: #{i : d(R_i, F_j) < r_R[i]}
    real_ball_counts: np.ndarray    # per real row: #{j : d(R_i, F_j) < r_R[i]}
    real_in_fake_balls: np.ndarray  # per real row: #{j : d(R_i, F_j) < r_F[j]}

    @property
    def real_radii(self) -> np.ndarray:
        """k-NN radius of every real row."""
        return self.real_knn[:, -1]

    @property
    def fake_radii(self) -> np.ndarray:
        """k-NN radius of every fake row."""
        return self.fake_knn[:, -1]


def blocks_of(x: np.ndarray, block_rows: int | None):
    """(offset, rows) blocks of an in-memory array; None: one block."""
    if block_rows is None or block_rows >= x.shape[0]:
        return [(0, x)]
    if block_rows < 1:
        raise ValueError(f"block_rows must be a positive integer, got {block_rows}")
    return ((o, x[o:o + block_rows]) for o in range(0, x.shape[0], block_rows))


def check_sets(real, fake, k: int, distance: str):
    """Both sets as float32 rows of one width, with enough rows for k; ValueError otherwise.

    A FeatureFile (tasks/metrics/rows.py) is checked by its shape and passed on unread; for
    the angular distance it must read unit rows (FeatureFile.as_unit())."""
    from modeaudit.tasks.metrics.rows import FeatureFile
    for name, x in (("real", real), ("fake", fake)):
        if isinstance(x, FeatureFile) and distance == "angular" and not x.unit:
            raise ValueError(f"the angular distance needs unit rows; read the {name} file with FeatureFile.as_unit()")
    r = real if isinstance(real, FeatureFile) else _rows32(real, "real")
    f = fake if isinstance(fake, FeatureFile) else _rows32(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real rows have width {r.shape[1]} but fake rows have width {f.shape[1]}; both must "
                         "come from the same feature extractor")
    k = _check_k(k)
    for name, x in (("real", r), ("fake", f)):
        if x.shape[0] <= k:
            raise ValueError(f"the {name} set has {x.shape[0]} rows; k={k} needs at least k + 1 = {k + 1} "
                             "(a row is not its own neighbour)")
    if distance == "angular":
        for name, x in (("real", r), ("fake", f)):
            if isinstance(x, FeatureFile):
                continue   # unit-scaled on read
            norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
            if np.any(np.abs(norms - 1.0) > 1e-3):
                raise ValueError(f"the angular distance needs unit rows; {name} has rows of norm "
                                 f"{norms.min():.4g}..{norms.max():.4g} (normalise them, or use euclidean)")
    return r, f, k


def manifold_counts(real, fake, k: int = 5, distance: str = "euclidean", *,
                    block_rows: int | None = None, real_knn=None, engine=None) -> Manifolds:
    """The three exact joins behind precision, recall, density and coverage.

    real, fake: (n, d) float rows (used as float32), or FeatureFiles. `real_knn` may pass R's k-NN
    distances already computed (e.g. for several fake sets against one real set).
    engine: where the joins run (tasks/metrics/engine.KnnEngine: a kernel, optionally
    a Dask client); default in this process with the numba kernel and `block_rows`.
    """
    from modeaudit.tasks.metrics.engine import KnnEngine
    r, f, k = check_sets(real, fake, k, distance)
    engine = KnnEngine(block_rows=block_rows) if engine is None else engine
    if real_knn is None:
        real_knn = engine.knn_self(r, k, distance)
    fake_knn = engine.knn_self(f, k, distance)
    c = engine.ball_counts(r, f, real_knn[:, -1], fake_knn[:, -1], distance)
    return Manifolds(k, distance, real_knn, fake_knn, fake_in_real_balls=c.a_balls_containing,
                     real_ball_counts=c.in_a_balls_count, real_in_fake_balls=c.b_balls_containing)
