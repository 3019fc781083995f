"""Top-k distinct dense modes (tasks/stats/modes.py): greedy NMS over anchor counts."""
from __future__ import annotations

import math

import numpy as np
import pytest

from modeaudit.tasks.join.kernels import range_counts
from modeaudit.tasks.stats.modes import default_candidates, distinct_modes


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _dist(a, b):
    return np.arccos(np.clip(a.astype(np.float64) @ b.astype(np.float64).T, -1.0, 1.0)) / np.pi


def _naive_nms(emb, counts, k, d0, m):
    """O(m^2) reference: walk the ranking, keep a row unless a kept row is within d0."""
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))[:m]
    E = emb.astype(np.float64)
    kept = []
    for i in order:
        if len(kept) == k:
            break
        if all(math.acos(min(1.0, max(-1.0, float(E[i] @ E[j])))) / math.pi > d0 for j in kept):
            kept.append(i)
    return kept


def _planted_world(rng, sizes=(60, 35, 15), n_noise=400, d=32, spread=0.01):
    """Tight clusters of the given sizes plus uniform noise, rows shuffled.

    Returns (emb float32, labels) with label c for cluster c, -1 for noise.
    """
    rows, labels = [], []
    for c, size in enumerate(sizes):
        centre = _unit(rng.normal(size=(1, d)))
        rows.append(_unit(centre + spread * rng.normal(size=(size, d)) / math.sqrt(d)))
        labels += [c] * size
    rows.append(_unit(rng.normal(size=(n_noise, d))))
    labels += [-1] * n_noise
    emb = np.concatenate(rows).astype(np.float32)
    labels = np.array(labels)
    perm = rng.permutation(len(labels))
    return emb[perm], labels[perm]


def test_planted_clusters_come_first_in_size_order_then_noise():
    rng = np.random.default_rng(0)
    emb, labels = _planted_world(rng)
    d0 = 0.1
    n = emb.shape[0]
    counts = range_counts(emb, emb, [d0], anchor_ids=np.arange(n))[:, 0]
    # each cluster is one tight ball: every member counts all the others; noise is
    # far from everything at d = 0.1 in 32 dimensions
    for c, size in enumerate((60, 35, 15)):
        assert np.all(counts[labels == c] == size - 1)
    assert np.all(counts[labels == -1] == 0)
    # the raw top 10 is one identity: the reason this module exists
    assert len(set(labels[np.argsort(-counts, kind="stable")[:10]])) == 1

    k = 8
    got = distinct_modes(emb, counts, k, d0)
    assert got.dtype == np.int64 and got.shape == (k,)
    # one representative per cluster, largest first; ties inside a cluster go to
    # the lowest row index
    for c in range(3):
        assert labels[got[c]] == c
        assert got[c] == np.flatnonzero(labels == c).min()
    # then noise points (all count 0), by ascending index
    assert np.all(labels[got[3:]] == -1)
    np.testing.assert_array_equal(got[3:], np.flatnonzero(labels == -1)[: k - 3])


def test_fewer_than_k_when_candidates_run_out():
    rng = np.random.default_rng(1)
    # one tight cluster only: everything suppresses everything
    emb = _unit(_unit(rng.normal(size=(1, 16))) + 1e-3 * rng.normal(size=(30, 16))).astype(np.float32)
    counts = np.full(30, 29)
    got = distinct_modes(emb, counts, 10, 0.05)
    np.testing.assert_array_equal(got, [0])
    # candidates limits the pool: at most `candidates` rows can come back
    emb, labels = _planted_world(rng, n_noise=100)
    counts = range_counts(emb, emb, [0.1], anchor_ids=np.arange(len(labels)))[:, 0]
    got = distinct_modes(emb, counts, 20, 0.1, candidates=70)
    # the top 70 by count are the 60 + the first 10 of the 35-cluster: two modes
    assert len(got) == 2
    assert list(labels[got]) == [0, 1]
    # k larger than |S|
    assert len(distinct_modes(emb[:5], counts[:5], 50, 0.0)) <= 5


def test_no_two_within_d0_and_matches_naive_greedy():
    # property on random data: separation, maximality of the greedy, and equality
    # with an obvious O(m^2) implementation
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        n, d = int(rng.integers(50, 1500)), int(rng.integers(3, 12))  # > 256: several scan blocks
        centres = _unit(rng.normal(size=(5, d)))
        emb = _unit(centres[rng.integers(0, 5, n)] + rng.uniform(0.1, 1.0) * rng.normal(size=(n, d)))
        emb = emb.astype(np.float32 if seed % 2 else np.float16)
        counts = rng.integers(0, 6, n)  # many ties
        d0 = float(rng.uniform(0.02, 0.3))
        k = int(rng.integers(1, 60))
        m = int(rng.integers(10, n + 1))
        got = distinct_modes(emb, counts, k, d0, candidates=m)
        assert list(got) == _naive_nms(emb, counts, k, d0, m)
        D = _dist(emb[got], emb[got])
        np.fill_diagonal(D, np.inf)
        assert np.all(D > d0)
        # descending counts, ties by index
        keys = [(-counts[i], i) for i in got]
        assert keys == sorted(keys)
        # maximal: if fewer than k came back, every candidate is within d0 of a pick
        if len(got) < k:
            pool = np.argsort(-counts, kind="stable")[:m]
            assert np.all(_dist(emb[pool], emb[got]).min(axis=1) <= d0)


def test_deterministic_tie_breaking():
    rng = np.random.default_rng(2)
    emb = _unit(rng.normal(size=(200, 64))).astype(np.float32)  # far apart
    counts = np.zeros(200, dtype=np.int64)
    np.testing.assert_array_equal(distinct_modes(emb, counts, 5, 0.1), np.arange(5))
    counts[[7, 150, 42]] = 3
    counts[99] = 4
    np.testing.assert_array_equal(distinct_modes(emb, counts, 6, 0.1), [99, 7, 42, 150, 0, 1])
    # float counts (e.g. MCCS sums) work the same way; repeated calls agree
    a = distinct_modes(emb, counts.astype(np.float64), 6, 0.1)
    b = distinct_modes(emb, counts.astype(np.float64), 6, 0.1)
    np.testing.assert_array_equal(a, [99, 7, 42, 150, 0, 1])
    np.testing.assert_array_equal(a, b)


def test_suppression_is_inclusive_at_d0():
    # <(1, 0), (0.6, 0.8)> = 0.6 exactly in float64, so d is known to the last bit
    emb = np.array([[1.0, 0.0], [0.6, 0.8]])
    d = math.acos(0.6) / math.pi
    counts = np.array([2, 1])
    np.testing.assert_array_equal(distinct_modes(emb, counts, 2, d), [0])
    np.testing.assert_array_equal(distinct_modes(emb, counts, 2, np.nextafter(d, 0)), [0, 1])
    # d0 = 0 suppresses exact duplicates only
    dup = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float16)
    np.testing.assert_array_equal(distinct_modes(dup, np.array([1, 1, 1]), 3, 0.0), [0, 2])


def test_default_candidates_and_edges():
    assert default_candidates(1, 10**5) == 1000
    assert default_candidates(24, 10**5) == 1200
    assert default_candidates(24, 500) == 500
    emb = _unit(np.random.default_rng(3).normal(size=(4, 3)))
    assert distinct_modes(emb, np.arange(4), 0, 0.1).shape == (0,)
    assert distinct_modes(emb[:0], np.arange(0), 3, 0.1).shape == (0,)
    with pytest.raises(ValueError):
        distinct_modes(emb, np.arange(3), 2, 0.1)
    with pytest.raises(ValueError):
        distinct_modes(emb, np.arange(4), -1, 0.1)
    with pytest.raises(ValueError):
        distinct_modes(emb, np.arange(4), 2, 1.5)
    with pytest.raises(ValueError):
        distinct_modes(emb, np.array([0, 1, np.nan, 2]), 2, 0.1)
    with pytest.raises(ValueError):
        distinct_modes(emb, np.arange(4), 2, 0.1, candidates=0)


def test_paper_sized_set():
    # |S| = 1e5, D = 128 float16 rows, as the paper preset stores them.
    rng = np.random.default_rng(4)
    emb = _unit(rng.normal(size=(100_000, 128)).astype(np.float32)).astype(np.float16)
    counts = rng.integers(0, 1000, 100_000)
    got = distinct_modes(emb, counts, 24, 0.25)
    assert len(got) == 24 and len(set(got.tolist())) == 24
    x = emb[got].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d = np.arccos(np.clip(x @ x.T, -1, 1)) / np.pi
    assert (d[~np.eye(24, dtype=bool)] > 0.25).all()
