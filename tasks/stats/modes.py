"""Top-k *distinct* dense modes: greedy non-maximum suppression over anchor counts.

Why this exists
---------------
Ranking anchors by their neighbour count N(I, S, d) and keeping the top k lists
one identity k times: every member of a collapsed identity has nearly the same
(huge) count, so they occupy the whole head of the ranking (seed 001, Fig. 7:
the 24 densest anchors at d = 0.25 are all one identity). What a report needs is
the k densest *different* modes. We take the anchors in descending count order
and keep one only if it is farther than d0 from every anchor already kept; the
kept anchor suppresses its whole neighbourhood, like non-maximum suppression in
object detection.

Cost: only the top `candidates` rows by count can be chosen (a mode that is not
even among the top 50 k anchors by count is not a top-k mode), and the scan of
the ranking stops once k rows are chosen, so the work is at most
(candidates x k x dim) float64 flops, usually far less, plus one O(|S| log |S|)
sort: a few milliseconds for |S| = 1e5, k = 100.

This module is pure compute (numpy); it must not import Prefect.
"""
from __future__ import annotations

import math
import operator

import numpy as np

__all__ = ["distinct_modes", "default_candidates"]


def default_candidates(k: int, n: int) -> int:
    """max(50 k, 1000) capped at n: generous enough that a mode's best anchor is
    nearly always in the pool (each kept mode suppresses at most its own members),
    small enough to stay cheap."""
    return min(max(50 * k, 1000), n)


def _rank(counts: np.ndarray) -> np.ndarray:
    """Row indices in descending count order, ties by lower index first.

    A stable sort of -counts gives exactly that order; counts may be integers or
    floats (e.g. MCCS sums). Integers are widened to float64 only if that is exact,
    so huge int64 counts are never reordered by rounding.
    """
    if counts.dtype.kind in "iu":
        c = counts.astype(np.int64)
        return np.argsort(-c, kind="stable")
    return np.argsort(-counts.astype(np.float64), kind="stable")


def distinct_modes(emb_S: np.ndarray, counts: np.ndarray, k: int, d0: float, *,
                   candidates: int | None = None) -> np.ndarray:
    """Indices of up to k rows of S in descending count order (ties: lower index first)
    such that no two chosen rows are within d0 of each other (greedy non-maximum
    suppression, like NMS).

    Only the top `candidates` rows by count are considered (default
    max(50*k, 1000), capped at len(S)) so it stays cheap for |S| = 1e5. emb_S rows
    are unit vectors (float32/float16; float64 accepted).

    Greedy rule: walk the candidates in rank order; a candidate is chosen unless it
    lies within d0 of an already chosen row, where within means
    d(a, b) = arccos(clip(<a, b>, -1, 1)) / pi <= d0, decided in float64 from the
    stored values (a pair exactly at d0 counts as the same mode and is suppressed).
    Fewer than k indices come back when the candidates run out.

    Returns int64 indices into S (an empty array for k = 0 or an empty S).
    Raises ValueError on malformed input (shapes, NaN, d0 outside [0, 1], k < 0).
    """
    emb = np.asarray(emb_S)
    if emb.ndim != 2:
        raise ValueError(f"emb_S must be a 2-d array (rows x dim), got shape {emb.shape}")
    if emb.dtype.kind not in "fiu":
        raise ValueError(f"emb_S must hold real numbers, got dtype {emb.dtype}")
    cnt = np.asarray(counts)
    n = emb.shape[0]
    if cnt.ndim != 1 or cnt.shape[0] != n:
        raise ValueError(f"counts must be 1-d with one entry per row of emb_S ({n}), got shape {cnt.shape}")
    if cnt.dtype.kind not in "fiub":
        raise ValueError(f"counts must be numbers, got dtype {cnt.dtype}")
    if cnt.dtype.kind == "f" and not np.all(np.isfinite(cnt)):
        raise ValueError("counts contain NaN or inf")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be an integer, got {k!r}") from None
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    try:
        d0 = float(d0)
    except (TypeError, ValueError):
        raise ValueError(f"d0 must be a number in [0, 1], got {d0!r}") from None
    if not math.isfinite(d0) or not (0.0 <= d0 <= 1.0):
        raise ValueError(f"d0 must be a finite number in [0, 1], got {d0!r}")
    if candidates is None:
        m = default_candidates(k, n)
    else:
        try:
            m = operator.index(candidates)
        except TypeError:
            raise ValueError(f"candidates must be a positive integer or None, got {candidates!r}") from None
        if m < 1:
            raise ValueError(f"candidates must be >= 1, got {m}")
        m = min(m, n)
    if k == 0 or m == 0:
        return np.zeros(0, dtype=np.int64)

    order = _rank(cnt)[:m]
    # float64 copy of the candidate rows only: every distance decision is then the
    # float64 expression of the reference kernels, whatever the storage dtype.
    C = emb[order].astype(np.float64)
    if not np.all(np.isfinite(C)):
        raise ValueError("emb_S contains NaN or inf among the candidate rows")

    return order[_greedy(C, k, d0)]


def _within_score(d0: float) -> float:
    """The smallest float64 score c with acos(c) / pi <= d0 (math.acos: libm, one rounding rule).

    d(x, y) <= d0 is then decided as clip(<x, y>, -1, 1) >= c: exactly the float64 rule
    arccos(clip(<x, y>)) / pi <= d0 with the scalar libm acos, never numpy's vectorised
    arccos, whose last bit differs between CPUs (an exact tie at d0 would flip).
    """
    c = min(1.0, max(-1.0, math.cos(math.pi * d0)))
    while c < 1.0 and math.acos(c) / math.pi > d0:
        c = math.nextafter(c, 2.0)
    while c > -1.0 and math.acos(math.nextafter(c, -2.0)) / math.pi <= d0:
        c = math.nextafter(c, -2.0)
    return c


def _within(X: np.ndarray, Y: np.ndarray, c: float) -> np.ndarray:
    """float64 d(x, y) <= d0 for all pairs, (len X, len Y), with c = _within_score(d0)."""
    return np.clip(X @ Y.T, -1.0, 1.0) >= c


def _greedy(C: np.ndarray, k: int, d0: float) -> np.ndarray:
    """Positions (into C's rows, which are in rank order) of the greedy NMS picks.

    Candidates are scanned in blocks and the scan stops as soon as k are chosen,
    so the cost is (rows scanned) x (rows chosen) x dim: a block is first tested
    against everything chosen so far (one GEMM), then its survivors are decided in
    rank order against each other (one small block x block distance matrix). A
    "push" version (each pick suppressing the whole remaining pool) would cost
    k x candidates x dim even when the first k candidates are already distinct.
    """
    m, dim = C.shape
    c = _within_score(d0)
    block = int(min(max(2 * k, 256), 2048))  # inner matrix <= 2048^2 float64 = 32 MB
    picked = np.empty((min(k, m), dim), dtype=np.float64)
    chosen: list[int] = []
    for start in range(0, m, block):
        stop = min(start + block, m)
        blk = C[start:stop]
        alive = np.ones(stop - start, dtype=bool)
        if chosen:
            alive &= ~np.any(_within(blk, picked[: len(chosen)], c), axis=1)
        idx = np.flatnonzero(alive)
        if idx.size == 0:
            continue
        inner = _within(blk[idx], blk[idx], c)
        suppressed = np.zeros(idx.size, dtype=bool)
        for j in range(idx.size):
            if suppressed[j]:
                continue
            picked[len(chosen)] = blk[idx[j]]
            chosen.append(start + int(idx[j]))
            if len(chosen) == k:
                return np.asarray(chosen, dtype=np.int64)
            # only later rows of the block can still be affected
            suppressed[j + 1:] |= inner[j, j + 1:]
    return np.asarray(chosen, dtype=np.int64)
