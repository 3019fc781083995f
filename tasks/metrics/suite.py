"""All the sample-based metrics of a fake set against a real set, sharing the exact joins.

`compute_metrics` runs the k-NN passes once (R x R, F x F, R x F; see
tasks/metrics/manifold.py) and derives precision/recall, density/coverage and the
birthday-paradox support size from them; KID uses its own random subsets.
"""
from __future__ import annotations

import math

import numpy as np

from modeaudit.tasks.metrics.birthday import DUP_QUANTILE, birthday_support
from modeaudit.tasks.metrics.density_coverage import density_coverage_from_counts
from modeaudit.tasks.metrics.kid import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS, kid
from modeaudit.tasks.metrics.knn import _check_distance, _sq_norms
from modeaudit.tasks.metrics.manifold import check_sets, manifold_counts
from modeaudit.tasks.metrics.precision_recall import precision_recall_from_counts
from modeaudit.tasks.metrics.rows import FeatureFile, shape_of, unit_rows

__all__ = ["compute_metrics", "unit_rows"]


# A row this many times the median norm widens every pair's re-check band (the GEMM's error bound uses the
# largest norms): one row at 100x made a 1e4 x 128 self-join 1.3x slower, at 1e3x 5x, at 1e4x 50x (AMD EPYC,
# 2026-12-05). The results stay exact; the user hears why the run is slow.
OUTLIER_NORM_RATIO = 300.0


def _note_outlier_norms(name: str, x) -> None:
    """A note (console.note) when a row's norm is OUTLIER_NORM_RATIO times the set's median or more."""
    from modeaudit.tasks.console import note
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < 2:
        return
    norms = np.sqrt(_sq_norms(x))
    med = float(np.median(norms))
    top = int(np.argmax(norms))
    if norms[top] >= OUTLIER_NORM_RATIO * med:
        many = int(np.count_nonzero(norms >= OUTLIER_NORM_RATIO * med))
        note(f"note: {name} row {top} has norm {norms[top]:.3g}, {norms[top] / med if med > 0 else math.inf:.3g}x "
             f"the median row's ({many} row(s) at {OUTLIER_NORM_RATIO:g}x or more): the exact re-checks' band is set by "
             "the largest norms, so this run may take far longer than usual (the results stay exact); such rows "
             "are often broken features")


def compute_metrics(real, fake, k: int = 5, distance: str = "euclidean", *, block_rows: int | None = 65536,
                    kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE,
                    kid_seed: int = KID_SEED, dup_quantile: float = DUP_QUANTILE, client=None,
                    kernel: str = "fast", group_rows: int | None = None) -> dict:
    """Precision, recall, density, coverage, KID and support size of `fake` against `real`.

    real, fake: (n, d) feature rows (used as float32), or FeatureFiles (tasks/metrics/rows.py):
    with a client, the workers read those themselves and this process never holds either
    set (in process they are read whole). distance="euclidean" uses the
    rows as given (what prdc and torch-fidelity do); "angular" scales them to unit
    length first and uses arccos(<a, b>) / pi. KID is computed on the same rows.
    client: a Dask `distributed.Client` to run the k-NN joins on (groups of
    `group_rows` query rows per task, tasks/metrics/engine.py), None: in this process;
    kernel: "fast" (numba), "torch-cpu", "torch-cuda" or "auto" (tasks/join/backend.py).
    The result does not depend on client, kernel, group_rows or block_rows: the joins
    are exact. KID (random subsets) runs in this process, on its subsets' rows only.
    Returns a JSON-ready dict: precision, recall, density, coverage, kid, kid_std,
    support_size, and the settings and sizes behind them (docs/metrics.md).
    """
    from modeaudit.tasks.metrics.engine import KnnEngine
    _check_distance(distance)
    engine = KnnEngine(client, kernel, block_rows, group_rows)
    if client is None:
        # One read of each file; every join below reads its rows from memory.
        real, fake = (x.read() if isinstance(x, FeatureFile) else x for x in (real, fake))
    if distance == "angular":
        real, fake = (x.as_unit() if isinstance(x, FeatureFile) else unit_rows(x) for x in (real, fake))
    r, f, k = check_sets(real, fake, k, distance)
    if distance == "euclidean":
        for name, x in (("real", r), ("fake", f)):
            if not isinstance(x, FeatureFile):
                _note_outlier_norms(name, x)
    m = manifold_counts(r, f, k, distance, block_rows=block_rows, engine=engine)
    precision, recall = precision_recall_from_counts(m.fake_in_real_balls, m.real_in_fake_balls)
    density, coverage = density_coverage_from_counts(m.fake_in_real_balls, m.real_ball_counts, k)
    out = {"precision": precision, "recall": recall, "density": density, "coverage": coverage}
    out.update(kid(r, f, subsets=kid_subsets, subset_size=kid_subset_size, seed=kid_seed))
    out.update(birthday_support(r, f, m.real_knn, m.fake_knn, distance, quantile=dup_quantile,
                                engine=engine))
    out.update({"k": k, "distance": distance, "n_real": int(shape_of(r)[0]), "n_fake": int(shape_of(f)[0]),
                "dim": int(shape_of(r)[1]), "kid_seed": int(kid_seed)})
    return out
