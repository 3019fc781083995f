"""The projected-normal surrogate (tasks/stats/surrogate.py) and its use as the selection test's null."""
import numpy as np
import pytest

from modeaudit.tasks.stats import surrogate as sg
from modeaudit.tasks.join.kernels import DEFAULT_RADII
from modeaudit.tasks.stats.selection import excess, gaussian_surrogate, selection_test


def _pn(rng, n, mu, scales):
    x = rng.standard_normal((n, len(mu))) * scales + mu
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _truth(mu, scales):
    """The true (mu, Sigma) in the fit's scale convention tr(Sigma) = D."""
    D = len(mu)
    c = D / np.sum(scales ** 2)
    return mu * np.sqrt(c), np.diag(scales ** 2) * c


def test_radius_moments_match_adaptive_quadrature():
    from scipy.integrate import quad
    beta = np.r_[np.linspace(-30, 30, 25), -300.0, 300.0]
    for n in (1, 3, 15, 127, 511):
        got = sg._radius_moments(beta, n)
        for b, g in zip(beta, got):
            mode = 0.5 * (b + np.sqrt(b * b + 4 * n))
            top = n * np.log(mode) - 0.5 * mode * mode + b * mode
            f = lambda t, k: np.exp(n * np.log(t) - 0.5 * t * t + b * t - top) * t ** k  # noqa: E731
            pts = (mode, 2 * mode + 10)
            num = quad(f, 0, pts[1], args=(1,), points=[mode], limit=400, epsabs=0, epsrel=1e-12)[0]
            den = quad(f, 0, pts[1], args=(0,), points=[mode], limit=400, epsabs=0, epsrel=1e-12)[0]
            num += quad(f, pts[1], np.inf, args=(1,))[0]
            den += quad(f, pts[1], np.inf, args=(0,))[0]
            assert g == pytest.approx(num / den, rel=1e-7), (n, b)


def test_ml_fit_recovers_an_offset_anisotropic_law():
    # The maximum-likelihood fit beats the truth's likelihood on its own sample, and lands near it.
    rng = np.random.default_rng(0)
    D = 16
    mu, scales = np.r_[1.5, np.zeros(D - 1)], np.arange(1, D + 1) ** -0.5
    U = _pn(rng, 20_000, mu, scales)
    f = sg.fit_projected_normal(U, debias=False)
    tmu, tS = _truth(mu, scales)
    assert sg._log_likelihood(U, f.mu, f.Sigma) >= sg._log_likelihood(U, tmu, tS)
    np.testing.assert_allclose(f.mu[0], tmu[0], rtol=0.03)
    np.testing.assert_allclose(np.diag(f.Sigma), np.diag(tS), rtol=0.1, atol=0.05)


def test_moment_fit_is_not_the_law_but_ml_is():
    # Why the surrogate is an ML fit: the covariance of the unit rows squeezes anisotropy.
    rng = np.random.default_rng(1)
    D = 16
    scales = np.arange(1, D + 1) ** -1.0
    U = _pn(rng, 20_000, np.zeros(D), scales)
    f = sg.fit_projected_normal(U, debias=False)
    ev_ml = np.linalg.eigvalsh(f.Sigma)
    ev_mom = np.linalg.eigvalsh(np.cov(U, rowvar=False))
    true_ratio = (scales[0] / scales[-1]) ** 2
    assert abs(np.log(ev_ml[-1] / ev_ml[0] / true_ratio)) < 0.3
    assert ev_mom[-1] / ev_mom[0] < true_ratio / 2


def test_debiasing_removes_spurious_structure_of_an_isotropic_sample():
    rng = np.random.default_rng(2)
    D = 16
    U = _pn(rng, 1000, np.zeros(D), np.ones(D))
    raw = sg.fit_projected_normal(U, debias=False)
    fit = sg.fit_projected_normal(U)
    ratio = lambda S: np.linalg.eigvalsh(S)[-1] / np.linalg.eigvalsh(S)[0]  # noqa: E731
    assert fit.shrink_cov > 0.3 and fit.shrink_mean > 0.3
    assert ratio(fit.Sigma) < ratio(raw.Sigma)
    assert np.linalg.norm(fit.mu) < np.linalg.norm(raw.mu)


def test_fit_is_deterministic_and_samples_are_seeded():
    rng = np.random.default_rng(3)
    U = _pn(rng, 2000, np.r_[1.0, np.zeros(7)], np.ones(8))
    a, b = sg.fit_projected_normal(U), sg.fit_projected_normal(U)
    np.testing.assert_array_equal(a.Sigma, b.Sigma)
    x = a.sample(np.random.default_rng(5), 100)
    np.testing.assert_array_equal(x, b.sample(np.random.default_rng(5), 100))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)


def test_too_few_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="at least D \\+ 2"):
        sg.fit_projected_normal(np.eye(8)[:5])


def test_selection_against_the_surrogate_uses_excess_curves():
    rng = np.random.default_rng(4)
    D, m, n_t = 8, 300, 3000
    S = _pn(rng, m, np.r_[1.0, np.zeros(D - 1)], np.ones(D)).astype(np.float32)
    T = _pn(rng, n_t, np.r_[1.0, np.zeros(D - 1)], np.ones(D)).astype(np.float32)
    null = gaussian_surrogate(S, seed=0)
    assert null.kind == "surrogate" and null.fit["n_fit"] == m
    from modeaudit.tasks.stats.selection import worst_case_curve
    w, curve = worst_case_curve(S, [(0, T)], n_t, 0.25, DEFAULT_RADII)
    with pytest.raises(ValueError, match="obs_S"):
        selection_test(curve, null, m=m, n_t=n_t, d0=0.25, radii=DEFAULT_RADII, replicates=19, alpha=0.05)
    res = selection_test(curve, null, m=m, n_t=n_t, d0=0.25, radii=DEFAULT_RADII, replicates=19, alpha=0.05,
                         obs_S=S, obs_w=w)
    assert res["null_kind"] == "surrogate" and len(res["obs_excess"]) == len(DEFAULT_RADII)
    assert "surrogate_fit" in res and 0 < res["p"] <= 1
    # A tight planted cluster at the peak of the same smooth world (10% of the mass) is far
    # beyond what the refitted smooth model predicts at small radii.
    P = S.copy()
    P[:30] = (np.eye(D)[0] + 0.05 * rng.standard_normal((30, D))).astype(np.float32)
    P /= np.linalg.norm(P, axis=1, keepdims=True)
    TP = T.copy()
    TP[:300] = (np.eye(D)[0] + 0.05 * rng.standard_normal((300, D))).astype(np.float32)
    TP /= np.linalg.norm(TP, axis=1, keepdims=True)
    w, curve = worst_case_curve(P, [(0, TP)], n_t, 0.25, DEFAULT_RADII)
    assert w < 30
    res = selection_test(curve, gaussian_surrogate(P, seed=0), m=m, n_t=n_t, d0=0.25, radii=DEFAULT_RADII,
                         replicates=39, alpha=0.05, obs_S=P, obs_w=w)
    assert res["reject"] and res["p"] <= 0.05
    assert res["obs_excess"][0] > 10


def test_excess_is_zero_when_observed_equals_predicted():
    f = np.array([0.0, 0.01, 0.5])
    np.testing.assert_allclose(excess(f, f, 1000), 0)
    assert (excess(f * 2 + 0.01, f, 1000) > 0).all()
    # 12 counts where none are predicted weigh less than 300 where 25 are.
    assert excess(np.array([12 / 3000]), np.array([0.0]), 3000) < excess(np.array([0.1]), np.array([25 / 3000]), 3000)


def test_ledoit_wolf_shrinkage_equals_scikit_learns():
    """The surrogate's own Ledoit-Wolf intensity (no scikit-learn import on a worker) is scikit-learn's,
    across scales, few rows in many dimensions (its blocked sums past 1000 columns), and degenerate rows."""
    from sklearn.covariance import ledoit_wolf_shrinkage as sklearn_lw

    from modeaudit.tasks.stats.surrogate import ledoit_wolf_shrinkage
    rng = np.random.default_rng(11)
    for n, D in ((5, 3), (50, 2), (200, 16), (30, 64), (40, 1100)):
        for scale in (1e-8, 1.0, 1e6):
            X = rng.standard_normal((n, D)) * scale * rng.exponential(1.0, D)
            want = sklearn_lw(X, assume_centered=True)
            assert ledoit_wolf_shrinkage(X) == pytest.approx(want, rel=1e-12, abs=1e-300)
        assert ledoit_wolf_shrinkage(np.ones((n, D))) == sklearn_lw(np.ones((n, D)), assume_centered=True) == 0
    iso = np.vstack([np.eye(4), -np.eye(4)])          # S = mu I exactly: nothing to shrink toward
    assert ledoit_wolf_shrinkage(iso) == 0.0
