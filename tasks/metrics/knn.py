"""Exact k-NN radii and strict ball counts, streamed over row blocks (numba).

The sample-based diversity metrics (precision/recall, density/coverage, the
birthday-paradox support size) need two things, and peers (prdc, torch-fidelity)
get both from an O(N^2) in-memory distance matrix:

* the k-th nearest-neighbour distance of every row of a set within itself, the
  row itself excluded (by global row index, not by value: a duplicate elsewhere
  in the set is a neighbour at distance 0, as in prdc's "k + 1-th including self");
* for two sets A and B with a ball around each row, how many rows of the other
  set lie strictly inside each ball and how many balls contain each row. Strict,
  as in prdc (``distance < radius``): a point exactly on a k-NN sphere is outside.

Distances
---------
``euclidean``: d(a, b) = sqrt(sum_k (a_k - b_k)^2), the distance peers use on raw
feature rows. ``angular``: d(a, b) = arccos(clip(<a, b>, -1, 1)) / pi on unit rows
(this project's distance; the rows are used as given, normalise them first).

Exactness
---------
Both are defined on the float32 rows, evaluated in float64 in one fixed order
(`_exact_sqdist`, and `_exact_dist` of the join kernels for angular: four strided
accumulators, then (s0 + s1) + (s2 + s3)); `knn_distances_reference` and
`ball_counts_reference` evaluate the same expression with numpy, so constructed
ties (duplicated or mirrored rows, rows on a grid) are ties in both and the fast
path returns exactly the reference's radii and counts.

The fast path works like `tasks/join/kernels.py`: a float32 GEMM gives every score
s = <a, b>, whose error is bounded by `_gemm_eps` (the join kernels' bound). The
score becomes a key that orders pairs like the distance does:
key = |a|^2 + |b|^2 - 2 s (euclidean, squared norms in float64) or key = -2 s
(angular), with a known error bound `tol`. (The bfloat16 GEMM scores rows less a common
point c, and its keys carry per-row terms for it, for either distance: see _bf16_rows.)
Only keys within `tol` of a decision are re-evaluated in float64 from the rows:

* k-NN (`knn_distances`, streamed queries x blocks): per row, a running sorted
  list of the k smallest keys seen (phase A) and of the k smallest exact distances
  (phase B). A pair is evaluated exactly only if its key is within 2 tol of the
  running k-th key and within tol of the running k-th exact distance; every pair
  skipped is provably farther than the final k-th distance. About k ln(N / k)
  exact evaluations per row in random order.
* k-NN within one set (`knn_self`): the same bound in one pass over the upper
  triangle of X X^T, each tile updating the lists of its rows and of its columns
  (d(a, b) and d(b, a) are the same float64), so the GEMM covers each pair once.
  Pairs under the bound are buffered and evaluated exactly at the end, when most
  of them are far above the final k-th key: ~k exact distances per row.
* Ball counts: a pair is decided from its key unless the key is within tol of the
  squared radius (or of -2 cos(pi r)); only those are re-evaluated.

Results are exact values or integer counts, so they do not depend on the number of
threads, the tile order, or how the points were split into blocks.

The same joins with the GEMM and its filtering in torch (CUDA; the CPU for tests) are in
knn_torch.py, equal bit for bit; tasks/join/backend.py chooses between them, and
engine.py runs them in process or as Dask tasks over groups of query rows.

Streaming protocol (faiss contrib/exhaustive_search.py's): `blocks` is an iterable
of (offset, block) with block a (b, d) array whose global row indices start at
`offset` (a bare array is one block at offset 0). The query rows are held in
memory; memory beyond them is O(queries x k + tile) per tile thread (a self-join's
per-row candidate buffers included), the bfloat16 GEMM's threads together kept under
_BF16_WORKERS_BYTES (fewer threads, each with more OpenMP threads, beyond it).
"""
from __future__ import annotations

import functools
import math
import threading

import numpy as np
from numba import njit

from modeaudit.tasks.join.backend import cpu_has_amx_bf16
from modeaudit.tasks.join.kernels import (
    arccos_over_pi,
    _check_ids, _check_matrix, _exact_dist, _gemm_eps, _iter_blocks, _max_norm, _n_workers,
)
from modeaudit.tasks.join.threads import compute_threads, openmp_threads, run_in_threads, shared_items

__all__ = [
    "DISTANCES",
    "knn_distances",
    "knn_self",
    "knn_self_pair",
    "merge_knn",
    "pair_rows",
    "even_tile",
    "self_spans",
    "pair_spans",
    "knn_distances_reference",
    "ball_counts",
    "ball_counts_reference",
    "pair_distances_reference",
    "BallCounts",
]

DISTANCES = ("euclidean", "angular")

# Tile shape (query rows x point rows), as in the join kernels. A worker owns a
# query tile for a whole block, so the per-row k-NN lists are never shared.
_QUERY_TILE = 512
_POINT_TILE = 2048
# Square tiles of the symmetric self-join (knn_self): 4 MB of float32 scores.
_SELF_TILE = 1024
# Width of the branch-free pre-check chunks: most chunks hold no candidate at all.
_CHUNK = 32

_U64 = 2.0 ** -53


def _check_distance(distance: str) -> bool:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {', '.join(DISTANCES)}; got {distance!r}")
    return distance == "angular"


def _check_k(k, n_points: int | None = None) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if n_points is not None and k >= n_points:
        raise ValueError(f"k={k} needs at least k + 1 = {k + 1} rows (a row is not its own neighbour); "
                         f"the set has {n_points}")
    return int(k)


def _rows32(x, name: str) -> np.ndarray:
    """The rows as C-contiguous float32: the metrics are defined on float32 rows. ValueError for rows that are
    not finite, as given or once rounded to float32 (float64 values past 3.4e38, as the references say)."""
    x = _check_matrix(x, name)
    if x.dtype == np.float32:
        return np.ascontiguousarray(x)
    with np.errstate(over="ignore"):
        x32 = np.ascontiguousarray(x, dtype=np.float32)
    if x32.size and not np.all(np.isfinite(x32)):
        raise ValueError(f"{name} has values beyond float32's range (|x| > 3.4e38), on which the metrics are "
                         "defined; rescale the features")
    return x32


def _sq_norms(x32: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x32, x32, dtype=np.float64)


# ----------------------------------------------------------------------------
# float64 references (numpy; memory O(a * b * d) per chunk, for tests and small sets)


def pair_distances_reference(a, b, distance: str = "euclidean") -> np.ndarray:
    """All pairwise distances of float32 rows in float64, (len(a), len(b)).

    The sums run in the fixed order of the fast path's exact re-check (four strided
    running sums, then (s0 + s1) + (s2 + s3), the tail into s0), each sum written as a
    numpy running addition, so every pair gets bit-for-bit the value the kernels use.
    """
    angular = _check_distance(distance)
    a = _rows32(a, "a").astype(np.float64)
    b = _rows32(b, "b").astype(np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a has width {a.shape[1]} but b has width {b.shape[1]}")
    n, d = a.shape[0], a.shape[1]
    d4 = d - d % 4
    out = np.empty((n, b.shape[0]))
    bt = np.ascontiguousarray(b.T)
    # One component at a time over a cache-sized chunk of pairs (2^15, 256 KiB a sum): the same
    # additions as a cumsum over (pairs, d / 4, 4) lanes, without its pairs x d temporaries, which
    # made the reference 3-6x slower than this and a large share of the test suite.
    step = max(1, (1 << 15) // max(1, b.shape[0]))
    for i0 in range(0, n, step):
        ai = a[i0:i0 + step]
        shape = (ai.shape[0], b.shape[0])
        lanes = [np.zeros(shape) for _ in range(4)]
        term = np.empty(shape)
        for t in range(d):
            if angular:
                np.multiply(ai[:, t, None], bt[t][None, :], out=term)
            else:
                np.subtract(ai[:, t, None], bt[t][None, :], out=term)
                np.multiply(term, term, out=term)
            acc = lanes[t % 4] if t < d4 else lanes[0]
            np.add(acc, term, out=acc)
        tot = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
        out[i0:i0 + step] = arccos_over_pi(tot) if angular else np.sqrt(tot)
    return out


def knn_distances_reference(x, k: int, distance: str = "euclidean") -> np.ndarray:
    """Brute-force k nearest-neighbour distances of every row within x, self excluded, (n, k) ascending."""
    x = _rows32(x, "x")
    k = _check_k(k, x.shape[0])
    dist = pair_distances_reference(x, x, distance)
    np.fill_diagonal(dist, np.inf)
    return np.sort(dist, axis=1)[:, :k]


class BallCounts:
    """Strict ball counts between sets A (rows i) and B (rows j), int64 arrays.

    in_a_balls_count[i] = #{j : d(A_i, B_j) < radii_a[i]}   (B rows inside A_i's ball)
    a_balls_containing[j] = #{i : d(A_i, B_j) < radii_a[i]} (A balls holding B_j)
    in_b_balls_count[j] = #{i : d(A_i, B_j) < radii_b[j]}   (A rows inside B_j's ball)
    b_balls_containing[i] = #{j : d(A_i, B_j) < radii_b[j]} (B balls holding A_i)
    Arrays for a side without radii are all zero.
    """

    __slots__ = ("in_a_balls_count", "a_balls_containing", "in_b_balls_count", "b_balls_containing")

    def __init__(self, in_a_balls_count, a_balls_containing, in_b_balls_count, b_balls_containing):
        self.in_a_balls_count = in_a_balls_count
        self.a_balls_containing = a_balls_containing
        self.in_b_balls_count = in_b_balls_count
        self.b_balls_containing = b_balls_containing

    def as_tuple(self):
        """The four arrays in the order of the constructor."""
        return (self.in_a_balls_count, self.a_balls_containing, self.in_b_balls_count, self.b_balls_containing)


def _radii(r, n: int, name: str) -> np.ndarray | None:
    if r is None:
        return None
    r = np.asarray(r, dtype=np.float64)
    if r.ndim == 0:
        r = np.full(n, float(r))
    if r.shape != (n,):
        raise ValueError(f"{name} must be a scalar or one radius per row ({n}), got shape {r.shape}")
    if np.any(np.isnan(r)):
        raise ValueError(f"{name} contains NaN")
    return r


def ball_counts_reference(a, b, radii_a=None, radii_b=None, distance: str = "euclidean",
                          *, a_ids=None, b_offset: int = 0) -> BallCounts:
    """Brute-force strict ball counts (see BallCounts), from `pair_distances_reference`.

    The pair a_ids[i] == b_offset + j is skipped (a row is not in its own ball).
    """
    a = _rows32(a, "a")
    b = _rows32(b, "b")
    ra = _radii(radii_a, a.shape[0], "radii_a")
    rb = _radii(radii_b, b.shape[0], "radii_b")
    ids = _check_ids(a_ids, a.shape[0])
    dist = pair_distances_reference(a, b, distance)
    local = ids - int(b_offset)
    rows = np.nonzero((local >= 0) & (local < b.shape[0]))[0]
    dist[rows, local[rows]] = np.inf
    z_a, z_b = np.zeros(a.shape[0], np.int64), np.zeros(b.shape[0], np.int64)
    ina = dist < ra[:, None] if ra is not None else None
    inb = dist < rb[None, :] if rb is not None else None
    return BallCounts(
        ina.sum(axis=1).astype(np.int64) if ina is not None else z_a,
        ina.sum(axis=0).astype(np.int64) if ina is not None else z_b.copy(),
        inb.sum(axis=0).astype(np.int64) if inb is not None else z_b,
        inb.sum(axis=1).astype(np.int64) if inb is not None else z_a.copy(),
    )


# ----------------------------------------------------------------------------
# numba kernels (serial, nogil; run from the drivers' worker threads)


@njit(cache=True, nogil=True)
def _exact_sqdist(A, i, B, j):
    """||A[i] - B[j]||^2 in float64, four strided accumulators (see pair_distances_reference)."""
    n = A.shape[1]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    k = 0
    while k + 4 <= n:
        t0 = np.float64(A[i, k]) - np.float64(B[j, k])
        t1 = np.float64(A[i, k + 1]) - np.float64(B[j, k + 1])
        t2 = np.float64(A[i, k + 2]) - np.float64(B[j, k + 2])
        t3 = np.float64(A[i, k + 3]) - np.float64(B[j, k + 3])
        s0 += t0 * t0
        s1 += t1 * t1
        s2 += t2 * t2
        s3 += t3 * t3
        k += 4
    while k < n:
        t0 = np.float64(A[i, k]) - np.float64(B[j, k])
        s0 += t0 * t0
        k += 1
    return (s0 + s1) + (s2 + s3)


@njit(cache=True, nogil=True)
def _exact(A, i, B, j, angular):
    if angular:
        return _exact_dist(A, i, B, j)
    return np.sqrt(_exact_sqdist(A, i, B, j))


# Any order, so LLVM may vectorise the sum (several SIMD accumulators, fused multiply-adds): 3-6x faster per
# pair than the fixed-order sum, whose four dependent chains wait on the adder's latency. Never a result, only
# a sieve in front of _exact (see `sieve_rel`): no finite-math flags, so NaN and inf keep their meaning.
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _any_order_sqdist(A, i, B, j):
    s = 0.0
    for k in range(A.shape[1]):
        t = np.float64(A[i, k]) - np.float64(B[j, k])
        s += t * t
    return s


def sieve_rel(dim: int) -> float:
    """Relative margin within which `_any_order_sqdist` cannot decide ``distance < r`` for the fixed-order sum.

    Both sums add d non-negative terms fl(fl(a_k - b_k)^2), each within gamma_3 of (a_k - b_k)^2, in some
    order (fused or not): each is within gamma_(d+2) S of the exact sum S (Higham, Accuracy and Stability
    of Numerical Algorithms, 2nd ed., sections 3.1 and 4.2), so they differ by at most ~2 gamma_(d+2) g.
    Twice that, plus a few units for r * r and the square root, is the margin: outside it the cheap sum's
    side of r is the fixed-order sum's side, so every decision is the one `_exact` would make."""
    return _sieve_rel(dim)


@njit(cache=True, nogil=True)
def _sieve_rel(dim):
    return 4.0 * (dim + 8) * _U64 + 16.0 * _U64


@njit(cache=True, nogil=True)
def _inside(A, q, B, c, angular, r, rel, g, d):
    """(exact distance < r, g, d): decided by the any-order squared distance g when it lies outside
    r^2 (1 +- rel), else by the fixed-order distance d. g, d < 0: not computed yet (a pair tested against
    two balls computes each at most once)."""
    if not angular:
        if g < 0.0:
            g = _any_order_sqdist(A, q, B, c)
        r2 = r * r
        if g < r2 * (1.0 - rel):
            return True, g, d
        if g > r2 * (1.0 + rel):
            return False, g, d
    if d < 0.0:
        d = _exact(A, q, B, c, angular)
    return d < r, g, d


@njit(cache=True, nogil=True)
def _below(A, q, B, c, angular, t):
    """The exact distance of pair (A[q], B[c]) where it may be below t, else inf (it is not: exact >= t).

    A k-NN list takes a pair only if its exact distance is below the list's k-th, and most pairs re-checked
    after the first k are not: the any-order sum (`_any_order_sqdist`, 3-6x faster) rules those out when it
    lies above t^2 (1 + sieve_rel), where `_inside` would call the pair outside a ball of radius t."""
    if not angular and t < np.inf:
        g = _any_order_sqdist(A, q, B, c)
        if g > t * t * (1.0 + _sieve_rel(A.shape[1])):
            return np.inf
    return _exact(A, q, B, c, angular)


@njit(cache=True, nogil=True)
def _key_of(r, angular):
    """The key a pair at exactly distance r would have (key = |a|^2 + |b|^2 - 2<a,b> or -2<a,b>)."""
    if angular:
        return -2.0 * math.cos(math.pi * r)
    return r * r


@njit(cache=True, nogil=True)
def _insert(row, v):
    # row is sorted ascending and v < row[-1]: shift the tail, drop the largest.
    p = row.shape[0] - 1
    while p > 0 and row[p - 1] > v:
        row[p] = row[p - 1]
        p -= 1
    row[p] = v


@njit(cache=True, nogil=True)
def _knn_rows(sims, row0, col_local, col_global, ids, na, nb, tol, angular, A, B, top_key, top_d, dkey):
    """Fold one score tile into the per-row k-NN lists.

    sims[i, j]: float32 score of query row0 + i and block row col_local + j (global
    row col_global + j). top_key[q]: the k smallest keys seen for query q (sorted),
    top_d[q]: the k smallest exact distances among the pairs evaluated, dkey[q]:
    the key of distance top_d[q, k-1]. tol must be the largest key error of all
    blocks seen so far: the lists carry keys from earlier blocks.
    """
    tb = sims.shape[1]
    k = top_key.shape[1]
    # A view, not nb[col_local + j]: LLVM cannot prove that index non-negative, and
    # numba's negative-index wraparound then keeps the loops from vectorising.
    nbt = nb[col_local:col_local + tb]
    for i in range(sims.shape[0]):
        q = row0 + i
        srow = sims[i]
        nq = na[q]
        self_col = ids[q] - col_global
        tk = top_key[q]
        # Phase A: the running k-th smallest key (self excluded: with it the k-th
        # key would be the (k-1)-th neighbour's and the bound below too tight).
        kth = tk[k - 1]
        for j0 in range(0, tb, _CHUNK):
            j1 = min(j0 + _CHUNK, tb)
            hits = 0
            for j in range(j0, j1):
                hits += (nq + nbt[j] - 2.0 * np.float64(srow[j])) < kth
            if hits == 0:
                continue
            for j in range(j0, j1):
                key = nq + nbt[j] - 2.0 * np.float64(srow[j])
                if key < kth and j != self_col:
                    _insert(tk, key)
                    kth = tk[k - 1]
        # Phase B: k pairs seen have exact keys <= kth + tol, so the final k-th
        # distance has key <= kth + tol and any pair that can reach the list has a
        # float32 key <= kth + 2 tol; one above dkey[q] + tol cannot lower top_d[q, k-1].
        lim = min(kth + 2.0 * tol, dkey[q] + tol)
        td = top_d[q]
        for j0 in range(0, tb, _CHUNK):
            j1 = min(j0 + _CHUNK, tb)
            hits = 0
            for j in range(j0, j1):
                hits += (nq + nbt[j] - 2.0 * np.float64(srow[j])) <= lim
            if hits == 0:
                continue
            for j in range(j0, j1):
                key = nq + nbt[j] - 2.0 * np.float64(srow[j])
                if key <= lim and j != self_col:
                    d = _below(A, q, B, col_local + j, angular, td[k - 1])
                    if d < td[k - 1]:
                        _insert(td, d)
                        if td[k - 1] < np.inf:
                            dkey[q] = _key_of(td[k - 1], angular)
                            lim = min(lim, dkey[q] + tol)


@njit(cache=True, nogil=True)
def _ball_pairs(j0, j1, srow, q, nq, hi_a, lo_a, ra, self_col, col_local, nb, key_b, rad_b, tol, angular, A, B,
                cnt_a, in_a, cnt_b, in_b, rel):
    """The exact per-pair decisions of _ball_rows for columns j0..j1-1 of one query row; returns how many
    pairs it re-checked (band pairs: `_inside` decides each, most without the fixed-order sum)."""
    n_exact = 0
    # Branch-free where a ball is crowded (most of a chunk surely inside: a fake set narrower than the real
    # one), since there "inside" is a coin flip the branch predictor loses; only the rare band pairs branch.
    # The query's two counters stay in registers, stored once.
    na_in = 0
    nb_in = 0
    for j in range(j0, j1):
        c = col_local + j
        key = nq + nb[c] - 2.0 * np.float64(srow[j])
        kb = key_b[c]
        other = j != self_col
        sure_a = (key < lo_a) & other
        sure_b = (key < kb - tol) & other
        na_in += sure_a
        in_a[c] += sure_a
        cnt_b[c] += sure_b
        nb_in += sure_b
        band_a = (key < hi_a) & (not sure_a) & other
        band_b = (key < kb + tol) & (not sure_b) & other
        if band_a | band_b:
            g = -1.0
            d = -1.0
            n_exact += 1
            if band_a:
                inside, g, d = _inside(A, q, B, c, angular, ra, rel, g, d)
                na_in += inside
                in_a[c] += inside
            if band_b:
                inside, g, d = _inside(A, q, B, c, angular, rad_b[c], rel, g, d)
                cnt_b[c] += inside
                nb_in += inside
    cnt_a[q] += na_in
    in_b[q] += nb_in
    return n_exact


@njit(cache=True, nogil=True)
def _ball_rows(sims, row0, col_local, col_global, ids, na, nb, tol, angular, A, B,
               key_a, rad_a, key_b, rad_b, cnt_a, in_a, cnt_b, in_b, rel):
    """Add the strict ball memberships of one score tile into the four counters.

    key_a[q] is the key of query q's ball radius rad_a[q] (-inf: no ball), key_b[j]
    likewise for block row j. A pair whose key is below key - tol is surely inside,
    at or above key + tol surely outside; in between its exact distance decides (`_inside`, with the
    relative margin rel = sieve_rel(d) of its any-order sieve).
    cnt_a/in_b are indexed by query, in_a/cnt_b by block row (local to the block).
    Returns how many pairs it re-checked.
    """
    tb = sims.shape[1]
    # Views, not x[col_local + j]: see _knn_rows.
    nbt = nb[col_local:col_local + tb]
    # The b-ball bound with tol added once per tile, not once per score.
    kbt = key_b[col_local:col_local + tb] + tol
    # Whole chunks with a constant trip count, the tail straight to the exact loop: see _knn_rows.
    nfull = tb - tb % _CHUNK
    n_exact = 0
    for i in range(sims.shape[0]):
        q = row0 + i
        srow = sims[i]
        nq = na[q]
        hi_a = key_a[q] + tol
        lo_a = key_a[q] - tol
        ra = rad_a[q]
        self_col = ids[q] - col_global
        for j0 in range(0, nfull, _CHUNK):
            hits = 0
            for jj in range(_CHUNK):
                j = j0 + jj
                key = nq + nbt[j] - 2.0 * np.float64(srow[j])
                hits += (key < hi_a) | (key < kbt[j])
            if hits:
                n_exact += _ball_pairs(j0, j0 + _CHUNK, srow, q, nq, hi_a, lo_a, ra, self_col, col_local, nb, key_b,
                                       rad_b, tol, angular, A, B, cnt_a, in_a, cnt_b, in_b, rel)
        n_exact += _ball_pairs(nfull, tb, srow, q, nq, hi_a, lo_a, ra, self_col, col_local, nb, key_b, rad_b,
                               tol, angular, A, B, cnt_a, in_a, cnt_b, in_b, rel)
    return n_exact


@njit(cache=True, nogil=True)
def _ball_band(sims, row0, col_local, na, nb, tol, key_a, key_b, stride):
    """How many pairs of every `stride`-th row of a score tile lie in a ball's band (within tol of the
    query's or the column's ball key): the pairs _ball_rows would re-check in float64, sampled."""
    tb = sims.shape[1]
    nbt = nb[col_local:col_local + tb]
    kb = key_b[col_local:col_local + tb]
    n = 0
    for i in range(0, sims.shape[0], stride):
        srow = sims[i]
        nq = na[row0 + i]
        ka = key_a[row0 + i]
        for j in range(tb):
            key = nq + nbt[j] - 2.0 * np.float64(srow[j])
            n += (abs(key - ka) < tol) | (abs(key - kb[j]) < tol)
    return n


@njit(cache=True, nogil=True)
def _row_lim(q, tol, top_key, dkey):
    """The largest float32 key of a pair that can still enter row q's k-NN list (see _visit)."""
    return min(top_key[q, top_key.shape[1] - 1] + 2.0 * tol, dkey[q] + tol)


@njit(cache=True, nogil=True)
def _settle(q, tol, angular, X, top_key, top_d, dkey, bkey, bidx, bn):
    """Evaluate q's buffered candidates that can still reach its list exactly; empty the buffer."""
    k = top_key.shape[1]
    td = top_d[q]
    m = bn[q]
    # Closest first: the bound falls fastest, and the first candidate above it ends the row.
    for c in np.argsort(bkey[q, :m]):
        if bkey[q, c] > _row_lim(q, tol, top_key, dkey):
            break
        d = _below(X, q, X, bidx[q, c], angular, td[k - 1])
        if d < td[k - 1]:
            _insert(td, d)
            if td[k - 1] < np.inf:
                dkey[q] = _key_of(td[k - 1], angular)
    bn[q] = 0


@njit(cache=True, nogil=True)
def _visit(q, p, key, tol, angular, X, top_key, top_d, dkey, lim, bkey, bidx, bn, insert):
    """Offer pair (q, p) with float32 key `key` to q's lists (insert=False: its key is in
    top_key already, from _sym_phase_a).

    The single-pass form of _knn_rows' two phases: the running k-th key only falls,
    so a pair above kth + 2 tol when seen is above the final one too. A pair below
    goes into q's candidate buffer; its exact distance waits for _settle, by when
    most candidates are far above the final k-th key. Evaluating at once cost
    ~k ln(N / k) exact distances per row, as much as the GEMM at N = 1e4.
    """
    tk = top_key[q]
    k = tk.shape[0]
    if insert and key < tk[k - 1]:
        _insert(tk, key)
    lq = _row_lim(q, tol, top_key, dkey)
    if key <= lq:
        m = bn[q]
        cap = bkey.shape[1]
        if m == cap:
            # Drop the candidates the falling bound has passed; if all are still
            # within it (many near-ties), settle them exactly to make room.
            keep = 0
            for c in range(m):
                if bkey[q, c] <= lq:
                    bkey[q, keep] = bkey[q, c]
                    bidx[q, keep] = bidx[q, c]
                    keep += 1
            bn[q] = keep
            if keep == cap:
                _settle(q, tol, angular, X, top_key, top_d, dkey, bkey, bidx, bn)
                lq = _row_lim(q, tol, top_key, dkey)
            m = bn[q]
        bkey[q, m] = key
        bidx[q, m] = p
        bn[q] = m + 1
    lim[q] = lq


@njit(cache=True, nogil=True)
def _settle_rows(lo, hi, tol, angular, X, top_key, top_d, dkey, bkey, bidx, bn):
    """_settle every row lo..hi-1 (rows are independent: each has its own lists and buffer)."""
    for q in range(lo, hi):
        _settle(q, tol, angular, X, top_key, top_d, dkey, bkey, bidx, bn)


@njit(cache=True, nogil=True)
def _pend(j0, j1, i, diag, srow, nq, sqc, li, limc, pend, npend):
    """Append the columns j0..j1-1 of row i that pass either row's limit to pend; returns the new length."""
    for j in range(j0, j1):
        key = nq + sqc[j] - 2.0 * np.float64(srow[j])
        pend[npend] = j
        npend += ((key <= li) | (key <= limc[j])) & (j > i or not diag)
    return npend


@njit(cache=True, nogil=True)
def _knn_sym_tile(sims, r0, c0, diag, sq, tol, angular, X, top_key, top_d, dkey, lim, bkey, bidx, bn, insert):
    """Fold the pairs of one tile of X X^T into the k-NN lists of both its rows and its columns.

    sims[i, j] is the float32 score of rows r0 + i and c0 + j; on a diagonal tile
    (r0 == c0) only j > i is read, so every unordered pair is seen once and a row is
    never paired with itself. lim[q] = min(k-th key + 2 tol, dkey[q] + tol): a
    pair above both its rows' lim cannot enter either list.
    """
    ti = sims.shape[0]
    tj = sims.shape[1]
    # Views: see _knn_rows.
    sqc = sq[c0:c0 + tj]
    limc = lim[c0:c0 + tj]
    pend = np.empty(tj, dtype=np.int64)
    nfull = tj - tj % _CHUNK
    for i in range(ti):
        q = r0 + i
        srow = sims[i]
        nq = sq[q]
        li = lim[q]
        npend = 0
        # Whole chunks from column 0 with a constant trip count, the tail recorded
        # pair by pair. Either a variable trip count (min(j0 + _CHUNK, tj)) or a
        # variable first chunk (skipping a diagonal tile's lower half) kept LLVM from
        # vectorising the scan: 1.7-2.4 ns a score against 0.2-0.4 ns now, more than
        # the GEMM's own cost at 128-d. On a diagonal tile the lower half is scanned
        # too (1/n_tiles of the work) and _pend drops its pairs (j <= i).
        for j0 in range(0, nfull, _CHUNK):
            hits = 0
            for jj in range(_CHUNK):
                j = j0 + jj
                key = nq + sqc[j] - 2.0 * np.float64(srow[j])
                hits += (key <= li) | (key <= limc[j])
            if hits:
                npend = _pend(j0, j0 + _CHUNK, i, diag, srow, nq, sqc, li, limc, pend, npend)
        npend = _pend(nfull, tj, i, diag, srow, nq, sqc, li, limc, pend, npend)
        # The candidates are offered after the scan: calling _visit (and the exact
        # distance) from the scan loop made LLVM compile it 6x slower (as in the
        # join kernels). Offering late only means a looser lim meanwhile.
        for p in range(npend):
            j = pend[p]
            key = nq + sqc[j] - 2.0 * np.float64(srow[j])
            if key <= lim[q]:
                _visit(q, c0 + j, key, tol, angular, X, top_key, top_d, dkey, lim, bkey, bidx, bn, insert)
            if key <= limc[j]:
                _visit(c0 + j, q, key, tol, angular, X, top_key, top_d, dkey, lim, bkey, bidx, bn, insert)


@njit(cache=True, nogil=True)
def _phase_a_pairs(j0, j1, i, diag, srow, q, nq, sqc, c0, kq, kthc, top_key):
    """_sym_phase_a's inserts for columns j0..j1-1 of tile row i; returns row q's new k-th key."""
    k = top_key.shape[1]
    for j in range(j0, j1):
        if diag and j <= i:
            continue
        key = nq + sqc[j] - 2.0 * np.float64(srow[j])
        if key < kq:
            _insert(top_key[q], key)
            kq = top_key[q, k - 1]
        if key < kthc[j]:
            _insert(top_key[c0 + j], key)
            kthc[j] = top_key[c0 + j, k - 1]
    return kq


@njit(cache=True, nogil=True)
def _sym_phase_a(sims, r0, c0, diag, sq, tol, top_key, dkey, lim):
    """Phase A of one tile of X X^T: every pair's key into the k smallest of its row and its
    column first, then those rows' and columns' lim, so that _knn_sym_tile (insert=False)
    buffers only the pairs within the tile's own bound. With a wide bound (bfloat16
    scores) offering pairs before the lists knew the tile flooded the candidate buffers
    of a row's first tile with thousands of pairs, each later re-scored exactly.
    """
    ti = sims.shape[0]
    tj = sims.shape[1]
    k = top_key.shape[1]
    sqc = sq[c0:c0 + tj]
    # A row's list changes as a column only before its own row is scanned (diag: j > i),
    # so this copy is exact where it is read.
    kthc = top_key[c0:c0 + tj, k - 1].copy()
    nfull = tj - tj % _CHUNK
    for i in range(ti):
        q = r0 + i
        srow = sims[i]
        nq = sq[q]
        kq = top_key[q, k - 1]
        for j0 in range(0, nfull, _CHUNK):
            hits = 0
            for jj in range(_CHUNK):
                j = j0 + jj
                key = nq + sqc[j] - 2.0 * np.float64(srow[j])
                hits += (key < kq) | (key < kthc[j])
            if hits:
                kq = _phase_a_pairs(j0, j0 + _CHUNK, i, diag, srow, q, nq, sqc, c0, kq, kthc, top_key)
        _phase_a_pairs(nfull, tj, i, diag, srow, q, nq, sqc, c0, kq, kthc, top_key)
    for i in range(ti):
        lim[r0 + i] = _row_lim(r0 + i, tol, top_key, dkey)
    for j in range(tj):
        lim[c0 + j] = _row_lim(c0 + j, tol, top_key, dkey)

# ----------------------------------------------------------------------------
# drivers


class _Queries:
    """Query rows in float32 with what every block needs from them."""

    def __init__(self, x, angular: bool, ids):
        self.x = _rows32(x, "queries")
        self.angular = angular
        # Angular keys of float32 scores are -2 s: zero norms make the euclidean key formula give them
        # (shifted bfloat16 scores carry their own per-row terms, _Bf16Rows.sq).
        self.sq = np.zeros(self.x.shape[0]) if angular else _sq_norms(self.x)
        self.norm = self.max_norm(self.x, self.sq)
        self.ids = _check_ids(ids, self.x.shape[0])

    def max_norm(self, b, sq_b) -> float:
        """_max_norm of rows b with squared norms (or zeros) sq_b: the same float, from sq_b when it holds the
        norms (euclidean: one pass over a 2e4 x 2048 set is 0.04 s, and every join needs this twice)."""
        if self.angular or not sq_b.size:
            return _max_norm(b)
        return float(np.sqrt(np.max(sq_b)))

    def rows(self, block):
        """(float32 rows, squared norms or zeros) of one streamed block."""
        b = _rows32(block, "block")
        if b.shape[1] != self.x.shape[1]:
            raise ValueError(f"queries have width {self.x.shape[1]} but a block has width {b.shape[1]}")
        return b, (np.zeros(b.shape[0]) if self.angular else _sq_norms(b))

    def block(self, block, eps_of=None):
        """(float32 rows, squared norms or zeros, key tolerance, whether their scores are float64) of one streamed
        block: its largest norm decides both (`overflows`, `tol`)."""
        b, sq = self.rows(block)
        norm_b = self.max_norm(b, sq)
        return b, sq, self.tol(norm_b, sq, eps_of), self.overflows(norm_b)

    def overflows(self, norm_b: float) -> bool:
        """Whether float32 inner products of the queries with rows of largest norm norm_b could overflow (to inf,
        which the keys would read as "surely inside every ball"): such pairs' scores are formed in float64."""
        return self.norm * norm_b > _F32_MAX_PRODUCT

    def tol(self, norm_b: float, sq_b, eps_of=None) -> float:
        """Bound on |key(GEMM) - key(exact float64)| against rows of largest norm norm_b (`max_norm`) and squared
        norms (or zeros) sq_b, plus margins for the distance map: of the float32 GEMM, or of the float64 one
        where float32 would overflow (`overflows`).

        eps_of(dim, norm_a, norm_b): the bound on a float32 GEMM score's error; default the numba
        kernels' `_gemm_eps` (the torch kernels pass theirs, which knows TF32 and friends).
        """
        eps = _gemm_eps64 if self.overflows(norm_b) else (eps_of or _gemm_eps)
        return self.key_tol(eps(self.x.shape[1], self.norm, norm_b), sq_b)

    def key_tol(self, eps: float, sq_b, sq_a=None) -> float:
        """The key tolerance for a score error bound eps against points with squared norms sq_b (and queries with
        sq_a: None, their own; the bfloat16 kernel's keys use the norms of rows shifted by a common point)."""
        if self.angular:
            # 2 eps for key = -2 s; the absolute 1e-11 keeps arccos/cos rounding
            # (~1e-16) from ever deciding a pair the float32 test called sure. Shifted bfloat16
            # keys add their per-row terms' float64 error (_Bf16Rows.sq_err, _Gemm.margin).
            return 2.0 * eps + 1e-11
        # 2 eps from the score; the float64 norms, the key's own rounding, the
        # exact sum's rounding and sqrt's are each < (d + 8) u64 (|a|^2 + |b|^2), with the norms of
        # whichever rows the keys use (distances do not depend on the origin); so is the float64
        # rounding of rows shifted by a point (2.01 u64 |a|^2 in a norm, see _bf16_round).
        sq_a = self.sq if sq_a is None else sq_a
        big = (float(sq_a.max()) if sq_a.size else 0.0) + (float(sq_b.max()) if sq_b.size else 0.0)
        return 2.0 * eps + 16.0 * (self.x.shape[1] + 8) * _U64 * big + 1e-300


# ----------------------------------------------------------------------------
# where a tile's scores come from


SCORES = ("float32", "bf16")


def _check_scores(scores: str) -> bool:
    """True for "bf16"; ValueError for an unknown precision."""
    if scores not in SCORES:
        raise ValueError(f"scores must be one of {', '.join(SCORES)}; got {scores!r}")
    return scores == "bf16"


# Tiles of the bfloat16 GEMM (query x point rows of a join; square tiles of a self-join): torch's AMX kernels
# reach their speed only on big products (measured: 1024 x 4096 x 2048 ran at half the rate of 4096 x 4096 x
# 2048). Without AMX (AVX512-BF16 dot products) the rate holds on small products, and tiles whose scores stay in
# the cache while they are filtered ran faster: 2e4 x 2048 rows, AMD EPYC, 2 cores, three interleaved rounds, a
# self-join 2.84-2.87 s in 1024-row tiles against 2.98-3.05 s in 4096-row ones (2048: 2.91-2.94 s), the ball
# counts 4.47-4.48 s in 1024 x 4096 tiles against 4.58-4.77 s in 2048 x 8192 ones. Only speed depends on them.
_BF16_QUERY_TILE, _BF16_POINT_TILE, _BF16_SELF_TILE = (2048, 8192, 4096) if cpu_has_amx_bf16() else (1024, 4096, 1024)
_BF16_EXTRA_CAP = 96
# Rows of the smallest piece a bfloat16 diagonal tile is cut into (split_diagonal): AMX's GEMM
# ran 1024 x 4096 x 2048 at half the rate of 4096 x 4096 x 2048; AVX512-BF16's rate holds to
# 1000 x 2000 (AMD EPYC, 2026-12-04). A 4096-row tile becomes 2048 x 4096 and 2048 x 2048.
_BF16_MIN_DIAG = 2048
# Memory the bfloat16 tile threads may hold together (their k-NN states, score tiles and torch's outputs):
# more threads than fit get several OpenMP threads each instead (at least two tile threads where the
# budget has two cores: one filters while the other's GEMM runs).
_BF16_WORKERS_BYTES = 1 << 30
# bfloat16's score error grows with |x - c|^2 (c: the point subtracted, see bf16_center) and the distances
# with the spread, so rows far from c for their spread crowd the band: sets with |mean - c|^2 / mean
# |x - mean|^2 (offset_ratio) above this keep the float32 GEMM. Joins subtract the queries' mean, so this is
# a point set far from the queries. Measured unshifted
# (AMD EPYC, 2e4 x 512 and 1e4 x 2048, rows N(o, I)): at o = 1 (ratio 1) the bfloat16 kernel still won
# (1.31 against 1.41 s; 4.62 against 5.06 s), at o = 1.5 it lost 1.3x, at o = 2 1.9x (ratio 4), at o = 3
# 5.5x (ratio 9; its self-joins, which have no band sample, 8x): the limit sits between the last win and the
# first loss.
_BF16_MAX_OFFSET = 1.25
# The float32 GEMM's error grows with |x|^2 too, but from 2^-24, not 2^-8: rows N(o, I), 4000 x 128, the
# three joins took 0.17 s at o = 0 and o = 10 (offset ratio 100), 1.5 s at o = 100 (1e4), 7.2 s at o = 1000
# (AMD EPYC). Past this ratio (from the origin) a euclidean join scores float32 rows less the queries' mean.
_F32_SHIFT_OFFSET = 100.0
# Float64 re-checks per pair above which a ball-count join goes back to the float32 GEMM: one
# re-check at d columns costs ~d ns, about 100x what the bfloat16 GEMM saves on a pair.
_BF16_MAX_RECHECK = 0.005
_U32 = 2.0 ** -24
# float32 inner products of rows with |a| |b| past this could overflow (float32's largest value is 3.4e38; the
# margin covers the sums' rounding): such joins form their scores in float64 (float32 rows are exact in float64),
# so every finite float32 input is served.
_F32_MAX_PRODUCT = 1e36
# bfloat16's unit roundoff (8 significant bits, round to nearest even).
_U_BF16 = 2.0 ** -8
# bfloat16's smallest normal number: AMX reads subnormal inputs as zero.
_BF16_TINY = 2.0 ** -126


def _gemm_eps64(dim: int, norm_a: float, norm_b: float) -> float:
    """Bound on |float64 GEMM score - <a, b>| for float32 rows (exact in float64) of norms up to norm_a, norm_b: as
    _gemm_eps with float64's unit roundoff ((dim + 2) u |a| |b|, doubled), BLAS's or torch's, any order."""
    return 2.0 * (dim + 2) * _U64 * norm_a * norm_b + 1e-300


class _Bf16Rows:
    """Rows less a common point, rounded to bfloat16 (a torch tensor on the CPU): their RowStats, the float64
    squared norms (of the shifted rows) that the keys of their scores use, and the point (see _bf16_rows)."""

    __slots__ = ("t", "stats", "sq", "center", "sq_err")

    def __init__(self, t, stats, sq, center, sq_err=0.0):
        self.t = t
        self.stats = stats
        self.sq = sq
        self.center = center
        self.sq_err = sq_err


@njit(cache=True, nogil=True)
def _bf16_round(x, c, out, sq, one):
    """Round the float32 rows x less the point c (float64; zeros: none) to bfloat16 bits in out (uint16), to
    nearest even via float32, flushing zeros and subnormals to +0 (AMX reads subnormal inputs as zero); sq[i]
    gets the float64 |x_i - c|^2. Returns the largest float64 squared norms of y = x - c, of its rounding y^
    and of y - y^, and the largest |x| (one: a 1-element uint32 scratch array, read as float32).

    y is formed in float64: exact unless a component and c's differ in exponent by 29 or more, and then
    within 2^-53 |y| (_bf16_rows widens the residual by it). y - y^ is exact (Sterbenz: y^ is y
    rounded to 8 significant bits, within a factor 2 of y, or 0)."""
    f = one.view(np.float32)
    n2 = 0.0
    q2 = 0.0
    r2 = 0.0
    top = np.float32(0.0)
    for i in range(x.shape[0]):
        a = 0.0
        b = 0.0
        e = 0.0
        for k in range(x.shape[1]):
            top = max(top, abs(x[i, k]))
            y = np.float64(x[i, k]) - c[k]
            f[0] = np.float32(y)
            v = one[0]
            r = (v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
            if (r & np.uint32(0x7F800000)) == 0:
                r = np.uint32(0)
            one[0] = r
            qv = np.float64(f[0])
            a += y * y
            b += qv * qv
            e += (y - qv) * (y - qv)
            out[i, k] = np.uint16(r >> np.uint32(16))
        sq[i] = a
        n2 = max(n2, a)
        q2 = max(q2, b)
        r2 = max(r2, e)
    return n2, q2, r2, np.float64(top)


# Rows per piece of the rounding pass: its pieces run on the call's threads (one 2e4 x 2048 set
# took 0.3 s, with its np.abs temporary, on one thread of an AMD EPYC).
_ROUND_ROWS = 2048


def _bf16_round_rows(x32: np.ndarray, center: np.ndarray, bits: np.ndarray, sq: np.ndarray):
    """_bf16_round over pieces of rows on this call's threads (compute_threads); its four maxima over all rows
    (maxima: the same on any number of threads)."""
    pieces = [(i, min(x32.shape[0], i + _ROUND_ROWS)) for i in range(0, x32.shape[0], _ROUND_ROWS)]

    def piece(span):
        i, j = span
        return _bf16_round(x32[i:j], center, bits[i:j], sq[i:j], np.zeros(1, np.uint32))

    found = run_in_threads(piece, pieces, compute_threads()) or [(0.0, 0.0, 0.0, 0.0)]
    return tuple(max(v[m] for v in found) for m in range(4))


@njit(cache=True, nogil=True)
def _shift_rows(x, c, out, sq):
    """out = float32(x - c) (the difference in float64), sq[i] = float64 |x_i - c|^2; returns max sq."""
    m = 0.0
    for i in range(x.shape[0]):
        a = 0.0
        for k in range(x.shape[1]):
            y = np.float64(x[i, k]) - c[k]
            out[i, k] = np.float32(y)
            a += y * y
        sq[i] = a
        m = max(m, a)
    return m


class _Shifted:
    """float32 rows less a point (formed in float64, then rounded), the float64 squared norms of the
    shifted rows (x - c, before rounding) that the keys use, and the largest such norm (an upper bound)."""

    __slots__ = ("x", "sq", "norm")

    def __init__(self, x32: np.ndarray, c: np.ndarray):
        self.x = np.empty(x32.shape, np.float32)
        self.sq = np.empty(x32.shape[0])
        self.norm = math.sqrt(_shift_rows(x32, c, self.x, self.sq)) * (1.0 + 1e-12)


def bf16_center(x32: np.ndarray, sample: int = 4096) -> np.ndarray:
    """The point the bfloat16 kernel subtracts from both sets of a join: the mean of an even sample of
    at most `sample` rows of x32 (the queries, or the set of a self-join), rounded to float32 (so that x - c is
    exact in float64 for rows of ordinary range), as float64.

    Why: bfloat16's score error grows with |x|^2 and the distances with the spread, so rows far from the
    origin for their spread (non-negative CNN features, CLIP's cone) crowd the band of re-checked pairs.
    Distances do not change under a common shift; the keys use the shifted rows' norms."""
    n = x32.shape[0]
    if n == 0:
        return np.zeros(x32.shape[1])
    rows = x32[::max(1, n // sample)]
    return rows.mean(axis=0, dtype=np.float64).astype(np.float32).astype(np.float64)


def _bf16_rows(x32: np.ndarray, angular: bool = False, center: np.ndarray | None = None):
    """x32 rounded to bfloat16 (zeros and subnormals flushed: what AMX reads) as a torch tensor sharing one
    uint16 buffer, with the measured rounding (lowprec.RowStats) and the squared norms its keys use; None when
    a value exceeds lowprec.BF16_MAX_ABS, or when the rows sit far from the point subtracted for their spread
    (`offset_ratio` above _BF16_MAX_OFFSET): the caller keeps float32 for that set.

    Both distances score the rows less `center` (None: bf16_center of x32; pass the queries' center for the other
    set of a join). euclidean keys |a - c|^2 + |b - c|^2 - 2 <a - c, b - c>: sq = |x - c|^2. angular keys
    -2 <a, b> = (|a - c|^2 - |a|^2) + (|b - c|^2 - |b|^2) - 2 <a - c, b - c>: sq = |x - c|^2 - |x|^2, whose
    float64 error (a few (d + 8) u64 (|x - c|^2 + |x|^2), with y's own rounding) is `sq_err`, added to the
    keys' tolerance (_Gemm.margin); euclidean's lies inside key_tol's float64 term (sq_err 0)."""
    import torch
    from modeaudit.tasks.join.lowprec import BF16_MAX_ABS, RowStats
    x32 = np.ascontiguousarray(x32, dtype=np.float32)
    if center is None:
        center = bf16_center(x32)
    if offset_ratio(x32, center) > _BF16_MAX_OFFSET:
        return None
    bits = np.empty(x32.shape, dtype=np.uint16)
    sq = np.empty(x32.shape[0])
    # The range check rides on the rounding pass (a separate np.abs(x).max() cost a temporary of the set's size).
    n2, q2, r2, top = _bf16_round_rows(x32, center, bits, sq)
    if top > BF16_MAX_ABS:
        return None
    sq_err = 0.0
    if angular:
        xx = _sq_norms(x32)
        sq_err = 2.0 * (x32.shape[1] + 8) * _U64 * float((sq + xx).max()) if sq.size else 0.0
        sq -= xx
    # float64 sums of squares and sqrt err by a few ulps: 1e-12 relative makes the maxima upper bounds
    # (as lowprec.row_stats). The residual also covers y's own float64 rounding (2^-53 |y|, see _bf16_round).
    up = 1.0 + 1e-12
    stats = RowStats(math.sqrt(n2) * up, math.sqrt(q2) * up, (math.sqrt(r2) + 2.0 ** -52 * math.sqrt(n2)) * up)
    return _Bf16Rows(torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16), stats, sq, center, sq_err)


def offset_ratio(x32: np.ndarray, center: np.ndarray | None = None, sample: int = 4096) -> float:
    """|mean - center|^2 / mean |x - mean|^2 of the rows (of an even sample of at most `sample` rows): how far the
    set sits from `center` (None: the origin) for its spread. 0 for an empty set or one whose mean is the center;
    inf, or a huge ratio, for rows that are all the same (and not the center).

    The spread as mean |x|^2 - |mean|^2, float64 sums over the float32 rows: no float64 copy of the sample
    (at 2e4 x 2048 that copy and its temporaries, 64 MB each, took 0.4 s on first touch in every run).
    Its cancellation costs ~1e-16 (1 + ratio) relative, far below what the limit it is held against needs."""
    n = x32.shape[0]
    if n == 0:
        return 0.0
    rows = x32[::max(1, n // sample)]
    mu = rows.mean(axis=0, dtype=np.float64)
    spread = float(np.einsum("ij,ij->", rows, rows, dtype=np.float64)) / rows.shape[0] - float(mu @ mu)
    off = mu if center is None else mu - center
    far = float(off @ off)
    return far / spread if spread > 0 else (math.inf if far > 0 else 0.0)


def bf16_score_eps(dim: int, a, b, out_max: float | None = None) -> float:
    """Bound on |bfloat16 GEMM score - <a, b>| for rows summarised by RowStats a and b.

    The score is torch.mm of the bfloat16 roundings on the CPU: exact products, float32
    accumulation (oneDNN's AMX and AVX512-BF16 kernels accumulate in float32 tiles), and
    one rounding (to nearest) of the float32 sum s32 to the bfloat16 output s^.
    lowprec.bf16_eps bounds |s32 - <a, b>| (the measured input rounding plus the float32
    sums); the output rounding adds u |s32| <= u / (1 - u) |s^| (u = 2^-8), bounded by
    out_max, the largest |s^| of the pairs it covers (None: the largest possible,
    |a^| |b^| plus the float32 sums' error), with 1% headroom as for the torch join's
    float16 outputs, and 2^-133 per output flushed to zero.
    """
    from modeaudit.tasks.join.lowprec import bf16_eps
    if out_max is None:
        out_max = a.norm_q * b.norm_q * (1.0 + 2.0 * (dim + 2) * _U32) + 2.0 * dim * _BF16_TINY
    return bf16_eps(dim, a, b) + _U_BF16 / (1.0 - _U_BF16) * 1.01 * out_max + 4.0 * dim * _BF16_TINY


def bf16_gemm_is_sound() -> bool:
    """Whether this torch's bfloat16 CPU matmul has the numerics bf16_score_eps assumes (float32
    accumulation, one rounding to the output), probed once per process at a tile's shape.

    Each row is 1 followed by 2047 terms of 2^-9 against a row of ones: float32 accumulation
    gives 1 + 2047 * 2^-9 (~5.0), which the bound covers; a kernel that accumulated in bfloat16
    would stall near 1 (1 + 2^-9 rounds back to 1 in bfloat16) and fail by ~4. A build that
    fails is not used: the lowprec kernel is refused and "auto" keeps the float32 one.
    """
    return _bf16_probe()


@functools.lru_cache(maxsize=1)
def _bf16_probe() -> bool:
    import torch
    return bf16_probe_passes(torch.mm, 1024)


def bf16_probe_passes(mm, rows: int) -> bool:
    """bf16_gemm_is_sound's probe for a matmul mm(a, b_t) of bfloat16 torch tensors, at `rows` rows."""
    import torch
    from modeaudit.tasks.join.lowprec import RowStats
    d = 2048
    a = np.full((rows, d), 2.0 ** -9, np.float32)
    a[:, 0] = 1.0
    b = np.ones((rows, d), np.float32)
    exact = 1.0 + (d - 1) * 2.0 ** -9
    s = mm(torch.from_numpy(a).to(torch.bfloat16), torch.from_numpy(b).to(torch.bfloat16).T)
    na, nb = float(np.linalg.norm(a[0].astype(np.float64))), math.sqrt(d)
    eps = bf16_score_eps(d, RowStats(na, na, 0.0), RowStats(nb, nb, 0.0), out_max=float(s.float().abs().max()))
    return bool(float((s.double() - exact).abs().max()) <= eps)


class _Gemm:
    """The score GEMM of the tiles of one (queries, points) pair of sets.

    "float32": np.matmul of the float32 rows (BLAS), any number of tile threads; the
    block-wide bound of _Queries.tol holds for every tile.
    "bf16": torch.mm of the rows rounded to bfloat16 (AMX on CPUs that have it: 3-6x
    float32's GEMM rate at 2048-d here), widened to float32 for the same numba filters.
    Each tile returns its own bound (bf16_score_eps with the tile's largest |score|, the
    pairs of a row with itself set to 0 first: they are never used and would set it to
    |a|^2), so exactly the same pairs are decided by their exact float64 distances, more
    of them (the band is 10-30x float32's). A set with values beyond bfloat16's safe range keeps float32.

    bfloat16 scores are of both sets less one point (the queries' bf16_center), so the tiles' keys
    use the shifted rows' norms (see _bf16_rows, for either distance): `sq` gives the pair of norm
    arrays for a tile.

    "float64" (f64=True, whatever `scores` says): rows whose float32 inner products could overflow
    (_Queries.overflows: norms past 1e18) get np.matmul of the rows widened to float64, a tile at a time,
    with _gemm_eps64's bound, into float64 score tiles (`dtype`), which the same numba filters read.

    q_ids / offset: the queries' global row ids in the point set (-1: none) and the
    global id of the first point row, to find the self pairs.
    """

    def __init__(self, scores: str, q32: np.ndarray, b32: np.ndarray, q_bf=None, q_ids=None, offset: int = 0,
                 angular: bool = False, f64: bool = False):
        self.q32, self.b32 = q32, b32
        self.angular = angular
        self.qs = self.bs = None
        self.qb = self.bb = None
        # Rows whose float32 inner products could overflow (_Queries.overflows): float64 scores, whatever `scores`.
        self.f64 = bool(f64)
        self.dtype = np.float64 if self.f64 else np.float32
        if _check_scores(scores) and not self.f64:
            self.qb = q_bf if q_bf is not None else _bf16_rows(q32, angular)
            if self.qb is not None:
                self.bb = self.qb if b32 is q32 else _bf16_rows(b32, angular, self.qb.center)
            if self.bb is None:
                self.qb = None
        self.bf16 = self.qb is not None
        self.q_ids = q_ids
        self.offset = int(offset)
        if not self.bf16 and not self.f64:
            self._shift_float32()

    def _shift_float32(self) -> None:
        """float32 scores are of the rows, or, for a euclidean join whose queries sit very far from the origin
        for their spread (offset_ratio above _F32_SHIFT_OFFSET), of both sets less the queries' mean: kept
        only where that shrinks the largest |a| |b| (a point set far from that mean may not) and cannot
        overflow float32's inner products (rows that do as given get float64 scores, never a shift).
        Built before the first float32 tile's bound (f32_tol), never while tiles run."""
        q32, b32 = self.q32, self.b32
        if self.angular or not q32.shape[0] or not b32.shape[0] or offset_ratio(q32) <= _F32_SHIFT_OFFSET:
            return
        c = bf16_center(q32)
        qs = _Shifted(q32, c)
        bs = qs if b32 is q32 else _Shifted(b32, c)
        nq = _max_norm(q32)
        nb = nq if b32 is q32 else _max_norm(b32)
        if qs.norm * bs.norm < min(_F32_MAX_PRODUCT, nq * nb):
            self.qs, self.bs = qs, bs

    def probe(self, rows: np.ndarray, c0: int, c1: int) -> tuple[np.ndarray, float]:
        """bfloat16 scores of query rows `rows` (indices) x point rows c0..c1-1, as float32, and their bound (the
        self pairs not zeroed: a caller samples the band with them, never decides a pair)."""
        import torch
        s = torch.mm(self.qb.t[torch.from_numpy(rows)], self.bb.t[c0:c1].T)
        return s.float().numpy(), self._eps(s)

    def _eps(self, s) -> float:
        """The bound of bfloat16 scores s (a torch tensor) of these two sets: bf16_score_eps with their largest |s|."""
        import torch
        lo, hi = torch.aminmax(s) if s.numel() else (torch.zeros(()), torch.zeros(()))
        return bf16_score_eps(self.q32.shape[1], self.qb.stats, self.bb.stats, out_max=max(-float(lo), float(hi)))

    def use_float32(self, before_tiles: bool = False) -> None:
        """Form the remaining tiles' scores in float32 (returning None: the block's float32 bound holds).
        before_tiles: no tile has run and f32_tol is still to be taken, so the float32 rows may be shifted too
        (_shift_float32); a switch while tiles run keeps the float32 rows the block's bound was taken for."""
        self.bf16 = False
        if before_tiles:
            self._shift_float32()

    def sq(self, eps, sq_q: np.ndarray, sq_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The squared norms the keys of a tile use: the shifted rows' for a bfloat16 tile (eps not None) or a
        shifted float32 one, else the float32 rows' own (sq_q, sq_b)."""
        if eps is not None:
            return self.qb.sq, self.bb.sq
        return (self.qs.sq, self.bs.sq) if self.qs is not None else (sq_q, sq_b)

    def f32_tol(self, Q, sq_b: np.ndarray, norm_b: float) -> float:
        """The key tolerance of this block's float32 (or float64) tiles, for points of squared norms sq_b and
        largest norm norm_b (Q.tol's; of the shifted rows where they are shifted: _gemm_eps covers the rounding
        of the float64 differences to float32 as it covers any input's, and key_tol the float64 norms)."""
        tol = Q.tol(norm_b, sq_b)
        if self.qs is None:
            return tol
        return Q.key_tol(_gemm_eps(self.q32.shape[1], self.qs.norm, self.bs.norm), self.bs.sq, self.qs.sq)

    def margin(self, Q, sq_b: np.ndarray) -> float:
        """Q.key_tol(0, ...) over both kinds of norms the block's tiles may use (its keys' float64 terms)."""
        m = Q.key_tol(0.0, sq_b)
        if self.qb is None:
            return m
        return max(m, Q.key_tol(0.0, self.bb.sq, self.qb.sq) + self.qb.sq_err + self.bb.sq_err)

    def tiles(self, query_tile: int, point_tile: int):
        """The (query, point) tile sizes to use."""
        return (_BF16_QUERY_TILE, _BF16_POINT_TILE) if self.bf16 else (query_tile, point_tile)

    def workers(self, n_tiles: int, worker_bytes: int = 0) -> tuple[int, int | None]:
        """(tile threads, OpenMP threads for each one's torch GEMMs, None for float32).

        float32: BLAS's single-threaded GEMMs in parallel where BLAS has one thread (else one tile
        thread; this library never changes BLAS's thread count). bfloat16: one tile thread per core
        of this call's budget, each running its own GEMMs on one OpenMP thread and filtering them, so
        one filters while another's GEMM runs; fewer, with as many OpenMP threads each as the budget
        allows, where worker_bytes (each thread's state and tiles) would pass _BF16_WORKERS_BYTES."""
        if not self.bf16:
            return max(1, min(_n_workers(), n_tiles)), None
        budget = compute_threads()
        fit = max(2, _BF16_WORKERS_BYTES // max(1, int(worker_bytes)))
        n = max(1, min(budget, n_tiles, fit))
        return n, max(1, budget // n)

    def __call__(self, r0: int, r1: int, c0: int, c1: int, out: np.ndarray) -> float | None:
        """Scores of query rows r0..r1-1 x point rows c0..c1-1 into out (`dtype`, (r1 - r0, c1 - c0));
        returns the tile's score error bound, or None where the block-wide one (f32_tol) holds."""
        if self.f64:
            # Widened a tile at a time: no float64 copy of the sets (dgemm's O(rows x cols x d) dwarfs it).
            np.matmul(self.q32[r0:r1].astype(np.float64), self.b32[c0:c1].astype(np.float64).T, out=out)
            return None
        if not self.bf16:
            if self.qs is not None:
                np.matmul(self.qs.x[r0:r1], self.bs.x[c0:c1].T, out=out)
            else:
                np.matmul(self.q32[r0:r1], self.b32[c0:c1].T, out=out)
            return None
        import torch
        s = torch.mm(self.qb.t[r0:r1], self.bb.t[c0:c1].T)
        if self.q_ids is not None:
            local = self.q_ids[r0:r1] - (self.offset + c0)
            rows = np.nonzero((local >= 0) & (local < c1 - c0))[0]
            if rows.size:
                s[torch.from_numpy(rows), torch.from_numpy(local[rows])] = 0
        torch.from_numpy(out).copy_(s)   # bfloat16 -> float32 is exact
        return self._eps(s)


def _run_tiles(nq: int, nb: int, gemm: _Gemm, kernel, col_parts):
    """Call kernel(sims, r0, c0, parts, eps) over query tiles x point tiles of one block
    (eps: the tile's score bound from gemm, None where the block's float32 one holds).

    Each worker takes whole query tiles (so per-query state has one writer) and does
    its own GEMMs with single-threaded BLAS (see the join kernels' "Threads"). Arrays
    indexed by block row get one copy per worker, summed at the end (integers, so
    the order does not matter). `col_parts` is a list of such arrays.
    """
    qt, pt = gemm.tiles(_QUERY_TILE, _POINT_TILE)
    tiles = list(range(0, nq, qt))
    # Each tile thread: its float32 score buffer, torch's bfloat16 output, its copies of the block-row arrays.
    n, omp = gemm.workers(len(tiles), min(nq, qt) * min(nb, pt) * 6 + nb * 8 * len(col_parts))
    todo = shared_items(tiles)

    def work(parts):
        buf = np.empty((min(nq, qt), min(nb, pt)), dtype=gemm.dtype)
        with openmp_threads(omp):
            for r0 in todo():
                r1 = min(nq, r0 + qt)
                for c0 in range(0, nb, pt):
                    c1 = min(nb, c0 + pt)
                    sims = buf[:r1 - r0, :c1 - c0]
                    kernel(sims, r0, c0, parts, gemm(r0, r1, c0, c1, sims))

    copies = [col_parts] + [[np.zeros_like(p) for p in col_parts] for _ in range(n - 1)]
    run_in_threads(work, copies)
    for c in copies[1:]:
        for dst, src in zip(col_parts, c):
            dst += src


def knn_distances(queries, blocks, k: int, *, distance: str = "euclidean", query_ids=None,
                  scores: str = "float32") -> np.ndarray:
    """Exact distances from each query row to its k nearest rows of the streamed set, (q, k) float64 ascending.

    `blocks` yields (offset, block) pairs (or is one array); query_ids[i] is query
    i's global row index in that set (that one pair is skipped: the row itself),
    None when the queries are not part of it. Column k-1 is the k-NN radius used
    by precision/recall and density/coverage. Rows with fewer than k neighbours
    get inf. Equal to knn_distances_reference bit for bit. scores: the GEMM's
    precision ("float32", or "bf16": see _Gemm); the result is the same.
    """
    angular = _check_distance(distance)
    k = _check_k(k)
    Q = _Queries(queries, angular, query_ids)
    n = Q.x.shape[0]
    q_bf = _bf16_rows(Q.x, angular) if _check_scores(scores) and n else None
    top_key = np.full((n, k), np.inf)
    top_d = np.full((n, k), np.inf)
    dkey = np.full(n, np.inf)
    tol_max = 0.0
    tol_lock = threading.Lock()
    for offset, block in _iter_blocks(blocks):
        b32, sq_b = Q.rows(block)
        if b32.shape[0] == 0 or n == 0:
            continue
        norm_b = Q.max_norm(b32, sq_b)
        gemm = _Gemm(scores if q_bf is not None else "float32", Q.x, b32, q_bf, Q.ids, offset, angular,
                     f64=Q.overflows(norm_b))
        tol = gemm.f32_tol(Q, sq_b, norm_b)   # float32's bound; a bfloat16 tile returns its own
        margin = gemm.margin(Q, sq_b)

        def kernel(sims, r0, c0, _parts, eps, b32=b32, sq_b=sq_b, tol=tol, offset=offset, margin=margin, gemm=gemm):
            nonlocal tol_max
            # The lists carry keys of earlier tiles and blocks: the bound must cover them too. Under a lock,
            # and read once: another worker's tile must not lower it between the update and the call.
            # (Keys of float32 and of shifted bfloat16 scores both approximate the squared distance.)
            with tol_lock:
                tol_max = t = max(tol_max, tol if eps is None else 2.0 * eps + margin)
            sq_q, sq_p = gemm.sq(eps, Q.sq, sq_b)
            _knn_rows(sims, r0, c0, offset + c0, Q.ids, sq_q, sq_p, t, angular, Q.x, b32,
                      top_key, top_d, dkey)

        _run_tiles(n, b32.shape[0], gemm, kernel, [])
    return top_d


def knn_self(x, k: int, *, distance: str = "euclidean", tile: int | None = None,
             scores: str = "float32") -> np.ndarray:
    """k-NN distances of every row of x within x, self excluded, (n, k) ascending; equal to
    knn_distances(x, x, k, query_ids=arange(n)) and to knn_distances_reference.

    Uses the symmetry d(a, b) = d(b, a) (the same float64, see pair_distances_reference):
    the tiles of the upper triangle of x x^T update the lists of both their rows and
    their columns, so the GEMM covers each pair once, half of what knn_distances does.
    x is held in memory and read in tile x tile slabs. Workers keep private lists
    (every pair is offered to exactly one of them) that are merged at the end: the
    k smallest of their union are the exact k smallest, on any number of threads.
    scores: the GEMM's precision ("float32", or "bf16": see _Gemm); tile: rows per
    square tile (None: 1024, or _BF16_SELF_TILE for "bf16": 4096 with AMX, else 1024). The result is the same.
    """
    angular = _check_distance(distance)
    k = _check_k(k)
    Q = _Queries(x, angular, None)
    n = Q.x.shape[0]
    return _knn_sym(Q, k, lambda t: self_spans(n, t), tile, angular, scores)


def knn_self_pair(a, b, k: int, *, distance: str = "euclidean", tile: int | None = None,
                  scores: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """The k smallest distances from each row of a to the rows of b, and from each row of b to
    the rows of a: ((len(a), k), (len(b), k)) float64 ascending, inf where the other set has
    fewer than k rows.

    a and b are two disjoint row groups of one set: a cluster self-join is one task per pair
    of groups (tasks/metrics/engine.py), each pair's score formed once, like knn_self's upper
    triangle, and each row's k smallest over all its tasks are its k-NN distances in the set.
    Equal to knn_distances(a, b, k) and knn_distances(b, a, k) padded with inf.
    """
    angular = _check_distance(distance)
    k = _check_k(k)
    ab, na = pair_rows(a, b)
    top = _knn_sym(_Queries(ab, angular, None), k, lambda t: pair_spans(na, ab.shape[0], t), tile, angular, scores)
    return top[:na], top[na:]


def pair_rows(a, b) -> tuple[np.ndarray, int]:
    """Two row groups of one set as one float32 array (a's rows first) and len(a); ValueError when they
    are not (n, d) rows of one width. The self-join's pair form (here and in knn_torch.py) tiles it."""
    a32, b32 = _rows32(a, "a"), _rows32(b, "b")
    if a32.shape[1] != b32.shape[1]:
        raise ValueError(f"a has width {a32.shape[1]} but b has width {b32.shape[1]}")
    return np.concatenate([a32, b32]), a32.shape[0]


def even_tile(rows: int, tile: int) -> int:
    """The tile size that cuts `rows` into the fewest equal parts of at most `tile` rows."""
    if rows <= 0:
        return tile
    return -(-rows // -(-rows // tile))


def self_spans(n: int, tile: int) -> list[tuple[int, int, int, int]]:
    """The (r0, r1, c0, c1) tiles of the upper triangle of an n-row set's score matrix: square tiles of
    equal size (at most `tile` rows; no thin last row and column of tiles), the diagonal ones included."""
    t = even_tile(n, tile)
    return [(r0, min(n, r0 + t), c0, min(n, c0 + t)) for r0 in range(0, n, t) for c0 in range(r0, n, t)]


def pair_spans(na: int, n: int, tile: int) -> list[tuple[int, int, int, int]]:
    """The tiles of rows [0, na) against rows [na, n) of a pair_rows array. No diagonal here, so the
    tiles need not be square: each side in equal parts of at most `tile` rows (5000 rows as 2 x 2500,
    not 4096 + 904: the bfloat16 GEMM's rate falls on thin tiles)."""
    ta, tb = even_tile(na, tile), even_tile(n - na, tile)
    return [(r0, min(na, r0 + ta), c0, min(n, c0 + tb)) for r0 in range(0, na, ta) for c0 in range(na, n, tb)]


def _knn_sym(Q: _Queries, k: int, make_spans, tile: int | None, angular: bool, scores: str) -> np.ndarray:
    """The k smallest exact distances of every row of Q.x over the pairs of some tiles of Q.x Q.x^T.

    make_spans(tile) -> (r0, r1, c0, c1) tiles, none below the diagonal; each tile's pairs update
    the lists of its rows and of its columns (a diagonal tile's lower half is skipped), so a
    pair is formed once. Rows with fewer than k pairs keep inf. tile: rows per square tile
    (None: 1024, or _BF16_SELF_TILE when the GEMM is bfloat16).
    """
    X = Q.x
    n = X.shape[0]
    gemm = _Gemm(scores if n else "float32", X, X, q_ids=np.arange(n), angular=angular, f64=Q.overflows(Q.norm))
    if tile is None:
        tile = _BF16_SELF_TILE if gemm.bf16 else _SELF_TILE
    if tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile}")
    spans = make_spans(int(tile))
    tol = gemm.f32_tol(Q, Q.sq, Q.norm)   # float32's bound; a bfloat16 tile returns its own
    margin = gemm.margin(Q, Q.sq)
    # Every tile's keys: the shifted rows' norms where the scores are of shifted rows (see _Gemm).
    sq = gemm.sq(0.0 if gemm.bf16 else None, Q.sq, Q.sq)[0]
    if gemm.bf16:
        # Cut the diagonal tiles: their lower halves are formed and thrown away (a sixth of the
        # GEMM of a self-join in 5 x 5 tiles).
        spans = split_diagonal(spans, _BF16_MIN_DIAG)
    # Candidate buffer per row: with bfloat16's wider bound more pairs pass while the lists
    # fill; a full buffer is evaluated early, when the bound is still loose.
    cap = 3 * k + 8 + (_BF16_EXTRA_CAP if gemm.bf16 else 0)
    shape = (min(n, tile), min(n, tile))
    # Each tile thread: its k-NN state, its float32 score tile, torch's bfloat16 output.
    n_workers, omp = gemm.workers(len(spans), _sym_state_bytes(n, k, cap) + shape[0] * shape[1] * 6)
    todo = shared_items(spans)
    states = [_sym_state(n, k, cap) for _ in range(n_workers)]

    def work(w):
        top_key, top_d, dkey, lim, bkey, bidx, bn = states[w]
        buf = np.empty(shape, dtype=gemm.dtype)
        # The largest bound of this worker's tiles so far: its lists carry keys of all of them. A bfloat16 self-join
        # forms no float32 tile, so float32's bound is not among them: for rows far from the origin it is of the
        # unshifted rows (rows N(1e3, 1), 1e4 x 512: ~3e4 against squared distances ~1e3, every pair re-checked,
        # 10.4 s a self-join against 0.55 s in float32).
        t_run = 0.0 if gemm.bf16 else tol
        with openmp_threads(omp):
            for r0, r1, c0, c1 in todo():
                sims = buf[:r1 - r0, :c1 - c0]
                eps = gemm(r0, r1, c0, c1, sims)
                if eps is None:
                    _knn_sym_tile(sims, r0, c0, r0 == c0, sq, tol, angular, X, top_key, top_d, dkey, lim, bkey,
                                  bidx, bn, True)
                    continue
                t_run = max(t_run, 2.0 * eps + margin)
                _sym_phase_a(sims, r0, c0, r0 == c0, sq, t_run, top_key, dkey, lim)
                _knn_sym_tile(sims, r0, c0, r0 == c0, sq, t_run, angular, X, top_key, top_d, dkey, lim, bkey,
                              bidx, bn, False)
        return t_run

    # Each worker forms its own tiles' GEMMs and filters them into its own lists, so one's
    # filtering overlaps another's GEMM (torch's GEMMs from two threads together run at one's rate).
    t_all = max(run_in_threads(work, range(n_workers)))
    # The exact re-checks wait until the workers' lists are merged (into the first one's): each worker alone
    # would evaluate its own k nearest and its own band, twice the float64 distances with two workers. Every
    # worker's buffer then settles against the merged lists, in place. Rows settle independently.
    top_key, top_d, dkey = states[0][:3]
    for st in states[1:]:
        _merge_lists(top_key, top_d, dkey, st[0], st[1], angular)

    def settle(span):
        lo, hi = span
        for st in states:
            _settle_rows(lo, hi, t_all, angular, X, top_key, top_d, dkey, st[4], st[5], st[6])

    cuts = np.linspace(0, n, compute_threads() + 1).astype(np.int64)
    run_in_threads(settle, zip(cuts[:-1].tolist(), cuts[1:].tolist()))
    return top_d


def _sym_state(n: int, k: int, cap: int):
    """One worker's k-NN state for n rows: (top_key, top_d, dkey, lim, bkey, bidx, bn), see _knn_sym_tile."""
    return (np.full((n, k), np.inf), np.full((n, k), np.inf), np.full(n, np.inf), np.full(n, np.inf),
            np.empty((n, cap)), np.empty((n, cap), np.int64), np.zeros(n, np.int64))


def _sym_state_bytes(n: int, k: int, cap: int) -> int:
    """The bytes of _sym_state(n, k, cap): 8-byte values, two (n, k), two (n, cap) and three (n,) arrays."""
    return 8 * n * (2 * k + 2 * cap + 3)


@njit(cache=True, nogil=True)
def _merge_lists(top_key, top_d, dkey, s_key, s_d, angular):
    """Fold another worker's k smallest keys and k smallest exact distances into these lists (their pairs are
    distinct: each tile went to one worker, each pair of a tile to a row's list once)."""
    k = top_key.shape[1]
    for q in range(top_key.shape[0]):
        for v in s_key[q]:
            if v < top_key[q, k - 1]:
                _insert(top_key[q], v)
        for v in s_d[q]:
            if v < top_d[q, k - 1]:
                _insert(top_d[q], v)
        if top_d[q, k - 1] < np.inf:
            dkey[q] = _key_of(top_d[q, k - 1], angular)


def split_diagonal(spans, min_rows: int) -> list[tuple[int, int, int, int]]:
    """Self-join spans with each diagonal tile (r0 == c0) cut into a full-width top half and a diagonal bottom
    half, the bottom cut again while it has more than min_rows rows: of a t x t diagonal tile, whose lower
    half is never read, t^2 / 2 scores are formed in vain; after one cut t^2 / 4, after two 3 t^2 / 16."""
    out = []
    min_rows = max(1, int(min_rows))
    for r0, r1, c0, c1 in spans:
        while r0 == c0 and r1 - r0 > min_rows:
            h = (r1 - r0) // 2
            out.append((r0, r0 + h, c0, c1))
            r0 = c0 = r0 + h
        out.append((r0, r1, c0, c1))
    return out


def merge_knn(parts, k: int) -> np.ndarray:
    """The k smallest of each row over several (n, k_i) lists of distances, ascending: the same values in
    any order of the parts (distances only, no indices), so merged lists are exact and deterministic."""
    return np.sort(np.concatenate(parts, axis=1), axis=1)[:, :k]


def ball_side(radii, n: int, name: str, angular: bool, offset: int | None = None):
    """(keys, radii) of one side's balls for its n rows: radii a scalar, per-row values (rows offset:offset + n of
    them for a streamed block) or None (no balls: every key and radius -inf)."""
    if offset is not None and radii is not None and np.ndim(radii) != 0:
        radii = np.asarray(radii)[offset:offset + n]
    r = _radii(radii, n, name)
    key, rad = _ball_keys(r, n, angular)
    if r is None:
        rad = np.full(n, -np.inf)
    return key, rad


def _ball_keys(r: np.ndarray | None, n: int, angular: bool):
    if r is None:
        return np.full(n, -np.inf), np.full(n, -np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        keys = -2.0 * np.cos(np.pi * np.minimum(r, 1.0)) if angular else r * r
    # No distance is < a radius <= 0; every angular distance is < a radius > 1.
    keys = np.where(r > 0, keys, -np.inf)
    if angular:
        keys = np.where(r > 1, np.inf, keys)
    return keys, r


# Query rows of the band sample taken before a bfloat16 ball-count join (_crowded_band): ~0.02 s of GEMM at
# 2048 columns against 8192 points, against 0.4 s for the first tile whose own sample used to decide.
_BF16_PROBE_ROWS = 128


def _crowded_band(gemm: _Gemm, Q: _Queries, key_a: np.ndarray, key_b: np.ndarray, margin: float) -> bool:
    """Whether a sample of the queries (_BF16_PROBE_ROWS, evenly spaced) against the block's first
    _BF16_POINT_TILE rows puts more than _BF16_MAX_RECHECK of its pairs in a ball's bfloat16 band: then the
    whole block is better scored in float32, with float32's tiles, than bfloat16's first tile formed and
    thrown away on every thread (measured: 1e4 x 2048 rows, 2.6 s float32 against 3.6 s that way). Pairs of a
    row with itself are counted, not skipped: a sample, never a decision."""
    nq, nb = gemm.q32.shape[0], gemm.b32.shape[0]
    rows = np.unique(np.linspace(0, nq - 1, min(nq, _BF16_PROBE_ROWS)).astype(np.int64))
    c1 = min(nb, _BF16_POINT_TILE)
    sims, eps = gemm.probe(rows, 0, c1)
    n = _ball_band(sims, 0, 0, np.ascontiguousarray(gemm.qb.sq[rows]), gemm.bb.sq, 2.0 * eps + margin,
                   np.ascontiguousarray(key_a[rows]), key_b, 1)
    return n > _BF16_MAX_RECHECK * sims.size


def ball_counts(a, blocks, radii_a=None, radii_b=None, *, distance: str = "euclidean", a_ids=None,
                scores: str = "float32") -> BallCounts:
    """Strict ball counts between query rows `a` and the streamed set B, in one pass over their pairs.

    radii_a: one radius per row of a (or a scalar, or None: no a-balls); radii_b: an
    array over all rows of B (indexed by global row), a scalar, or None. a_ids[i]
    is a's row i's global index in B, to skip the pair of a row with itself (None:
    a is not part of B). Returns BallCounts with the B-indexed arrays over all rows
    seen (length: largest offset + block rows).
    Equal to ball_counts_reference, for either GEMM precision (scores: see _Gemm).
    """
    angular = _check_distance(distance)
    Q = _Queries(a, angular, a_ids)
    n = Q.x.shape[0]
    q_bf = _bf16_rows(Q.x, angular) if _check_scores(scores) and n else None
    key_a, rad_a = ball_side(radii_a, n, "radii_a", angular)
    cnt_a = np.zeros(n, np.int64)
    in_b = np.zeros(n, np.int64)
    in_a_parts, cnt_b_parts = [], []
    for offset, block in _iter_blocks(blocks):
        b32, sq_b = Q.rows(block)
        nb = b32.shape[0]
        key_b, rad_b = ball_side(radii_b, nb, "radii_b", angular, offset)
        in_a = np.zeros(nb, np.int64)
        cnt_b = np.zeros(nb, np.int64)
        in_a_parts.append((offset, in_a))
        cnt_b_parts.append((offset, cnt_b))
        if nb == 0 or n == 0:
            continue
        norm_b = Q.max_norm(b32, sq_b)
        gemm = _Gemm(scores if q_bf is not None else "float32", Q.x, b32, q_bf, Q.ids, offset, angular,
                     f64=Q.overflows(norm_b))
        margin = gemm.margin(Q, sq_b)
        rel = sieve_rel(b32.shape[1])
        if gemm.bf16 and _crowded_band(gemm, Q, key_a, key_b, margin):
            gemm.use_float32(before_tiles=True)
        tol = gemm.f32_tol(Q, sq_b, norm_b)   # float32's bound; a bfloat16 tile returns its own

        def kernel(sims, r0, c0, parts, eps, b32=b32, sq_b=sq_b, tol=tol, offset=offset, key_b=key_b, rad_b=rad_b,
                   margin=margin, rel=rel, gemm=gemm):
            # cnt_a/in_b are per query: one writer per query tile, no copies needed.
            t = tol if eps is None else 2.0 * eps + margin
            if eps is not None and gemm.bf16:
                # Before re-checking a bfloat16 tile, a sample of its rows (every 32nd) says how crowded
                # its band is: when the balls' radii lie in the bulk of the distances (a fake set narrower
                # than the real one puts every real-to-fake distance near the real radii), the band's
                # float64 re-checks cost far more than the bfloat16 GEMM saves, so this tile's scores are
                # formed again in float32 (and the remaining tiles' too). The counts do not change.
                stride = 32
                sampled = -(-sims.shape[0] // stride) * sims.shape[1]
                sq_q, sq_p = gemm.sq(eps, Q.sq, sq_b)
                if _ball_band(sims, r0, c0, sq_q, sq_p, t, key_a, key_b, stride) > _BF16_MAX_RECHECK * sampled:
                    gemm.use_float32()
            if eps is not None and not gemm.bf16:
                # Switched here, or on an earlier tile while this one's bfloat16 scores were being formed.
                gemm(r0, r0 + sims.shape[0], c0, c0 + sims.shape[1], sims)
                t, eps = tol, None
            sq_q, sq_p = gemm.sq(eps, Q.sq, sq_b)
            n_exact = _ball_rows(sims, r0, c0, offset + c0, Q.ids, sq_q, sq_p, t, angular, Q.x, b32,
                                 key_a, rad_a, key_b, rad_b, cnt_a, parts[0], parts[1], in_b, rel)
            if eps is not None and n_exact > _BF16_MAX_RECHECK * sims.size:
                # The sample missed a crowded band: the remaining tiles go to float32.
                gemm.use_float32()

        _run_tiles(n, nb, gemm, kernel, [in_a, cnt_b])
    total = max((o + p.shape[0] for o, p in in_a_parts), default=0)
    in_a_all = np.zeros(total, np.int64)
    cnt_b_all = np.zeros(total, np.int64)
    for (o, p), (_, c) in zip(in_a_parts, cnt_b_parts):
        in_a_all[o:o + p.shape[0]] += p
        cnt_b_all[o:o + c.shape[0]] += c
    return BallCounts(cnt_a, in_a_all, cnt_b_all, in_b)
