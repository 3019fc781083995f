"""ERL global envelope test (tasks/stats/envelope.py): hand-worked cases, defining properties,
calibration under exchangeability (with heavy ties), and the envelope <=> test equivalence."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modeaudit.tasks.stats.envelope import erl_measures, erl_test, pointwise_ranks

# Hand-worked example, s = 5 curves over R = 3 radii (row 0 = observed).
#   radius:      r0  r1  r2
HAND = np.array([[5, 3, 0],    # obs
                 [4, 3, 0],    # ref1  (ties obs at r1)
                 [1, 2, 0],    # ref2
                 [2, 1, 1],    # ref3  (the only non-zero at r2)
                 [3, 0, 0]],   # ref4
                float)
# Ascending average ranks (1 = smallest), per radius:
#   r0: 5 4 1 2 3            r1: 4.5 4.5 3 2 1 (3,3 share 4 and 5)
#   r2: 2.5 2.5 2.5 5 2.5    (four zeros share 1..4)
ASC = np.array([[5, 4.5, 2.5], [4, 4.5, 2.5], [1, 3, 2.5], [2, 2, 5], [3, 1, 2.5]])


def test_hand_worked_pointwise_ranks():
    # "less": the ascending ranks; "greater": s + 1 - ascending (largest -> 1);
    # "two.sided": the smaller of the two (GET find_calc_pointwiserank).
    np.testing.assert_array_equal(pointwise_ranks(HAND, "less"), ASC)
    greater = np.array([[1, 1.5, 3.5], [2, 1.5, 3.5], [5, 3, 3.5], [4, 4, 1], [3, 5, 3.5]])
    np.testing.assert_array_equal(pointwise_ranks(HAND, "greater"), greater)
    two = np.array([[1, 1.5, 2.5], [2, 1.5, 2.5], [1, 3, 2.5], [2, 2, 1], [3, 1, 2.5]])
    np.testing.assert_array_equal(pointwise_ranks(HAND, "two.sided"), two)


def test_hand_worked_erl_and_p_values():
    # "greater" sorted rank vectors:
    #   obs [1, 1.5, 3.5]  ref1 [1.5, 2, 3.5]  ref2 [3, 3.5, 5]  ref3 [1, 4, 4]  ref4 [3, 3.5, 5]
    # Lexicographic order (most extreme first): obs < ref3 < ref1 < ref2 = ref4, positions
    # 1, 2, 3, and (4 + 5)/2 = 4.5 shared by the tie; divided by s = 5.
    e = erl_measures(HAND, "greater")
    np.testing.assert_allclose(e, np.array([1, 3, 4.5, 2, 4.5]) / 5)
    # obs is the unique most extreme: p_low = p_high = 1/5; at alpha = 0.2 (s*alpha = 1) it rejects.
    res = erl_test(HAND[0], HAND[1:], alpha=0.2, alternative="greater")
    assert res["p_low"] == res["p_high"] == res["p"] == pytest.approx(0.2)
    assert res["reject"] is True and res["n_ref"] == 4 and res["alternative"] == "greater"
    # E_(alpha): sorted e = .2 .4 .6 .9 .9, floor(0.2*5) = 1 -> E_(alpha) = 0.4; the envelope is
    # the max over {ref1, ref2, ref3, ref4} = [4, 3, 1]; obs (5 at r0) is above it.
    assert res["envelope_high"] == [4.0, 3.0, 1.0]
    assert res["envelope_low"] == [-math.inf] * 3
    # Observed = ref2's curve, the others as references: e = .9 ties with ref4's .9.
    # p_high = #{e <= .9}/5 = 1 (conservative), p_low = (1 + #{e < .9})/5 = 4/5 (liberal).
    tied = erl_test(HAND[2], np.delete(HAND, 2, axis=0), alpha=0.2)
    assert tied["p_high"] == pytest.approx(1.0) and tied["p_low"] == pytest.approx(0.8)
    assert tied["p"] == tied["p_high"] and tied["reject"] is False


def test_hand_worked_two_sided_and_less():
    # two.sided sorted: obs [1,1.5,2.5] ref1 [1.5,2,2.5] ref2 [1,2.5,3] ref3 [1,2,2] ref4 [1,2.5,3]
    # order: obs < ref3 < ref2 = ref4 < ref1 -> positions 1, 5, 3.5, 2, 3.5.
    np.testing.assert_allclose(erl_measures(HAND, "two.sided"), np.array([1, 5, 3.5, 2, 3.5]) / 5)
    # less sorted: obs [2.5,4.5,5] ref1 [2.5,4,4.5] ref2 [1,2.5,3] ref3 [2,2,5] ref4 [1,2.5,3]
    # order: ref2 = ref4 < ref3 < ref1 < obs -> positions 5, 4, 1.5, 3, 1.5.
    e = erl_measures(HAND, "less")
    np.testing.assert_allclose(e, np.array([5, 4, 1.5, 3, 1.5]) / 5)
    res = erl_test(HAND[0], HAND[1:], alpha=0.2, alternative="less")
    assert res["p_low"] == res["p_high"] == pytest.approx(1.0)
    assert res["envelope_high"] == [math.inf] * 3


def _brute_ranks(x, alternative):
    """Pointwise ranks from the definition: #{smaller} + (#{equal} + 1)/2, then flipped."""
    s = x.shape[0]
    lo = (x[None, :, :] < x[:, None, :]).sum(1) + ((x[None, :, :] == x[:, None, :]).sum(1) + 1) / 2
    return {"less": lo, "greater": s + 1 - lo, "two.sided": np.minimum(lo, s + 1 - lo)}[alternative]


def _brute_erl(x, alternative):
    """ERL from pairwise tuple comparisons: (#{lex-smaller} + (#{equal} + 1)/2) / s."""
    vecs = [tuple(v) for v in np.sort(_brute_ranks(x, alternative), axis=1)]
    s = len(vecs)
    return np.array([(sum(w < v for w in vecs) + (sum(w == v for w in vecs) + 1) / 2) / s for v in vecs])


@pytest.mark.parametrize("alternative", ["greater", "less", "two.sided"])
def test_ranks_and_erl_match_brute_force_under_heavy_ties(alternative):
    rng = np.random.default_rng(11)
    x = rng.poisson(0.4, size=(40, 6)).cumsum(axis=1).astype(float)   # many zeros, many ties
    x[5] = x[7]                                                        # two identical curves
    np.testing.assert_allclose(pointwise_ranks(x, alternative), _brute_ranks(x, alternative))
    e = erl_measures(x, alternative)
    np.testing.assert_allclose(e, _brute_erl(x, alternative))
    assert e[5] == e[7]


def test_ties_get_average_ranks():
    col = np.array([0, 0, 0, 1, 2, 2], float)[:, None]
    # ascending: zeros share 1,2,3 -> 2; the 1 -> 4; the twos share 5,6 -> 5.5.
    np.testing.assert_array_equal(pointwise_ranks(col, "less")[:, 0], [2, 2, 2, 4, 5.5, 5.5])
    np.testing.assert_array_equal(pointwise_ranks(col, "greater")[:, 0], [5, 5, 5, 3, 1.5, 1.5])


def test_curve_above_all_references_gets_smallest_p():
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(99, 41))
    obs = refs.max(axis=0) + 0.1          # strictly above every reference at every radius
    res = erl_test(obs, refs, alternative="greater")
    assert res["p_low"] == res["p_high"] == pytest.approx(1 / 100) and res["reject"]
    below = erl_test(refs.min(axis=0) - 0.1, refs, alternative="greater")
    assert below["p"] == pytest.approx(1.0) and below["p_low"] == pytest.approx(1.0)
    assert not below["reject"]
    assert erl_test(refs.min(axis=0) - 0.1, refs, alternative="less")["p"] == pytest.approx(0.01)
    assert erl_test(obs, refs, alternative="two.sided")["p"] == pytest.approx(0.01)


def test_reordering_references_changes_nothing():
    rng = np.random.default_rng(2)
    refs = rng.poisson(1.0, size=(149, 20)).cumsum(axis=1)
    obs = rng.poisson(1.1, size=20).cumsum()
    perm = rng.permutation(len(refs))
    for alternative in ("greater", "less", "two.sided"):
        a = erl_test(obs, refs, alternative=alternative)
        b = erl_test(obs, refs[perm], alternative=alternative)
        assert a == b
        curves = np.vstack([obs, refs])
        e = erl_measures(curves, alternative)
        e_perm = erl_measures(np.vstack([obs, refs[perm]]), alternative)
        np.testing.assert_array_equal(e_perm[1:], e[1:][perm])


def test_monotone_transforms_change_nothing():
    rng = np.random.default_rng(3)
    refs = rng.poisson(0.7, size=(199, 41)).cumsum(axis=1).astype(float)
    obs = rng.poisson(0.9, size=41).cumsum().astype(float)
    base = erl_test(obs, refs)
    logged = erl_test(np.log1p(obs), np.log1p(refs))
    for key in ("p_low", "p_high", "reject"):
        assert logged[key] == base[key]
    np.testing.assert_allclose(logged["envelope_high"], np.log1p(base["envelope_high"]))
    # A decreasing transform swaps "greater" and "less".
    neg = erl_test(-obs, -refs, alternative="less")
    assert (neg["p_low"], neg["p_high"]) == (base["p_low"], base["p_high"])


def test_identical_to_a_reference_gives_a_p_interval():
    rng = np.random.default_rng(4)
    refs = rng.normal(size=(99, 41))
    res = erl_test(refs[17].copy(), refs)
    assert res["p_low"] < res["p_high"]
    assert res["p_high"] - res["p_low"] == pytest.approx(1 / 100)   # exactly one tied reference
    assert res["p"] == res["p_high"]


def _calibration_rate(sample, n_rep, alternative="greater"):
    rej = 0
    for _ in range(n_rep):
        curves = sample()
        rej += erl_test(curves[0], curves[1:], alpha=0.05, alternative=alternative)["reject"]
    return rej / n_rep


@pytest.mark.parametrize("kind", ["gauss", "poisson_ties"])
def test_calibration_under_exchangeability(kind):
    rng = np.random.default_rng(20240 + len(kind))
    s, R, n_rep = 200, 41, 1000
    if kind == "gauss":
        # Smooth Gaussian-process curves: squared-exponential covariance over the radius grid.
        t = np.linspace(0, 1, R)
        chol = np.linalg.cholesky(np.exp(-((t[:, None] - t[None, :]) / 0.2) ** 2) + 1e-6 * np.eye(R))
        sample = lambda: rng.normal(size=(s, R)) @ chol.T          # noqa: E731
    else:
        # Neighbour counts: cumulative Poisson increments with a shared, tiny intensity at small
        # radii -> most curves are 0 for the first radii (heavy pointwise ties).
        lam = 0.02 * np.exp(np.linspace(0, 4, R))                   # 0.02 .. ~1.1 per shell
        sample = lambda: rng.poisson(lam, size=(s, R)).cumsum(axis=1)  # noqa: E731
    rate = _calibration_rate(sample, n_rep)
    se = math.sqrt(0.05 * 0.95 / n_rep)
    assert abs(rate - 0.05) <= 3 * se, rate


def test_calibration_two_sided_with_ties():
    rng = np.random.default_rng(7)
    lam = np.full(41, 0.15)
    rate = _calibration_rate(lambda: rng.poisson(lam, size=(200, 41)).cumsum(axis=1), 600, "two.sided")
    assert abs(rate - 0.05) <= 3 * math.sqrt(0.05 * 0.95 / 600), rate


@pytest.mark.parametrize("alternative", ["greater", "less", "two.sided"])
def test_envelope_outside_iff_reject_on_continuous_data(alternative):
    rng = np.random.default_rng(5)
    n_out_obs = 0
    for rep in range(60):
        refs = rng.normal(size=(199, 41)).cumsum(axis=1)
        shift = 0.15 * (rep % 4)                          # some nulls, some alternatives
        sign = -1 if alternative == "less" else 1
        obs = rng.normal(size=41).cumsum() + sign * shift * np.arange(41) ** 0.5
        res = erl_test(obs, refs, alpha=0.05, alternative=alternative)
        lo, hi = np.array(res["envelope_low"]), np.array(res["envelope_high"])
        outside = bool(np.any(obs < lo) or np.any(obs > hi))
        assert outside == res["reject"], (rep, res["p"])
        n_out_obs += outside
        # Exactly floor(alpha*s) = 10 of the s = 200 curves leave the envelope (IGI, no ERL ties).
        curves = np.vstack([obs, refs])
        n_out = int(np.sum(np.any((curves < lo) | (curves > hi), axis=1)))
        assert n_out == 10
    assert 0 < n_out_obs < 60                             # both outcomes were exercised


def test_envelope_sides_and_observed_inside_when_not_rejected():
    rng = np.random.default_rng(6)
    refs = rng.normal(size=(199, 41))
    obs = rng.normal(size=41)
    res = erl_test(obs, refs)
    assert not res["reject"]
    assert np.all(obs <= np.array(res["envelope_high"]))
    assert np.all(np.isneginf(res["envelope_low"]))
    two = erl_test(obs, refs, alternative="two.sided")
    assert np.all(np.array(two["envelope_low"]) < np.array(two["envelope_high"]))
    # The envelope is a hull of actual curves: every bound is one of the curves' values.
    curves = np.vstack([obs, refs])
    assert all(np.any(curves[:, k] == two["envelope_high"][k]) for k in range(41))


def test_input_validation():
    refs = np.zeros((9, 3))
    with pytest.raises(ValueError, match="s \\* alpha < 1"):
        erl_test(np.zeros(3), refs, alpha=0.05)           # s = 10: the test could never reject
    with pytest.raises(ValueError, match="refs must be"):
        erl_test(np.zeros(4), refs, alpha=0.2)
    with pytest.raises(ValueError, match="alternative"):
        erl_test(np.zeros(3), refs, alpha=0.2, alternative="up")
    with pytest.raises(ValueError, match="finite"):
        pointwise_ranks(np.array([[np.nan, 1.0], [0.0, 1.0]]), "greater")


def test_2000_tied_curves_are_order_free():
    # Paper-sized curve sets tie heavily; the answer must not depend on the order of the references.
    rng = np.random.default_rng(8)
    refs = rng.poisson(2.0, size=(1999, 41)).cumsum(axis=1)
    obs = rng.poisson(2.0, size=41).cumsum()
    a = erl_test(obs, refs)
    b = erl_test(obs, refs[rng.permutation(len(refs))])
    assert a["p"] == b["p"] and a["p_low"] == b["p_low"]
    assert 1 / 2000 <= a["p_low"] <= a["p"] <= 1.0


def test_module_does_not_import_prefect():
    root = Path(__file__).resolve().parents[1]
    code = "import sys, modeaudit.tasks.stats.envelope; assert 'prefect' not in sys.modules, 'prefect imported'"
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_average_ranks_are_scipys():
    """envelope.average_ranks (no scipy.stats import on a worker) gives scipy's average ranks, ties, signed zeros
    and single rows included."""
    from scipy.stats import rankdata

    from modeaudit.tasks.stats.envelope import average_ranks
    rng = np.random.default_rng(4)
    for t in range(400):
        s, r = int(rng.integers(1, 40)), int(rng.integers(1, 12))
        x = (rng.standard_normal((s, r)), rng.integers(0, 3, (s, r)).astype(float),
             np.round(rng.standard_normal((s, r)), 1), np.where(rng.random((s, r)) < 0.5, 0.0, -0.0))[t % 4]
        np.testing.assert_array_equal(average_ranks(x), rankdata(x, method="average", axis=0))
