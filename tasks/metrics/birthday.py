"""Birthday-paradox support size (Arora & Zhang 2017, "Do GANs learn the distribution? Some
theory and empirics"; Arora, Risteski & Zhang, ICLR 2018).

The test: if batches of s samples contain a near-duplicate pair with probability
about 1/2, the distribution's support size is about s^2. Arora & Zhang judged
near-duplicates by eye; here a pair is a near-duplicate when its distance is
strictly below a threshold tau calibrated on the real set, and the probability is
computed from all pairs of the sample instead of drawing batches.

Estimator, exactly:

1. tau = the `quantile`-quantile (default 0.01, numpy method "lower", so tau is an
   observed distance) of the real rows' nearest-neighbour distances within the
   real set (self excluded). About 1 % of real rows have a neighbour closer than tau.
2. P = #{unordered pairs {a, b} of the fake rows : d(a, b) < tau}, exact (from
   the k-NN lists; rows with >= k neighbours closer than tau get a full count).
   p = P / C(M, 2) is the chance that two random fake rows are near-duplicates.
3. Treating the C(s, 2) pairs of a batch of s as independent (the birthday
   approximation), P(batch has a near-duplicate) = 1 - (1 - p)^C(s,2), which we take
   as 1 - exp(-p C(s, 2)). The batch size is the smallest integer s >= 2 with
   p C(s, 2) >= ln 2, i.e. with that probability >= 1/2:
       support_batch = ceil((1 + sqrt(1 + 8 ln 2 / p)) / 2)
4. support_size = support_batch^2 (Arora & Zhang's rule). For a uniform
   distribution on N points, p = 1/N and support_size ~ 2 ln 2 N = 1.39 N.

The same steps on the real set (its own pairs, the same tau) give
support_size_real, the yardstick: a fake support much smaller than the real one
means the generator repeats itself. With P = 0 the sample is too small to see a
near-duplicate: support_batch and support_size are None and
support_size_lower_bound is the value P = 1 would give (the largest support this
sample size can resolve).
"""
from __future__ import annotations

import math

import numpy as np

from modeaudit.tasks.metrics.knn import ball_counts

__all__ = ["duplicate_threshold", "near_duplicate_pairs", "birthday_batch", "birthday_support"]

DUP_QUANTILE = 0.01


def duplicate_threshold(real_knn, quantile: float = DUP_QUANTILE) -> float:
    """tau: the `quantile` of the real rows' nearest-neighbour distances (column 0 of their k-NN lists)."""
    q = float(quantile)
    if not (0.0 < q < 1.0):
        raise ValueError(f"the near-duplicate quantile must lie in (0, 1), got {quantile!r}")
    nn = np.asarray(real_knn, dtype=np.float64)[:, 0]
    return float(np.quantile(nn, q, method="lower"))


def near_duplicate_pairs(x, knn, tau: float, distance: str = "euclidean", blocks=None, engine=None) -> int:
    """#{unordered pairs of rows of x with d < tau}, exact.

    `knn` is x's (n, k) ascending k-NN distances (self excluded). A row whose k-th
    distance is >= tau has all its closer-than-tau neighbours in its list; the other
    rows are counted against all of x (streamed as `blocks`, default one block; or
    by `engine`, a tasks/metrics/engine.KnnEngine, which streams x itself).
    """
    knn = np.asarray(knn)
    per_row = np.count_nonzero(knn < tau, axis=1).astype(np.int64)
    full = np.flatnonzero(knn[:, -1] < tau)
    if full.size and engine is not None:
        from modeaudit.tasks.metrics.rows import rows_at
        # x may be a FeatureFile the workers read: so are the rows to count (in a collapsed set, most of it).
        per_row[full] = engine.ball_counts(rows_at(x, full), x, tau, None, distance,
                                           a_ids=full).in_a_balls_count
    elif full.size:
        c = ball_counts(np.asarray(x)[full], x if blocks is None else blocks, tau, None, distance=distance,
                        a_ids=full)
        per_row[full] = c.in_a_balls_count
    total = int(per_row.sum())
    # d(a, b) and d(b, a) are the same float64 (same terms, same order), so each
    # pair was counted from both ends; an odd total would be a kernel bug.
    if total % 2:
        raise RuntimeError(f"near-duplicate counts are not symmetric (total {total}); please report this")
    return total // 2


def birthday_batch(pairs: int, n: int) -> int | None:
    """Smallest batch size s >= 2 with p C(s, 2) >= ln 2, p = pairs / C(n, 2); None if pairs == 0."""
    if pairs <= 0:
        return None
    c = math.log(2.0) * n * (n - 1) / pairs  # s (s - 1) >= c
    s = max(2, math.ceil((1.0 + math.sqrt(1.0 + 4.0 * c)) / 2.0))
    # The float square root can be off by one either way.
    while s > 2 and (s - 1) * (s - 2) >= c:
        s -= 1
    while s * (s - 1) < c:
        s += 1
    return s


def _support(pairs: int, n: int) -> dict:
    s = birthday_batch(pairs, n)
    out = {"batch": s, "size": None if s is None else s * s, "pairs": pairs}
    if s is None and n >= 2:
        lb = birthday_batch(1, n)
        out["lower_bound"] = lb * lb
    return out


def birthday_support(real, fake, real_knn, fake_knn, distance: str = "euclidean", *,
                     quantile: float = DUP_QUANTILE, real_blocks=None, fake_blocks=None, engine=None) -> dict:
    """Birthday-paradox support sizes of the fake and the real set (module docstring), as a flat dict.

    real_knn / fake_knn: each set's (n, k) k-NN distances within itself; engine: where the
    near-duplicate counts run (see near_duplicate_pairs).
    """
    tau = duplicate_threshold(real_knn, quantile)
    fake_s = _support(near_duplicate_pairs(fake, fake_knn, tau, distance, fake_blocks, engine), len(fake_knn))
    real_s = _support(near_duplicate_pairs(real, real_knn, tau, distance, real_blocks, engine), len(real_knn))
    out = {"support_size": fake_s["size"], "support_batch": fake_s["batch"],
           "support_size_real": real_s["size"], "support_batch_real": real_s["batch"],
           "dup_threshold": tau, "dup_quantile": float(quantile),
           "dup_pairs_fake": fake_s["pairs"], "dup_pairs_real": real_s["pairs"]}
    if "lower_bound" in fake_s:
        out["support_size_lower_bound"] = fake_s["lower_bound"]
    if "lower_bound" in real_s:
        out["support_size_real_lower_bound"] = real_s["lower_bound"]
    return out
