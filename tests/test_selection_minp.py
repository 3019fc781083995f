"""The selection test with a reference (round 3): worst-case curve and top-k contrast, combined by min-p.

Cheap: small pools (a few thousand rows, 16-d) and B = 19.
"""
from __future__ import annotations

import numpy as np
import pytest

from modeaudit.tasks.join import kernels as join
from modeaudit.tasks.join.sources import open_embeddings
from modeaudit.tasks.stats.selection import contrast_z, min_p_combination, pool_sampler, replicate_curves
from modeaudit.tasks.stats.steps import selection

RADII = join.DEFAULT_RADII


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _world(rng, n, planted: float, D=16):
    """Identities of Zipf sizes (the first holds about a third of the mass) plus, with `planted` > 0,
    a tight extra identity of that mass: smaller than the largest identity, so never the worst case."""
    centres = _unit(np.random.default_rng(11).standard_normal((31, D)))
    w = 1.0 / np.arange(1, 31)
    w = np.append(w / w.sum() * (1 - planted), planted)
    ids = rng.choice(31, n, p=w)
    spread = np.where(ids == 30, 0.25, 0.6)[:, None]
    return _unit(centres[ids] + spread * rng.standard_normal((n, D)) / np.sqrt(D))


def test_contrast_z_is_the_largest_conditional_binomial_excess():
    # p0 = 1/2: x_t = 30, x_r = 10 -> (30 - 20) / sqrt(40 / 4); an empty ball scores 0
    z = contrast_z([30, 0, 5], [10, 0, 5], 1000, 1000)
    assert z == pytest.approx(10 / np.sqrt(10))
    assert contrast_z([0, 0], [3, 0], 1000, 4000) == 0.0


def test_min_p_combination_holds_its_level_on_exchangeable_splits():
    # Observed and permuted statistics drawn from one law: P(reject) must stay <= alpha
    # (exact test; ties counted against the observed split), here with 2000 simulated tests.
    rng = np.random.default_rng(0)
    rej = [min_p_combination(rng.standard_normal((20, 5)), rng.integers(0, 4, 20).astype(float), 0.05)["reject"]
           for _ in range(2000)]
    rate = np.mean(rej)
    assert rate <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 2000)
    assert rate > 0.01       # not vacuous: the test can reject


def test_min_p_combination_p_values():
    rng = np.random.default_rng(1)
    curves = rng.random((20, 4)) * 0.5
    z = rng.random(20)
    z[0] = 10.0               # the observed split is the most extreme in z alone
    r = min_p_combination(curves, z, 0.1)
    assert r["p_contrast"] == pytest.approx(1 / 20)
    # its min-p ties only the split most extreme by the curve (unless that is itself)
    assert r["p"] <= 2 / 20 and r["reject"]
    curves[0] = 1.0           # and now in the curve too
    r = min_p_combination(curves, z, 0.1)
    assert r["p"] == pytest.approx(1 / 20) and r["p_curve"] == pytest.approx(1 / 20)


def test_pool_sampler_draws_are_unchanged_by_the_contrast():
    # the worst-case curves of the round-2 null are what they were: same splits, same rows
    pool = _world(np.random.default_rng(2), 2500, 0.0)
    a = replicate_curves(pool_sampler(pool, 7, "x"), range(3), m=200, n_t=1000, d0=0.25, radii=RADII)
    b = replicate_curves(pool_sampler(pool, 7, "x", modes=10), range(3), m=200, n_t=1000, d0=0.25, radii=RADII)
    assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def planted_files(tmp_path_factory):
    """S, T from a world with a planted identity (5% of the mass, a third of the largest identity's),
    and a reference R of the collapse-free world, as .npy files."""
    d = tmp_path_factory.mktemp("minp")
    rng = np.random.default_rng(3)
    files = {}
    for name, n, planted in (("S", 400, 0.05), ("T", 3000, 0.05), ("R", 3000, 0.0), ("R0", 3000, 0.0)):
        files[name] = str(d / f"{name}.npy")
        np.save(files[name], _world(rng, n, planted))
    return files


def _run(files, T_name, modes, alpha=0.1):
    S = open_embeddings(files["S"], "S").read()
    T, ref = open_embeddings(files[T_name], "T"), open_embeddings(files["R"], "R")
    null = ("reference", ref, ref.rows, 0, "permutation null")
    return selection(None, S, T, m_sel=len(S), n_t=T.rows, null=null, d0=0.25, radii=RADII, replicates=19,
                     alpha=alpha, kernel="fast", modes=modes)


@pytest.fixture(scope="module")
def planted_runs(planted_files):
    return _run(planted_files, "T", 0), _run(planted_files, "T", 10)


def test_selection_finds_a_planted_mode_that_is_not_the_worst_case(planted_runs):
    curve_only, both = planted_runs
    # The worst case is the largest natural identity: its curve says nothing about the planted mode...
    assert both["s_index"] == curve_only["s_index"]
    assert both["p_curve"] == curve_only["p"] and both["obs_curve_fraction"] == curve_only["obs_curve_fraction"]
    assert not curve_only["reject"]
    # ...while the contrast of the top modes between T and the reference sees it, and the combined test rejects
    # (at alpha = 0.1: with B = 19 the split most extreme by the curve shares the observed min-p, p = 2/20)
    assert both["p_contrast"] == pytest.approx(1 / 20) and both["reject"] and both["p"] <= 0.1
    top = int(np.argmax(np.asarray(both["contrast_x_t"]) - np.asarray(both["contrast_x_r"])))
    assert both["contrast_x_t"][top] > 5 * max(1, both["contrast_x_r"][top])
    assert both["contrast_n_r"] == 3000 and len(both["contrast_modes"]) == 10


def test_selection_with_contrast_is_quiet_when_T_is_a_reference_draw(planted_files):
    # T drawn from the reference's law (R0, independent of R): no excess to find at this seed
    r = _run(planted_files, "R0", 10)
    assert not r["reject"] and r["p_contrast"] > 0.1


def test_report_names_both_statistics_and_draws_the_contrast(planted_runs, monkeypatch):
    from modeaudit.tasks.report import stats as report_stats
    from modeaudit.tasks.report.stats import selection_section
    curve_only, both = planted_runs
    # the replicates' contrast z is kept (result.json), and the observed split's p is its rank among them
    null_z = np.asarray(both["contrast_null_z"])
    assert null_z.shape == (19,) and "contrast_null_z" not in curve_only
    assert both["p_contrast"] == pytest.approx((1 + np.sum(null_z >= both["contrast_z"])) / 20)
    figs = []
    real_img = report_stats._img
    monkeypatch.setattr(report_stats, "_img", lambda fig, *a: figs.append(fig) or real_img(fig, *a))
    title, body = selection_section({"radii": list(RADII), "tests": {"selection": both}})
    (fig,) = figs
    curve_ax, z_ax = fig.axes
    assert [ln.get_xdata()[0] for ln in z_ax.lines] == [both["contrast_z"]]
    assert sum(p.get_height() for p in z_ax.patches) == 19
    selection_section({"radii": list(RADII), "tests": {"selection": curve_only}})
    assert len(figs[1].axes) == 1          # no contrast, no second panel
    assert "min-p" in body and f"contrast alone {both['p_contrast']:.4g}" in body
    assert f"curve alone {both['p_curve']:.4g}" in body
