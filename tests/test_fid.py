"""FID: streaming statistics, Frechet distance vs pytorch-fid's formula, FID Inception-v3 layout."""
from __future__ import annotations

import itertools
import sys
import warnings

import numpy as np
import pytest
from scipy import linalg

from modeaudit.tasks.metrics.fid import StreamingStats, frechet_distance, frechet_distance_stats, load_reference_stats


# ---------------------------------------------------------------------------
# Reference: pytorch-fid's calculate_frechet_distance
# (mseitzer/pytorch-fid, src/pytorch_fid/fid_score.py), reproduced with its
# logic unchanged. pytorch-fid itself cannot be installed here (it needs
# torchvision). Two compatibility shims, neither changing the arithmetic:
# SciPy >= 1.16 deprecates sqrtm's `disp` (warning silenced) and SciPy >= 1.18
# removes it (then called without it, which returns the root alone).
# ---------------------------------------------------------------------------
def _sqrtm_disp_false(a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        try:
            return linalg.sqrtm(a, disp=False)
        except TypeError:  # SciPy >= 1.18: no `disp`
            return linalg.sqrtm(a), None


def _sqrtm(a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def pytorch_fid_calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance ("Stable version by Dougal J. Sutherland")."""
    mu1 = np.atleast_1d(mu1)
    mu2 = np.atleast_1d(mu2)

    sigma1 = np.atleast_2d(sigma1)
    sigma2 = np.atleast_2d(sigma2)

    assert mu1.shape == mu2.shape, "Training and test mean vectors have different lengths"
    assert sigma1.shape == sigma2.shape, "Training and test covariances have different dimensions"

    diff = mu1 - mu2

    # Product might be almost singular
    covmean, _ = _sqrtm_disp_false(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        msg = ("fid calculation produces singular product; "  # noqa: UP031 (verbatim)
               "adding %s to diagonal of cov estimates") % eps
        print(msg)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))

    # Numerical error might give slight imaginary component
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError("Imaginary component {}".format(m))  # noqa: UP032 (verbatim)
        covmean = covmean.real

    tr_covmean = np.trace(covmean)

    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


OFFSET_MSG = "fid calculation produces singular product"


def _features(rng, n, d, shift=0.0, scale=1.0):
    """Correlated features (a random linear mix), like network activations."""
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix) * scale + shift + rng.normal(size=d)


def _stats(x):
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _rel(a, b):
    return abs(a - b) / max(abs(a), abs(b))


def _exact_rank_factor(x):
    """B with cov(x) = B^T B and B of full row rank n-1 (< d), from the SVD of the centred rows."""
    xc = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    r = int((s > s[0] * 1e-10).sum())
    return s[:r, None] * vt[:r] / np.sqrt(x.shape[0] - 1)


def _exact_rank_trace_sqrt(x1, x2):
    """Tr((S1 S2)^{1/2}) for S1 = cov(x1), S2 = cov(x2) of rank < d, on their exact ranges.

    With S1 = B^T B and S2 = C^T C, the nonzero eigenvalues of S1 S2 are those of
    (B C^T)^T (B C^T), so the trace is the sum of the singular values of the
    small matrix B C^T. Singular values carry no square-rooted rounding noise,
    so this is accurate to ~1e-15 relative: an independent ground truth.
    """
    return np.linalg.svd(_exact_rank_factor(x1) @ _exact_rank_factor(x2).T, compute_uv=False).sum()


# --------------------------------------------------------------- Frechet distance
@pytest.mark.parametrize("d", [16, 64, 128, 256])
def test_matches_pytorch_fid_well_conditioned(d, capsys):
    rng = np.random.default_rng(d)
    mu1, s1 = _stats(_features(rng, 4 * d, d))
    mu2, s2 = _stats(_features(rng, 5 * d, d, shift=0.3, scale=1.4))
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = pytorch_fid_calculate_frechet_distance(mu1, s1, mu2, s2)
    assert OFFSET_MSG not in capsys.readouterr().out  # full rank: no offset retry
    assert ours > 0
    assert _rel(ours, ref) < 1e-6, (ours, ref)


@pytest.mark.parametrize("d", [16, 64, 128, 256])
def test_matches_pytorch_fid_rank_deficient(d, capsys):
    """n < d: both covariances singular, so S1 S2 is singular.

    What pytorch-fid does here depends on SciPy. With the installed SciPy
    (1.17, C reimplementation of sqrtm since 1.16) sqrtm of the singular
    product stays finite: the direct path runs, returns a complex matrix whose
    tiny imaginary part is dropped, and the trace is off by ~1e-8 relative
    (sqrt of rounding-noise eigenvalues). Older SciPy could return inf/nan,
    triggering the eps * I retry; that branch is checked separately below
    (test_pytorch_fid_offset_path), and handled here if it occurs.
    """
    rng = np.random.default_rng(1000 + d)
    x1 = _features(rng, d // 2, d)
    x2 = _features(rng, d // 4 + 2, d, shift=0.2, scale=0.8)
    mu1, s1 = _stats(x1)
    mu2, s2 = _stats(x2)
    assert np.linalg.matrix_rank(s1) < d and np.linalg.matrix_rank(s2) < d

    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = pytorch_fid_calculate_frechet_distance(mu1, s1, mu2, s2)
    if OFFSET_MSG in capsys.readouterr().out:
        # pytorch-fid's retry: shifted square root, unshifted traces.
        eps, eye = 1e-6, np.eye(d)
        expected = frechet_distance(mu1, s1 + eps * eye, mu2, s2 + eps * eye) - 2 * d * eps
        assert _rel(expected, ref) < 1e-6, (expected, ref)
        direct = False
    else:
        assert _rel(ours, ref) < 1e-6, (ours, ref)
        direct = True

    # Ours is exact here, to rounding: same value as on the exact ranges of S1, S2.
    diff = mu1 - mu2
    exact = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _exact_rank_trace_sqrt(x1, x2)
    assert _rel(ours, exact) < 1e-12, (ours, exact)
    if direct:  # pytorch-fid's sqrtm of the singular product: ~1e-8 off (measured 6e-9 .. 1.2e-8)
        assert _rel(ours, exact) <= _rel(ref, exact) < 1e-6


def test_pytorch_fid_offset_path(monkeypatch, capsys):
    """Force the eps * I retry (what older SciPy did on singular products) and pin what it computes.

    The retry evaluates Tr(S1) + Tr(S2) - 2 Tr(((S1 + eps I)(S2 + eps I))^{1/2}),
    i.e. our distance of the shifted covariances minus 2 d eps. For rank-deficient
    covariances that is biased by O(sqrt(eps)) per null direction, far more than
    1e-6 relative (here 6.5e-5): ours never takes that detour.
    """
    d, eps = 64, 1e-6
    rng = np.random.default_rng(7)
    mu1, s1 = _stats(_features(rng, 32, d))
    mu2, s2 = _stats(_features(rng, 40, d, shift=0.1))

    # The first (direct) sqrtm returns a non-finite root, as old SciPy's did;
    # the retry goes through _sqrtm, left as is.
    monkeypatch.setattr(sys.modules[__name__], "_sqrtm_disp_false",
                        lambda a: (np.full(a.shape, np.inf), np.inf))
    ref = pytorch_fid_calculate_frechet_distance(mu1, s1, mu2, s2, eps=eps)
    assert OFFSET_MSG in capsys.readouterr().out

    eye = np.eye(d)
    shifted = frechet_distance(mu1, s1 + eps * eye, mu2, s2 + eps * eye)
    assert _rel(shifted - 2 * d * eps, ref) < 1e-6
    unshifted = frechet_distance(mu1, s1, mu2, s2)
    assert _rel(unshifted, ref) > 1e-6  # the offset's bias, measurable


def test_closed_form_diagonal():
    """Diagonal covariances: FD = ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2, an independent check."""
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.01, 5, size=50), rng.uniform(0.01, 5, size=50)
    a[:10] = 0.0  # singular, too
    mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert _rel(frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected) < 1e-12


@pytest.mark.parametrize("n", [300, 40])  # full rank and rank-deficient (d = 128)
def test_self_distance_is_zero_and_symmetric(n):
    rng = np.random.default_rng(n)
    mu1, s1 = _stats(_features(rng, n, 128, shift=5.0))
    mu2, s2 = _stats(_features(rng, n + 17, 128, scale=2.0))
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-10 * np.trace(s1)
    ab, ba = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert ab > 0 and _rel(ab, ba) < 1e-10


def _centred(x):
    return x - x.mean(axis=0)


def _data_ground_truth(x1, x2):
    """FD of cov(x1), cov(x2) without any square root of a matrix.

    S1 = A A^T and S2 = B B^T with A = xc1^T / sqrt(n1 - 1), B = xc2^T / sqrt(n2 - 1)
    (xc: the centred rows), so Tr((S1 S2)^{1/2}) is the nuclear norm of A^T B
    (the sum of its singular values), and Tr(S_i) is ||xc_i||_F^2 / (n_i - 1).
    """
    a = _centred(x1).T / np.sqrt(x1.shape[0] - 1)
    b = _centred(x2).T / np.sqrt(x2.shape[0] - 1)
    diff = x1.mean(axis=0) - x2.mean(axis=0)
    nuclear = np.linalg.svd(a.T @ b, compute_uv=False).sum()
    return diff @ diff + np.sum(a * a) + np.sum(b * b) - 2 * nuclear


def _weak_direction_worlds(rng, d, kind):
    """x1 with rank-deficient or ill-conditioned covariance, x2 with large variance along x1's weak directions."""
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    n_weak = d // 4
    if kind == "rank_deficient":
        # x1 lives in a (d - n_weak)-dim subspace: S1 has n_weak exact null directions.
        x1 = rng.normal(size=(2 * d, d - n_weak)) @ q[:, : d - n_weak].T
    else:
        # Full rank, condition number 2e14: the weakest quarter's eigenvalues lie in
        # [5e-15, 2e-14] * max, below d * eps * max (the old floor), yet real.
        scale = np.concatenate([np.geomspace(1.0, 1e-3, d - n_weak),
                                np.sqrt(np.geomspace(2e-14, 5e-15, n_weak))])
        x1 = (rng.normal(size=(4 * d, d)) * scale) @ q.T
    weak = q[:, d - n_weak:]
    x2 = rng.normal(size=(3 * d, d)) * 0.1 + rng.normal(size=(3 * d, n_weak)) @ weak.T
    return x1, x2


@pytest.mark.parametrize("kind", ["rank_deficient", "ill_conditioned"])
@pytest.mark.parametrize("d", [32, 128])
def test_exact_and_symmetric_along_weak_directions(kind, d):
    """Ill-conditioned or singular S1, large S2 along S1's weak directions: exact and symmetric.

    The weak directions' terms sqrt(l1 * l2) are tiny in S1 but weighed by S2's
    large variance there; flooring S1's eigenvalues (the earlier implementation)
    dropped them: on the ill-conditioned worlds it was off by 4.6e-8 (d = 32) and
    1.3e-7 (d = 128) relative, and FD(a, b) != FD(b, a).
    """
    rng = np.random.default_rng(2000 + d + (kind == "ill_conditioned"))
    x1, x2 = _weak_direction_worlds(rng, d, kind)
    mu1, s1 = _stats(x1)
    mu2, s2 = _stats(x2)
    truth = _data_ground_truth(x1, x2)
    ab, ba = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert _rel(ab, truth) < 1e-9, (ab, truth)
    assert _rel(ba, truth) < 1e-9, (ba, truth)
    assert _rel(ab, ba) < 1e-9, (ab, ba)
    # The case is what it claims: S1 singular (its rounding-level eigenvalues
    # must add nothing), not merely ill-conditioned.
    if kind == "rank_deficient":
        assert np.linalg.matrix_rank(s1) < d


def test_stats_with_fewer_rows_than_dimensions_are_factored_from_their_rows(monkeypatch):
    """Fewer rows than dimensions (a few hundred images' 2048-d features): the statistics keep their rows, in
    batches and across merges, and the distance is computed from them with no d x d eigendecomposition; equal to
    the data ground truth and to the covariance form. From dim rows on they are dropped and the covariance is used."""
    import pickle

    from modeaudit.tasks.metrics import fid as fid_mod
    rng = np.random.default_rng(31)
    d = 96
    x1 = _features(rng, 40, d, shift=3.0)
    x2 = _features(rng, 57, d, shift=2.5, scale=1.3)
    a = StreamingStats(d)
    for chunk in np.array_split(x1, 4):
        a.update(chunk)
    b = StreamingStats(d).update(x2[:20]).merge(StreamingStats(d).update(x2[20:]))
    b = pickle.loads(pickle.dumps(b))            # as it comes back from a Dask worker
    assert np.array_equal(a.rows, x1) and np.array_equal(b.rows, x2)
    truth = _data_ground_truth(x1, x2)
    cov_form = frechet_distance(a.mean, a.cov(), b.mean, b.cov())
    eighs = []
    real_eigh = np.linalg.eigh
    monkeypatch.setattr(fid_mod.np.linalg, "eigh", lambda m: eighs.append(m.shape) or real_eigh(m))
    got, back = frechet_distance_stats(a, b), frechet_distance_stats(b, a)
    assert eighs == []
    assert _rel(got, truth) < 1e-11 and _rel(back, truth) < 1e-11 and _rel(cov_form, truth) < 1e-9
    assert abs(frechet_distance_stats(a, a)) < 1e-12 * np.trace(a.cov())
    # Against a (mu, sigma) reference: only the reference side is decomposed.
    mixed = frechet_distance_stats(a, (b.mean, b.cov()))
    assert eighs == [(d, d)] and _rel(mixed, truth) < 1e-9
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance_stats(a, (np.full(d, np.nan), b.cov()))
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance_stats(a, (b.mean[:-1], b.cov()))
    # dim rows or more: no rows kept, the covariance form.
    big = StreamingStats(d).update(_features(rng, 60, d)).update(_features(rng, 50, d))
    assert big.rows is None and big.n == 110
    assert frechet_distance_stats(big, b) == pytest.approx(frechet_distance(big.mean, big.cov(), b.mean, b.cov()),
                                                           rel=1e-9)
    x3 = _features(rng, d, d)
    assert StreamingStats(d).update(x3).rows is None
    assert StreamingStats(d).merge(StreamingStats(d).update(x3[:50])).merge(StreamingStats(d).update(x3[50:])).rows is None


def test_frechet_distance_input_errors():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="mean vectors"):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(mu, s, mu, np.eye(4))
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance(mu, s, mu, np.full((3, 3), np.nan))


# ------------------------------------------------------------- streaming stats
def _assert_matches_oneshot(st, x, tol=1e-10):
    mu, sigma = _stats(np.asarray(x, np.float64))
    assert st.n == x.shape[0]
    assert np.max(np.abs(st.mean - mu)) <= tol * np.max(np.abs(mu))
    assert np.max(np.abs(st.cov() - sigma)) <= tol * np.max(np.abs(sigma))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_streaming_uneven_batches_equal_oneshot(dtype):
    rng = np.random.default_rng(11)
    # A large common offset: the naive E[xx^T] - mu mu^T would lose ~8 digits here.
    x = _features(rng, 1000, 24, shift=1e3).astype(dtype)
    cuts = np.sort(rng.choice(np.arange(1, 1000), size=40, replace=False))
    cuts = np.concatenate([[0, 0, 1], cuts, [1000, 1000]])  # empty and 1-row batches too
    st = StreamingStats(24)
    for a, b in itertools.pairwise(cuts):
        assert st.update(x[a:b]) is st
    _assert_matches_oneshot(st, x)


def test_merge_shards_in_any_order_equals_oneshot():
    rng = np.random.default_rng(12)
    x = _features(rng, 700, 32, shift=50.0)
    shards = [x[:123], x[123:530], x[530:]]

    def shard_stats(rows):  # each "worker" streams its shard in its own batches
        st = StreamingStats(32)
        for chunk in np.array_split(rows, 5):
            st.update(chunk)
        return st

    parts = [shard_stats(s) for s in shards]
    snapshot = [(p.n, p.mean.copy(), p.m2.copy()) for p in parts]
    for order in itertools.permutations(range(3)):
        acc = StreamingStats(32)
        for i in order:
            acc.merge(parts[i])
        _assert_matches_oneshot(acc, x)
    # Tree-shaped reduction: (a + b) + c vs a + (b + c).
    left = StreamingStats(32).merge(parts[0]).merge(parts[1]).merge(parts[2])
    right = StreamingStats(32).merge(parts[0]).merge(StreamingStats(32).merge(parts[1]).merge(parts[2]))
    _assert_matches_oneshot(left, x)
    _assert_matches_oneshot(right, x)
    # merge reads its argument only.
    for p, (n, mean, m2) in zip(parts, snapshot):
        assert p.n == n and np.array_equal(p.mean, mean) and np.array_equal(p.m2, m2)


def test_streaming_errors():
    st = StreamingStats(4)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        st.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        st.update(np.array([[0.0, np.nan, 0.0, 0.0]]))
    st.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        st.cov()
    with pytest.raises(ValueError, match="dim 3"):
        st.merge(StreamingStats(3))


# --------------------------------------------------------------------- npz I/O
def test_npz_round_trip_with_pytorch_fid_keys(tmp_path):
    rng = np.random.default_rng(13)
    x = _features(rng, 500, 16)
    st = StreamingStats(16).update(x[:300])
    path = tmp_path / "stats.npz"
    st.to_npz(path)
    with np.load(path) as f:  # what pytorch-fid's compute_statistics_of_path reads
        assert {"mu", "sigma"} <= set(f.files)
        np.testing.assert_array_equal(f["mu"], st.mean)
        np.testing.assert_array_equal(f["sigma"], st.cov())
    mu, sigma = load_reference_stats(path)
    np.testing.assert_array_equal(mu, st.mean)
    np.testing.assert_array_equal(sigma, st.cov())
    # Resume accumulating from the file (n is stored alongside).
    resumed = StreamingStats.from_npz(path).update(x[300:])
    _assert_matches_oneshot(resumed, x)


def test_reads_pytorch_fid_written_stats(tmp_path):
    rng = np.random.default_rng(14)
    mu, sigma = _stats(_features(rng, 100, 8))
    path = tmp_path / "ref.npz"
    np.savez_compressed(path, mu=mu, sigma=sigma)  # exactly how pytorch-fid's save_fid_stats writes
    got_mu, got_sigma = load_reference_stats(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    with pytest.raises(ValueError, match="no 'n'"):
        StreamingStats.from_npz(path)


def test_load_reference_stats_errors(tmp_path):
    p = tmp_path / "only_mu.npz"
    np.savez(p, mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['sigma'\].*keys present: \['mu'\]"):
        load_reference_stats(p)
    p = tmp_path / "wrong_names.npz"
    np.savez(p, m=np.zeros(3), s=np.eye(3))
    with pytest.raises(ValueError, match=r"\['mu', 'sigma'\].*\['m', 's'\]"):
        load_reference_stats(p)
    p = tmp_path / "shape.npz"
    np.savez(p, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"shape mismatch.*\(3, 3\).*\(4, 4\)"):
        load_reference_stats(p)
    p = tmp_path / "mu2d.npz"
    np.savez(p, mu=np.zeros((1, 3)), sigma=np.eye(3))
    with pytest.raises(ValueError, match="'mu' must be 1-d"):
        load_reference_stats(p)
    p = tmp_path / "nan.npz"
    np.savez(p, mu=np.array([0.0, np.nan]), sigma=np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        load_reference_stats(p)
    p = tmp_path / "single.npy"
    np.save(p, np.zeros(3))
    with pytest.raises(ValueError, match="expected an .npz"):
        load_reference_stats(p)
    with pytest.raises(FileNotFoundError):
        load_reference_stats(tmp_path / "absent.npz")


# ======================================================= FID Inception-v3 layout
# torch is a test dependency, but the FID tests above must not depend on it.
try:
    import torch

    from modeaudit.tasks.models.inception import (
        FIDInceptionV3,
        fid_inception_v3,
        inception_features,
        load_fid_state_dict,
    )
except ImportError:  # pragma: no cover
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")

# Expected key -> shape for representative layers, read off torchvision's
# models/inception.py (Inception3, BasicConv2d, InceptionA..E) with
# pytorch-fid's fid_inception_v3(): num_classes=1008, aux_logits=False,
# Mixed_5b/5c/5d = FIDInceptionA(192, 32) / (256, 64) / (288, 64),
# Mixed_6b..6e = FIDInceptionC(768, 128 / 160 / 160 / 192),
# Mixed_7b = FIDInceptionE_1(1280), Mixed_7c = FIDInceptionE_2(2048).
EXPECTED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.weight": (32,),
    "Conv2d_1a_3x3.bn.bias": (32,),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_1a_3x3.bn.num_batches_tracked": (),
    "Conv2d_2a_3x3.conv.weight": (32, 32, 3, 3),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_1.conv.weight": (48, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch3x3dbl_1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch3x3dbl_2.conv.weight": (96, 64, 3, 3),
    "Mixed_5b.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch_pool.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6b.branch7x7_1.conv.weight": (128, 768, 1, 1),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch7x7_3.conv.weight": (192, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
    "Mixed_6b.branch_pool.conv.weight": (192, 768, 1, 1),
    "Mixed_6c.branch7x7_1.conv.weight": (160, 768, 1, 1),
    "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7b.branch3x3dbl_2.conv.weight": (384, 448, 3, 3),
    "Mixed_7b.branch_pool.conv.weight": (192, 1280, 1, 1),
    "Mixed_7c.branch1x1.conv.weight": (320, 2048, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.bn.running_var": (384,),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
TOP_LEVEL = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
             "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"]

# torchvision documents num_params = 27,161,264 for inception_v3 (Inception_V3_Weights.IMAGENET1K_V1:
# 1000 classes, with the AuxLogits head). pytorch-fid's model has no aux head and 1008 classes:
AUX_PARAMS = (128 * 768 + 2 * 128) + (768 * 128 * 5 * 5 + 2 * 768) + (1000 * 768 + 1000)
FC_EXTRA = 8 * 2048 + 8  # 1008 vs 1000 output classes
FID_INCEPTION_PARAMS = 27_161_264 - AUX_PARAMS + FC_EXTRA
# 94 BasicConv2d (stem 5, 3 x A 7, B 4, 4 x C 10, D 6, 2 x E 9), each conv.weight + 5 BN entries; fc 2.
N_CONV = 5 + 3 * 7 + 4 + 4 * 10 + 6 + 2 * 9


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return fid_inception_v3(None)


@needs_torch
def test_state_dict_layout(net):
    sd = net.state_dict()
    for key, shape in EXPECTED_SHAPES.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape), shape)
    assert list(dict.fromkeys(k.split(".")[0] for k in sd)) == TOP_LEVEL
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert N_CONV == 94 and len(sd) == 6 * N_CONV + 2
    assert len(list(net.parameters())) == 3 * N_CONV + 2
    assert FID_INCEPTION_PARAMS == 23_850_960
    assert sum(p.numel() for p in net.parameters()) == FID_INCEPTION_PARAMS
    conv = net.Mixed_6b.branch7x7_2
    assert conv.conv.bias is None and conv.bn.eps == 0.001
    assert conv.conv.padding == (0, 3) and net.Conv2d_1a_3x3.conv.stride == (2, 2)
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def _pool_branch_output(block, x, pool_out):
    """Run `block` with its pool-branch conv reduced to 'copy input channel 0', return that channel."""
    bp = block.branch_pool
    with torch.no_grad():
        bp.conv.weight.zero_()
        bp.conv.weight[0, 0] = 1.0
        bp.bn.weight.fill_(1.0)
        bp.bn.bias.zero_()
        bp.bn.running_mean.zero_()
        bp.bn.running_var.fill_(1.0 - bp.bn.eps)  # BN is then the identity
        out = block.eval()(x)
    return out[:, -pool_out][:, None]


@needs_torch
@pytest.mark.parametrize("name,in_ch,pool_out,kind", [
    ("Mixed_5b", 192, 32, "avg"),     # FIDInceptionA
    ("Mixed_6b", 768, 192, "avg"),    # FIDInceptionC
    ("Mixed_7b", 1280, 192, "avg"),   # FIDInceptionE_1
    ("Mixed_7c", 2048, 192, "max"),   # FIDInceptionE_2
])
def test_fid_pooling_patches(name, in_ch, pool_out, kind):
    """The FID blocks' pool branches: avg pool ignoring padding, or (Mixed_7c) max pool."""
    block = getattr(FIDInceptionV3(), name)
    torch.manual_seed(1)
    x = torch.rand(1, in_ch, 6, 6) + 0.5  # positive: the ReLU after BN is the identity
    got = _pool_branch_output(block, x, pool_out)
    x0 = x[:, :1]
    if kind == "avg":
        want = torch.nn.functional.avg_pool2d(x0, 3, stride=1, padding=1, count_include_pad=False)
        torchvision_default = torch.nn.functional.avg_pool2d(x0, 3, stride=1, padding=1)
        assert not torch.allclose(got, torchvision_default)  # the borders differ
    else:
        want = torch.nn.functional.max_pool2d(x0, 3, stride=1, padding=1)
    torch.testing.assert_close(got, want)


def _random_state_dict(net, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in net.state_dict().items():
        if v.dtype.is_floating_point:
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randint(0, 100, v.shape, generator=g, dtype=v.dtype)
    return out


@needs_torch
def test_save_load_round_trip_strict(net, tmp_path):
    sd = _random_state_dict(net, 5)
    path = tmp_path / "pt_inception-random.pth"
    torch.save(sd, path)
    loaded = fid_inception_v3(str(path)).state_dict()
    assert loaded.keys() == sd.keys()
    for k in sd:
        assert torch.equal(loaded[k], sd[k]), k
    # Checkpoints written before PyTorch 0.4.1 have no num_batches_tracked; BatchNorm fills it in.
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, path)
    loaded = fid_inception_v3(str(path)).state_dict()
    assert torch.equal(loaded["Mixed_7c.branch_pool.conv.weight"], sd["Mixed_7c.branch_pool.conv.weight"])


@needs_torch
def test_mismatched_state_dict_raises_clear_error(net, tmp_path):
    sd = _random_state_dict(net, 6)
    bad = dict(sd)
    del bad["Mixed_6c.branch7x7_2.conv.weight"]
    bad["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    bad["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's 1000-class head
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError) as err:
        fid_inception_v3(str(path))
    msg = str(err.value)
    assert "bad.pth" in msg
    assert "1 missing keys: ['Mixed_6c.branch7x7_2.conv.weight']" in msg
    assert "1 unexpected keys: ['AuxLogits.fc.weight']" in msg
    assert "fc.weight: checkpoint (1000, 2048) vs model (1008, 2048)" in msg
    # A long list is cut to the first few names.
    with pytest.raises(ValueError, match=r"\(\+\d+ more\)"):
        load_fid_state_dict(FIDInceptionV3(), {})
    with pytest.raises(ValueError, match="expected a state_dict"):
        load_fid_state_dict(FIDInceptionV3(), [1, 2])


@needs_torch
def test_forward_features(net):
    """Two small images (resized to 299 inside, as pytorch-fid does), batched two ways."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(2, 3, 40, 32), dtype=np.uint8)
    with torch.no_grad():
        direct = net(torch.from_numpy(imgs.astype(np.float32) / 255.0))
    assert direct.shape == (2, 2048) and torch.isfinite(direct).all()
    feats = inception_features(net, imgs, batch_size=1)  # uint8 path, one image per batch
    assert feats.dtype == np.float64 and feats.shape == (2, 2048)
    np.testing.assert_allclose(feats, direct.double().numpy(), rtol=1e-5,
                               atol=1e-6 * float(direct.abs().max()))


@needs_torch
def test_inception_features_input_checks(net):
    with pytest.raises(ValueError, match="channels last"):
        inception_features(net, np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inception_features(net, np.full((1, 3, 8, 8), 255.0, np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inception_features(net, np.full((1, 3, 8, 8), -1.0, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        inception_features(net, np.zeros((1, 3, 8, 8), np.int32))
    assert inception_features(net, np.zeros((0, 3, 8, 8), np.float32)).shape == (0, 2048)
