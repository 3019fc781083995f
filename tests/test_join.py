"""Range join and MCCS kernels (tasks/join/kernels.py): the fast path must equal float64 brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest

from modeaudit.tasks.join import kernels as join
from modeaudit.tasks.join.kernels import (
    DEFAULT_RADII,
    count_block,
    mccs_from_sums,
    mccs_sums,
    mccs_sums_reference,
    radius_thresholds,
    range_counts,
    range_counts_reference,
)


# ----------------------------------------------------------------------------
# data helpers


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(rng, n, d, n_centres=6, max_tan=3.0):
    """Unit vectors around a few centres, at angles spread over [0, atan(max_tan)] from
    their centre, so pair distances cover the whole radius grid in any dimension."""
    centres = _unit(rng.standard_normal((n_centres, d)))
    c = centres[rng.integers(0, n_centres, n)]
    u = rng.standard_normal((n, d))
    u -= np.sum(u * c, axis=1, keepdims=True) * c  # orthogonal to the centre
    u = _unit(u)
    return _unit(c + max_tan * rng.uniform(0, 1, (n, 1)) ** 2 * u)


def _distances(anchors, points):
    return np.arccos(np.clip(anchors.astype(np.float64) @ points.astype(np.float64).T, -1, 1)) / np.pi


def _far_from_thresholds(anchors, points, radii, margin=1e-6):
    """Rows of `points` with no anchor pair within `margin` (in distance) of any radius."""
    dist = _distances(anchors, points)
    gap = np.min(np.abs(dist[:, :, None] - np.asarray(radii)[None, None, :]), axis=(0, 2))
    return points[gap > margin]


def _point_at(rng, a, dist):
    """A unit vector at exactly (to float64) distance `dist` from unit vector a."""
    u = rng.standard_normal(a.shape[0])
    u -= (u @ a) * a
    u /= np.linalg.norm(u)
    return math.cos(math.pi * dist) * a + math.sin(math.pi * dist) * u


def _nontrivial(counts, n_points):
    """Counts that are informative: some anchors see neighbours at the smallest radius,
    some miss points at the largest, and the curves rise across the grid."""
    assert counts[:, 0].max() > 0
    assert counts[:, -1].min() < n_points
    assert (counts[:, -1] > counts[:, 0]).mean() > 0.5


# ----------------------------------------------------------------------------
# exactness of the fast path


# The exact kernels of tasks/join/kernels.py: "lowprec" (bfloat16 first pass) must pass
# every exactness test "fast" passes.
EXACT = ["fast", "lowprec"]


@pytest.mark.parametrize("kernel,d", [("fast", 3), ("fast", 16), ("fast", 64), ("fast", 128),
                                      ("lowprec", 3), ("lowprec", 128)])  # lowprec: the extremes, to stay cheap
@pytest.mark.parametrize("n_anchors,n_points", [(37, 1500), (5, 3000), (300, 700)])
def test_fast_equals_float64_reference(d, n_anchors, n_points, kernel):
    rng = np.random.default_rng(d * 1000 + n_anchors)
    data = _clustered(rng, n_anchors + n_points, d)
    anchors, points = data[:n_anchors], data[n_anchors:]
    points = _far_from_thresholds(anchors, points, DEFAULT_RADII)
    assert len(points) > 0.9 * n_points
    ref = range_counts_reference(anchors, points, DEFAULT_RADII)
    _nontrivial(ref, len(points))
    fast = range_counts(anchors, [(0, points)], DEFAULT_RADII, kernel=kernel)
    assert fast.dtype == np.int64 and fast.shape == (n_anchors, DEFAULT_RADII.size)
    np.testing.assert_array_equal(fast, ref)
    # float32 inputs: exact w.r.t. the float32 values (cast to float64 by the reference)
    a32, p32 = anchors.astype(np.float32), points.astype(np.float32)
    np.testing.assert_array_equal(range_counts(a32, [(0, p32)], DEFAULT_RADII, kernel=kernel),
                                  range_counts_reference(a32, p32, DEFAULT_RADII))


@pytest.mark.parametrize("kernel", EXACT)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exact_correction_on_adversarial_near_threshold_pairs(dtype, kernel):
    """Points placed at distance r +- (1e-7 .. 1e-10) from the anchors: float32 scores
    cannot decide these, the float64 correction must."""
    rng = np.random.default_rng(7)
    d = 64
    anchors = _clustered(rng, 40, d)
    deltas = np.array([1e-7, -1e-7, 3e-8, -3e-8, 1e-8, -1e-8, 1e-9, -1e-9, 1e-10, -1e-10])
    pts = [_point_at(rng, anchors[i % len(anchors)], r + dl)
           for i, r in enumerate(np.repeat(DEFAULT_RADII, 6)) for dl in deltas[i % 2::2]]
    points = np.concatenate([np.array(pts), _clustered(rng, 500, d)]).astype(dtype)
    anchors = anchors.astype(dtype)
    dist = _distances(anchors, points)
    near = np.min(np.abs(dist[:, :, None] - DEFAULT_RADII[None, None, :]), axis=2) < 1e-7
    assert near.sum() > 1000  # the test is about these pairs

    ref = range_counts_reference(anchors, points, DEFAULT_RADII)
    # float32 scores alone get some of them wrong (so the correction is doing work)
    sims32 = anchors.astype(np.float32) @ points.astype(np.float32).T
    naive = np.stack([(sims32 >= c).sum(axis=1) for c in radius_thresholds(DEFAULT_RADII)], axis=1)
    assert np.any(naive != ref)
    np.testing.assert_array_equal(range_counts(anchors, [(0, points)], DEFAULT_RADII, kernel=kernel), ref)
    np.testing.assert_array_equal(count_block(anchors, points, DEFAULT_RADII), ref)


@pytest.mark.parametrize("kernel", EXACT)
def test_non_unit_float16_inputs_still_exact(kernel):
    """Stored embeddings are float16 rows whose norms are not exactly 1; scores may
    leave [-1, 1]. The fast path must still agree with the float64 reference."""
    rng = np.random.default_rng(3)
    data = _clustered(rng, 1200, 32) * rng.uniform(0.97, 1.03, (1200, 1))
    data[:5] = data[0]  # identical vectors: scores well above 1
    anchors = data[:30].astype(np.float32)
    points = data.astype(np.float16)
    ref = range_counts_reference(anchors, points, DEFAULT_RADII)
    np.testing.assert_array_equal(range_counts(anchors, [(0, points)], DEFAULT_RADII, kernel=kernel), ref)
    np.testing.assert_array_equal(range_counts(anchors, [(0, -points)], DEFAULT_RADII, kernel=kernel),
                                  range_counts_reference(anchors, -points, DEFAULT_RADII))


@pytest.mark.parametrize("kernel", EXACT)
def test_custom_radius_grid(kernel):
    rng = np.random.default_rng(11)
    data = _clustered(rng, 900, 16)
    radii = np.array([0.003, 0.05, 0.25, 0.2501, 0.7, 0.999])
    anchors, points = data[:20], _far_from_thresholds(data[:20], data[20:], radii)
    np.testing.assert_array_equal(range_counts(anchors, [(0, points)], radii, kernel=kernel),
                                  range_counts_reference(anchors, points, radii))


# ----------------------------------------------------------------------------
# streaming and self-exclusion


def _random_blocks(rng, points, base):
    """Split points into blocks of random sizes (with empty and one-row blocks)."""
    cuts, pos = [], 0
    while pos < len(points):
        size = int(rng.choice([0, 1, 1, 2, 7, 50, 333, 2100, 5000]))
        cuts.append((base + pos, points[pos:pos + size]))
        pos += size
    cuts.insert(3, (base + len(points), points[:0]))  # empty block at the very end offset
    return cuts


@pytest.mark.parametrize("kernel", EXACT)
def test_blocked_equals_one_block_with_global_offsets(kernel):
    rng = np.random.default_rng(5)
    base = 10_000  # the points are rows base.. of some larger set
    points = _clustered(rng, 9000, 24).astype(np.float32)
    pick = rng.choice(len(points), 60, replace=False)
    anchors, ids = points[pick], base + pick
    blocks = _random_blocks(rng, points, base)
    assert any(len(b) == 0 for _, b in blocks) and any(len(b) == 1 for _, b in blocks)

    one = range_counts(anchors, [(base, points)], DEFAULT_RADII, anchor_ids=ids, kernel=kernel)
    many = range_counts(anchors, iter(blocks), DEFAULT_RADII, anchor_ids=ids, kernel=kernel)  # one-shot iterator
    np.testing.assert_array_equal(many, one)
    ref = range_counts_reference(anchors, points, DEFAULT_RADII, anchor_ids=ids, point_offset=base)
    np.testing.assert_array_equal(one, ref)
    np.testing.assert_array_equal(range_counts(anchors, blocks, DEFAULT_RADII, anchor_ids=ids,
                                               kernel="reference"), ref)
    # count_block sums to the same thing block by block
    total = sum(count_block(anchors, b, DEFAULT_RADII, anchor_ids=ids, offset=o) for o, b in blocks)
    np.testing.assert_array_equal(total, ref)


@pytest.mark.parametrize("kernel", EXACT)
def test_self_pairs_are_excluded_by_index_not_by_value(kernel):
    rng = np.random.default_rng(9)
    points = _clustered(rng, 2000, 16)
    ids = np.array([3, 500, 1999, 77])
    points[1234] = points[500]  # a duplicate of anchor 1's row elsewhere: a real neighbour
    anchors = points[ids].copy()

    with_ids = range_counts(anchors, [(0, points)], DEFAULT_RADII, anchor_ids=ids, kernel=kernel)
    without = range_counts(anchors, [(0, points)], DEFAULT_RADII, kernel=kernel)
    np.testing.assert_array_equal(without - with_ids, np.ones_like(with_ids))
    np.testing.assert_array_equal(
        with_ids, range_counts_reference(anchors, points, DEFAULT_RADII, anchor_ids=ids))
    # the duplicate (distance 0) is still counted for anchor 1: excluding by value would drop it
    zero_dist = np.count_nonzero(_distances(anchors[1:2], points) < 1e-6)
    assert zero_dist == 2
    assert with_ids[1, 0] >= 1
    by_value = np.count_nonzero(_distances(anchors[1:2], points)[0] <= DEFAULT_RADII[0]) - zero_dist
    assert with_ids[1, 0] == by_value + 1

    # offsets shift which row is "self": the same block at offset 1 excludes other pairs
    shifted = range_counts(anchors, [(1, points)], DEFAULT_RADII, anchor_ids=ids, kernel=kernel)
    np.testing.assert_array_equal(
        shifted, range_counts_reference(anchors, points, DEFAULT_RADII, anchor_ids=ids, point_offset=1))
    assert np.any(shifted != with_ids)


def test_equals_scikit_learn_radius_neighbours():
    neighbors = pytest.importorskip("sklearn.neighbors")
    rng = np.random.default_rng(21)
    data = _clustered(rng, 2600, 32)
    anchors = data[:40]
    points = _far_from_thresholds(anchors, data[40:], DEFAULT_RADII)
    nn = neighbors.NearestNeighbors(algorithm="brute", metric="euclidean").fit(points)
    # unit vectors: d <= r  <=>  ||a - b|| <= sqrt(2 - 2 cos(pi r))
    expected = np.stack([
        np.array([len(x) for x in nn.radius_neighbors(anchors, radius=math.sqrt(2 - 2 * math.cos(math.pi * r)),
                                                      return_distance=False)])
        for r in DEFAULT_RADII], axis=1)
    _nontrivial(expected, len(points))
    np.testing.assert_array_equal(range_counts(anchors, [(0, points.astype(np.float32))], DEFAULT_RADII),
                                  expected)


# ----------------------------------------------------------------------------
# MCCS


@pytest.mark.parametrize("kernel", EXACT)
@pytest.mark.parametrize("d,theta", [(3, 0.3), (64, 0.3), (128, 0.45), (16, 1.0)])
def test_mccs_sums_match_reference(d, theta, kernel):
    rng = np.random.default_rng(d)
    points = _clustered(rng, 4000, d).astype(np.float32)
    pick = rng.choice(len(points), 50, replace=False)
    anchors, ids = points[pick], 100 + pick
    ref = mccs_sums_reference(anchors, points, theta, anchor_ids=ids, point_offset=100)
    assert np.count_nonzero(ref) > 25  # many anchors have points within theta
    blocks = _random_blocks(rng, points, 100)
    fast = mccs_sums(anchors, blocks, theta, anchor_ids=ids, kernel=kernel)
    np.testing.assert_allclose(fast, ref, rtol=1e-7, atol=0)
    # the low-precision first pass changes which pairs are re-scored, never the sum's bits
    assert fast.tobytes() == mccs_sums(anchors, blocks, theta, anchor_ids=ids).tobytes()
    # self pairs excluded: including them adds exactly s(a, a) per anchor (just under 1:
    # a float32 row's <a, a> is 1 - O(1e-8), and arccos is steep there)
    incl = mccs_sums(anchors, [(100, points)], theta, kernel=kernel)
    self_terms = np.array([mccs_sums_reference(x[None], x[None], theta)[0] for x in anchors])
    assert np.all(self_terms > 0.99)
    np.testing.assert_allclose(incl - fast, self_terms, rtol=0, atol=1e-9 * incl.max())
    np.testing.assert_allclose(mccs_sums(anchors, [(100, points)], theta, anchor_ids=ids,
                                         kernel="reference"), ref, rtol=1e-12)


@pytest.mark.parametrize("kernel", EXACT)
def test_mccs_near_the_cutoff(kernel):
    """Points at distance theta +- tiny: only those just inside may contribute."""
    rng = np.random.default_rng(4)
    a = _unit(rng.standard_normal((1, 48)))[0]
    theta = 0.3
    pts = np.array([_point_at(rng, a, theta + dl) for dl in (-1e-6, -1e-8, 1e-8, 1e-6, -0.1)])
    ref = mccs_sums_reference(a[None], pts, theta)
    np.testing.assert_allclose(mccs_sums(a[None], [(0, pts)], theta, kernel=kernel), ref, rtol=1e-7)
    expected = sum(math.expm1(-dl) for dl in (-1e-6, -1e-8, -0.1)) / math.expm1(theta)
    np.testing.assert_allclose(ref, [expected], rtol=1e-7)


def test_mccs_hand_worked_example():
    # Anchor at angle 0; C at angles 0.1 pi, 0.2 pi and 0.5 pi, so d = 0.1, 0.2, 0.5.
    ang = np.pi * np.array([0.1, 0.2, 0.5])
    C = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    a = np.array([[1.0, 0.0]])
    # theta = 0.3, e^0.3 - 1 = 0.3498588076
    #   s(d=0.1) = (e^0.2 - 1) / 0.3498588076 = 0.2214027582 / 0.3498588076 = 0.6328346
    #   s(d=0.2) = (e^0.1 - 1) / 0.3498588076 = 0.1051709181 / 0.3498588076 = 0.3006096
    #   s(d=0.5) = 0 (beyond theta)
    # sum = 0.9334442, mean = 0.3111481, ln(mean) = -1.1674864
    # MCCS = 1 / (1 + 1.1674864) = 0.4613639
    sums = mccs_sums(a, [(0, C)], 0.3)
    np.testing.assert_allclose(sums, [0.9334442], rtol=1e-7)
    np.testing.assert_allclose(mccs_sums_reference(a, C, 0.3), [0.9334442], rtol=1e-7)
    np.testing.assert_allclose(mccs_from_sums(sums, 3), [0.4613639], rtol=1e-7)


def test_mccs_is_zero_with_no_point_within_theta():
    ang = np.pi * np.array([0.31, 0.5, 0.9])
    C = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    a = np.array([[1.0, 0.0], [np.cos(0.7 * np.pi), np.sin(0.7 * np.pi)]])
    sums = mccs_sums(a, [(0, C)], 0.3)
    assert sums[0] == 0.0 and sums[1] > 0
    m = mccs_from_sums(sums, 3)
    assert m[0] == 0.0 and 0 < m[1] <= 1
    # a mean of exactly 1 (every point on top of the anchor) gives MCCS 1
    np.testing.assert_allclose(mccs_from_sums(np.array([4.0, 0.0]), np.array([4, 2])), [1.0, 0.0])
    with pytest.raises(ValueError, match="n must be positive"):
        mccs_from_sums([1.0], 0)


# ----------------------------------------------------------------------------
# validation


def test_default_radii_and_thresholds():
    assert DEFAULT_RADII.shape == (41,) and DEFAULT_RADII[0] == 0.10 and DEFAULT_RADII[-1] == 0.50
    np.testing.assert_allclose(np.diff(DEFAULT_RADII), 0.01, atol=1e-12)
    c = radius_thresholds(DEFAULT_RADII)
    assert c.dtype == np.float64
    np.testing.assert_array_equal(c, np.cos(np.pi * DEFAULT_RADII))
    assert abs(c[-1]) < 1e-15 and np.all(np.diff(c) < 0)


@pytest.mark.parametrize("radii,message", [
    (np.array([[0.1, 0.2]]), "1-d"),
    (np.array([]), "empty"),
    (np.array([0.1, np.nan]), "finite"),
    (np.array([0.1, np.inf]), "finite"),
    (np.array([0.0, 0.2]), r"open interval \(0, 1\)"),
    (np.array([0.2, 1.0]), r"open interval \(0, 1\)"),
    (np.array([-0.1, 0.2]), r"open interval \(0, 1\)"),
    (np.array([0.2, 0.1]), "strictly increasing"),
    (np.array([0.1, 0.2, 0.2]), "strictly increasing"),
])
def test_radius_thresholds_validation(radii, message):
    with pytest.raises(ValueError, match=message):
        radius_thresholds(radii)


def test_input_validation():
    a = np.ones((2, 3)) / math.sqrt(3)
    with pytest.raises(ValueError, match="width 3 .* width 4"):
        range_counts(a, [(0, np.ones((5, 4)))], DEFAULT_RADII)
    with pytest.raises(ValueError, match="2-d"):
        range_counts(a[0], [(0, a)], DEFAULT_RADII)
    with pytest.raises(ValueError, match="NaN or inf"):
        range_counts(a, [(0, np.full((2, 3), np.nan))], DEFAULT_RADII)
    with pytest.raises(ValueError, match="NaN or inf"):
        mccs_sums(np.full((2, 3), np.inf), [(0, a)], 0.3)
    with pytest.raises(ValueError, match="anchor_ids"):
        range_counts(a, [(0, a)], DEFAULT_RADII, anchor_ids=[1])
    with pytest.raises(ValueError, match="kernel"):
        range_counts(a, [(0, a)], DEFAULT_RADII, kernel="gpu")
    with pytest.raises(ValueError, match="theta"):
        mccs_sums(a, [(0, a)], 0.0)
    with pytest.raises(ValueError, match=r"\(offset, block\)"):
        range_counts(a, [a], DEFAULT_RADII)
    with pytest.raises(ValueError, match=r"\(offset, block\)"):
        range_counts(a, [a[:1]], DEFAULT_RADII)


def test_empty_inputs():
    a = _unit(np.random.default_rng(0).standard_normal((3, 8)))
    assert range_counts(a[:0], [(0, a)], DEFAULT_RADII).shape == (0, 41)
    np.testing.assert_array_equal(range_counts(a, [], DEFAULT_RADII), np.zeros((3, 41), np.int64))
    np.testing.assert_array_equal(mccs_sums(a, [(0, a[:0])], 0.3), np.zeros(3))


def test_kernels_do_not_import_prefect():
    src = open(join.__file__).read()
    assert "import prefect" not in src and "from prefect" not in src


@pytest.mark.parametrize("kernel", EXACT)
def test_tile_threads_give_the_same_counts_and_sums(monkeypatch, kernel):
    # Where BLAS is single-threaded (the audit's Dask workers) the join runs one tile thread
    # per core; counts and MCCS sums must not depend on how many.
    from threadpoolctl import threadpool_limits
    from modeaudit.tasks.join.kernels import _n_workers, mccs_sums, range_counts
    rng = np.random.default_rng(11)
    a = rng.standard_normal((700, 24)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = rng.standard_normal((5000, 24)).astype(np.float32)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for n in ("1", "3"):
            monkeypatch.setenv("MODEAUDIT_THREADS", n)
            assert _n_workers() == int(n)
            out[n] = (range_counts(a, [(0, b)], [0.3, 0.4], kernel=kernel),
                      mccs_sums(a, [(0, b)], 0.3, kernel=kernel))
    np.testing.assert_array_equal(out["1"][0], out["3"][0])
    np.testing.assert_array_equal(out["1"][1], out["3"][1])
