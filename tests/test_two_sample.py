"""Density-ratio test of dense balls against a reference set (tasks/stats/two_sample.py).

Hand-worked values pin the formulas; simulations check the error rates the module
promises (CI coverage, family-wise type-I error with Holm), each with a margin of
3 binomial standard errors so a correct implementation fails ~0.1 % of the time
at most, while a missing Holm factor or a wrong CI mapping fails for sure.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from modeaudit.tasks.stats.two_sample import ball_counts, density_ratio_test, holm, ratio_ci

ALPHA = 0.05
REPS = 2000
SE = math.sqrt(ALPHA * (1 - ALPHA) / REPS)


# ----------------------------------------------------------------------------
# Holm


def test_holm_hand_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> cummax 0.06
    adj = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02], rtol=0, atol=1e-15)


def test_holm_caps_at_one_ties_and_edges():
    np.testing.assert_allclose(holm([0.5, 0.4, 0.9]), [1.0, 1.0, 1.0])
    # tied p-values get the same adjusted value, whatever order the sort leaves
    np.testing.assert_allclose(holm([0.01, 0.01, 0.2]), [0.03, 0.03, 0.2])
    assert holm([]).shape == (0,)
    np.testing.assert_allclose(holm([0.02]), [0.02])
    # adjusted p-values are never below the raw ones and keep their order
    rng = np.random.default_rng(0)
    p = rng.uniform(size=50) ** 3
    adj = holm(p)
    assert np.all(adj >= p)
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)
    with pytest.raises(ValueError):
        holm([0.1, float("nan")])
    with pytest.raises(ValueError):
        holm([1.5])


# ----------------------------------------------------------------------------
# hand example: p0 = 0.5, x_t = 30, x_r = 10


def test_ratio_ci_and_p_hand_example():
    (res,) = density_ratio_test([30], 1000, [10], 1000)
    assert res["x_t"] == 30 and res["x_r"] == 10
    assert res["ratio"] == 3.0
    # Clopper-Pearson for pi = 30/40 at 95 %: [0.58804, 0.87309]; odds (n_r/n_t = 1)
    ci = stats.binomtest(30, 40, 0.5).proportion_ci(confidence_level=0.95, method="exact")
    want = [ci.low / (1 - ci.low), ci.high / (1 - ci.high)]
    np.testing.assert_allclose(res["ci"], want, rtol=1e-9)
    np.testing.assert_allclose(res["ci"], [1.42741, 6.87930], rtol=1e-5)
    # one-sided p = P(Bin(40, 1/2) >= 30) = sum_{j>=30} C(40, j) / 2^40
    p = sum(math.comb(40, j) for j in range(30, 41)) / 2 ** 40
    assert res["p"] == pytest.approx(p, rel=1e-12)
    assert res["p_adj"] == pytest.approx(p, rel=1e-12)  # k = 1: Holm is the identity
    assert res["reject"] is True


def test_unequal_sizes_scale_ratio_and_ci():
    # n_t = 2 n_r: the same counts mean half the mass ratio; p0 = 2/3
    (a,) = density_ratio_test([30], 2000, [10], 1000)
    (b,) = density_ratio_test([30], 1000, [10], 1000)
    assert a["ratio"] == pytest.approx(1.5)
    np.testing.assert_allclose(a["ci"], np.array(b["ci"]) / 2, rtol=1e-12)
    assert a["p"] == pytest.approx(stats.binomtest(30, 40, 2 / 3, alternative="greater").pvalue, rel=1e-12)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_matches_scipy_binomtest(alternative):
    rng = np.random.default_rng(1)
    x_t = rng.integers(0, 60, size=25)
    x_r = rng.integers(0, 60, size=25)
    n_t, n_r = 3000, 5000
    res = density_ratio_test(x_t, n_t, x_r, n_r, alpha=0.1, alternative=alternative)
    p0 = n_t / (n_t + n_r)
    for r, a, b in zip(res, x_t, x_r):
        n = int(a + b)
        if n == 0:
            continue
        bt = stats.binomtest(int(a), n, p0, alternative=alternative)
        assert r["p"] == pytest.approx(bt.pvalue, rel=1e-10, abs=1e-300)
        # the CI is the two-sided 90 % Clopper-Pearson interval whatever the alternative
        ci = stats.binomtest(int(a), n, p0).proportion_ci(confidence_level=0.9, method="exact")
        lo = ci.low / (1 - ci.low) * n_r / n_t
        hi = math.inf if ci.high == 1 else ci.high / (1 - ci.high) * n_r / n_t
        assert r["ci"][0] == pytest.approx(lo, rel=1e-8, abs=1e-300)
        assert r["ci"][1] == pytest.approx(hi, rel=1e-8)
    np.testing.assert_allclose([r["p_adj"] for r in res], holm([r["p"] for r in res]))


def test_ci_precise_when_reference_count_is_tiny():
    # pi_lo is ~1 - 3e-6 here: 1 - pi by subtraction would lose ~10 digits.
    lo, hi = ratio_ci([1_000_000], [1], 10**7, 10**7, 0.95)
    # Clopper-Pearson in odds form is an F quantile: lo = x/(y+1) * F(q; 2x, 2(y+1))
    want = 1_000_000 / 2 * stats.f.ppf(0.025, 2_000_000, 4)
    assert lo[0] == pytest.approx(want, rel=1e-9)
    want_hi = (1_000_001) / 1 * stats.f.isf(0.025, 2_000_002, 2)
    assert hi[0] == pytest.approx(want_hi, rel=1e-9)


# ----------------------------------------------------------------------------
# edge cases


def test_zero_reference_count():
    (r,) = density_ratio_test([12], 500, [0], 700)
    assert r["ratio"] == math.inf
    assert r["ci"][1] == math.inf
    # lower bound: pi_lo = (alpha/2)^(1/x) (Beta(x, 1) quantile), mapped
    pi_lo = 0.025 ** (1 / 12)
    assert r["ci"][0] == pytest.approx(pi_lo / (1 - pi_lo) * 700 / 500, rel=1e-9)
    assert r["p"] == pytest.approx((500 / 1200) ** 12, rel=1e-10)
    assert r["reject"] is True


def test_zero_model_count():
    (r,) = density_ratio_test([0], 500, [9], 500)
    assert r["ratio"] == 0.0
    assert r["ci"][0] == 0.0 and 0.0 < r["ci"][1] < math.inf
    assert r["p"] == 1.0 and r["reject"] is False
    (r,) = density_ratio_test([0], 500, [9], 500, alternative="less")
    assert r["p"] == pytest.approx(0.5 ** 9, rel=1e-12)


def test_empty_ball_in_both_sets():
    (r,) = density_ratio_test([0], 500, [0], 500)
    assert math.isnan(r["ratio"])
    assert r["ci"] == [0.0, math.inf]
    assert r["p"] == 1.0 and r["p_adj"] == 1.0 and r["reject"] is False


def test_empty_input_and_validation():
    assert density_ratio_test([], 10, [], 10) == []
    with pytest.raises(ValueError):
        density_ratio_test([1, 2], 10, [1], 10)
    with pytest.raises(ValueError):
        density_ratio_test([-1], 10, [1], 10)
    with pytest.raises(ValueError):
        density_ratio_test([1.5], 10, [1], 10)
    with pytest.raises(ValueError):
        density_ratio_test([11], 10, [1], 10)  # more rows in the ball than in T
    with pytest.raises(ValueError):
        density_ratio_test([1], 0, [1], 10)
    with pytest.raises(ValueError):
        density_ratio_test([1], 10, [1], 10, alpha=0)
    with pytest.raises(ValueError):
        density_ratio_test([1], 10, [1], 10, alternative="bigger")


def test_results_are_json_ready():
    import json
    res = density_ratio_test(np.array([3, 0], dtype=np.int32), 100, np.array([1, 0], dtype=np.int64), 100)
    assert isinstance(res[0]["x_t"], int) and isinstance(res[0]["reject"], bool)
    json.dumps(res[0])


# ----------------------------------------------------------------------------
# monotonicity


def test_monotone_in_model_count():
    x_t = np.arange(0, 80)
    res = density_ratio_test(x_t, 4000, np.full(x_t.size, 25), 5000)
    lo = np.array([r["ci"][0] for r in res])
    hi = np.array([r["ci"][1] for r in res])
    ratio = np.array([r["ratio"] for r in res])
    p = np.array([r["p"] for r in res])
    assert np.all(np.diff(ratio) > 0)
    assert np.all(np.diff(lo) >= 0) and np.all(np.diff(lo[1:]) > 0)
    assert np.all(np.diff(hi) > 0)
    assert np.all(np.diff(p) <= 0)
    assert np.all((lo <= ratio) & (ratio <= hi))
    # more reference mass: smaller ratio, larger p-value
    res2 = density_ratio_test(x_t, 4000, np.full(x_t.size, 40), 5000)
    assert all(b["ratio"] < a["ratio"] or a["x_t"] == 0 for a, b in zip(res, res2))
    assert all(b["p"] >= a["p"] for a, b in zip(res, res2))


def test_wider_ci_at_higher_confidence():
    (a,) = density_ratio_test([30], 1000, [10], 1000, alpha=0.05)
    (b,) = density_ratio_test([30], 1000, [10], 1000, alpha=0.01)
    assert b["ci"][0] < a["ci"][0] < 3 < a["ci"][1] < b["ci"][1]


# ----------------------------------------------------------------------------
# simulations: coverage, type-I error, power


def _poisson_counts(rng, true_ratio, n_t, n_r, mass, size):
    """Ball counts with reference mass `mass` and model mass true_ratio * mass."""
    return rng.poisson(n_t * mass * true_ratio, size), rng.poisson(n_r * mass, size)


def _binomial_counts(rng, true_ratio, n_t, n_r, mass, size):
    return rng.binomial(n_t, mass * true_ratio, size), rng.binomial(n_r, mass, size)


@pytest.mark.parametrize("sampler", [_poisson_counts, _binomial_counts])
@pytest.mark.parametrize("seed,true_ratio,n_t,n_r,mass", [
    (11, 1.0, 10_000, 10_000, 2e-3),   # ~20 per set
    (12, 1.0, 5_000, 20_000, 5e-4),    # few counts, unequal sizes
    (13, 3.0, 10_000, 10_000, 1e-3),   # collapse
    (14, 0.4, 20_000, 8_000, 2e-3),
    (15, 8.0, 4_000, 50_000, 2e-4),    # small reference counts (often x_r = 0)
])
def test_ci_coverage(sampler, seed, true_ratio, n_t, n_r, mass):
    rng = np.random.default_rng([seed, sampler is _binomial_counts])
    x_t, x_r = sampler(rng, true_ratio, n_t, n_r, mass, REPS)
    res = density_ratio_test(x_t, n_t, x_r, n_r, alpha=ALPHA)
    covered = np.mean([r["ci"][0] <= true_ratio <= r["ci"][1] for r in res])
    assert covered >= 1 - ALPHA - 3 * SE, covered


@pytest.mark.parametrize("sampler", [_poisson_counts, _binomial_counts])
@pytest.mark.parametrize("n_t,n_r", [(10_000, 10_000), (5_000, 20_000)])
def test_familywise_type_one_error_under_h0(sampler, n_t, n_r):
    # k = 10 balls per audit with different masses, true ratio 1 everywhere.
    k = 10
    rng = np.random.default_rng(n_t + 7 * n_r + (sampler is _binomial_counts))
    masses = np.geomspace(2e-4, 5e-3, k)
    any_reject = np.zeros(REPS, dtype=bool)
    x_t, x_r = sampler(rng, 1.0, n_t, n_r, np.tile(masses, REPS), REPS * k)
    x_t, x_r = x_t.reshape(REPS, k), x_r.reshape(REPS, k)
    for rep in range(REPS):
        res = density_ratio_test(x_t[rep], n_t, x_r[rep], n_r, alpha=ALPHA)
        any_reject[rep] = any(r["reject"] for r in res)
    fwer = any_reject.mean()
    assert fwer <= ALPHA + 3 * SE, fwer


def test_power_against_planted_collapse():
    # One ball with 3x the reference mass among 9 null balls: Holm must still find it.
    rng = np.random.default_rng(5)
    n_t = n_r = 20_000
    ratios = np.array([3.0] + [1.0] * 9)
    hits = 0
    for _ in range(200):
        x_t = rng.poisson(n_t * 2e-3 * ratios)
        x_r = rng.poisson(n_r * 2e-3 * np.ones(10))
        res = density_ratio_test(x_t, n_t, x_r, n_r)
        hits += res[0]["reject"]
    assert hits >= 190


# ----------------------------------------------------------------------------
# ball_counts


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kernel", ["fast", "reference"])
def test_ball_counts_equal_brute_force(kernel):
    rng = np.random.default_rng(3)
    d = 16
    centres = _unit(rng.normal(size=(4, d)))
    def cloud(n):
        c = centres[rng.integers(0, 4, n)]
        return _unit(c + 0.35 * rng.normal(size=(n, d)) / math.sqrt(d)).astype(np.float32)
    anchors = cloud(7)
    T = cloud(900)
    R = cloud(1300)
    radius = 0.2
    # keep the data away from the threshold so float32 storage cannot decide a pair
    def dist(a, b):
        return np.arccos(np.clip(a.astype(np.float64) @ b.astype(np.float64).T, -1, 1)) / np.pi
    dT, dR = dist(anchors, T), dist(anchors, R)
    assert np.min(np.abs(dT - radius)) > 1e-6 and np.min(np.abs(dR - radius)) > 1e-6
    want_t = np.array([sum(1 for j in range(T.shape[0]) if dT[i, j] <= radius) for i in range(7)])
    want_r = (dR <= radius).sum(axis=1)
    assert want_t.min() > 0 and want_t.max() < T.shape[0]  # a non-trivial radius
    # T streamed in uneven blocks, Ref as one bare array
    blocks = [(0, T[:250]), (250, T[250:251]), (251, T[251:])]
    x_t, x_r = ball_counts(anchors, iter(blocks), R, radius, kernel=kernel)
    assert x_t.dtype == np.int64 and x_r.dtype == np.int64
    np.testing.assert_array_equal(x_t, want_t)
    np.testing.assert_array_equal(x_r, want_r)


def test_ball_counts_validation():
    a = _unit(np.ones((1, 3)))
    with pytest.raises(ValueError):
        ball_counts(a, a, a, 0.0)
    with pytest.raises(ValueError):
        ball_counts(a, a, a, float("nan"))
